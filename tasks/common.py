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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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


def write_json(path: Path, obj) -> None:
    """Write then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temp file left behind
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path):
    return json.loads(Path(path).read_text())
