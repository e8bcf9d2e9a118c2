"""Retraining on new data: take the project lock -> check the data version -> ingest the
inbox -> version the data with DVC -> run the pipeline -> promote the new model version to
champion only if it beats the current one on the same held-out test set.

One parent MLflow run records each attempt, skipped and rejected ones included; the
pipeline's run is nested under it. The flow run's final state says what happened, so
Prefect's UI and automations see it: Completed (trained, or no new data), Failed named
"Rejected" (a drop broke a rule; the report is attached as a Prefect artifact), Cancelled
named "Skipped" (another command held the project lock; a scheduled run never writes
beside it).
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed

from flows import dvc_ops, tracking
from flows.data_check import DataVersionMismatch, check_data, require_committed_version
from flows.lock import ProjectBusy, project_lock
from flows.pipeline import Project, qlora_pipeline
from tasks import catalog
from tasks.common import PipelineError, resolve
from tasks.config import Params, ParamsError, check_retrain_ready, load_params


def beats(challenger: float, champion: float | None, greater_is_better: bool) -> bool:
    """Strictly better only: a tie keeps the current champion."""
    if champion is None:
        return True
    return challenger > champion if greater_is_better else challenger < champion


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(params: Params, project: Project) -> dict:
    from tasks.ingest import ingest
    res = ingest(params, project.root, resolve(project.root, params.retrain.inbox))
    return res.__dict__


@task(name="version-data", cache_policy=NO_CACHE)
def version_task(params: Params, project: Project, files: list[str]) -> dict:
    names = ", ".join(Path(f).name for f in files)
    return dvc_ops.new_version(resolve(project.root, params.data.path), project.root, params.retrain.dvc_remote,
                               params.retrain.git_commit, f"data: merge {names} from the retraining inbox")


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(params: Params, project: Project, model_version: str | None, pipeline_run_id: str) -> dict:
    import mlflow

    from flows.serving import local_model
    from tasks.evaluate import score_model
    r = params.retrain
    client = mlflow.tracking.MlflowClient()
    name = params.tracking.registered_model
    root = project.root
    metric = r.metric
    # the challenger as it was registered (tracking.register_as), the champion as the registry holds it
    registered = catalog.MERGED_DIR if params.tracking.register_as == "merged" else catalog.ADAPTER_DIR
    challenger = score_model(params, root, root / registered)[metric]
    try:
        champ = client.get_model_version_by_alias(name, r.alias)
    except Exception:
        champ = None
    champion_score = None
    if champ is not None and champ.version != model_version:
        with local_model(f"models:/{name}/{champ.version}") as (local, _):
            champion_score = score_model(params, root, local)[metric]
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


def _report_markdown(got: dict) -> str:
    rows = "\n".join(f"| {e['file']} | {e['row']} | {e['column']} | {e['rule']} | {e['value']} |"
                     for e in got["errors"][:200])
    merged = "\n".join(f"| {a['file']} | {a['rows_added']} | {a['rows_skipped']} |" for a in got.get("accepted", []))
    outcome = (f"the other files were merged:\n\n| accepted file | rows added | rows skipped |\n|---|---|---|\n"
               f"{merged}" if merged else "nothing was merged, the dataset, its DVC version and the registry are "
               "unchanged.")
    return (f"# Rejected drop\n\n{len(got['errors'])} error(s) in {len(got.get('rejected', []))} file(s); {outcome}"
            f"\n\n| file | row | column | rule | value |\n|---|---|---|---|---|\n"
            f"{rows}\n\nFull report: `{catalog.INGEST_REPORT}`\n\n```json\n{json.dumps(got, indent=1)[:20000]}\n```\n")


@flow(name="qlora-retrain")
def retrain_flow(root: str = ".", overrides: list[str] | None = None, wait_for_lock: bool = False):
    try:
        with project_lock(Path(root), wait=wait_for_lock, what="qlora retrain"):
            return _retrain(Path(root).resolve(), overrides or [])
    except ProjectBusy as exc:
        get_run_logger().warning(f"skipped: {exc}")
        return Cancelled(name="Skipped", message=str(exc), data={"status": "busy", "message": str(exc)})
    except (PipelineError, ParamsError) as exc:  # its message names the file or setting and what to do: no traceback
        refused = isinstance(exc, (ParamsError, DataVersionMismatch))  # nothing was read or written
        return Failed(name="Refused" if refused else "Failed", message=str(exc),
                      data={"status": "refused" if refused else "failed", "message": str(exc)})


def _retrain(root: Path, overrides: list[str]):
    logger = get_run_logger()
    params = load_params(root / dvc_ops.PARAMS_FILE, overrides)  # fails on a bad key before anything is written
    check_retrain_ready(params)
    require_committed_version(check_data(params, root))  # before the inbox is merged into it, or anything written
    if overrides:  # the stages read params.yaml (DVC tracks it): the overrides go there, as `dvc exp run -S` does
        dvc_ops.apply_params(root, overrides)
        logger.info(f"params.yaml: set {', '.join(overrides)}")
    project = Project(root=root)
    mlflow, _, _ = tracking.use_store(params, root)
    with mlflow.start_run(run_name="retrain", tags={"qlora_kind": "retrain",
                                                    "prefect_flow_run_id": str(runtime.flow_run.id)}) as parent:
        got = ingest_task(params, project)
        mlflow.set_tag("retrain_status", got["status"])
        mlflow.log_metric("added_rows", got["added_rows"])
        if (root / catalog.INGEST_REPORT).exists():
            mlflow.log_artifact(str(root / catalog.INGEST_REPORT), "reports")
        if got["status"] == "no_new_data":
            logger.info("no new data: retraining skipped")
            mlflow.set_tag("retrain_message", "no new data: retraining skipped")
            return {"status": "skipped", "ingest": got, "run_id": parent.info.run_id}
        if got["status"] == "rejected":
            first = got["errors"][0]
            msg = (f"new data rejected ({len(got['errors'])} error(s)) in "
                   f"{', '.join(Path(r['file']).name for r in got['rejected'])}; first: {first['file']} row "
                   f"{first['row']}, rule {first['rule']}; dataset and model unchanged. The files are in "
                   f"{params.retrain.inbox}/rejected/ beside report.json ({catalog.INGEST_REPORT}): fix the rows "
                   f"and drop the files in {params.retrain.inbox} again")
            mlflow.set_tag("retrain_message", msg)
            create_markdown_artifact(_report_markdown(got), key="rejected-drop", description=msg)
            return Failed(name="Rejected", message=msg,
                          data={"status": "rejected", "ingest": got, "run_id": parent.info.run_id})
        if got["rejected"]:  # the good files of the drop are merged; the bad ones wait in inbox/rejected/
            msg = (f"{len(got['rejected'])} file(s) of the drop rejected ({len(got['errors'])} error(s)), "
                   f"{len(got['accepted'])} merged; see {catalog.INGEST_REPORT}")
            logger.warning(msg)
            mlflow.set_tag("retrain_rejected_files", ", ".join(Path(r["file"]).name for r in got["rejected"]))
            create_markdown_artifact(_report_markdown(got), key="rejected-drop", description=msg)
        version = version_task(params, project, [a["file"] for a in got["accepted"]])
        mlflow.set_tags({"dvc_data_md5": version["md5"], "dvc_file": version["dvc_file"],
                         "data_git_commit": version["git_commit"] or ""})
        if not params.retrain.git_commit:  # the new version is recorded in the workspace only
            logger.warning("retrain.git_commit is false: the new data version is not committed; "
                           "the run is recorded as unverified")
        out = qlora_pipeline(project, parent_run_id=parent.info.run_id,
                             allow_unverified_data=not params.retrain.git_commit)
        decision = promote_task(params, project, out.mlflow.get("model_version"), out.mlflow["run_id"])
        mlflow.set_tags({"champion_decision": "promoted" if decision["promoted"] else "kept",
                         "champion_reason": decision["reason"]})
        mlflow.log_dict(decision, "champion_decision.json")
        logger.info(f"champion decision: {decision['reason']}")
        return {"status": "trained", "ingest": got, "data": version, "pipeline": out.mlflow,
                "decision": decision, "run_id": parent.info.run_id}
