"""What every `qlora` process shares, the stage processes DVC starts included: its environment,
its exit codes and the one-line error."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

PARAMS = "params.yaml"
EXIT_ERROR, EXIT_BUSY, EXIT_REJECTED = 2, 3, 4
VERBOSE_ENV = "QLORA_VERBOSE"  # "1": library notices reach the console too (`-v`); inherited by the stages


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
    quiet_libraries()


def quiet_libraries() -> None:
    """Library notices that say nothing about this run stay off the console unless -v: deprecations
    addressed to library authors, an optional CPU kernel package that is not installed, load reports
    of heads a classifier trains anyway, schema hints. Our own warnings and every error still show."""
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO: monitors started, artifacts validated


def fail(msg: str) -> int:
    print(f"qlora: error: {msg}", file=sys.stderr)
    return EXIT_ERROR
