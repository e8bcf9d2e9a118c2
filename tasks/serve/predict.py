"""Predictions on new rows: the one implementation behind `qlora predict`, every registered
MLflow model version (flows/serving/served_model.py calls it) and the tests.

A model comes as one of:
- a bundle, what every registered version carries (write_bundle makes it): qlora_model.json
  (task, variant, the params that made it, labels, where the base comes from), the weights
  folder (merged/ or adapter/) and the model card;
- an MLflow model directory holding a bundle (in artifacts/bundle);
- a project's models/merged (plain transformers) or models/adapter (on the project's saved
  4-bit base, as evaluation runs it), read with the project's params.

Rows are checked against the training data's pandera contract, the label optional
(tasks/validate.py), and cleaned and tokenized exactly as in training.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tasks import catalog
from tasks.common import PipelineError, read_json, resolve, write_json
from tasks.config import ModelConfig, Params
from tasks.data.readers import ROW, _as_text, detect_format, read_raw
from tasks.model.loading import DTYPES, auto_class, check_safe_dir, load_base, load_saved, load_tokenizer

BUNDLE_FORMAT = 1
MLFLOW_BUNDLE = "artifacts/bundle"  # where an MLflow model directory keeps its bundle (flows/serving/model_version.py)


@dataclass
class Predictor:
    params: Params  # the settings that made the model: data contract, template, lengths
    model: Any
    tok: Any
    labels: list[str] | None  # seq_cls: class names in label-index order
    device: torch.device
    dtype: torch.dtype  # what matmuls run in (autocast), as in evaluation
    variant: str  # merged | adapter
    path: Path

    @property
    def task(self) -> str:
        return self.params.task


# --- bundles ---------------------------------------------------------------------------------


def _copy_tree(src: Path, dest: Path) -> None:
    """Hard links where the filesystem allows (a merged model can be gigabytes), else copies."""

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy)


def base_reference(params: Params, root: Path) -> dict:
    """Where an adapter-only bundle loads its base from, and how it quantizes it (as the quantize stage did)."""
    lineage = read_json(resolve(root, catalog.BASE_LINEAGE))
    name = params.model.name
    if lineage.get("base_model_source") == "local_dir":
        name = str(resolve(root, name).resolve())  # only reachable where this path exists
    return {
        "name": name,
        "revision": params.model.revision,
        "prefer_embedded": params.model.prefer_embedded,
        "trust_remote_code": params.model.trust_remote_code,
        "source": lineage.get("base_model_source"),
        "source_revision": lineage.get("base_model_revision"),
        "quant": params.quant.model_dump(mode="json"),
        "seed": params.seed,
    }


def write_bundle(dest: Path, params: Params, root: Path, variant: str, card: str) -> Path:
    """A servable folder from a project's outputs: the merged model or the adapter (with a reference
    to its base), the params, the labels, and the model card (beside the weights and inside them)."""
    dest = Path(dest)
    weights = dest / catalog.BUNDLE_WEIGHTS[variant]
    _copy_tree(resolve(root, catalog.MERGED_DIR if variant == "merged" else catalog.ADAPTER_DIR), weights)
    labels = read_json(resolve(root, catalog.LABELS))["names"] if params.task == "seq_cls" else None
    meta = {
        "format": BUNDLE_FORMAT,
        "variant": variant,
        "task": params.task,
        "labels": labels,
        "params": params.model_dump(mode="json"),
        "base": base_reference(params, root) if variant == "adapter" else None,
    }
    write_json(dest / catalog.BUNDLE_META, meta)
    for card_path in (dest / catalog.CARD, weights / catalog.CARD):
        card_path.unlink(missing_ok=True)  # a hard link to the project's file: never write through it
        card_path.write_text(card)
    return dest


def find_bundle(path: Path) -> Path | None:
    for candidate in (Path(path), Path(path) / MLFLOW_BUNDLE):
        if (candidate / catalog.BUNDLE_META).is_file():
            return candidate
    return None


def describe(path: Path) -> dict:
    """What a model folder holds, without loading weights: {kind, variant, task, params?}."""
    path = Path(path)
    bundle = find_bundle(path)
    if bundle is not None:
        meta = read_json(bundle / catalog.BUNDLE_META)
        return {"kind": "bundle", "bundle": bundle, **meta}
    if (path / "adapter_config.json").is_file():
        return {"kind": "adapter_dir", "variant": "adapter"}
    if (path / "config.json").is_file():
        return {"kind": "merged_dir", "variant": "merged"}
    if (path / "MLmodel").is_file():
        raise PipelineError(
            f"{path}: an MLflow model, but not one qlora-flow made (no {MLFLOW_BUNDLE}/"
            f"{catalog.BUNDLE_META}); load it with mlflow.pyfunc.load_model"
        )
    raise PipelineError(f"{path}: not a model folder (no {catalog.BUNDLE_META}, adapter_config.json or config.json)")


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device 'cuda' asked for, but no CUDA GPU is available")
    return torch.device(setting)


def bundle_params(meta: dict, where: Path) -> Params:
    try:
        return Params.model_validate(meta["params"])
    except Exception as exc:  # a bundle from a newer or older qlora-flow: name it rather than trace back
        raise PipelineError(
            f"{where}: its params do not fit this qlora-flow's settings ({exc}); load it with "
            f"the code it carries (mlflow.pyfunc.load_model) instead"
        ) from None


def load_predictor(
    path: Path, params: Params | None = None, root: Path | None = None, device: str = "auto"
) -> Predictor:
    """Load a model folder (see the module docstring). params/root: the project, for a plain
    models/merged or models/adapter folder (a bundle carries its own)."""
    path = Path(path)
    info = describe(path)
    dev = _device(device)
    if info["kind"] == "bundle":
        bundle, params = info["bundle"], bundle_params(info, info["bundle"])
        weights = bundle / catalog.BUNDLE_WEIGHTS[info["variant"]]
        labels = info.get("labels")
        if info["variant"] == "merged":
            model, dtype = _load_plain(params.task, weights, dev)
            return Predictor(params, model, load_tokenizer(str(weights)), labels, dev, dtype, "merged", path)
        model = _adapter_on(_base_from_reference(params.task, info["base"], labels, dev), weights)
        return Predictor(
            params,
            model,
            load_tokenizer(str(weights)),
            labels,
            dev,
            DTYPES[params.quant.compute_dtype],
            "adapter",
            path,
        )
    if params is None:
        raise PipelineError(
            f"{path}: a plain model folder; its data contract and prompt template come from the "
            f"project's params.yaml (run in the project), or use a registered model version"
        )
    if info["kind"] == "merged_dir":
        model, dtype = _load_plain(params.task, path, dev)
        return Predictor(params, model, load_tokenizer(str(path)), _config_labels(model), dev, dtype, "merged", path)
    base_dir = resolve(root or Path.cwd(), catalog.BASE_MODEL_DIR)
    if not (base_dir / "config.json").exists():
        raise PipelineError(
            f"{path}: an adapter folder, and there is no saved base at {base_dir} to load it on "
            f"(run the quantize stage, or use a registered version)"
        )
    model = _adapter_on(load_saved(params.task, base_dir, dev), path)
    return Predictor(
        params,
        model,
        load_tokenizer(str(path)),
        _config_labels(model),
        dev,
        DTYPES[params.quant.compute_dtype],
        "adapter",
        path,
    )


def _config_labels(model) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None) or {}
    return (
        [id2label[i] for i in sorted(id2label)]
        if model.config.architectures
        and any(a.endswith("ForSequenceClassification") for a in model.config.architectures)
        else None
    )


def _load_plain(task: str, path: Path, device: torch.device):
    check_safe_dir(path)
    model = auto_class(task).from_pretrained(str(path), use_safetensors=True).to(device).eval()
    return model, next(model.parameters()).dtype


def _base_from_reference(task: str, ref: dict, labels: list[str] | None, device: torch.device):
    """The base as the quantize stage made it: same source, revision, 4-bit settings and seed (a
    head the checkpoint lacks is initialised from it; the adapter then replaces the trained head)."""
    from tasks.config import QuantConfig
    from tasks.model.source import resolve_source

    cfg = ModelConfig(
        name=ref["name"],
        revision=ref["revision"],
        prefer_embedded=ref["prefer_embedded"],
        trust_remote_code=ref["trust_remote_code"],
    )
    if ref.get("source") == "local_dir" and not Path(ref["name"]).is_dir():
        raise PipelineError(
            f"this adapter-only model loads its base from the local folder {ref['name']}, which is "
            f"not on this machine; register the merged variant (tracking.register_as: merged) "
            f"or make the base reachable there"
        )
    source, _ = resolve_source(cfg)
    torch.manual_seed(ref["seed"])
    return load_base(task, source, cfg, QuantConfig(**ref["quant"]), device, labels)


def _adapter_on(base, adapter_dir: Path):
    from peft import PeftModel

    check_safe_dir(adapter_dir, "adapter")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# --- rows ------------------------------------------------------------------------------------


def read_rows(
    path: Path, params: Params, fmt: str = "auto", header: bool | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """A file of rows to predict (CSV, JSONL, JSON or parquet). A CSV is read the way the training
    data was (its header and column names) unless header/columns say otherwise."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    try:
        trained = detect_format(Path(params.data.path), params.data.format)
    except PipelineError:
        trained = None
    if fmt == "csv":
        if header is None:
            header = params.data.header if trained == "csv" else True
        if columns is None and trained == "csv" and not header:
            columns = params.data.columns
    return read_raw(path, fmt, bool(header), columns)


