"""`qlora retrain` killed with SIGKILL at each step boundary, then run again: the second run
finishes what the first started and the project ends as an uninterrupted run leaves it (one
data version, one model version, one champion decision, no row lost or doubled, no MLflow
run left RUNNING). The boundaries are watched from outside, on what the process writes (the
data file, the .dvc file, the DVC remote, git, its stage processes, the MLflow store)."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import AG_NEWS, command_logs, env, git, make_project, small_cls_params

pytestmark = pytest.mark.slow
MODEL = "news-topics"
DATA = "data/raw/news/data.csv"
DVC_FILE = "data/raw/news.dvc"
SETTINGS = ["train.max_steps=3", "train.checkpoint_every=1", "retrain.settle_seconds=0"]


def _dvc(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A committed seed dataset (120 rows) and a drop of 60 new rows + 4 already present in the inbox."""
    raw = small_cls_params(DATA)
    raw["split"]["method"] = "hash"
    raw["tracking"].update(registered_model=MODEL, experiment="resume-test")
    root = make_project(tmp_path_factory.mktemp("resume") / "case" / "project", raw)
    ag = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    seed = ag.groupby(0, group_keys=False).head(30)
    (root / "data/raw/news").mkdir(parents=True)
    seed.to_csv(root / DATA, header=False, index=False)
    assert _dvc(root, "remote", "add", "-d", "local", "../remote").returncode == 0  # beside the project
    assert _dvc(root, "add", "-q", "data/raw/news").returncode == 0
    git(root, "add", "-A")
    git(root, "commit", "-qm", "seed dataset")
    (root / "data/inbox").mkdir(parents=True)
    pd.concat([ag.iloc[3000:3060], seed.iloc[:4]]).to_csv(root / "data/inbox/drop.csv", header=False, index=False)
    return root


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base.parent, dest, symlinks=True)
    return dest / base.name


def _retrain(root: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "retrain"] + [a for s in SETTINGS for a in ("--set", s)]
    return subprocess.Popen(
        args, cwd=root, env=env(), stdout=open(root.parent / "retrain.log", "a"), stderr=subprocess.STDOUT
    )


def _db(root: Path, sql: str) -> list:
    try:
        with sqlite3.connect(f"file:{root / 'mlruns.db'}?mode=ro", uri=True, timeout=0.2) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _stage_running(root: Path, stage: str) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and b"flows.dvc.stage_command\x00" + stage.encode() in (proc / "cmdline").read_bytes()
                and os.readlink(proc / "cwd") == str(root)
            ):
                return True
        except OSError:
            continue
    return False


def _remote_files(root: Path) -> int:
    return sum(1 for p in (root.parent / "remote").rglob("*") if p.is_file())


