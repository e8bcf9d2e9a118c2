"""The pipeline's DAG, declared once. The Prefect flow runs these stages in this order with
cache keys built from exactly these deps, code and params; dvc.yaml must declare the same
(tests/test_dvc_agreement.py proves it, and `qlora dvc-yaml` renders it).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks import evaluate, merge, quantize, split, tokenize, train, validate
from tasks.common import StageResult, content_hash, resolve
from tasks.config import Params

REPO = Path(__file__).resolve().parent.parent
COMMON_CODE = ("tasks/common.py", "tasks/config.py")
_TEMPLATE = re.compile(r"\$\{([a-z_.]+)\}")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Params, Path], StageResult]
    deps: tuple[str, ...]      # data paths under the project root; ${key} takes a params value
    code: tuple[str, ...]      # source files and folders (repo-relative) whose edits re-run the stage
    params: tuple[str, ...]    # dotted params.yaml keys the stage reads
    outs: tuple[str, ...]      # what it writes; reports/ paths are small and not DVC-cached
    metrics: tuple[str, ...] = ()

    def data_deps(self, params: Params) -> list[str]:
        return [_TEMPLATE.sub(lambda m: str(params.get(m.group(1))), d) for d in self.deps]

    def all_code(self) -> tuple[str, ...]:
        return COMMON_CODE + self.code


STAGES: tuple[Stage, ...] = (
    Stage("validate", validate.run, deps=("${data.path}",),
          code=("tasks/validate.py", "tasks/dataio.py", "schemas"),
          params=("task", "data"), outs=(validate.OUT_DIR,), metrics=(validate.REPORT,)),
    Stage("split", split.run, deps=(split.IN_DIR,), code=("tasks/split.py",),
          params=("task", "split"), outs=(split.OUT_DIR,)),
    Stage("tokenize", tokenize.run, deps=(tokenize.IN_DIR, tokenize.LABELS),
          code=("tasks/tokenize.py", "tasks/prompts.py", "tasks/modeling.py"),
          params=("task", "tokenize", "model"), outs=(tokenize.OUT_DIR,)),
    Stage("quantize", quantize.run, deps=(quantize.LABELS,),
          code=("tasks/quantize.py", "tasks/modeling.py"),
          params=("task", "seed", "model", "quant", "train.device"), outs=(quantize.OUT_DIR,)),
    Stage("train", train.run, deps=(tokenize.OUT_DIR, quantize.OUT_DIR),
          code=("tasks/train.py", "tasks/checkpoint.py", "tasks/batching.py", "tasks/plots.py", "tasks/modeling.py",
                "tasks/precision.py", "tasks/distributed.py"),
          params=("task", "seed", "lora", "train", "quant.compute_dtype"), outs=(train.ADAPTER, train.REPORT_DIR)),
    Stage("evaluate", evaluate.run, deps=(tokenize.OUT_DIR, quantize.OUT_DIR, train.ADAPTER),
          code=("tasks/evaluate.py", "tasks/batching.py", "tasks/plots.py", "tasks/modeling.py"),
          params=("task", "eval", "train.device", "train.threads", "quant.compute_dtype"),
          outs=(evaluate.EVAL_DIR,), metrics=(evaluate.METRICS,)),
    Stage("merge", merge.run, deps=(quantize.OUT_DIR, train.ADAPTER),
          code=("tasks/merge.py", "tasks/modeling.py"), params=("task", "merge"), outs=(merge.OUT_DIR,)),
)
BY_NAME = {s.name: s for s in STAGES}


def code_hash(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0" + content_hash(REPO / p).encode())
    return h.hexdigest()


def cache_key(stage: Stage, params: Params, root: Path, extra: str = "") -> str:
    """Content of every input + the stage's params + its source: equal keys, equal outputs."""
    h = hashlib.sha256(stage.name.encode())
    for dep in stage.data_deps(params):
        h.update(dep.encode() + b"\0" + content_hash(resolve(root, dep)).encode())
    h.update(code_hash(stage.all_code()).encode())
    h.update(params.digest(stage.params).encode())
    h.update(extra.encode())
    return h.hexdigest()


def outputs_intact(outputs: dict[str, str], root: Path) -> bool:
    """True when every recorded output still exists with the recorded content."""
    try:
        return all(content_hash(resolve(root, p)) == h for p, h in outputs.items())
    except FileNotFoundError:
        return False


def dvc_yaml(stages: tuple[Stage, ...] = STAGES) -> dict:
    """dvc.yaml as data: the same stages, deps (data + code), params and outputs."""
    out: dict = {"stages": {}}
    for s in stages:
        entry: dict = {"cmd": f"qlora stage {s.name}", "deps": list(s.deps) + list(s.all_code()),
                       "params": list(s.params)}
        outs = [o if not o.startswith("reports/") else {o: {"cache": False}} for o in s.outs]
        if outs:
            entry["outs"] = outs
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        out["stages"][s.name] = entry
    out["metrics"] = [evaluate.METRICS, f"{train.REPORT_DIR}/summary.json"]
    out["plots"] = [
        {"reports/train/loss.csv": {"x": "step", "y": "loss", "title": "LoRA training loss"}},
        {"reports/eval/confusion.csv": {"template": "confusion", "x": "predicted", "y": "actual",
                                        "title": "Confusion matrix (test split)"}},
        "reports/train/loss.png",
        "reports/eval/confusion.png",
    ]
    return out
