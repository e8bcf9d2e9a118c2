"""GPU benchmark: the plain Hugging Face QLoRA recipe, this project's training path and
Unsloth, in ONE invocation on one GPU, on the same model, data, batch and LoRA settings (r=16
on all linear layers, dropout 0: Unsloth's fast path needs it). The model is a random-weight
model of a shape in bench/models.SHAPES (--shapes: Llama shapes, and Qwen3-8B, Gemma-2-9B,
Gemma-3-12B/4B text, Phi-3-mini/medium of their real configs), or a local checkpoint measured
as it is (--model-dir); every recipe reads the architecture from config.json's model_type.

Prints one JSON line per (shape, recipe): tokens/s (median of the timed steps after warm-up),
peak GPU memory, MFU (4N FLOPs a token, as in ../shared/bench), every step's loss, the ratios
to the plain recipe and to Unsloth, and the largest loss difference to an all-fp32 reference
(the plain recipe with fp32 compute on the same 4-bit weights), then a table. Skips (exit 0)
without CUDA.

    python bench/gpu_qlora_bench.py --shapes llama-1b --steps 20 --warmup 2 --reference llama-1b \
        --variants auto --unsloth .usite.tgz --out bench/results/NAME
    python bench/gpu_qlora_bench.py --model-dir /models/Mistral-7B-v0.3 --steps 10 --variants auto

The plain recipe is the one in ../shared/bench/plain_hf_qlora_reference.py: NF4 double
quant, bf16 compute, gradient checkpointing, paged AdamW 32-bit, sdpa. The project recipe
builds the model with tasks.model.loading / tasks.train / tasks.fast (the code `qlora run` trains
with): variant `auto` is train.speed: auto (the fast path on CUDA), its '+'-joined parts change
fields of its Plan (tasks/fast/plan.py; see --variants), other variants name the train.* flags of
train.speed: off (e.g. liger+gc+mixed). Unsloth runs in a subprocess of its
own (it patches transformers and peft for the whole process): bench/unsloth_reference.py,
a copy of ../shared/bench/unsloth_reference.py, with Unsloth from the tarball named by
--unsloth (../shared/bench/README.md says how it is built). Peak memory is each recipe's own:
the previous recipe's model is collected first and anything still held is subtracted
(printed as leftover_gib).

--packing SHAPE instead compares, on the Alpaca sample, the plain recipe with dynamic padding
and this project's path with packing, with the same examples in every optimizer step
(--examples-per-step), and prints both non-pad tokens/s figures and their ratio.
--long-context SHAPE searches the longest sequence each recipe trains at batch 1
(bench/long_context.py: doubling, then bisecting; every trial in a worker process, a new one
after an out-of-memory), printing tokens/s at that length:

    python bench/gpu_qlora_bench.py --long-context llama-8b --unsloth .usite.tgz --out OUT/long

--memory-trace writes what is allocated at each project variant's peak. On a device machine:
bench/device_setup.sh (wheels, and the Alpaca sample where bench/models.alpaca_sample looks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_summary  # noqa: E402

from bench.models import SHAPES, flops_per_token, model_dir, shape_config  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
FAST = ("auto", "lean", "offload")  # train.speed settings of the fast path


def checkpoint(name: str) -> str:
    """A local checkpoint directory as it is, or a shape of bench/models.SHAPES (random weights)."""
    return name if (Path(name) / "config.json").exists() else model_dir(name)


def plain_recipe(path: str, rank: int, dtype: torch.dtype = torch.bfloat16, dropout: float = 0.0):
    """Verbatim the seeds' recipe: transformers + peft + bitsandbytes. dtype=float32 makes it
    the fp32 reference: every computation in fp32 on the same 4-bit weights, what the bf16
    recipes approximate (slow; for loss curves only)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention_of(path), device_map={"": 0}, quantization_config=q
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    torch.manual_seed(1)
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=dropout,
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, opt, contextlib.nullcontext()


