"""Retraining on data drops against a real MLflow tracking server (loopback, SQLite
backend) and the Prefect ephemeral API: two DVC versions, alias moves only when better,
a bad drop changes nothing, an empty inbox is skipped, lineage resolves every version."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.retrain import beats, retrain_flow
from tests.conftest import AG_NEWS, make_project, small_cls_params

pytestmark = pytest.mark.slow
MODEL = "news-topics"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres(d: Path) -> str:
    """A throwaway PostgreSQL server from Debian's packages on a loopback port (skips if absent).
    Its files live in `d`, a folder the postgres user can reach (pytest's temp root is private)."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindir or not (bindir[-1] / "initdb").exists():
        pytest.skip("PostgreSQL server binaries are not installed")
    bindir, data, port = bindir[-1], d / "pgdata", _port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data.mkdir()
    if as_pg:
        shutil.chown(d, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run(
        as_pg + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_pg
        + [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(d / "pg.log"),
            "-w",
            "start",
            "-o",
            f"-p {port} -k {d} -c listen_addresses=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_pg + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
        check=True,
        capture_output=True,
    )
    return f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"


def _stop_postgres(pg_dir: Path) -> None:
    if (pg_dir / "pgdata" / "postmaster.pid").exists():
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            as_pg + [str(bindir / "pg_ctl"), "-D", str(pg_dir / "pgdata"), "-m", "fast", "stop"], capture_output=True
        )
    shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    pg_dir = Path(tempfile.mkdtemp(prefix="qlora-pg-")) if request.param == "postgresql" else None
    proc = None
    try:
        backend = f"sqlite:///{d / 'mlflow.db'}" if pg_dir is None else _postgres(pg_dir)
        port = _port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(d / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=open(d / "server.log", "w"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("MLflow server did not start:\n" + (d / "server.log").read_text())
                time.sleep(0.5)
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if pg_dir is not None:
            _stop_postgres(pg_dir)


def _git(root, *args):
    subprocess.run(
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def _dvc(root, *args) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


def _md5(root) -> str:
    return yaml.safe_load((root / "data/raw/news.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    raw = small_cls_params("data/raw/news/data.csv")
    raw["split"]["method"] = "hash"
    raw["tracking"].update(tracking_uri=mlflow_server, registered_model=MODEL, experiment="retrain-test")
    raw["retrain"]["settle_seconds"] = 0  # drops are written whole before each retrain here
    root = make_project(tmp_path_factory.mktemp("retrain") / "project", raw)
    ag = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    (root / "data/raw/news").mkdir(parents=True)
    ag.groupby(0, group_keys=False).head(75).to_csv(root / "data/raw/news/data.csv", header=False, index=False)
    _dvc(root, "remote", "add", "-d", "local", str(root.parent / "dvc-remote"))
    _dvc(root, "add", "-q", "data/raw/news")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "seed dataset")
    return root, ag


def _drop(root: Path, rows: pd.DataFrame, name: str) -> None:
    inbox = root / "data/inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    rows.to_csv(inbox / name, header=False, index=False)


def test_beats_is_strict():
    assert beats(0.8, None, True) and beats(0.81, 0.8, True) and not beats(0.8, 0.8, True)
    assert beats(1.0, 1.2, False) and not beats(1.2, 1.2, False)


def test_retraining_story(project, mlflow_server):
    import mlflow

    root, ag = project
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.tracking.MlflowClient()
    weak = ["train.max_steps=2", "train.lr=1e-5"]
    strong = ["train.max_steps=16", "train.lr=0.003"]
    md5s = {}

    # 1. empty inbox: skipped; the Prefect flow run records it, MLflow gets no run
    out = retrain_flow(str(root), weak)
    assert out["status"] == "skipped" and "run_id" not in out
    exp = client.get_experiment_by_name("retrain-test")
    assert exp is None or not client.search_runs([exp.experiment_id])
    seed_md5 = _md5(root)

    # 2. first drop (75 new rows + 5 already present): v1 becomes champion (no champion yet)
    _drop(root, pd.concat([ag.iloc[4000:4075], ag.groupby(0, group_keys=False).head(75).iloc[:5]]), "drop1.csv")
    out = retrain_flow(str(root), weak)
    assert out["status"] == "trained" and out["ingest"]["added_rows"] == 75
    assert len(out["ingest"]["skipped_duplicates"]) == 5
    assert out["data"]["md5"] != seed_md5 and out["data"]["git_commit"]
    v1 = out["decision"]["challenger_version"]
    assert out["decision"]["promoted"] and str(client.get_model_version_by_alias(MODEL, "champion").version) == v1
    md5s[v1] = _md5(root)
    assert len(pd.read_csv(root / "data/raw/news/data.csv", header=None)) == 375
    # the new version is in the DVC remote: a fresh checkout can pull it
    assert (
        subprocess.run([sys.executable, "-m", "dvc", "status", "-c", "-q", "data/raw/news.dvc"], cwd=root).returncode
        == 0
    )

    # 3. second drop with a stronger recipe: better on the same test split -> alias moves
    _drop(root, ag.iloc[5000:5100], "drop2.csv")
    out = retrain_flow(str(root), strong)
    d = out["decision"]
    v2 = d["challenger_version"]
    md5s[v2] = _md5(root)
    assert md5s[v2] != md5s[v1]
    assert d["champion_version"] == v1 and d["challenger_score"] > d["champion_score"] and d["promoted"], d
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2
    run = client.get_run(out["pipeline"]["run_id"])
    assert run.data.tags["champion_decision"] == "promoted"
    assert run.data.metrics["challenger_accuracy"] == d["challenger_score"] == run.data.metrics["test_accuracy"]
    assert run.data.metrics["champion_accuracy"] == d["champion_score"]

    # 4. third drop with a weak recipe: not better -> alias stays on v2, decision logged
    _drop(root, ag.iloc[6000:6040], "drop3.csv")
    out = retrain_flow(str(root), weak)
    d = out["decision"]
    v3 = d["challenger_version"]
    md5s[v3] = _md5(root)
    assert not d["promoted"] and d["challenger_score"] <= d["champion_score"], d
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2
    assert client.get_run(out["pipeline"]["run_id"]).data.tags["champion_decision"] == "kept"
    out_v3_run = out["pipeline"]["run_id"]

    # 5. a bad drop: rejected with its report; data, DVC version and registry untouched
    before = (root / "data/raw/news/data.csv").read_bytes()
    versions = len(client.search_model_versions(f"name='{MODEL}'"))
    (root / "data/inbox").mkdir(exist_ok=True)
    (root / "data/inbox/bad.csv").write_text('"2","Fine title","Fine body"\n"9","Bad label","Body"\n"3","  ","x"\n')
    state = retrain_flow(str(root), strong, return_state=True)
    assert state.type.value == "FAILED" and state.name == "Rejected"
    out = state.result(raise_on_failure=False)
    assert out["status"] == "rejected"
    rules = {(e["row"], e["rule"]) for e in out["ingest"]["errors"]}
    assert ("2", "isin(['1', '2', '3', '4', 'Business', 'Sci/Tech', 'Sports', 'World'])") in rules
    assert ("3", "not_blank") in rules
    assert (root / "data/raw/news/data.csv").read_bytes() == before and _md5(root) == md5s[v3]
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2
    rejected = list((root / "data/inbox/rejected").glob("*/bad.csv"))
    assert len(rejected) == 1 and (rejected[0].parent / "report.json").exists()

    # 6. lineage, through the real command line: each version resolves to its data version
    def lineage(*args) -> tuple[int, str]:
        p = subprocess.run(
            [sys.executable, "-m", "flows.cli", "lineage", *args, "--tracking-uri", mlflow_server],
            cwd=root,
            capture_output=True,
            text=True,
        )
        return p.returncode, p.stdout + p.stderr

    for v, md5 in md5s.items():
        rc, out = lineage(f"{MODEL}/{v}", "--json")
        assert rc == 0, out
        info = json.loads(out)
        assert info["lineage"]["dvc_data_md5"] == md5
        assert info["lineage"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert info["parents"] and info["parents"][0]["status"] == "merged"
        assert len(info["lineage"]["git_commit"]) == 40
    rc, out = lineage(f"{MODEL}@champion", "--verify", "--json")
    info = json.loads(out)  # champion v2 was trained on older data, checked against its own data version
    assert rc == 0 and str(info["model"]["version"]) == v2 and info["verify"]["ok"], out
    assert info["verify"]["trained_version"]["md5"] == md5s[v2]
    rc, table = lineage(f"{MODEL}/{v3}", "--verify")
    assert rc == 0 and "MATCH" in table and md5s[v3] in table and "dvc_data_md5" in table, table
    data = root / "data/raw/news/data.csv"
    good = data.read_bytes()
    data.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one byte tampered
    for ref in (f"{MODEL}@champion", f"{MODEL}/{v3}"):
        rc, out = lineage(ref, "--verify", "--json")
        assert rc == 1 and not json.loads(out)["verify"]["ok"], out
    data.write_bytes(good)
    # the inbox is git-ignored: retraining leaves no untracked files that would mark runs git_dirty
    assert client.get_run(out_v3_run).data.tags["git_dirty"] == "False"
