"""One writing command at a time per project: an exclusive lock file under .qlora/.

The kernel releases the lock when its holder exits, even on SIGKILL, so a crash never
leaves the project locked. A command holding the lock hands it down to the stage commands
DVC runs for it (QLORA_LOCK_HOLDER names the holder; a child checks the holder is one of its
ancestors), and those children exit when the holder dies (`die_with_holder`).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tasks.catalog import LOCK_FILE, SERVE_LOCK_FILE

HOLDER_ENV = "QLORA_LOCK_HOLDER"


class ProjectBusy(RuntimeError):
    pass


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_ancestor(pid: int) -> bool:
    p = os.getppid()
    while p > 1:
        if p == pid:
            return True
        p = _parent_of(p)
    return False


def inherited_holder() -> int | None:
    """The pid of an ancestor `qlora` command that holds the project lock for this process."""
    holder = os.environ.get(HOLDER_ENV, "")
    return int(holder) if holder.isdigit() and _is_ancestor(int(holder)) else None


@contextmanager
def project_lock(root: Path, wait: bool = False, what: str = "qlora run"):
    path = Path(root) / LOCK_FILE
    if inherited_holder() is not None:
        yield  # a parent command (qlora run) holds it and runs this stage through DVC
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    previous = os.environ.get(HOLDER_ENV)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            raise ProjectBusy(
                f"another pipeline run holds {path} ({holder}); it is writing this project's "
                f"outputs. Wait for it, or pass --wait to queue behind it."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps({"pid": os.getpid(), "command": what, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(),
            0,
        )
        os.environ[HOLDER_ENV] = str(os.getpid())  # inherited by the stages DVC starts
        yield
    finally:
        if previous is None:
            os.environ.pop(HOLDER_ENV, None)
        else:
            os.environ[HOLDER_ENV] = previous
        os.close(fd)  # closing releases the lock


class AlreadyServed(RuntimeError):
    pass


@contextmanager
def serve_lock(root: Path):
    """One `qlora serve` per project: a second would start a second schedule, whose ticks the
    project lock would turn into Skipped runs at best. Held for as long as the scheduler runs;
    the kernel releases it when that process exits, even on SIGKILL."""
    path = Path(root) / SERVE_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            raise AlreadyServed(
                f"{path}: another `qlora serve` already schedules this project's retraining "
                f"({holder}); stop it first (kill its pid) to serve with other settings"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"pid": os.getpid(), "command": "qlora serve", "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            ).encode(),
            0,
        )
        yield
    finally:
        os.close(fd)


def die_with_holder(interval: float = 0.5) -> None:
    """In a stage started for a `qlora` command: end this process when that command dies
    (say, SIGKILL), so no training outlives the run that asked for it."""
    holder = inherited_holder()
    if holder is None:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(holder, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval)

    threading.Thread(target=watch, name="die-with-holder", daemon=True).start()
