"""train.precision and selective checkpointing (tasks/model/precision.py) on 4-bit CPU models:
where each mode keeps fp32, why it matters for the loss, and that the pipeline trains with it."""

import json

import pytest
import torch

from tasks.common import PipelineError
from tasks.config import LoraSection, ModelConfig, Params, QuantConfig, TrainConfig
from tasks.model.loading import load_base
from tasks.train import add_lora
from tests.test_causal_lm import causal_params, tiny_llama  # noqa: F401 (fixture)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Wide enough that bf16 rounding of small adapter outputs shows in the loss."""
    from bench.models import llama_shape
    from tests.tiny_llm import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("small-llama"), **llama_shape(512, 1536, 4, 8, 2, 4000))


def with_adapters(path: str, precision: str, skip_last: int = 0, dropout: float = 0.0):
    model = load_base("causal_lm", path, ModelConfig(name=path, prefer_embedded=False), QuantConfig(), CPU)
    torch.manual_seed(1)
    t = TrainConfig(precision=precision, gradient_checkpointing=True, gradient_checkpointing_skip_last=skip_last)
    return add_lora(model, LoraSection(r=16, alpha=32, dropout=dropout), "causal_lm", t, torch.bfloat16)


def train_losses(model, ids, steps: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_mixed_follows_the_fp32_upcast_loss_where_bf16_lags(small_llama):
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
    curves = {mode: train_losses(with_adapters(small_llama, mode), ids, 5) for mode in ("fp32_upcast", "mixed", "bf16")}
    gap = {mode: max(abs(a - b) for a, b in zip(curves[mode], curves["fp32_upcast"])) for mode in ("mixed", "bf16")}
    assert curves["fp32_upcast"][-1] < curves["fp32_upcast"][0] - 0.1  # it learns
    assert gap["bf16"] > 1e-3, gap
    assert gap["mixed"] * 3 < gap["bf16"], gap


def test_mixed_adds_small_adapter_outputs_in_fp32(small_llama):
    """An adapter output far below a bf16 step of the layer's output survives under mixed
    and is rounded away by the bf16 sum."""
    x = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kept = {}
    for mode in ("mixed", "bf16"):
        layer = with_adapters(small_llama, mode).base_model.model.model.layers[0].self_attn.o_proj
        torch.nn.init.constant_(layer.lora_B["default"].weight, 1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x).float()
            base = layer.base_layer(x).float()
            a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
            expected = (x.float() @ a.T @ b.T) * layer.scaling["default"]
        assert expected.abs().mean() < 1e-3 * base.abs().mean()  # far below bf16's 8 mantissa bits
        kept[mode] = ((out - base) - expected).abs().mean().item() / expected.abs().mean().item()
        assert out.dtype == torch.float32
    assert kept["mixed"] < 0.02, kept  # the adapter output arrives (to bf16 precision of itself)
    assert kept["bf16"] > 0.5, kept  # mostly lost to rounding


def test_where_each_mode_keeps_fp32(small_llama):
    seen = {}
    for mode in ("fp32_upcast", "mixed", "bf16"):
        model = with_adapters(small_llama, mode)
        layer = model.base_model.model.model.layers[1]
        hooks = [
            layer.register_forward_hook(lambda m, i, o, mode=mode: seen.__setitem__((mode, "residual"), o.dtype)),
            layer.self_attn.q_proj.register_forward_pre_hook(
                lambda m, i, mode=mode: seen.__setitem__((mode, "attention input"), i[0].dtype)
            ),
        ]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        for h in hooks:
            h.remove()
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
        seen[(mode, "frozen")] = frozen
        assert trained == {torch.float32}
    f32, b16 = torch.float32, torch.bfloat16
    assert seen[("fp32_upcast", "residual")] == f32 and seen[("fp32_upcast", "attention input")] == f32
    assert seen[("mixed", "residual")] == f32 and seen[("mixed", "attention input")] == b16
    assert seen[("bf16", "residual")] == b16 and seen[("bf16", "attention input")] == b16
    assert f32 in seen[("fp32_upcast", "frozen")] and f32 not in seen[("mixed", "frozen")]


def test_mixed_refuses_a_model_without_the_llama_layout(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            num_labels=2,
        )
    ).save_pretrained(tmp_path)
    model = load_base(
        "seq_cls",
        str(tmp_path),
        ModelConfig(name=str(tmp_path), prefer_embedded=False),
        QuantConfig(skip_modules=["classifier", "pooler.dense"]),
        CPU,
        ["a", "b"],
    )
    with pytest.raises(PipelineError, match="train.precision: mixed needs a decoder with the Llama layout"):
        add_lora(model, LoraSection(), "seq_cls", TrainConfig(precision="mixed"), torch.bfloat16)


def test_skipping_checkpointing_in_the_last_layers_changes_memory_not_gradients(small_llama):
    ids = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    grads, flags = {}, {}
    for skip in (0, 2):
        model = with_adapters(small_llama, "mixed", skip_last=skip)
        flags[skip] = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[skip] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert flags[0] == [True] * 4 and flags[2] == [True, True, False, False]
    assert grads[0].keys() == grads[2].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[2][name], rtol=0, atol=1e-6), name


def test_pipeline_trains_with_mixed_precision(tmp_path, tiny_llama):  # noqa: F811 (fixture)
    from tasks import evaluate, quantize, split, tokenize, train, validate

    raw = causal_params(tiny_llama)
    raw["train"].update(precision="mixed", gradient_checkpointing_skip_last=1, max_steps=6)
    params = Params.model_validate(raw)
    for stage in (validate, split, tokenize, quantize, train, evaluate):
        stage.run(params, tmp_path)
    log = (tmp_path / "reports/train/loss.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[2]) for line in log]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["answer_tokens"] > 0
