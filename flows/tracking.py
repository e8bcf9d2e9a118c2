"""MLflow glue: one run per pipeline run, with params, metrics, plots, the adapter, the
merged model (as a registered model version) and lineage tags. It only reads the files
the stages wrote, so a run made by `dvc repro` can be recorded the same way (`qlora track`).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from flows.dvc_ops import find_dvc_file
from flows.stages import REPO
from tasks import evaluate, merge, quantize, tokenize, train, validate
from tasks.common import PipelineError, content_hash, read_json, resolve
from tasks.config import Params
from tasks.modeling import resolve_source

MERGED_HASH_TAG = "merged_sha256"
# Read once, at import: mlflow.set_tracking_uri() writes this variable itself, so a later
# read would return the last project's store rather than the user's choice.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(params: Params, root: Path) -> str:
    return params.tracking.tracking_uri or USER_TRACKING_URI or f"sqlite:///{root / 'mlruns.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
    except Exception as exc:
        raise PipelineError(f"MLflow tracking server {uri} is unreachable ({exc}); start it, or unset "
                            f"tracking.tracking_uri / MLFLOW_TRACKING_URI to use the local store") from None


def git_state(cwd: Path) -> dict:
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain")))}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def data_version(params: Params, root: Path) -> dict:
    """The DVC hash of the raw data when a .dvc file tracks it, and our own sha256 always."""
    path = resolve(root, params.data.path).resolve()
    facts = {"data_path": params.data.path, "data_sha256": content_hash(path)}
    dvc_file = find_dvc_file(path, root)
    if dvc_file is not None:
        meta = yaml.safe_load(dvc_file.read_text())
        facts.update({"dvc_file": str(dvc_file.relative_to(Path(root).resolve())),
                      "dvc_data_md5": meta["outs"][0].get("md5", ""), "dvc_data_path": meta["outs"][0].get("path", "")})
        if meta.get("deps"):
            facts["dvc_import_source"] = meta["deps"][0].get("path", "")
    return facts


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (list, type(None))) else v
    return flat


def _metric_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in s)


class PipelineRun:
    def __init__(self, mlflow, run, params: Params, root: Path, tags: dict):
        self.mlflow, self.run, self.params, self.root, self.tags = mlflow, run, params, root, tags
        self.info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                     "tracking_uri": mlflow.get_tracking_uri()}

    def record(self, stages: dict[str, dict]) -> None:
        mlflow, root = self.mlflow, self.root
        mlflow.set_tags({f"stage.{n}": s["status"] for n, s in stages.items()})
        self._log_dataset()
        log_path = root / train.REPORT_DIR / "loss.csv"
        if log_path.exists():
            from mlflow.entities import Metric
            import time
            now = int(time.time() * 1000)
            with open(log_path) as f:
                rows = list(csv.DictReader(f))
            metrics = [Metric("train_loss", float(r["loss"]), now, int(r["step"])) for r in rows]
            metrics += [Metric("learning_rate", float(r["lr"]), now, int(r["step"])) for r in rows]
            client = mlflow.tracking.MlflowClient()
            for i in range(0, len(metrics), 900):
                client.log_batch(self.run.info.run_id, metrics=metrics[i:i + 900])
            summary = read_json(root / train.REPORT_DIR / "summary.json")
            mlflow.log_metrics({f"train_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        metrics = read_json(root / evaluate.METRICS)
        split = metrics.get("split", "test")
        flat = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        for cls, vals in metrics.get("per_class", {}).items():
            flat.update({_metric_name(f"{split}_{m}_{cls}"): v for m, v in vals.items()})
        mlflow.log_metrics(flat)
        for rel in (train.REPORT_DIR, evaluate.EVAL_DIR):
            if (root / rel).is_dir():
                mlflow.log_artifacts(str(root / rel), rel)
        for rel in (validate.REPORT, evaluate.METRICS, f"{tokenize.OUT_DIR}/stats.json"):
            if (root / rel).exists():
                mlflow.log_artifact(str(root / rel), "reports")
        mlflow.log_artifacts(str(root / train.ADAPTER), "adapter")
        mlflow.log_artifact(str(root / quantize.OUT_DIR / "lineage.json"), "base_model")
        self._register_merged(stages)

    def _log_dataset(self) -> None:
        import pandas as pd
        path = self.root / validate.OUT_DIR / "dataset.jsonl"
        df = pd.read_json(path, lines=True, dtype=False)
        ds = self.mlflow.data.from_pandas(df, source=str(resolve(self.root, self.params.data.path)),
                                          name=Path(self.params.data.path).name,
                                          targets="label" if "label" in df else None)
        self.mlflow.log_input(ds, context="training")
        self.mlflow.set_tag("dataset_digest", ds.digest)

    def _register_merged(self, stages: dict[str, dict]) -> None:
        merged = self.root / merge.OUT_DIR
        if not (merged / "config.json").exists():
            return
        mlflow, name = self.mlflow, self.params.tracking.registered_model
        client = mlflow.tracking.MlflowClient()
        digest = stages.get("merge", {}).get("outputs", {}).get(merge.OUT_DIR) or content_hash(merged)
        try:
            existing = client.search_model_versions(f"name='{name}' and tags.{MERGED_HASH_TAG}='{digest}'")
        except Exception:
            existing = []
        if existing:  # the same weights are registered already: point at them, do not copy again
            mlflow.set_tag("registered_model_version", f"{name}/{existing[0].version}")
            self.info["model_version"] = existing[0].version
            return
        mlflow.log_artifacts(str(merged), "merged_model")
        try:
            client.create_registered_model(name)
        except Exception:
            pass  # already exists
        source = f"{self.run.info.artifact_uri}/merged_model"
        tags = {MERGED_HASH_TAG: digest, **{k: str(v) for k, v in self.tags.items()}}
        mv = client.create_model_version(name, source, run_id=self.run.info.run_id, tags=tags)
        mlflow.set_tag("registered_model_version", f"{name}/{mv.version}")
        self.info["model_version"] = mv.version


@contextmanager
def pipeline_run(params: Params, root: Path, flow_run_id: str = "", params_file: str = "params.yaml"):
    import mlflow
    uri, fallback_from = tracking_uri(params, root), None
    try:
        check_reachable(uri)
    except PipelineError as exc:
        if not params.tracking.fallback_to_local:
            raise
        fallback_from, uri = uri, f"sqlite:///{root / 'mlruns.db'}"
        print(f"warning: {exc}\nwarning: tracking.fallback_to_local is true: recording this run in {uri}")
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.tracking.experiment) is None:
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(params.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(params.tracking.experiment)
    _, base = resolve_source(params.model)
    tags = {**git_state(REPO), **data_version(params, root), **base, "task": params.task,
            "prefect_flow_run_id": flow_run_id, "params_file": params_file}
    if fallback_from:
        tags["tracking_fallback_from"] = fallback_from
    with mlflow.start_run(tags=tags, nested=mlflow.active_run() is not None) as run:
        mlflow.log_params(_flatten(params.model_dump(mode="json")))
        handle = PipelineRun(mlflow, run, params, root, tags)
        try:
            yield handle
        except BaseException as exc:
            mlflow.set_tag("error", str(exc)[:5000])
            report = root / validate.REPORT
            if report.exists():
                mlflow.log_artifact(str(report), "reports")
            mlflow.end_run(status="FAILED")
            raise