def attention_of(path: str) -> str:
    """sdpa, as the seeds' recipe, or eager for a family whose model class has no sdpa path
    (Gemma 2: its attention logits are soft-capped), as transformers itself then picks."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path)
    return "sdpa" if getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", True) else "eager"


# Variant parts that change one or more fields of the Plan (tasks/fast/plan.py); splitN, padkN
# and budgetNN take a number (see --variants)
PLAN_PARTS = {
    "nocompile": {"compile": False},
    "bnb": {"nf4_traced": False},
    "offload": {"offload": True},
    "fused": {"fused_projections": True},
    "nofused": {"fused_projections": False},
    "onegraph": {"split": 0},
    "adamw": {"optimizer": "adamw"},
    "flat": {"optimizer": "paged_adamw_32bit_flat"},
    "perparam": {"optimizer": "paged_adamw_32bit"},
    "ingemm": {"adapters_in_gemm": "shared"},
    "ingemmall": {"adapters_in_gemm": "all"},
    "adaptersapart": {"adapters_in_gemm": "none"},
    "fp32res": {"residual": "fp32"},
    "bf16res": {"residual": "bf16"},
    "notriton": {"triton": False},
    "noswiglu": {"swiglu_kernel": False},
    "torchcheckpoint": {"checkpoint": "torch"},
    "cse": {"partitioner_cse": True, "activation_memory_budget": 1.0},  # torch's own partitioner settings
    "nobudget": {"activation_memory_budget": 1.0},
    "noliger": {"liger": False},  # the head's full logits and the model's own loss instead of Liger's
}


def variant_plan(variant: str, plan):
    """The Plan of a variant: train.speed's plan with the fields its '+'-joined parts name changed."""
    changes = {}
    for part in variant.split("+")[1:]:
        if part in PLAN_PARTS:
            changes.update(PLAN_PARTS[part])
        elif part.startswith("split"):  # auto+split3: two halves, the MLP's backward in 3 token chunks
            changes["split"] = int(part[5:] or 2)
        elif part.startswith("padk"):  # auto+padk1: no padding
            changes["pad_k"] = int(part[4:])
        elif part.startswith("budget"):  # auto+budget80: activation_memory_budget 0.8
            changes["activation_memory_budget"] = int(part[6:]) / 100
    return dataclasses.replace(plan, **changes)


def project_recipe(path: str, rank: int, variant: str, dropout: float = 0.0):
    """The project's path: tasks.model.loading.load_base, tasks.train.add_lora/make_optimizer, and
    tasks.fast for the plan of train.speed (variant 'auto', its parts changing the Plan) or of
    the train.* flags, for the checkpoint's own architecture (config.json's model_type)."""
    from tasks.config import LoraSection, ModelConfig, QuantConfig, TrainConfig
    from tasks.fast import patch
    from tasks.fast import plan as fast_plan
    from tasks.model.loading import load_base
    from tasks.train import add_lora, apply_speedups, make_optimizer

    device = torch.device("cuda")
    model_type = shape_config(path)["model_type"]
    t = TrainConfig(lr=2e-4, optimizer="auto", **variant_options(variant))
    plan = variant_plan(variant, fast_plan.choose(t, device, "causal_lm", model_type, quantized=True))
    torch._dynamo.reset()  # each variant traces its own graphs
    scope = contextlib.ExitStack()
    patches = scope.enter_context(patch.scoped(model_type, plan))
    if plan.liger and not plan.fast:
        apply_speedups(model_type, t, device)
    model = load_base("causal_lm", path, ModelConfig(name=path, prefer_embedded=False), QuantConfig(), device)
    torch.manual_seed(1)
    t_model = t.model_copy(update={"precision": plan.precision, "gradient_checkpointing": plan.gradient_checkpointing})
    model = add_lora(model, LoraSection(r=rank, alpha=2 * rank, dropout=dropout), "causal_lm", t_model, torch.bfloat16)
    applied = patches.apply(model, plan, random=dropout > 0) if plan.fast else {}
    print(
        json.dumps({"variant": variant, "model_type": model_type, "plan": plan.describe(), "applied": applied}),
        flush=True,
    )
    opt, _ = make_optimizer(
        [p for p in model.parameters() if p.requires_grad], t.model_copy(update={"optimizer": plan.optimizer}), device
    )
    return model, opt, scope


