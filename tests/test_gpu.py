"""The CUDA path of the trainer: 4-bit base on the GPU, paged AdamW, Liger kernels, and the
fast path of train.speed: auto (tasks/fast/). Skipped where there is
no CUDA GPU (CI); run on a GPU machine."""

import json

import pandas as pd
import pytest
import torch

from bench.models import llama_shape
from tasks import evaluate, quantize, tokenize, train
from tasks.config import Params
from tests.conftest import ALPACA, repo_params, write_split
from tests.tiny_llm import build_tiny_llama
from tests.trainer_helpers import nf4_arguments

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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
    (tmp_path / "data/validated/labels.json").write_text(json.dumps({"names": []}))
    params = Params.model_validate(
        repo_params(
            task="causal_lm",
            data={"path": str(ALPACA), "label_names": None},
            model={"name": str(model_dir)},
            tokenize={"max_length": 256},
            eval={"num_samples": 1, "max_new_tokens": 4},
            train={"max_steps": 10, "batch_size": 8, "lr": 0.01, "device": "cuda", "log_every": 1, **train_options},
        )
    )
    write_split(tmp_path, params, {"train": rows.iloc[:80], "validation": rows.iloc[80:90], "test": rows.iloc[90:]})
    for stage in (tokenize, quantize, train, evaluate):
        stage.run(params, tmp_path)
    summary = json.loads((tmp_path / "reports/train/summary.json").read_text())
    loss = pd.read_csv(tmp_path / "reports/train/loss.csv")["loss"].tolist()
    assert summary["device"].startswith("cuda") and summary["optimizer"] == "paged_adamw_32bit"  # optimizer: auto
    assert len(loss) == 10 and loss[-1] < loss[0]
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["answer_tokens"] > 0
    return summary


@pytest.mark.parametrize("precision", ["fp32_upcast", "mixed"])
def test_cuda_training_uses_paged_optimizer_and_learns(tmp_path, precision):
    summary = _pipeline(tmp_path, speed="off", gradient_checkpointing=True, liger_kernels=_liger(), precision=precision)
    assert summary["liger_kernels"] is _liger() and summary["speed"]["fast"] is False


def test_speed_auto_takes_the_fast_path_and_evaluation_runs_unpatched(tmp_path):
    from transformers.models.llama import modeling_llama

    forward, layer_forward = modeling_llama.LlamaForCausalLM.forward, modeling_llama.LlamaDecoderLayer.forward
    rope = modeling_llama.apply_rotary_pos_emb
    summary = _pipeline(tmp_path, speed="auto", gradient_checkpointing=False, precision="fp32_upcast")
    assert summary["speed"]["fast"] and summary["speed"]["compiled_layers"] == 2
    assert summary["speed"]["nf4_traced_layers"] == 14  # 7 linear layers x 2 decoder layers
    assert summary["liger_kernels"] is _liger()
    assert (
        modeling_llama.LlamaForCausalLM.forward is forward and modeling_llama.LlamaDecoderLayer.forward is layer_forward
    )
    assert modeling_llama.apply_rotary_pos_emb is rope


