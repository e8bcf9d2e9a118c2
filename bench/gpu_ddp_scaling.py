"""Data-parallel scaling of the project's trainer (tasks.train under torchrun): the same
instruction data and model shape on 1 and on N GPUs; prints global non-pad tokens/s and
the scaling factor. Skips (exit 0) with fewer than 2 GPUs.

    python bench/gpu_ddp_scaling.py --shape llama-1b --gpus 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402


def params_for(model_path: str, steps: int):
    from tasks.config import Params
    from tests.conftest import ALPACA, repo_params
    return Params.model_validate(repo_params(
        task="causal_lm", data={"path": str(ALPACA), "label_names": None}, model={"name": model_path},
        tokenize={"max_length": 2048},
        train={"max_steps": steps, "batch_size": 1, "packing": True, "liger_kernels": True, "device": "cuda",
               "gradient_checkpointing": True, "checkpoint_every": 0, "warmup_ratio": 0.0}))


def prepare(root: Path, shape: str, steps: int) -> None:
    import pandas as pd
    from gpu_qlora_bench import model_dir
    from tasks import quantize, tokenize
    from tests.conftest import ALPACA
    from tests.tiny_llm import build_tiny_llama
    from transformers import AutoTokenizer
    path = model_dir(shape)
    AutoTokenizer.from_pretrained(build_tiny_llama(root / "tok", ALPACA)).save_pretrained(path)
    rows = pd.concat([pd.read_json(ALPACA)] * 8, ignore_index=True)
    rows["instruction"] = rows["instruction"] + " #" + rows.index.astype(str)  # distinct examples
    rows["row"] = [str(i) for i in range(len(rows))]
    (root / "data/split").mkdir(parents=True, exist_ok=True)
    (root / "data/validated").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows.iloc[:-16]), ("validation", rows.iloc[-16:-8]), ("test", rows.iloc[-8:])):
        part.to_json(root / f"data/split/{name}.jsonl", orient="records", lines=True)
    (root / "data/validated/labels.json").write_text('{"names": []}')
    p = params_for(path, steps)
    tokenize.run(p, root)
    quantize.run(p, root)
    (root / "bench.json").write_text(json.dumps({"model": path}))


def train_only(root: Path, steps: int) -> None:
    from tasks import train
    res = train.run(params_for(json.loads((root / "bench.json").read_text())["model"], steps), root)
    if int(os.environ.get("RANK", "0")) == 0:
        print("SUMMARY " + json.dumps(res.summary), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--root", default="/tmp/qlora-ddp")
    ap.add_argument("--train-only", action="store_true")
    a = ap.parse_args()
    root = Path(a.root)
    if a.train_only:
        train_only(root, a.steps)
        return 0
    if torch.cuda.device_count() < 2:
        print(json.dumps({"skipped": f"needs 2+ GPUs, found {torch.cuda.device_count()}"}))
        return 0
    prepare(root, a.shape, a.steps)
    results = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for n in (1, a.gpus):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            __file__, "--train-only", "--root", str(root), "--steps", str(a.steps)],
                           capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("SUMMARY ")), None)
        if line is None:
            print(json.dumps({"gpus": n, "error": (p.stdout + p.stderr)[-2000:]}), flush=True)
            return 1
        s = json.loads(line[len("SUMMARY "):])
        results[n] = s
        files = sorted(f.name for f in (root / "models/adapter").iterdir())
        print(json.dumps({"shape": a.shape, "gpus": n, "world_size": s["world_size"], "steps": s["steps"],
                          "nonpad_tokens_per_s_after_warmup": s["tokens_per_second_after_warmup"],
                          "train_seconds": s["train_seconds"],
                          "final_loss": s["final_loss"], "adapter_files": files}), flush=True)
    print(json.dumps({"shape": a.shape, "scaling": round(results[a.gpus]["tokens_per_second_after_warmup"]
                                                         / results[1]["tokens_per_second_after_warmup"], 3),
                      "ideal": a.gpus}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
