"""The Prefect flow: check the data version, then the seven stages as tasks wired by their
real dependencies, then the MLflow record.

Prefect orchestrates (retries, the UI, schedules, work pools); it caches nothing. Whether a
stage is up to date is DVC's call: each task asks DVC to reproduce its one stage, which runs
`bin/qlora stage NAME` when its deps, params or code changed and skips it otherwise, exactly
as `dvc repro` would. A skipped task ends in a Completed state named "Skipped".
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel

from flows.dvc import dvc_ops
from flows.dvc.data_check import ALLOW_ENV, DataCheck, check_data, require_committed_version
from flows.dvc.stages import STAGES, upstream
from flows.stage_lines import StageLines
from flows.tracking import mlflow_record
from flows.tracking.live import LiveRun
from tasks.config import Params, load_params


class Project(BaseModel):
    """The project every task works in: a DVC repository (dvc.yaml, params.yaml, dvc.lock)."""

    root: Path

    def params(self) -> Params:
        return load_params(self.root / dvc_ops.PARAMS_FILE)


class StageOutcome(BaseModel):
    stage: str
    ran: bool  # False: DVC found it up to date
    seconds: float
    outs: dict[str, str]  # output path -> DVC md5, as dvc.lock records it


class Experiment(BaseModel):
    name: str
    rev: str  # the experiment's commit (refs/exps); `dvc exp apply NAME` restores it
    baseline: str  # the git commit it was made on


class PipelineOutcome(BaseModel):
    stages: dict[str, StageOutcome]
    data: dict
    lock_digest: str
    flow_run_id: str
    experiment: Experiment | None = None
    mlflow: dict = {}

    @property
    def ran_any(self) -> bool:
        return any(s.ran for s in self.stages.values())


@task(name="check-data", cache_policy=NO_CACHE)
def check_data_task(project: Project, params: Params) -> DataCheck:
    """Hash the raw data and compare it with its committed DVC version, before any stage reads it."""
    return require_committed_version(check_data(params, project.root))


@task(cache_policy=NO_CACHE)
def run_stage(project: Project, stage: str, upstream: list[StageOutcome]) -> StageOutcome:
    # `upstream` is not read: passing the upstream outcomes is what draws the DAG's edges in Prefect.
    started = time.perf_counter()
    ran = dvc_ops.reproduce(project.root, stage)
    outcome = StageOutcome(
        stage=stage,
        ran=ran,
        seconds=round(time.perf_counter() - started, 2),
        outs=dvc_ops.locked_outs(project.root, stage),
    )
    if not ran:
        return Completed(name="Skipped", message="up to date in dvc.lock", data=outcome)
    return outcome


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment_task(project: Project, name: str | None, stages: list[StageOutcome]) -> Experiment:
    exp_name, rev = dvc_ops.save_experiment(project.root, name)
    return Experiment(name=exp_name, rev=rev, baseline=mlflow_record.git_state(project.root)["git_commit"])


@task(name="record", cache_policy=NO_CACHE)
def record_task(
    project: Project,
    params: Params,
    outcome: PipelineOutcome,
    parent_run_id: str | None,
    live_run_id: str | None,
    live_last_step: int,
) -> dict:
    return mlflow_record.record_pipeline(
        params, project.root, outcome, parent_run_id, live_run_id=live_run_id, live_last_step=live_last_step
    )


@contextmanager
def _unverified_data_allowed(allow: bool):
    """The opt-in reaches the validate stage, which DVC runs as a separate process."""
    previous = os.environ.get(ALLOW_ENV)
    if allow:
        os.environ[ALLOW_ENV] = "1"
    try:
        yield
    finally:
        if allow and previous is None:
            os.environ.pop(ALLOW_ENV, None)


@flow(name="qlora-pipeline")
def qlora_pipeline(
    project: Project,
    experiment: bool = False,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    allow_unverified_data: bool = False,
) -> PipelineOutcome:
    """check-data -> validate -> split -> tokenize | quantize -> train -> evaluate | merge -> record.
    experiment: save the workspace as a DVC experiment afterwards (what `--set` asks for).
    parent_run_id: record as a child of this MLflow run (sweeps, retraining), always as a new run."""
    logger = get_run_logger()
    params = project.params()
    mlflow_record.usable_uri(params, project.root)  # an unreachable tracking server stops the run before any stage
    live = LiveRun(params, project.root, parent_run_id)
    try:
        with _unverified_data_allowed(allow_unverified_data):
            data = check_data_task(project, params)
            stale = dvc_ops.stale_stages(project.root)  # what DVC is about to run
            states, outcomes = {}, {}
            lines = StageLines(project.root)
            for stage in STAGES:
                if live.run_id is None and stage.name in stale:  # the MLflow run spans the work, from its start
                    logger.info(f"mlflow: run {live.start()} open while the stages run")
                # What DVC finds changed, the upstream stages done: a stage it is about to run gets a start line.
                why = dvc_ops.stale_stages(project.root, stage.name).get(stage.name)
                if why is not None:
                    lines.started(stage.name, why)
                started = time.perf_counter()
                # Upstream states as inputs: Prefect records them as the task's dependencies (the DAG's edges).
                with lines.train_steps() if stage.name == "train" and why is not None else nullcontext():
                    states[stage.name] = run_stage.with_options(name=stage.name)(
                        project, stage.name, [states[name] for name in upstream(stage)], return_state=True
                    )
                if not states[stage.name].is_completed():
                    lines.failed(stage.name, time.perf_counter() - started)
                done = outcomes[stage.name] = states[stage.name].result()  # raises if the stage failed
                lines.ended(stage.name, done.ran, done.seconds)
                logger.info(f"{stage.name}: {'ran' if done.ran else 'skipped (up to date in dvc.lock)'}")
        exp = save_experiment_task(project, experiment_name, list(outcomes.values())) if experiment else None
        outcome = PipelineOutcome(
            stages=outcomes,
            data=data.to_json() | {"tags": data.tags()},
            lock_digest=dvc_ops.lock_digest(project.root),
            flow_run_id=str(runtime.flow_run.id),
            experiment=exp,
        )
        live.stop()
        outcome.mlflow = record_task(project, params, outcome, parent_run_id, live.run_id, live.last_step)
    except BaseException as exc:
        live.fail(exc)
        raise
    return outcome
