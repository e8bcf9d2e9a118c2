"""Rules over all rows of a dataset, in bounded memory: each row is reduced to a 128-bit hash
of the columns that make its identity, and duplicates (validate) or leaks across splits
(split) are found by sorting the hashes, never by holding the text."""

from __future__ import annotations

import numpy as np
import pandas as pd


def row_hashes(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """A 128-bit hash of each row's values in `columns` (two independent 64-bit hashes, (n, 2)
    uint64): at 10M rows the chance that two different rows collide is about 1e-25."""
    frame = df[columns].astype(str)
    return np.stack(
        [
            pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy()
            for key in ("qlora-flow-key-1", "qlora-flow-key-2")
        ],
        axis=1,
    )


def repeated_positions(hashes: np.ndarray) -> np.ndarray:
    """Positions whose hash an earlier position has (the first of each group is kept), ascending."""
    if len(hashes) < 2:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: a group lists its rows in file order
    ranked = hashes[order]
    same = (ranked[1:] == ranked[:-1]).all(axis=1)
    return np.sort(order[1:][same])
