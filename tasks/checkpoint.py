"""Training checkpoints for crash-and-resume: trainable weights, optimizer, scheduler, RNG
and data position, written to a temp folder and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest. A checkpoint carries the fingerprint of the
run that wrote it (inputs + settings) and is only resumed by the same run.

Several processes: every rank calls save, latest and restore. The state is gathered whole
(tasks/distributed/sharding.py: FSDP's shards too) and rank 0 alone writes and reads, then hands it to
the others, so the files are those of a one-process run and resume on any number of
processes (the data position is counted in rows of the epoch's order, not per rank), and
only rank 0's disk needs them (several nodes).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.distributed import ddp as distributed, sharding

KEEP = 2


EXTRA = "extra.safetensors"  # tensors a caller adds (the best adapter weights of early stopping)


def save(ckpt_dir: Path, model, optimizer, scheduler, state: dict,
         extra: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Called by every rank (gathering FSDP's shards is a collective); rank 0 writes."""
    weights, optim = sharding.full_training_state(model, optimizer)
    if not distributed.is_main():
        return None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{state['step']:08d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, tmp / "trainable.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    if extra:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in extra.items()}, tmp / EXTRA)
    torch.save(optim, tmp / "optimizer.pt")  # tensors only: loads with weights_only=True
    (tmp / "state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}))
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written by a run with this fingerprint (rank 0's, on every rank)."""
    return distributed.broadcast_object(_latest(ckpt_dir, fingerprint) if distributed.is_main() else None)


def _latest(ckpt_dir: Path, fingerprint: str) -> Path | None:
    for path in sorted(ckpt_dir.glob("step-*"), reverse=True):
        try:
            if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
                return path
        except (OSError, ValueError, KeyError):
            continue
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
    shutil.rmtree(ckpt_dir, ignore_errors=True)
