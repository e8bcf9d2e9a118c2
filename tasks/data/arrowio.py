"""Rows on disk between the data stages: Arrow IPC stream files, the format Hugging Face
`datasets` keeps its own data in. Stages write them batch by batch and read them either
memory-mapped as a `datasets.Dataset` (random access for training, `Dataset.map` for
tokenization) or one record batch at a time (a pass over every row in bounded memory).

Bytes depend only on the rows: a writer re-cuts whatever it is given into record batches
of BATCH_ROWS rows, so the chunk size of the reader upstream or the number of processes of
a `Dataset.map` never changes a file's DVC hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BATCH_ROWS = 10_000
SUFFIX = ".arrow"


class RowsWriter:
    """Append tables (or dicts of columns) with one schema; written in BATCH_ROWS-row batches.

    with RowsWriter(path, features) as out:
        out.write({"text": [...], "label": [...], "row": [...]})
    """

    def __init__(self, path: Path, features):
        self.path, self.features = Path(path), features
        self.schema = features.arrow_schema  # carries the `datasets` features as schema metadata
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)

    def write(self, batch) -> None:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        table = (
            batch
            if isinstance(batch, pa.Table)
            else pa.Table.from_pydict({name: batch[name] for name in self.schema.names}, schema=self.schema)
        )
        if table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= BATCH_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending).combine_chunks() if self._pending else None
        self._pending, self._pending_rows = [], 0
        if table is None:
            return
        full = table.num_rows if final else table.num_rows - table.num_rows % BATCH_ROWS
        for start in range(0, full, BATCH_ROWS):
            self._writer.write_batch(table.slice(start, min(BATCH_ROWS, full - start)).to_batches()[0])
        self.rows += full
        if full < table.num_rows:
            rest = table.slice(full)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def close(self) -> int:
        self._flush(final=True)
        self._writer.close()
        self._sink.close()
        return self.rows

    def __enter__(self) -> RowsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's atomic_dir throws the folder away
            self._writer.close()
            self._sink.close()


def open_rows(path: Path):
    """The rows as a `datasets.Dataset`, memory-mapped: nothing is read until it is used."""
    from datasets import Dataset

    return Dataset.from_file(str(path), in_memory=False)


def iter_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One record batch at a time (read, not mapped: memory stays at one batch)."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_stream(source)
        for batch in reader:
            table = pa.Table.from_batches([batch])
            yield table.select(columns) if columns else table


def count_rows(path: Path) -> int:
    return sum(t.num_rows for t in iter_batches(path, columns=[]))


def list_lengths(dataset, column: str = "input_ids") -> np.ndarray:
    """Length of each row's list in `column` of a Dataset, from Arrow offsets (no Python lists)."""
    lengths = pc.list_value_length(dataset.data.table.column(column))
    return lengths.to_numpy().astype(np.int64)


def take_column(path: Path, column: str, positions: np.ndarray) -> list:
    """Values of one column at these row positions (of a file written by RowsWriter)."""
    table = open_rows(path).data.table
    return table.column(column).take(pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()
