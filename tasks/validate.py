"""Step 1: read the raw dataset, clean its text, check it against its pandera contract.

Writes data/validated/{dataset.jsonl,labels.json} only when every rule holds, and always
writes reports/validation.json naming each bad row (file, row, column, rule, value).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd
import pandera.errors

from schemas import classification_schema, instruction_schema
from tasks import catalog, chat
from tasks.common import PipelineError, StageResult, atomic_dir, resolve, result, write_json
from tasks.config import Params
from tasks.dataio import ROW, read_raw

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
        out.append({"file": str(path), "row": row, "column": column, "rule": rule,
                    "value": None if value is None or value != value else str(value)[:200]})
    return out


def _label_space(params: Params) -> tuple[list[str], dict[str, int] | None]:
    d = params.data
    if d.label_names is None:
        return [], None
    mapping = {str(d.label_base + i): i for i in range(len(d.label_names))}
    mapping.update({n: i for i, n in enumerate(d.label_names)})
    return list(d.label_names), mapping


def _prepare(params: Params, df: pd.DataFrame, for_prediction: bool = False):
    """Clean df's text columns in place; return the contract they must meet. for_prediction:
    rows to predict, where the label (seq_cls) or output (causal_lm) is optional and checked
    only when present, the same text may come twice and no number of classes is required."""
    d = params.data
    if params.task == "seq_cls":
        _, mapping = _label_space(params)
        if d.clean_text:
            for c in d.text_columns:
                if c in df:
                    df[c] = df[c].map(lambda v: clean_text(v) if isinstance(v, str) else v)
        label = d.label_column if not for_prediction or d.label_column in df else None
        schema = classification_schema(d.text_columns, label, sorted(mapping) if mapping else None,
                                       1 if for_prediction else d.min_classes, unique=not for_prediction)
        return schema
    if chat.is_chat(d.layout, df.columns):  # conversations (messages / conversations column): tasks/chat.py
        return chat.prepare_frame(df, d.clean_text, unique=not for_prediction, for_prediction=for_prediction)
    for c in ("instruction", "input", "output"):
        if c in df and d.clean_text:
            df[c] = df[c].map(lambda v: v.strip() if isinstance(v, str) else v)
    if "input" in df:
        df["input"] = df["input"].map(lambda v: "" if v is None or v != v else v)  # optional field (None, NaN)
    elif for_prediction and "instruction" in df:
        df["input"] = ""
    return instruction_schema(with_output=not for_prediction or "output" in df, unique=not for_prediction)


def validate_frame(params: Params, df: pd.DataFrame, path: Path,
                   for_prediction: bool = False) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Return (valid rows, errors, dropped duplicates). Writes no files; cleans df's text in place."""
    schema = _prepare(params, df, for_prediction)
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != ROW]
        return df, [{"file": str(path), "row": None, "column": c, "rule": "column_present",
                     "value": f"columns found: {found}"} for c in missing], []
    try:
        schema.validate(df, lazy=True)
        return df, [], []
    except pandera.errors.SchemaErrors as err:
        errors = _failures(err, df, path)
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
    return df[text_columns].apply(lambda r: ". ".join(t.rstrip(".") for t in r), axis=1)


def canonical_rows(params: Params, df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    d = params.data
    if params.task == "causal_lm" and "messages" in df:  # chat rows, prepared by tasks/chat.prepare_frame
        return chat.canonical_frame(df, ROW), []
    if params.task == "causal_lm":
        return df[["instruction", "input", "output", ROW]].rename(columns={ROW: "row"}), []
    names, mapping = _label_space(params)
    if mapping is None:
        names = sorted(df[d.label_column].unique())
        mapping = {n: i for i, n in enumerate(names)}
    return pd.DataFrame({"text": joined_text(df, d.text_columns), "label": df[d.label_column].map(mapping).astype(int),
                         "row": df[ROW].astype(str)}), names


def error_message(source, errors: list[dict], report: Path | None = None) -> str:
    """What a user reads when rows break their contract: file, row, column and rule of each."""
    listed = "\n".join(f"  - {e['file']}: row {e['row']}, column {e['column']}: rule {e['rule']}"
                       f" (value: {e['value']!r})" for e in errors[:_MAX_LISTED])
    more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
    where = f"; full report: {report}" if report else ""
    return f"{source}: {len(errors)} validation error(s){where}\n{listed}{more}"


def prediction_rows(params: Params, df: pd.DataFrame, source) -> pd.DataFrame:
    """Rows to predict, checked against the training data's contract with the label optional
    (text cleaned as in training). Returns seq_cls: text, row and `expected` (the class name, when
    a label column came with the rows); causal_lm: instruction, input, row and `expected` (the
    reference output, when given). Raises PipelineError naming file, row, column and rule."""
    df, errors, _ = validate_frame(params, df, Path(str(source)), for_prediction=True)
    if errors:
        raise PipelineError(error_message(source, errors))
    if params.task == "causal_lm" and "messages" in df:  # conversations to answer (tasks/chat.py)
        return chat.prediction_frame(df, ROW)
    if params.task == "causal_lm":
        out = df[["instruction", "input", ROW]].rename(columns={ROW: "row"}).astype({"row": str})
        if "output" in df:
            out["expected"] = df["output"]
        return out.reset_index(drop=True)
    d = params.data
    out = pd.DataFrame({"text": joined_text(df, d.text_columns), "row": df[ROW].astype(str)})
    if d.label_column in df:
        names, mapping = _label_space(params)
        if mapping is not None:  # label values as the data writes them (index or name) -> the class name
            out["expected"] = df[d.label_column].map(lambda v: names[mapping[v]])
        else:
            out["expected"] = df[d.label_column]
    return out.reset_index(drop=True)


def run(params: Params, root: Path) -> StageResult:
    src = resolve(root, params.data.path)
    report_path = resolve(root, catalog.VALIDATION_REPORT)
    try:
        df = read_raw(src, params.data.format, params.data.header, params.data.columns)
    except PipelineError as exc:
        write_json(report_path, {"file": str(src), "status": "failed", "errors": [{"file": str(src),
                   "row": None, "column": None, "rule": "readable", "value": str(exc)}]})
        raise
    n_rows = len(df)
    df, errors, dropped = validate_frame(params, df, src)
    report = {"file": str(src), "task": params.task, "rows": n_rows, "valid_rows": n_rows - len(errors),
              "errors": errors, "dropped_duplicates": dropped, "status": "failed" if errors else "passed"}
    write_json(report_path, report)
    if errors:
        raise PipelineError(error_message(src, errors, report_path))
    rows, names = canonical_rows(params, df)
    with atomic_dir(resolve(root, catalog.VALIDATED_DIR)) as tmp:
        rows.to_json(tmp / Path(catalog.VALIDATED_ROWS).name, orient="records", lines=True, force_ascii=False)
        write_json(tmp / Path(catalog.LABELS).name, {"names": names})
    return result("validate", [catalog.VALIDATED_DIR, catalog.VALIDATION_REPORT], rows=len(rows), dropped=len(dropped),
                  classes=len(names))
