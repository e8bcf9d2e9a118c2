"""Step 1: read the raw dataset, clean its text, check it against its pandera contract.

The data is read and checked in chunks of data.chunk_rows rows, so memory holds one chunk
whatever the dataset's size: every pandera rule of a row runs on its chunk, and the rules
over all rows run on what every chunk leaves behind: a 128-bit hash of each row's unique
columns (duplicates: the same text again) and the set of labels seen (min_classes).

Writes data/validated/{dataset.arrow,labels.json} only when every rule holds, and always
writes reports/validation.json naming each bad row (file, row, column, rule, value).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors

from schemas import classification_schema, instruction_schema
from tasks import catalog
from tasks.common import PipelineError, StageResult, atomic_dir, atomic_file, resolve, result, write_json
from tasks.config import Params
from tasks.data import chat
from tasks.data.arrowio import RowsWriter, iter_batches, take_column
from tasks.data.readers import ROW, hub_chunks, is_hub, iter_raw, load_hub
from tasks.data.rowhash import repeated_positions, row_hashes

_ENTITY = re.compile(r"(?:&)?#(\d+);")
_SPACES = re.compile(r"\s+")
_MAX_LISTED = 20


def clean_text(s: str) -> str:
    """Undo the escaping found in scraped news text: '#36;' -> '$', '&amp;' -> '&',
    a backslash used as a line break -> a space, runs of whitespace -> one space."""
    s = _ENTITY.sub(lambda m: chr(int(m.group(1))) if int(m.group(1)) < 0x110000 else m.group(0), s)
    s = html.unescape(s).replace("\\", " ")
    return _SPACES.sub(" ", s).strip()


def _failures(err: pandera.errors.SchemaErrors, df: pd.DataFrame, path: Path) -> list[dict]:
    """One entry per (row, column, rule), with the row as the reader numbered it."""
    out, seen = [], set()
    for fc in err.failure_cases.to_dict("records"):
        idx = fc.get("index")
        has_row = idx is not None and idx == idx and idx in df.index
        rule = str(fc.get("check") or "schema")
        if "uniqueness" in rule:
            rule = "unique_rows"  # the same text again: a duplicate, or a leak across splits
        row = str(df.at[idx, ROW]) if has_row else None
        column = None if rule == "unique_rows" else fc.get("column")
        if (row, column, rule) in seen:
            continue
        seen.add((row, column, rule))
        value = fc.get("failure_case")
        out.append(
            {
                "file": str(path),
                "row": row,
                "column": column,
                "rule": rule,
                "value": None if value is None or value != value else str(value)[:200],
            }
        )
    return out


def label_space(params: Params) -> tuple[list[str], dict[str, int] | None]:
    d = params.data
    if d.label_names is None:
        return [], None
    mapping = {str(d.label_base + i): i for i in range(len(d.label_names))}
    mapping.update({n: i for i, n in enumerate(d.label_names)})
    return list(d.label_names), mapping


def prepare_frame(params: Params, df: pd.DataFrame, for_prediction: bool = False, cross_row: bool = True):
    """Clean df's text columns in place; return the contract they must meet. for_prediction:
    rows to predict, where the label (seq_cls) or output (causal_lm) is optional and checked
    only when present, the same text may come twice and no number of classes is required.
    cross_row False: df is one chunk of a dataset; the rules over all rows are left to the caller."""
    d = params.data
    if params.task == "seq_cls":
        _, mapping = label_space(params)
        if d.clean_text:
            for c in d.text_columns:
                if c in df:
                    df[c] = df[c].map(lambda v: clean_text(v) if isinstance(v, str) else v)
        label = d.label_column if not for_prediction or d.label_column in df else None
        min_classes = 1 if for_prediction else d.min_classes
        schema = classification_schema(
            d.text_columns,
            label,
            sorted(mapping) if mapping else None,
            min_classes if cross_row else None,
            unique=cross_row and not for_prediction,
        )
        return schema
    if d.layout == "classification":  # labelled rows asked as chat: instruction rows from here on
        names, mapping = label_space(params)
        chat.classification_as_instruction(df, d, mapping, names, clean_text if d.clean_text else None)
    if chat.is_chat(d.layout, df.columns):  # conversations (messages / conversations column): tasks/data/chat.py
        return chat.prepare_frame(
            df, d.clean_text, unique=cross_row and not for_prediction, for_prediction=for_prediction
        )
    for c in ("instruction", "input", "output"):
        if c in df and d.clean_text:
            df[c] = df[c].map(lambda v: v.strip() if isinstance(v, str) else v)
    if "input" in df:
        df["input"] = df["input"].map(lambda v: "" if v is None or v != v else v)  # optional field (None, NaN)
    elif for_prediction and "instruction" in df:
        df["input"] = ""
    return instruction_schema(with_output=not for_prediction or "output" in df, unique=cross_row and not for_prediction)


def validate_frame(
    params: Params, df: pd.DataFrame, path: Path, for_prediction: bool = False, cross_row: bool = True
) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Return (valid rows, errors, dropped duplicates). Writes no files; cleans df's text in place.
    cross_row False (a chunk): the valid rows are those breaking no rule of their own."""
    schema = prepare_frame(params, df, for_prediction, cross_row)
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != ROW]
        return (
            df,
            [
                {
                    "file": str(path),
                    "row": None,
                    "column": c,
                    "rule": "column_present",
                    "value": f"columns found: {found}",
                }
                for c in missing
            ],
            [],
        )
    try:
        schema.validate(df, lazy=True)
        return df, [], []
    except pandera.errors.SchemaErrors as err:
        errors = _failures(err, df, path)
    if not cross_row:
        bad = {e["row"] for e in errors}
        return df[~df[ROW].astype(str).isin(bad)], errors, []
    dropped = []
    if params.data.duplicates == "drop":
        dropped = [e for e in errors if e["rule"] == "unique_rows"]
        errors = [e for e in errors if e["rule"] != "unique_rows"]
        rows = {e["row"] for e in dropped}
        df = df[~df[ROW].astype(str).isin(rows)]
    return df, errors, dropped