def _head(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout


def _boundary(name: str, root: Path):
    """A test of whether the run passed the boundary `name`, judged on what it wrote."""
    size, dvc_text, remote, head = (
        (root / DATA).stat().st_size,
        (root / DVC_FILE).read_text(),
        _remote_files(root),
        _head(root),
    )
    return {
        "append": lambda: (root / DATA).stat().st_size > size,
        "dvc_add": lambda: (root / DVC_FILE).read_text() != dvc_text,
        "dvc_push": lambda: _remote_files(root) > remote,
        "git_commit": lambda: _head(root) != head,
        "train": lambda: _stage_running(root, "train"),
        "registration": lambda: bool(_db(root, f"select 1 from model_versions where name='{MODEL}'")),
        "alias_move": lambda: bool(_db(root, "select 1 from model_version_tags where key='champion_decision_pending'")),
    }[name]


def _state(root: Path) -> dict:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    client = mlflow.tracking.MlflowClient()
    versions = client.search_model_versions(f"name='{MODEL}'")
    exp = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trailers = subprocess.run(
        ["git", "log", "--format=%(trailers:key=Qlora-Data-Version,valueonly)", "--", DVC_FILE],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.split()
    rows = pd.read_csv(root / DATA, header=None, dtype=str, keep_default_na=False)
    return {
        "data_md5": yaml.safe_load((root / DVC_FILE).read_text())["outs"][0]["md5"],
        "data_versions": trailers,
        "rows": len(rows),
        "distinct_rows": len(rows.drop_duplicates()),
        "inbox": sorted(p.name for p in (root / "data/inbox").glob("*.csv")),
        "processed": sorted(p.name for p in (root / "data/inbox/processed").rglob("*.csv")),
        "model_versions": [
            (str(v.version), v.tags.get("dvc_data_md5"), v.tags.get("champion_decision")) for v in versions
        ],
        "champion": str(client.get_model_version_by_alias(MODEL, "champion").version) if versions else None,
        "decisions": sorted(
            r.data.tags["champion_decision"]
            for r in runs
            if "champion_decision" in r.data.tags and r.data.tags.get("qlora_kind") != "retrain"
        ),
        "running": [r.info.run_id for r in runs if r.info.status == "RUNNING"],
        "dirty": subprocess.run(
            ["git", "status", "--porcelain", "--", DVC_FILE, "dvc.lock", "params.yaml"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout,
    }


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> tuple[Path, dict]:
    root = _copy(base, tmp_path_factory.mktemp("reference") / "case")
    started = time.perf_counter()
    assert _retrain(root).wait(timeout=900) == 0, (root.parent / "retrain.log").read_text()
    print(f"uninterrupted retrain: {time.perf_counter() - started:.1f} s")
    state = _state(root)
    assert state["rows"] == state["distinct_rows"] == 180 and len(state["data_versions"]) == 1
    assert state["model_versions"] == [("1", state["data_md5"], "promoted")] and state["champion"] == "1"
    assert state["decisions"] == ["promoted"] and not state["running"] and not state["dirty"]
    assert state["inbox"] == [] and state["processed"] == ["drop.csv"]
    return root, state


def test_retraining_commit_reproduces_with_dvc(reference):
    """dvc.lock is committed with the data version: at that commit `dvc status` and `dvc repro` agree
    that nothing is stale, and the lock names the data version it trained on."""
    root, state = reference
    log = subprocess.run(["git", "log", "--format=%H %s"], cwd=root, capture_output=True, text=True).stdout
    assert "pipeline: dvc.lock for data version " + state["data_md5"] in log
    lock = yaml.safe_load(
        subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True, check=True).stdout
    )
    from flows.dvc.dvc_ops import md5

    assert {"path": DATA, "md5": md5(root / DATA)}.items() <= next(
        d for d in lock["stages"]["validate"]["deps"] if d["path"] == DATA
    ).items()
    checkout = root.parent / "checkout"
    git(root, "worktree", "add", "-q", str(checkout), "HEAD")
    (checkout / ".venv").symlink_to(root / ".venv")
    shutil.copytree(root / ".dvc" / "cache", checkout / ".dvc" / "cache")
    assert _dvc(checkout, "checkout", "-q").returncode == 0
    status = _dvc(checkout, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    repro = _dvc(checkout, "repro", "--dry")
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout


def _status(root: Path) -> tuple[dict, str]:
    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "flows.cli", "status", *args], cwd=root, env=env(), capture_output=True, text=True
        )
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    import json

    return json.loads(cli("--json")), cli()


def test_status_shows_the_project_on_one_screen(reference):
    """After an uninterrupted retrain: DVC up to date, the champion with its version's test scores,
    the last tick and its decision, nothing interrupted; nothing written by asking."""
    root, state = reference
    before = _db(root, "select count(*) from runs")
    status, screen = _status(root)
    assert status["stale"] == {} and status["data"]["status"] == "verified"
    champion = status["registry"]["champion"]
    run_id = _db(root, f"select run_id from model_versions where name='{MODEL}' and version=1")[0][0]
    (accuracy,) = _db(root, f"select value from latest_metrics where run_uuid='{run_id}' and key='test_accuracy'")[0]
    assert champion["model"] == f"{MODEL}/1" and champion["scores"]["accuracy"] == accuracy
    assert champion["data_md5"] == state["data_md5"]
    last = status["last_retrain"]
    assert last["status"] == "trained" and last["decision"] == "no champion yet" and last["model_version"] == "1"
    assert status["interrupted"] == {"lock_holder": None, "checkpoints": []}
    assert "pending_retrain" not in status["registry"]
    assert f"champion  {MODEL}/1 (@champion): accuracy={accuracy:.4f}" in screen
    assert "dvc       up to date" in screen and "resume    nothing interrupted" in screen, screen
    print("\n" + screen)
    assert _db(root, "select count(*) from runs") == before


def test_nothing_to_do_records_nothing_in_mlflow(reference):
    root, state = reference
    before = _db(root, "select count(*) from runs")
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "retrain"], cwd=root, env=env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0 and "retrain: skipped" in p.stdout, p.stdout + p.stderr
    assert _db(root, "select count(*) from runs") == before


@pytest.mark.parametrize(
    "boundary", ["append", "dvc_add", "dvc_push", "git_commit", "train", "registration", "alias_move"]
)
def test_killed_retrain_is_finished_by_the_next_one(base, reference, boundary, tmp_path):
    root = _copy(base, tmp_path / "case")
    passed = _boundary(boundary, root)
    proc = _retrain(root)
    while not passed():
        assert proc.poll() is None, f"the run ended before {boundary}:\n" + (root.parent / "retrain.log").read_text()
        time.sleep(0.01)
    if boundary == "train":
        time.sleep(2)  # into the training loop, past model loading
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if boundary == "git_commit":  # the data version is committed, its model not trained: status says so
        status, screen = _status(root)
        assert status["registry"]["pending_retrain"]["step"] == "train", status
        assert status["last_retrain"]["status"].startswith("interrupted (process "), status
        assert "resume    retraining left its train step" in screen, screen
    started = time.perf_counter()
    assert _retrain(root).wait(timeout=900) == 0, (root.parent / "retrain.log").read_text()
    print(f"{boundary}: the next run finished in {time.perf_counter() - started:.1f} s")
    assert "Starting temporary server" not in (root.parent / "retrain.log").read_text()  # Prefect's own outlives a kill
    state = _state(root)
    ref = reference[1]
    assert state == ref, (root.parent / "retrain.log").read_text()[-4000:]
    killed = _db(root, "select count(*) from runs where status='KILLED'")
    assert boundary in ("append", "dvc_add", "dvc_push", "git_commit") or killed[0][0] >= 1


def test_retraining_on_two_processes_ends_as_one_process_does(base, reference, tmp_path):
    """With train.processes=2 the retraining flow's train stage launches 2 workers (gloo here) and
    the project ends in the state a one-process retrain leaves: one data version, one model
    version promoted, dvc.lock committed. Its MLflow run names the world size."""
    import json

    root = _copy(base, tmp_path / "case")
    args = [sys.executable, "-m", "flows.cli", "retrain", "--set", "train.processes=2"]
    p = subprocess.run(
        args + [a for s in SETTINGS for a in ("--set", s)],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "launching 2 process(es) on 1 node(s) (gloo)" in command_logs(root)
    summary = json.loads((root / "reports/train/summary.json").read_text())
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    state = _state(root)
    assert state == reference[1]
    lock = yaml.safe_load(
        subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True, check=True).stdout
    )
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["processes"] == 2
    version = _db(root, f"select run_id from model_versions where name='{MODEL}'")[0][0]
    assert _db(root, f"select value from tags where run_uuid='{version}' and key='train_world_size'") == [("2",)]
