"""FSDP (train.strategy: fsdp, tasks/sharding.py) on CPU with gloo process groups.

What these run: the real 4-bit path. The tiny random Llama is quantized by bitsandbytes to
NF4 (double quant) with `quant_storage` bfloat16 (what `quant.quant_storage: auto` gives under
fsdp), and FSDP2's `fully_shard` splits those 4-bit weights, the norms, the LoRA adapters,
their gradients and the AdamW state over 2 processes; bitsandbytes' CPU backend runs the
4-bit matmuls. Nothing here is GPU-specific except NCCL in place of gloo."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tasks import quantize, split, tokenize, train, validate
from tasks.config import Params
from tests.conftest import ALPACA, write_params
from tests.test_causal_lm import causal_params
from tests.tiny_llm import build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def fsdp_params(model_dir: Path, **train_kw) -> dict:
    raw = causal_params(model_dir)
    raw["lora"].update(dropout=0.0)  # the same result on any number of processes, to compare
    raw["train"].update({"max_steps": 4, "batch_size": 2, "grad_accum": 2, "log_every": 1, "checkpoint_every": 0,
                         "strategy": "fsdp", **train_kw})
    return raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project with data and the 4-bit base ready for train (validate ... quantize run once)."""
    root = tmp_path_factory.mktemp("fsdp-prepared")
    raw = fsdp_params(build_tiny_llama(root / "tiny-llama", ALPACA))
    write_params(root, raw)
    params = Params.model_validate(raw)
    for stage in (validate, split, tokenize, quantize):
        stage.run(params, root)
    return root


def project(prepared: Path, dest: Path, **train_kw) -> Path:
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("tiny-llama"))
    raw = fsdp_params(prepared / "tiny-llama", **train_kw)
    write_params(dest, raw)
    return dest


def env() -> dict:
    import os
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def torchrun(root: Path, *args: str, launch=("--standalone", "--nproc_per_node", "2"), timeout=300):
    proc = subprocess.run([*TORCHRUN, *launch, *args], cwd=root, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def stage_train(root: Path, launch=("--standalone", "--nproc_per_node", "2")):
    return torchrun(root, "-m", "flows.cli", "stage", "train", launch=launch)


def adapter(root: Path) -> dict:
    return load_file(root / "models/adapter/adapter_model.safetensors")


def summary(root: Path) -> dict:
    return json.loads((root / "reports/train/summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(prepared, tmp_path_factory) -> Path:
    """`torchrun --standalone --nproc_per_node 2 -m flows.cli stage train` with strategy fsdp."""
    root = project(prepared, tmp_path_factory.mktemp("fsdp") / "p")
    out = stage_train(root).stdout
    assert "train: train.strategy: fsdp, 2 processes; speed: off: FSDP shards" in out, out
    return root


def test_fsdp_saves_the_adapter_of_a_one_process_run_and_trains_as_ddp_does(prepared, fsdp_run, tmp_path):
    """2 gloo processes under FSDP2 train 4 steps (2 micro-batches each: no_sync) and rank 0 saves
    an adapter with the same files, tensor names and shapes as one process; the values equal
    a DDP run's on the same 2 shards (the same training: FSDP only stores it differently)."""
    with safe_open(str(prepared / "models/base/model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert packed.dtype == torch.bfloat16 and packed.shape[1] == 1  # 4-bit, stored so FSDP shards it as bf16
    one = project(prepared, tmp_path / "one")
    train.run(Params.model_validate(fsdp_params(prepared / "tiny-llama")), one)
    ddp = project(prepared, tmp_path / "ddp", strategy="ddp")
    stage_train(ddp)
    s = summary(fsdp_run)
    assert (s["strategy"], s["world_size"], s["steps"], summary(ddp)["strategy"]) == ("fsdp", 2, 4, "ddp")
    assert sorted(p.name for p in (one / "models/adapter").iterdir()) == \
        sorted(p.name for p in (fsdp_run / "models/adapter").iterdir())
    w1, wf, wd = adapter(one), adapter(fsdp_run), adapter(ddp)
    assert w1.keys() == wf.keys() and all(w1[k].shape == wf[k].shape and w1[k].dtype == wf[k].dtype for k in w1)
    assert json.loads((one / "models/adapter/adapter_config.json").read_text()) == \
        json.loads((fsdp_run / "models/adapter/adapter_config.json").read_text())
    for k in wd:
        assert torch.allclose(wf[k], wd[k], rtol=1e-3, atol=1e-5), k
    assert not all(torch.equal(w1[k], wf[k]) for k in w1)  # 2 shards of data: not the one-process update
    lf, ld = pd.read_csv(fsdp_run / "reports/train/loss.csv"), pd.read_csv(ddp / "reports/train/loss.csv")
    assert lf["loss"].tolist() == pytest.approx(ld["loss"].tolist(), rel=1e-4)