def joined_text(df: pd.DataFrame, text_columns: list[str]) -> pd.Series:
    """The one text a classifier reads: the text columns joined with '. '."""
    if len(text_columns) == 1:
        return df[text_columns[0]]
    parts = [df[c].astype(str).str.rstrip(".") for c in text_columns]
    text = parts[0]
    for part in parts[1:]:
        text = text + ". " + part
    return text


def key_columns(params: Params) -> list[str]:
    """The columns whose values make a row's identity: the same values twice is a duplicate
    (and, across splits, a leak)."""
    if params.task == "causal_lm" and params.data.layout == "messages":
        return ["prompt_key"]  # a conversation's prompt (schemas/messages.prompt_key)
    return list(params.data.text_columns) if params.task == "seq_cls" else ["instruction", "input"]


def canonical_features(params: Params, label_as_text: bool = False):
    """The columns of data/validated and data/split: what later stages read, plus the row's
    provenance (source: data.path; row: its line or record there)."""
    from datasets import Features, Value

    if params.task == "causal_lm" and params.data.layout == "messages":
        cols = {c: Value("string") for c in chat.FEATURES}
    elif params.task == "causal_lm":
        cols = {"instruction": Value("string"), "input": Value("string"), "output": Value("string")}
    else:
        cols = {"text": Value("string"), "label": Value("string" if label_as_text else "int64")}
    return Features({**cols, "source": Value("string"), "row": Value("string")})


def canonical_rows(params: Params, df: pd.DataFrame, mapping: dict[str, int] | None, source: str) -> dict:
    """One chunk's valid rows as canonical columns. mapping None: labels stay text (the classes
    are known once every chunk is read)."""
    d = params.data
    rows = {"source": [source] * len(df), "row": df[ROW].astype(str).tolist()}
    if params.task == "causal_lm" and d.layout == "messages":
        return {**chat.canonical_columns(df), **rows}
    if params.task == "causal_lm":
        return {
            "instruction": df["instruction"].tolist(),
            "input": df["input"].tolist(),
            "output": df["output"].tolist(),
            **rows,
        }
    labels = df[d.label_column] if mapping is None else df[d.label_column].map(mapping).astype("int64")
    return {"text": joined_text(df, d.text_columns).tolist(), "label": labels.tolist(), **rows}


def error_message(source, errors: list[dict], report: Path | None = None, total: int | None = None) -> str:
    """What a user reads when rows break their contract: file, row, column and rule of each
    (the first _MAX_LISTED; the report lists them all)."""
    total = len(errors) if total is None else total
    listed = "\n".join(
        f"  - {e['file']}: row {e['row']}, column {e['column']}: rule {e['rule']} (value: {e['value']!r})"
        for e in errors[:_MAX_LISTED]
    )
    more = f"\n  ... and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    where = f"; full report: {report}" if report else ""
    return f"{source}: {total} validation error(s){where}\n{listed}{more}"


