"""train.speed (tasks/fast/: plan, patch, ops) on CPU: which runs take the fast path,
that its 4-bit layers compute what bitsandbytes' do, what a compiled layer keeps for its
backward, and that every patch ends with its scope. The fast path itself runs on CUDA
(tests/test_gpu.py); here torch.compile uses backends that need no GPU."""

import dataclasses

import pytest
import torch

from tasks.config import LoraSection, ModelConfig, QuantConfig, TrainConfig
from tasks.fast import patch
from tasks.fast import plan as fast_plan
from tasks.fast.ops import nf4_lora
from tasks.model.loading import load_base
from tasks.model.precision import decoder_layers
from tasks.train import add_lora
from tests.trainer_helpers import nf4_arguments

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FAST = fast_plan.choose(TrainConfig(), CUDA, "causal_lm", "llama", True)  # train.speed: auto's plan on CUDA


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from bench.models import llama_shape
    from tests.tiny_llm import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("llama"), **llama_shape(256, 896, 2, 4, 1, 1000))


def adapted(path: str):
    """A 4-bit model with LoRA adapters whose B is not zero (so adapters change the output)."""
    model = load_base("causal_lm", path, ModelConfig(name=path, prefer_embedded=False), QuantConfig(), CPU)
    torch.manual_seed(1)
    model = add_lora(
        model,
        LoraSection(r=16, alpha=32, dropout=0.0),
        "causal_lm",
        TrainConfig(precision="bf16", gradient_checkpointing=True),
        torch.bfloat16,
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "device, task, model_type, quantized, speed_setting, fast, says",
    [
        (CUDA, "causal_lm", "llama", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "qwen2", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "qwen3", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "gemma2", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "gemma3_text", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "phi3", True, "auto", True, "fast path"),
        (CUDA, "causal_lm", "gpt2", True, "auto", False, "'gpt2' has no fast path"),
        (CUDA, "causal_lm", "olmo", True, "auto", False, "'olmo' has no fast path"),
        (CUDA, "seq_cls", "llama", True, "auto", False, "task seq_cls"),
        (CUDA, "causal_lm", "llama", False, "auto", False, "not 4-bit"),
        (CUDA, "causal_lm", "llama", True, "off", False, ""),
        (CPU, "causal_lm", "llama", True, "auto", False, ""),
    ],
)
def test_the_fast_path_is_chosen_on_cuda_for_4bit_causal_lms_of_the_fast_families(
    device, task, model_type, quantized, speed_setting, fast, says
):
    t = TrainConfig(speed=speed_setting, liger_kernels=False, gradient_checkpointing=False, precision="mixed")
    plan = fast_plan.choose(t, device, task, model_type, quantized)
    assert plan.fast is fast and says in plan.note and (says == "") == (plan.note == "")
    if fast:  # whatever the flags say
        assert plan.compile and plan.nf4_traced and plan.gradient_checkpointing and plan.precision == "bf16"
        assert plan.adapters_in_gemm == "none"  # exact adapter sums unless train.adapters_in_gemm
        opted = fast_plan.choose(t.model_copy(update={"adapters_in_gemm": True}), device, task, model_type, quantized)
        assert opted.adapters_in_gemm == "shared" and "inside their base GEMMs" in opted.note
        assert plan.residual == "bf16"  # half the bytes of an fp32 stream unless train.fp32_residual
        opted = fast_plan.choose(t.model_copy(update={"fp32_residual": True}), device, task, model_type, quantized)
        assert opted.residual == "fp32" and "residual stream in fp32" in opted.note
    else:  # the flags as set
        assert (plan.gradient_checkpointing, plan.precision, plan.liger) == (False, "mixed", False)


def test_traced_dequantization_is_bitsandbytes_bit_for_bit(llama_dir):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    model = adapted(llama_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for layer in layers:
        t = nf4_lora.nf4_tensors(layer)
        ours = nf4_lora.dequantize_nf4(*nf4_arguments(t), torch.bfloat16)
        assert torch.equal(ours, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16))


