"""New data: validate files dropped in the inbox with the same pandera contracts, then
append their rows to the raw dataset, skipping rows it already has (each one reported).

File by file: a file that breaks a rule of its rows is rejected alone (it moves to
inbox/rejected/ beside the report) and the good files of the same drop are merged. The rules
over all rows are judged on the merged dataset: duplicates (each new row is matched against
every row of the raw dataset and of the drop) and data.min_classes (the raw dataset's classes
and the drop's together); should the merged whole break one, nothing is merged. The report
(reports/ingest.json) lists the accepted files with the rows they added and skipped, and the
rejected ones with file, row and rule.

A file still being written is not read: only files unchanged for retrain.settle_seconds (by
their modification time), and whose size and time do not change while they are read, are
taken; the others wait in the inbox for a later run. A failed append (a full disk) leaves
the raw dataset as it was and the files in the inbox.

In bounded memory whatever the raw dataset's size: it is read as a stream, each row reduced to
the 128-bit hash of its identity (tasks/data/rowhash.py, the key validate judges duplicates on), and
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

from schemas.messages import COLUMNS as MESSAGE_COLUMNS
from schemas.messages import normalize
from tasks.common import PipelineError, atomic_file, resolve, write_json
from tasks.config import Params
from tasks.data import chat
from tasks.data.readers import ROW, detect_format, iter_raw, read_raw
from tasks.data.rowhash import row_hashes
from tasks.validate import key_columns, label_space, prepare_frame, validate_frame

REPORT = "reports/ingest.json"
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}


@dataclass
class Ingest:
    status: str  # "no_new_data" | "rejected" (files refused, no row merged) | "merged"
    files: list[str] = field(default_factory=list)  # files taken from the inbox: accepted and rejected
    added_rows: int = 0
    skipped_duplicates: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)  # {"file", "rows_added", "rows_skipped"}
    rejected: list[dict] = field(default_factory=list)  # {"file", "errors": count}; the rows and rules in errors
    waiting: list[str] = field(default_factory=list)  # still being written: left for a later run


def _identities(params: Params, prepared: pd.DataFrame) -> np.ndarray:
    """Each row's identity as 16 bytes: the hash of its key columns once cleaned (a frame that
    validate_frame or prepare_frame has been through), as validate computes it for duplicates (a
    chat row's identity is its prompt)."""
    return np.ascontiguousarray(row_hashes(prepared, key_columns(params))).view("S16").ravel()


def _classes(params: Params, df: pd.DataFrame) -> set:
    """The classes of a seq_cls frame's labels (a label's number and its name are one class)."""
    if params.task != "seq_cls" or params.data.label_column not in df:
        return set()
    _, mapping = label_space(params)
    labels = df[params.data.label_column].dropna().unique()
    return {mapping.get(str(v), str(v)) if mapping else str(v) for v in labels}


def _existing(params: Params, chunks) -> tuple[np.ndarray, list[str], set]:
    """The raw dataset's row identities, sorted (16 bytes a row), its columns and its classes."""
    hashes, columns, classes = [], None, set()
    for chunk in chunks:
        columns = columns or [c for c in chunk.columns if c != ROW]
        prepare_frame(params, chunk, cross_row=False)  # cleans in place, derives a chat row's prompt key
        hashes.append(_identities(params, chunk))
        classes |= _classes(params, chunk)
    return np.sort(np.concatenate(hashes)), columns, classes


def _settled(f: Path, settle_seconds: float, now: float) -> bool:
    return now - f.stat().st_mtime >= settle_seconds


def _signature(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


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


def _in_raw_layout(row: dict, cols: list[str]) -> dict:
    """A new row in the raw dataset's columns. A conversation dropped in the other chat layout
    (ShareGPT's conversations of {from, value}, OpenAI's messages of {role, content}) is rewritten in
    the raw dataset's, or the column the raw dataset has would be missing from the appended row."""
    # files of a drop with other columns meet in one frame: a column a row's file lacks holds NaN
    row = {c: v for c, v in row.items() if not (isinstance(v, float) and v != v)}
    out = {c: row[c] for c in cols if c in row}
    for col in MESSAGE_COLUMNS:
        other = next((c for c in MESSAGE_COLUMNS if c != col and row.get(c) is not None), None)
        if col in cols and col not in out and other is not None:
            turns = normalize(row[other])
            if col == "conversations":
                turns = [{"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in turns]
            out[col] = json.dumps(turns, ensure_ascii=False)
    return out


def _nested(record: dict) -> dict:
    """A record for a JSON file: readers hand a conversation over as JSON text, and it goes back as
    the list it is (as text it would be a string field, no longer the messages layout)."""
    return {c: json.loads(v) if c in MESSAGE_COLUMNS and isinstance(v, str) else v for c, v in record.items()}


def _append(raw: Path, fmt: str, cols: list[str], new: pd.DataFrame) -> None:
    """Write raw + new rows to a temp file beside raw, then rename over it."""
    with atomic_file(raw, suffix=".ingest") as tmp:
        _write_appended(raw, tmp, fmt, cols, new)


def _write_appended(raw: Path, tmp: Path, fmt: str, cols: list[str], new: pd.DataFrame) -> None:
    """raw's rows, then the new ones, written to tmp in raw's format."""
    records = [] if fmt == "csv" else [_in_raw_layout(r, cols) for r in new.to_dict("records")]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerows([["" if v is None else v for v in r] for r in new[cols].itertuples(index=False, name=None)])
        with _copy_with_newline(raw, tmp) as out:
            out.write(buf.getvalue().encode())
    elif fmt == "jsonl":
        with _copy_with_newline(raw, tmp) as out:
            out.write("".join(json.dumps(_nested(r), ensure_ascii=False) + "\n" for r in records).encode())
    elif fmt == "json":  # one document: parsed whole
        tmp.write_text(
            json.dumps(json.loads(raw.read_text()) + [_nested(r) for r in records], ensure_ascii=False, indent=1)
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = pq.ParquetFile(raw)
        with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
            for batch in source.iter_batches():
                writer.write_batch(batch)
            writer.write_table(
                pa.table(
                    [_arrow_column([r.get(f.name) for r in records], f.type) for f in source.schema_arrow],
                    schema=source.schema_arrow,
                )
            )


def _append_or_keep(raw: Path, fmt: str, cols: list[str], new: pd.DataFrame) -> None:
    """_append, or on an OS error (a full disk) say so: atomic_file has removed the partial temp
    file, the raw dataset is as it was and the drop stays in the inbox for the next run."""
    try:
        _append(raw, fmt, cols, new)
    except OSError as exc:
        raise PipelineError(
            f"{raw}: appending {len(new)} new rows failed ({exc.strerror or exc}); the dataset is "
            f"unchanged and the drop stays in the inbox: free space on {raw.parent}'s disk, "
            f"then retrain again (the next scheduled run retries)"
        ) from exc


def _move(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), dest / f.name)


def ingest(params: Params, root: Path, inbox: Path) -> Ingest:
    inbox.mkdir(parents=True, exist_ok=True)
    now = time.time()
    listed = sorted(f for f in inbox.iterdir() if f.is_file() and not f.name.startswith("."))
    settle = params.retrain.settle_seconds
    files = [f for f in listed if _settled(f, settle, now)]
    waiting = [str(f) for f in listed if f not in files]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_path = resolve(root, REPORT)
    if not files:
        write_json(report_path, {"status": "no_new_data", "inbox": str(inbox), "waiting": waiting})
        return Ingest("no_new_data", waiting=waiting)
    d = params.data
    raw = resolve(root, d.path)
    fmt = detect_format(raw, d.format)
    chunks = iter_raw(raw, fmt, d.header, d.columns, d.chunk_rows)
    params, chunks = chat.resolve_layout(params, chunks)  # data.layout auto: chat data or instructions
    d = params.data
    seen, cols, classes = _existing(params, chunks)
    # Each file is judged on the rules of its rows; duplicates are expected in drops
    # (overlapping exports): skipped, but listed. The number of classes is a rule of the
    # merged dataset, judged below (min_classes None: not per file).
    per_file = params.model_copy(update={"data": d.model_copy(update={"duplicates": "drop", "min_classes": None})})
    accepted_rows, errors, skipped, accepted, rejected, taken = [], [], [], [], [], []
    added: set[bytes] = set()
    for f in files:
        before = _signature(f)
        try:
            df = read_raw(f, detect_format(f, "auto") if d.format == "auto" else fmt, d.header, d.columns)
        except PipelineError as exc:
            df, errs = None, [{"file": str(f), "row": None, "column": None, "rule": "readable", "value": str(exc)}]
        if _signature(f) != before:  # written to while it was read: a later run takes it whole
            waiting.append(str(f))
            continue
        taken.append(f)
        if df is not None:
            original = df.copy()  # validation cleans text in place; the raw file keeps raw text
            valid, errs, dropped = validate_frame(per_file, df, f)
        if errs:
            errors += errs
            rejected.append({"file": str(f), "errors": len(errs)})
            continue
        file_skipped = [{"file": str(f), "row": e["row"], "reason": "duplicate within the file"} for e in dropped]
        ids = _identities(params, valid)  # validate_frame cleaned them
        known = _in_sorted(seen, ids)
        rows = []
        for idx, key, in_raw in zip(valid.index, ids, known):
            if in_raw or key.tobytes() in added:
                file_skipped.append(
                    {"file": str(f), "row": str(original.at[idx, ROW]), "reason": "already in the dataset"}
                )
            else:
                added.add(key.tobytes())
                rows.append(idx)
        if rows:
            accepted_rows.append(original.loc[rows])
            classes |= _classes(params, valid.loc[rows])
        skipped += file_skipped
        accepted.append({"file": str(f), "rows_added": len(rows), "rows_skipped": len(file_skipped)})
    new = pd.concat(accepted_rows, ignore_index=True) if accepted_rows else None
    if new is not None and params.task == "seq_cls" and len(classes) < d.min_classes:
        errors.append(
            {
                "file": str(raw),
                "row": None,
                "column": d.label_column,
                "rule": f"at_least_{d.min_classes}_classes",
                "value": f"classes in the dataset with this drop merged: {sorted(map(str, classes))}",
            }
        )
        rejected += [
            {"file": a["file"], "errors": 0, "reason": "the merged dataset breaks a rule over all rows"}
            for a in accepted
        ]
        accepted, new = [], None
    status = "merged" if new is not None else ("rejected" if rejected else "no_new_data")
    result = Ingest(
        status, [str(f) for f in taken], 0 if new is None else len(new), skipped, errors, accepted, rejected, waiting
    )
    report = {
        "status": status,
        "raw": str(raw),
        "files": result.files,
        "added_rows": result.added_rows,
        "accepted": accepted,
        "rejected": rejected,
        "waiting": waiting,
        "skipped_duplicates": skipped,
        "errors": errors,
    }
    if new is not None:
        try:
            _append_or_keep(raw, fmt, cols, new)
        except PipelineError as exc:  # nothing merged, nothing moved: the next run tries the same drop again
            write_json(report_path, {**report, "status": "failed", "added_rows": 0, "failure": str(exc)})
            raise
    write_json(report_path, report)
    if rejected:
        dest = inbox / "rejected" / stamp
        _move([Path(r["file"]) for r in rejected], dest)
        shutil.copy(report_path, dest / "report.json")
    _move([Path(a["file"]) for a in accepted], inbox / "processed" / stamp)
    return result