def variant_options(variant: str) -> dict:
    """'liger+gc+mixed+skip4' -> TrainConfig fields (train.speed: off); 'auto...' -> speed: auto
    (lean..., offload...: those train.speed settings)."""
    if variant.startswith(FAST):
        return {"speed": variant.split("+")[0]}
    parts = variant.split("+")
    skip = [int(p[4:]) for p in parts if p.startswith("skip")]
    from tasks.config import TrainConfig

    modes = typing.get_args(TrainConfig.model_fields["precision"].annotation)
    precision = next((p for p in parts if p in modes), TrainConfig.model_fields["precision"].default)
    return dict(
        speed="off",
        liger_kernels="liger" in parts,
        gradient_checkpointing="gc" in parts,
        precision=precision,
        gradient_checkpointing_skip_last=skip[0] if skip else 0,
    )


def measure(
    build,
    config: dict,
    seq: int,
    bs: int,
    steps: int,
    warmup: int,
    bf16: bool = True,
    profile: str = "",
    memory_trace: str = "",
) -> dict:
    gc.collect()  # an earlier recipe's model is cyclic garbage until collected
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated()  # anything an earlier recipe still holds
    model, opt, scope = build()
    with scope:  # the project's patches end here (tasks.fast.patch.scoped)
        model.train()
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, config["vocab_size"], (bs, seq), device="cuda", generator=g)

        def forward_loss():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                return model(input_ids=ids, labels=ids).loss

        def step():
            loss = forward_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        times, losses = [], []
        for _ in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(round(loss.item(), 5))
        peak_bytes = torch.cuda.max_memory_allocated()
        # Where the peak is: one more step, with the peak read after its forward and its backward.
        torch.cuda.synchronize()
        rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        forward_peak = torch.cuda.max_memory_allocated()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        backward_peak = torch.cuda.max_memory_allocated()
        peak_bytes = max(peak_bytes, backward_peak)
        where = {
            k: round((v - leftover) / 2**30, 2)
            for k, v in (("rest_gib", rest), ("forward_peak_gib", forward_peak), ("step_peak_gib", backward_peak))
        }
        table = (
            profile_summary.profile_steps(lambda: profile_summary.annotated_step(forward_loss, opt), 2, profile, model)
            if profile
            else None
        )
        if memory_trace:
            peak_allocations(step, memory_trace)
        del model, opt, loss  # the last loss holds the graph's nodes, and through them the model
    med = sorted(times[warmup:])[len(times[warmup:]) // 2]
    tok_s = bs * seq / med
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 989e12)
    out = {
        "tokens_per_s": round(tok_s, 1),
        "peak_gib": round((peak_bytes - leftover) / 2**30, 2),
        "leftover_gib": round(leftover / 2**30, 2),
        "mfu": round(tok_s * flops_per_token(config, seq) / peak, 4),
        "median_step_s": round(med, 4),
        "first_step_s": round(times[0], 2),
        **where,
        "losses": losses,
    }
    if table:
        out["profile"] = table
    gc.collect()
    torch.cuda.empty_cache()
    return out


def peak_allocations(step, path: str, rows: int = 40) -> None:
    """What is allocated at the step's peak, beyond what was allocated before it: the CUDA
    allocator's history over one step, replayed to its highest point; each live block with
    its size and the Python lines that allocated it (Inductor's generated code included)."""
    import linecache

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    except Exception as exc:  # the recorder can fail inside torch's non-reentrant checkpoint (SystemError)
        print(json.dumps({"memory_trace_error": repr(exc)[:300]}), flush=True)
        return
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snap["device_traces"][0] if e["action"] in ("alloc", "free_requested")]
    live, now, peak, at = {}, 0, 0, 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif live.pop(e["addr"], None) is not None:
            now -= e["size"]
        if now > peak:
            peak, at = now, i
    live = {}
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)

    def where(e) -> str:
        frames = [f for f in e.get("frames", []) if "/torch/" not in f["filename"] or "torchinductor" in f["filename"]]
        out = []
        for f in frames[:3]:
            src = linecache.getline(f["filename"], f["line"]).strip()[:110]
            out.append(f"{Path(f['filename']).name}:{f['line']} {f['name']}: {src}")
        return " <- ".join(out)

    blocks = sorted(live.values(), key=lambda e: -e["size"])
    lines = [
        f"peak over the step's start: {peak / 2**30:.3f} GiB at event {at} of {len(events)}; {len(blocks)} blocks live"
    ]
    for e in blocks[:rows]:
        lines.append(f"{e['size'] / 2**20:9.1f} MiB  {where(e)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:16]), flush=True)


def unsloth(
    name: str, seq: int, bs: int, steps: int, warmup: int, rank: int, tarball: str, gc_mode: str, profile: str = ""
) -> dict:
    """Unsloth's step (bench/unsloth_reference.py) in a process of its own, from the tarball."""
    site = unsloth_site(tarball)
    path = checkpoint(name)  # the same weights (and directory) as the other recipes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cmd = (
        [
            sys.executable,
            str(Path(__file__).with_name("unsloth_reference.py")),
            "--shape",
            name,
            "--seq",
            str(seq),
            "--bs",
            str(bs),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--rank",
            str(rank),
            "--gc",
            gc_mode,
            "--dropout",
            "0",
        ]
        + (["--profile", profile] if profile else [])
        + (["--model-dir", path] if path == name else [])
    )  # a local checkpoint, with its own tokenizer
    gc.collect()
    torch.cuda.empty_cache()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        return {"error": (proc.stdout + proc.stderr)[-1500:]}
    row = rows[-1]
    return {
        "tokens_per_s": row["tokens_per_s"],
        "peak_gib": row["peak_gib"],
        "mfu": row["mfu"],
        "median_step_s": row["median_step_s"],
        "losses": row["losses"],
        "unsloth": row.get("unsloth"),
        **({"profile": row["profile"]} if "profile" in row else {}),
    }


