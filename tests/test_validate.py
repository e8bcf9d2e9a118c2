"""Validation on real data, and bad data named by file, row and rule."""

import json

import pytest

from tasks import catalog, validate
from tasks.common import PipelineError
from tasks.config import Params
from tasks.data.arrowio import open_rows
from tests.conftest import AG_NEWS, ALPACA, SELF_INSTRUCT, repo_params


def cls_params(path, **data) -> Params:
    return Params.model_validate(repo_params(data={"path": str(path), **data}))


def instr_params(path) -> Params:
    return Params.model_validate(repo_params(task="causal_lm", data={"path": str(path), "format": "auto"}))


def test_ag_news_validates_cleans_and_keeps_every_row(tmp_path):
    res = validate.run(cls_params(AG_NEWS), tmp_path)
    rows = open_rows(tmp_path / catalog.VALIDATED_ROWS).to_pandas()
    assert len(rows) == 7600 and res.summary["rows"] == 7600
    assert sorted(rows["label"].value_counts().tolist()) == [1900] * 4
    assert json.loads((tmp_path / "data/validated/labels.json").read_text())["names"] == [
        "World",
        "Sports",
        "Business",
        "Sci/Tech",
    ]
    text = " ".join(rows["text"])
    assert "#36;" not in text and "\\" not in text and "&lt;" not in text
    # the second row of the file: '... the  #36;10 million Ansari X Prize ...' becomes '$10 million'
    assert "$10 million Ansari X Prize" in rows.loc[rows["row"] == "2", "text"].item()
    report = json.loads((tmp_path / "reports/validation.json").read_text())
    assert report["status"] == "passed" and report["errors"] == []


def test_clean_text():
    assert validate.clean_text("a  #36;5 &amp; b\\c") == "a $5 & b c"


@pytest.mark.parametrize("path", [ALPACA, SELF_INSTRUCT])
def test_instruction_datasets_validate(tmp_path, path):
    res = validate.run(instr_params(path), tmp_path)
    assert res.summary["rows"] > 100


def _csv(tmp_path, text: str | bytes):
    p = tmp_path / "bad.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


GOOD = '"1","Title one","Body one"\n"2","Title two","Body two"\n'


@pytest.mark.parametrize(
    "content, row, rule",
    [
        (GOOD + '"3","   ","Body three"\n', "3", "not_blank"),
        (GOOD + '"7","Title x","Body x"\n', "3", "isin"),
        (GOOD + '"World?","Title x","Body x"\n', "3", "isin"),
        (GOOD + '"1",,"Body x"\n', "3", "not_nullable"),
        (GOOD + '"1","Title one","Body one"\n', "3", "unique_rows"),
    ],
)
def test_bad_rows_are_named(tmp_path, content, row, rule):
    path = _csv(tmp_path, content)
    with pytest.raises(PipelineError) as exc:
        validate.run(cls_params(path), tmp_path)
    msg = str(exc.value)
    assert str(path) in msg and f"row {row}" in msg and rule in msg, msg
    report = json.loads((tmp_path / "reports/validation.json").read_text())
    assert report["status"] == "failed"
    assert any(e["row"] == row and rule in e["rule"] for e in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "file is empty"),
        (GOOD.encode() + b'"1","Caf\xe9","x"\n', "line 3: not valid UTF-8"),
        ('"1","only two"\n', "line 1: expected 3 fields"),
        ('"1","A","a"\n"1","B","b"\n', "at_least_2_classes"),
    ],
)
def test_bad_files_are_named(tmp_path, content, words):
    path = _csv(tmp_path, content)
    with pytest.raises(PipelineError) as exc:
        validate.run(cls_params(path), tmp_path)
    assert str(path) in str(exc.value) and words in str(exc.value), str(exc.value)


def test_missing_column_is_named(tmp_path):
    path = _csv(tmp_path, GOOD)
    with pytest.raises(PipelineError, match="column body: rule column_present"):
        validate.run(cls_params(path, columns=["label", "title", "desc"], text_columns=["title", "body"]), tmp_path)


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": ]')
    with pytest.raises(PipelineError, match=r"bad.json: line 2, column \d+: not valid JSON"):
        validate.run(instr_params(p), tmp_path)


def test_failed_validation_leaves_previous_outputs_untouched(tmp_path):
    good = _csv(tmp_path, GOOD + '"3","Title three","Body three"\n')
    validate.run(cls_params(good), tmp_path)
    before = (tmp_path / catalog.VALIDATED_ROWS).read_bytes()
    bad = _csv(tmp_path, GOOD + '"9","Title x","Body x"\n')
    with pytest.raises(PipelineError):
        validate.run(cls_params(bad), tmp_path)
    assert (tmp_path / catalog.VALIDATED_ROWS).read_bytes() == before


def test_dropped_duplicates_are_reported_not_silent(tmp_path):
    path = _csv(tmp_path, GOOD + '"1","Title one","Body one"\n')
    res = validate.run(cls_params(path, duplicates="drop"), tmp_path)
    assert res.summary["rows"] == 2 and res.summary["dropped"] == 1
    report = json.loads((tmp_path / "reports/validation.json").read_text())
    assert [d["row"] for d in report["dropped_duplicates"]] == ["3"]
