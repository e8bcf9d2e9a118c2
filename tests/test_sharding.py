"""FSDP (train.strategy: fsdp, tasks/distributed/sharding.py) on CPU with gloo process groups.

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
    raw["train"].update(
        {
            "max_steps": 4,
            "batch_size": 2,
            "grad_accum": 2,
            "log_every": 1,
            "checkpoint_every": 0,
            "strategy": "fsdp",
            **train_kw,
        }
    )
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

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }


def torchrun(root: Path, *args: str, launch=("--standalone", "--nproc_per_node", "2"), timeout=300):
    proc = subprocess.run(
        [*TORCHRUN, *launch, *args], cwd=root, env=env(), capture_output=True, text=True, timeout=timeout
    )
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
    assert sorted(p.name for p in (one / "models/adapter").iterdir()) == sorted(
        p.name for p in (fsdp_run / "models/adapter").iterdir()
    )
    w1, wf, wd = adapter(one), adapter(fsdp_run), adapter(ddp)
    assert w1.keys() == wf.keys() and all(w1[k].shape == wf[k].shape and w1[k].dtype == wf[k].dtype for k in w1)
    assert json.loads((one / "models/adapter/adapter_config.json").read_text()) == json.loads(
        (fsdp_run / "models/adapter/adapter_config.json").read_text()
    )
    for k in wd:
        assert torch.allclose(wf[k], wd[k], rtol=1e-3, atol=1e-5), k
    assert not all(torch.equal(w1[k], wf[k]) for k in w1)  # 2 shards of data: not the one-process update
    lf, ld = pd.read_csv(fsdp_run / "reports/train/loss.csv"), pd.read_csv(ddp / "reports/train/loss.csv")
    assert lf["loss"].tolist() == pytest.approx(ld["loss"].tolist(), rel=1e-4)


def worker(root: Path, key: str, *flags: str, nproc: int = 2):
    return torchrun(
        root, "-m", "tests.sharding_worker", key, *flags, launch=("--standalone", "--nproc_per_node", str(nproc))
    )


def with_checkpoints(prepared: Path, dest: Path, source: Path, **train_kw) -> Path:
    root = project(prepared, dest, **train_kw)
    shutil.copytree(source / ".qlora/checkpoints", root / ".qlora/checkpoints")
    return root


def test_a_checkpoint_of_2_fsdp_processes_resumes_on_2_and_on_1(prepared, tmp_path):
    """2 FSDP processes train 6 steps with a checkpoint at step 3 (kept). From it: 2 FSDP
    processes again end with the same adapter and losses as the uninterrupted run (sharded
    save and restore lose nothing: weights, AdamW moments and step, schedule, data position,
    RNG); 2 DDP processes (rank 0 reads, then broadcasts) end with the same adapter too, to
    DDP's rounding; 1 process continues at step 4 from the same log and stops at 6."""
    ckpt = dict(max_steps=6, checkpoint_every=3)
    a = project(prepared, tmp_path / "a", **ckpt)
    worker(a, "run-1", "--keep-checkpoints")
    saved = a / ".qlora/checkpoints/train/run-1/step-00000003"  # one folder per resume key
    state = json.loads((saved / "state.json").read_text())
    assert (state["step"], state["next_row"]) == (3, 3 * 2 * 2 * 2)  # steps x batch x accum x ranks
    opt = torch.load(saved / "optimizer.pt", weights_only=True)
    weights = load_file(saved / "trainable.safetensors")
    assert len(opt["state"]) == len(weights) and all(int(s["step"]) == 3 for s in opt["state"].values())
    assert sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values()) == sorted(
        tuple(w.shape) for w in weights.values()
    )
    two = with_checkpoints(prepared, tmp_path / "two", a, **ckpt)
    out = worker(two, "run-1").stdout
    assert "resuming from" in out and "step 3 of 6" in out, out
    wa, w2 = adapter(a), adapter(two)
    assert wa.keys() == w2.keys() and all(torch.allclose(wa[k], w2[k], rtol=1e-5, atol=1e-7) for k in wa)
    la, l2 = pd.read_csv(a / "reports/train/loss.csv"), pd.read_csv(two / "reports/train/loss.csv")
    assert la["loss"].tolist() == pytest.approx(l2["loss"].tolist(), rel=1e-5)
    assert (summary(two)["resumed_from_step"], summary(two)["strategy"]) == (3, "fsdp")
    ddp = with_checkpoints(prepared, tmp_path / "ddp", a, strategy="ddp", **ckpt)  # the same checkpoint, under DDP
    worker(ddp, "run-1")
    wd = adapter(ddp)
    assert summary(ddp)["strategy"] == "ddp" and all(torch.allclose(wa[k], wd[k], rtol=1e-3, atol=1e-5) for k in wa)
    one = with_checkpoints(prepared, tmp_path / "one", a, **ckpt)
    train.run(Params.model_validate(fsdp_params(prepared / "tiny-llama", **ckpt)), one, resume_key="run-1")
    s = summary(one)
    assert (s["resumed_from_step"], s["steps"], s["world_size"], s["strategy"]) == (3, 6, 1, "single")
    l1 = pd.read_csv(one / "reports/train/loss.csv")
    assert l1["step"].tolist() == [1, 2, 3, 4, 5, 6] and l1["loss"][:3].tolist() == la["loss"][:3].tolist()
    assert adapter(one).keys() == wa.keys()
    assert not (one / ".qlora/checkpoints/train").exists()  # spent