def unsloth_site(tarball: str) -> Path:
    """Unsloth and its dependencies from the tarball (../shared/bench/README.md), unpacked once."""
    site = Path("/tmp/usite")
    if not (site / "unsloth").exists():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", tarball, "-C", str(site)], check=True)
    return site


def trial_worker(name: str, rank: int, variant: str) -> int:
    """--trial-worker: the project's recipe (variant) loaded once, then trained at batch 1 at each
    length read from stdin (bench/long_context.py)."""
    from bench import long_context

    path = checkpoint(name)
    model, opt, scope = project_recipe(path, rank, variant)
    with scope:
        model.train()

        def step(ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return long_context.serve(step, shape_config(path)["vocab_size"])


def long_context_search(name: str, a, emit) -> None:
    """--long-context: for each recipe of --long-recipes, the longest length that trains at batch 1
    (bench/long_context.search), its tokens/s and peak memory, one JSON line each, then a table."""
    from bench import long_context

    path = checkpoint(name)  # written once, before any worker reads it
    here = Path(__file__).resolve()
    results, end = [], time.monotonic() + a.long_budget
    recipes = [r for r in a.long_recipes.split(",") if r]
    for i, recipe in enumerate(recipes):
        budget = (end - time.monotonic()) / (len(recipes) - i)  # the time left, shared by the recipes left
        if recipe.startswith("unsloth"):
            if not a.unsloth:
                emit({"shape": name, "recipe": recipe, "skipped": "no --unsloth tarball"})
                continue
            mode = recipe.removeprefix("unsloth[gc=").removesuffix("]")
            cmd = [sys.executable, str(here.with_name("unsloth_reference.py")), "--serve", "--shape", name]
            cmd += ["--gc", mode, "--seq", str(a.long_cap), "--rank", str(a.rank), "--dropout", "0"]
            cmd += ["--model-dir", path] if path == name else []
            env = long_context.env_with(str(unsloth_site(a.unsloth)))
        else:
            cmd = [sys.executable, str(here), "--trial-worker", recipe, "--shapes", name, "--rank", str(a.rank)]
            env = dict(os.environ)
        found = long_context.search(cmd, env, a.long_start, a.long_cap, a.long_resolution, a.trial_timeout, budget)
        row = {"shape": name, "recipe": recipe if recipe.startswith("unsloth") else f"qlora-flow[{recipe}]", **found}
        emit({"long_context": True, **row})
        results.append(row)
    cols = ["recipe", "longest_seq", "tokens_per_s_at_longest", "peak_gib_at_longest", "shortest_failing_seq"]
    cols += ["failing_because", "stopped_by", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |", flush=True)


def instruction_frame(seq: int, alpaca: str = "", copies: int = 4):
    """The Alpaca sample (x copies), tokenized as the pipeline does (prompt template, loss on
    answers), with a BPE tokenizer trained offline (no hub): real lengths, real padding."""
    import pandas as pd
    from transformers import AutoTokenizer

    from bench.models import RANDOM_DIR, alpaca_sample, build_tiny_llama
    from tasks.tokenize import encode_instructions

    source = Path(alpaca) if alpaca else alpaca_sample()
    tok_dir = build_tiny_llama(RANDOM_DIR / "tok", source)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = pd.read_json(source)
    rows = pd.concat([rows] * copies, ignore_index=True)
    from datasets import Dataset

    encoded = encode_instructions({c: rows[c].tolist() for c in ("instruction", "input", "output")}, tok, seq, "alpaca")
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["labels"]}), tok.pad_token_id


