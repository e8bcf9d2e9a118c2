"""Audits that hold: the data is checked against its committed DVC version by every door,
artifacts are byte-reproducible across directories, writing commands (scheduled ones too)
respect the project lock, and a rejected drop is a failed flow run, not a success."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from flows.dvc import dvc_ops
from flows.lock import project_lock
from flows.pipeline import Project, qlora_pipeline
from tasks import catalog
from tests.conftest import AG_NEWS, env, git, make_project, repo_params, small_cls_params

RAW = "data/raw/ag_news/test.csv"


def qlora(root: Path, *args) -> subprocess.CompletedProcess:
    """The command line as a user runs it in the project (no activated venv)."""
    return subprocess.run([".venv/bin/qlora", *args], cwd=root, env=env(), capture_output=True, text=True, timeout=900)


def tamper(path: Path) -> None:
    """Row 100: 'Down' -> 'Dawn'. Same size, and the old mtime put back, so a check that trusts
    (inode, mtime, size) caches, as DVC's state database does, would not see it."""
    st = path.stat()
    lines = path.read_bytes().split(b"\n")
    assert b"Consumer Prices Down" in lines[99]
    lines[99] = lines[99].replace(b"Prices Down", b"Prices Dawn", 1)
    path.write_bytes(b"\n".join(lines))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def agnews_params(**train) -> dict:
    return repo_params(
        tokenize={"max_length": 48}, train={"max_steps": 2, "log_every": 1, **train}, eval={"batch_size": 128}
    )


@pytest.mark.slow
def test_tampered_data_is_caught_by_every_door(tmp_path):
    root = make_project(tmp_path / "project", agnews_params(), ag_news=True)
    clean = qlora(root, "run")
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-2000:]
    committed = yaml.safe_load((root / "data/raw/ag_news.dvc").read_text())["outs"][0]["md5"]
    assert f"md5 {committed} (verified)" in clean.stdout
    lock_before = (root / "dvc.lock").read_bytes()
    validated_before = dvc_ops.md5(root / catalog.VALIDATED_DIR)
    tamper(root / RAW)
    tampered = dvc_ops.md5(root / "data/raw/ag_news")
    assert tampered != committed

    # door 1: qlora run stops before any stage, naming the file and both hashes
    run = qlora(root, "run")
    assert run.returncode == 2, run.stdout[-2000:]
    assert "data/raw/ag_news" in run.stderr and committed in run.stderr and tampered in run.stderr, run.stderr
    assert (root / "dvc.lock").read_bytes() == lock_before

    # door 2: dvc repro, as the README runs it. DVC trusts its state database, keyed on (inode,
    # mtime, size): with those kept, it sees no change and runs nothing (the outputs still are
    # the clean data's). Once the file's mtime moves, as any editor's write makes it, DVC runs
    # the validate stage, which checks the bytes and stops it; nothing is rebuilt.
    quiet = subprocess.run([".venv/bin/dvc", "repro"], cwd=root, env=env(), capture_output=True, text=True)
    assert quiet.returncode == 0 and "Running stage" not in quiet.stdout
    os.utime(root / RAW)
    repro = subprocess.run([".venv/bin/dvc", "repro"], cwd=root, env=env(), capture_output=True, text=True)
    assert repro.returncode != 0
    assert committed in repro.stdout + repro.stderr and tampered in repro.stdout + repro.stderr
    assert dvc_ops.md5(root / catalog.VALIDATED_DIR) == validated_before
    # DVC itself re-records a changed frozen import in its .dvc file; git still holds the committed
    # version, so every later run keeps refusing until the data or the commit is fixed
    again = qlora(root, "run")
    assert again.returncode == 2 and committed in again.stderr, again.stderr

    # door 3: lineage --verify re-hashes the bytes and fails
    verify = qlora(root, "lineage", "qlora-flow-agnews/1", "--verify", "--json")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)["verify"]
    assert report["current_md5"] == tampered and report["recorded_md5"] == committed and not report["ok"]

    # door 4: qlora retrain stops before reading the inbox; nothing is merged or moved
    (root / "data/inbox").mkdir()
    pd.read_csv(AG_NEWS, header=None, dtype=str).iloc[:3].to_csv(root / "data/inbox/new.csv", header=False, index=False)
    params_before = (root / "params.yaml").read_bytes()
    retrain = qlora(root, "retrain", "--set", "split.method=hash")
    assert retrain.returncode == 2, retrain.stdout[-2000:] + retrain.stderr[-2000:]
    assert committed in retrain.stderr and tampered in retrain.stderr
    assert (root / "data/inbox/new.csv").exists() and (root / "params.yaml").read_bytes() == params_before

    # opting in runs on the tampered bytes and records them as unverified, with their real hash
    subprocess.run(["git", "checkout", "data/raw/ag_news.dvc"], cwd=root, check=True)
    optin = qlora(root, "run", "--allow-unverified-data")
    assert optin.returncode == 0, optin.stdout[-2000:] + optin.stderr[-2000:]
    assert "recorded as unverified" in optin.stdout + optin.stderr
    run_id = optin.stdout.split("mlflow:   run ")[1].split()[0]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    assert tags["data_verified"] == "false" and tags["data_md5"] == tampered and tags["dvc_data_md5"] == committed
    # (2 steps never met row 100, so the merged weights equal version 1's and no version was added:
    # version 1 still points at the clean run.) The unverified run itself never verifies:
    from flows.tracking.lineage import verify as verify_record

    check = verify_record({"lineage": tags}, root)
    assert not check["ok"] and check["bytes_match"] and "unverified" in " ".join(check["problems"])


