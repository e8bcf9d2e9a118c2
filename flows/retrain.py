"""Retraining on new data: ingest the inbox -> version the data with DVC -> run the
pipeline -> promote the new model version to champion only if it beats the current one
on the same held-out test set. One parent MLflow run records each attempt, skipped and
rejected ones included; the pipeline's run is nested under it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task

from flows import dvc_ops, tracking
from flows.pipeline import qlora_pipeline
from tasks import merge
from tasks.common import resolve
from tasks.config import Params, check_retrain_ready, load_params
from tasks.evaluate import score_merged
from tasks.ingest import REPORT as INGEST_REPORT
from tasks.ingest import ingest


def beats(challenger: float, champion: float | None, greater_is_better: bool) -> bool:
    """Strictly better only: a tie keeps the current champion."""
    if champion is None:
        return True
    return challenger > champion if greater_is_better else challenger < champion


@task(name="ingest")
def ingest_task(params_json: dict, root: str) -> dict:
    params = Params.model_validate(params_json)
    res = ingest(params, Path(root), resolve(Path(root), params.retrain.inbox))
    return res.__dict__


@task(name="version-data")
def version_task(params_json: dict, root: str, files: list[str]) -> dict:
    params = Params.model_validate(params_json)
    names = ", ".join(Path(f).name for f in files)
    return dvc_ops.new_version(resolve(Path(root), params.data.path), Path(root), params.retrain.dvc_remote,
                               params.retrain.git_commit, f"data: merge {names} from the retraining inbox")


@task(name="promote")
def promote_task(params_json: dict, root: str, model_version: str | None, pipeline_run_id: str) -> dict:
    import mlflow
    params = Params.model_validate(params_json)
    r = params.retrain
    client = mlflow.tracking.MlflowClient()
    name = params.tracking.registered_model
    root_path = Path(root)
    metric = r.metric
    challenger = score_merged(params, root_path, root_path / merge.OUT_DIR)[metric]
    try:
        champ = client.get_model_version_by_alias(name, r.alias)
    except Exception:
        champ = None
    champion_score = None
    if champ is not None and champ.version != model_version:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=champ.source, dst_path=tmp)
            champion_score = score_merged(params, root_path, Path(local))[metric]
    if model_version is None or (champ is not None and champ.version == model_version):
        promote, reason = False, "no new model version (same weights as an existing one)"
    else:
        promote = beats(challenger, champion_score, r.greater_is_better)
        reason = ("no champion yet" if champ is None else
                  f"challenger {metric}={challenger:.4f} {'beats' if promote else 'does not beat'} "
                  f"champion v{champ.version} {metric}={champion_score:.4f}")
    if promote:
        client.set_registered_model_alias(name, r.alias, model_version)
    decision = {"metric": metric, "challenger_version": model_version, "challenger_score": challenger,
                "champion_version": champ.version if champ else None, "champion_score": champion_score,
                "promoted": promote, "reason": reason,
                "champion_after": model_version if promote else (champ.version if champ else None)}
    client.set_tag(pipeline_run_id, "champion_decision", "promoted" if promote else "kept")
    client.set_tag(pipeline_run_id, "champion_reason", reason)
    client.log_metric(pipeline_run_id, f"challenger_{metric}", challenger)
    if champion_score is not None:
        client.log_metric(pipeline_run_id, f"champion_{metric}", champion_score)
    if model_version:
        client.set_model_version_tag(name, model_version, f"test_{metric}_at_registration", str(challenger))
    return decision


@flow(name="qlora-retrain")
def retrain_flow(root: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    import mlflow
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / params_file, overrides or [])
    check_retrain_ready(params)
    pj = params.model_dump(mode="json")
    uri = tracking.tracking_uri(params, root_path)
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name="retrain", tags={"qlora_kind": "retrain",
                                                    "prefect_flow_run_id": str(runtime.flow_run.id)}) as parent:
        got = ingest_task(pj, str(root_path))
        mlflow.set_tag("retrain_status", got["status"])
        mlflow.log_metric("added_rows", got["added_rows"])
        if (root_path / INGEST_REPORT).exists():
            mlflow.log_artifact(str(root_path / INGEST_REPORT), "reports")
        if got["status"] != "merged":
            msg = "no new data: retraining skipped" if got["status"] == "no_new_data" else \
                f"new data rejected ({len(got['errors'])} error(s)); dataset and model unchanged; see {INGEST_REPORT}"
            logger.info(msg)
            mlflow.set_tag("retrain_message", msg)
            return {"status": "skipped" if got["status"] == "no_new_data" else "rejected", "ingest": got,
                    "run_id": parent.info.run_id}
        version = version_task(pj, str(root_path), got["files"])
        mlflow.set_tags({"dvc_data_md5": version["md5"], "dvc_file": version["dvc_file"],
                         "data_git_commit": version["git_commit"] or ""})
        out = qlora_pipeline(pj, str(root_path), params_file)
        decision = promote_task(pj, str(root_path), out["mlflow"].get("model_version"), out["mlflow"]["run_id"])
        mlflow.set_tags({"champion_decision": "promoted" if decision["promoted"] else "kept",
                         "champion_reason": decision["reason"]})
        mlflow.log_dict(decision, "champion_decision.json")
        logger.info(f"champion decision: {decision['reason']}")
        return {"status": "trained", "ingest": got, "data": version, "pipeline": out["mlflow"],
                "decision": decision, "run_id": parent.info.run_id}
