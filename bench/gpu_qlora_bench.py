"""GPU benchmark: the plain Hugging Face QLoRA recipe and this project's training path, in
ONE process on one GPU, on the same random-weight Llama-shaped model, data and batch.

Prints one JSON line per (shape, recipe): tokens/s (median of timed steps after warm-up),
peak GPU memory, MFU (4N FLOPs a token, as in ../shared/bench), the per-step losses, and
for the project recipe the ratios against the plain one. Skips (exit 0) without CUDA.

    python bench/gpu_qlora_bench.py --shapes llama-1b,llama-8b --seq 2048 --bs 4 \
        --variants liger+gc,liger+gc+mixed --reference llama-1b

The plain recipe is the one in ../shared/bench/plain_hf_qlora_reference.py: NF4 double
quant, bf16 compute, LoRA r=16 all-linear, gradient checkpointing, paged AdamW 32-bit, sdpa.
The project recipe builds the same model with tasks.modeling / tasks.train (the code
`qlora run` trains with) and the speed options of params.yaml (train.liger_kernels, ...).
Peak memory is each recipe's own: the previous recipe's model is collected first and
anything still held is subtracted (printed as leftover_gib).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def model_dir(name: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    path = f"/tmp/qlora-bench/{name}"
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path, safe_serialization=True)
    del m
    torch.cuda.empty_cache()
    return path


def flops_per_token(name: str, seq: int) -> float:
    c = SHAPES[name]
    h, n_layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    n = n_layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * vocab * h
    return 4 * n + 2 * (2 * 2 * n_layers * seq * h)


def plain_recipe(path: str, rank: int, dtype: torch.dtype = torch.bfloat16):
    """Verbatim the seeds' recipe: transformers + peft + bitsandbytes. dtype=float32 makes it
    the fp32 reference: every computation in fp32 on the same 4-bit weights, what the bf16
    recipes approximate (slow; for loss curves only)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": 0}, quantization_config=q)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, bias="none",
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, opt


def project_recipe(path: str, rank: int, liger: bool, gc_on: bool, precision: str = "fp32_upcast",
                   skip_last: int = 0):
    """The project's path: tasks.modeling.load_base + tasks.train.add_lora/make_optimizer."""
    from tasks.config import LoraSection, ModelConfig, QuantConfig, TrainConfig
    from tasks.modeling import load_base
    from tasks.train import add_lora, apply_speedups, make_optimizer
    device = torch.device("cuda")
    t = TrainConfig(lr=2e-4, liger_kernels=liger, gradient_checkpointing=gc_on, optimizer="auto",
                    precision=precision, gradient_checkpointing_skip_last=skip_last)
    apply_speedups("llama", t, device)
    model = load_base("causal_lm", path, ModelConfig(name=path, prefer_embedded=False), QuantConfig(), device)
    torch.manual_seed(1)
    model = add_lora(model, LoraSection(r=rank, alpha=2 * rank, dropout=0.05), "causal_lm", t, torch.bfloat16)
    opt, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], t, device)
    return model, opt


def variant_options(variant: str) -> dict:
    """'liger+gc+mixed+skip4' -> project_recipe keyword arguments."""
    parts = variant.split("+")
    skip = [int(p[4:]) for p in parts if p.startswith("skip")]
    from tasks.config import TrainConfig
    modes = typing.get_args(TrainConfig.model_fields["precision"].annotation)
    precision = next((p for p in parts if p in modes), TrainConfig.model_fields["precision"].default)
    return dict(liger="liger" in parts, gc_on="gc" in parts, precision=precision, skip_last=skip[0] if skip else 0)


def measure(build, name: str, seq: int, bs: int, steps: int, warmup: int, bf16: bool = True) -> dict:
    gc.collect()  # an earlier recipe's model is cyclic garbage until collected
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated()  # anything an earlier recipe still holds
    model, opt = build()
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, SHAPES[name]["vocab_size"], (bs, seq), device="cuda", generator=g)
    times, losses = [], []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 5))
    med = sorted(times[warmup:])[len(times[warmup:]) // 2]
    tok_s = bs * seq / med
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 989e12)
    out = {"tokens_per_s": round(tok_s, 1), "peak_gib": round((torch.cuda.max_memory_allocated() - leftover) / 2**30, 2),
           "leftover_gib": round(leftover / 2**30, 2),
           "mfu": round(tok_s * flops_per_token(name, seq) / peak, 4), "median_step_s": round(med, 4),
           "losses": losses}
    del model, opt, loss  # the last loss holds the graph's nodes, and through them the model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def instruction_frame(seq: int):
    """The Alpaca sample, tokenized as the pipeline does (prompt template, loss on answers),
    with a BPE tokenizer trained offline (no hub): real lengths, real padding."""
    import pandas as pd
    from tasks.tokenize import encode_instructions
    from tests.conftest import ALPACA
    from tests.tiny_llm import build_tiny_llama
    from transformers import AutoTokenizer
    tok_dir = build_tiny_llama(Path("/tmp/qlora-bench/tok"), ALPACA)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = pd.read_json(ALPACA)
    rows = pd.concat([rows] * 4, ignore_index=True).assign(row=lambda d: [str(i) for i in range(len(d))])
    frame, _ = encode_instructions(tok, rows, seq, "alpaca")
    return frame, tok.pad_token_id