def frame_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that arrived as a DataFrame (an HTTP request): values as text, positions 1..n as row ids."""
    out = df.map(_as_text).astype(object) if len(df) else df.astype(object)
    out[ROW] = list(range(1, len(out) + 1))
    return out


def prepare(params: Params, df: pd.DataFrame, source) -> pd.DataFrame:
    from tasks.validate import prediction_rows

    return prediction_rows(params, df.copy(), source)


# --- prediction ------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled)


@torch.no_grad()
def predict(
    pred: Predictor,
    rows: pd.DataFrame,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Predictions for prepared rows (prepare()), in their order. seq_cls: label (class name) and
    score (its softmax probability); causal_lm: generated (greedy, after the training template)."""
    batch_size = batch_size or pred.params.eval.batch_size
    autocast = torch.autocast(pred.device.type, dtype=pred.dtype, enabled=pred.dtype != torch.float32)
    if pred.task == "seq_cls":
        return _classify(pred, rows, batch_size, autocast, progress)
    return _generate(pred, rows, batch_size, max_new_tokens or pred.params.eval.max_new_tokens, autocast, progress)


def _classify(pred: Predictor, rows: pd.DataFrame, batch_size: int, autocast, progress: bool) -> pd.DataFrame:
    from tasks.data.batching import collate
    from tasks.tokenize import encode_classification

    encoded = encode_classification(
        {"text": rows["text"].tolist(), "label": [0] * len(rows)}, pred.tok, pred.params.tokenize.max_length
    )  # as tokenize encodes training rows
    labels, scores = [], []
    with _progress(len(rows), "predict", progress) as bar:
        for start in range(0, len(rows), batch_size):
            part = {k: encoded[k][start : start + batch_size] for k in ("input_ids", "labels")}
            batch = collate(part, pred.tok.pad_token_id, "seq_cls")
            with autocast:
                logits = pred.model(
                    input_ids=batch["input_ids"].to(pred.device), attention_mask=batch["attention_mask"].to(pred.device)
                ).logits
            probs = logits.float().softmax(-1)
            best = probs.argmax(-1)
            labels += [pred.labels[i] if pred.labels else str(i) for i in best.tolist()]
            scores += probs.gather(1, best[:, None])[:, 0].tolist()
            bar.update(len(best))
    return pd.DataFrame({"label": labels, "score": scores})


def _generate(
    pred: Predictor, rows: pd.DataFrame, batch_size: int, max_new_tokens: int, autocast, progress: bool
) -> pd.DataFrame:
    """Greedy generation, batch_size prompts at a time, left-padded (rows keep their order)."""
    from tasks.data.prompts import render_prompt

    tok, t = pred.tok, pred.params.tokenize
    if "messages" in rows or t.template == "model":  # conversations, or the model's chat template (tasks/data/chat.py)
        from tasks.data.chat import generation_prompts

        prompts = generation_prompts(tok, rows, t.template, t.max_length)
    else:
        prompts = [
            tok(render_prompt(t.template, ins, inp or ""), add_special_tokens=True)["input_ids"][-t.max_length :]
            for ins, inp in zip(rows["instruction"], rows["input"])
        ]
    out = []
    with _progress(len(prompts), "generate", progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            with autocast:
                gen = pred.model.generate(
                    input_ids=ids.to(pred.device),
                    attention_mask=mask.to(pred.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
            bar.update(len(chunk))
    return pd.DataFrame({"generated": out})
