"""Retraining on new data: take the project lock -> check the data version -> ingest the
inbox -> version the data with DVC -> run the pipeline -> promote the new model version to
champion only if it beats the current one on the same held-out test set -> commit dvc.lock
with the data version, so each commit of the history reproduces with `dvc repro`.

A tick first finishes an interrupted retraining (flows/retrain_state.py reads where it stands
from git, DVC and the registry), then looks at the inbox. One parent MLflow run records each
attempt, rejected ones included, its pipeline run nested under it; a tick with nothing to do
records nothing in MLflow. The flow run's final state says what happened, so Prefect's UI and
automations see it: Completed (trained, or named "No new data"), Failed named
"Rejected" (a drop broke a rule; the report is attached as a Prefect artifact), Cancelled
named "Skipped" (another command held the project lock; a scheduled run never writes
beside it).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, Failed, State

from flows import retrain_state
from flows.dvc import dvc_ops
from flows.dvc.data_check import DataVersionMismatch, check_data, require_committed_version
from flows.lock import ProjectBusy, project_lock
from flows.pipeline import Project, qlora_pipeline
from flows.tracking import mlflow_record
from tasks import catalog
from tasks.common import PipelineError, resolve, write_json
from tasks.config import Params, ParamsError, check_retrain_ready, load_params


def beats(challenger: float, champion: float | None, greater_is_better: bool) -> bool:
    """Strictly better only: a tie keeps the current champion."""
    if champion is None:
        return True
    return challenger > champion if greater_is_better else challenger < champion


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(params: Params, project: Project) -> dict:
    from tasks.data.ingest import ingest

    res = ingest(params, project.root, resolve(project.root, params.retrain.inbox))
    return res.__dict__


@task(name="version-data", cache_policy=NO_CACHE)
def version_task(params: Params, project: Project, files: list[str]) -> dict:
    return dvc_ops.new_version(
        resolve(project.root, params.data.path),
        project.root,
        params.retrain.dvc_remote,
        params.retrain.git_commit,
        lambda md5: retrain_state.commit_message(files, md5),
    )


@task(name="commit-pipeline-state", cache_policy=NO_CACHE)
def commit_pipeline_task(project: Project, md5: str) -> str | None:
    return retrain_state.commit_pipeline_state(project.root, md5)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(params: Params, project: Project, model_version: str | None, pipeline_run_id: str) -> dict:
    """Decide champion or not, then record it on the model version in two steps: the decision
    (PENDING_TAG) before the alias moves and DECISION_TAG after, so an interruption between
    them is finished by applying the recorded decision, never by deciding again."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    name = params.tracking.registered_model
    recorded = (
        client.get_model_version(name, model_version).tags.get(retrain_state.PENDING_TAG) if model_version else None
    )
    decision = json.loads(recorded) if recorded else _decide(params, project, client, model_version)
    if model_version and not recorded:
        client.set_model_version_tag(name, model_version, retrain_state.PENDING_TAG, json.dumps(decision))
    if decision["promoted"]:
        client.set_registered_model_alias(name, params.retrain.alias, model_version)
    metric = decision["metric"]
    client.set_tag(pipeline_run_id, "champion_decision", "promoted" if decision["promoted"] else "kept")
    client.set_tag(pipeline_run_id, "champion_reason", decision["reason"])
    logged = client.get_run(pipeline_run_id).data.metrics
    if f"challenger_{metric}" not in logged:
        client.log_metric(pipeline_run_id, f"challenger_{metric}", decision["challenger_score"])
    if decision["champion_score"] is not None and f"champion_{metric}" not in logged:
        client.log_metric(pipeline_run_id, f"champion_{metric}", decision["champion_score"])
    if model_version:
        client.set_model_version_tag(
            name, model_version, f"test_{metric}_at_registration", str(decision["challenger_score"])
        )
        client.set_model_version_tag(
            name, model_version, retrain_state.DECISION_TAG, "promoted" if decision["promoted"] else "kept"
        )
    return decision


