"""Training checkpoints for crash-and-resume: trainable weights, optimizer, scheduler, RNG
and data position, written to a temp folder and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest. A checkpoint carries the fingerprint of the
run that wrote it (inputs + settings) and is only resumed by the same run.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = 2


EXTRA = "extra.safetensors"  # tensors a caller adds (the best adapter weights of early stopping)


def save(ckpt_dir: Path, model, optimizer, scheduler, state: dict,
         extra: dict[str, torch.Tensor] | None = None) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{state['step']:08d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad},
              tmp / "trainable.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    if extra:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in extra.items()}, tmp / EXTRA)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")  # tensors only: loads with weights_only=True
    (tmp / "state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}))
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written by a run with this fingerprint."""
    for path in sorted(ckpt_dir.glob("step-*"), reverse=True):
        try:
            if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
                return path
        except (OSError, ValueError, KeyError):
            continue
    return None


def restore(path: Path, model, optimizer, scheduler) -> dict:
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors save() was given as `extra` ({} if none)."""
    return load_file(path / EXTRA) if (path / EXTRA).exists() else {}


def clear(ckpt_dir: Path) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
