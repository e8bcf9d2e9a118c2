"""What every `qlora` process shares, the stage processes DVC starts included: its environment,
its exit codes, the one-line error and the command's log file.

`qlora run` and `qlora retrain` write their whole log to a file under .qlora/logs/: their own
records, Prefect's and DVC's, each exception's traceback, and the output of every stage process
DVC starts for them (the stages inherit the file's path and write there instead of the console).
The console keeps what a person reads: a line per stage, the results, one line per error naming
the file. -v puts the library notices and the stages' own output back on the console."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

PARAMS = "params.yaml"
EXIT_ERROR, EXIT_BUSY, EXIT_REJECTED = 2, 3, 4
VERBOSE_ENV = "QLORA_VERBOSE"  # "1": library notices reach the console too (`-v`); inherited by the stages
LOG_ENV = "QLORA_LOG"  # the command's log file; the stage processes it starts write their output there
LOGS_DIR = ".qlora/logs"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_log_file: Path | None = None  # the log this process writes, once open_log opened it


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


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
    if verbose():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weights loaded to check a logged model
    # MLflow sets its logger's level when it is imported, from this variable: a level set before is lost
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # after a colour code
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO: monitors started, artifacts validated


def open_log(root: Path, command: str) -> Path:
    """Start this command's log file: every log record from INFO up, from any library, goes there
    (the console shows what its handlers let through), and the stages inherit its path."""
    global _log_file
    folder = Path(root) / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")  # append mode: the stages append to it too
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.set_name(LOG_ENV)
    root_logger = logging.getLogger()
    for earlier in [h for h in root_logger.handlers if h.get_name() == LOG_ENV]:  # a command run before in-process
        root_logger.removeHandler(earlier)
        earlier.close()
    root_logger.addHandler(handler)
    logging.captureWarnings(True)  # the warnings still shown reach the file as well, through py.warnings
    _log_file = path.resolve()
    os.environ[LOG_ENV] = str(_log_file)
    log_line(f"qlora {' '.join(sys.argv[1:])} in {Path(root).resolve()} (pid {os.getpid()})")
    return _log_file


def log_path() -> str | None:
    """The log file as the user names it: relative to the project when inside it."""
    if _log_file is None:
        return None
    try:
        return str(_log_file.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(_log_file)


def log_line(text: str) -> None:
    """Text for the log file only (a traceback, an error's whole message)."""
    if _log_file is None or not text:
        return
    with open(_log_file, "a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def log_exception(exc: BaseException) -> None:
    log_line("".join(traceback.format_exception(exc)))


@contextmanager
def printed_to_log():
    """What a library prints (not logs) inside the block goes to the log file instead of the
    console, unless -v: MLflow's registry prints its progress to stderr."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            yield
    finally:
        log_line(buffer.getvalue())


def stage_output_to_log() -> None:
    """In a stage process DVC started for a command that keeps a log (and not -v): this process's
    stdout and stderr, and those of the processes it starts, append to that log."""
    path = os.environ.get(LOG_ENV)
    if not path or not os.environ.get("DVC_STAGE") or verbose():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def fail(msg: str) -> int:
    print(error_line(msg), file=sys.stderr)
    return EXIT_ERROR


def error_line(msg: str) -> str:
    """One line; where this process keeps a log, it ends with the file (the message is logged there too)."""
    where = log_path()
    line = " ".join(part.strip() for part in msg.splitlines() if part.strip())  # a tool's output quoted in it
    if where is None:
        return f"qlora: error: {line}"
    log_line(f"qlora: error: {msg}")
    return f"qlora: error: {line} (full log: {where})"