def _decide(params: Params, project: Project, client, model_version: str | None) -> dict:
    """Champion and challenger on this project's test split, both measured as the evaluate stage
    measures a version (its adapter on the project's saved base, in quant.compute_dtype): the
    challenger's score is its version's recorded test metric, the champion's adapter is scored
    the same way. The merged weights a version serves round differently from the adapter on the
    4-bit base, so scoring the merged models would give numbers that are not the versions' test
    metrics. A champion on another base model is scored as registered instead (no shared base)."""
    from flows.serving.model_version import local_model
    from tasks.common import read_json
    from tasks.evaluate import score_model

    r = params.retrain
    name = params.tracking.registered_model
    root = project.root
    metric = r.metric
    model_version = str(model_version) if model_version is not None else None
    recorded = (
        client.get_run(client.get_model_version(name, model_version).run_id).data.metrics if model_version else {}
    )
    challenger = recorded.get(f"test_{metric}")
    if challenger is None:  # eval.split is not test, or nothing registered: score the adapter as evaluate does
        challenger = score_model(params, root, root / catalog.ADAPTER_DIR)[metric]
    try:
        champ = str(client.get_model_version_by_alias(name, r.alias).version)
    except Exception:
        champ = None
    champion_score, basis = None, "adapter on the project's base"
    if champ is not None and champ != model_version:
        champ_mv = client.get_model_version(name, champ)
        base = read_json(root / catalog.BASE_LINEAGE).get("base_model")
        if (champ_mv.tags or {}).get("base_model") == base:
            import tempfile

            import mlflow

            with tempfile.TemporaryDirectory() as tmp:
                adapter = mlflow.artifacts.download_artifacts(
                    run_id=champ_mv.run_id, artifact_path="adapter", dst_path=tmp
                )
                champion_score = score_model(params, root, Path(adapter))[metric]
        else:
            basis = "as registered (the champion has another base model)"
            with local_model(f"models:/{name}/{champ}") as (local, _):
                champion_score = score_model(params, root, local)[metric]
            registered = catalog.MERGED_DIR if params.tracking.register_as == "merged" else catalog.ADAPTER_DIR
            challenger = score_model(params, root, root / registered)[metric]
    if model_version is None or (champ is not None and champ == model_version):
        promote, reason = False, "no new model version (same weights as an existing one)"
    else:
        promote = beats(challenger, champion_score, r.greater_is_better)
        reason = (
            "no champion yet"
            if champ is None
            else f"challenger {metric}={challenger:.4f} {'beats' if promote else 'does not beat'} "
            f"champion v{champ} {metric}={champion_score:.4f}"
        )
    return {
        "metric": metric,
        "challenger_version": model_version,
        "challenger_score": challenger,
        "champion_version": champ,
        "champion_score": champion_score,
        "scored": basis,
        "promoted": promote,
        "reason": reason,
        "champion_after": model_version if promote else champ,
    }


def _report_markdown(got: dict) -> str:
    rows = "\n".join(
        f"| {e['file']} | {e['row']} | {e['column']} | {e['rule']} | {e['value']} |" for e in got["errors"][:200]
    )
    merged = "\n".join(f"| {a['file']} | {a['rows_added']} | {a['rows_skipped']} |" for a in got.get("accepted", []))
    outcome = (
        f"the other files were merged:\n\n| accepted file | rows added | rows skipped |\n|---|---|---|\n{merged}"
        if merged
        else "nothing was merged, the dataset, its DVC version and the registry are unchanged."
    )
    return (
        f"# Rejected drop\n\n{len(got['errors'])} error(s) in {len(got.get('rejected', []))} file(s); {outcome}"
        f"\n\n| file | row | column | rule | value |\n|---|---|---|---|---|\n"
        f"{rows}\n\nFull report: `{catalog.INGEST_REPORT}`\n\n```json\n{json.dumps(got, indent=1)[:20000]}\n```\n"
    )


