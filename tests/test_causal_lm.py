"""Instruction tuning end to end: tiny random Llama, real Alpaca sample, the real flow."""

import json
import math

import pandas as pd
import pytest
import torch
import yaml

from flows.pipeline import Project, qlora_pipeline
from tasks.catalog import IGNORE_INDEX as IGNORE
from tasks.config import Params
from tasks.tokenize import encode_instructions
from tests.conftest import ALPACA, make_project, repo_params
from tests.tiny_llm import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), ALPACA)


def causal_params(model_dir) -> dict:
    return repo_params(
        task="causal_lm",
        data={"path": str(ALPACA), "format": "auto", "label_names": None, "label_base": 0},
        model={"name": str(model_dir)},
        tokenize={"max_length": 256, "template": "alpaca"},
        train={"max_steps": 8, "batch_size": 8, "lr": 0.01, "log_every": 1, "gradient_checkpointing": True},
        eval={"batch_size": 8, "num_samples": 2, "max_new_tokens": 8},
        tracking={"registered_model": "tiny-llama-alpaca"},
    )


def test_loss_falls_on_answer_tokens_only(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = {"instruction": ["Add two and two."], "input": [""], "output": ["Four."]}
    encoded = encode_instructions(rows, tok, 256, "alpaca")
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    answer = tok("Four.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(ids) - len(answer)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == answer == ids[n_prompt:]
    assert "### Response:" in tok.decode(ids[:n_prompt]) and encoded["truncated"] == [False]


@pytest.mark.slow
def test_causal_lm_flow_end_to_end(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from tasks.data.batching import collate
    from tasks.evaluate import load_adapted
    from tasks.tokenize import load_split

    raw = causal_params(tiny_llama)
    params = Params.model_validate(raw)
    tmp_path = make_project(tmp_path / "project", raw)
    out = qlora_pipeline(Project(root=tmp_path))
    assert all(s.ran for s in out.stages.values())
    lineage = json.loads((tmp_path / "models/base/lineage.json").read_text())
    assert lineage["linear4bit_modules"] == 14  # 2 layers x 7; lm_head kept
    # the local base model directory is a DVC dependency of tokenize and quantize
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert any(d["path"] == str(tiny_llama) for d in lock["quantize"]["deps"])
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["answer_tokens"] > 0 and math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]))
    samples = [json.loads(x) for x in (tmp_path / "reports/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("### Instruction:" in s["prompt"] for s in samples)
    loss = pd.read_csv(tmp_path / "reports/train/loss.csv")["loss"].tolist()
    assert len(loss) == 8 and loss[-1] < loss[0]
    # merged (dequantized base + adapter, bf16) reloads with plain transformers and matches
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "models/merged").eval()
    adapted = load_adapted(params, tmp_path, torch.device("cpu"))
    batch = collate(load_split(tmp_path, "test")[:4], 3, "causal_lm")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    assert (ref - got).abs()[mask].max().item() < 0.1
    assert (ref.argmax(-1) == got.argmax(-1))[mask].float().mean().item() > 0.97


def test_packed_and_unpacked_give_the_same_loss(tiny_llama):
    """The same 6 examples, as a padded batch and packed into 2 rows: same loss, so no
    example attends to or predicts across another."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.data.batching import collate, collate_packed, pack_bins

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    from datasets import Dataset

    rows = pd.read_json(ALPACA).iloc[:6]
    encoded = encode_instructions({c: rows[c].tolist() for c in ("instruction", "input", "output")}, tok, 256, "alpaca")
    frame = Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["labels"]})
    lengths = [len(x) for x in encoded["input_ids"]]
    bins = pack_bins(list(range(6)), lengths, max_length=2 * max(lengths))
    assert len(bins) < 6 and sorted(i for b in bins for i in b) == list(range(6))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        unpacked = model(**collate(frame[:], tok.pad_token_id, "causal_lm"), use_cache=False).loss
        batch, real = collate_packed(frame, bins, tok.pad_token_id)
        packed = model(**batch, use_cache=False).loss
        # without the position_ids reset the examples would see each other: a different loss
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert real == sum(lengths)
    assert abs(packed.item() - unpacked.item()) < 1e-4, (packed.item(), unpacked.item())
    assert abs(leaky.item() - unpacked.item()) > 1e-3


@pytest.mark.slow
def test_training_with_packing(tmp_path, tiny_llama):
    from tasks import quantize, split, tokenize, train, validate

    raw = causal_params(tiny_llama)
    raw["train"].update(packing=True, batch_size=2, max_steps=4)
    params = Params.model_validate(raw)
    for stage in (validate, split, tokenize, quantize, train):
        stage.run(params, tmp_path)
    summary = json.loads((tmp_path / "reports/train/summary.json").read_text())
    stats = json.loads((tmp_path / "data/tokenized/stats.json").read_text())
    assert summary["steps"] == 4
    # 2 packed rows of <= 256 tokens a step hold more real tokens than 2 unpacked examples
    assert summary["tokens"] > 4 * 2 * stats["splits"]["train"]["mean_tokens"]
