"""The data catalog: every artifact the pipeline reads or writes, named once.

Stages (tasks/), the DAG and dvc.yaml (flows/dvc/stages.py), tracking (flows/tracking/mlflow_record.py) and
the tests all take paths from here. Paths are relative to the project root.
"""

from __future__ import annotations

# data: validate -> split -> tokenize
VALIDATED_DIR = "data/validated"
VALIDATED_ROWS = f"{VALIDATED_DIR}/dataset.arrow"  # Arrow stream (tasks/data/arrowio.py): text, label, row
LABELS = f"{VALIDATED_DIR}/labels.json"  # class names, in label-index order
SPLIT_DIR = "data/split"  # {train,validation,test}.arrow
TOKENIZED_DIR = "data/tokenized"  # {split}.arrow (input_ids, labels, row), labels.json, stats.json
TOKENIZE_STATS = f"{TOKENIZED_DIR}/stats.json"
SPLITS = ("train", "validation", "test")
HF_DATASETS_CACHE = ".qlora/hf-datasets"  # hf:// data.path: datasets.load_dataset's cache


def split_file(folder: str, split: str) -> str:
    """One split's rows in SPLIT_DIR or TOKENIZED_DIR."""
    return f"{folder}/{split}.arrow"


# models: quantize -> train -> merge
BASE_MODEL_DIR = "models/base"  # the 4-bit base, saved pre-quantized
BASE_LINEAGE = f"{BASE_MODEL_DIR}/lineage.json"  # where the base came from
ADAPTER_DIR = "models/adapter"  # the LoRA adapter (PEFT format)
MERGED_DIR = "models/merged"  # base + adapter as one plain model
CARD = "README.md"  # a model card (Hugging Face layout), beside the weights
ADAPTER_CARD = f"{ADAPTER_DIR}/{CARD}"  # written by train: what this training determines
MERGED_CARD = f"{MERGED_DIR}/{CARD}"  # written by merge

# a bundle: what a registered MLflow model version carries (tasks/serve/predict.py reads it)
BUNDLE_META = "qlora_model.json"  # task, variant, params, labels, base
BUNDLE_WEIGHTS = {"merged": "merged", "adapter": "adapter"}  # the weights' folder, per variant

# reports: small files people and tracking read
VALIDATION_REPORT = "reports/validation.json"  # every bad row: file, row, column, rule, value
TRAIN_REPORT_DIR = "reports/train"
TRAIN_LOSS_CSV = f"{TRAIN_REPORT_DIR}/loss.csv"
TRAIN_LOSS_PNG = f"{TRAIN_REPORT_DIR}/loss.png"  # train and validation curves
TRAIN_VALIDATION_CSV = f"{TRAIN_REPORT_DIR}/validation.csv"  # one row per validation pass (train.eval_every)
TRAIN_SUMMARY = f"{TRAIN_REPORT_DIR}/summary.json"
EVAL_DIR = "reports/eval"
CONFUSION_CSV = f"{EVAL_DIR}/confusion.csv"
CONFUSION_PNG = f"{EVAL_DIR}/confusion.png"
PER_CLASS = f"{EVAL_DIR}/per_class.json"
SAMPLES = f"{EVAL_DIR}/samples.jsonl"
METRICS = "reports/metrics.json"  # headline metrics (dvc metrics, MLflow)
INGEST_REPORT = "reports/ingest.json"  # what retraining took from the inbox
SWEEPS_DIR = "reports/sweeps"  # one folder per `qlora sweep`

# project state that is not an artifact
CHECKPOINT_DIR = ".qlora/checkpoints/train"  # resumable training checkpoints
LOCK_FILE = ".qlora/lock"  # one writing command at a time
SERVE_LOCK_FILE = ".qlora/serve.lock"  # held by the one `qlora serve` of a project
TRAIN_STEPS_LIVE = ".qlora/live/train_steps.jsonl"  # train appends each logged step; MLflow receives it live
RETRAIN_LAST = ".qlora/retrain/last.json"  # the last retraining tick: when, what it did, or that it is running
STAGE_ERRORS_DIR = ".qlora/errors"  # a failed stage's message, for whoever ran it through DVC

# conventions shared by tokenize, batching, train and evaluate
IGNORE_INDEX = -100  # label of tokens that carry no loss
