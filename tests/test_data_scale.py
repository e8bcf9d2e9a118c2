"""Data at any size: chunked validation with the cross-row rules done by hashing, Arrow files
between stages whose bytes do not depend on chunk size or process count, and Hugging Face
datasets (hf://) loaded through datasets.load_dataset, here from local dataset folders."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from flows.dvc.data_check import DataVersionMismatch, check_data, require_committed_version
from flows.dvc.stages import BY_NAME
from tasks import catalog, split, tokenize, validate
from tasks.common import PipelineError
from tasks.config import Params
from tasks.data.arrowio import open_rows
from tasks.data.readers import iter_raw
from tests.conftest import AG_NEWS, REPO, repo_params


def cls_params(path, **data) -> Params:
    return Params.model_validate(repo_params(data={"path": str(path), **data}))


def ag_rows(n: int) -> pd.DataFrame:
    return pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False, nrows=n)


def write_csv(path, frame: pd.DataFrame):
    frame.to_csv(path, header=False, index=False, quoting=1)
    return path


def test_chunked_validation_writes_the_same_bytes_as_one_chunk(tmp_path):
    """Chunk size changes memory, never the result: the validated and split files hash the same."""
    one, many = tmp_path / "one", tmp_path / "many"
    for root, chunk in ((one, 100_000), (many, 333)):
        validate.run(cls_params(AG_NEWS, chunk_rows=chunk), root)
        split.run(cls_params(AG_NEWS, chunk_rows=chunk), root)
    assert (one / catalog.VALIDATED_ROWS).read_bytes() == (many / catalog.VALIDATED_ROWS).read_bytes()
    for name in catalog.SPLITS:
        path = catalog.split_file(catalog.SPLIT_DIR, name)
        assert (one / path).read_bytes() == (many / path).read_bytes()
    rows = open_rows(one / catalog.VALIDATED_ROWS)
    assert len(rows) == 7600 and rows.column_names == ["text", "label", "source", "row"]
    assert rows[0]["source"] == str(AG_NEWS) and rows[0]["row"] == "1"


def test_duplicates_and_bad_rows_are_found_across_chunks(tmp_path):
    """The duplicate of line 3 is 400 lines later, in another chunk of 100: found by its hash and
    named by its line; bad rows of every chunk are all in the report."""
    frame = ag_rows(600)
    frame.iloc[402] = frame.iloc[2]  # line 403 repeats line 3
    frame.iloc[150, 0] = "9"  # a label outside 1..4, chunk 2
    frame.iloc[550, 1] = "   "  # a blank title, chunk 6
    path = write_csv(tmp_path / "data.csv", frame)
    with pytest.raises(PipelineError) as exc:
        validate.run(cls_params(path, chunk_rows=100), tmp_path)
    msg = str(exc.value)
    assert "3 validation error(s)" in msg and "row 403" in msg and "unique_rows" in msg, msg
    report = json.loads((tmp_path / catalog.VALIDATION_REPORT).read_text())
    found = {(e["row"], e["rule"].split("(")[0]) for e in report["errors"]}
    assert found == {("151", "isin"), ("551", "not_blank"), ("403", "unique_rows")}, found
    assert report["rows"] == 600 and report["status"] == "failed"
    assert not (tmp_path / catalog.VALIDATED_DIR).exists()  # nothing written for later stages


def test_dropped_duplicates_across_chunks_are_listed_and_gone(tmp_path):
    frame = ag_rows(300)
    frame.iloc[250] = frame.iloc[10]
    frame.iloc[260] = frame.iloc[10]
    path = write_csv(tmp_path / "data.csv", frame)
    res = validate.run(cls_params(path, chunk_rows=64, duplicates="drop"), tmp_path)
    report = json.loads((tmp_path / catalog.VALIDATION_REPORT).read_text())
    assert [d["row"] for d in report["dropped_duplicates"]] == ["251", "261"]
    rows = open_rows(tmp_path / catalog.VALIDATED_ROWS)
    assert res.summary["rows"] == len(rows) == 298 and "251" not in rows["row"] and "11" in rows["row"]


def test_classes_found_in_the_data_span_all_chunks(tmp_path):
    """label_names null: the classes are the sorted labels of all chunks (known only at the end)."""
    frame = ag_rows(400).sort_values(0, kind="stable")  # chunk 1 sees classes 1-2, the last one 3-4
    path = write_csv(tmp_path / "data.csv", frame)
    validate.run(cls_params(path, chunk_rows=50, label_names=None), tmp_path)
    assert json.loads((tmp_path / catalog.LABELS).read_text())["names"] == ["1", "2", "3", "4"]
    rows = open_rows(tmp_path / catalog.VALIDATED_ROWS).to_pandas()
    assert rows["row"].tolist() == [str(i) for i in range(1, 401)]  # file order, every line
    assert (rows["label"].to_numpy() == frame[0].astype(int).to_numpy() - 1).all()


def test_stream_reader_names_lines_across_chunks(tmp_path):
    """A quoted field spanning lines: the next record's row is its own first line, in any chunk;
    a bad byte in a later chunk is named by its line."""
    p = tmp_path / "multi.csv"
    p.write_bytes(b'"1","a","first\nsecond"\n"2","b","x"\n"3","c","y"\n')
    rows = [
        r for chunk in iter_raw(p, "csv", False, ["label", "title", "description"], chunk_rows=1) for r in chunk["_row"]
    ]
    assert rows == [1, 3, 4]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'"1","a","b"\n' * 250 + b'"1","caf\xe9","b"\n')
    with pytest.raises(PipelineError, match="line 251: not valid UTF-8"):
        for _ in iter_raw(bad, "csv", False, ["label", "title", "description"], chunk_rows=100):
            pass


def test_tokenized_bytes_do_not_depend_on_the_number_of_processes(tmp_path, monkeypatch):
    """Dataset.map with 2 processes writes two shards (and, in rounds of SLICE_ROWS rows, two per
    round); the stage re-cuts them into one file whose bytes (and DVC hash) equal a one-process run's."""
    params = cls_params(AG_NEWS)
    validate.run(params, tmp_path)
    split.run(params, tmp_path)
    tokenize.run(params, tmp_path)
    one = {s: (tmp_path / catalog.split_file(catalog.TOKENIZED_DIR, s)).read_bytes() for s in catalog.SPLITS}
    monkeypatch.setattr(tokenize, "ROWS_PER_PROCESS", 1000)
    two = Params.model_validate(repo_params(data={"path": str(AG_NEWS)}, tokenize={"num_proc": 2}))
    assert tokenize.processes(2, 6080) == 2
    tokenize.run(two, tmp_path)
    for s in catalog.SPLITS:
        assert (tmp_path / catalog.split_file(catalog.TOKENIZED_DIR, s)).read_bytes() == one[s], s
    monkeypatch.setattr(tokenize, "SLICE_ROWS", 2500)  # rounds of 2,500 rows (3 for train), 2 processes each
    tokenize.run(two, tmp_path)
    for s in catalog.SPLITS:
        assert (tmp_path / catalog.split_file(catalog.TOKENIZED_DIR, s)).read_bytes() == one[s], s
    ds = tokenize.load_split(tmp_path, "train")
    assert ds.column_names == ["input_ids", "labels", "source", "row"] and len(ds) == 6080
    stats = json.loads((tmp_path / catalog.TOKENIZE_STATS).read_text())
    assert stats["splits"]["train"]["truncated_rows"] == len(stats["truncated_rows"]["train"]) > 0