def measure_data(build, batches: list, warmup: int) -> dict:
    """Non-pad tokens/s over a pass through real batches (each: (inputs, real token count))."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, opt = build()
    model.train()
    seconds, real_tokens, losses = 0.0, 0, []
    for i, (batch, real) in enumerate(batches):
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            seconds += time.perf_counter() - t0
            real_tokens += real
        losses.append(round(loss.item(), 4))
    out = {"nonpad_tokens_per_s": round(real_tokens / seconds, 1), "steps": len(batches),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "first_losses": losses[:4]}
    del model, opt, loss
    gc.collect()
    torch.cuda.empty_cache()
    return out


def padding_vs_packing(name: str, seq: int, bs: int, rank: int, warmup: int, variant: str) -> None:
    """Plain recipe with dynamic padding (batches of bs examples) vs the project with
    packing (rows of seq tokens), both on the same instruction examples."""
    from tasks.batching import collate, collate_packed, pack_bins
    frame, pad = instruction_frame(seq)
    lengths = frame["input_ids"].map(len).tolist()
    order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0)).tolist()
    padded = []
    for i in range(0, len(order), bs):
        b = collate(frame.iloc[order[i: i + bs]], pad, "causal_lm")
        padded.append((b, int(b["attention_mask"].sum())))
    bins = pack_bins(order, lengths, seq)
    rows_per_batch = 1  # one packed row of seq tokens holds about as many tokens as bs padded examples
    packed = [collate_packed(frame, bins[i: i + rows_per_batch], pad) for i in range(0, len(bins), rows_per_batch)]
    path = model_dir(name)
    base = measure_data(lambda: plain_recipe(path, rank), padded, warmup)
    print(json.dumps({"shape": name, "data": "alpaca-sample x4", "recipe": "plain-hf, dynamic padding",
                      "batch": f"{bs} examples", **base}), flush=True)
    proj = measure_data(lambda: project_recipe(path, rank, **variant_options(variant)), packed, warmup)
    proj["nonpad_speed_ratio"] = round(proj["nonpad_tokens_per_s"] / base["nonpad_tokens_per_s"], 3)
    print(json.dumps({"shape": name, "data": "alpaca-sample x4", "recipe": f"qlora-flow[{variant}+packing]",
                      "batch": f"{rows_per_batch} packed row(s) of <= {seq} tokens", **proj}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--variants", default="liger+gc+mixed",
                    help="project variants, comma-separated, each '+'-joined from: liger, gc, skipN "
                         "(train.gradient_checkpointing_skip_last), fp32_upcast|mixed|bf16 (train.precision)")
    ap.add_argument("--reference", default="", help="shapes that also get the fp32-compute reference's losses")
    ap.add_argument("--packing", default="", help="shape for the real-data run: padding vs packing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return 0
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    if a.packing:  # padding vs packing on real instruction data (plain first: Liger patches globally)
        padding_vs_packing(a.packing, a.seq, a.bs, a.rank, a.warmup, a.variants.split(",")[0])
        return 0
    # Every plain run first: Liger patches transformers' Llama classes for the whole process.
    plain = {}
    for name in a.shapes.split(","):
        path = model_dir(name)
        plain[name] = measure(lambda: plain_recipe(path, a.rank), name, a.seq, a.bs, a.steps, a.warmup)
        print(json.dumps({"shape": name, "recipe": "plain-hf", **plain[name]}), flush=True)
    refs = {}
    for name in filter(None, a.reference.split(",")):  # loss curves only: its speed is not the point
        ref = refs[name] = measure(lambda: plain_recipe(model_dir(name), a.rank, torch.float32), name, a.seq, a.bs,
                                   a.steps, a.warmup, bf16=False)
        ref["max_loss_diff"] = round(max(abs(x - y) for x, y in zip(ref["losses"], plain[name]["losses"])), 5)
        print(json.dumps({"shape": name, "recipe": "fp32-reference", **ref}), flush=True)
    for variant in a.variants.split(","):
        opts = variant_options(variant)
        for name in a.shapes.split(","):
            path, base = model_dir(name), plain[name]
            try:
                r = measure(lambda: project_recipe(path, a.rank, **opts), name, a.seq, a.bs, a.steps, a.warmup)
            except Exception as exc:  # report and go on (e.g. out of memory without checkpointing)
                print(json.dumps({"shape": name, "recipe": f"qlora-flow[{variant}]", "error": repr(exc)[:400]}))
                continue
            r["speed_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["memory_ratio"] = round(r["peak_gib"] / base["peak_gib"], 3)
            r["max_loss_diff"] = round(max(abs(x - y) for x, y in zip(r["losses"], base["losses"])), 5)
            if name in refs:
                r["max_loss_diff_vs_fp32"] = round(max(abs(x - y) for x, y in zip(r["losses"], refs[name]["losses"])), 5)
            print(json.dumps({"shape": name, "recipe": f"qlora-flow[{variant}]", **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
