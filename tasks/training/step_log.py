"""The train stage's steps as they happen, for whoever watches: one JSON line per logged step and
per validation pass, appended to catalog.TRAIN_STEPS_LIVE and flushed at once. The flow process
that runs the stage forwards the lines to MLflow (flows/tracking/live.py); the stage itself
imports no tracking library. Only the main process writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks import catalog


class StepLog:
    def __init__(self, root: Path, enabled: bool = True, total_steps: int | None = None):
        self.path = Path(root) / catalog.TRAIN_STEPS_LIVE
        self.total_steps = total_steps  # in each row: a watcher's progress is step / total_steps
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")

    def write(self, rows: list[dict]) -> None:
        if self._file is None or not rows:
            return
        now, total = time.time(), {"total_steps": self.total_steps} if self.total_steps else {}
        self._file.write("".join(json.dumps({**row, **total, "time": now}) + "\n" for row in rows))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