def hub_folder(tmp_path, n: int = 240):
    """A dataset folder as the hub lays one out (data files by split), read by load_dataset."""
    folder = tmp_path / "hub_ag_news"
    (folder / "data").mkdir(parents=True)
    frame = ag_rows(n).rename(columns={0: "label", 1: "title", 2: "description"})
    frame["label"] = frame["label"].astype(int) - 1  # the hub's ag_news labels are 0..3
    frame.iloc[: n // 2].to_parquet(folder / "data/train-00000-of-00001.parquet", index=False)
    frame.iloc[n // 2 :].to_parquet(folder / "data/test-00000-of-00001.parquet", index=False)
    return folder


def test_hub_dataset_folder_loads_through_datasets_and_records_its_lineage(tmp_path):
    folder = hub_folder(tmp_path)
    root = tmp_path / "project"
    params = cls_params(f"hf://{folder}", split="test", label_base=0, format="auto", chunk_rows=50)
    res = validate.run(params, root)
    assert res.summary["rows"] == 120
    source = json.loads((root / catalog.VALIDATED_DIR / "source.json").read_text())
    assert source["source"] == f"hf://{folder}" and source["split"] == "test" and len(source["fingerprint"]) == 16
    assert json.loads((root / catalog.VALIDATION_REPORT).read_text())["source"]["fingerprint"] == source["fingerprint"]
    rows = open_rows(root / catalog.VALIDATED_ROWS)
    assert rows[0]["row"] == "1" and rows[0]["source"] == f"hf://{folder}"
    assert (root / catalog.HF_DATASETS_CACHE).is_dir()  # cached under the project
    # a local dataset folder is data like any other: hashed, and a DVC dependency of validate
    check = check_data(params, root)
    assert check.status == "untracked" and check.md5.endswith(".dir")
    assert str(folder) in BY_NAME["validate"].declared_deps(params)


def test_hub_id_without_network_fails_clearly_and_needs_a_pinned_revision(tmp_path):
    params = cls_params("hf://ag_news", split="test")
    code = (
        "from pathlib import Path; from tasks import validate; from tasks.config import Params; import json, sys;"
        f"validate.run(Params.model_validate(json.loads(sys.argv[1])), Path({str(tmp_path)!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params.model_dump())],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "hf://ag_news: cannot reach the Hugging Face Hub" in proc.stderr, proc.stderr[-2000:]
    report = json.loads((tmp_path / catalog.VALIDATION_REPORT).read_text())
    assert report["status"] == "failed" and report["errors"][0]["rule"] == "readable"
    # no bytes to hash before loading: a hub id is trusted only at a commit
    assert "data.path" not in json.dumps(BY_NAME["validate"].declared_deps(params))
    assert not any(d.startswith("hf://") or d == "${data.path}" for d in BY_NAME["validate"].declared_deps(params))
    unpinned = check_data(params, tmp_path)
    assert unpinned.status == "unpinned" and unpinned.tags()["data_verified"] == "false"
    with pytest.raises(DataVersionMismatch, match="not a commit hash"):
        require_committed_version(unpinned, allow=False)
    pinned = check_data(cls_params("hf://ag_news", revision="a" * 40), tmp_path)
    assert pinned.status == "pinned" and require_committed_version(pinned, allow=False) is pinned


def test_fast_path_token_ids_equal_the_tokenizer_call():
    """tokenize calls the Rust backend directly; the ids must be the tokenizer's own, whatever
    truncation or padding its tokenizer.json carries (MiniLM's says 128 and pads)."""
    from tasks.model.loading import load_tokenizer
    from tasks.model.source import resolve_source

    tok = load_tokenizer(resolve_source(Params().model)[0])
    texts = [f"{t}. {d}" for t, d in ag_rows(300)[[1, 2]].itertuples(index=False)]
    direct = tokenize.token_ids(tok, texts, special_tokens=True)
    assert direct == tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
    assert max(map(len, direct)) > 128  # nothing cut: the stage cuts at tokenize.max_length and counts it