def test_fast_path_gives_the_bitsandbytes_path_gradients_and_one_graph_for_all_layers(llama_dir):
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(adapted(llama_dir), ids)
    plan = fast_plan.choose(TrainConfig(), CUDA, "causal_lm", "llama", True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with patch.scoped("llama", plan) as patches:
        model = adapted(llama_dir)
        done = patches.apply(model, plan, compile_backend="aot_eager_decomp_partition", random=False)
        fast_loss, fast_grads = loss_and_grads(model, ids)
    assert done["nf4_traced_layers"] == 14 and done["compiled_layers"] == 2
    # one graph for all layers, twice: the forward without autograd, the recompute with (ops/layer_checkpoint.py)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert fast_loss == pytest.approx(loss, abs=1e-3)
    for name, g in grads.items():
        assert (fast_grads[name] - g).norm() <= 2e-2 * g.norm(), name


@pytest.mark.parametrize(
    "adapters_in_gemm,swiglu",
    [("shared", True), ("all", True), ("none", True), ("shared", False), ("all", False), ("none", False)],
)
def test_fused_projections_give_the_loss_and_gradients_of_separate_ones(llama_dir, adapters_in_gemm, swiglu):
    """tasks/fast/patch.install_fused: q/k/v and gate/up as one 4-bit GEMM each, their A's as one
    GEMM, gate and up's B's inside the SwiGLU (swiglu) or in their base GEMM (shared, all), and
    (all) o and down's B's in theirs, compute what the separate PEFT layers compute (compiled as
    on the fast path); with the adapters disabled the blocks run their own code."""
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        plan = dataclasses.replace(
            FAST, fused_projections=fused, adapters_in_gemm=adapters_in_gemm, swiglu_kernel=swiglu
        )
        with patch.scoped("llama", plan) as patches:
            model = adapted(llama_dir)
            done = patches.apply(model, plan, compile_backend="aot_eager_decomp_partition", random=False)
            if fused:  # one 4-bit weight for the group: it dequantizes to the layers' weights side by side
                import bitsandbytes.functional as bnbf

                for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
                    module = getattr(model.get_base_model().model.layers[1], block)
                    group = getattr(module, patch._FUSED)
                    shape, blocksize, *_ = group["meta"]
                    whole = nf4_lora.dequantize_nf4(*group["tensors"], list(shape), blocksize, torch.bfloat16)
                    apart = [
                        bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.bfloat16)
                        for w in (getattr(module, n).base_layer.weight for n in names)
                    ]
                    assert torch.equal(whole, torch.cat(apart))
            loss, grads = loss_and_grads(model, ids)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # no graph break: forward and recompute
            model.eval()
            with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
                base = model(input_ids=ids, labels=ids).loss.item()
            runs.append((done, loss, grads, base))
        assert not [m for m in model.modules() if hasattr(m, patch._FUSED) or "forward" in vars(m)]  # undone
    (done0, loss0, grads0, base0), (done1, loss1, grads1, base1) = runs
    in_gemm = {"shared": 2 * 5, "all": 2 * 7, "none": 0}[adapters_in_gemm] - 2 * 2 * (
        swiglu and adapters_in_gemm != "none"
    )
    assert "fused_projections" not in done0 and done1["fused_projections"] == {
        "attention": 2,
        "mlp": 2,
        "adapters_in_gemm": in_gemm,
        "adapters_in_swiglu": 2 * 2 * swiglu,
    }
    assert loss1 == pytest.approx(loss0, abs=2e-3) and base1 == pytest.approx(base0, abs=2e-3)
    assert grads0.keys() == grads1.keys() and len(grads0) == 2 * 7 * 2
    for name, g in grads0.items():  # bf16 GEMMs of other widths: rounding only
        assert (grads1[name] - g).norm() <= 2e-2 * g.norm(), name


