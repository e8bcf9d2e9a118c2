"""Step 6: evaluate the adapter on the 4-bit base over the held-out split.

seq_cls: accuracy, macro-F1, per-class precision/recall/F1 and a confusion matrix.
causal_lm: loss and perplexity on answer tokens; exact match and ROUGE-L of greedy answers
(tasks/model/generation.py), a few of them written as samples.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from tqdm.auto import tqdm

from tasks import catalog
from tasks.catalog import IGNORE_INDEX as IGNORE
from tasks.common import StageResult, atomic_dir, resolve, result, write_json
from tasks.config import Params
from tasks.data.batching import batches, loss_units
from tasks.model import generation
from tasks.model.loading import DTYPES, check_safe_dir, load_saved, load_tokenizer, pick_device, set_threads
from tasks.tokenize import label_names, load_split
from tasks.training.plots import plot_confusion


def load_adapted(params: Params, root: Path, device: torch.device):
    from peft import PeftModel

    check_safe_dir(resolve(root, catalog.ADAPTER_DIR), "adapter")
    base = load_saved(params.task, resolve(root, catalog.BASE_MODEL_DIR), device)
    model = PeftModel.from_pretrained(base, str(resolve(root, catalog.ADAPTER_DIR)))
    return model.eval()


def classification_metrics(y_true: list[int], y_pred: list[int], names: list[str]) -> dict:
    labels = list(range(len(names)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    acc = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
    return {
        "accuracy": acc,
        "macro_f1": float(f.mean()),
        "per_class": {
            n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


@torch.no_grad()
def predict(model, frame, batch_size: int, pad_id: int, task: str, device, dtype):
    """seq_cls: predicted class per row. causal_lm: (summed answer-token loss, answer tokens)."""
    preds, loss_sum, n_tok = [], 0.0, 0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for batch in tqdm(
        batches(frame, batch_size, pad_id, task),
        total=math.ceil(len(frame) / batch_size),
        desc="evaluate",
        unit="batch",
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if task == "seq_cls":
            preds += out.logits.argmax(-1).tolist()
            continue
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        loss_sum += loss.item()
        n_tok += loss_units(batch, task)
    return preds if task == "seq_cls" else (loss_sum, n_tok)


def run(params: Params, root: Path) -> StageResult:
    e = params.eval
    set_threads(params.train.threads)
    device = pick_device(params.train.device)
    dtype = DTYPES[params.quant.compute_dtype]
    tok = load_tokenizer(str(resolve(root, catalog.ADAPTER_DIR)))
    model = load_adapted(params, root, device)
    frame = load_split(root, e.split)
    with atomic_dir(resolve(root, catalog.EVAL_DIR)) as tmp:
        if params.task == "seq_cls":
            names = label_names(root)
            preds = predict(model, frame, e.batch_size, tok.pad_token_id, params.task, device, dtype)
            truth = list(frame["labels"])
            m = classification_metrics(truth, preds, names)
            metrics = {"split": e.split, "rows": len(frame), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            write_json(tmp / Path(catalog.PER_CLASS).name, m["per_class"])
            # DVC's confusion-matrix plot template reads one (actual, predicted) row per example
            with open(tmp / Path(catalog.CONFUSION_CSV).name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["actual", "predicted"])
                w.writerows((names[a], names[b]) for a, b in zip(truth, preds))
            write_json(tmp / "confusion_matrix.json", {"labels": names, "matrix": m["confusion_matrix"]})
            plot_confusion(
                m["confusion_matrix"],
                names,
                tmp / Path(catalog.CONFUSION_PNG).name,
                f"{e.split}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}",
            )
        else:
            loss_sum, n_tok = predict(model, frame, e.batch_size, tok.pad_token_id, params.task, device, dtype)
            loss = loss_sum / max(1, n_tok)
            metrics = {
                "split": e.split,
                "rows": len(frame),
                "eval_loss": loss,
                "perplexity": math.exp(min(loss, 50)),
                "answer_tokens": n_tok,
            }
            # exact match and ROUGE-L of greedy answers to each row's last assistant turn (tasks/model/generation.py)
            scores, samples = generation.evaluate_generation(
                model, tok, frame, e.max_generate_rows, e.max_new_tokens, e.batch_size, device
            )
            metrics.update(scores)
            if e.score_base:  # the same rows through the base alone: what the tuning gained
                metrics.update(score_base(model, tok, frame, e, device, dtype, samples))
            (tmp / Path(catalog.SAMPLES).name).write_text(
                "".join(json.dumps(s) + "\n" for s in samples[: e.num_samples])
            )
    write_json(resolve(root, catalog.METRICS), metrics)
    return result("evaluate", [catalog.METRICS, catalog.EVAL_DIR], **metrics)


def score_base(model, tok, frame, e, device, dtype, samples: list[dict]) -> dict:
    """base_* metrics of the adapted model with its adapter switched off (the 4-bit base as trained
    on), on the rows the tuned model was scored on; each sample gains the base's answer."""
    with model.disable_adapter():
        loss_sum, n_tok = predict(model, frame, e.batch_size, tok.pad_token_id, "causal_lm", device, dtype)
        scores, base_samples = generation.evaluate_generation(
            model, tok, frame, e.max_generate_rows, e.max_new_tokens, e.batch_size, device
        )
    for s, b in zip(samples, base_samples):
        s["base_generated"], s["base_exact_match"] = b["generated"], b["exact_match"]
    loss = loss_sum / max(1, n_tok)
    return {
        "base_eval_loss": loss,
        "base_perplexity": math.exp(min(loss, 50)),
        "base_exact_match": scores["exact_match"],
        "base_rougeL": scores["rougeL"],
    }


def score_model(params: Params, root: Path, model_dir: Path) -> dict:
    """Metrics of a model on this project's current test split: how champion and challenger are
    compared on one and the same held-out set. model_dir: anything tasks/serve/predict.py loads (a
    registered version's bundle, a plain merged folder, models/adapter on the project's base)."""
    from tasks.serve.predict import load_predictor

    pred = load_predictor(Path(model_dir), params, root, device=params.train.device)
    frame = load_split(root, "test")
    out = predict(
        pred.model, frame, params.eval.batch_size, pred.tok.pad_token_id, params.task, pred.device, pred.dtype
    )
    if params.task == "seq_cls":
        m = classification_metrics(list(frame["labels"]), out, label_names(root))
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "rows": len(frame)}
    loss = out[0] / max(1, out[1])
    e = params.eval  # the generation scores the evaluate stage records, on the same rows
    scores, _ = generation.evaluate_generation(
        pred.model, pred.tok, frame, e.max_generate_rows, e.max_new_tokens, e.batch_size, pred.device
    )
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), "rows": len(frame), **scores}
