"""Step 3: turn split text into token ids, counting what max_length cuts off.

A batched `Dataset.map` over each memory-mapped split (tokenize.num_proc processes) writes
its output to disk, and the stage copies it into one Arrow file per split in fixed record
batches (tasks/data/arrowio.py), so the bytes, and DVC's hash, do not depend on num_proc.

seq_cls rows keep (input_ids, labels: the class) and causal_lm rows (input_ids, labels) where
labels are -100 on prompt tokens so the loss falls on answer tokens only; both keep the row's
provenance (source, row).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from tasks import catalog
from tasks.catalog import IGNORE_INDEX, SPLITS
from tasks.common import PipelineError, StageResult, atomic_dir, read_json, resolve, result, write_json
from tasks.config import Params
from tasks.data import chat
from tasks.data.arrowio import RowsWriter, iter_batches, list_lengths, open_rows, take_column
from tasks.data.prompts import render_prompt
from tasks.model.loading import load_tokenizer
from tasks.model.source import resolve_source

MAP_BATCH = 1_000  # rows per call of the encode function
ROWS_PER_PROCESS = 20_000  # a process is slow to start: small splits use fewer
SLICE_ROWS = 1_000_000  # rows per round of map processes (bounds the mapped pages they hold)
LISTED_TRUNCATED = 1_000  # rows named per split in stats.json (all are counted)


def token_ids(tok, texts: list[str], special_tokens: bool) -> list[list[int]]:
    """Token ids of each text. A fast tokenizer's Rust backend is called directly (encode_batch_fast:
    the same ids as `tok(texts)`, without character offsets and the Python wrapper's per-row work);
    a slow tokenizer goes through its usual call."""
    if getattr(tok, "is_fast", False):
        backend = tok.backend_tokenizer
        # a tokenizer.json may carry truncation or padding (MiniLM's: 128 tokens); `tok(...)` would reset
        # them per call, and so does this: every token is kept and counted, cut later by max_length
        backend.no_truncation()
        backend.no_padding()
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special_tokens)]
    return tok(texts, add_special_tokens=special_tokens, truncation=False)["input_ids"]


def encode_classification(batch: dict, tok, max_length: int) -> dict:
    ids = token_ids(tok, batch["text"], special_tokens=True)
    truncated = [len(x) > max_length for x in ids]
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [x[-1]] for x in ids]  # keep [SEP]
    return {"input_ids": ids, "labels": batch["label"], "truncated": truncated}


def encode_instructions(batch: dict, tok, max_length: int, template: str) -> dict:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    prompts = token_ids(
        tok,
        [render_prompt(template, ins, inp) for ins, inp in zip(batch["instruction"], batch["input"])],
        special_tokens=True,
    )
    answers = token_ids(tok, batch["output"], special_tokens=False)
    out_ids, out_labels, truncated = [], [], []
    for prompt, answer in zip(prompts, answers):
        answer = answer + eos
        ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        truncated.append(len(ids) > max_length)
        out_ids.append(ids[:max_length])
        out_labels.append(labels[:max_length])
    return {"input_ids": out_ids, "labels": out_labels, "truncated": truncated}


def output_features(task: str):
    from datasets import Features, List, Value

    labels = Value("int64") if task == "seq_cls" else List(Value("int32"))
    return Features(
        {"input_ids": List(Value("int32")), "labels": labels, "source": Value("string"), "row": Value("string")}
    )


def processes(setting: int, rows: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(setting or cores, rows // ROWS_PER_PROCESS))


def tokenize_split(params: Params, tok, src: Path, dst: Path, work: Path, split: str) -> dict:
    """Tokenize one split file into dst; return its stats."""
    from datasets import Features, Value

    t = params.tokenize
    rows = open_rows(src)
    features = output_features(params.task)
    if params.task == "seq_cls":
        encode, kwargs, drop = encode_classification, {"tok": tok, "max_length": t.max_length}, ["text", "label"]
    else:
        encode = encode_instructions
        kwargs = {"tok": tok, "max_length": t.max_length, "template": t.template}
        drop = ["instruction", "input", "output"]
        if "messages" in rows.column_names or t.template == "model":  # conversations, or the model's chat template
            encode, drop = chat.encode_batch, [c for c in rows.column_names if c not in ("source", "row")]
    # Rounds of SLICE_ROWS rows: the map's processes exit after each round, and with them the pages of
    # the memory-mapped split they read (resident memory stays at one round's, whatever the split's size).
    pieces, lengths, truncated, without_answer = [], [], [], 0
    for i, start in enumerate(range(0, max(len(rows), 1), SLICE_ROWS)):
        part = rows.select(range(start, min(start + SLICE_ROWS, len(rows))))  # contiguous: a slice, no copy
        n_proc = processes(t.num_proc, len(part))
        mapped = part.map(
            encode,
            batched=True,
            batch_size=MAP_BATCH,
            fn_kwargs=kwargs,
            remove_columns=drop,
            features=Features({**features, "truncated": Value("bool")}),
            num_proc=n_proc if n_proc > 1 else None,
            load_from_cache_file=False,
            cache_file_name=str(work / f"{split}-{i:05d}.arrow"),
            desc=f"tokenize {split} rows {start:,}+ ({n_proc} proc)",
        )
        lengths.append(list_lengths(mapped))
        truncated.append(start + np.flatnonzero(mapped.data.table.column("truncated").to_numpy(zero_copy_only=False)))
        if params.task == "causal_lm":  # a row whose answer was cut away entirely trains nothing
            without_answer += rows_without_answer_tokens(mapped.data.table.column("labels"))
        pieces += [Path(f["filename"]) for f in mapped.cache_files]
    lengths, truncated = np.concatenate(lengths), np.concatenate(truncated)
    stats = {
        "rows": len(rows),
        "truncated_rows": int(len(truncated)),
        "mean_tokens": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        "max_tokens": int(lengths.max()) if len(lengths) else 0,
    }
    if params.task == "causal_lm":
        stats["rows_without_answer_tokens"] = without_answer
    with RowsWriter(dst, features) as out:  # the map's shards, in order, read (not mapped) a batch at a time
        for piece in pieces:
            for table in iter_batches(piece, list(features)):
                out.write(table)
    for piece in pieces:  # only once the output is whole: a failed write leaves the shards to look at
        piece.unlink(missing_ok=True)
    named = take_column(dst, "row", truncated[:LISTED_TRUNCATED]) if len(truncated) else []
    return stats | {"truncated_row_names": named}


def rows_without_answer_tokens(labels) -> int:
    """Rows whose labels are all -100, counted in Arrow (a chunked list<int32> column)."""
    import pyarrow.compute as pc

    total = 0
    for chunk in labels.chunks:
        flat = pc.list_flatten(chunk)
        answer = pc.not_equal(flat, IGNORE_INDEX).to_numpy(zero_copy_only=False)
        counts = np.bincount(pc.list_parent_indices(chunk).to_numpy()[answer], minlength=len(chunk))
        total += int((counts == 0).sum())
    return total


def run(params: Params, root: Path) -> StageResult:
    source, _ = resolve_source(params.model)
    tok = load_tokenizer(source, params.model.revision, params.model.trust_remote_code)
    t = params.tokenize
    stats, too_long = {}, {}
    with atomic_dir(resolve(root, catalog.TOKENIZED_DIR)) as tmp:
        work = tmp / ".map"
        work.mkdir()
        for split in SPLITS:
            src = resolve(root, catalog.split_file(catalog.SPLIT_DIR, split))
            dst = tmp / Path(catalog.split_file(catalog.TOKENIZED_DIR, split)).name
            split_stats = tokenize_split(params, tok, src, dst, work, split)
            too_long[split] = split_stats.pop("truncated_row_names")
            stats[split] = split_stats
        shutil.rmtree(work)
        if not t.truncation and any(too_long.values()):
            listed = "; ".join(f"{s}: rows {', '.join(r[:10])}" for s, r in too_long.items() if r)
            raise PipelineError(
                f"{resolve(root, catalog.SPLIT_DIR)}: rows longer than tokenize.max_length="
                f"{t.max_length} with tokenize.truncation=false ({listed}); rule: max_length"
            )
        shutil.copy(resolve(root, catalog.LABELS), tmp / "labels.json")
        write_json(
            tmp / Path(catalog.TOKENIZE_STATS).name,
            {
                "max_length": t.max_length,
                "splits": stats,
                "truncated_rows": too_long,  # names of the first LISTED_TRUNCATED rows cut per split; all are counted
            },
        )
    return result(
        "tokenize", [catalog.TOKENIZED_DIR], **{f"{s}_truncated": v["truncated_rows"] for s, v in stats.items()}
    )


def load_split(root: Path, split: str):
    """A tokenized split as a memory-mapped `datasets.Dataset` (input_ids, labels, source, row)."""
    return open_rows(resolve(root, catalog.split_file(catalog.TOKENIZED_DIR, split)))


def label_names(root: Path) -> list[str]:
    return read_json(resolve(root, catalog.TOKENIZED_DIR) / "labels.json")["names"]
