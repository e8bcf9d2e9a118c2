"""The CUDA path of the trainer: 4-bit base on the GPU, paged AdamW, Liger kernels on a
Llama model. Skipped where there is no CUDA GPU (CI); run on a GPU machine."""
import json

import pandas as pd
import pytest
import torch

from tasks import evaluate, quantize, tokenize, train
from tasks.config import Params
from tests.conftest import ALPACA, repo_params
from tests.tiny_llm import build_tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32_upcast", "mixed"])
def test_cuda_training_uses_paged_optimizer_and_learns(tmp_path, precision):
    model_dir = build_tiny_llama(tmp_path / "tiny-llama", ALPACA)
    rows = pd.read_json(ALPACA).assign(row=lambda d: [str(i + 1) for i in range(len(d))])
    (tmp_path / "data/split").mkdir(parents=True)
    (tmp_path / "data/validated").mkdir(parents=True)
    for name, part in (("train", rows.iloc[:80]), ("validation", rows.iloc[80:90]), ("test", rows.iloc[90:])):
        part.to_json(tmp_path / f"data/split/{name}.jsonl", orient="records", lines=True)
    (tmp_path / "data/validated/labels.json").write_text(json.dumps({"names": []}))
    liger = True
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        liger = False
    params = Params.model_validate(repo_params(
        task="causal_lm", data={"path": str(ALPACA), "label_names": None}, model={"name": str(model_dir)},
        tokenize={"max_length": 256}, eval={"num_samples": 1, "max_new_tokens": 4},
        train={"max_steps": 10, "batch_size": 8, "lr": 0.01, "device": "cuda", "gradient_checkpointing": True,
               "liger_kernels": liger, "log_every": 1, "precision": precision}))
    for stage in (tokenize, quantize, train, evaluate):
        stage.run(params, tmp_path)
    summary = json.loads((tmp_path / "reports/train/summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["optimizer"] == "paged_adamw_32bit"
    assert summary["liger_kernels"] is liger
    loss = pd.read_csv(tmp_path / "reports/train/loss.csv")["loss"].tolist()
    assert loss[-1] < loss[0]
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["answer_tokens"] > 0
