"""Readers for raw datasets. Every record keeps its source position in column `_row`
(the 1-based line for CSV/JSONL, the element index for JSON lists, the row for parquet),
so validation can name it. Values stay strings or None: no silent type coercion.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from tasks.common import PipelineError

ROW = "_row"


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    known = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in known:
        raise PipelineError(f"{path}: cannot tell the format from '{suffix}'; set data.format")
    return known[suffix]


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PipelineError(
            f"{path}: line {line}: not valid UTF-8 (byte {data[exc.start]:#04x} "
            f"at offset {exc.start}); rule: utf8_encoding"
        ) from None


def _as_text(value):
    """Cell value as a string, None for missing; numbers become their text form."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _utf8_lines(path: Path, binary) -> Iterator[str]:
    """The file's lines, decoded one at a time (line endings kept, as the csv module wants them);
    a byte that is not UTF-8 is named by its line and its offset in the file."""
    offset = 0
    for line_no, raw in enumerate(binary, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PipelineError(
                f"{path}: line {line_no}: not valid UTF-8 (byte {raw[exc.start]:#04x} "
                f"at offset {offset + exc.start}); rule: utf8_encoding"
            ) from None
        offset += len(raw)


def _csv_chunks(path: Path, header: bool, columns: list[str] | None, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """CSV records in frames of chunk_rows, each record's `_row` its first physical line."""
    with open(path, "rb") as binary:
        reader = csv.reader(_utf8_lines(path, binary))
        records, rows = [], []
        try:
            if header:
                names = next(reader, None)
                if names is None:
                    raise PipelineError(f"{path}: no data rows; rule: not_empty")
                if columns:
                    names = columns
            else:
                if not columns:
                    raise PipelineError(f"{path}: data.header is false, so data.columns must name the columns")
                names = columns
            line = reader.line_num + 1
            for rec in reader:
                if not rec:  # blank line: not a record
                    line = reader.line_num + 1
                    continue
                if len(rec) != len(names):
                    raise PipelineError(
                        f"{path}: line {line}: expected {len(names)} fields "
                        f"({', '.join(names)}), found {len(rec)}; rule: field_count"
                    )
                records.append([v if v != "" else None for v in rec])
                rows.append(line)
                line = reader.line_num + 1
                if len(records) == chunk_rows:
                    yield _frame(records, names, rows)
                    records, rows = [], []
        except csv.Error as exc:
            raise PipelineError(f"{path}: line {reader.line_num}: malformed CSV: {exc}; rule: csv_syntax") from None
        if records:
            yield _frame(records, names, rows)


def _frame(records: list[list], names: list[str], rows: list) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=names, dtype=object)
    df[ROW] = rows
    return df


def _records_frame(path: Path, objs: list, rows: list[int]) -> pd.DataFrame:
    for obj, row in zip(objs, rows):
        if not isinstance(obj, dict):
            raise PipelineError(
                f"{path}: row {row}: expected a JSON object, found {type(obj).__name__}; rule: json_object"
            )
    df = pd.DataFrame([{k: _as_text(v) for k, v in o.items()} for o in objs], dtype=object)
    df[ROW] = rows
    return df


def _jsonl_records(path: Path) -> Iterator[tuple[object, int]]:
    """(object, line) for each non-blank line, decoded and parsed one line at a time."""
    with open(path, "rb") as binary:
        for i, line in enumerate(_utf8_lines(path, binary), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), i
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}: line {i}: not valid JSON ({exc.msg}); rule: json_syntax") from None


def _read_json(path: Path, text: str) -> tuple[list, list[int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(
            f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}); rule: json_syntax"
        ) from None
    if not isinstance(data, list):
        raise PipelineError(f"{path}: expected a JSON list of records, found {type(data).__name__}; rule: json_list")
    return data, list(range(1, len(data) + 1))


def _explode_instances(objs: list, rows: list[int]) -> tuple[list, list]:
    """Self-Instruct seed tasks: one row per (task, instance); row names 'line.instance'."""
    out, out_rows = [], []
    for obj, row in zip(objs, rows):
        instances = obj.get("instances") if isinstance(obj, dict) else None
        if not isinstance(instances, list):
            out.append(obj)
            out_rows.append(row)
            continue
        for j, inst in enumerate(instances, start=1):
            inst = inst if isinstance(inst, dict) else {}
            out.append(
                {"instruction": obj.get("instruction"), "input": inst.get("input"), "output": inst.get("output")}
            )
            out_rows.append(f"{row}.{j}")
    return out, out_rows