def _4bit_layers_with_loras(specs) -> tuple[list, list, dict]:
    """fp32-compute NF4 layers of 128 inputs routed through NF4Linear, one per (outputs, rank,
    scale) (outputs: whole 256-block groups of nested scales), their LoRA weights (A, B, scale)
    and their 4-bit weights laid end to end."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layers, loras = [], []
    for out, rank, scale in specs:
        layer = bnb.nn.Linear4bit(
            128, out, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
        )
        layer.weight = bnb.nn.Params4bit(
            torch.randn(out, 128) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        layers.append(layer.to("cpu"))
        loras.append((torch.randn(rank, 128, requires_grad=True), torch.randn(out, rank, requires_grad=True), scale))
    patch.install(torch.nn.ModuleList(layers), FAST)
    return layers, loras, nf4_lora.laid_end_to_end([getattr(layer, patch._NF4) for layer in layers])


@pytest.mark.parametrize("pad_k", [1, 64])
def test_adapters_in_the_gemm_of_weights_laid_end_to_end_are_the_separate_lora_layers(pad_k):
    """NF4LoRALinear over two 4-bit weights laid end to end: [x | m] [W_1 B_1 0; W_2 0 B_2]^T is,
    in fp32, the separate layers' x W_i^T + (x A_i^T s_i) B_i^T, with the same gradients for x,
    the A's and the B's (backward: one GEMM gives dx and dm); with K padded by zero columns too."""
    layers, loras, fused = _4bit_layers_with_loras(((256, 8, 2.0), (128, 4, 0.5)))
    assert fused["shape"] == [384, 128]
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 384)
    separate = [layer(x) + (x @ a.t() * s) @ b.t() for layer, (a, b, s) in zip(layers, loras)]
    torch.autograd.backward(separate, [g[..., :256], g[..., 256:]])
    expected = [t.grad.clone() for t in [x] + [p for a, b, _ in loras for p in (a, b)]]
    for t in [x] + [p for a, b, _ in loras for p in (a, b)]:
        t.grad = None
    m = torch.cat([x @ a.t() * s for a, _, s in loras], dim=-1)
    b = torch.block_diag(*(b for _, b, _ in loras))
    y = nf4_lora.NF4LoRALinear.apply(
        x, m, b, nf4_lora.meta(fused, False, pad_k), *(fused[k] for k in nf4_lora.TENSOR_KEYS)
    )
    y.backward(g)
    assert torch.allclose(y, torch.cat(separate, dim=-1), atol=1e-5)
    got = [t.grad for t in [x] + [p for a, b, _ in loras for p in (a, b)]]
    for mine, theirs in zip(got, expected):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4)


def test_an_mlp_whose_activation_is_not_silu_keeps_its_adapters_apart(llama_dir):
    """The SwiGLU kernel is written for SiLU: another activation's MLP is still fused (one GEMM
    for gate and up) but adds its adapters as PEFT does, and computes what its own code does."""
    model = adapted(llama_dir)
    layers = [layer for layer in model.get_base_model().model.layers]
    for layer in layers:
        layer.mlp.act_fn = torch.nn.GELU()
    patch.install(model, FAST)
    done = patch.install_fused(layers, FAST)
    assert done == {"attention": 2, "mlp": 2, "adapters_in_gemm": 0, "adapters_in_swiglu": 0}
    mlp = layers[0].mlp
    assert not getattr(mlp, patch._FUSED)["swiglu"]
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        assert torch.allclose(mlp(x), type(mlp).forward(mlp, x), atol=1e-5)
    patch.uninstall(model)


@pytest.mark.parametrize("pad_k", [1, 64])
def test_adapters_inside_the_swiglu_are_the_separate_gate_and_up_lora_layers(pad_k):
    """NF4LoRASwiGLU over gate and up laid end to end: silu(x W_g^T + m_g B_g^T) * (x W_u^T +
    m_u B_u^T) with the B's added inside the SwiGLU (ops/swiglu_lora.py's tensor code, what
    its Triton kernels are checked against on CUDA) is, in fp32, act(gate(x)) * up(x) of the
    separate LoRA layers, with the same gradients for x, the A's and the B's (backward: one
    GEMM over [W | blockdiag(B_g, B_u)] gives dx and dm); ranks of different sizes."""
    layers, loras, fused = _4bit_layers_with_loras(((256, 8, 2.0), (256, 4, 0.5)))
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 256)
    gate, up = (layer(x) + (x @ a.t() * s) @ b.t() for layer, (a, b, s) in zip(layers, loras))
    expected_h = torch.nn.functional.silu(gate) * up
    expected_h.backward(g)
    leaves = [x] + [p for a, b, _ in loras for p in (a, b)]
    expected = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    m = torch.cat([x @ a.t() for a, _, _ in loras], dim=-1)
    (_, b_gate, s_gate), (_, b_up, s_up) = loras
    h = nf4_lora.NF4LoRASwiGLU.apply(
        x,
        m,
        b_gate * s_gate,
        b_up * s_up,
        False,
        nf4_lora.meta(fused, False, pad_k),
        *(fused[k] for k in nf4_lora.TENSOR_KEYS),
    )
    h.backward(g)
    assert torch.allclose(h, expected_h, atol=1e-5)
    for mine, theirs in zip([t.grad for t in leaves], expected):  # fp32 sums in another order
        assert (mine - theirs).norm() <= 1e-5 * theirs.norm()


def _saved_by_one_layer(model, partitioner: dict) -> list:
    """(shape, dtype, bytes) of every tensor one compiled decoder layer keeps for backward."""
    import types

    from torch._functorch import config

    layer = model.get_base_model().model.layers[0]
    patch.install(model, FAST)
    torch._dynamo.reset()
    layer.forward = types.MethodType(
        torch.compile(patch._original_forward(type(layer)), backend="aot_eager_decomp_partition"), layer
    )
    x = torch.randn(1, 512, 256, dtype=torch.bfloat16, requires_grad=True)
    position = model.get_base_model().model.rotary_emb(x, torch.arange(512)[None])
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with (
        config.patch(partitioner),
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        layer(x, position_embeddings=position, attention_mask=None)
    return [s for s in saved if s[1] != torch.uint8]  # the 4-bit weights themselves are no extra memory


def test_a_compiled_layer_keeps_no_dequantized_weight_and_recomputes_elementwise_results(llama_dir):
    weights = {(896, 256), (256, 896), (256, 256), (64, 256)}
    default = _saved_by_one_layer(adapted(llama_dir), {})
    ours = _saved_by_one_layer(adapted(llama_dir), FAST.partitioner())
    assert weights <= {s for s, _, _ in default}  # by default the forward's bf16 weights are kept
    assert not weights & {s for s, _, _ in ours}
    assert sum(b for *_, b in ours) < 0.7 * sum(b for *_, b in default)


def test_scoped_undoes_module_class_and_instance_patches(llama_dir):
    from transformers.models.llama import modeling_llama as ml

    rope, norm, layer_forward = ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaDecoderLayer.forward
    model_forward = ml.LlamaForCausalLM.forward
    plan = fast_plan.choose(TrainConfig(), CUDA, "causal_lm", "llama", True)
    with patch.scoped("llama", plan) as patches:
        ml.apply_rotary_pos_emb = lambda *a, **k: None  # what Liger's module-level patching does
        ml.LlamaRMSNorm = type("Patched", (norm,), {})
        ml.LlamaForCausalLM.forward = lambda self, *a, **k: None
        ml.LlamaForCausalLM.liger_was_here = True
        model = adapted(llama_dir)
        patches.apply(model, plan, compile_backend="eager")
        assert all("forward" in vars(layer) for layer in decoder_layers(model))
    assert ml.apply_rotary_pos_emb is rope and ml.LlamaRMSNorm is norm
    assert ml.LlamaForCausalLM.forward is model_forward and not hasattr(ml.LlamaForCausalLM, "liger_was_here")
    assert ml.LlamaDecoderLayer.forward is layer_forward
    assert not [n for n, m in model.named_modules() if "forward" in vars(m) or hasattr(m, patch._NF4)]
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))  # as add_lora set it


def test_flat_parameters_are_views_and_train_like_separate_ones():
    """tasks/flat_optim.flatten: each parameter becomes a view of one buffer and its .grad a view
    of one gradient buffer that backward accumulates into; one optimizer over the flat buffer
    then trains exactly as one over the separate tensors (the elementwise AdamW update)."""
    from tasks.training.flat_optim import flatten

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))

    x = torch.randn(5, 8)
    a, b = build(), build()
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    owner, grad = flatten(list(b.parameters()))
    opt_b = torch.optim.AdamW([owner], lr=0.1)
    for _ in range(3):
        for model in (a, b):
            for _ in range(2):
                model(x).pow(2).sum().backward()
        opt_a.step()
        opt_a.zero_grad()
        opt_b.step()
        grad.zero_()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
        assert q.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()
    assert flatten([torch.zeros(2), torch.zeros(2, dtype=torch.float64)]) is None


@pytest.mark.parametrize("chunks", [1, 3])
def test_layers_in_two_halves_with_a_chunked_mlp_backward_give_checkpointing_s_gradients(llama_dir, chunks):
    """tasks/fast/ops/layer_checkpoint.py (train.speed's split layers), uncompiled on CPU: the layer as
    attention half + MLP half, recomputed in backward with the MLP in token chunks, gives the
    loss and adapter gradients of the same model under transformers' own checkpointing."""
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(adapted(llama_dir), ids)
    plan = fast_plan.Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16", split=chunks)
    with patch.scoped("llama", plan) as patches:
        model = adapted(llama_dir)
        applied = patches.apply(model, plan, random=False)
        assert applied["checkpointed_layers"] == 2 and f"{chunks} chunk" in applied["layer_checkpoint"]
        loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(reference[0], rel=1e-4)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        assert (g.float() - reference[1][name].float()).norm() <= 2e-2 * reference[1][name].float().norm() + 1e-6, name


def test_an_fp32_residual_stream_checkpoints_bf16_inputs_and_gives_checkpointing_s_gradients(llama_dir, monkeypatch):
    """Plan.residual fp32, uncompiled on CPU: the embedding's output and every decoder layer's
    input are fp32, each checkpointed layer keeps its input in bf16 (ops/layer_checkpoint.py,
    whole layers), the loss is the bf16 stream's up to bf16 steps and nearer the all-fp32
    model's, the adapter gradients are transformers' checkpointing's within bf16 steps, and the
    hooks end with the scope."""
    from tasks.fast.ops import layer_checkpoint

    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(adapted(llama_dir), ids)
    with torch.no_grad():
        fp32 = adapted(llama_dir)(input_ids=ids, labels=ids).loss.item()  # no autocast: every operation in fp32
    kept = []

    class Recorded(layer_checkpoint._Saved):
        def __init__(self, x, offload):
            kept.append(x.dtype)
            super().__init__(x, offload)

    monkeypatch.setattr(layer_checkpoint, "_Saved", Recorded)
    plan = fast_plan.Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16", residual="fp32")
    with patch.scoped("llama", plan) as patches:
        model = adapted(llama_dir)
        decoder = model.get_base_model().model
        hooks = (dict(decoder.embed_tokens._forward_hooks), dict(decoder.norm._forward_hooks))
        applied = patches.apply(model, plan, random=False)
        assert applied["residual_stream"] == "fp32 (layer inputs checkpointed in bfloat16)"
        inputs = []
        for layer in decoder_layers(model):
            layer.register_forward_pre_hook(
                lambda m, a, k: inputs.append((a or [k.get("hidden_states")])[0].dtype), with_kwargs=True
            )
        loss, grads = loss_and_grads(model, ids)
    assert inputs == [torch.float32] * 2 and kept == [torch.bfloat16] * 2
    assert loss == pytest.approx(reference[0], rel=1e-4) and abs(loss - fp32) < abs(reference[0] - fp32)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        assert (g.float() - reference[1][name].float()).norm() <= 3e-2 * reference[1][name].float().norm() + 1e-6, name
    assert (decoder.embed_tokens._forward_hooks, decoder.norm._forward_hooks) == hooks
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder.embed_tokens(ids).dtype == torch.bfloat16


@pytest.mark.parametrize("setting, split, offload", [("auto", 0, False), ("lean", 2, False), ("offload", 0, True)])
def test_lean_and_offload_are_the_fast_path_with_split_layers_and_cpu_stays_as_is(setting, split, offload):
    t = TrainConfig(speed=setting, liger_kernels=False, gradient_checkpointing=False, precision="mixed")
    plan = fast_plan.choose(t, CUDA, "causal_lm", "llama", quantized=True)
    assert plan.fast and (plan.split, plan.offload) == (split, offload)
    assert plan.optimizer == "paged_adamw_32bit_flat"  # optimizer: auto on the fast path
    assert (
        fast_plan.choose(t.model_copy(update={"optimizer": "adamw"}), CUDA, "causal_lm", "llama", True).optimizer
        == "adamw"
    )
    cpu = fast_plan.choose(t, CPU, "causal_lm", "llama", quantized=True)
    assert not cpu.fast and (cpu.split, cpu.offload, cpu.optimizer) == (0, False, "auto")


def test_every_fast_family_has_an_apply_function():
    assert set(patch.APPLY) == set(fast_plan.FAST_TYPES)
    assert set(fast_plan.FAST_TYPES) <= set(fast_plan.LIGER)


# Each family's own config on top of the tiny sizes: Gemma's sliding windows shorter than the
# tests' sequences (so the sliding layers' masks differ from the full ones), a Gemma 3 with one
# sliding and one full layer (its layers then take two RoPEs), Phi-3's pad token inside the vocabulary
FAMILIES = {
    "qwen3": {"head_dim": 64},
    "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16},
    "gemma3_text": {
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"pad_token_id": 0},
}
APPLY_OF = {
    "mistral": "apply_llama_layout",
    "qwen2": "apply_llama_layout",
    "qwen3": "apply_llama_layout",
    "gemma2": "apply_gemma_layout",
    "gemma3_text": "apply_gemma_layout",
    "phi3": "apply_phi3_layout",
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A 4-bit-quantizable model of each family in FAMILIES (the Llama tests' sizes), saved once."""
    from bench.models import llama_shape, save_random

    root = tmp_path_factory.mktemp("families")
    return {
        family: save_random(root / family, family, **llama_shape(256, 896, 2, 4, 1, 1000), **extra)
        for family, extra in FAMILIES.items()
    }


@pytest.mark.parametrize("split", [0, 2])
@pytest.mark.parametrize("family", list(APPLY_OF))
def test_the_fast_path_follows_the_model_s_own_model_type(family, split):
    """Patches.apply dispatches on the model's config.model_type (APPLY) to that family's apply
    function: the model's layers are checkpointed by tasks/fast/ops/layer_checkpoint.py, whole or
    as the family's two halves (split: another family's halves would drop Gemma's norms around
    each branch or Phi-3's residual dropouts), with the loss and gradients of the unpatched model,
    and the patches end with the scope."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        **{k: 16 if k in ("head_dim", "query_pre_attn_scalar") else v for k, v in FAMILIES.get(family, {}).items()},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    assert patch.APPLY[family] is getattr(patch, APPLY_OF[family])
    plan = fast_plan.Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16", split=split)
    with patch.scoped(family, plan) as patches:
        done = patches.apply(model, plan, random=False)
        assert done["checkpointed_layers"] == 2 and ("layer_checkpoint" in done) == (split > 0)
        fast_loss, fast_grads = loss_and_grads(model, ids)
    assert fast_loss == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        if split:  # the MLP's recompute in token chunks: GEMMs of other shapes, other bf16 roundings
            assert (fast_grads[name] - g).norm() <= 2e-2 * g.norm() + 1e-8, name
        else:
            assert torch.allclose(fast_grads[name], g, rtol=1e-4, atol=1e-6), name
    assert not [m for m in model.modules() if "forward" in vars(m)]


@pytest.mark.parametrize(
    "family, adapters_in_gemm, swiglu, fused",
    [
        ("qwen3", "none", True, {"attention": 2, "mlp": 2, "adapters_in_gemm": 0, "adapters_in_swiglu": 4}),
        ("gemma2", "none", True, {"attention": 2, "mlp": 2, "adapters_in_gemm": 0, "adapters_in_swiglu": 0}),
        ("gemma2", "shared", True, {"attention": 2, "mlp": 2, "adapters_in_gemm": 10, "adapters_in_swiglu": 0}),
        ("gemma3_text", "none", True, {"attention": 2, "mlp": 2, "adapters_in_gemm": 0, "adapters_in_swiglu": 0}),
        ("phi3", "none", True, {"attention": 0, "mlp": 2, "adapters_in_gemm": 0, "adapters_in_swiglu": 2}),
        ("phi3", "shared", False, {"attention": 0, "mlp": 0, "adapters_in_gemm": 4, "adapters_in_swiglu": 0}),
        ("phi3", "all", True, {"attention": 0, "mlp": 2, "adapters_in_gemm": 6, "adapters_in_swiglu": 2}),
    ],
)
def test_each_family_s_fast_path_gives_the_bitsandbytes_path_loss_and_gradients(
    family_dirs, family, adapters_in_gemm, swiglu, fused
):
    """The fast path of each family, compiled as on CUDA (4-bit layers traced, q/k/v and gate/up
    fused, Qwen3's SiLU MLP and Phi-3's gate_up_proj with their adapters in the SwiGLU kernel's
    tensor code, Gemma's GeGLU after the fused GEMM, adapters in their GEMMs where asked), gives
    the loss and adapter gradients of the same 4-bit model run by bitsandbytes and PEFT as loaded,
    with no graph break; with the adapters disabled the blocks run their own code."""
    path = family_dirs[family]
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = adapted(path)
    loss, grads = loss_and_grads(reference, ids)
    with torch.no_grad(), reference.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = reference(input_ids=ids, labels=ids).loss.item()
    plan = dataclasses.replace(
        fast_plan.choose(TrainConfig(), CUDA, "causal_lm", family, True),
        liger=False,
        adapters_in_gemm=adapters_in_gemm,
        swiglu_kernel=swiglu,
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with patch.scoped(family, plan) as patches:
        model = adapted(path)
        done = patches.apply(model, plan, compile_backend="aot_eager_decomp_partition", random=False)
        fast_loss, fast_grads = loss_and_grads(model, ids)
        model.eval()
        with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            fast_base = model(input_ids=ids, labels=ids).loss.item()
    assert done["compiled_layers"] == 2 and done["fused_projections"] == fused
    assert not torch._dynamo.utils.counters["graph_break"]
    assert fast_loss == pytest.approx(loss, abs=2e-3) and fast_base == pytest.approx(base, abs=2e-3)
    assert grads.keys() == fast_grads.keys() and len(grads) == 2 * 2 * (4 if family == "phi3" else 7)
    for name, g in grads.items():  # bf16 GEMMs of other widths: rounding only
        assert (fast_grads[name] - g).norm() <= 3e-2 * g.norm(), name
    assert not [m for m in model.modules() if "forward" in vars(m) or hasattr(m, patch._NF4)]


@pytest.mark.parametrize("family", ["gpt2", "olmo"])
def test_a_family_without_a_fast_path_trains_as_loaded_and_says_so(family, capsys):
    """A family without an apply function (GPT-2; OLMo, whose layers have the Llama layout's parts
    but no fast path written for them) is left as loaded, with one log line, and trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = (
        {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
        if family == "gpt2"
        else {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        | {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes)).train()
    plan = dataclasses.replace(FAST, liger=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with patch.scoped(family, plan) as patches:
        assert patches.apply(model, plan, random=False) == {}
        assert not [m for m in model.modules() if "forward" in vars(m)]
        losses = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert f"speed: '{family}' has no fast path" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model_type, module",
    [
        ("llama", "transformers.models.llama.modeling_llama"),
        ("gemma3_text", "transformers.models.gemma3.modeling_gemma3"),
        ("phi3", "transformers.models.phi3.modeling_phi3"),
        ("not_a_model_type", None),
    ],
)
def test_the_patch_scope_finds_a_family_s_modeling_module_beside_its_config(model_type, module):
    """A model type need not name its package (gemma3_text lives in transformers.models.gemma3);
    a type transformers does not know has nothing to snapshot, and the scope opens all the same."""
    with patch.scoped(model_type, dataclasses.replace(FAST, liger=False)) as patches:
        assert [m.__name__ for m in patches.modules] == ([module] if module else [])


def test_bench_variants_are_plans():
    """bench/gpu_qlora_bench.py switches the fast path by building Plans, one field a part."""
    from bench import gpu_qlora_bench as bench

    plan = bench.variant_plan("auto+notriton+noswiglu+padk1+torchcheckpoint+budget80+split3+ingemm+fp32res", FAST)
    assert (
        plan.triton,
        plan.swiglu_kernel,
        plan.pad_k,
        plan.checkpoint,
        plan.activation_memory_budget,
        plan.split,
        plan.adapters_in_gemm,
        plan.residual,
    ) == (False, False, 1, "torch", 0.8, 3, "shared", "fp32")
    assert bench.variant_plan("auto+cse", FAST).partitioner() == {"cse": True, "activation_memory_budget": 1.0}
    assert bench.variant_plan("auto", FAST) == FAST and FAST.partitioner() == {
        "cse": False,
        "activation_memory_budget": 0.9,
    }
