"""New data: validate files dropped in the inbox with the same pandera contracts, then
append their rows to the raw dataset, skipping rows it already has (each one reported).

All or nothing: if any file breaks a rule, no row is merged, the raw dataset stays as it
was, and the files move to inbox/rejected/ beside their report.

In bounded memory whatever the raw dataset's size: it is read as a stream, each row reduced to
the 128-bit hash of its identity (tasks/rowhash.py, the key validate judges duplicates on), and
appended to by copying it a block at a time (a JSON list file is parsed whole: use JSONL).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import chat
from tasks.common import PipelineError, resolve, write_json
from tasks.config import Params
from tasks.dataio import ROW, detect_format, iter_raw, read_raw
from tasks.rowhash import row_hashes
from tasks.validate import key_columns, prepare_frame, validate_frame

REPORT = "reports/ingest.json"


@dataclass
class Ingest:
    status: str  # "no_new_data" | "rejected" | "merged"
    files: list[str] = field(default_factory=list)
    added_rows: int = 0
    skipped_duplicates: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def _identities(params: Params, prepared: pd.DataFrame) -> np.ndarray:
    """Each row's identity as 16 bytes: the hash of its key columns once cleaned (a frame that
    validate_frame or prepare_frame has been through), as validate computes it for duplicates (a
    chat row's identity is its prompt)."""
    return np.ascontiguousarray(row_hashes(prepared, key_columns(params))).view("S16").ravel()


def _existing(params: Params, chunks) -> tuple[np.ndarray, list[str]]:
    """The raw dataset's row identities, sorted (16 bytes a row), and its columns."""
    hashes, columns = [], None
    for chunk in chunks:
        columns = columns or [c for c in chunk.columns if c != ROW]
        prepare_frame(params, chunk, cross_row=False)  # cleans in place, derives a chat row's prompt key
        hashes.append(_identities(params, chunk))
    return np.sort(np.concatenate(hashes)), columns


def _in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of ids is one of sorted_ids: a binary search in the array _existing already
    sorted (np.isin would sort the whole raw dataset's identities again for every file)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def _copy_with_newline(raw: Path, tmp: Path):
    """raw's bytes copied to tmp a block at a time, ending in a newline; tmp open for appending."""
    shutil.copyfile(raw, tmp)
    out = open(tmp, "ab")
    if raw.stat().st_size:
        with open(raw, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write(b"\n")
    return out


def _arrow_column(texts: list, arrow_type):
    """A column of the raw parquet file's type from the rows' text form (dataio reads parquet as
    text: numbers as their digits, nested values, a chat's messages, as JSON)."""
    import pyarrow as pa
    if pa.types.is_nested(arrow_type):
        return pa.array([None if v is None else json.loads(v) for v in texts], type=arrow_type)
    return pa.array(texts, type=pa.string()).cast(arrow_type)


def _append(raw: Path, fmt: str, cols: list[str], new: pd.DataFrame) -> None:
    """Write raw + new rows to a temp file beside raw, then rename over it."""
    tmp = raw.with_name(f".{raw.name}.ingest")
    records = [] if fmt == "csv" else [{c: r[c] for c in cols if c in r} for r in new.to_dict("records")]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerows([["" if v is None else v for v in r] for r in new[cols].itertuples(index=False, name=None)])
        with _copy_with_newline(raw, tmp) as out:
            out.write(buf.getvalue().encode())
    elif fmt == "jsonl":
        with _copy_with_newline(raw, tmp) as out:
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    elif fmt == "json":  # one document: parsed whole
        tmp.write_text(json.dumps(json.loads(raw.read_text()) + records, ensure_ascii=False, indent=1))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        source = pq.ParquetFile(raw)
        with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
            for batch in source.iter_batches():
                writer.write_batch(batch)
            writer.write_table(pa.table([_arrow_column([r.get(f.name) for r in records], f.type)
                                         for f in source.schema_arrow], schema=source.schema_arrow))
    os.replace(tmp, raw)


def _move(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), dest / f.name)


def ingest(params: Params, root: Path, inbox: Path) -> Ingest:
    inbox.mkdir(parents=True, exist_ok=True)
    files = sorted(f for f in inbox.iterdir() if f.is_file() and not f.name.startswith("."))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_path = resolve(root, REPORT)
    if not files:
        write_json(report_path, {"status": "no_new_data", "inbox": str(inbox)})
        return Ingest("no_new_data")
    d = params.data
    raw = resolve(root, d.path)
    fmt = detect_format(raw, d.format)
    chunks = iter_raw(raw, fmt, d.header, d.columns, d.chunk_rows)
    params, chunks = chat.resolve_layout(params, chunks)  # data.layout auto: chat data or instructions
    d = params.data
    seen, cols = _existing(params, chunks)
    # Duplicates are expected in drops (overlapping exports): skip them, but list them.
    lenient = params.model_copy(update={"data": d.model_copy(update={"duplicates": "drop"})})
    accepted, errors, skipped = [], [], []
    added: set[bytes] = set()
    for f in files:
        try:
            df = read_raw(f, detect_format(f, "auto") if d.format == "auto" else fmt, d.header, d.columns)
        except PipelineError as exc:
            errors.append({"file": str(f), "row": None, "column": None, "rule": "readable", "value": str(exc)})
            continue
        original = df.copy()  # validation cleans text in place; the raw file keeps raw text
        valid, errs, dropped = validate_frame(lenient, df, f)
        errors += errs
        skipped += [{"file": str(f), "row": e["row"], "reason": "duplicate within the file"} for e in dropped]
        if errs:
            continue
        ids = _identities(params, valid)  # validate_frame cleaned them
        known = _in_sorted(seen, ids)
        for idx, key, in_raw in zip(valid.index, ids, known):
            if in_raw or key.tobytes() in added:
                skipped.append({"file": str(f), "row": str(original.at[idx, ROW]), "reason": "already in the dataset"})
            else:
                added.add(key.tobytes())
                accepted.append(original.loc[[idx]])
    new = pd.concat(accepted, ignore_index=True) if accepted else None
    # No check of the merged whole is needed: every rule of a row held in its file, and the
    # rules over all rows are duplicates (each new row was matched against every row of the
    # raw dataset above) and a minimum number of classes (rows only add classes).
    result = Ingest("rejected" if errors else ("merged" if new is not None else "no_new_data"),
                    [str(f) for f in files], 0 if errors or new is None else len(new), skipped, errors)
    write_json(report_path, {"status": result.status, "raw": str(raw), "files": result.files,
                             "added_rows": result.added_rows, "skipped_duplicates": skipped, "errors": errors})
    if errors:
        _move(files, inbox / "rejected" / stamp)
        shutil.copy(report_path, inbox / "rejected" / stamp / "report.json")
        return result
    if new is not None:
        _append(raw, fmt, cols, new)
    _move(files, inbox / "processed" / stamp)
    return result
