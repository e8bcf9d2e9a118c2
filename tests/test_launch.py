"""Several processes from the DAG itself: with train.processes (or train.nodes) above 1 the train
stage launches its workers through PyTorch's elastic launcher, so `qlora run`, `dvc repro` and
retraining train on N processes with one dvc.lock entry and one MLflow run (gloo on this CPU)."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import command_logs, descendants, env, make_project, small_cls_params


def _run(cmd: list, cwd: Path, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, **kw)


def _params(agnews_small: Path, **train) -> dict:
    raw = small_cls_params(agnews_small)
    raw["train"].update({"max_steps": 6, "log_every": 1, "eval_every": 0, **train})
    raw["lora"]["dropout"] = 0.0  # dropout draws masks per process: the curves would differ by its noise
    return raw


def _losses(root: Path) -> list[float]:
    with open(root / "reports/train/loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _summary(root: Path) -> dict:
    return json.loads((root / "reports/train/summary.json").read_text())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.conftest import ALPACA
    from tests.tiny_llm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), ALPACA)


@pytest.mark.slow
def test_qlora_run_with_two_processes_records_one_run_that_matches_one_process(tmp_path, tiny_llama):
    """A causal LM (no dropout anywhere: the curves compare exactly) on 2 processes of 4 rows a
    micro-step against 1 process of 2 micro-batches of 4: the same global batch of the same rows (the
    epoch's order depends on batch_size alone, each rank takes every other row of it), and the loss
    normalised by token count over ranks and micro-batches, so the same loss curve to float
    tolerance; the same PEFT adapter format; one dvc.lock entry, DVC up to date afterwards; the
    MLflow run names the world size, strategy and each rank's figures, and its version registers."""
    from tests.test_causal_lm import causal_params

    def params(**train):
        raw = causal_params(tiny_llama)
        raw["train"].update(max_steps=6, eval_every=0, **train)
        raw["lora"]["dropout"] = 0.0
        return raw

    one = make_project(tmp_path / "one", params(batch_size=4, grad_accum=2))
    two = make_project(tmp_path / "two", params(batch_size=4, processes=2))
    first = _run([".venv/bin/qlora", "run"], one)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _run([".venv/bin/qlora", "run"], two)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "launching 2 process(es) on 1 node(s) (gloo)" in command_logs(two)
    s = _summary(two)
    assert (s["world_size"], s["strategy"], s["steps"]) == (2, "ddp", 6)
    assert [r["rank"] for r in s["ranks"]] == [0, 1] and all(r["tokens"] > 0 for r in s["ranks"])
    assert sum(r["tokens"] for r in s["ranks"]) == s["tokens"] == _summary(one)["tokens"]
    single, double = _losses(one), _losses(two)
    assert len(single) == len(double) == 6 and single[0] > single[-1]
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-3, (single, double)
    w1, w2 = (load_file(r / "models/adapter/adapter_model.safetensors") for r in (one, two))
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert sorted(p.name for p in (one / "models/adapter").iterdir()) == sorted(
        p.name for p in (two / "models/adapter").iterdir()
    )
    assert "up to date" in _run([".venv/bin/dvc", "status"], two).stdout
    lock = yaml.safe_load((two / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["train"]["processes"] == 2
    run_id = second.stdout.split("mlflow:   run ")[1].split()[0]
    mlflow.set_tracking_uri(f"sqlite:///{two / 'mlruns.db'}")
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    assert run.data.tags["train_world_size"] == "2" and run.data.tags["train_strategy"] == "ddp"
    assert run.data.metrics["train_rank0_tokens"] + run.data.metrics["train_rank1_tokens"] == s["tokens"]
    assert "(model version 1)" in second.stdout


def _worker(pid: int, local_rank: int) -> int | None:
    for child in descendants(pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return child
    return None


@pytest.mark.slow
def test_a_killed_worker_stops_the_stage_in_bounded_time_naming_it_and_the_rerun_resumes(tmp_path, agnews_small):
    root = make_project(
        tmp_path / "p", _params(agnews_small, batch_size=8, processes=2, max_steps=12, checkpoint_every=3)
    )
    prep = _run([".venv/bin/dvc", "repro", "tokenize", "quantize"], root)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    stage = subprocess.Popen(
        ["bin/qlora", "stage", "train"], cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not list((root / ".qlora/checkpoints").glob("**/step-*/state.json")) and time.time() < deadline:
        assert stage.poll() is None, stage.communicate()
        time.sleep(0.2)
    victim = _worker(stage.pid, 1)
    assert victim, "no worker of local rank 1 found"
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    out, err = stage.communicate(timeout=120)
    assert time.time() - killed < 60  # the launcher takes the other worker down, then exits
    assert stage.returncode == 2, out[-2000:] + err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("qlora: error:")][-1]
    assert "train: rank 1" in line and "killed by SIGKILL" in line and "resumes" in line, err[-3000:]
    assert not descendants(stage.pid) and _worker(stage.pid, 0) is None
    rerun = _run(["bin/qlora", "stage", "train"], root)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    s = _summary(root)
    assert s["world_size"] == 2 and s["steps"] == 12 and s["resumed_from_step"] >= 3, s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_as_one(tmp_path, agnews_small):
    """Two launches on this host stand for two machines, each with its own copy of the project:
    train.nodes 2, QLORA_RDZV_ENDPOINT on loopback; one run of world size 2, written once, by the
    node whose worker the rendezvous ranked 0."""
    raw = _params(agnews_small, batch_size=8, nodes=2)
    nodes = [make_project(tmp_path / f"node{i}", raw) for i in (0, 1)]
    for node in nodes:
        prep = _run([".venv/bin/dvc", "repro", "tokenize", "quantize"], node)
        assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    endpoint = {"QLORA_RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            ["bin/qlora", "stage", "train"],
            cwd=node,
            env={**env(), **endpoint},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in nodes
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    written = [n for n in nodes if (n / "reports/train/summary.json").exists()]
    assert len(written) == 1, outs
    s = _summary(written[0])
    assert (s["world_size"], s["strategy"], s["steps"]) == (2, "ddp", 6) and len(s["ranks"]) == 2


def test_nodes_without_a_rendezvous_endpoint_is_one_clear_error(tmp_path, agnews_small):
    root = make_project(tmp_path / "p", _params(agnews_small, nodes=2))
    stage = _run([sys.executable, "-m", "flows.cli", "stage", "train"], root)
    assert stage.returncode == 2
    assert stage.stderr.strip().splitlines()[-1].startswith("qlora: error: train.nodes is 2: set QLORA_RDZV_ENDPOINT")