def prediction_rows(params: Params, df: pd.DataFrame, source) -> pd.DataFrame:
    """Rows to predict, checked against the training data's contract with the label optional
    (text cleaned as in training). Returns seq_cls: text, row and `expected` (the class name, when
    a label column came with the rows); causal_lm: instruction, input, row and `expected` (the
    reference output, when given). Raises PipelineError naming file, row, column and rule."""
    df, errors, _ = validate_frame(params, df, Path(str(source)), for_prediction=True)
    if errors:
        raise PipelineError(error_message(source, errors))
    if params.task == "causal_lm" and "messages" in df:  # conversations to answer (tasks/data/chat.py)
        return chat.prediction_frame(df, ROW)
    if params.task == "causal_lm":
        out = df[["instruction", "input", ROW]].rename(columns={ROW: "row"}).astype({"row": str})
        if "output" in df:
            out["expected"] = df["output"]
        return out.reset_index(drop=True)
    d = params.data
    out = pd.DataFrame({"text": joined_text(df, d.text_columns), "row": df[ROW].astype(str)})
    if d.label_column in df:
        names, mapping = label_space(params)
        if mapping is not None:  # label values as the data writes them (index or name) -> the class name
            out["expected"] = df[d.label_column].map(lambda v: names[mapping[v]])
        else:
            out["expected"] = df[d.label_column]
    return out.reset_index(drop=True)


class Report:
    """reports/validation.json, written whatever happens: every bad row (file, row, column, rule,
    value) and every dropped duplicate. Entries go to files beside it as they come, so a dataset
    that is wrong everywhere is still reported row by row in bounded memory."""

    def __init__(self, path: Path, source: str, task: str):
        self.path, self.source, self.task = path, source, task
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lists = {
            "errors": path.with_name(f".{path.name}.errors"),
            "dropped_duplicates": path.with_name(f".{path.name}.dropped"),
        }
        self.files = {k: open(p, "w") for k, p in self.lists.items()}
        self.counts = dict.fromkeys(self.lists, 0)
        self.first_errors: list[dict] = []

    def add(self, kind: str, entries: list[dict]) -> None:
        for e in entries:
            self.files[kind].write(json.dumps(e, sort_keys=True) + "\n")
        self.counts[kind] += len(entries)
        if kind == "errors":
            self.first_errors += entries[: _MAX_LISTED - len(self.first_errors)]

    def write(self, **facts) -> None:
        """The report as one JSON document, its lists streamed from the entry files."""
        with atomic_file(self.path) as tmp, open(tmp, "w") as out:
            head = {"file": self.source, "task": self.task, **facts}
            out.write(json.dumps(head, indent=2, sort_keys=True, default=str)[:-2] + ",\n")
            for i, (kind, path) in enumerate(self.lists.items()):
                self.files[kind].flush()
                out.write(f'  "{kind}": [')
                with open(path) as entries:
                    for j, line in enumerate(entries):
                        out.write(("," if j else "") + "\n    " + line.rstrip("\n"))
                out.write("\n  ]" + ("," if i < len(self.lists) - 1 else "") + "\n")
            out.write("}\n")

    def close(self) -> None:
        for kind, f in self.files.items():
            f.close()
            self.lists[kind].unlink(missing_ok=True)


def source_chunks(params: Params, root: Path) -> tuple[str, object, dict | None]:
    """(the source as reports name it, its chunks, hub lineage or None)."""
    d = params.data
    if is_hub(d.path):
        name = d.path[len("hf://") :]
        local = resolve(root, name)
        ds, lineage = load_hub(
            str(local) if local.is_dir() else name,
            d.config,
            d.split,
            d.revision,
            resolve(root, catalog.HF_DATASETS_CACHE),
        )
        return d.path, hub_chunks(ds, name, d.chunk_rows), lineage
    src = resolve(root, d.path)
    return str(src), iter_raw(src, d.format, d.header, d.columns, d.chunk_rows), None


def _rewrite(src: Path, dst: Path, features, drop: np.ndarray, mapping: dict[str, int] | None) -> int:
    """src's rows without the positions in `drop`, labels mapped to their index (a second pass,
    only when duplicates are dropped or the classes were found in the data)."""
    done = 0
    with RowsWriter(dst, features) as out:
        for table in iter_batches(src):
            keep = ~np.isin(np.arange(done, done + table.num_rows), drop)
            done += table.num_rows
            table = table.filter(keep)
            if mapping is not None:
                table = table.to_pydict()
                table["label"] = [mapping[v] for v in table["label"]]
            out.write(table)
    return out.rows


