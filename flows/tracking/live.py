"""The MLflow run of a pipeline while it works. It opens when the first stage actually runs, so
its start and duration are the pipeline's; the train stage's steps reach it as they happen; and
system metrics (CPU, memory, GPU where present) are sampled into it. record_pipeline fills the
same run with the results and closes it; a pipeline that fails closes it FAILED with the cause.

The train stage is a separate process that imports no MLflow (tasks/ never does): it appends one
JSON line per logged step to catalog.TRAIN_STEPS_LIVE, and a thread here tails that file.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from flows.tracking import mlflow_record
from tasks import catalog
from tasks.config import Params

# a step line's keys -> metric names, as record_pipeline names them from reports/train/loss.csv
STEP_METRICS = {"loss": "train_loss", "lr": "learning_rate"}


class StepTail:
    """The rows appended to the train stage's step file since the last read, whole lines only.
    from_end: start at the file's current end (rows an earlier run left are not this run's). A
    file shorter than what was read was started again: it is read from its start."""

    def __init__(self, path: Path, from_end: bool = False):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            if f.seek(0, 2) < self.offset:
                self.offset = 0
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        rows = [json.loads(line) for line in complete.decode().splitlines()]
        self.offset += len(complete)
        return rows


class LiveRun:
    def __init__(self, params: Params, root: Path, parent_run_id: str | None = None, every_s: float = 0.5):
        self.params, self.root, self.parent_run_id, self.every_s = params, Path(root), parent_run_id, every_s
        self.run_id: str | None = None
        self.last_step = -1  # the last train step forwarded
        self._tail = StepTail(self.steps_file)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor = None

    @property
    def steps_file(self) -> Path:
        return Path(self.root) / catalog.TRAIN_STEPS_LIVE

    def start(self) -> str:
        mlflow, uri, _ = mlflow_record.use_store(self.params, self.root)
        client = mlflow.tracking.MlflowClient()
        experiment = mlflow.get_experiment_by_name(self.params.tracking.experiment)
        tags = {**mlflow_record.process_tags(), "qlora_live": "true"}  # the pid lets a later command mark it KILLED
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        self.run_id = client.create_run(experiment.experiment_id, tags=tags).info.run_id
        self.steps_file.unlink(missing_ok=True)  # a file of an earlier run: its steps are not this run's
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=uri)
            self._monitor.start()
        except ImportError:  # psutil missing: no system metrics, the run itself is unaffected
            self._monitor = None
        self._client = client
        self._thread = threading.Thread(target=self._forward, name="mlflow-live", daemon=True)
        self._thread.start()
        return self.run_id

    def _forward(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.flush()
            except Exception:  # a tracking hiccup must not stop the pipeline; record_pipeline logs every step later
                pass

    def flush(self) -> None:
        """Send the steps appended since the last flush (whole lines only)."""
        from mlflow.entities import Metric

        metrics, last = [], self.last_step
        for row in self._tail.read():
            step, at = int(row.pop("step")), int(row.pop("time", time.time()) * 1000)
            for key, value in row.items():
                name = STEP_METRICS.get(key) or (key if key.startswith("val_") else None)
                if name and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.append(Metric(name, float(value), at, step))
            last = max(last, step)
        for i in range(0, len(metrics), 900):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 900])
        self.last_step = last  # only once sent: record_pipeline logs the steps after it

    def stop(self) -> None:
        """Stop forwarding (after a last flush) and sampling; the run stays open for the record."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self.flush()
            except Exception:
                pass
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def fail(self, error: BaseException) -> None:
        self.stop()
        if self.run_id is not None:
            try:
                self._client.set_tag(self.run_id, "qlora_error", f"{type(error).__name__}: {error}"[:5000])
                self._client.set_terminated(self.run_id, "FAILED")
            except Exception:  # the tracking server is gone: the next command marks the run KILLED (its pid tag)
                pass
