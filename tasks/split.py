"""Step 2: a seeded (and for classification, stratified) train/validation/test split."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tasks import catalog
from tasks.common import PipelineError, StageResult, atomic_dir, resolve, result
from tasks.config import Params



def split_frame(df: pd.DataFrame, validation: float, test: float, seed: int,
                stratify_col: str | None) -> dict[str, pd.DataFrame]:
    strat = df[stratify_col] if stratify_col else None
    try:
        rest, test_df = train_test_split(df, test_size=test, random_state=seed, stratify=strat)
        strat = rest[stratify_col] if stratify_col else None
        train_df, val_df = train_test_split(rest, test_size=validation / (1 - test),
                                            random_state=seed, stratify=strat)
    except ValueError as exc:  # e.g. a class with a single row cannot be stratified
        raise PipelineError(f"cannot split {len(df)} rows (validation={validation}, test={test}): {exc}") from None
    parts = {"train": train_df, "validation": val_df, "test": test_df}
    _check_no_leak(parts)
    return parts


def _key_columns(df: pd.DataFrame) -> list[str]:
    """What makes two rows the same example: the text, a chat row's prompt (schemas/messages.prompt_key),
    or an instruction with its input."""
    return ["text"] if "text" in df else ["prompt_key"] if "prompt_key" in df else ["instruction", "input"]


def _check_no_leak(parts: dict[str, pd.DataFrame]) -> None:
    """Defence in depth behind the schema's uniqueness rule: no text in two splits."""
    keys = _key_columns(parts["train"])
    seen: dict[tuple, str] = {}
    for name, part in parts.items():
        for values, row in zip(part[keys].itertuples(index=False, name=None), part["row"].astype(str)):
            if values in seen and seen[values] != name:
                raise PipelineError(f"row {row}: the same {'/'.join(keys)} is in both {seen[values]} and "
                                    f"{name} (leakage); rule: no_leakage")
            seen.setdefault(values, name)


def hash_split(df: pd.DataFrame, validation: float, test: float, seed: int) -> dict[str, pd.DataFrame]:
    """Assign each row by a hash of its text: stable as rows are added or removed."""
    keys = df[_key_columns(df)].agg("\n".join, axis=1)
    u = keys.map(lambda k: int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) / 16 ** 12)
    parts = {"train": df[u >= test + validation], "validation": df[(u >= test) & (u < test + validation)],
             "test": df[u < test]}
    if min(len(p) for p in parts.values()) == 0:
        raise PipelineError(f"hash split of {len(df)} rows left a split empty; add rows or use "
                            f"split.method: stratified")
    _check_no_leak(parts)
    return parts


def run(params: Params, root: Path) -> StageResult:
    df = pd.read_json(resolve(root, catalog.VALIDATED_ROWS), lines=True, dtype=False)
    s = params.split
    stratify = "label" if params.task == "seq_cls" and s.stratify else None
    parts = hash_split(df, s.validation, s.test, s.seed) if s.method == "hash" \
        else split_frame(df, s.validation, s.test, s.seed, stratify)
    with atomic_dir(resolve(root, catalog.SPLIT_DIR)) as tmp:
        for name, part in parts.items():
            part.to_json(tmp / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
    return result("split", [catalog.SPLIT_DIR], **{n: len(p) for n, p in parts.items()})
