"""A Prefect server for one command, when PREFECT_API_URL names none: `prefect server start`
on a free loopback port, its database in the project's .prefect/, and tied to this process
by the kernel (PR_SET_PDEATHSIG), so it dies with it, even on SIGKILL. Prefect's own
temporary server would outlive a killed parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tasks.common import PipelineError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_api(root: Path, services: bool = False, ui: bool = False, timeout: float = 120):
    """Yield the Prefect API URL to use; start a server for this command if none is configured.
    Must run before Prefect is imported (it reads PREFECT_API_URL at import)."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"], None
        return
    if "prefect" in sys.modules:  # it would run against a temporary server of its own that outlives a kill
        raise RuntimeError("Prefect was imported before prefect_api() chose its server")
    port = _free_port()
    log_path = Path(root) / ".prefect" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not services:
        cmd.append("--no-services")  # a pipeline run needs the API only; `qlora serve` needs the scheduler
    env = {**os.environ, "PREFECT_UI_ENABLED": "true" if ui else "false"}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the Prefect server for this run did not start; see {log_path}") from None
            time.sleep(0.2)
    os.environ["PREFECT_API_URL"] = url
    # The server is this command's own, on loopback: a refused connection means it is gone, and
    # Prefect's default back-off would only delay the command's error line by minutes.
    retries_set = "PREFECT_CLIENT_MAX_RETRIES" not in os.environ
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    try:
        yield url, proc
    except Exception as exc:
        if proc.poll() is None or isinstance(exc, PipelineError):
            raise
        # The flow cannot report a state to a dead API: whatever Prefect raised, the cause is the server.
        raise PipelineError(
            f"the Prefect server of this command (127.0.0.1:{port}) stopped mid-run (exit status "
            f"{proc.returncode}; its log: {log_path}), so the flow could not go on ({type(exc).__name__}). "
            f"What the stages finished is kept in dvc.lock: run the same command again; DVC skips it"
        ) from None
    finally:
        if "prefect" in sys.modules and proc.poll() is None:  # send the run's last logs before the server goes
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        os.environ.pop("PREFECT_API_URL", None)
        if retries_set:
            os.environ.pop("PREFECT_CLIENT_MAX_RETRIES", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
