"""What every `qlora` process shares, the stage processes DVC starts included: its environment,
its exit codes and the one-line error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PARAMS = "params.yaml"
EXIT_ERROR, EXIT_BUSY, EXIT_REJECTED = 2, 3, 4


def configure_env(root: Path) -> None:
    # Must happen before Prefect is imported: it reads settings at import time.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # The stages DVC runs for this command use this interpreter (bin/qlora reads it).
    os.environ.setdefault("QLORA_PYTHON", sys.executable)


def fail(msg: str) -> int:
    print(f"qlora: error: {msg}", file=sys.stderr)
    return EXIT_ERROR