def _object_chunks(path: Path, records: Iterator[tuple[object, int]], chunk_rows: int) -> Iterator[pd.DataFrame]:
    objs, rows = [], []
    for obj, row in records:
        objs.append(obj)
        rows.append(row)
        if len(objs) == chunk_rows:
            yield _records_frame(path, *_explode_instances(objs, rows))
            objs, rows = [], []
    if objs:
        yield _records_frame(path, *_explode_instances(objs, rows))


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        done = 0
        for batch in pf.iter_batches(batch_size=chunk_rows):
            # Python values, not pandas': a nested column (chat `messages`, list<struct>) arrives
            # as lists of dicts that _as_text writes as JSON, as the JSON(L) readers do.
            df = pd.DataFrame(
                {k: [_as_text(v) for v in vals] for k, vals in batch.to_pydict().items()},
                columns=batch.schema.names,
                dtype=object,
            )
            df[ROW] = list(range(done + 1, done + len(df) + 1))
            done += len(df)
            yield df
    except PipelineError:
        raise
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise PipelineError(f"{path}: not a readable parquet file ({exc}); rule: parquet_format") from None


def iter_raw(
    path: Path, fmt: str = "auto", header: bool = True, columns: list[str] | None = None, chunk_rows: int = 100_000
) -> Iterator[pd.DataFrame]:
    """The raw dataset as frames of at most chunk_rows records: strings/None plus `_row`. Read as a
    stream (CSV, JSONL, parquet), so memory holds one chunk whatever the file's size; a JSON list
    is one document and is parsed whole (write large data as JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    fmt = detect_format(path, fmt)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip() and path.stat().st_size <= len(head):
        raise PipelineError(f"{path}: file is empty; rule: not_empty")
    if fmt == "csv":
        chunks = _csv_chunks(path, header, columns, chunk_rows)
    elif fmt == "jsonl":
        chunks = _object_chunks(path, _jsonl_records(path), chunk_rows)
    elif fmt == "json":
        objs, rows = _read_json(path, _decode(path, path.read_bytes()))
        chunks = _object_chunks(path, zip(objs, rows), chunk_rows)
    else:
        chunks = _parquet_chunks(path, chunk_rows)
    any_rows = False
    for chunk in chunks:
        any_rows = any_rows or len(chunk) > 0
        yield chunk
    if not any_rows:
        raise PipelineError(f"{path}: no data rows; rule: not_empty")


def read_raw(path: Path, fmt: str = "auto", header: bool = True, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole raw dataset in one frame (small inputs: rows to predict, inbox drops)."""
    frames = list(iter_raw(path, fmt, header, columns))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


HUB_PREFIX = "hf://"


def is_hub(path: str) -> bool:
    return str(path).startswith(HUB_PREFIX)


def load_hub(name: str, config: str | None, split: str, revision: str | None, cache_dir: Path):
    """`datasets.load_dataset` on a hub id or a local dataset folder (data files the
    `datasets` builders read: CSV, JSON(L), parquet...), cached under cache_dir. Returns
    (Dataset, lineage: what was loaded, by revision and fingerprint)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision, cache_dir=str(cache_dir))
    except ConnectionError as exc:
        raise PipelineError(
            f"{HUB_PREFIX}{name}: cannot reach the Hugging Face Hub ({exc}). This machine has no network "
            f"(or HF_HUB_OFFLINE is set) and the dataset is not in the cache ({cache_dir}): download it where "
            f"there is a network (the same data.revision), or point data.path at a local copy"
        ) from None
    except (FileNotFoundError, ValueError) as exc:  # no such dataset, config or split
        raise PipelineError(
            f"{HUB_PREFIX}{name}: cannot load config={config!r} split={split!r} revision={revision!r}: {exc}"
        ) from None
    lineage = {
        "source": f"{HUB_PREFIX}{name}",
        "config": config,
        "split": split,
        "revision": revision,
        "fingerprint": ds._fingerprint,
        "rows": ds.num_rows,
        "features": sorted(ds.features),
    }
    return ds, lineage


def hub_chunks(ds, name: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The loaded dataset as frames of strings/None, `_row` its 1-based row in the split."""
    if ds.num_rows == 0:
        raise PipelineError(f"{HUB_PREFIX}{name}: no data rows; rule: not_empty")
    done = 0
    for batch in ds.iter(batch_size=chunk_rows):
        df = pd.DataFrame({k: [_as_text(v) for v in vals] for k, vals in batch.items()}, dtype=object)
        df[ROW] = list(range(done + 1, done + len(df) + 1))
        done += len(df)
        yield df
