"""What every step shares: content hashes, atomic writes, results and the error type."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class PipelineError(RuntimeError):
    """A clear, user-facing failure (bad data, bad model files): no traceback needed."""


@dataclass
class StageResult:
    stage: str
    outputs: dict[str, str]  # path relative to root -> content hash
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"stage": self.stage, "outputs": self.outputs, "summary": self.summary}


def sha256_file(path: Path, _chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) listing."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def resolve(root: Path, p: str | Path) -> Path:
    """Paths in params are relative to the project root unless absolute."""
    p = Path(p)
    return p if p.is_absolute() else Path(root) / p


def result(stage: str, root: Path, outs: list[str], **summary) -> StageResult:
    return StageResult(stage, {o: content_hash(resolve(root, o)) for o in outs}, summary)


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
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