def run(params: Params, root: Path) -> StageResult:
    d = params.data
    report_path = resolve(root, catalog.VALIDATION_REPORT)
    src, chunks, lineage = "", None, None
    try:
        src, chunks, lineage = source_chunks(params, root)
        report = Report(report_path, src, params.task)
    except PipelineError as exc:
        write_json(
            report_path,
            {
                "file": src or d.path,
                "status": "failed",
                "errors": [{"file": src or d.path, "row": None, "column": None, "rule": "readable", "value": str(exc)}],
                "dropped_duplicates": [],
            },
        )
        raise
    try:
        params, chunks = chat.resolve_layout(params, chunks)  # data.layout auto: chat data or instructions
        return _validate(params, root, src, chunks, lineage, report, report_path)
    finally:
        report.close()


def _validate(params: Params, root: Path, src: str, chunks, lineage, report: Report, report_path: Path) -> StageResult:
    d = params.data
    names, mapping = label_space(params)
    n_rows, hashes, labels_seen = 0, [], set()
    with atomic_dir(resolve(root, catalog.VALIDATED_DIR)) as tmp:
        first = tmp / ".pass1.arrow"
        try:
            with RowsWriter(first, canonical_features(params, label_as_text=mapping is None)) as out:
                for chunk in chunks:
                    n_rows += len(chunk)
                    valid, errors, _ = validate_frame(params, chunk, Path(src), cross_row=False)
                    report.add("errors", errors)
                    if any(e["rule"] == "column_present" for e in errors):
                        break  # every chunk has the same columns: the first says it all
                    out.write(canonical_rows(params, valid, mapping, d.path))
                    hashes.append(row_hashes(valid, key_columns(params)))
                    if params.task == "seq_cls":
                        labels_seen.update(valid[d.label_column].unique())
        except PipelineError as exc:  # unreadable part-way (bad UTF-8, a broken CSV line): name it
            report.add("errors", [{"file": src, "row": None, "column": None, "rule": "readable", "value": str(exc)}])
            report.write(rows=n_rows, valid_rows=None, status="failed", source=lineage)
            raise
        hashes = np.concatenate(hashes) if hashes else np.zeros((0, 2), dtype=np.uint64)
        repeated = repeated_positions(hashes)
        if len(repeated):
            key = "text" if params.task == "seq_cls" else key_columns(params)[0]
            entries = [
                {
                    "file": src,
                    "row": row,
                    "column": None,
                    "rule": "unique_rows",
                    "value": None if value is None else str(value)[:200],
                }
                for row, value in zip(take_column(first, "row", repeated), take_column(first, key, repeated))
            ]
            report.add("dropped_duplicates" if d.duplicates == "drop" else "errors", entries)
        if params.task == "seq_cls" and len(labels_seen) < d.min_classes and not report.counts["errors"]:
            report.add(
                "errors",
                [
                    {
                        "file": src,
                        "row": None,
                        "column": d.label_column,
                        "rule": f"at_least_{d.min_classes}_classes",
                        "value": f"classes found: {sorted(labels_seen)}",
                    }
                ],
            )
        failed = report.counts["errors"] > 0
        bad_rows = report.counts["errors"]
        report.write(rows=n_rows, valid_rows=n_rows - bad_rows, status="failed" if failed else "passed", source=lineage)
        if failed:
            raise PipelineError(error_message(src, report.first_errors, report_path, report.counts["errors"]))
        if params.task == "seq_cls" and mapping is None:
            names = sorted(labels_seen)
            mapping = {n: i for i, n in enumerate(names)}
        else:
            mapping = None  # labels were written as indices already
        rows_path = tmp / Path(catalog.VALIDATED_ROWS).name
        if len(repeated) or mapping is not None:
            n_valid = _rewrite(first, rows_path, canonical_features(params), repeated, mapping)
            first.unlink()
        else:
            first.rename(rows_path)
            n_valid = len(hashes)
        write_json(tmp / Path(catalog.LABELS).name, {"names": names})
        if lineage is not None:
            write_json(tmp / "source.json", lineage)
    return result(
        "validate",
        [catalog.VALIDATED_DIR, catalog.VALIDATION_REPORT],
        rows=n_valid,
        dropped=len(repeated) if d.duplicates == "drop" else 0,
        classes=len(names),
    )