def measure_data(build, steps: list, warmup: int, warm_shapes: bool) -> dict:
    """Non-pad tokens/s over optimizer steps of real micro-batches. steps: a list of optimizer
    steps, each a list of (micro-batch, real tokens). Each micro-batch's mean loss is weighed
    by its share of the step's label tokens (the trainer's token-normalised loss). The first
    `warmup` steps are not timed; warm_shapes: first run forward + backward once on each
    distinct micro-batch shape (no optimizer step), so that torch.compile's (re)compilations
    for new shapes stay out of the timed steps, as they would in a long run."""
    from tasks.train import loss_units

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated()
    model, opt, scope = build()
    with scope:
        model.train()

        def micro(batch, weight):
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss * weight
            loss.backward()
            return loss.detach()

        if warm_shapes:
            seen = set()
            for group in steps:
                for batch, _ in group:
                    if tuple(batch["input_ids"].shape) not in seen:
                        seen.add(tuple(batch["input_ids"].shape))
                        micro(batch, 1.0)
            opt.zero_grad(set_to_none=True)
        seconds, real_tokens, losses, micro_steps = 0.0, 0, [], 0
        for i, group in enumerate(steps):
            counts = [loss_units(b, "causal_lm") for b, _ in group]  # label tokens, as the trainer counts them
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = sum(micro(b, n / sum(counts)) for (b, _), n in zip(group, counts))
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= warmup:
                seconds += time.perf_counter() - t0
                real_tokens += sum(r for _, r in group)
                micro_steps += len(group)
            losses.append(round(loss.item(), 4))
        peak = torch.cuda.max_memory_allocated()
        del model, opt, loss
    out = {
        "nonpad_tokens_per_s": round(real_tokens / seconds, 1),
        "timed_steps": len(steps) - warmup,
        "micro_batches_per_step": round(micro_steps / (len(steps) - warmup), 2),
        "step_s": round(seconds / (len(steps) - warmup), 3),
        "peak_gib": round((peak - leftover) / 2**30, 2),
        "losses": losses,
    }
    gc.collect()
    torch.cuda.empty_cache()
    return out