def test_the_data_position_carries_over_to_another_number_of_processes(monkeypatch):
    """Rows consumed are counted in the epoch's order, whoever consumed them: 2 ranks for 2
    steps, then 1 process from the checkpoint's position, see every row once, in order."""
    monkeypatch.setattr(
        train, "batches", lambda rows, bs, pad, task, order: (order[i : i + bs] for i in range(0, len(order), bs))
    )
    monkeypatch.setattr(train, "real_tokens", len)
    params = Params.model_validate({"train": {"batch_size": 3, "grad_accum": 2}})
    lengths = list(range(1, 61))
    order = train.epoch_order(lengths, 3, params.seed, 0)
    seen, position = [], None
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("WORLD_SIZE", "2")
        steps = list(train.optimizer_steps(None, lengths, params, 0, 0, 0))[:2]
        seen += [row for _, group in steps for batch, _ in group for row in batch]
        position = steps[-1][0]
    assert position == 2 * 3 * 2 * 2 and sorted(seen) == sorted(order[:position])
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1")
    rest = [
        row
        for _, group in train.optimizer_steps(None, lengths, params, 0, 0, position)
        for batch, _ in group
        for row in batch
    ]
    assert rest == order[position:]


def test_two_nodes_of_one_process_each_train_as_one_node_of_two(fsdp_run, prepared, tmp_path):
    """`torchrun --nnodes 2 --node_rank 0|1 --master_addr --master_port` (static rendezvous),
    two process groups on this host standing for two machines, each with its own copy of the
    project (no shared disk): the same FSDP training as --standalone --nproc_per_node 2, the
    adapter written once, on node 0."""
    port = free_port()
    nodes = [project(prepared, tmp_path / f"node{i}") for i in (0, 1)]
    procs = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(i),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "flows.cli",
                "stage",
                "train",
            ],
            cwd=node,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, node in enumerate(nodes)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    s = summary(nodes[0])
    assert (s["strategy"], s["world_size"], s["steps"]) == ("fsdp", 2, 4)
    assert not (nodes[1] / "models/adapter").exists() and not (nodes[1] / "reports/train").exists()
    w, ref = adapter(nodes[0]), adapter(fsdp_run)
    assert w.keys() == ref.keys() and all(torch.allclose(w[k], ref[k], rtol=1e-5, atol=1e-7) for k in w)


def test_auto_shards_only_what_one_device_cannot_hold(tmp_path, monkeypatch):
    from tasks.distributed import sharding

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    cpu = torch.device("cpu")
    assert sharding.choose("auto", tmp_path, cpu)[0] == "single"  # one process: neither
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sharding, "device_memory", lambda device: 4000)
    assert sharding.choose("auto", tmp_path, cpu)[0] == "ddp"  # 1000 bytes of 4000: fits
    monkeypatch.setattr(sharding, "device_memory", lambda device: 1500)
    strategy, why = sharding.choose("auto", tmp_path, cpu)
    assert strategy == "fsdp" and "more than 50%" in why
    assert sharding.choose("ddp", tmp_path, cpu)[0] == "ddp" and sharding.choose("fsdp", tmp_path, cpu)[0] == "fsdp"
