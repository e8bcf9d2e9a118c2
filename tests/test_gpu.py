"""The CUDA path of the trainer: 4-bit base on the GPU, paged AdamW, Liger kernels, and the
fast path of train.speed: auto (tasks/speed.py, tasks/fast_lora.py). Skipped where there is
no CUDA GPU (CI); run on a GPU machine."""
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


def _liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _pipeline(tmp_path, **train_options):
    model_dir = build_tiny_llama(tmp_path / "tiny-llama", ALPACA)
    rows = pd.read_json(ALPACA).assign(row=lambda d: [str(i + 1) for i in range(len(d))])
    (tmp_path / "data/split").mkdir(parents=True)
    (tmp_path / "data/validated").mkdir(parents=True)
    for name, part in (("train", rows.iloc[:80]), ("validation", rows.iloc[80:90]), ("test", rows.iloc[90:])):
        part.to_json(tmp_path / f"data/split/{name}.jsonl", orient="records", lines=True)
    (tmp_path / "data/validated/labels.json").write_text(json.dumps({"names": []}))
    params = Params.model_validate(repo_params(
        task="causal_lm", data={"path": str(ALPACA), "label_names": None}, model={"name": str(model_dir)},
        tokenize={"max_length": 256}, eval={"num_samples": 1, "max_new_tokens": 4},
        train={"max_steps": 10, "batch_size": 8, "lr": 0.01, "device": "cuda", "log_every": 1, **train_options}))
    for stage in (tokenize, quantize, train, evaluate):
        stage.run(params, tmp_path)
    summary = json.loads((tmp_path / "reports/train/summary.json").read_text())
    loss = pd.read_csv(tmp_path / "reports/train/loss.csv")["loss"].tolist()
    assert summary["device"].startswith("cuda") and summary["optimizer"] == "paged_adamw_32bit"
    assert len(loss) == 10 and loss[-1] < loss[0]
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["answer_tokens"] > 0
    return summary


@pytest.mark.parametrize("precision", ["fp32_upcast", "mixed"])
def test_cuda_training_uses_paged_optimizer_and_learns(tmp_path, precision):
    summary = _pipeline(tmp_path, speed="off", gradient_checkpointing=True, liger_kernels=_liger(),
                        precision=precision)
    assert summary["liger_kernels"] is _liger() and summary["speed"]["fast"] is False


def test_speed_auto_takes_the_fast_path_and_evaluation_runs_unpatched(tmp_path):
    from transformers.models.llama import modeling_llama
    forward, layer_forward = modeling_llama.LlamaForCausalLM.forward, modeling_llama.LlamaDecoderLayer.forward
    rope = modeling_llama.apply_rotary_pos_emb
    summary = _pipeline(tmp_path, speed="auto", gradient_checkpointing=False, precision="fp32_upcast")
    assert summary["speed"]["fast"] and summary["speed"]["compiled_layers"] == 2
    assert summary["speed"]["fused_lora_layers"] == 14  # 7 linear layers x 2 decoder layers
    assert summary["liger_kernels"] is _liger()
    assert modeling_llama.LlamaForCausalLM.forward is forward and modeling_llama.LlamaDecoderLayer.forward is layer_forward
    assert modeling_llama.apply_rotary_pos_emb is rope


def _nf4(out_features: int, in_features: int, seed: int = 0):
    """A random weight quantized as the pipeline does (NF4, double quant), on the GPU."""
    import bitsandbytes.functional as F
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_features, in_features, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    nf4 = {"packed": packed, "absmax": state.absmax, "nested_absmax": state.state2.absmax,
           "nested_code": state.state2.code, "offset": state.offset, "shape": [out_features, in_features],
           "blocksize": state.blocksize, "quant_type": "nf4", "dtype": torch.bfloat16}
    return nf4, F.dequantize_4bit(packed, state).to(torch.bfloat16)


def test_fused_lora_keeps_small_adapter_outputs_on_cuda():
    """cuBLAS adds the adapter output to the base GEMM's fp32 accumulator and rounds once: an
    adapter output far below half a bf16 step of the layer's output moves the result by its
    own size on average. Rounding the base output first (PEFT's sum) loses most of it."""
    from tasks.fast_lora import nf4_lora_linear
    nf4, w = _nf4(1024, 2048)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    a = torch.randn(16, 2048, device="cuda", generator=g) * 0.02
    b = torch.full((1024, 16), 2e-5, device="cuda")
    with torch.no_grad():
        base = x @ w.t()
        delta = (x.float() @ a.t() @ b.t()) * 2.0
        assert delta.abs().mean() < 2e-3 * base.float().abs().mean()
        fused = nf4_lora_linear(x, nf4, a, b, 2.0, 0.0)
        peft = base + delta.to(torch.bfloat16)
    kept = {name: ((out.float() - base.float()) * delta).sum().item() / (delta * delta).sum().item()
            for name, out in (("fused", fused), ("peft", peft))}
    assert 0.8 < kept["fused"] < 1.2, kept
    assert kept["peft"] < 0.5, kept


def test_fused_lora_gradients_match_the_fp32_computation_on_cuda():
    from tasks.fast_lora import nf4_lora_linear
    nf4, w = _nf4(768, 512, seed=2)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 300, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    a = (torch.randn(16, 512, device="cuda", generator=g) * 0.05).requires_grad_()
    b = (torch.randn(768, 16, device="cuda", generator=g) * 0.05).requires_grad_()
    grad = torch.randn(2, 300, 768, device="cuda", generator=g)
    xf = x.float().requires_grad_()
    (xf @ w.float().t() + 2.0 * (xf @ a.t()) @ b.t()).backward(grad)
    ref = {"x": xf.grad, "a": a.grad.clone(), "b": b.grad.clone()}
    a.grad = b.grad = None
    xb = x.clone().requires_grad_()
    nf4_lora_linear(xb, nf4, a, b, 2.0, 0.0).backward(grad.to(torch.bfloat16))
    for name, got in (("x", xb.grad), ("a", a.grad), ("b", b.grad)):
        err = ((got.float() - ref[name]).norm() / ref[name].norm()).item()
        assert err < 1e-2, (name, err)  # bf16 operands: between 1e-3 and 1e-2