@pytest.mark.slow
def test_two_clean_runs_in_two_directories_are_byte_identical(tmp_path, agnews_small):
    """Same code, data and params in two clones at different paths: the adapter folder, the
    merged model, the base, every data stage and the metrics hash the same (DVC's md5 in
    dvc.lock). Only reports/train/summary.json differs: it records wall time and tokens/s."""
    raw = small_cls_params(agnews_small)
    outs = []
    for name in ("first-clone", "elsewhere/second"):
        root = make_project(tmp_path / name / "project", raw)
        out = qlora_pipeline(Project(root=root))
        outs.append({o: md5 for s in out.stages.values() for o, md5 in s.outs.items()})
        outs[-1]["loss.csv"] = dvc_ops.md5(root / catalog.TRAIN_LOSS_CSV)
        outs[-1]["adapter_config"] = json.loads((root / catalog.ADAPTER_DIR / "adapter_config.json").read_text())
    a, b = outs
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == [catalog.TRAIN_REPORT_DIR], differ
    assert a["adapter_config"]["target_modules"] == sorted(a["adapter_config"]["target_modules"])
    assert a["adapter_config"]["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def owned_dataset_project(dest: Path) -> Path:
    """A project whose data is its own DVC-tracked file (what retraining appends to)."""
    raw = small_cls_params(Path("data/raw/news/data.csv"))
    raw["data"]["path"] = "data/raw/news/data.csv"
    raw["split"]["method"] = "hash"
    raw["retrain"]["settle_seconds"] = 0  # drops are written whole before each retrain here
    root = make_project(dest, raw)
    (root / "data/raw/news").mkdir(parents=True)
    ag = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    ag.groupby(0, group_keys=False).head(50).to_csv(root / "data/raw/news/data.csv", header=False, index=False)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/news"], cwd=root, env=env(), check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data: own dataset")
    return root


def test_a_scheduled_run_that_finds_the_project_busy_is_recorded_as_skipped(tmp_path):
    """What `qlora serve` runs at each tick (the retraining flow) takes the project lock; held by
    another command, the flow run ends Cancelled, named Skipped, and writes nothing."""
    from flows.retrain import retrain_flow

    root = owned_dataset_project(tmp_path / "project")
    (root / "data/inbox").mkdir()
    (root / "data/inbox/new.csv").write_text('"2","A new title","A new body"\n')
    with project_lock(root, what="qlora run (another user)"):
        state = retrain_flow(str(root), return_state=True)
        cli = qlora(root, "retrain")
    assert state.type.value == "CANCELLED" and state.name == "Skipped", state
    assert "another pipeline run holds" in state.message
    assert cli.returncode == 3 and "Skipped" in cli.stderr, cli.stderr
    errors = [line for line in cli.stderr.splitlines() if line.startswith("qlora: error:")]
    assert len(errors) == 1 and "qlora run (another user)" in errors[0] and "pass --wait" in errors[0], cli.stderr
    assert "Traceback" not in cli.stderr
    assert (root / "data/inbox/new.csv").exists() and not (root / catalog.INGEST_REPORT).exists()
    assert not (root / "mlruns.db").exists()
    # the advice works as written: with --wait the command queues behind the holder, then runs
    # (the drop is set aside, so the run that follows has nothing to train)
    (root / "data/inbox/new.csv").rename(root / "new.csv")
    with project_lock(root, what="qlora run (another user)"):
        waiting = subprocess.Popen(
            [".venv/bin/qlora", "retrain", "--wait"], cwd=root, env=env(), stdout=subprocess.PIPE, text=True
        )
        time.sleep(3)
        assert waiting.poll() is None  # still queued behind the holder
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "retrain: skipped" in out, out


def test_a_rejected_drop_fails_the_flow_run_with_its_report_attached(tmp_path):
    from prefect.client.orchestration import get_client

    from flows.retrain import retrain_flow

    root = owned_dataset_project(tmp_path / "project")
    before = (root / "data/raw/news/data.csv").read_bytes()
    (root / "data/inbox").mkdir()
    (root / "data/inbox/bad.csv").write_text('"2","Fine title","Fine body"\n"9","Bad label","Body"\n')
    state = retrain_flow(str(root), return_state=True)
    assert state.type.value == "FAILED" and state.name == "Rejected", state
    assert "rejected (1 error(s))" in state.message
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.state.name == "Rejected"  # what a Prefect automation matches on
        # the API's artifact filter (this Prefect's sync client sends null filters the server refuses)
        found = client._client.post(
            "/artifacts/filter",
            json={
                "artifacts": {"key": {"any_": ["rejected-drop"]}, "flow_run_id": {"any_": [str(flow_run.id)]}},
                "limit": 10,
                "offset": 0,
                "sort": "CREATED_DESC",
            },
        ).json()
    assert len(found) == 1 and "isin" in found[0]["data"] and "| 2 | label |" in found[0]["data"], found
    assert (root / "data/raw/news/data.csv").read_bytes() == before
    # the command line: a non-zero exit a scheduler or CI sees
    (root / "data/inbox/bad2.csv").write_text('"3","  ","x"\n')
    cli = qlora(root, "retrain")
    assert cli.returncode == 4 and "Rejected" in cli.stderr, cli.stdout[-1500:] + cli.stderr[-1500:]
    errors = [line for line in cli.stderr.splitlines() if line.startswith("qlora: error:")]
    assert len(errors) == 1 and "bad2.csv" in errors[0] and "drop the files in data/inbox again" in errors[0], errors
    assert "Traceback" not in cli.stderr