def test_traced_nf4_dequantization_is_bitsandbytes_bit_for_bit_on_cuda():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from tasks.fast import patch
    from tasks.fast import plan as fast_plan
    from tasks.fast.ops.nf4_lora import dequantize_nf4, nf4_tensors

    layer = bnb.nn.Linear4bit(
        3072, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(1024, 3072) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer = layer.cuda()
    t = nf4_tensors(layer)
    ours = dequantize_nf4(*nf4_arguments(t), torch.bfloat16, triton=False)  # the Triton kernel: the next test
    assert torch.equal(ours, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16))
    x = torch.randn(2, 64, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 64, 1024, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(g)
    tensor_code = fast_plan.Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16", triton=False)
    assert patch.install(layer, tensor_code) == 1
    layer(x2).backward(g)
    assert torch.allclose(x.grad.float(), x2.grad.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("rows, cols", [(1024, 3072), (1000, 320)])  # the second ends inside a program's tile
def test_triton_nf4_dequantization_is_bitsandbytes_up_to_the_scales_last_bit(rows, cols):
    """tasks/fast/ops/nf4_triton.py: the same weights as bitsandbytes' dequantize_4bit; a block scale may
    differ in its last fp32 bit (multiply-add contracted), so a weight by at most one bf16 step."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from tasks.fast.ops import nf4_triton
    from tasks.fast.ops.nf4_lora import nf4_tensors

    assert nf4_triton.available()  # registers the op
    layer = bnb.nn.Linear4bit(
        cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(rows, cols) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer = layer.cuda()
    t = nf4_tensors(layer)
    ours = nf4_triton.dequantize(*nf4_arguments(t), torch.bfloat16)
    ref = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert ours.shape == ref.shape and not ours.isnan().any()
    differ = ours != ref
    assert differ.float().mean() < 1e-3
    assert ((ours.float() - ref.float()).abs() <= ref.float().abs() * 2**-7 + 1e-30).all()
    # [W | B]: the same weights written with a row stride of cols + 24, B in the last columns
    extra = torch.randn(rows, 24, device="cuda", dtype=torch.bfloat16)
    wide = nf4_triton.dequantize(*nf4_arguments(t), torch.bfloat16, extra)
    assert torch.equal(wide, torch.cat((ours, extra), dim=1))


@pytest.mark.parametrize(
    "rows, n, ranks",
    [
        (4096, 1024, (16, 16)),
        (1000, 200, (16, 8)),  # 2nd: ragged tiles
        (1000, 320, (24, 64)),
        (512, 256, (128, 128)),
    ],
)  # ranks in chunks
def test_triton_swiglu_lora_kernels_are_the_tensor_code(rows, n, ranks):
    """tasks/fast/ops/swiglu_lora.py: the Triton kernels compute what its tensor code computes (the sums
    in fp32, each result rounded once to bf16): forward h and backward [dg | du], up to a bf16
    step from the fp32 sums' other order."""
    from tasks.fast.ops import swiglu_lora

    assert swiglu_lora.available()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    y, m, dh = rand(2, rows // 2, 2 * n), rand(2, rows // 2, sum(ranks)), rand(2, rows // 2, n)
    b_gate, b_up = rand(n, ranks[0], scale=0.1), rand(n, ranks[1], scale=0.1)
    kernel = (swiglu_lora.forward(y, m, b_gate, b_up, True), swiglu_lora.backward(y, m, b_gate, b_up, dh, True))
    gate, up = swiglu_lora._sums(y, m, b_gate, b_up)
    assert (gate - y[..., :n].float()).abs().max() > 0.1  # the adapters change the sums
    tensor_code = (swiglu_lora.forward(y, m, b_gate, b_up, False), swiglu_lora.backward(y, m, b_gate, b_up, dh, False))
    for ours, ref in zip(kernel, tensor_code):
        assert ours.shape == ref.shape and ours.dtype == torch.bfloat16 and not ours.isnan().any()
        assert ((ours.float() - ref.float()).abs() <= ref.float().abs() * 2**-6 + 1e-6).all()  # one bf16 step
        assert (ours != ref).float().mean() < 0.05


def _speed_auto():
    """train.speed: auto, every other train.* setting as default."""
    from tasks.config import TrainConfig

    return TrainConfig(speed="auto")


def _fast_plan(**changes):
    """train.speed: auto's plan on CUDA, with some choices changed."""
    import dataclasses

    from tasks.config import TrainConfig
    from tasks.fast import plan as fast_plan

    t = TrainConfig(speed="auto")
    return dataclasses.replace(
        fast_plan.choose(t, torch.device("cuda"), "causal_lm", "llama", quantized=True), **changes
    )


def _tiny_fast_model(path, plan, dropout: float = 0.0):
    from tasks.config import LoraSection, ModelConfig, QuantConfig, TrainConfig
    from tasks.model.loading import load_base
    from tasks.train import add_lora

    device = torch.device("cuda")
    model = load_base("causal_lm", path, ModelConfig(name=path, prefer_embedded=False), QuantConfig(), device)
    torch.manual_seed(1)
    t_model = TrainConfig(speed="auto", precision=plan.precision, gradient_checkpointing=True)
    model = add_lora(model, LoraSection(r=8, alpha=16, dropout=dropout), "causal_lm", t_model, torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device="cuda").manual_seed(2))
    return model


@pytest.mark.parametrize(
    "split, offload, residual, dropout",
    [
        (0, False, "bf16", 0.0),
        (2, False, "bf16", 0.0),
        (3, True, "bf16", 0.0),
        (0, True, "bf16", 0.0),
        (0, False, "fp32", 0.0),
        (0, True, "fp32", 0.0),
        (0, True, "bf16", 0.1),
    ],
)
def test_split_layers_and_offloaded_inputs_give_the_gradients_of_one_graph_checkpointing(
    tmp_path, split, offload, residual, dropout
):
    """tasks/fast/ops/layer_checkpoint.py, compiled: whole layers (the default), two halves with the
    MLP's backward in token chunks, whole layers with their inputs kept in pinned host memory, an
    fp32 residual stream whose layer inputs are checkpointed in bf16, and with LoRA dropout (the
    recompute replays the forward's random state, in another compiled graph), give the loss and
    adapter gradients of torch's checkpoint around one compiled graph a layer (Plan.checkpoint
    "torch"). Not bit for bit: the forward without autograd is compiled apart from the one
    with, and its bf16 roundings may differ."""
    from tasks.fast import patch
    from tests.tiny_llm import save_random_llama

    path = save_random_llama(tmp_path / "llama", **llama_shape(256, 896, 3, 4, 1, 1000))
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = []
    for plan in (_fast_plan(checkpoint="torch"), _fast_plan(split=split, offload=offload, residual=residual)):
        with patch.scoped("llama", plan) as patches:
            model = _tiny_fast_model(path, plan, dropout=dropout)
            done = patches.apply(model, plan, random=dropout > 0)
            assert ("layer_checkpoint" in done) == (plan.split > 0 or plan.offload)
            model.train()
            torch.manual_seed(3)  # the same dropout masks for both
            for _ in range(2):  # the second pass runs on what the first one's backward left
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.item(), grads))
    (loss0, g0), (loss1, g1) = results
    assert loss0 == pytest.approx(loss1, rel=1e-3)
    assert g0.keys() == g1.keys() and len(g0) == 3 * 7 * 2
    every0, every1 = torch.cat([g.flatten() for g in g0.values()]), torch.cat([g1[n].flatten() for n in g0])
    assert (every0 - every1).norm() <= 1e-2 * every0.norm()  # bf16 steps (seen: up to 1% on one tensor)
    for name in g0:
        assert (g0[name] - g1[name]).norm() <= 3e-2 * g0[name].norm() + 1e-8, name


