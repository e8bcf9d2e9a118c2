"""Fuzzing the loaders and the validation step: random bytes and random rows must end in
either valid data or the project's own clear error (PipelineError), never a deep traceback."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks import validate
from tasks.common import PipelineError
from tasks.config import Params
from tasks.data.readers import read_raw
from tests.conftest import repo_params

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=3000), fmt=st.sampled_from(["csv", "jsonl", "json", "parquet"]), header=st.booleans())
def test_random_bytes_give_data_or_a_clear_error(data, fmt, header):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"random.{fmt}"
        path.write_bytes(data)
        try:
            df = read_raw(path, "auto", header=header, columns=None if header else ["label", "title", "description"])
        except PipelineError as exc:
            assert str(path) in str(exc)
        else:
            assert len(df) > 0 and "_row" in df


cell = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(-3, 9),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
row = st.dictionaries(st.sampled_from(["label", "title", "description", "extra"]), cell, max_size=4)


@FUZZ
@given(rows=st.lists(row, min_size=0, max_size=25), as_list=st.booleans())
def test_random_rows_give_valid_data_or_a_report(rows, as_list):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / ("rows.json" if as_list else "rows.jsonl")
        path.write_text(json.dumps(rows) if as_list else "".join(json.dumps(r) + "\n" for r in rows))
        params = Params.model_validate(
            repo_params(data={"path": str(path), "format": "auto", "header": True, "columns": None})
        )
        try:
            res = validate.run(params, root)
        except PipelineError as exc:
            assert str(path) in str(exc)
        else:
            assert res.summary["rows"] + res.summary["dropped"] == len(rows)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": cell, "input": cell, "output": cell}), max_size=15))
def test_random_instruction_rows(rows):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        params = Params.model_validate(
            repo_params(task="causal_lm", data={"path": str(path), "format": "auto", "label_names": None})
        )
        try:
            validate.run(params, root)
        except PipelineError as exc:
            assert str(path) in str(exc)
