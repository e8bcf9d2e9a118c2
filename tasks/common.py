"""What every step shares: atomic writes, the stage result and the error type.

Whether a stage is up to date is DVC's to say (dvc.lock); stages only write their outputs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class PipelineError(RuntimeError):
    """A clear, user-facing failure (bad data, bad model files): no traceback needed."""


@dataclass
class StageResult:
    """What a stage wrote (paths relative to the project root) and a few facts about it."""

    stage: str
    outputs: list[str]
    summary: dict = field(default_factory=dict)


def resolve(root: Path, p: str | Path) -> Path:
    """Paths in params are relative to the project root unless absolute."""
    p = Path(p)
    return p if p.is_absolute() else Path(root) / p


def result(stage: str, outs: list[str], **summary) -> StageResult:
    return StageResult(stage, list(outs), summary)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory beside its target, then swap it in: readers never see half of it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name no leftover can hold; ".tmp" marks a killed writer's folder for whoever cleans up.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside target (`.name` + suffix) to write, renamed over target when the block
    ends: readers see the old file or the new one, never half of one. When the block fails (a
    full disk) the temp file is removed and target is as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())
