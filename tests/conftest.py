"""Shared fixtures. Prefect's ephemeral API and result store go to a temp dir; they must be
configured before Prefect is imported, hence at module import time here."""

import os
import sys
import tempfile
from pathlib import Path

_PREFECT_DIR = Path(tempfile.mkdtemp(prefix="qlora-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_DIR)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_PREFECT_DIR / "results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["QLORA_PYTHON"] = sys.executable  # what bin/qlora runs the stages DVC starts with

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "datasets"
AG_NEWS = SHARED / "ag_news" / "test.csv"
ALPACA = SHARED / "alpaca_sample" / "alpaca_data_cleaned.json"
SELF_INSTRUCT = SHARED / "self_instruct_seed" / "seed_tasks.jsonl"


def repo_params(**sections) -> dict:
    """The repo's params.yaml with some sections updated (a dict per section)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def write_params(root: Path, raw: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=test@qlora", "-c", "user.name=test", *args],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def env() -> dict:
    """A command's environment as a user's shell gives it: no venv on PATH, no test settings."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_", "MLFLOW_"))}
    e.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    return e


def make_project(dest: Path, raw: dict | None = None, ag_news: bool = False) -> Path:
    """A fresh clone of this repository at `dest` (its tracked and new files, committed to a new
    git repository), with ../shared beside it as CI has, and the venv linked as `make setup`
    leaves it. raw: params to write. ag_news: restore the DVC-tracked AG News as `make data`
    does; otherwise its .dvc file is removed (tests that bring their own data)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in listed:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    shared = dest.parent / "shared"
    if not shared.exists():
        shared.symlink_to(SHARED.parent)
    (dest / ".venv").symlink_to(Path(sys.executable).parent.parent)
    if raw is not None:
        from flows.dvc.stages import render_dvc_yaml
        from tasks.config import Params

        write_params(dest, raw)
        (dest / "dvc.yaml").write_text(render_dvc_yaml(Params.model_validate(raw)))  # as `qlora run` would
    if not ag_news:
        (dest / "data/raw/ag_news.dvc").unlink()
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "fresh clone")
    if ag_news:
        p = subprocess.run(
            [sys.executable, "-m", "dvc", "update", "-q", "data/raw/ag_news.dvc"],
            cwd=dest,
            env=env(),
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert not git(dest, "status", "--porcelain", "data/raw/ag_news.dvc")  # the committed version
    return dest


@pytest.fixture(scope="session")
def agnews_small(tmp_path_factory) -> Path:
    """400 real AG News rows (100 per class), in the original headerless CSV format."""
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    small = df.groupby(0, group_keys=False).head(100)
    path = tmp_path_factory.mktemp("agnews") / "agnews_small.csv"
    small.to_csv(path, header=False, index=False)
    return path


def small_cls_params(data_path: Path) -> dict:
    return repo_params(
        data={"path": str(data_path)},
        tokenize={"max_length": 48},
        train={"max_steps": 4, "batch_size": 16, "log_every": 1},
        eval={"batch_size": 64},
    )


def pytest_sessionfinish(session, exitstatus):
    # Prefect logs "stopping temporary server" at exit, after pytest closed the captured
    # streams; keep that harmless message from printing a logging traceback.
    import logging

    logging.raiseExceptions = False


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def write_split(root: Path, params, parts: dict) -> None:
    """data/split as the split stage writes it, from frames of canonical rows (for tests that start
    at tokenize); `source` and `row` are filled in when missing."""
    from tasks import catalog
    from tasks.data.arrowio import RowsWriter
    from tasks.validate import canonical_features

    features = canonical_features(params)
    (root / catalog.SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    for name, frame in parts.items():
        frame = frame.assign(source=str(params.data.path)) if "source" not in frame else frame
        if "row" not in frame:
            frame = frame.assign(row=[str(i + 1) for i in range(len(frame))])
        with RowsWriter(root / catalog.split_file(catalog.SPLIT_DIR, name), features) as out:
            out.write({c: frame[c].astype(str).tolist() if c != "label" else frame[c].tolist() for c in features})


def command_logs(root: Path) -> str:
    """Every log file the project's commands wrote (.qlora/logs/): the stage processes' own lines
    (what train prints when it resumes or launches workers) go there, not to the console."""
    return "".join(p.read_text(errors="replace") for p in sorted((Path(root) / ".qlora/logs").glob("*.log")))
