"""New data: validate files dropped in the inbox with the same pandera contracts, then
append their rows to the raw dataset, skipping rows it already has (each one reported).

All or nothing: if any file breaks a rule, no row is merged, the raw dataset stays as it
was, and the files move to inbox/rejected/ beside their report.
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

import pandas as pd

from tasks.common import PipelineError, resolve, write_json
from tasks.config import Params
from tasks.dataio import ROW, detect_format, read_raw
from tasks.validate import clean_text, validate_frame

REPORT = "reports/ingest.json"


@dataclass
class Ingest:
    status: str  # "no_new_data" | "rejected" | "merged"
    files: list[str] = field(default_factory=list)
    added_rows: int = 0
    skipped_duplicates: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def _key_columns(params: Params) -> list[str]:
    return list(params.data.text_columns) if params.task == "seq_cls" else ["instruction", "input"]


def _keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return df[cols].apply(lambda r: "\x1f".join(clean_text(v) if isinstance(v, str) else "" for v in r), axis=1)


def _append(raw: Path, fmt: str, old: pd.DataFrame, new: pd.DataFrame, params: Params) -> None:
    """Write raw + new rows to a temp file beside raw, then rename over it."""
    tmp = raw.with_name(f".{raw.name}.ingest")
    cols = [c for c in old.columns if c != ROW]
    if fmt == "csv":
        data = raw.read_bytes()
        buf = io.StringIO()
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerows([["" if v is None else v for v in r] for r in new[cols].itertuples(index=False, name=None)])
        tmp.write_bytes(data + (b"" if data.endswith(b"\n") else b"\n") + buf.getvalue().encode())
    elif fmt == "jsonl":
        data = raw.read_bytes()
        lines = "".join(json.dumps({c: r[c] for c in cols if c in r}, ensure_ascii=False) + "\n"
                        for r in new.to_dict("records"))
        tmp.write_bytes(data + (b"" if data.endswith(b"\n") else b"\n") + lines.encode())
    elif fmt == "json":
        rows = json.loads(raw.read_text()) + [{c: r[c] for c in cols if c in r} for r in new.to_dict("records")]
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        pd.concat([old[cols], new[cols]], ignore_index=True).to_parquet(tmp, index=False)
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
    old = read_raw(raw, fmt, d.header, d.columns)
    cols = _key_columns(params)
    seen = set(_keys(old.copy(), cols))
    # Duplicates are expected in drops (overlapping exports): skip them, but list them.
    lenient = params.model_copy(update={"data": d.model_copy(update={"duplicates": "drop"})})
    accepted, errors, skipped = [], [], []
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
        rows = original.loc[valid.index]
        for idx, key in zip(rows.index, _keys(rows.copy(), cols)):
            if key in seen:
                skipped.append({"file": str(f), "row": str(rows.at[idx, ROW]), "reason": "already in the dataset"})
            else:
                seen.add(key)
                accepted.append(rows.loc[[idx]])
    new = pd.concat(accepted, ignore_index=True) if accepted else old.iloc[:0]
    if not errors and len(new):
        combined = pd.concat([old, new], ignore_index=True)
        _, errors, _ = validate_frame(params, combined.copy(), raw)  # the merged whole must hold too
    result = Ingest("rejected" if errors else ("merged" if len(new) else "no_new_data"),
                    [str(f) for f in files], 0 if errors else len(new), skipped, errors)
    write_json(report_path, {"status": result.status, "raw": str(raw), "files": result.files,
                             "added_rows": result.added_rows, "skipped_duplicates": skipped, "errors": errors})
    if errors:
        _move(files, inbox / "rejected" / stamp)
        shutil.copy(report_path, inbox / "rejected" / stamp / "report.json")
        return result
    if len(new):
        _append(raw, fmt, old, new, params)
    _move(files, inbox / "processed" / stamp)
    return result
