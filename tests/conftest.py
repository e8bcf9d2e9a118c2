"""Shared fixtures. Prefect's ephemeral API and result store go to a temp dir; they must be
configured before Prefect is imported, hence at module import time here."""
import os
import tempfile
from pathlib import Path

_PREFECT_DIR = Path(tempfile.mkdtemp(prefix="qlora-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_DIR)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_PREFECT_DIR / "results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

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


@pytest.fixture(scope="session")
def agnews_small(tmp_path_factory) -> Path:
    """400 real AG News rows (100 per class), in the original headerless CSV format."""
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    small = df.groupby(0, group_keys=False).head(100)
    path = tmp_path_factory.mktemp("agnews") / "agnews_small.csv"
    small.to_csv(path, header=False, index=False)
    return path


def small_cls_params(data_path: Path) -> dict:
    return repo_params(data={"path": str(data_path)},
                       tokenize={"max_length": 48},
                       train={"max_steps": 4, "batch_size": 16, "log_every": 1},
                       eval={"batch_size": 64})


def pytest_sessionfinish(session, exitstatus):
    # Prefect logs "stopping temporary server" at exit, after pytest closed the captured
    # streams; keep that harmless message from printing a logging traceback.
    import logging
    logging.raiseExceptions = False
