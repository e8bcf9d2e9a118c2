"""`qlora sweep`: a 2x2 grid as four DVC experiments that share the upstream stages, one MLflow
parent run with a child per point, a comparison table and plot, the workspace put back."""

import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from flows.dvc import dvc_ops
from flows.sweep import parse_grid
from tasks import catalog
from tests.conftest import env, make_project, small_cls_params


def test_grid_is_every_combination():
    assert parse_grid(["lora.r=8,16", "train.lr=1e-3,2e-3"]) == [
        ["lora.r=8", "train.lr=1e-3"],
        ["lora.r=8", "train.lr=2e-3"],
        ["lora.r=16", "train.lr=1e-3"],
        ["lora.r=16", "train.lr=2e-3"],
    ]


@pytest.mark.slow
def test_two_by_two_sweep(tmp_path, agnews_small):
    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=2)
    root = make_project(tmp_path / "project", raw)
    base = subprocess.run([".venv/bin/qlora", "run"], cwd=root, env=env(), capture_output=True, text=True)
    assert base.returncode == 0, base.stderr[-2000:]
    params_before, lock_before = (root / "params.yaml").read_bytes(), (root / "dvc.lock").read_bytes()
    p = subprocess.run(
        [".venv/bin/qlora", "sweep", "--name", "grid", "--grid", "lora.r=4,8", "--grid", "train.lr=1e-3,2e-3"],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv_rows(root / catalog.SWEEPS_DIR / "grid" / "comparison.csv"))
    assert [(r["lora.r"], r["train.lr"]) for r in rows] == [("4", "1e-3"), ("4", "2e-3"), ("8", "1e-3"), ("8", "2e-3")]
    # upstream stages are shared: only train, evaluate and merge ran at each point
    assert {r["ran"] for r in rows} == {"train evaluate merge"}, rows
    assert (root / catalog.SWEEPS_DIR / "grid" / "comparison.png").stat().st_size > 0
    assert "best by accuracy: grid-" in p.stdout
    # four DVC experiments with their params and metrics
    shown = json.loads(
        subprocess.run(
            [".venv/bin/dvc", "exp", "show", "--json"], cwd=root, env=env(), capture_output=True, text=True
        ).stdout
    )
    exps = {e["name"]: e["revs"][0]["data"] for b in shown for e in (b.get("experiments") or []) if e.get("name")}
    assert {f"grid-{i}" for i in range(1, 5)} <= set(exps)
    assert exps["grid-3"]["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    assert "accuracy" in exps["grid-3"]["metrics"][catalog.METRICS]["data"]
    # one MLflow parent run, a child per point
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("qlora-flow")
    parent = client.search_runs([exp.experiment_id], "tags.qlora_kind = 'sweep'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dvc_experiment"] for c in children) == [f"grid-{i}" for i in range(1, 5)]
    assert {r["mlflow_run"] for r in rows} == {c.info.run_id for c in children}
    # the workspace is back where it was: params, dvc.lock, outputs; DVC agrees
    assert (root / "params.yaml").read_bytes() == params_before and (root / "dvc.lock").read_bytes() == lock_before
    assert dvc_ops.md5(root / catalog.ADAPTER_DIR) == dvc_ops.locked_outs(root, "train")[catalog.ADAPTER_DIR]
    assert (
        "up to date"
        in subprocess.run([".venv/bin/dvc", "status"], cwd=root, env=env(), capture_output=True, text=True).stdout
    )


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)
