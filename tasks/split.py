"""Step 2: a seeded (and for classification, stratified) train/validation/test split.

Two passes over data/validated, one record batch at a time: the first reads what decides
each row's split (its label, or the hash of its text) and a 128-bit hash of its identity,
the second writes each batch's rows to their split's file, in file order. Memory holds a
few numbers per row, never the text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tasks import catalog
from tasks.catalog import SPLITS
from tasks.common import PipelineError, StageResult, atomic_dir, resolve, result
from tasks.config import Params
from tasks.data.arrowio import RowsWriter, iter_batches, open_rows, take_column
from tasks.data.rowhash import row_hashes

TRAIN, VALIDATION, TEST = range(3)  # a row's split, as an index into SPLITS


def stratified_assignment(labels: np.ndarray | None, n: int, validation: float, test: float, seed: int) -> np.ndarray:
    """Each row's split: test first, then validation out of the rest (scikit-learn's seeded,
    optionally stratified shuffle split, on row positions)."""
    positions = np.arange(n)
    try:
        rest, test_pos = train_test_split(positions, test_size=test, random_state=seed, stratify=labels)
        _, val_pos = train_test_split(
            rest,
            test_size=validation / (1 - test),
            random_state=seed,
            stratify=None if labels is None else labels[rest],
        )
    except ValueError as exc:  # e.g. a class with a single row cannot be stratified
        raise PipelineError(f"cannot split {n} rows (validation={validation}, test={test}): {exc}") from None
    assign = np.full(n, TRAIN, dtype=np.int8)
    assign[val_pos], assign[test_pos] = VALIDATION, TEST
    return assign


def hash_unit(keys: pd.Series, seed: int) -> np.ndarray:
    """A row's place in [0, 1) from a hash of its text: stable as rows are added or removed."""
    return np.fromiter(
        (int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) / 16**12 for k in keys),
        dtype=np.float64,
        count=len(keys),
    )


def hash_assignment(units: np.ndarray, validation: float, test: float) -> np.ndarray:
    assign = np.full(len(units), TRAIN, dtype=np.int8)
    assign[(units >= test) & (units < test + validation)] = VALIDATION
    assign[units < test] = TEST
    return assign


def split_key(frame: pd.DataFrame) -> pd.Series:
    """What the hash split hashes: the text a classifier reads, or instruction and input."""
    if "prompt_key" in frame:  # chat rows: the conversation's prompt (schemas/messages.prompt_key)
        return frame["prompt_key"]
    return frame["text"] if "text" in frame else frame["instruction"] + "\n" + frame["input"]


def check_no_leak(hashes: np.ndarray, assign: np.ndarray, rows_file: Path) -> None:
    """Defence in depth behind validation's uniqueness rule: no text in two splits (rows with
    equal 128-bit hashes of their text must share a split)."""
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    ranked, where = hashes[order], assign[order]
    clash = (ranked[1:] == ranked[:-1]).all(axis=1) & (where[1:] != where[:-1])
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        a, b = order[i], order[i + 1]
        rows = take_column(rows_file, "row", np.array([a, b]))
        raise PipelineError(
            f"rows {rows[0]} and {rows[1]}: the same text is in both {SPLITS[assign[a]]} and "
            f"{SPLITS[assign[b]]} (leakage); rule: no_leakage"
        )


def scan(params: Params, rows_file: Path) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """First pass: (labels for stratifying or None, identity hashes, hash-split units or None)."""
    s = params.split
    stratify = params.task == "seq_cls" and s.stratify
    labels, hashes, units = [], [], []
    key_cols = (
        ["text"]
        if params.task == "seq_cls"
        else ["prompt_key"]
        if "prompt_key" in open_rows(rows_file).column_names
        else ["instruction", "input"]
    )
    columns = key_cols + (["label"] if stratify else [])
    for table in iter_batches(rows_file, columns):
        frame = table.to_pandas()
        hashes.append(row_hashes(frame, key_cols))
        if stratify:
            labels.append(frame["label"].to_numpy())
        if s.method == "hash":
            units.append(hash_unit(split_key(frame), s.seed))
    cat = lambda parts: np.concatenate(parts) if parts else None  # noqa: E731
    return cat(labels), np.concatenate(hashes), cat(units)


def run(params: Params, root: Path) -> StageResult:
    s = params.split
    rows_file = resolve(root, catalog.VALIDATED_ROWS)
    labels, hashes, units = scan(params, rows_file)
    n = len(hashes)
    if s.method == "hash":
        assign = hash_assignment(units, s.validation, s.test)
        if np.bincount(assign, minlength=3).min() == 0:
            raise PipelineError(f"hash split of {n} rows left a split empty; add rows or use split.method: stratified")
    else:
        assign = stratified_assignment(labels, n, s.validation, s.test, s.seed)
    check_no_leak(hashes, assign, rows_file)
    features = open_rows(rows_file).features
    with atomic_dir(resolve(root, catalog.SPLIT_DIR)) as tmp:
        writers = [
            RowsWriter(tmp / Path(catalog.split_file(catalog.SPLIT_DIR, name)).name, features) for name in SPLITS
        ]
        done = 0
        for table in iter_batches(rows_file):
            part = assign[done : done + table.num_rows]
            done += table.num_rows
            for i, out in enumerate(writers):
                out.write(table.filter(part == i))
        counts = {name: out.close() for name, out in zip(SPLITS, writers)}
    return result("split", [catalog.SPLIT_DIR], **counts)
