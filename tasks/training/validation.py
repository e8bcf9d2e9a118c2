"""Validation during training and early stopping (train.eval_every, train.early_stopping*).

The training loop calls three things: `due(step, total)`, `run(...)` at those steps, and
`restore_best(model)` before saving. Everything the decision depends on (every score so far, the
best one, its step, the passes without improvement, the best adapter weights) is in `state()` and
`tensors()`, which the checkpoint carries, so a resumed run decides as an uninterrupted one.

A pass is the model in eval mode (no dropout) over the validation split (train.eval_rows of it: one
seeded sample, the same every pass) in length-sorted batches (little padding), under the training autocast: the loss is the same quantity as the
training loss (mean over label tokens, or over examples for seq_cls), plus accuracy for seq_cls.
Under DDP each rank scores its shard and the sums are added, so all ranks take the same decision.
"""

from __future__ import annotations

import random

import torch

from tasks.config import TrainConfig
from tasks.data.arrowio import list_lengths
from tasks.data.batching import batches, loss_units
from tasks.distributed import ddp as distributed


def _keep_4bit_layers_in_train_mode(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time the layer runs
    in eval mode without grad, and its training path fails on the repacked weight afterwards. These
    layers have no dropout or other train/eval difference, so they stay in train mode."""
    for m in model.modules():
        if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            m.train()


@torch.no_grad()
def score(
    model, rows, batch_size: int, pad_id: int, task: str, device, autocast, subset: list[int] | None = None
) -> dict:
    """{"loss": ..., "accuracy": ... (seq_cls)} of the model on these tokenized rows (those at `subset`)."""
    lengths = list_lengths(rows).tolist()  # from the Arrow offsets: no row is read
    rank, size = distributed.world()  # every row once over all ranks (no collective runs per batch)
    chosen = range(len(lengths)) if subset is None else subset
    order = sorted(chosen, key=lambda i: lengths[i])[rank::size]
    was_training = model.training
    model.eval()
    _keep_4bit_layers_in_train_mode(model)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, loss units, correct
    for batch in batches(rows, batch_size, pad_id, task, order):
        units = loss_units(batch, task)
        if units == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = model(**batch, **({"use_cache": False} if task != "seq_cls" else {}))
        sums[0] += out.loss.float().item() * units
        sums[1] += units
        if task == "seq_cls":
            sums[2] += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    model.train(was_training)
    sums = distributed.sum_over_ranks(sums, device).cpu()
    out = {"loss": float(sums[0] / max(1.0, float(sums[1])))}
    if task == "seq_cls":
        out["accuracy"] = float(sums[2] / max(1.0, float(sums[1])))
    return out


class Validation:
    def __init__(self, t: TrainConfig, task: str, seed: int = 0):
        self.every, self.task, self.rows, self.seed = t.eval_every, task, t.eval_rows, seed
        self.subset: list[int] | None = None  # the rows every pass scores (chosen at the first pass)
        self.stopping, self.metric = t.early_stopping, t.early_stopping_metric
        self.patience, self.min_delta = t.early_stopping_patience, t.early_stopping_min_delta
        self.history: list[dict] = []  # one row per pass: step, val_loss (, val_accuracy)
        self.best: float | None = None  # the best score of self.metric so far
        self.best_step: int | None = None
        self.bad_passes = 0  # passes since the last improvement
        self.stopped_at: int | None = None
        self.best_weights: dict[str, torch.Tensor] = {}  # trainable tensors of the best pass (early stopping)

    def due(self, step: int, total: int) -> bool:
        """A pass every `eval_every` steps, and one at the last step so the curve ends where training does."""
        return self.every > 0 and (step % self.every == 0 or step >= total)

    def run(self, model, rows, batch_size: int, pad_id: int, device, autocast, step: int) -> dict:
        """Score the model now; update best / patience; returns the history row."""
        if self.subset is None:  # the same seeded sample each pass, and in a resumed run
            n = len(rows)
            self.subset = sorted(random.Random(self.seed).sample(range(n), min(n, self.rows or n)))
        scores = score(model, rows, batch_size, pad_id, self.task, device, autocast, self.subset)
        row = {"step": step, **{f"val_{k}": round(v, 6) for k, v in scores.items()}}
        self.history.append(row)
        value = scores[self.metric]
        sign = -1 if self.metric == "loss" else 1  # loss falls, accuracy rises
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_step, self.bad_passes = value, step, 0
            if self.stopping:  # keep a copy of what would be saved: the trainable weights
                self.best_weights = {
                    n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
                }
        else:
            self.bad_passes += 1
            if self.stopping and self.bad_passes >= self.patience:
                self.stopped_at = step
        return row

    @property
    def stop(self) -> bool:
        return self.stopped_at is not None

    def restore_best(self, model) -> bool:
        """Early stopping saves the best pass's adapter: put its weights back. True if it did."""
        if not (self.stopping and self.best_weights):
            return False
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value.to(params[name].device))
        return True

    def summary(self) -> dict:
        if not self.history:
            return {}
        last = self.history[-1]
        out = {f"final_{k}": v for k, v in last.items() if k != "step"}
        out.update(
            {
                "validation_rows": len(self.subset or []),
                "best_step": self.best_step,
                f"best_val_{self.metric}": self.best,
                "early_stopping": self.stopping,
                "stopped_early": self.stop,
                "stopped_at_step": self.stopped_at,
                "saved_adapter_step": self.best_step if self.stopping else last["step"],
            }
        )
        return out

    # --- checkpointing: JSON state and tensors, restored by a resumed run
    def state(self) -> dict:
        return {
            "history": self.history,
            "best": self.best,
            "best_step": self.best_step,
            "bad_passes": self.bad_passes,
            "stopped_at": self.stopped_at,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.best_weights

    def load(self, state: dict | None, tensors: dict[str, torch.Tensor] | None) -> None:
        if not state:
            return
        self.history, self.best, self.best_step = state["history"], state["best"], state["best_step"]
        self.bad_passes, self.stopped_at = state["bad_passes"], state["stopped_at"]
        self.best_weights = dict(tensors or {})
