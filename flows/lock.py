"""One pipeline run at a time per project: an exclusive lock file under .qlora/.

The kernel releases the lock when its holder exits, even on SIGKILL, so a crash never
leaves the project locked.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path


class ProjectBusy(RuntimeError):
    pass


@contextmanager
def project_lock(root: Path, wait: bool = False, what: str = "qlora run"):
    path = Path(root) / ".qlora" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            raise ProjectBusy(f"another pipeline run holds {path} ({holder}); it is writing this project's "
                              f"outputs. Wait for it, or pass --wait to queue behind it.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": what,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
