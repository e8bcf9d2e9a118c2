"""Multi-GPU scaling of the project's trainer (tasks.train under torchrun), in ONE invocation.

1. DDP with full batches (weak scaling): the --ddp-shape model (llama-8b), packed rows of
   --seq tokens (2048), --batch rows a GPU a micro-step (4) and --accum micro-steps an
   optimizer step (2: DDP's no_sync on the first), train.strategy ddp, on 1 GPU and on each
   N of --gpus (2,4) that the machine has. Prints non-pad tokens/s after warm-up (all GPUs),
   peak memory of each GPU, and the scaling ratio tokens/s(N) / tokens/s(1) (ideal N).
2. FSDP (train.strategy fsdp, tasks/distributed/sharding.py): the --fsdp-shape model (llama-70b, random
   weights written directly in 4-bit by bench/random_4bit.py, so the 140 GB bf16 model never
   exists) on --fsdp-gpus (2) GPUs, --fsdp-batch rows a GPU at --seq, gradient checkpointing:
   tokens/s, peak memory per GPU, the loss of every step, and with --fsdp-reference the loss
   curve of one GPU training the same global batch (fsdp-batch x N rows a step, the same rows:
   where the 4-bit model fits one GPU, ~40 GB for 70B) and the largest difference.

Every run is a fresh `torchrun --standalone --nproc_per_node N` of this file (--train-only),
each rank printing its peak memory. A part that needs more GPUs than present is reported as
skipped; with fewer than 2 GPUs the whole benchmark skips (exit 0, one JSON line).

    python bench/gpu_ddp_scaling.py                       # DDP 8B on 1/2/4 GPUs, then FSDP 70B on 2
    python bench/gpu_ddp_scaling.py --parts fsdp --fsdp-gpus 4 --fsdp-shape llama-70b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.models import SHAPES, alpaca_sample, build_tiny_llama, model_dir  # noqa: E402
from bench.random_4bit import save_random_4bit_llama  # noqa: E402


def params_for(root: Path, train: dict):
    """The project's params.yaml with the benchmark's settings, set as `qlora run --set` sets them."""
    from tasks.config import load_params

    sections = {
        "task": "causal_lm",
        "data.path": str(root / "alpaca_x64.json"),
        "data.format": "auto",
        "data.label_names": None,
        "data.label_base": 0,
        "model.name": str(root / "tokenizer"),
        "tokenize.max_length": train.pop("seq"),
        **{f"lora.{k}": v for k, v in {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}.items()},
        **{
            f"train.{k}": v
            for k, v in {
                "packing": True,
                "device": "cuda",
                "gradient_checkpointing": True,
                "checkpoint_every": 0,
                "warmup_ratio": 0.0,
                "lr": 1e-4,
                **train,
            }.items()
        },
    }
    return load_params(REPO / "params.yaml", [f"{key}={json.dumps(value)}" for key, value in sections.items()])


def prepare_data(root: Path, seq: int) -> None:
    """Alpaca sample x 64 (distinct instructions), through the project's validate, split and
    tokenize stages, for packing into rows of seq tokens."""
    import pandas as pd
    from transformers import AutoTokenizer

    from tasks import split, tokenize, validate

    if (root / "data/tokenized").exists():
        return
    alpaca = alpaca_sample()
    AutoTokenizer.from_pretrained(build_tiny_llama(root / "tiny", alpaca)).save_pretrained(root / "tokenizer")
    rows = pd.concat([pd.read_json(alpaca)] * 64, ignore_index=True)
    rows["instruction"] = rows["instruction"] + " #" + rows.index.astype(str)
    rows.to_json(root / "alpaca_x64.json", orient="records")
    p = params_for(root, {"seq": seq})
    for stage in (validate, split, tokenize):
        stage.run(p, root)


def prepare_base(root: Path, shape: str, seq: int, strategy: str) -> Path:
    """root/<shape>/models/base: the 4-bit base (uint8-stored for DDP, as the quantize stage
    does by default; bf16-stored for FSDP), with the data of root linked in."""
    run_root = root / f"{shape}-{strategy}"
    base = run_root / "models/base"
    if not (base / "config.json").exists():
        shutil.rmtree(run_root, ignore_errors=True)
        if strategy == "fsdp":
            save_random_4bit_llama(base, shape, device="cuda")
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(base)
            (base / "lineage.json").write_text(
                json.dumps(
                    {  # what the quantize stage records (the card reads it)
                        "base_model": f"random {shape}",
                        "base_model_source": "bench/random_4bit.py",
                        "base_model_revision": "seed 0",
                        "quant": {
                            "quant_type": "nf4",
                            "double_quant": True,
                            "compute_dtype": "bfloat16",
                            "quant_storage": "bfloat16",
                        },
                        "task": "causal_lm",
                    }
                )
            )
        else:
            from tasks import quantize

            raw = Path(model_dir(shape))  # random bf16 weights of the shape
            shutil.copytree(root / "tokenizer", raw, dirs_exist_ok=True)
            p = params_for(root, {"seq": seq, "strategy": strategy})
            p = p.model_copy(update={"model": p.model.model_copy(update={"name": str(raw)})})
            quantize.run(p, run_root)
    for d in ("data",):
        if not (run_root / d).exists():
            (run_root / d).symlink_to(root / d)
    return run_root


def train_only(root: Path, train: dict) -> None:
    from tasks import train as trainer

    res = trainer.run(params_for(root, train), root)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    print(
        "PEAK "
        + json.dumps(
            {
                "rank": int(os.environ.get("RANK", "0")),
                "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
            }
        ),
        flush=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print("SUMMARY " + json.dumps(res.summary), flush=True)


def launch(run_root: Path, n: int, train: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            __file__,
            "--train-only",
            "--root",
            str(run_root),
            "--train",
            json.dumps(train),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = p.stdout.splitlines()
    summary = next((json.loads(x[8:]) for x in lines if x.startswith("SUMMARY ")), None)
    if p.returncode != 0 or summary is None:
        return {"error": (p.stdout + p.stderr)[-3000:]}
    import pandas as pd

    peaks = sorted((json.loads(x[5:]) for x in lines if x.startswith("PEAK ")), key=lambda r: r["rank"])
    loss = pd.read_csv(run_root / "reports/train/loss.csv")["loss"].tolist()
    return {
        "summary": summary,
        "peak_gib_per_gpu": [r["peak_gib"] for r in peaks],
        "reserved_gib_per_gpu": [r["reserved_gib"] for r in peaks],
        "loss": loss,
        "adapter_files": sorted(f.name for f in (run_root / "models/adapter").iterdir()),
    }


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def ddp_part(a, root: Path, have: int) -> bool:
    run_root = prepare_base(root, a.ddp_shape, a.seq, "ddp")
    train = {
        "seq": a.seq,
        "max_steps": a.steps,
        "batch_size": a.batch,
        "grad_accum": a.accum,
        "log_every": a.steps,
        "strategy": "ddp",
        "speed": "auto",
    }
    base = None
    for n in [1] + [g for g in a.gpus if g > 1]:
        if n > have:
            emit({"part": "ddp", "shape": a.ddp_shape, "gpus": n, "skipped": f"needs {n} GPUs, found {have}"})
            continue
        r = launch(run_root, n, dict(train))
        if "error" in r:
            emit({"part": "ddp", "shape": a.ddp_shape, "gpus": n, **r})
            return False
        s = r["summary"]
        tps = s["tokens_per_second_after_warmup"]
        base = tps if n == 1 else base
        emit(
            {
                "part": "ddp",
                "shape": a.ddp_shape,
                "gpus": n,
                "strategy": s["strategy"],
                "world_size": s["world_size"],
                "rows_per_gpu_per_step": f"{a.batch} x {a.seq} x accum {a.accum}",
                "steps": s["steps"],
                "nonpad_tokens_per_s_after_warmup": tps,
                "peak_gib_per_gpu": r["peak_gib_per_gpu"],
                "reserved_gib_per_gpu": r["reserved_gib_per_gpu"],
                "final_loss": s["final_loss"],
                "scaling_vs_1_gpu": round(tps / base, 3) if base else None,
                "ideal": n,
                "adapter_files": r["adapter_files"],
            }
        )
    return True


def fsdp_part(a, root: Path, have: int) -> bool:
    n = a.fsdp_gpus
    if n > have:
        emit({"part": "fsdp", "shape": a.fsdp_shape, "gpus": n, "skipped": f"needs {n} GPUs, found {have}"})
        return True
    run_root = prepare_base(root, a.fsdp_shape, a.seq, "fsdp")
    train = {
        "seq": a.seq,
        "max_steps": a.fsdp_steps,
        "batch_size": a.fsdp_batch,
        "grad_accum": 1,
        "log_every": a.fsdp_steps,
        "strategy": "fsdp",
        "precision": a.fsdp_precision,
        "optimizer": "adamw",
    }  # what FSDP uses; the 1-GPU reference too (auto there: paged AdamW)
    r = launch(run_root, n, dict(train))
    if "error" in r:
        emit({"part": "fsdp", "shape": a.fsdp_shape, "gpus": n, **r})
        return False
    s = r["summary"]
    row = {
        "part": "fsdp",
        "shape": a.fsdp_shape,
        "gpus": n,
        "strategy": s["strategy"],
        "world_size": s["world_size"],
        "rows_per_gpu_per_step": f"{a.fsdp_batch} x {a.seq}",
        "steps": s["steps"],
        "nonpad_tokens_per_s_after_warmup": s["tokens_per_second_after_warmup"],
        "peak_gib_per_gpu": r["peak_gib_per_gpu"],
        "reserved_gib_per_gpu": r["reserved_gib_per_gpu"],
        "base_gib_on_disk": round(
            sum(f.stat().st_size for f in (run_root / "models/base").glob("*.safetensors")) / 2**30, 2
        ),
        "loss": r["loss"],
        "adapter_files": r["adapter_files"],
    }
    if a.fsdp_reference:  # one GPU, the same rows a step: batch x N
        ref = launch(run_root, 1, {**train, "batch_size": a.fsdp_batch * n, "strategy": "ddp"})
        if "error" in ref:
            row["reference_1_gpu"] = {"error": ref["error"][-1500:]}
        else:
            row["reference_1_gpu"] = {
                "loss": ref["loss"],
                "peak_gib": ref["peak_gib_per_gpu"],
                "nonpad_tokens_per_s_after_warmup": ref["summary"]["tokens_per_second_after_warmup"],
            }
            row["max_loss_diff_vs_1_gpu"] = round(max(abs(x - y) for x, y in zip(r["loss"], ref["loss"])), 5)
    emit(row)
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ddp,fsdp")
    ap.add_argument("--ddp-shape", default="llama-8b", help=f"one of {', '.join(SHAPES)}")
    ap.add_argument("--gpus", default="2,4", help="DDP: the GPU counts compared with 1")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="DDP: packed rows a GPU a micro-step")
    ap.add_argument(
        "--accum", type=int, default=2, help="DDP: micro-steps an optimizer step (no_sync on all but the last)"
    )
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--fsdp-shape", default="llama-70b")
    ap.add_argument("--fsdp-gpus", type=int, default=2)
    ap.add_argument("--fsdp-batch", type=int, default=1)
    ap.add_argument("--fsdp-steps", type=int, default=8)
    ap.add_argument("--fsdp-precision", default="fp32_upcast")
    ap.add_argument("--fsdp-reference", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--root", default="/tmp/qlora-multigpu")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--train", default="{}")
    a = ap.parse_args()
    root = Path(a.root)
    if a.train_only:
        train_only(root, json.loads(a.train))
        return 0
    have = torch.cuda.device_count()
    if have < 2:
        emit({"skipped": f"needs 2+ GPUs, found {have}"})
        return 0
    a.gpus = [int(g) for g in a.gpus.split(",") if g]
    parts = a.parts.split(",")
    prepare_data(root, a.seq)
    ok = True
    if "ddp" in parts:
        ok = ddp_part(a, root, have) and ok
    if "fsdp" in parts:
        ok = fsdp_part(a, root, have) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
