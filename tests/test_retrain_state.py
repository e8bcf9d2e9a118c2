"""Facts retraining reads after a crash, without training: MLflow runs of killed processes are
closed with the reason, and `lineage --verify` checks a model against its own data version."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import env, git


def test_run_of_a_killed_process_is_marked_killed_by_the_next_command(tmp_path):
    import mlflow

    from flows.tracking import mlflow_record

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    script = textwrap.dedent(f"""
        import sys, time, mlflow
        from flows.tracking import mlflow_record
        mlflow.set_tracking_uri({uri!r})
        mlflow.set_experiment("dead")
        with mlflow.start_run(tags=mlflow_record.process_tags()) as run:
            print(run.info.run_id, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    run_id = proc.stdout.readline().strip()
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("dead")
    assert mlflow_record.close_dead_runs(mlflow, exp.experiment_id) == []  # alive: left alone
    assert client.get_run(run_id).info.status == "RUNNING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with mlflow.start_run(experiment_id=exp.experiment_id, tags={"qlora_host": "elsewhere", "qlora_pid": "1"}) as other:
        pass
    client.update_run(other.info.run_id, status="RUNNING")  # another host's run: no way to know, left alone
    assert mlflow_record.close_dead_runs(mlflow, exp.experiment_id) == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[mlflow_record.END_REASON_TAG].startswith(f"process {proc.pid} on ")
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def _dvc(root, *args):
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_verify_checks_a_version_against_its_own_data_version(tmp_path):
    """Two committed data versions: a model trained on the first verifies after the second is
    committed; one tampered byte in the data on disk, or in the cached first version, fails it."""
    from flows.dvc import dvc_ops
    from flows.tracking import lineage

    root = tmp_path / "p"
    (root / "data/raw/news").mkdir(parents=True)
    git(root, "init", "-q")
    _dvc(root, "init", "-q")
    data = root / "data/raw/news/data.csv"
    data.write_text("1,a,b\n2,c,d\n")
    _dvc(root, "add", "-q", "data/raw/news")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    old_md5 = dvc_ops.dvc_md5(root / "data/raw/news.dvc")
    data.write_text("1,a,b\n2,c,d\n3,e,f\n")
    _dvc(root, "add", "-q", "data/raw/news")
    git(root, "commit", "-qam", "v2")
    new_md5 = dvc_ops.dvc_md5(root / "data/raw/news.dvc")

    def info(md5):
        return {
            "lineage": {
                "data_path": "data/raw/news/data.csv",
                "dvc_file": "data/raw/news.dvc",
                "dvc_tracked_path": "data/raw/news",
                "data_md5": md5,
                "dvc_data_md5": md5,
                "data_verified": "true",
            }
        }

    old = lineage.verify(info(old_md5), root)
    assert old["ok"] and old["trained_version"]["md5"] == old_md5, old
    assert old["trained_version"]["git_commit"] == git(root, "rev-parse", "HEAD~1").strip()
    assert lineage.verify(info(new_md5), root)["ok"]

    good = data.read_bytes()
    data.write_bytes(good.replace(b"e,f", b"e,g"))  # one byte on disk
    assert not lineage.verify(info(old_md5), root)["ok"]
    assert not lineage.verify(info(new_md5), root)["ok"]
    data.write_bytes(good)
    assert lineage.verify(info(old_md5), root)["ok"]

    with dvc_ops._repo(root) as repo:  # one byte of the first version in the DVC cache
        listing = Path(repo.cache.local.oid_to_path(old_md5)).read_text()
        import json

        obj = Path(repo.cache.local.oid_to_path(json.loads(listing)[0]["md5"]))
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes().replace(b"c,d", b"c,e"))
    bad = lineage.verify(info(old_md5), root)
    assert not bad["ok"] and "DVC cache" in bad["problems"][0], bad
    assert lineage.verify(info("0" * 32 + ".dir"), root)["ok"] is False  # a version git never held