def test_adapters_in_the_base_gemm_give_the_gradients_of_peft_sums_compiled_on_cuda(tmp_path):
    """tasks/fast/ops/nf4_lora.NF4LoRALinear under Inductor with the Triton dequantization writing
    [W | B], and NF4LoRASwiGLU with gate and up's adapters inside the SwiGLU's Triton kernels: the
    loss and adapter gradients of the compiled layers whose adapters PEFT adds apart."""
    from tasks.fast import patch
    from tasks.fast.ops import swiglu_lora
    from tests.tiny_llm import save_random_llama

    path = save_random_llama(tmp_path / "llama", **llama_shape(256, 896, 3, 4, 1, 1000))
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = []
    for mode, swiglu in (("none", False), ("all", False), ("none", True), ("all", True)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        plan = _fast_plan(adapters_in_gemm=mode, swiglu_kernel=swiglu)
        with patch.scoped("llama", plan) as patches:
            model = _tiny_fast_model(path, plan)
            done = patches.apply(model, plan, random=False)
            assert done["fused_projections"]["adapters_in_gemm"] == {"none": 0, "all": 3 * 7}[mode] - 3 * 2 * (
                swiglu and mode == "all"
            )
            assert done["fused_projections"]["adapters_in_swiglu"] == 3 * 2 * swiglu
            groups = [getattr(m, patch._FUSED) for m in model.modules() if hasattr(m, patch._FUSED)]
            assert groups and all(g["meta"][3] for g in groups)  # the Triton kernel writes [W | B], not the tensor code
            if swiglu:  # Triton, not tensor code
                mlps = [g for g in groups if g.get("swiglu")]
                assert len(mlps) == 3 and all(g["kernel"] for g in mlps)
                assert swiglu_lora._use_kernel(torch.empty(1, device="cuda", dtype=torch.bfloat16), True)
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            # no graph break around the kernels: the layer's forward without a graph and its recompute with one
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
            results.append(
                (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
            )
    (loss0, g0), *others = results
    for loss1, g1 in others:
        assert loss0 == pytest.approx(loss1, rel=1e-3)
        assert g0.keys() == g1.keys() and len(g0) == 3 * 7 * 2
        every0, every1 = torch.cat([g.flatten() for g in g0.values()]), torch.cat([g1[n].flatten() for n in g0])
        assert (every0 - every1).norm() <= 1e-2 * every0.norm()
        for name in g0:
            assert (g0[name] - g1[name]).norm() <= 3e-2 * g0[name].norm() + 1e-8, name


def test_flat_paged_adamw_is_paged_adamw_32bit_in_one_launch():
    """tasks/training/flat_optim.py: one bitsandbytes 32-bit Adam update over all adapter weights laid end
    to end gives the per-tensor PagedAdamW32bit's weights, and backward accumulates into views."""
    import bitsandbytes as bnb

    from tasks.training import flat_optim

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 8, bias=False)
        ).cuda()

    x = torch.randn(32, 64, device="cuda")
    a, b = build(), build()
    opt_a = bnb.optim.PagedAdamW32bit(list(a.parameters()), lr=1e-2, weight_decay=0.01)
    opt_b = flat_optim.make(list(b.parameters()), 1e-2, 0.01)
    assert len(opt_b.param_groups[0]["params"]) == 1
    for _ in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            for _ in range(2):  # accumulation into .grad
                model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# Each family's own config on top of tiny sizes (tests/test_speed.py's FAMILIES: Gemma's sliding
