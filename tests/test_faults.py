"""Faults of the world (#27): leftover and corrupt training checkpoints, refusals that say
what to do (and whose suggested command works), drops judged on the merged dataset, a full
disk (a real tmpfs), two schedulers on one project, a drop still being written. Each fault
is injected for real."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from tasks.training import checkpoint
from tests.test_causal_lm import tiny_llama  # noqa: F401 (fixture)


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def _save(folder: Path, step: int, key: str, seed: int = 0) -> Path:
    model, optimizer, scheduler = _training(seed)
    return checkpoint.save(folder, model, optimizer, scheduler, {"fingerprint": key, "step": step})


def test_a_leftover_step_folder_of_another_run_no_longer_breaks_the_save(tmp_path):
    """The reported crash: a killed run left step-00000050 (other data) and its temp folder;
    renaming the new step 50 over it is ENOTEMPTY. Now each key has its folder, other keys are
    pruned, and a leftover of the same name under this key is replaced."""
    root = tmp_path / ".qlora/checkpoints/train"
    stale = _save(root, 50, "other-data")  # the layout before keys: step folders in the root
    (root / ".step-00000050.tmp").mkdir()
    (root / ".step-00000050.tmp" / "trainable.safetensors").write_bytes(b"half")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "x").write_text("x")
    with pytest.raises(OSError) as crash:  # what checkpoint.save did: os.replace over the leftover
        os.replace(fresh, stale)
    assert crash.value.errno == errno.ENOTEMPTY
    removed = checkpoint.prune(root, "new-data")
    assert sorted(p.name for p in removed) == [".step-00000050.tmp", "step-00000050"]
    folder = checkpoint.run_dir(root, "new-data")
    # leftovers inside this key's folder too: a killed attempt's step 50 and temp folder
    _save(folder, 50, "new-data", seed=1)
    (folder / ".step-00000050.tmp").mkdir()
    saved = _save(folder, 50, "new-data", seed=2)
    assert saved == folder / "step-00000050" and checkpoint.check(saved) is None
    model, optimizer, scheduler = _training(seed=3)
    assert checkpoint.restore(checkpoint.latest(folder, "new-data"), model, optimizer, scheduler)["step"] == 50
    assert torch.equal(model.weight, _training(seed=2)[0].weight)  # the new save, not the leftover
    assert sorted(p.name for p in root.iterdir()) == ["new-data"]
    assert [p.name for p in folder.iterdir()] == ["step-00000050"]  # no temp or set-aside folder left
    assert "/" not in checkpoint.run_dir(root, "a/b").relative_to(root).as_posix()  # not a plain name: hashed


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_a_corrupt_or_half_written_checkpoint_is_skipped_with_a_log_line(tmp_path, capsys, damage):
    folder = checkpoint.run_dir(tmp_path, "k")
    _save(folder, 1, "k", seed=1)
    newest = _save(folder, 2, "k", seed=2)
    target = newest / "optimizer.pt"
    if damage == "truncate":  # a copy or a crash that did not reach the disk whole
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:  # the manifest is written last: without it the folder is a save cut short
        (newest / checkpoint.MANIFEST).unlink()
    found = checkpoint.latest(folder, "k")
    assert found == folder / "step-00000001"
    out = capsys.readouterr().out
    assert f"train: checkpoint {newest} skipped: " in out
    assert {
        "truncate": "optimizer.pt has",
        "flip": "optimizer.pt does not match its sha256",
        "no_manifest": "no manifest.json",
    }[damage] in out
    # the next save of step 2 replaces the damaged folder
    _save(folder, 2, "k", seed=2)
    assert checkpoint.latest(folder, "k") == folder / "step-00000002"


def test_training_over_another_runs_checkpoints_and_a_truncated_one_finishes(tmp_path, capsys, tiny_llama):  # noqa: F811
    """train.run under a new key, in a folder a killed run left: another key's checkpoints, the
    old layout's step folder of the same step number and this key's own truncated step 2. It
    prunes the others, skips the truncated one with a log line, trains from step 0 and saves."""
    from tasks import train
    from tests.test_validation import early_params, prepare, summary

    params = early_params(tiny_llama, checkpoint_every=2, max_steps=4, early_stopping=False, eval_every=0)
    prepare(params, tmp_path)
    root = tmp_path / ".qlora/checkpoints/train"
    _save(root, 2, "old-data")
    _save(root / "old-key", 2, "old-key")
    bad = _save(checkpoint.run_dir(root, "new-key"), 2, "new-key")
    (bad / "trainable.safetensors").write_bytes((bad / "trainable.safetensors").read_bytes()[:10])
    train.run(params, tmp_path, resume_key="new-key")
    out = capsys.readouterr().out
    assert f"train: removed {root / 'step-00000002'}" in out and f"train: removed {root / 'old-key'}" in out
    assert f"train: checkpoint {bad} skipped: trainable.safetensors has 10 bytes" in out
    s = summary(tmp_path)
    assert (s["steps"], s["resumed_from_step"]) == (4, 0)
    assert not root.exists()  # spent, and no other run's left


# --- drops: judged file by file, and on the merged dataset (#27 goal 6)
def _news_rows(start: int, n: int, label: str | None = None) -> list[list[str]]:
    return [[label or str(1 + i % 4), f"Title {i}", f"Body of story number {i}."] for i in range(start, start + n)]


def _write_csv(path: Path, rows) -> Path:
    path.write_text("".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows))
    return path


def _ingest_setup(tmp_path: Path, raw_rows, settle: float = 0):
    from tasks.config import Params
    from tests.conftest import repo_params

    raw = _write_csv(tmp_path / "data.csv", raw_rows)
    params = Params.model_validate(repo_params(data={"path": str(raw)}, retrain={"settle_seconds": settle}))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return params, raw, inbox


def test_a_bad_file_is_rejected_alone_and_one_class_files_are_judged_on_the_merged_dataset(tmp_path):
    from tasks.data.ingest import ingest

    params, raw, inbox = _ingest_setup(tmp_path, _news_rows(0, 40))
    _write_csv(inbox / "a_sports_only.csv", _news_rows(100, 5, label="2"))  # one class: fine, the dataset has 4
    _write_csv(inbox / "b_bad.csv", _news_rows(200, 2) + [["9", "Bad label", "Body"]])
    _write_csv(inbox / "c_world_only.csv", _news_rows(300, 3, label="1") + _news_rows(0, 1))  # 1 row already there
    before = raw.read_bytes()
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 8
    assert out.accepted == [
        {"file": str(inbox / "a_sports_only.csv"), "rows_added": 5, "rows_skipped": 0},
        {"file": str(inbox / "c_world_only.csv"), "rows_added": 3, "rows_skipped": 1},
    ]
    assert out.rejected == [{"file": str(inbox / "b_bad.csv"), "errors": 1}]
    assert [(e["file"], e["row"], e["rule"]) for e in out.errors] == [
        (str(inbox / "b_bad.csv"), "3", "isin(['1', '2', '3', '4', 'Business', 'Sci/Tech', 'Sports', 'World'])")
    ]
    assert raw.read_bytes().startswith(before) and raw.read_text().count("\n") == 48
    report = json.loads((tmp_path / "reports/ingest.json").read_text())
    assert report["accepted"] == out.accepted and report["rejected"] == out.rejected
    assert sorted(p.name for p in (inbox / "processed").glob("*/*")) == ["a_sports_only.csv", "c_world_only.csv"]
    assert sorted(p.name for p in (inbox / "rejected").glob("*/*")) == ["b_bad.csv", "report.json"]


def test_too_few_classes_in_the_merged_dataset_merges_nothing(tmp_path):
    from tasks.data.ingest import ingest

    params, raw, inbox = _ingest_setup(tmp_path, _news_rows(0, 10, label="3"))  # one class so far
    _write_csv(inbox / "more_of_the_same.csv", _news_rows(100, 4, label="Business"))  # the same class by name
    before = raw.read_bytes()
    out = ingest(params, tmp_path, inbox)
    assert out.status == "rejected" and out.added_rows == 0 and raw.read_bytes() == before
    assert [(e["file"], e["rule"]) for e in out.errors] == [(str(raw), "at_least_2_classes")]
    _write_csv(inbox / "another_class.csv", _news_rows(200, 2, label="4"))
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 2 and not out.errors


def test_a_drop_still_being_written_is_left_for_a_later_run(tmp_path):
    """A real writer process copies a CSV into the inbox a line every 50 ms while ingest runs
    (settle 1 s): the half-written file is not taken; once the writer is done and the file has
    been still for the settle interval, the next ingest takes it whole."""
    import subprocess
    import sys
    import time

    from tasks.data.ingest import ingest

    params, raw, inbox = _ingest_setup(tmp_path, _news_rows(0, 20), settle=1.0)
    lines = "".join(",".join(f'"{v}"' for v in r) + "\n" for r in _news_rows(500, 40))
    target = inbox / "slow.csv"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "with open(sys.argv[1], 'w') as f:\n"
                "    for line in sys.stdin.read().splitlines(keepends=True):\n"
                "        f.write(line); f.flush(); time.sleep(0.05)\n"
            ),
            str(target),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    writer.stdin.write(lines)
    writer.stdin.close()
    deadline = time.time() + 10
    while not (target.exists() and target.stat().st_size) and time.time() < deadline:
        time.sleep(0.01)
    before = raw.read_bytes()
    looks = []
    while writer.poll() is None:
        out = ingest(params, tmp_path, inbox)
        looks.append(out.status)
        assert out.status == "no_new_data" and out.waiting == [str(target)] and raw.read_bytes() == before
        assert target.exists()
        time.sleep(0.3)
    assert writer.wait() == 0 and len(looks) >= 3
    time.sleep(1.1)
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 40 and not out.waiting
    assert raw.read_text().count("\n") == 60


# --- refusals: one line that names the file and what to do, and the command it suggests works (#27 goal 4)
def _cli(root: Path, *args, path_venv: bool = False):
    import subprocess

    from tests.conftest import env

    e = env()
    if path_venv:  # a user who activated the project's venv (the suggested `dvc ...` is its DVC)
        e["PATH"] = f"{root / '.venv/bin'}:{e['PATH']}"
    return subprocess.run(
        [".venv/bin/qlora", *args] if args and args[0] != "sh" else list(args),
        cwd=root,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "qlora: error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_tampered_data_is_refused_in_one_line_whose_restore_command_works(tmp_path):
    import re

    from tests.test_audit import owned_dataset_project

    root = owned_dataset_project(tmp_path / "project")
    data = root / "data/raw/news/data.csv"
    clean = data.read_bytes()
    data.write_bytes(clean.replace(b"a", b"e", 1))
    (root / "data/inbox").mkdir()
    (root / "data/inbox/new.csv").write_text('"2","A new title","A new body"\n')
    got = _cli(root, "retrain")
    assert got.returncode == 2, got.stderr
    line = _one_error_line(got.stderr)
    assert line.startswith(
        "qlora: error: data/raw/news/data.csv: the data on disk is not the version recorded in data/raw/news.dvc"
    ), line
    assert got.stderr.count("the data on disk is not the version") <= 2  # the error line and Prefect's state record
    restore = re.search(r"Restore the committed data[^`]*`([^`]+)`", line).group(1)
    assert restore == "git checkout data/raw/news.dvc && dvc checkout --force data/raw/news.dvc"
    fixed = _cli(root, "sh", "-c", restore, path_venv=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert data.read_bytes() == clean
    assert (root / "data/inbox/new.csv").exists()  # the refusal took nothing from the inbox
    from flows.dvc.data_check import check_data
    from tasks.config import load_params

    assert check_data(load_params(root / "params.yaml"), root).status == "verified"


# --- a full disk (#27 goal 10): a real size-limited tmpfs where the writes go
@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of 64 KiB mounted in the test's folder (root can mount here); _grow remounts it
    larger, as freeing space would. Skips where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")

    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _grow(mnt: Path, size: str = "8m") -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def test_a_full_disk_while_a_drop_is_appended_merges_nothing_and_keeps_the_drop(tmp_path, tiny_disk):
    from tasks.common import PipelineError
    from tasks.config import Params
    from tasks.data.ingest import ingest
    from tests.conftest import repo_params

    raw = _write_csv(tiny_disk / "data.csv", _news_rows(0, 800))  # ~36 KB of 64: its copy plus the drop do not fit
    params = Params.model_validate(repo_params(data={"path": str(raw)}, retrain={"settle_seconds": 0}))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _write_csv(inbox / "drop.csv", _news_rows(1000, 400))
    before = raw.read_bytes()
    with pytest.raises(
        PipelineError,
        match=r"data.csv: appending 400 new rows failed \(No space left on device\); "
        r"the dataset is unchanged and the drop stays in the inbox",
    ):
        ingest(params, tmp_path, inbox)
    assert raw.read_bytes() == before and sorted(p.name for p in tiny_disk.iterdir()) == ["data.csv"]
    assert (inbox / "drop.csv").exists() and not (inbox / "processed").exists()
    assert json.loads((tmp_path / "reports/ingest.json").read_text())["status"] == "failed"
    _grow(tiny_disk)  # space freed: the next run takes the same drop
    out = ingest(params, tmp_path, inbox)
    assert out.status == "merged" and out.added_rows == 400 and raw.read_text().count("\n") == 1200


def test_a_full_disk_while_a_stage_writes_is_one_error_line_and_publishes_nothing(
    tmp_path, tiny_disk, capsys, monkeypatch, agnews_small
):
    """`qlora stage validate` (what DVC runs) with data/ on a 64 KiB disk: the validated rows do
    not fit. One error line naming the cause and what to do; no data/validated, no temp folder.
    With space, the same command succeeds."""
    from flows.cli import main
    from tests.conftest import small_cls_params, write_params

    root = tmp_path / "project"
    root.mkdir()
    write_params(root, small_cls_params(agnews_small))
    (root / "data").symlink_to(tiny_disk)
    monkeypatch.chdir(root)
    assert main(["stage", "validate"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert (
        line.startswith("qlora: error: stage validate: ")
        and "No space left on device" in line
        and "free space on that disk" in line
    ), line
    assert list(tiny_disk.iterdir()) == []  # nothing half-written was published or left behind
    _grow(tiny_disk)
    assert main(["stage", "validate"]) == 0
    assert (root / "data/validated").is_dir()


def test_a_second_qlora_serve_on_one_project_refuses_at_once(tmp_path):
    """Two schedulers on one project would tick twice: the second `qlora serve` exits 3 with one
    error line naming the first, before it starts anything; the first keeps serving."""
    import subprocess
    import time

    from tests.test_audit import owned_dataset_project

    root = owned_dataset_project(tmp_path / "project")
    first = subprocess.Popen(
        [".venv/bin/qlora", "serve", "--cron", "0 3 * * *"],
        cwd=root,
        env=_serve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert first.stdout.readline().startswith("qlora serve: serving "), "the first serve did not start"
        started = time.time()
        second = _cli(root, "serve", "--cron", "* * * * *")
        assert second.returncode == 3 and time.time() - started < 60, second.stdout + second.stderr
        line = _one_error_line(second.stderr)
        assert "another `qlora serve` already schedules this project" in line and f'"pid": {first.pid}' in line
        assert "started a local Prefect server" not in second.stdout
        assert first.poll() is None  # the first still serves
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    again = subprocess.Popen(
        [".venv/bin/qlora", "serve", "--cron", "0 3 * * *"],
        cwd=root,
        env=_serve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:  # the kernel released the killed one's lock: a new serve starts
        assert again.stdout.readline().startswith("qlora serve: serving ")
    finally:
        os.killpg(again.pid, 9)
        again.wait()


def _serve_env() -> dict:
    from tests.conftest import env

    return env()


def _mlflow_client(uri: str):
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_a_full_disk_while_the_registry_copies_a_version_registers_nothing_half(tmp_path, tiny_disk, agnews_small):
    """`qlora run` with mlartifacts/ (where the registry keeps each version's copy) on a 4 MiB
    disk: the run's reports and adapter fit, the merged model of the version does not. One
    error line naming the cause and what to do; no model version, the MLflow run FAILED and
    the version's partial copy removed; the pipeline's outputs stand. With space, the next
    `qlora run` re-runs no stage and registers the version."""
    from tests.conftest import make_project, small_cls_params

    _grow(tiny_disk, "4m")
    raw = small_cls_params(agnews_small)
    root = make_project(tmp_path / "project", raw)
    (root / "mlartifacts").symlink_to(tiny_disk)
    got = _cli(root, "run")
    assert got.returncode == 2, got.stdout + got.stderr
    line = _one_error_line(got.stderr)
    assert "No space left on device" in line and "Free space on that disk and run `qlora run` again" in line, line
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = _mlflow_client(uri)
    name = raw["tracking"]["registered_model"]
    assert client.search_model_versions(f"name='{name}'") == []
    runs = _runs(client, raw["tracking"]["experiment"])
    assert [r.info.status for r in runs] == ["FAILED"], [r.info.status for r in runs]
    assert (root / "models/merged/config.json").exists() and (root / "dvc.lock").exists()
    _grow(tiny_disk, "512m")
    again = _cli(root, "run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(_stage_status(again.stdout).values()) == {"skipped"} and "(model version 1)" in again.stdout, (
        again.stdout
    )
    (version,) = client.search_model_versions(f"name='{name}'")
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert sorted(r.info.status for r in _runs(client, raw["tracking"]["experiment"])) == ["FAILED", "FINISHED"]


# --- servers of the world killed mid-run (#27 goal 10)
def _start_mlflow_server(folder: Path, port: int):
    """A real `mlflow server` on a SQLite backend in folder; the same folder and port start it
    again over the same records."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")]
        + ["--workers", "1"],
        stdout=open(folder / "server.log", "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except Exception:
            assert proc.poll() is None and time.time() < deadline, (folder / "server.log").read_text()
            time.sleep(0.3)


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run_until_training(root: Path, step: int = 3):
    """`qlora run` started in root, returned once training saved its checkpoint of step."""
    import subprocess
    import time

    from tests.conftest import env

    proc = subprocess.Popen(
        [".venv/bin/qlora", "run"],
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ckpts = root / ".qlora/checkpoints/train"
    deadline = time.time() + 300
    while not any(ckpts.glob(f"*/step-{step:08d}")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before training reached step {step}: {proc.communicate()}"
    return proc


def _stage_status(stdout: str) -> dict:
    return {
        line.split()[0]: line.split()[1]
        for line in stdout.splitlines()
        if line.startswith("  ") and len(line.split()) > 1 and line.split()[1] in ("ran", "skipped")
    }


@pytest.mark.slow
def test_the_tracking_server_killed_mid_run_then_restarted(tmp_path, agnews_small):
    """A real `mlflow server` SIGKILLed while `qlora run` trains: the stages finish and DVC keeps
    their outputs; the record fails in one error line naming the server and what to do. The
    server restarted on the same backend and port, the next `qlora run` re-runs no stage,
    records to it, and no MLflow run is left RUNNING."""
    from tests.conftest import make_project, small_cls_params
    from tests.test_reliability import _unused_port

    folder = tmp_path / "mlflow"
    folder.mkdir()
    port = _unused_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_mlflow_server(folder, port)
    try:
        raw = small_cls_params(agnews_small)
        raw["train"].update(max_steps=12, checkpoint_every=3)
        raw["tracking"]["tracking_uri"] = url
        root = make_project(tmp_path / "project", raw)
        run = _run_until_training(root)
        _kill_group(server)
        out, err = run.communicate(timeout=600)
        assert run.returncode == 2, out + err
        line = _one_error_line(err)
        assert f"MLflow tracking server {url} is unreachable" in line and "run the same command again" in line, line
        assert (root / "models/merged/config.json").exists() and not (root / ".qlora/checkpoints/train").exists()
        server = _start_mlflow_server(folder, port)
        again = _cli(root, "run")
        assert again.returncode == 0, again.stdout + again.stderr
        assert set(_stage_status(again.stdout).values()) == {"skipped"}, again.stdout
        assert f"at {url} (model version 1)" in again.stdout, again.stdout
        client = _mlflow_client(url)
        runs = _runs(client, raw["tracking"]["experiment"])
        assert "RUNNING" not in {r.info.status for r in runs} and "FINISHED" in {r.info.status for r in runs}
    finally:
        _kill_group(server)


@pytest.mark.slow
def test_the_prefect_server_killed_mid_run(tmp_path, agnews_small):
    """The Prefect server `qlora run` started, SIGKILLed while it trains: the run ends with one
    error line naming that server and what to do, leaves no process behind and releases the
    project; the next `qlora run` finishes the work, DVC skipping what was done."""
    import signal
    import time

    from tests.conftest import descendants, make_project, small_cls_params
    from tests.test_reliability import _alive

    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=12, checkpoint_every=3)
    root = make_project(tmp_path / "project", raw)
    run = _run_until_training(root)
    below = descendants(run.pid)
    servers = [p for p in below if b"prefect\x00server\x00start" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert servers, "the run has no Prefect server to kill"
    for server in servers:
        os.kill(server, signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    deadline = time.time() + 20
    while any(_alive(p) for p in below) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in below if _alive(p)], "processes outlived the run"
    assert run.returncode == 2, out + err
    line = _one_error_line(err)
    assert "the Prefect server of this command" in line and "run the same command again" in line, line
    again = _cli(root, "run")
    assert again.returncode == 0, again.stdout + again.stderr
    status = _stage_status(again.stdout)
    assert status["validate"] == "skipped" and status["merge"] in ("ran", "skipped"), again.stdout
    assert (root / "models/merged/config.json").exists()
    # nothing lost in the record either: the model is registered, and no run is left RUNNING
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    assert client.search_model_versions(f"name='{raw['tracking']['registered_model']}'")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
