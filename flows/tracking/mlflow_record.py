"""MLflow glue: one run per pipeline result, with params, metrics, plots, the adapter, a
registered model version (a servable MLflow model with its model card: flows/serving/model_version.py) and lineage tags (git commit, the data's DVC hash
and whether it was verified, the DVC experiment, the base model, the Prefect flow run).

A result is identified by dvc.lock's digest: a `qlora run` that ran no stage and finds a run
with the same digest records nothing new and names that run instead. It only reads the
files the stages wrote, so results made by `dvc repro` are recorded the same way.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tasks import catalog
from tasks.common import PipelineError, read_json
from tasks.config import Params

LOCK_TAG = "dvc_lock_sha256"
MERGED_HASH_TAG = "merged_md5"  # a version's weights, as DVC hashes them: one version per weights
ADAPTER_HASH_TAG = "adapter_md5"
# Read once, at import: mlflow.set_tracking_uri() writes this variable itself, so a later
# read would return the last project's store rather than the user's choice.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


# models/base/lineage.json facts the run is tagged with (a GGUF base adds its file and hash)
BASE_LINEAGE_TAGS = ("base_model", "base_model_source", "base_model_revision", "base_model_file", "base_model_sha256")


def tracking_uri(params: Params, root: Path) -> str:
    return params.tracking.tracking_uri or USER_TRACKING_URI or f"sqlite:///{Path(root) / 'mlruns.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
    except Exception as exc:
        raise PipelineError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, or unset "
            f"tracking.tracking_uri / MLFLOW_TRACKING_URI to use the local store"
        ) from None


def usable_uri(params: Params, root: Path) -> tuple[str, str | None]:
    """(the URI to record to, the unreachable one it falls back from, if any)."""
    uri = tracking_uri(params, root)
    try:
        check_reachable(uri)
        return uri, None
    except PipelineError as exc:
        if not params.tracking.fallback_to_local:
            raise
        local = f"sqlite:///{Path(root) / 'mlruns.db'}"
        print(f"warning: {exc}\nwarning: tracking.fallback_to_local is true: recording this run in {local}")
        return local, uri


# A tracking server that goes away mid-run fails each call after seconds of retries rather than
# MLflow's default minutes of backoff, so the command ends in its one error line. A user's own
# setting of these variables wins.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def use_store(params: Params, root: Path, create: bool = True, close_dead: bool = True):
    """Point MLflow at this project's store and experiment; returns (mlflow, uri, fallback_from).
    Runs left RUNNING by dead processes are marked KILLED first (close_dead=False: a command
    that only reads). create=False: a missing experiment is not created (a command that may
    have nothing to record)."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    import mlflow

    uri, fallback_from = usable_uri(params, root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.tracking.experiment) is None:
        if not create:
            return mlflow, uri, fallback_from
        location = (Path(root) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(params.tracking.experiment, artifact_location=location)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    if close_dead:
        close_dead_runs(mlflow, experiment.experiment_id)
    return mlflow, uri, fallback_from


PID_TAG, HOST_TAG = "qlora_pid", "qlora_host"  # the process that writes a run, while it runs
END_REASON_TAG = "qlora_end_reason"


def process_tags() -> dict[str, str]:
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def close_dead_runs(mlflow, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose writing process (on this host) is gone: a process killed
    mid-run cannot end its run itself. Runs of other hosts, or without a pid, are left alone."""
    import socket

    host = socket.gethostname()
    client = mlflow.tracking.MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or not _gone(int(pid)):
            continue
        client.set_tag(
            run.info.run_id,
            END_REASON_TAG,
            f"process {pid} on {host} is gone (killed or crashed); marked KILLED by the next qlora command",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        print(f"mlflow: marked {len(closed)} run(s) of dead processes KILLED: {', '.join(closed)}")
    return closed


def git_state(cwd: Path) -> dict:
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        # params.yaml and dvc.lock are recorded on the run itself (params, dvc_lock_sha256): dirty means
        # the code or anything else differs from git_commit.
        changes = git("status", "--porcelain", "--", ".", ":(exclude)params.yaml", ":(exclude)dvc.lock")
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(changes))}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (list, type(None))) else v
    return flat


def metric_name(s: str) -> str:
    """MLflow's UI reads '/' in a metric name as a section: 'test_f1_Sci/Tech' -> 'test_f1_Sci_Tech'."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in s)


def find_run(mlflow, digest: str, experiment: str):
    """The finished run that already records this dvc.lock, if any."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None or not digest:
        return None
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.{LOCK_TAG} = '{digest}' and attributes.status = 'FINISHED'",
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


RECORDED = ".qlora/recorded.json"  # {tracking uri: {dvc.lock digest: run info}}: what this project recorded


def _recorded(root: Path) -> dict:
    path = Path(root) / RECORDED
    return json.loads(path.read_text()) if path.exists() else {}


def _remember(root: Path, uri: str, digest: str, info: dict) -> None:
    from tasks.common import write_json

    known = _recorded(root)
    known.setdefault(uri, {})[digest] = {k: v for k, v in info.items() if k != "reused"}
    write_json(Path(root) / RECORDED, known)


def record_pipeline(
    params: Params,
    root: Path,
    outcome,
    parent_run_id: str | None = None,
    live_run_id: str | None = None,
    live_last_step: int = -1,
) -> dict:
    """Record a pipeline result; returns {"run_id", "tracking_uri", "reused", "model_version"?}.
    A run that ran no stage and whose dvc.lock is already recorded makes no new MLflow run.
    live_run_id: the run opened when the first stage ran (flows/tracking/live.py), filled and
    closed here; its train steps up to live_last_step are in it already."""
    if not outcome.ran_any and parent_run_id is None and live_run_id is None:
        known = _recorded(root).get(tracking_uri(params, root), {}).get(outcome.lock_digest)
        if known:  # this project recorded these very outputs (no need to even import mlflow)
            return {**known, "reused": True}
    try:
        mlflow, uri, fallback_from = use_store(params, root)
    except PipelineError as exc:  # the server went away while the stages ran: their outputs stand
        raise PipelineError(
            f"{exc}. The stages' outputs are kept (dvc.lock records them): once the server "
            f"answers, run the same command again; it records them without re-running a stage"
        ) from None
    if not outcome.ran_any and parent_run_id is None and live_run_id is None:
        existing = find_run(mlflow, outcome.lock_digest, params.tracking.experiment)
        if existing is not None:
            info = {"run_id": existing.info.run_id, "tracking_uri": uri, "reused": True}
            version = existing.data.tags.get("registered_model_version", "")
            if version:
                info["model_version"] = version.rsplit("/", 1)[-1]
            _remember(root, uri, outcome.lock_digest, info)
            return info
    base = read_json(Path(root) / catalog.BASE_LINEAGE)
    tags = {
        **git_state(root),
        **outcome.data["tags"],
        **{k: str(base[k]) for k in BASE_LINEAGE_TAGS if k in base},
        "task": params.task,
        "prefect_flow_run_id": outcome.flow_run_id,
        LOCK_TAG: outcome.lock_digest,
        **process_tags(),
        **(
            {"label_names": json.dumps(read_json(Path(root) / catalog.LABELS)["names"])}
            if params.task == "seq_cls"
            else {}
        ),
        **{f"stage.{n}": "ran" if s.ran else "skipped" for n, s in outcome.stages.items()},
    }
    source = Path(root) / catalog.VALIDATED_DIR / "source.json"  # hf:// data: what datasets.load_dataset loaded
    if source.exists():
        tags["data_fingerprint"] = read_json(source)["fingerprint"]
    if outcome.experiment is not None:
        tags.update(
            {
                "dvc_experiment": outcome.experiment.name,
                "dvc_experiment_rev": outcome.experiment.rev,
                "dvc_experiment_baseline": outcome.experiment.baseline,
            }
        )
    if fallback_from:
        tags["tracking_fallback_from"] = fallback_from
    run_name = outcome.experiment.name if outcome.experiment else None
    if live_run_id:  # resume the run that has been open since the first stage ran
        opening = {"run_id": live_run_id, "nested": mlflow.active_run() is not None}
        tags.update({"mlflow.runName": run_name} if run_name else {})
    elif parent_run_id:
        opening = {"run_name": run_name, "nested": True, "parent_run_id": parent_run_id}
    else:
        opening = {"run_name": run_name, "nested": mlflow.active_run() is not None}
    with mlflow.start_run(tags=tags, **opening) as run:
        mlflow.log_params(_flatten(params.model_dump(mode="json")))
        info = {"run_id": run.info.run_id, "tracking_uri": uri, "reused": False}
        _log_results(mlflow, run, params, Path(root), outcome, after_step=live_last_step)
        version = _register(mlflow, run, params, Path(root), outcome, tags)
        if version:
            info["model_version"] = version
            if parent_run_id is None:  # a retraining child leaves the decision to its champion/challenger step
                _crown_first_version(mlflow, params, version)
    if not fallback_from:
        _remember(root, uri, outcome.lock_digest, info)
    return info


def _crown_first_version(mlflow, params: Params, version: str) -> None:
    """A registry without a champion serves nothing: the version just registered becomes champion,
    recorded as a decision the way retraining records one, so `models:/NAME@champion` answers
    after the first run. Once a champion exists, only retraining's comparison moves it."""
    from flows.retrain_state import DECISION_TAG

    client = mlflow.tracking.MlflowClient()
    name, alias = params.tracking.registered_model, params.retrain.alias
    try:
        client.get_model_version_by_alias(name, alias)
        return
    except mlflow.exceptions.MlflowException:
        pass  # no such alias yet
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, DECISION_TAG, "promoted")
    mlflow.set_tags({"champion_decision": "promoted", "champion_reason": "first version"})


def _log_results(mlflow, run, params: Params, root: Path, outcome, after_step: int = -1) -> None:
    """after_step: the per-step curves up to this step were logged live (flows/tracking/live.py)."""
    from mlflow.entities import Metric

    _log_dataset(mlflow, params, root, outcome.stages["validate"].outs.get(catalog.VALIDATED_DIR, ""))
    if (root / catalog.TRAIN_LOSS_CSV).exists():
        now = int(time.time() * 1000)
        with open(root / catalog.TRAIN_LOSS_CSV) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) > after_step]
        metrics = [Metric("train_loss", float(r["loss"]), now, int(r["step"])) for r in rows]
        metrics += [Metric("learning_rate", float(r["lr"]), now, int(r["step"])) for r in rows]
        if (root / catalog.TRAIN_VALIDATION_CSV).exists():  # train.eval_every passes: val_loss (, val_accuracy)
            with open(root / catalog.TRAIN_VALIDATION_CSV) as f:
                metrics += [
                    Metric(k, float(v), now, int(r["step"]))
                    for r in csv.DictReader(f)
                    if int(r["step"]) > after_step
                    for k, v in r.items()
                    if k != "step" and v != ""
                ]
        client = mlflow.tracking.MlflowClient()
        for i in range(0, len(metrics), 900):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 900])
        summary = read_json(root / catalog.TRAIN_SUMMARY)
        mlflow.log_metrics(
            {f"train_{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        # how it trained: on how many processes, sharded how, and what each rank did
        mlflow.set_tags(
            {
                "train_world_size": str(summary.get("world_size", 1)),
                "train_strategy": str(summary.get("strategy", "single")),
            }
        )
        mlflow.log_metrics(
            {
                f"train_rank{r['rank']}_{k}": r[k]
                for r in summary.get("ranks", [])
                for k in ("tokens", "tokens_per_second", "train_seconds")
                if r.get(k) is not None
            }
        )
    metrics = read_json(root / catalog.METRICS)
    split = metrics.get("split", "test")
    flat = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    if (root / catalog.PER_CLASS).exists():
        for cls, vals in read_json(root / catalog.PER_CLASS).items():
            flat.update({metric_name(f"{split}_{m}_{cls}"): v for m, v in vals.items()})
    mlflow.log_metrics(flat)
    for rel in (catalog.TRAIN_REPORT_DIR, catalog.EVAL_DIR):
        if (root / rel).is_dir():
            mlflow.log_artifacts(str(root / rel), rel)
    if (root / catalog.SAMPLES).exists():  # causal_lm: prompt, reference, generated, scores; a table in the UI
        import pandas as pd

        samples = pd.read_json(root / catalog.SAMPLES, lines=True, dtype=False)
        if len(samples):
            mlflow.log_table(samples, artifact_file="eval/samples_table.json")
    for rel in (catalog.VALIDATION_REPORT, catalog.METRICS, catalog.TOKENIZE_STATS):
        if (root / rel).exists():
            mlflow.log_artifact(str(root / rel), "reports")
    mlflow.log_artifacts(str(root / catalog.ADAPTER_DIR), "adapter")
    mlflow.log_artifact(str(root / catalog.BASE_LINEAGE), "base_model")


def _log_dataset(mlflow, params: Params, root: Path, validated_md5: str) -> None:
    """The validated rows as MLflow's training input: a Hugging Face dataset (memory-mapped, so
    MLflow reads only the first rows for the schema) whose digest is DVC's md5 of data/validated."""
    from tasks.data.arrowio import open_rows
    from tasks.data.readers import is_hub

    d = params.data
    rows = open_rows(root / catalog.VALIDATED_ROWS)
    source = d.path if is_hub(d.path) or Path(d.path).is_absolute() else str(root / d.path)
    ds = mlflow.data.from_huggingface(
        rows,
        path=source,
        name=Path(d.path).name,
        digest=validated_md5[:32] or None,
        targets="label" if "label" in rows.column_names else None,
        revision=d.revision if is_hub(d.path) else None,
    )
    mlflow.log_input(ds, context="training")
    mlflow.set_tag("dataset_digest", ds.digest)


def _register(mlflow, run, params: Params, root: Path, outcome, tags: dict) -> str | None:
    """Register this result as a model version, a servable MLflow model (flows/serving/model_version.py) holding the
    merged model or only the adapter (tracking.register_as), unless the same weights are registered."""
    from flows.serving import model_version
    from flows.tracking import lineage
    from tasks.serve.card import record_facts, render_card, render_summary

    variant = params.tracking.register_as
    if variant == "merged" and not (root / catalog.MERGED_DIR / "config.json").exists():
        print(
            "warning: tracking.register_as is 'merged' but there is no merged model (merge.enabled is false): "
            "no model version registered"
        )
        return None
    name = params.tracking.registered_model
    client = mlflow.tracking.MlflowClient()
    hash_tag, out = (
        (MERGED_HASH_TAG, catalog.MERGED_DIR) if variant == "merged" else (ADAPTER_HASH_TAG, catalog.ADAPTER_DIR)
    )
    stage = "merge" if variant == "merged" else "train"
    digest = outcome.stages[stage].outs.get(out, "")
    try:
        existing = client.search_model_versions(f"name='{name}' and tags.{hash_tag}='{digest}'")
    except Exception:
        existing = []
    if existing:  # the same weights are registered already: point at them, do not copy again
        mlflow.set_tag("registered_model_version", f"{name}/{existing[0].version}")
        return existing[0].version
    # the card is rendered from the record just written: the facts `qlora lineage` shows
    info = {"model": {"name": name, "variant": variant}, **lineage.run_info(run.info.run_id, client)}
    facts = record_facts(info, variant)
    card = render_card(facts)
    mlflow.log_text(card, f"model_card/{catalog.CARD}")
    model_info = model_version.log_model(params, root, variant, card, tags={"variant": variant, hash_tag: digest})
    version_tags = {
        hash_tag: digest,
        "variant": variant,
        **{k: str(v) for k, v in tags.items() if not k.startswith("stage.") and k not in (PID_TAG, HOST_TAG)},
        **{k: f"{v:.6g}" for k, v in info["metrics"].items()},
    }
    mv = model_version.register(
        name,
        model_info,
        version_tags,
        f"QLoRA fine-tunes of {facts['base_model']} made by qlora-flow (task {params.task}). "
        f"Each version is a pyfunc MLflow model carrying its model card (bundle/README.md).",
    )
    facts["model"]["version"] = mv.version  # the description names it; the card cannot (it is inside the version)
    client.update_model_version(name, mv.version, description=render_summary(facts))
    mlflow.set_tag("registered_model_version", f"{name}/{mv.version}")
    return mv.version
