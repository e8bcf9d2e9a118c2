"""Turning tokenized rows into padded batches (dynamic padding: each batch pads to its longest row).

Rows come from a tokenized split (`tasks.tokenize.load_split`: a memory-mapped
`datasets.Dataset`): a batch reads just its rows, by position, from the mapped file."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from tasks.catalog import IGNORE_INDEX as IGNORE


def collate(rows: Mapping[str, list], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """rows: columns of the batch's rows (`dataset[positions]`)."""
    seqs = rows["input_ids"]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    if task == "seq_cls":
        labels = torch.tensor(rows["labels"], dtype=torch.long)
    else:
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for i, lab in enumerate(rows["labels"]):
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    rows, batch_size: int, pad_id: int, task: str, order: list[int] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `rows` (a Dataset) in `order` (positions; default: as stored)."""
    order = list(range(len(rows))) if order is None else order
    rows = rows.select_columns(["input_ids", "labels"])  # leave provenance columns unread
    for start in range(0, len(order), batch_size):
        yield collate(rows[order[start : start + batch_size]], pad_id, task)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 32) -> list[int]:
    """The row order of one epoch, a pure function of (seed, epoch) so a resumed run replays it.

    Rows are shuffled, then sorted by length inside windows of `group` batches, and the
    resulting batches are shuffled again: batches hold rows of similar length, so dynamic
    padding wastes little compute, while every epoch still sees a fresh random order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * group
    chunks = [sorted(perm[i : i + window], key=lambda j: -lengths[j]) for i in range(0, len(perm), window)]
    flat = [j for chunk in chunks for j in chunk]
    blocks = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    return [j for b in torch.randperm(len(blocks), generator=g).tolist() for j in blocks[b]]


def pack_bins(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy packing in the given order: each bin holds whole examples whose lengths sum
    to at most max_length (an example longer than that was truncated at tokenization)."""
    bins, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_length:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        bins.append(current)
    return bins


def collate_packed(rows, bins: list[list[int]], pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Causal-LM rows made of several examples. position_ids restart at 0 for each example
    and no attention_mask is passed: transformers then builds a block-diagonal causal mask
    (sdpa/eager) or varlen attention (flash), so no example sees another. The token that
    would predict across a boundary is the next example's first prompt token, whose label
    is already -100, so the loss never spans two examples. Returns (batch, real tokens)."""
    flat = [i for b in bins for i in b]
    fetched = rows.select_columns(["input_ids", "labels"])[flat]  # one gather for the whole batch
    seq_of = dict(zip(flat, fetched["input_ids"]))
    lab_of = dict(zip(flat, fetched["labels"]))
    width = max(sum(len(seq_of[i]) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    real = 0
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            seq, lab = seq_of[i], lab_of[i]
            ids[r, at : at + len(seq)] = torch.tensor(seq)
            labels[r, at : at + len(seq)] = torch.tensor(lab)
            pos[r, at : at + len(seq)] = torch.arange(len(seq))
            at += len(seq)
        pos[r, at:] = torch.arange(width - at)  # padding: a sequence of its own, no loss
        real += at
    return {"input_ids": ids, "labels": labels, "position_ids": pos}, real


def loss_units(batch: dict, task: str) -> int:
    """What the loss averages over: the label tokens a causal LM predicts (labels shift by one),
    or the examples of a classifier. The trainer and validation count on the CPU batch: no GPU sync."""
    if task == "seq_cls":
        return len(batch["labels"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())
