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


class LiveRun:
    def __init__(self, params: Params, root: Path, parent_run_id: str | None = None, every_s: float = 0.5):
        self.params, self.root, self.parent_run_id, self.every_s = params, Path(root), parent_run_id, every_s
        self.run_id: str | None = None
        self.last_step = -1  # the last train step forwarded
        self._offset = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor = None

    @property
    def steps_file(self) -> Path:
        return self.root / catalog.TRAIN_STEPS_LIVE

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

        if not self.steps_file.exists():
            return
        with open(self.steps_file, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        if not complete:
            return
        metrics = []
        for line in complete.decode().splitlines():
            row = json.loads(line)
            step, at = int(row.pop("step")), int(row.pop("time", time.time()) * 1000)
            for key, value in row.items():
                name = STEP_METRICS.get(key) or (key if key.startswith("val_") else None)
                if name and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.append(Metric(name, float(value), at, step))
            self.last_step = max(self.last_step, step)
        for i in range(0, len(metrics), 900):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 900])
        self._offset += len(complete)

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
