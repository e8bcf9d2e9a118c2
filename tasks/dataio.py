"""Readers for raw datasets. Every record keeps its source position in column `_row`
(the 1-based line for CSV/JSONL, the element index for JSON lists, the row for parquet),
so validation can name it. Values stay strings or None: no silent type coercion.
"""
from __future__ import annotations

import csv
import io
import json
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
        raise PipelineError(f"{path}: line {line}: not valid UTF-8 (byte {data[exc.start]:#04x} "
                            f"at offset {exc.start}); rule: utf8_encoding") from None


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


def _read_csv(path: Path, text: str, header: bool, columns: list[str] | None) -> pd.DataFrame:
    reader = csv.reader(io.StringIO(text, newline=""))
    records, rows = [], []
    try:
        if header:
            names = next(reader)
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
                raise PipelineError(f"{path}: line {line}: expected {len(names)} fields "
                                    f"({', '.join(names)}), found {len(rec)}; rule: field_count")
            records.append([v if v != "" else None for v in rec])
            rows.append(line)
            line = reader.line_num + 1
    except csv.Error as exc:
        raise PipelineError(f"{path}: line {reader.line_num}: malformed CSV: {exc}; rule: csv_syntax") from None
    df = pd.DataFrame(records, columns=names, dtype=object)
    df[ROW] = rows
    return df


def _records_frame(path: Path, objs: list, rows: list[int]) -> pd.DataFrame:
    for obj, row in zip(objs, rows):
        if not isinstance(obj, dict):
            raise PipelineError(f"{path}: row {row}: expected a JSON object, found "
                                f"{type(obj).__name__}; rule: json_object")
    df = pd.DataFrame([{k: _as_text(v) for k, v in o.items()} for o in objs], dtype=object)
    df[ROW] = rows
    return df


def _read_jsonl(path: Path, text: str) -> tuple[list, list[int]]:
    objs, rows = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}: line {i}: not valid JSON ({exc.msg}); rule: json_syntax") from None
        rows.append(i)
    return objs, rows


def _read_json(path: Path, text: str) -> tuple[list, list[int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON "
                            f"({exc.msg}); rule: json_syntax") from None
    if not isinstance(data, list):
        raise PipelineError(f"{path}: expected a JSON list of records, found {type(data).__name__}; "
                            f"rule: json_list")
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
            out.append({"instruction": obj.get("instruction"), "input": inst.get("input"),
                        "output": inst.get("output")})
            out_rows.append(f"{row}.{j}")
    return out, out_rows


def read_raw(path: Path, fmt: str = "auto", header: bool = True,
             columns: list[str] | None = None) -> pd.DataFrame:
    """Read a raw dataset into a frame of strings/None plus its `_row` positions."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    fmt = detect_format(path, fmt)
    data = path.read_bytes()
    if not data.strip():
        raise PipelineError(f"{path}: file is empty; rule: not_empty")
    if fmt == "parquet":
        try:
            table = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise PipelineError(f"{path}: not a readable parquet file ({exc}); rule: parquet_format") from None
        df = table.map(_as_text).astype(object) if len(table) else table.astype(object)
        df[ROW] = list(range(1, len(df) + 1))
    else:
        text = _decode(path, data)
        if fmt == "csv":
            df = _read_csv(path, text, header, columns)
        else:
            objs, rows = _read_jsonl(path, text) if fmt == "jsonl" else _read_json(path, text)
            objs, rows = _explode_instances(objs, rows)
            df = _records_frame(path, objs, rows)
    if len(df) == 0:
        raise PipelineError(f"{path}: no data rows; rule: not_empty")
    return df
