"""Typed configuration: one pydantic model per params.yaml section.

Unknown keys, wrong types and out-of-range values are rejected when params are loaded,
before any work starts, with the dotted key named and (for typos) a suggestion.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
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
        raise ValueError(f"relative path {value!r} leaves the project; write it as an absolute path "
                         f"if it is meant to be outside")
    return value


class DataConfig(Section):
    path: str = "data/raw/ag_news/test.csv"
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    # CSV files without a header row (AG News) name their columns here.
    header: bool = True
    columns: list[str] | None = None
    # seq_cls: texts are joined from these columns; label column holds the class.
    text_columns: list[str] = ["text"]
    label_column: str = "label"
    # Optional class names; with label_base=1, label 1 is label_names[0] (AG News).
    label_names: list[str] | None = None
    label_base: int = 0
    clean_text: bool = True

    _path_inside = field_validator("path")(classmethod(lambda cls, v: _inside_project(v)))
    # Duplicate rows are never dropped silently: "error" fails, "drop" drops and reports.
    duplicates: Literal["error", "drop"] = "error"
    min_classes: int = Field(2, ge=2)


class SplitConfig(Section):
    # stratified: seeded, class-balanced, re-drawn over the whole dataset each time.
    # hash: each row's split is a hash of its text, so rows never move between splits as
    # new data arrives (what retraining needs to compare models on one held-out set).
    method: Literal["stratified", "hash"] = "stratified"
    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 42
    stratify: bool = True


class TokenizeConfig(Section):
    max_length: int = Field(128, ge=8, le=32768)
    # False: a row longer than max_length is an error instead of being truncated.
    truncation: bool = True
    template: Literal["alpaca", "chatml", "plain"] = "alpaca"


class ModelConfig(Section):
    # A hub id or a local directory. Hub ids with an embedded offline copy (a PyPI model
    # package) resolve to it when the package is installed and prefer_embedded is true.
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    revision: str = "main"
    prefer_embedded: bool = True
    trust_remote_code: bool = False

    _name_inside = field_validator("name")(classmethod(lambda cls, v: _inside_project(v)))


class QuantConfig(Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Kept out of quantization (classification heads must be, or PEFT fails on them).
    skip_modules: list[str] = ["classifier", "pooler.dense", "score", "lm_head"]


class LoraSection(Section):
    r: int = Field(16, gt=0, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainConfig(Section):
    epochs: float = Field(1, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1: run all epochs
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: paged AdamW (bitsandbytes) on CUDA, torch AdamW on CPU.
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = "auto"
    gradient_checkpointing: bool = True
    # The last N decoder layers keep their activations instead of recomputing them in the
    # backward pass: faster, about one layer's activations more memory each.
    gradient_checkpointing_skip_last: int = Field(0, ge=0)
    # fp32_upcast: PEFT's k-bit preparation (all non-quantized weights fp32; the plain recipe).
    # mixed: fp32 residual stream and adapter sums, bf16 elsewhere (same loss, faster;
    # Llama-layout decoders). bf16: fastest, loss lags early. See tasks/precision.py.
    precision: Literal["fp32_upcast", "mixed", "bf16"] = "fp32_upcast"
    # causal_lm: pack whole examples into rows of tokenize.max_length (batch_size counts
    # packed rows); attention never crosses examples. Ignored for seq_cls.
    packing: bool = False
    # Liger Triton kernels (fused linear+cross-entropy, RMSNorm, SwiGLU, RoPE): CUDA and
    # Llama/Mistral/Qwen2 models only; ignored elsewhere. Needs the liger-kernel package.
    liger_kernels: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(50, ge=0)  # steps between resumable checkpoints; 0: none
    threads: int = Field(0, ge=0)  # 0: torch's default
    speed: Literal["auto", "off"] = Field(
        "auto", description="auto: on CUDA, a causal LM with a 4-bit Llama/Mistral/Qwen2-layout base trains on the "
        "fast path (tasks/speed.py: compiled and checkpointed decoder layers with the 4-bit dequantization inside, "
        "Liger cross-entropy, bf16 activations), whatever liger_kernels, gradient_checkpointing and precision say; "
        "elsewhere (CPU, other models), and with off, those flags apply as set")


class EvalConfig(Section):
    batch_size: int = Field(64, gt=0)
    split: Literal["test", "validation"] = "test"
    max_new_tokens: int = Field(32, gt=0)
    num_samples: int = Field(3, ge=0)


class MergeConfig(Section):
    enabled: bool = True
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else a SQLite store under the project.
    tracking_uri: str | None = None
    experiment: str = "qlora-flow"
    registered_model: str = "qlora-flow-model"
    # When the tracking server does not answer: false fails the run before training,
    # true records to the local SQLite store instead (and says so in the log and a tag).
    fallback_to_local: bool = False


class RetrainConfig(Section):
    inbox: str = "data/inbox"
    metric: str = "accuracy"       # from reports/metrics.json: accuracy, macro_f1, eval_loss, ...
    greater_is_better: bool = True
    alias: str = "champion"
    dvc_remote: str | None = None  # None: the repository's default DVC remote
    git_commit: bool = True        # commit the new .dvc file, so the data version is in git

    _inbox_inside = field_validator("inbox")(classmethod(lambda cls, v: _inside_project(v)))


class Params(Section):
    task: Literal["seq_cls", "causal_lm"] = "seq_cls"
    seed: int = 42
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
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "Params":
        if self.split.validation + self.split.test >= 0.8:
            raise ValueError("split.validation + split.test must leave at least 20% for training")
        return self

    def get(self, dotted: str) -> Any:
        """Value at a dotted key, e.g. 'lora.r' or 'data'."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node

    def digest(self, keys: tuple[str, ...]) -> str:
        """Stable hash of the values at these dotted keys (a stage's params)."""
        payload = json.dumps({k: self.get(k) for k in keys}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


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
        raise ParamsError("retraining compares models on one held-out test set, which needs rows to keep "
                          "their split as data grows: set split.method: hash")
    if not params.merge.enabled:
        raise ParamsError("retraining compares merged models: set merge.enabled: true")


def write_params(params: Params, path: Path) -> None:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
