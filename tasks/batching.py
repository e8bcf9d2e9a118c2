"""Turning tokenized rows into padded batches (dynamic padding: each batch pads to its longest row)."""
from __future__ import annotations

from typing import Iterator

import pandas as pd
import torch

IGNORE = -100


def collate(rows: pd.DataFrame, pad_id: int, task: str) -> dict[str, torch.Tensor]:
    seqs = [list(x) for x in rows["input_ids"]]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    if task == "seq_cls":
        labels = torch.tensor(rows["labels"].astype(int).tolist(), dtype=torch.long)
    else:
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for i, lab in enumerate(rows["labels"]):
            labels[i, : len(lab)] = torch.tensor(list(lab), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(frame: pd.DataFrame, batch_size: int, pad_id: int, task: str,
            order: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(frame))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield collate(frame.iloc[order[start: start + batch_size]], pad_id, task)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 32) -> list[int]:
    """The row order of one epoch, a pure function of (seed, epoch) so a resumed run replays it.

    Rows are shuffled, then sorted by length inside windows of `group` batches, and the
    resulting batches are shuffled again: batches hold rows of similar length, so dynamic
    padding wastes little compute, while every epoch still sees a fresh random order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * group
    chunks = [sorted(perm[i: i + window], key=lambda j: -lengths[j]) for i in range(0, len(perm), window)]
    flat = [j for chunk in chunks for j in chunk]
    blocks = [flat[i: i + batch_size] for i in range(0, len(flat), batch_size)]
    return [j for b in torch.randperm(len(blocks), generator=g).tolist() for j in blocks[b]]
