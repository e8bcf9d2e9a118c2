"""Inbox ingest (tasks/data/ingest.py) on its own: new rows are matched against every row of the raw
dataset read as a stream (here in chunks of 4 rows), and appended without rewriting what was there."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import Params
from tasks.data.ingest import ingest
from tests.conftest import repo_params


def _rows(start: int, n: int) -> list[list[str]]:
    return [[str(1 + i % 4), f"Title {i}", f"Body of story number {i}."] for i in range(start, start + n)]


def _csv(path, rows, final_newline=True):
    text = "\n".join(",".join(f'"{v}"' for v in r) for r in rows)
    path.write_text(text + ("\n" if final_newline else ""))
    return path


def test_csv_drop_is_matched_across_chunks_and_appended_byte_for_byte(tmp_path):
    raw = _csv(tmp_path / "data.csv", _rows(0, 30), final_newline=False)
    before = raw.read_bytes()
    params = Params.model_validate(repo_params(data={"path": str(raw), "chunk_rows": 4}, retrain={"settle_seconds": 0}))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop = (
        _rows(100, 3)
        + [
            ["2", "  Title 25 ", "Body of story number 25."],  # in raw's 7th chunk, once cleaned
            ["1", "Title 2", "Body of story number 2."],
        ]
        + _rows(101, 1)
    )  # a repeat within the drop
    _csv(inbox / "drop.csv", drop)
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 3
    assert sorted((s["row"], s["reason"]) for s in out.skipped_duplicates) == [
        ("4", "already in the dataset"),
        ("5", "already in the dataset"),
        ("6", "duplicate within the file"),
    ]
    after = raw.read_bytes()
    assert after.startswith(before + b"\n") and after.count(b"\n") == 33
    assert pd.read_csv(raw, header=None).iloc[30:, 1].tolist() == ["Title 100", "Title 101", "Title 102"]
    assert (inbox / "processed").is_dir() and not (inbox / "drop.csv").exists()

    _csv(inbox / "again.csv", _rows(100, 2))  # everything already there: nothing to merge
    out = ingest(params, tmp_path, inbox)
    assert out.status == "no_new_data" and out.added_rows == 0 and raw.read_bytes() == after


def test_chat_parquet_keeps_its_nested_type_and_is_matched_on_the_prompt(tmp_path):
    def conv(i, answer="Fine."):
        return [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]

    raw = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [conv(i) for i in range(10)]}).to_parquet(raw)
    schema = pq.read_schema(raw)
    params = Params.model_validate(
        repo_params(
            task="causal_lm",
            data={"path": str(raw), "format": "auto", "label_names": None, "chunk_rows": 4},
            retrain={"settle_seconds": 0},
        )
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "drop.jsonl").write_text(
        json.dumps({"messages": conv(10)}) + "\n" + json.dumps({"messages": conv(3, "Another answer.")}) + "\n"
    )
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 1
    assert [(s["row"], s["reason"]) for s in out.skipped_duplicates] == [("2", "already in the dataset")]
    table = pq.read_table(raw)
    assert table.schema == schema and pa.types.is_list(table.schema.field("messages").type)
    assert table.num_rows == 11 and table.column("messages").to_pylist()[-1] == conv(10)