@flow(name="qlora-retrain")
def retrain_flow(root: str = ".", overrides: list[str] | None = None, wait_for_lock: bool = False):
    try:
        with project_lock(Path(root), wait=wait_for_lock, what="qlora retrain"):
            _record_tick(Path(root), {"status": "running"})
            got = _retrain(Path(root).resolve(), overrides or [])
            _record_tick(
                Path(root), {"status": got.name.lower(), "message": got.message} if isinstance(got, State) else got
            )
            return got
    except ProjectBusy as exc:
        get_run_logger().warning(f"skipped: {exc}")
        return Cancelled(name="Skipped", message=str(exc), data={"status": "busy", "message": str(exc)})
    except (PipelineError, ParamsError) as exc:  # its message names the file or setting and what to do: no traceback
        refused = isinstance(exc, (ParamsError, DataVersionMismatch))  # nothing was read or written
        data = {"status": "refused" if refused else "failed", "message": str(exc)}
        _record_tick(Path(root), data)
        return Failed(name="Refused" if refused else "Failed", message=str(exc), data=data)


def _record_tick(root: Path, got: dict) -> None:
    """What `qlora status` shows of the last tick. A tick that dies leaves "running" with its pid,
    which status reads as interrupted; a tick that finds nothing to do is recorded here, not in MLflow."""
    decision = (got.get("decision") or {}).get("reason")
    record = functools.partial(
        write_json,
        root / catalog.RETRAIN_LAST,
        {
            "status": got.get("status"),
            "pid": os.getpid(),
            "flow_run_id": str(runtime.flow_run.id),
            ("started_at" if got.get("status") == "running" else "finished_at"): time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"decision": decision} if decision else {}),
            **({"message": got["message"]} if got.get("message") else {}),
            **({"model_version": str(got["pipeline"].get("model_version"))} if got.get("pipeline") else {}),
        },
    )
    try:
        record()
    except OSError as exc:  # a full disk must not fail the tick whose work is done
        get_run_logger().warning(f"{catalog.RETRAIN_LAST} not written: {exc}")


def _retrain(root: Path, overrides: list[str]):
    logger = get_run_logger()
    params = load_params(root / dvc_ops.PARAMS_FILE, overrides)  # fails on a bad key before anything is written
    check_retrain_ready(params)
    project = Project(root=root)
    # Read-only until there is work: a tick with nothing to do records nothing in MLflow.
    mlflow, _, _ = mlflow_record.use_store(params, root, create=False)
    client = mlflow.tracking.MlflowClient()
    todo = retrain_state.pending(params, root, check_data(params, root), client)
    finished = None
    if todo is not None:  # an interrupted retraining first, before the inbox
        logger.warning(f"finishing an interrupted retraining: {todo.why}")
        _apply_overrides(root, overrides)
        finished = _attempt(params, project, todo)
    require_committed_version(check_data(params, root))  # before the inbox is merged into it, or anything written
    got = ingest_task(params, project)
    if got["status"] == "no_new_data":
        if finished is not None:
            return finished
        logger.info("no new data: retraining skipped")
        return Completed(
            name="No new data", message="no new data: retraining skipped", data={"status": "skipped", "ingest": got}
        )
    _apply_overrides(root, overrides)
    return _attempt(params, project, None, got)


def _apply_overrides(root: Path, overrides: list[str]) -> None:
    if overrides:  # the stages read params.yaml (DVC tracks it): the overrides go there, as `dvc exp run -S` does
        dvc_ops.apply_params(root, overrides)
        get_run_logger().info(f"params.yaml: set {', '.join(overrides)}")