# windows shorter than the sequence, a Gemma 3 with a sliding and a full layer, Phi-3's pad token
# inside the vocabulary)
FAMILIES = {
    "qwen3": {"head_dim": 64},
    "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32},
    "gemma3_text": {
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "phi3": {"pad_token_id": 0},
}


def _train_steps(path, plan, family: str, steps: int, ids) -> tuple[list, dict, dict]:
    """`steps` optimizer steps (AdamW, lr 1e-3) of the 4-bit model with LoRA (r=8) under the plan,
    patched as train.speed does when plan.fast; every step's loss, the first step's adapter
    gradients, and what was applied."""
    from tasks.fast import patch

    with patch.scoped(family, plan) as patches:
        model = _tiny_fast_model(path, plan)
        done = patches.apply(model, plan, random=False) if plan.fast else {}
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses, grads = [], {}
        for step in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        del model, opt
    return losses, grads, done


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_on_the_fast_path_with_the_slow_path_s_loss_and_gradients(tmp_path, family):
    """train.speed: auto's plan for Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 on CUDA (compiled and
    checkpointed layers, Triton dequantization, fused projections, the SwiGLU kernel where the MLP
    is SiLU, Liger's fused linear cross-entropy where installed): a small random model of the
    family's own config class, 4-bit with LoRA, trains 4 steps with the loss of every step and
    the first step's adapter gradients of the slow path (the same model as loaded, PEFT and
    bitsandbytes, bf16 autocast), within bf16 rounding."""
    from bench.models import save_random
    from tasks.fast import plan as fast_plan

    path = save_random(tmp_path / family, family, **llama_shape(256, 896, 3, 4, 1, 1000), **FAMILIES[family])
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    fast = fast_plan.choose(_speed_auto(), torch.device("cuda"), "causal_lm", family, quantized=True)
    assert fast.fast and fast.compile and fast.fused_projections
    slow = fast_plan.Plan(fast=False, liger=False, gradient_checkpointing=True, precision="bf16")
    torch._dynamo.reset()
    slow_losses, slow_grads, _ = _train_steps(path, slow, family, 4, ids)
    fast_losses, fast_grads, done = _train_steps(path, fast, family, 4, ids)
    assert done["compiled_layers"] == 3 and done["nf4_traced_layers"] == 3 * (4 if family == "phi3" else 7)
    assert done["fused_projections"]["mlp"] == 3
    assert done["fused_projections"]["attention"] == (0 if family == "phi3" else 3)
    assert fast_losses[-1] < fast_losses[0]
    for a, b in zip(fast_losses, slow_losses):
        assert a == pytest.approx(b, abs=2e-2), (fast_losses, slow_losses)
    assert fast_grads.keys() == slow_grads.keys()
    every_fast = torch.cat([g.flatten() for g in fast_grads.values()])
    every_slow = torch.cat([slow_grads[n].flatten() for n in fast_grads])
    assert (every_fast - every_slow).norm() <= 5e-2 * every_slow.norm()
    for name, g in slow_grads.items():
        assert not fast_grads[name].isnan().any(), name
        assert (fast_grads[name] - g).norm() <= 1e-1 * g.norm() + 1e-8, name


def test_a_family_without_a_fast_path_falls_back_and_trains_on_cuda(tmp_path, capsys):
    """OLMo (no apply function): train.speed: auto's plan says why it is not the fast path; the
    fast path's apply leaves it as loaded with one log line; the 4-bit model with LoRA trains."""
    from bench.models import save_random
    from tasks.fast import patch
    from tasks.fast import plan as fast_plan

    path = save_random(tmp_path / "olmo", "olmo", **llama_shape(256, 896, 2, 4, 1, 1000), pad_token_id=0)
    plan = fast_plan.choose(_speed_auto(), torch.device("cuda"), "causal_lm", "olmo", quantized=True)
    assert not plan.fast and "'olmo' has no fast path" in plan.note
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    losses, grads, _ = _train_steps(path, plan, "olmo", 4, ids)
    assert losses[-1] < losses[0] and grads and not any(g.isnan().any() for g in grads.values())
    forced = _fast_plan(liger=False)
    with patch.scoped("olmo", forced) as patches:
        model = _tiny_fast_model(path, forced)
        assert patches.apply(model, forced, random=False) == {}
    assert "speed: 'olmo' has no fast path" in capsys.readouterr().out
