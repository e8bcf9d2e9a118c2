"""How precise each part of a QLoRA training step is (params: train.precision).

fp32_upcast  PEFT's k-bit preparation: every non-quantized weight (embeddings, norms,
             lm_head) is cast to fp32, so everything between the 4-bit matmuls runs in
             fp32. The plain Hugging Face recipe; the slowest and largest.
mixed        Frozen weights stay in the compute dtype (their values are bf16 anyway). The
             residual stream and the norms run in fp32, attention and MLP internals in the
             compute dtype, and the layers whose output feeds an fp32 path (attention output,
             the MLP's three projections) add base and adapter output in fp32. Its loss
             curve agrees with fp32_upcast's, nearer than fp32_upcast is to an all-fp32 run
             (docs/gpu.md), and it is faster. Decoders with the Llama layout only (Llama,
             Mistral, Qwen2, ...).
bf16         Everything in the compute dtype except the trained adapters. Fastest, but an
             adapter's first updates are ~1e-3 of its layer's output, below half a bf16 step
             (8 mantissa bits), so `base + adapter` rounds them away and the loss lags early.

The trained adapter weights are fp32 in every mode.
"""

from __future__ import annotations

import types

import torch

from tasks.common import PipelineError

# LoRA layers whose `base + adapter` sum is kept in fp32 under `mixed`: their outputs reach
# the fp32 residual stream (o_proj, down_proj) or pass the MLP's activation first (gate, up).
FP32_SUM = ("o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_LAYOUT = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")  # a decoder layer's parts


def prepare_base(model, mode: str, gradient_checkpointing: bool, skip_last: int = 0):
    """Freeze the base and set up activation checkpointing, before adapters are added.
    skip_last: the last N checkpointed layers keep their activations instead (selective
    checkpointing: each one skips a recompute and holds one layer's activations)."""
    from peft import prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False)
    if quantized and mode == "fp32_upcast":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        if quantized:
            for p in model.parameters():
                p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if gradient_checkpointing and skip_last:
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for block in blocks[-skip_last:]:
            block.gradient_checkpointing = False
    return model


def decoder_layers(model) -> list:
    """The decoder layers with the Llama layout (Llama, Mistral, Qwen2, ...): h = x +
    self_attn(input_layernorm(x)), out = h + mlp(post_attention_layernorm(h)); what `mixed`
    and the fast path (tasks/fast/patch.py) are written for."""
    return [m for m in model.modules() if all(hasattr(m, name) for name in LLAMA_LAYOUT)]


def apply_mixed(model, compute_dtype: torch.dtype) -> int:
    """Install `mixed` on a model with adapters; returns how many LoRA layers sum in fp32."""
    layers = decoder_layers(model)
    if not layers:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PipelineError(
            f"train.precision: mixed needs a decoder with the Llama layout ({', '.join(LLAMA_LAYOUT)} "
            f"in each layer); '{kind}' has none. Use fp32_upcast or bf16."
        )
    model.get_input_embeddings().register_forward_hook(_cast_output(torch.float32))
    for layer in layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(_cast_output(compute_dtype))
    in_fused_mlp = set()
    for layer in layers:
        projections = [getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(_plain_lora(p) for p in projections):  # the whole MLP as one function: see _mlp_forward
            layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
            in_fused_mlp.update(id(p) for p in projections)
    patched = len(in_fused_mlp)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in FP32_SUM and _plain_lora(module) and id(module) not in in_fused_mlp:
            module.forward = types.MethodType(_forward_fp32_sum, module)
            patched += 1
    return patched


def _plain_lora(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and not any(module.use_dora.values())


def _cast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def _adapter_output(self, x):
    """Sum of the active adapters' outputs of a LoRA layer (None when they are off)."""
    if self.disable_adapters or self.merged:
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    total = None
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x)
        if not autocast:  # under autocast the matmuls pick the compute dtype themselves
            h = h.to(a.weight.dtype)
        y = b(a(h)) * self.scaling[name]
        total = y if total is None else total + y
    return total


def _forward_fp32_sum(self, x, *args, **kwargs):
    """PEFT's LoRA forward, except that base and adapter outputs are added in fp32."""
    delta = _adapter_output(self, x)
    if delta is None:
        return self.base_layer(x, *args, **kwargs)
    return self.base_layer(x, *args, **kwargs).float() + delta.float()


def _mlp_forward(self, x):
    """down(act(gate(x)) * up(x)) where the adapter outputs of gate and up join their base
    outputs in fp32 inside one fused elementwise function, whose result is rounded once to
    the compute dtype (the same rounding the plain recipe does before down_proj's 4-bit
    matmul); down's base and adapter outputs are added in fp32."""
    gate, up = self.gate_proj, self.up_proj
    g, u = gate.base_layer(x), up.base_layer(x)
    gd, ud = _adapter_output(gate, x), _adapter_output(up, x)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    act = getattr(self, "act_fn", torch.nn.functional.silu)
    h = _act_mul(act, g.is_cuda)(g, zero if gd is None else gd, u, zero if ud is None else ud)
    return _forward_fp32_sum(self.down_proj, h)


_ACT_MUL = {}


def _act_mul(act, cuda: bool):
    """act(g + dg) * (u + du) in fp32, returned in g's dtype: compiled into one kernel (and
    one for its backward) on CUDA, where unfused fp32 temporaries cost a fifth of the step."""
    key = (act, cuda)
    if key not in _ACT_MUL:

        def act_mul(g, dg, u, du):
            return (act(g.float() + dg.float()) * (u.float() + du.float())).to(g.dtype)

        _ACT_MUL[key] = torch.compile(act_mul, dynamic=True) if cuda else act_mul
    return _ACT_MUL[key]
