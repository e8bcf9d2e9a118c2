"""`mlflow models serve` of a registered model as a user runs it, on a free loopback port, for
as long as a block needs it: the serving tests and bench/serve_load.py send it requests. The
CLI is run as a process, so nothing here imports MLflow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerDidNotAnswer(RuntimeError):
    """The server exited, or did not answer /ping in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def model_server(mlflow: Path, model_uri: str, cwd: Path, env: dict, log: Path, timeout: float) -> Iterator[str]:
    """Yields the base URL once /ping answers; the server and its workers are stopped when the
    block ends. mlflow: the CLI to run; env: its environment (MLFLOW_TRACKING_URI, PATH)."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(mlflow),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the CLI and the uvicorn workers it starts: one process group
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise ServerDidNotAnswer(
                        f"mlflow models serve did not answer on {url}:\n{Path(log).read_text()[-4000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL when it has not ended in 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
