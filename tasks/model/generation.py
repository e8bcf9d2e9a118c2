"""Causal-LM evaluation by generation: for each row of the split (the first eval.max_generate_rows),
the model answers greedily and the answer is scored against the reference by exact match and
ROUGE-L (the rouge-score package).

Prompt and reference come from the tokenized row itself: the reference is the row's LAST
assistant turn (its last run of labelled tokens) and the prompt is every token before it, earlier
assistant turns included, so a multi-turn row is asked what its final answer should be, with the
conversation so far as context. (All unlabelled tokens would splice the turns of a multi-turn row
together; a single-turn row gets the same prompt either way.)
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from tasks.catalog import IGNORE_INDEX as IGNORE


def split_last_turn(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the last run of labelled tokens and everything before it."""
    end = max((i + 1 for i, lab in enumerate(labels) if lab != IGNORE), default=0)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


def normalize(text: str) -> str:
    """What exact match compares: lower case, whitespace collapsed and trimmed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(generated: str, reference: str) -> float:
    return float(normalize(generated) == normalize(reference))


_ROUGE = None


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words, rouge-score's tokenizer: lower case, letters
    and digits only)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, generated)["rougeL"].fmeasure)


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device) -> list[list[int]]:
    """Greedy continuations (token ids, ending before EOS) of each prompt, in batches of prompts of
    similar length, left-padded (the attention mask hides the padding; positions follow it)."""
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            out[i] = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return out


def evaluate_generation(
    model, tok, rows, max_rows: int | None, max_new_tokens: int, batch_size: int, device
) -> tuple[dict, list[dict]]:
    """({"exact_match", "rougeL", "generated_rows"}, one sample per row: row, prompt, reference,
    generated, exact_match, rougeL). rows: a tokenized split (input_ids, labels, row)."""
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    first = rows[:n]  # only these rows are read
    items = []
    for ids, labels, row in zip(first["input_ids"], first["labels"], first["row"]):
        prompt, reference = split_last_turn([int(x) for x in ids], [int(x) for x in labels])
        if prompt and reference:  # a row max_length cut before its last answer has nothing to score
            items.append((str(row), prompt, reference))
    answers = generate(model, tok, [p for _, p, _ in items], max_new_tokens, batch_size, device) if items else []
    samples = []
    for (row, prompt, reference), answer in zip(items, answers):
        ref = tok.decode(reference, skip_special_tokens=True).strip()
        got = tok.decode(answer, skip_special_tokens=True).strip()
        samples.append(
            {
                "row": row,
                "prompt": tok.decode(prompt, skip_special_tokens=True),
                "reference": ref,
                "generated": got,
                "exact_match": exact_match(got, ref),
                "rougeL": round(rouge_l(got, ref), 6),
            }
        )
    metrics = {
        "generated_rows": len(samples),
        "exact_match": sum(s["exact_match"] for s in samples) / len(samples) if samples else None,
        "rougeL": sum(s["rougeL"] for s in samples) / len(samples) if samples else None,
    }
    return metrics, samples
