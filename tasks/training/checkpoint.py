"""Training checkpoints for crash-and-resume: trainable weights, optimizer, scheduler, RNG
and data position, written to a temp folder of its own and renamed into place, so a crash
mid-write leaves the previous checkpoint as the latest. Each run's checkpoints live in a
folder named by its key (the train stage's DVC key: its inputs and settings), so another run,
on other data or settings, never writes over or resumes from them; a run prunes the folders
of every other key. A manifest of the files' sizes and sha256 is written last: a checkpoint
whose manifest is missing or does not match its files (a crash before the data reached the
disk, a truncated copy) is skipped with a log line, and an older one is taken.

Several processes: every rank calls save, latest and restore. The state is gathered whole
(tasks/distributed/sharding.py: FSDP's shards too) and rank 0 alone writes and reads, then hands it to
the others, so the files are those of a one-process run and resume on any number of
processes (the data position is counted in rows of the epoch's order, not per rank), and
only rank 0's disk needs them (several nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.common import atomic_dir
from tasks.distributed import ddp as distributed
from tasks.distributed import sharding

KEEP = 2


EXTRA = "extra.safetensors"  # tensors a caller adds (the best adapter weights of early stopping)
MANIFEST = "manifest.json"  # {file: {size, sha256}} of the other files; written last


def run_dir(ckpt_root: Path, key: str) -> Path:
    """The folder of one run's checkpoints: the key itself when it is a plain name (DVC's
    keys are hex), else its sha256."""
    name = key if re.fullmatch(r"[A-Za-z0-9_-]{1,128}", key) else hashlib.sha256(key.encode()).hexdigest()
    return Path(ckpt_root) / name


def prune(ckpt_root: Path, key: str) -> list[Path]:
    """Remove every other run's checkpoints (older keys, files of older layouts) and this run's
    unfinished temp folders. Rank 0 only; the project lock keeps other writers out."""
    ckpt_root, keep = Path(ckpt_root), run_dir(ckpt_root, key)
    removed = []
    if not distributed.is_main() or not ckpt_root.is_dir():
        return removed
    for path in [*ckpt_root.iterdir(), *(keep.glob(".*.tmp") if keep.is_dir() else [])]:
        if path != keep:
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in files:
        _sync(p)  # the data is on disk before the manifest vouches for it
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _digest(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _sync(folder / MANIFEST)
    _sync(folder)


def check(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: its files match its manifest)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (written last): the checkpoint is incomplete"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not isinstance(manifest, dict) or "state.json" not in manifest:
        return f"{MANIFEST} does not list state.json"
    for name, want in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('size')} (truncated?)"
        if _digest(f) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def save(
    ckpt_dir: Path, model, optimizer, scheduler, state: dict, extra: dict[str, torch.Tensor] | None = None
) -> Path | None:
    """Called by every rank (gathering FSDP's shards is a collective); rank 0 writes."""
    weights, optim = sharding.full_training_state(model, optimizer)
    if not distributed.is_main():
        return None
    final = ckpt_dir / f"step-{state['step']:08d}"
    # atomic_dir's temp folder ends in .tmp: prune finds a killed save's.
    with atomic_dir(final) as tmp:
        save_file(weights, tmp / "trainable.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        if extra:
            save_file({n: t.detach().to("cpu").contiguous() for n, t in extra.items()}, tmp / EXTRA)
        torch.save(optim, tmp / "optimizer.pt")  # tensors only: loads with weights_only=True
        (tmp / "state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}))
        _write_manifest(tmp)
    # Later steps than this one are a killed attempt's that were not resumed from (skipped as
    # corrupt): they are not this run's future.
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.name <= final.name)
    for old in [*steps[:-KEEP], *(p for p in ckpt_dir.glob("step-*") if p.name > final.name)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in [*ckpt_dir.glob(".*.tmp"), *ckpt_dir.glob(".*.old")]:  # killed saves' (one writer: the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def latest(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written by a run with this fingerprint (rank 0's, on every rank)."""
    return distributed.broadcast_object(_latest(ckpt_dir, fingerprint) if distributed.is_main() else None)


def _latest(ckpt_dir: Path, fingerprint: str) -> Path | None:
    for path in sorted(Path(ckpt_dir).glob("step-*"), reverse=True):
        why = check(path)
        if why is None:
            try:
                if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
                    return path
                why = "written by another run (its fingerprint differs)"
            except (OSError, ValueError, KeyError) as e:
                why = f"unreadable state.json ({e})"
        print(f"train: checkpoint {path} skipped: {why}")
    return None


def restore(path: Path, model, optimizer, scheduler) -> dict:
    """Called by every rank: rank 0 reads, the others receive (shards, under FSDP)."""
    weights = optim = state = rng = None
    if distributed.is_main():
        weights = load_file(path / "trainable.safetensors")
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
        rng = load_file(path / "rng.safetensors")
    sharding.load_training_state(model, optimizer, weights, optim)
    state, rng = distributed.broadcast_object((state, rng))
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors save() was given as `extra` ({} if none)."""
    return load_file(path / EXTRA) if (path / EXTRA).exists() else {}


def clear(ckpt_dir: Path) -> None:
    """Remove a run's checkpoints, and the folder above when no other run's are left."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    try:
        Path(ckpt_dir).parent.rmdir()
    except OSError:
        pass