def padding_vs_packing(
    name: str,
    seq: int,
    rank: int,
    variant: str,
    per_step: int,
    micro: int,
    rows: int,
    alpaca: str,
    copies: int,
    warmup: int,
) -> list:
    """The plain recipe with dynamic padding (micro-batches of `micro` examples, each padded to
    its longest) vs this project's path with packing (the same examples packed into rows of
    `seq` tokens by tasks.data.batching.pack_bins, micro-batches of `rows` rows), both with the same
    `per_step` examples in each optimizer step, in the same shuffled order."""
    from tasks.data.batching import collate, collate_packed, pack_bins

    frame, pad = instruction_frame(seq, alpaca, copies)
    lengths = [len(x) for x in frame["input_ids"]]
    order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [order[i : i + per_step] for i in range(0, len(order) - per_step + 1, per_step)]  # full steps only
    padded, packed = [], []
    for g in groups:
        step = []
        for i in range(0, len(g), micro):
            b = collate(frame[g[i : i + micro]], pad, "causal_lm")
            step.append((b, int(b["attention_mask"].sum())))
        padded.append(step)
        bins = pack_bins(g, lengths, seq)
        packed.append([collate_packed(frame, bins[i : i + rows], pad) for i in range(0, len(bins), rows)])
    fill_padded = sum(r for s in padded for _, r in s) / sum(b["input_ids"].numel() for s in padded for b, _ in s)
    fill_packed = sum(r for s in packed for _, r in s) / sum(b["input_ids"].numel() for s in packed for b, _ in s)
    data = {
        "shape": name,
        "data": f"alpaca-sample x{copies} ({len(frame)} examples, mean {sum(lengths) / len(lengths):.0f} tokens)",
        "examples_per_step": per_step,
        "steps": len(groups),
    }
    path = checkpoint(name)
    base = measure_data(lambda: plain_recipe(path, rank), padded, warmup, warm_shapes=False)
    rows_out = [
        {
            **data,
            "recipe": "plain-hf, dynamic padding",
            "micro_batch": f"{micro} examples",
            "real_token_share": round(fill_padded, 3),
            **base,
        }
    ]
    print(json.dumps(rows_out[-1]), flush=True)
    proj = measure_data(lambda: project_recipe(path, rank, variant), packed, warmup, warm_shapes=True)
    proj["nonpad_speed_ratio"] = round(proj["nonpad_tokens_per_s"] / base["nonpad_tokens_per_s"], 3)
    rows_out.append(
        {
            **data,
            "recipe": f"qlora-flow[{variant}]+packing",
            "micro_batch": f"{rows} packed rows of <= {seq} tokens",
            "real_token_share": round(fill_packed, 3),
            **proj,
        }
    )
    print(json.dumps(rows_out[-1]), flush=True)
    print(
        f"packing, {name}, {per_step} examples a step: plain + dynamic padding {base['nonpad_tokens_per_s']:,.0f} "
        f"non-pad tokens/s ({base['peak_gib']} GiB), qlora-flow[{variant}] + packing "
        f"{proj['nonpad_tokens_per_s']:,.0f} ({proj['peak_gib']} GiB): {proj['nonpad_speed_ratio']}x",
        flush=True,
    )
    return rows_out


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def max_diff(losses: list, ref: list | None) -> float | None:
    return round(max(abs(x - y) for x, y in zip(losses, ref)), 5) if ref else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes", default="llama-1b,llama-8b", help=f"shapes of random-weight models: {', '.join(SHAPES)}"
    )
    ap.add_argument(
        "--model-dir",
        default="",
        help="local checkpoint directories (comma-separated) measured as they are "
        "instead of --shapes (config.json's model_type picks the code)",
    )
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--variants",
        default="auto",
        help="project variants, comma-separated: auto, lean, offload (train.speed); auto+nocompile, auto+bnb "
        "leave one lever out: compilation, the traced 4-bit layers; auto+adamw: fused AdamW "
        "instead of paged AdamW 32-bit; auto+flat / auto+perparam: paged AdamW 32-bit over one flat buffer / per tensor; "
        "auto+splitN: decoder layers as two compiled halves, MLP backward in N token chunks; "
        "auto+onegraph: one compiled graph per layer; auto+offload: layer inputs in host memory; "
        "auto+cse, auto+nobudget: partitioner settings; auto+nofused: q/k/v and gate/up as separate GEMMs; "
        "auto+notriton: the NF4 dequantization as tensor code instead of tasks/fast/ops/nf4_triton.py; "
        "auto+ingemm / auto+ingemmall: train.adapters_in_gemm, the LoRA B's inside the base GEMMs of q/k/v "
        "and gate/up / of o and down too (gate/up's stay in the SwiGLU kernel unless auto+noswiglu: "
        "then they are added to the base output apart, in the next elementwise kernel); auto+padkN: their K padded to a multiple of N (default 64); "
        "auto+budgetNN: the partitioner's activation_memory_budget NN/100; auto+fp32res / auto+bf16res: the residual "
        "stream between layers in fp32 (inputs checkpointed in bf16; train.fp32_residual) / in bf16; "
        "auto+torchcheckpoint: whole layers checkpointed by torch's checkpoint instead of "
        "tasks/fast/ops/layer_checkpoint.py), or train.speed: off with '+'-joined flags from: liger, gc, skipN "
        "(train.gradient_checkpointing_skip_last), fp32_upcast|mixed|bf16 (train.precision)",
    )
    ap.add_argument("--reference", default="", help="shapes that also get the fp32-compute reference's losses")
    ap.add_argument("--unsloth", default="", help="Unsloth tarball (.usite.tgz); empty: no Unsloth run")
    ap.add_argument("--unsloth-gc", default="true", help="true (recompute on the GPU) or unsloth (offloaded), or both")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain recipe (no ratios to it)")
    ap.add_argument(
        "--profile",
        default="",
        help="folder: each recipe's step profiled (torch.profiler, 2 steps) and "
        "summarised by kind of kernel (bench/profile_summary.py), ms per step, Unsloth's too; "
        "writes profile_SHAPE.json and .txt there",
    )
    ap.add_argument("--out", default="", help="write the JSON lines to OUT.jsonl as well")
    ap.add_argument(
        "--packing",
        default="",
        help="shapes or checkpoint directories for the real-data run: padding vs packing (no other runs)",
    )
    ap.add_argument("--alpaca", default="", help="the Alpaca sample's JSON (default: bench/models.alpaca_sample())")
    ap.add_argument("--copies", type=int, default=4, help="packing run: the sample repeated this many times")
    ap.add_argument("--examples-per-step", type=int, default=48, help="packing run: examples per optimizer step")
    ap.add_argument("--micro", type=int, default=4, help="packing run: plain recipe's examples per micro-batch")
    ap.add_argument("--pack-rows", type=int, default=4, help="packing run: packed rows per micro-batch")
    ap.add_argument("--memory-trace", default="", help="folder for each project variant's live blocks at its peak")
    ap.add_argument(
        "--reference-losses",
        default="",
        help="a .jsonl of an earlier run of this bench holding the fp32-reference row for the shape "
        "(same seed, data and steps), instead of running it again",
    )
    ap.add_argument(
        "--long-context",
        default="",
        help="a shape or checkpoint: the longest sequence each of --long-recipes trains at batch 1, "
        "doubling from --long-start up to --long-cap, then bisecting to --long-resolution tokens, each "
        "recipe in worker processes (bench/long_context.py); no other runs",
    )
    ap.add_argument(
        "--long-recipes",
        default="auto,offload,unsloth[gc=true],unsloth[gc=unsloth]",
        help="project variants (as --variants) and unsloth[gc=true] (recompute on the GPU) / "
        "unsloth[gc=unsloth] (offloaded checkpointing; both need --unsloth)",
    )
    ap.add_argument("--long-start", type=int, default=16384, help="the first length tried")
    ap.add_argument("--long-cap", type=int, default=131072, help="no length beyond this is tried")
    ap.add_argument("--long-resolution", type=int, default=4096, help="bisection stops at this gap")
    ap.add_argument("--trial-timeout", type=float, default=240, help="seconds a trial (load, 2 steps) may take")
    ap.add_argument(
        "--long-budget",
        type=float,
        default=1200,
        help="seconds the searches may start trials in, shared by the recipes (a trial started runs to its end)",
    )
    ap.add_argument("--trial-worker", default="", help=argparse.SUPPRESS)  # bench/long_context.py's worker
    a = ap.parse_args()
    if a.trial_worker:
        return trial_worker(a.shapes.split(",")[0], a.rank, a.trial_worker)
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return 0
    out = open(a.out + ".jsonl", "a") if a.out else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv)})
    if a.long_context:
        long_context_search(a.long_context, a, emit)
        return 0
    if a.packing:  # padding vs packing on real instruction data
        for name in a.packing.split(","):
            for row in padding_vs_packing(
                name,
                a.seq,
                a.rank,
                a.variants.split(",")[0],
                a.examples_per_step,
                a.micro,
                a.pack_rows,
                a.alpaca,
                a.copies,
                warmup=1,
            ):
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        return 0
    results = []
    for name in (a.model_dir or a.shapes).split(","):
        path = checkpoint(name)
        config = shape_config(path)
        rows = {}

        def run(recipe: str, build=None, **kw) -> None:
            try:
                r = measure(build, config, a.seq, a.bs, a.steps, a.warmup, **kw) if build else kw["result"]
            except Exception as exc:  # report and go on (e.g. out of memory)
                traceback.print_exc()
                r = {"error": repr(exc)[:600]}
            rows[recipe] = r
            emit({"shape": name, "recipe": recipe, **r})

        if not a.no_plain:
            run("plain-hf", lambda: plain_recipe(path, a.rank))
        if a.unsloth:
            for mode in ["true", "unsloth"] if a.unsloth_gc == "both" else [a.unsloth_gc]:
                trace = f"/tmp/trace_{name}_unsloth_{mode}.json" if a.profile else ""
                run(
                    f"unsloth[gc={mode}]",
                    result=unsloth(name, a.seq, a.bs, a.steps, a.warmup, a.rank, a.unsloth, mode, trace),
                )
        for variant in filter(None, a.variants.split(",")):
            prof = f"/tmp/trace_{name}_{variant.replace('+', '-')}.json" if a.profile else ""
            trace = f"{a.memory_trace}/peak_{name}_{variant.replace('+', '-')}.txt" if a.memory_trace else ""
            run(
                f"qlora-flow[{variant}]",
                lambda: project_recipe(path, a.rank, variant),
                profile=prof,
                memory_trace=trace,
            )
        if name in a.reference.split(","):  # last (slow); for the loss curves only: its speed is not the point
            run("fp32-reference", lambda: plain_recipe(path, a.rank, torch.float32), bf16=False)
        if a.reference_losses and "fp32-reference" not in rows:
            earlier = [
                json.loads(line) for line in Path(a.reference_losses).read_text().splitlines() if line.startswith("{")
            ]
            ref_row = next(
                (
                    r
                    for r in earlier
                    if r.get("shape") == name and r.get("recipe") == "fp32-reference" and "losses" in r
                ),
                None,
            )
            if ref_row and len(ref_row["losses"]) == a.warmup + a.steps:
                rows["fp32-reference"] = ref_row
                emit(
                    {
                        "shape": name,
                        "recipe": "fp32-reference",
                        "from": a.reference_losses,
                        "tokens_per_s": ref_row.get("tokens_per_s"),
                        "losses": ref_row["losses"],
                    }
                )
        profiles = {recipe: r["profile"] for recipe, r in rows.items() if isinstance(r.get("profile"), dict)}
        if profiles:
            Path(a.profile).mkdir(parents=True, exist_ok=True)
            Path(f"{a.profile}/profile_{name}.json").write_text(
                json.dumps(
                    {
                        "command": " ".join(sys.argv),
                        "gpu": torch.cuda.get_device_name(0),
                        "shape": name,
                        "profiles": profiles,
                    },
                    indent=1,
                )
            )
            text = f"{name}, ms per step by kind of GPU work (2 profiled steps each)\n" + profile_summary.table(
                profiles
            )
            Path(f"{a.profile}/profile_{name}.txt").write_text(text + "\n")
            print(text, flush=True)
        plain = rows.get("plain-hf", {})
        ref = rows.get("fp32-reference", {}).get("losses")
        for recipe, r in rows.items():
            if "error" in r or recipe == "fp32-reference":
                continue
            # Unsloth of the same checkpointing class: offloaded against its offloaded, else recompute on the GPU
            offloaded = "offload" in recipe or recipe == "unsloth[gc=unsloth]"
            uns = rows.get("unsloth[gc=unsloth]" if offloaded else "unsloth[gc=true]", {})
            summary = {
                "shape": name,
                "recipe": recipe,
                "tokens_per_s": r["tokens_per_s"],
                "peak_gib": r["peak_gib"],
                "mfu": r["mfu"],
                "vs_plain": ratio(r["tokens_per_s"], plain.get("tokens_per_s")),
                "memory_vs_plain": ratio(r["peak_gib"], plain.get("peak_gib")),
                "vs_unsloth": ratio(r["tokens_per_s"], uns.get("tokens_per_s")),
                "memory_vs_unsloth": ratio(r["peak_gib"], uns.get("peak_gib")),
                "max_loss_diff_vs_fp32": max_diff(r["losses"], ref),
                "max_loss_diff_vs_plain": max_diff(r["losses"], plain.get("losses")),
                "steps": len(r["losses"]),
            }
            results.append(summary)
            emit({"summary": True, **summary})
    print_table(results)
    return 0


def print_table(results: list) -> None:
    cols = [
        "shape",
        "recipe",
        "tokens_per_s",
        "peak_gib",
        "mfu",
        "vs_plain",
        "memory_vs_plain",
        "vs_unsloth",
        "memory_vs_unsloth",
        "max_loss_diff_vs_fp32",
        "max_loss_diff_vs_plain",
        "steps",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