def _attempt(params: Params, project: Project, todo: retrain_state.Pending | None, got: dict | None = None):
    """One retraining under its parent MLflow run: from the merged inbox (todo None), or the
    rest of an interrupted one (todo.step: version, train or decide)."""
    logger = get_run_logger()
    root = project.root
    mlflow, _, _ = mlflow_record.use_store(params, root)
    tags = {"qlora_kind": "retrain", "prefect_flow_run_id": str(runtime.flow_run.id), **mlflow_record.process_tags()}
    if todo is not None:
        tags.update(retrain_resumed=todo.step, retrain_resumed_why=todo.why)
    with mlflow.start_run(run_name="retrain", tags=tags) as parent:
        if got is not None:
            mlflow.set_tag("retrain_status", got["status"])
            mlflow.log_metric("added_rows", got["added_rows"])
            if (root / catalog.INGEST_REPORT).exists():
                mlflow.log_artifact(str(root / catalog.INGEST_REPORT), "reports")
            if got["status"] == "rejected":
                first = got["errors"][0]
                msg = (
                    f"new data rejected ({len(got['errors'])} error(s)) in "
                    f"{', '.join(Path(r['file']).name for r in got['rejected'])}; first: {first['file']} row "
                    f"{first['row']}, rule {first['rule']}; dataset and model unchanged. The files are in "
                    f"{params.retrain.inbox}/rejected/ beside report.json ({catalog.INGEST_REPORT}): fix the "
                    f"rows and drop the files in {params.retrain.inbox} again"
                )
                mlflow.set_tag("retrain_message", msg)
                create_markdown_artifact(_report_markdown(got), key="rejected-drop", description=msg)
                return Failed(
                    name="Rejected",
                    message=msg,
                    data={"status": "rejected", "ingest": got, "run_id": parent.info.run_id},
                )
            if got["rejected"]:  # the good files of the drop are merged; the bad ones wait in inbox/rejected/
                msg = (
                    f"{len(got['rejected'])} file(s) of the drop rejected ({len(got['errors'])} error(s)), "
                    f"{len(got['accepted'])} merged; see {catalog.INGEST_REPORT}"
                )
                logger.warning(msg)
                mlflow.set_tag("retrain_rejected_files", ", ".join(Path(r["file"]).name for r in got["rejected"]))
                create_markdown_artifact(_report_markdown(got), key="rejected-drop", description=msg)
        else:
            mlflow.set_tag("retrain_status", f"resumed_{todo.step}")
        version = None
        if todo is None or todo.step == "version":
            # the drop's accepted files (an interrupted append: as its ingest report names them)
            files = [a["file"] for a in (got or _last_ingest(root)).get("accepted", [])]
            version = version_task(params, project, files)
            mlflow.set_tags(
                {
                    "dvc_data_md5": version["md5"],
                    "dvc_file": version["dvc_file"],
                    "data_git_commit": version["git_commit"] or "",
                }
            )
            if not params.retrain.git_commit:  # the new version is recorded in the workspace only
                logger.warning(
                    "retrain.git_commit is false: the new data version is not committed; "
                    "the run is recorded as unverified"
                )
        md5 = version["md5"] if version else todo.md5
        if todo is None or todo.step in ("version", "train"):
            out = qlora_pipeline(
                project, parent_run_id=parent.info.run_id, allow_unverified_data=not params.retrain.git_commit
            )
            pipeline, model_version = out.mlflow, out.mlflow.get("model_version")
        else:
            run_id = (
                mlflow.tracking.MlflowClient()
                .get_model_version(params.tracking.registered_model, todo.model_version)
                .run_id
            )
            pipeline, model_version = {"run_id": run_id, "model_version": todo.model_version}, todo.model_version
        if params.retrain.git_commit and dvc_ops.is_git_repo(root):
            lock_commit = commit_pipeline_task(project, md5)
            if lock_commit:
                mlflow.set_tag("pipeline_git_commit", lock_commit)
        decision = promote_task(params, project, model_version, pipeline["run_id"])
        mlflow.set_tags(
            {"champion_decision": "promoted" if decision["promoted"] else "kept", "champion_reason": decision["reason"]}
        )
        mlflow.log_dict(decision, "champion_decision.json")
        logger.info(f"champion decision: {decision['reason']}")
        return {
            "status": "trained" if todo is None else f"resumed ({todo.step})",
            "ingest": got or {},
            "data": version or {"md5": md5},
            "pipeline": pipeline,
            "decision": decision,
            "run_id": parent.info.run_id,
        }


def _last_ingest(root: Path) -> dict:
    path = root / catalog.INGEST_REPORT
    return json.loads(path.read_text()) if path.exists() else {}
