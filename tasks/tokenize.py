"""Step 3: turn split text into token ids (parquet), counting what max_length cuts off.

seq_cls rows keep (input_ids, label); causal_lm rows keep (input_ids, labels) where
labels are -100 on prompt tokens so the loss falls on answer tokens only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from tasks import catalog, chat
from tasks.catalog import IGNORE_INDEX, SPLITS
from tasks.common import PipelineError, StageResult, atomic_dir, read_json, resolve, result, write_json
from tasks.config import Params
from tasks.modeling import load_tokenizer, resolve_source
from tasks.prompts import render_prompt



def encode_classification(tok, rows: pd.DataFrame, max_length: int) -> tuple[pd.DataFrame, list[str]]:
    ids = tok(rows["text"].tolist(), add_special_tokens=True, truncation=False)["input_ids"]
    long_rows = [r for r, x in zip(rows["row"].astype(str), ids) if len(x) > max_length]
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [x[-1]] for x in ids]  # keep [SEP]
    frame = pd.DataFrame({"input_ids": ids, "labels": rows["label"].astype(int), "row": rows["row"].astype(str)})
    return frame, long_rows


def encode_instructions(tok, rows: pd.DataFrame, max_length: int, template: str) -> tuple[pd.DataFrame, list[str]]:
    out_ids, out_labels, long_rows = [], [], []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for ins, inp, ans, row in zip(rows["instruction"], rows["input"], rows["output"], rows["row"].astype(str)):
        prompt = tok(render_prompt(template, ins, inp), add_special_tokens=True)["input_ids"]
        answer = tok(ans, add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        if len(ids) > max_length:
            long_rows.append(row)
            ids, labels = ids[:max_length], labels[:max_length]
        out_ids.append(ids)
        out_labels.append(labels)
    return pd.DataFrame({"input_ids": out_ids, "labels": out_labels, "row": rows["row"].astype(str)}), long_rows


def run(params: Params, root: Path) -> StageResult:
    source, _ = resolve_source(params.model)
    tok = load_tokenizer(source, params.model.revision, params.model.trust_remote_code)
    t = params.tokenize
    stats, too_long = {}, {}
    frames = {}
    for split in SPLITS:
        rows = pd.read_json(resolve(root, catalog.SPLIT_DIR) / f"{split}.jsonl", lines=True, dtype=False)
        if params.task == "seq_cls":
            frame, long_rows = encode_classification(tok, rows, t.max_length)
        elif "messages" in rows or t.template == "model":  # conversations, or the model's chat template
            frame, long_rows = chat.encode_rows(tok, rows, t.max_length, t.template)
        else:
            frame, long_rows = encode_instructions(tok, rows, t.max_length, t.template)
        lengths = frame["input_ids"].map(len)
        stats[split] = {"rows": len(frame), "truncated_rows": len(long_rows),
                        "mean_tokens": round(float(lengths.mean()), 2), "max_tokens": int(lengths.max())}
        if params.task == "causal_lm":
            stats[split]["rows_without_answer_tokens"] = int(frame["labels"].map(lambda labels: max(labels) < 0).sum())
        too_long[split] = long_rows
        frames[split] = frame
    if not t.truncation and any(too_long.values()):
        listed = "; ".join(f"{s}: rows {', '.join(r[:10])}" for s, r in too_long.items() if r)
        raise PipelineError(f"{resolve(root, catalog.SPLIT_DIR)}: rows longer than tokenize.max_length={t.max_length} "
                            f"with tokenize.truncation=false ({listed}); rule: max_length")
    with atomic_dir(resolve(root, catalog.TOKENIZED_DIR)) as tmp:
        for split, frame in frames.items():
            frame.to_parquet(tmp / f"{split}.parquet", index=False)
        shutil.copy(resolve(root, catalog.LABELS), tmp / "labels.json")
        write_json(tmp / Path(catalog.TOKENIZE_STATS).name, {"max_length": t.max_length, "splits": stats,
                                                             "truncated_rows": dict(too_long)})
    return result("tokenize", [catalog.TOKENIZED_DIR],
                  **{f"{s}_truncated": v["truncated_rows"] for s, v in stats.items()})


def load_split(root: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(resolve(root, catalog.TOKENIZED_DIR) / f"{split}.parquet")


def label_names(root: Path) -> list[str]:
    return read_json(resolve(root, catalog.TOKENIZED_DIR) / "labels.json")["names"]
