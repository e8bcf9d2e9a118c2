"""The Prefect flow: run each stage as a cached task, then record the run in MLflow.

A task's cache key is flows.stages.cache_key (content of inputs + params section +
source). A cache hit is trusted only if the outputs it recorded are still on disk with
the same content; otherwise the task runs again.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime, task

from flows import tracking
from flows.stages import BY_NAME, STAGES, Stage, cache_key, outputs_intact
from tasks.common import PipelineError, content_hash
from tasks.config import Params
from tasks.modeling import resolve_source


def _source_fingerprint(params: Params) -> str:
    """Stages that read the base model also key on its files when it is a local copy."""
    source, lineage = resolve_source(params.model)
    if Path(source).is_dir():
        return content_hash(Path(source))
    return f"{lineage['base_model']}@{lineage['base_model_revision']}"


@task(persist_result=True, result_serializer="json")
def run_stage(stage_name: str, params_json: dict, root: str, key: str) -> dict:
    # `key` is not read here: it is what the cache is keyed on (see cache_key_fn below).
    params = Params.model_validate(params_json)
    return BY_NAME[stage_name].run(params, Path(root)).to_json()


def _stage_task(stage: Stage, refresh: bool):
    return run_stage.with_options(
        name=stage.name,
        cache_key_fn=lambda ctx, p: p["key"],
        refresh_cache=refresh,
    )


def run_stages(params: Params, root: Path, logger=None) -> dict[str, dict]:
    """Run every stage in order; returns {stage: {"status", "outputs", "summary"}}."""
    report: dict[str, dict] = {}
    fingerprint = _source_fingerprint(params)
    for stage in STAGES:
        extra = fingerprint if stage.name in ("tokenize", "quantize") else ""
        key = cache_key(stage, params, root, extra)
        args = dict(stage_name=stage.name, params_json=params.model_dump(mode="json"), root=str(root), key=key)
        state = _stage_task(stage, refresh=False)(**args, return_state=True)
        if state.is_completed() and state.name == "Cached" and not outputs_intact(state.result()["outputs"], root):
            if logger:
                logger.warning(f"{stage.name}: cached outputs changed or missing on disk; running again")
            state = _stage_task(stage, refresh=True)(**args, return_state=True)
        if not state.is_completed():
            exc = state.result(raise_on_failure=False)
            if isinstance(exc, BaseException):
                raise exc
            raise PipelineError(f"stage {stage.name} ended in state {state.name}")
        out = state.result()
        report[stage.name] = {"status": "cached" if state.name == "Cached" else "ran", "key": key,
                              "outputs": out["outputs"], "summary": out["summary"]}
        if logger:
            logger.info(f"{stage.name}: {report[stage.name]['status']}")
    return report


@flow(name="qlora-pipeline", log_prints=True)
def qlora_pipeline(params_json: dict, root: str, params_file: str = "params.yaml") -> dict:
    logger = get_run_logger()
    params = Params.model_validate(params_json)
    root_path = Path(root).resolve()
    flow_run_id = str(runtime.flow_run.id)
    with tracking.pipeline_run(params, root_path, flow_run_id=flow_run_id, params_file=params_file) as mlrun:
        stages = run_stages(params, root_path, logger)
        mlrun.record(stages)
    return {"stages": stages, "mlflow": mlrun.info, "flow_run_id": flow_run_id}


