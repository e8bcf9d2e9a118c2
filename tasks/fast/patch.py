"""Installing a Plan's fast path on a model, and undoing it (tasks/fast/plan.py chooses it).

`scoped(model_type, plan)` is the block a training runs in: every patch made inside ends with
it, module-level patches (Liger's) and the instance patches on the models `Patches.apply`
patched, so evaluation and merge in the same process build and run unpatched models.
`Patches.apply` reads the model family from the model's config (config.json's model_type) and
calls that family's apply function (APPLY, as Liger's MODEL_TYPE_TO_APPLY_LIGER_FN); a family
without one trains as loaded, and says so in one log line. Each family's decoder layer runs its
own forward (its norms, RoPE, attention and MLP code); what differs between families is where
a layer splits into halves (apply_llama_layout, apply_gemma_layout, apply_phi3_layout) and
which attention and MLP classes the fused projections reproduce (ATTENTION_CLASSES,
MLP_CLASSES, STACKED_MLP_CLASSES). What it installs, the Plan says, and nothing else:
  - the 4-bit layers routed through ops/nf4_lora.NF4Linear (traced by the compiler);
  - fused projections: the LoRA layers that read the same input (q, k and v; gate and up) as
    one 4-bit GEMM over their weights laid end to end, and one GEMM for their adapters' A
    matrices; a SiLU MLP's gate and up adapters inside the SwiGLU kernel (Phi-3's gate_up_proj,
    one layer already, too); adapters in their base GEMM where the Plan says so;
  - each decoder layer's forward compiled (one compiled function a decoder class, shared by its
    layers: one graph for all) and checkpointed (ops/layer_checkpoint.py or torch's), whole or
    in two halves;
  - an fp32 residual stream.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tasks.fast.ops import layer_checkpoint, nf4_triton, swiglu_lora
from tasks.fast.ops.nf4_lora import (
    TENSOR_KEYS,
    NF4Linear,
    NF4LoRALinear,
    NF4LoRASwiGLU,
    laid_end_to_end,
    meta,
    nf4_tensors,
)
from tasks.fast.plan import LIGER, Plan
from tasks.model.precision import decoder_layers


class Patches:
    """Snapshot of the patchable state of one model family; apply() patches models, undo()
    puts back the modules, classes and model instances as they were."""

    def __init__(self, model_type: str):
        self.modules = [importlib.import_module(name) for name in _modeling_modules(model_type)]
        self.module_state = [(m, dict(vars(m))) for m in self.modules]
        self.class_state = [
            (c, dict(vars(c)))
            for m in self.modules
            for c in list(vars(m).values())
            if isinstance(c, type) and c.__module__ == m.__name__
        ]
        self.models: list[tuple[object, set[int], dict]] = []
        self.hooks: list = []
        self.compiled: dict = {}  # one compiled function per decoder class (or layer half) in this scope

    def apply(self, model, plan: Plan, compile_backend: str = "inductor", random: bool = True) -> dict:
        """Install the plan's fast path on a PEFT model with adapters (after tasks.train.add_lora),
        by the apply function of the model's family (APPLY[config.model_type]); what was done.
        random: the layers draw random numbers (LoRA dropout), so a recompute replays the RNG."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(hf.config, "model_type", "")
        had_forward = {id(m) for m in model.modules() if "forward" in vars(m)}
        layers = decoder_layers(model)
        self.models.append((model, had_forward, {id(layer): layer.gradient_checkpointing for layer in layers}))
        random = random or draws_random(hf.config)
        done = {}
        if plan.liger and model_type in LIGER:
            # Only the head's fused linear cross-entropy when layers are compiled: inside a
            # compiled layer, Inductor fuses the norms, RoPE and the MLP's activation itself.
            kernels = not plan.compile
            apply_liger(model_type, kernels, model=hf)
            done["liger"] = "fused linear cross-entropy" + (", RMSNorm, RoPE, MLP activation" if kernels else "")
        family = APPLY.get(model_type)
        if plan.fast and family is None:
            print(
                f"train: speed: '{model_type}' has no fast path (tasks/fast/patch.py APPLY: {', '.join(APPLY)}); "
                "its layers run as loaded"
            )
        elif plan.fast:
            done.update(family(self, model, layers, plan, compile_backend, random))
        return done

    def undo(self) -> None:
        for hook in self.hooks:  # first: nothing below can leave them behind
            hook.remove()
        self.hooks.clear()
        for model, had_forward, checkpointing in self.models:
            uninstall(model)
            for m in model.modules():
                if id(m) not in had_forward:
                    m.__dict__.pop("forward", None)
                if id(m) in checkpointing:
                    m.gradient_checkpointing = checkpointing[id(m)]
        self.models.clear()
        self.compiled.clear()
        for module, state in self.module_state:
            _restore(module, state)
        for cls, state in self.class_state:
            _restore(cls, state)

    def compile(self, fn, backend: str):
        """One compiled function per decoder class (or layer half), shared by its layers (one graph for all)."""
        key = (fn, backend)
        if key not in self.compiled:
            self.compiled[key] = torch.compile(_original_forward(fn) if isinstance(fn, type) else fn, backend=backend)
        return self.compiled[key]


def apply_liger(model_type: str, kernels: bool, model=None) -> None:
    """Liger's patch function of the family (plan.LIGER) with its fused linear cross-entropy, and
    its RoPE, RMSNorm and MLP-activation kernels when `kernels`: each family's function names
    its own options (swiglu for SiLU MLPs, geglu for Gemma's), so only those it takes are
    passed. model: an instance to patch (else the module's classes)."""
    import liger_kernel.transformers as liger

    fn = getattr(liger, LIGER[model_type])
    options = {
        "rope": kernels,
        "rms_norm": kernels,
        "swiglu": kernels,
        "geglu": kernels,
        "cross_entropy": False,
        "fused_linear_cross_entropy": True,
        "model": model,
    }
    takes = inspect.signature(fn).parameters
    fn(**{k: v for k, v in options.items() if k in takes and (k != "model" or model is not None)})


def draws_random(config) -> bool:
    """Whether the decoder layers draw random numbers in training beside LoRA dropout (attention
    dropout; Phi-3's residual dropout): a recompute then replays the forward's random state."""
    return any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "resid_pdrop"))


def apply_llama_layout(patches: Patches, model, layers: list, plan: Plan, compile_backend: str, random: bool) -> dict:
    """The fast path on a decoder with the Llama layout (`h = x + attn(norm(x))`, `out = h +
    mlp(norm(h))` in each layer): Llama, Mistral, Qwen2, and Qwen3 (whose attention norms q and k
    on each head before RoPE, inside its own forward)."""
    halves = (layer_checkpoint.attention_half, layer_checkpoint.mlp_half)
    return _apply_decoder(patches, model, layers, plan, compile_backend, random, halves)


def apply_gemma_layout(patches: Patches, model, layers: list, plan: Plan, compile_backend: str, random: bool) -> dict:
    """The fast path on Gemma 2 and Gemma 3 (text) decoders: each layer's own forward (RMSNorm with
    its (1 + weight) scale, norms before and after attention and MLP, soft-capped attention
    logits in Gemma 2, q/k norms in Gemma 3, sliding-window layers with their own mask and RoPE,
    which the model passes each layer) compiled and checkpointed; gate and up as one 4-bit GEMM
    with the GeGLU (tanh GELU) after it, in the MLP's own code. The scaled embedding and the
    final logit soft-capping stay in the model's forward (or Liger's head)."""
    halves = (layer_checkpoint.sandwich_attention_half, layer_checkpoint.sandwich_mlp_half)
    return _apply_decoder(patches, model, layers, plan, compile_backend, random, halves)


def apply_phi3_layout(patches: Patches, model, layers: list, plan: Plan, compile_backend: str, random: bool) -> dict:
    """The fast path on Phi-3 decoders: the Llama layout with a dropout on each residual branch
    (resid_pdrop; a layer that draws from it replays the random state in its recompute), q/k/v
    as one layer (qkv_proj) and gate/up as one (gate_up_proj), so already one GEMM each; the
    SwiGLU kernel takes gate_up_proj's adapter, its B split into gate's and up's rows."""
    halves = (layer_checkpoint.dropout_attention_half, layer_checkpoint.dropout_mlp_half)
    return _apply_decoder(patches, model, layers, plan, compile_backend, random, halves)


def _apply_decoder(
    patches: Patches, model, layers: list, plan: Plan, compile_backend: str, random: bool, halves: tuple
) -> dict:
    """What every family's apply function installs: the 4-bit layers routed through NF4Linear,
    the fused projections, each decoder layer's own forward compiled and checkpointed (whole, or
    as the family's two halves for plan.split), and the fp32 residual stream."""
    done = {}
    if plan.nf4_traced and plan.compile:
        done["nf4_traced_layers"] = install(model, plan)
        if plan.fused_projections:
            done["fused_projections"] = install_fused(layers, plan)
    if plan.split:
        if plan.compile:
            halves = tuple(patches.compile(half, compile_backend) for half in halves)
        for layer in layers:
            layer.gradient_checkpointing = False
            layer.forward = types.MethodType(
                _split(*halves, plan, random, _original_forward(type(layer)), _keep(plan, layer)), layer
            )
        done["compiled_layers" if plan.compile else "checkpointed_layers"] = len(layers)
        done["layer_checkpoint"] = f"two halves, MLP backward in {plan.split} chunk(s)" + (
            ", inputs offloaded to pinned host memory" if plan.offload else ""
        )
    else:
        step = patches.compile(type(layers[0]), compile_backend) if plan.compile else _original_forward(type(layers[0]))
        for layer in layers:
            layer.gradient_checkpointing = False  # checkpointed here instead (around the compiled forward)
            layer.forward = types.MethodType(_checkpointed(step, plan, random, _keep(plan, layer)), layer)
        done["compiled_layers" if plan.compile else "checkpointed_layers"] = len(layers)
        if plan.offload:
            done["layer_checkpoint"] = "whole layers, inputs offloaded to pinned host memory"
    if plan.residual == "fp32":
        done["residual_stream"] = _fp32_residual(patches, model)
    return done


# The fast path's apply function for each model family (config.json's model_type), as Liger's
# MODEL_TYPE_TO_APPLY_LIGER_FN: plan.FAST_TYPES are the families choose() sends here.
APPLY = types.MappingProxyType(
    {
        "llama": apply_llama_layout,
        "mistral": apply_llama_layout,
        "qwen2": apply_llama_layout,
        "qwen3": apply_llama_layout,
        "gemma2": apply_gemma_layout,
        "gemma3_text": apply_gemma_layout,
        "phi3": apply_phi3_layout,
    }
)


def _fp32_residual(patches: Patches, model) -> str:
    """The residual stream in fp32 between the embedding and the final norm: the embedding's
    output is cast up (each layer's residual adds then run in fp32, and what follows its
    norms in fp32 up to the bf16 matmuls: the norms' outputs, q/k/v and RoPE, the adapter
    sums), the final norm's output back to the compute dtype (the head's matmul takes it in
    that dtype anyway)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = hf.get_decoder()
    dtype = decoder.norm.weight.dtype
    patches.hooks += [
        decoder.embed_tokens.register_forward_hook(lambda m, args, out: out.float()),
        decoder.norm.register_forward_hook(lambda m, args, out: out.to(dtype)),
    ]
    return f"fp32 (layer inputs checkpointed in {str(dtype).removeprefix('torch.')})"


@contextlib.contextmanager
def scoped(model_type: str, plan: Plan):
    """Patches made inside the block (module-level, or by Patches.apply) end with it.

    torch.compile's settings are the plan's inside (what compiled layers keep for backward:
    Plan.partitioner), and its limits are raised: one graph serves every decoder layer, but a
    run that sees new sequence lengths recompiles once for dynamic shapes; and a compiler
    failure falls back to running the layer uncompiled rather than stopping the run."""
    import torch._dynamo
    import torch._functorch.config

    patches = Patches(model_type)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    try:
        with (
            torch._dynamo.config.patch({limit: 64, "suppress_errors": True}),
            torch._functorch.config.patch(plan.partitioner()),
        ):
            yield patches
    finally:
        patches.undo()


def _modeling_modules(model_type: str) -> list[str]:
    """The transformers module that defines this model type's classes, found beside its config
    class: a model type need not name its package (gemma3_text lives in transformers.models.gemma3)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        name = CONFIG_MAPPING[model_type].__module__.replace(".configuration_", ".modeling_")
        return [name] if importlib.util.find_spec(name) is not None else []
    except (KeyError, ModuleNotFoundError):  # a type transformers does not know: nothing of its to snapshot
        return []


def _restore(obj, state: dict) -> None:
    for key in set(vars(obj)) - set(state):
        if not key.startswith("__"):  # names torch.compile installs (__compiled_fn_1, ...) stay: its code uses them
            delattr(obj, key)
    for key, value in state.items():
        if vars(obj).get(key) is not value:
            setattr(obj, key, value)


def _original_forward(cls):
    """The decoder layer's own forward, without transformers' checkpointing wrapper (newer
    transformers wrap the class's forward; older ones checkpoint in __call__)."""
    fwd = cls.forward
    while getattr(getattr(fwd, "__code__", None), "co_name", "") == "forward_with_checkpointing":
        fwd = fwd.__wrapped__
    return fwd


def _keep(plan: Plan, layer) -> torch.dtype | None:
    """The dtype a checkpointed layer's input is kept in: the compute dtype under an fp32 residual stream."""
    return layer.input_layernorm.weight.dtype if plan.residual == "fp32" else None


def _no_cache(kwargs: dict) -> dict:
    """A checkpointed layer recomputes its forward: a KV cache would be updated twice (what
    transformers' own checkpointing does: no cache while it checkpoints)."""
    if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None or kwargs.get("use_cache"):
        kwargs = {**kwargs, "use_cache": False}
        for key in ("past_key_values", "past_key_value"):
            if key in kwargs:
                kwargs[key] = None
    return kwargs


def _split(attn, mlp, plan: Plan, random: bool, whole, keep):
    """A decoder layer's forward as its two halves (ops/layer_checkpoint.py); a call with
    more positional arguments than the hidden states runs the layer's own forward."""
    gradient_checkpointing, chunks, offload = plan.gradient_checkpointing, plan.split, plan.offload

    def forward(self, *args, **kwargs):
        if len(args) > 1 or (not args and "hidden_states" not in kwargs):
            return whole(self, *args, **kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if gradient_checkpointing and self.training and torch.is_grad_enabled():
            kwargs = _no_cache(kwargs)
            return layer_checkpoint.checkpoint(
                lambda h: attn(self, h, **kwargs), lambda h: mlp(self, h), x, chunks, offload, random, keep
            )
        return mlp(self, attn(self, x, **kwargs))

    return forward


def _checkpointed(step, plan: Plan, random: bool, keep=None):
    """The whole layer checkpointed: by ops/layer_checkpoint.py (forward without autograd),
    or by torch's checkpoint for layers that draw random numbers (LoRA dropout: the recompute
    then replays the very graph that drew the masks) and where plan.checkpoint is "torch",
    unless the input goes to host memory or is kept in another dtype (which torch's checkpoint
    cannot do)."""
    gradient_checkpointing, offload = plan.gradient_checkpointing, plan.offload
    ours = offload or keep is not None or not (plan.checkpoint == "torch" or random)

    def forward(self, *args, **kwargs):
        if not (gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return step(self, *args, **kwargs)
        kwargs = _no_cache(kwargs)
        if ours and (args or "hidden_states" in kwargs):
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            return layer_checkpoint.checkpoint(
                lambda h: step(self, h, *rest, **kwargs), None, x, 1, offload, random, keep
            )
        # Keep only this layer's input; recompute the rest in backward (replaying the RNG
        # state only if dropout draws from it: saving it costs time on every layer).
        return checkpoint(step, self, *args, use_reentrant=False, preserve_rng_state=random, **kwargs)

    return forward


_NF4 = "_qlora_flow_nf4"  # module attribute: the 4-bit weight as plain tensors and constants
_FUSED = "_qlora_flow_fused"  # attention / MLP / LoRA-layer attribute: its fused projection group


def _nf4_forward(self, x: Tensor) -> Tensor:
    t = getattr(self, _NF4)
    y = NF4Linear.apply(x, t["meta"], *(t[k] for k in TENSOR_KEYS))
    return y.to(x.dtype)  # as bitsandbytes does


def _triton(plan: Plan) -> bool:
    """The plan's Triton dequantization, where it can run (registers its op: outside compiled code)."""
    return plan.triton and nf4_triton.available()


def install(model, plan: Plan) -> int:
    """Route every NF4 Linear4bit of the model through NF4Linear (the Triton dequantization
    where plan.triton and CUDA allow); returns how many."""
    import bitsandbytes as bnb

    triton = _triton(plan)
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        tensors = nf4_tensors(module)
        if tensors is None:
            continue
        setattr(module, _NF4, {**tensors, "meta": meta(tensors, triton, plan.pad_k)})
        module.forward = types.MethodType(_nf4_forward, module)
        count += 1
    return count


def uninstall(model) -> None:
    for module in model.modules():
        for name in (_NF4, _FUSED):
            if hasattr(module, name):
                delattr(module, name)
                module.__dict__.pop("forward", None)


# Fused projections: the LoRA layers of a decoder layer that read the same input (q, k and v;
# gate and up) as one 4-bit GEMM over their weights dequantized side by side, and one GEMM for
# their adapters' A matrices laid end to end. In backward, the input's gradient is then one
# GEMM over the concatenated weight instead of two or three GEMMs and the adds of their
# outputs, and the adapters' A gradients one GEMM that reads the input once.
# By default (adapters_in_gemm "none") each B and its sum with its slice of the base output stay
# apart as PEFT computes them (q/k/v; gate/up without plan.swiglu_kernel), and Inductor adds
# them in fp32 in the next elementwise kernel (RoPE, SwiGLU), reading a second output as large
# as the base's. With adapters in the GEMM (train.adapters_in_gemm), each group's B's go into
# its base GEMM's K dimension (NF4LoRALinear): "shared" for q/k/v (and gate/up without the
# SwiGLU kernel); "all" also o and down as groups of one, slower (their input must be copied
# next to the adapter's). With plan.swiglu_kernel, SiLU MLPs take NF4LoRASwiGLU: gate and up's
# adapters added inside the SwiGLU kernel (exact sums, no adapter outputs written).
# The attention classes whose forward _fused_attention reproduces, each with the keyword
# arguments its forward passes the attention function beside Llama's (read from the module:
# sliding_window from self.sliding_window, softcap from self.attn_logit_softcapping); q_norm and
# k_norm, where a class has them, norm each head of q and k before RoPE
ATTENTION_CLASSES = types.MappingProxyType(
    {
        "LlamaAttention": (),
        "Qwen3Attention": ("sliding_window",),
        "Gemma2Attention": ("sliding_window", "softcap"),
        "Gemma3Attention": ("sliding_window",),
    }
)
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP", "Gemma3MLP")  # down(act(gate(x)) * up(x))
STACKED_MLP_CLASSES = ("Phi3MLP",)  # down(up * act(gate)) with [gate | up] = gate_up_proj(x), one layer
_ATTENTION_ARGUMENTS = types.MappingProxyType({"sliding_window": "sliding_window", "softcap": "attn_logit_softcapping"})


def _plain_adapter(module) -> str | None:
    """The adapter of a PEFT LoRA layer over a routed NF4 base when it is the case fusing
    reproduces (one active adapter, vanilla LoRA, no dropout, not merged), else None."""
    base = getattr(module, "base_layer", None)
    if (
        base is None
        or not hasattr(base, _NF4)
        or not hasattr(module, "lora_A")
        or module.merged
        or module.disable_adapters
        or len(module.active_adapters) != 1
    ):
        return None
    name = module.active_adapters[0]
    if (
        name not in module.lora_A
        or name in getattr(module, "lora_variant", {})
        or getattr(module, "use_dora", {}).get(name, False)
        or getattr(module, "lora_bias", {}).get(name, False)
        or not isinstance(module.lora_dropout[name], torch.nn.Identity)
    ):
        return None
    return name


def _group(modules: list, adapters_in_gemm: bool, triton: bool, pad_k: int) -> dict | None:
    """The group's 4-bit weights laid end to end (laid_end_to_end); each layer's own Params4bit
    and quant state then point into the shared storage (views), so the 4-bit weights take no
    more memory than before. None where that cannot be (another adapter setup, or weights
    that cannot be laid end to end)."""
    adapters = [_plain_adapter(m) for m in modules]
    if None in adapters:
        return None
    nf4 = [getattr(m.base_layer, _NF4) for m in modules]
    fused = laid_end_to_end(nf4)
    if fused is None:
        return None
    if len(nf4) > 1:  # the layers' own 4-bit tensors become views of the shared ones
        at = {"packed": 0, "absmax": 0, "nested_absmax": 0}
        for m, t in zip(modules, nf4):
            views = {}
            for key in at:
                if t[key] is None:
                    continue
                n = t[key].numel()
                views[key] = fused[key][at[key] : at[key] + n].view_as(t[key])
                at[key] += n
            weight, state = m.base_layer.weight, m.base_layer.weight.quant_state
            weight.data = views["packed"]
            state.absmax = views["absmax"]
            if "nested_absmax" in views:
                state.state2.absmax = views["nested_absmax"]
            t.update(views)
    return {
        "modules": modules,
        "adapters": adapters,
        "meta": meta(fused, triton, pad_k),
        "tensors": tuple(fused[k] for k in TENSOR_KEYS),
        "sizes": [t["shape"][0] for t in nf4],
        "ranks": [m.lora_A[a].out_features for m, a in zip(modules, adapters)],
        "adapters_in_gemm": adapters_in_gemm,
    }


def lora_projections(x: Tensor, group: dict) -> list[Tensor]:
    """[base_i(x) + B_i(A_i(x)) * s_i for each layer of the group], with one GEMM for the
    bases and one for the A's; the B's in the bases' GEMM (NF4LoRALinear) or, without
    adapters in the GEMM, the arithmetic of PEFT's bnb 4-bit LoRA layer."""
    modules, adapters = group["modules"], group["adapters"]
    convert, mids = _mids(x, group)
    if group["adapters_in_gemm"]:
        b = torch.block_diag(*(m.lora_B[n].weight * m.scaling[n] for m, n in zip(modules, adapters)))
        y = NF4LoRALinear.apply(x, mids, b, group["meta"], *group["tensors"]).to(x.dtype)
        return list(y.split(group["sizes"], dim=-1))
    y = NF4Linear.apply(x, group["meta"], *group["tensors"]).to(x.dtype)
    outs = list(y.split(group["sizes"], dim=-1))
    mids = mids.split(group["ranks"], dim=-1)
    for i, (m, n) in enumerate(zip(modules, adapters)):
        out = m.lora_B[n](mids[i]) * m.scaling[n]
        outs[i] = outs[i] + (out.to(outs[i].dtype) if convert else out)
    return outs


def _mids(x: Tensor, group: dict) -> tuple[bool, Tensor]:
    """x A^T for all the group's A's side by side (one GEMM), and whether the adapters run in
    their own dtype (as PEFT does outside autocast)."""
    a = torch.cat([m.lora_A[n].weight for m, n in zip(group["modules"], group["adapters"])])
    convert = not torch.is_autocast_enabled()
    return convert, F.linear(x.to(a.dtype) if convert else x, a)


def lora_swiglu(x: Tensor, group: dict) -> Tensor:
    """act(gate(x)) * up(x) for a gate/up group with SiLU: one GEMM for the bases, one for the
    A's, the B's inside the SwiGLU kernel (NF4LoRASwiGLU)."""
    _, mids = _mids(x, group)
    (gate, up), (g, u) = group["modules"], group["adapters"]
    h = NF4LoRASwiGLU.apply(
        x,
        mids,
        gate.lora_B[g].weight * gate.scaling[g],
        up.lora_B[u].weight * up.scaling[u],
        group["kernel"],
        group["meta"],
        *group["tensors"],
    )
    return h.to(x.dtype)


def _changed(group: dict) -> bool:
    """Adapters disabled or merged since fusing (then the module's own forward runs)."""
    return any(m.disable_adapters or m.merged for m in group["modules"])


def _fused_attention(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    group = getattr(self, _FUSED)
    cache = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
    if cache is not None or _changed(group):  # generation with a cache: the layer's own code
        return type(self).forward(
            self,
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
    kwargs.pop("past_key_value", None)
    modeling = group["modeling"]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape) for t in lora_projections(hidden_states, group))
    if hasattr(self, "q_norm"):  # RMSNorm over each head's dimension (Qwen3, Gemma 3)
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    attention = modeling.eager_attention_forward
    if self.config._attn_implementation != "eager":
        attention = modeling.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **{name: getattr(self, _ATTENTION_ARGUMENTS[name], None) for name in group["arguments"]},
        **kwargs,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fused_mlp(self, x):
    group = getattr(self, _FUSED)
    if _changed(group):
        return type(self).forward(self, x)
    if group["swiglu"]:
        return self.down_proj(lora_swiglu(x, group))
    gate, up = lora_projections(x, group)
    return self.down_proj(self.act_fn(gate) * up)


def lora_stacked_swiglu(x: Tensor, group: dict) -> Tensor:
    """act(gate) * up for one LoRA layer whose output is [gate | up] (Phi-3's gate_up_proj) with
    SiLU: its one adapter's input m = x A^T serves both halves, its B's rows split into gate's and
    up's, so the SwiGLU kernel adds them as it adds two layers' (NF4LoRASwiGLU; m's gradient is
    the sum of the two halves')."""
    _, m = _mids(x, group)
    (module,), (name,) = group["modules"], group["adapters"]
    b = module.lora_B[name].weight * module.scaling[name]
    n = b.shape[0] // 2
    h = NF4LoRASwiGLU.apply(
        x, torch.cat((m, m), dim=-1), b[:n], b[n:], group["kernel"], group["meta"], *group["tensors"]
    )
    return h.to(x.dtype)


def _fused_stacked_mlp(self, x):
    group = getattr(self, _FUSED)
    if _changed(group):
        return type(self).forward(self, x)
    return self.down_proj(lora_stacked_swiglu(x, group))


def _lora_layer(self, x, *args, **kwargs):
    """A LoRA layer of its own (o, down) with its adapter in the GEMM; PEFT's own forward for
    anything else (adapters changed, PEFT's extra arguments such as adapter_names)."""
    group = getattr(self, _FUSED)
    if _changed(group) or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    return lora_projections(x, group)[0]


def install_fused(layers: list, plan: Plan) -> dict:
    """Fuse q/k/v and gate/up of decoder layers (ATTENTION_CLASSES, MLP_CLASSES; Phi-3's
    gate_up_proj, STACKED_MLP_CLASSES, is one layer already) whose 4-bit LoRA layers are routed
    through NF4Linear (after install): a SiLU MLP's gate and up adapters inside its SwiGLU
    kernel (plan.swiglu_kernel), the other groups' adapters in their GEMMs for
    plan.adapters_in_gemm "shared" (and o and down's for "all"); returns how many attention and
    MLP blocks were fused, and how many LoRA layers have their adapter in a GEMM and in a SwiGLU
    kernel."""
    shared, alone = plan.adapters_in_gemm in ("all", "shared"), plan.adapters_in_gemm == "all"
    triton = _triton(plan)
    # the SwiGLU kernel's ops registered outside compiled code (its own lever, whatever plan.triton says)
    kernel = plan.swiglu_kernel and swiglu_lora.available()
    done = {"attention": 0, "mlp": 0, "adapters_in_gemm": 0, "adapters_in_swiglu": 0}
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(attn).__name__ in ATTENTION_CLASSES and not getattr(attn.config, "attention_bias", False):
            group = _group([attn.q_proj, attn.k_proj, attn.v_proj], shared, triton, plan.pad_k)
            modeling = sys.modules[type(attn).__module__]
            if group and all(
                hasattr(modeling, n)
                for n in ("apply_rotary_pos_emb", "eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")
            ):
                arguments = ATTENTION_CLASSES[type(attn).__name__]
                setattr(attn, _FUSED, {**group, "modeling": modeling, "arguments": arguments})
                attn.forward = types.MethodType(_fused_attention, attn)
                done["attention"] += 1
                done["adapters_in_gemm"] += 3 * shared
        elif shared and hasattr(attn, "qkv_proj"):  # q/k/v one layer already (Phi-3): its adapter in its GEMM
            group = _group([attn.qkv_proj], True, triton, plan.pad_k)
            if group:
                setattr(attn.qkv_proj, _FUSED, group)
                attn.qkv_proj.forward = types.MethodType(_lora_layer, attn.qkv_proj)
                done["adapters_in_gemm"] += 1
        if type(mlp).__name__ in STACKED_MLP_CLASSES:
            silu = isinstance(mlp.activation_fn, torch.nn.SiLU) or type(mlp.activation_fn).__name__ == "SiLUActivation"
            group = _group([mlp.gate_up_proj], not (plan.swiglu_kernel and silu), triton, plan.pad_k)
            if group and plan.swiglu_kernel and silu:
                setattr(mlp, _FUSED, {**group, "kernel": kernel})
                mlp.forward = types.MethodType(_fused_stacked_mlp, mlp)
                done["mlp"] += 1
                done["adapters_in_swiglu"] += 1
            elif group and shared:  # no SwiGLU kernel: its adapter in its GEMM, the MLP's own code around it
                setattr(mlp.gate_up_proj, _FUSED, group)
                mlp.gate_up_proj.forward = types.MethodType(_lora_layer, mlp.gate_up_proj)
                done["adapters_in_gemm"] += 1
        if type(mlp).__name__ in MLP_CLASSES:
            swiglu = plan.swiglu_kernel and (
                isinstance(mlp.act_fn, torch.nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"
            )  # transformers' own
            group = _group([mlp.gate_proj, mlp.up_proj], shared and not swiglu, triton, plan.pad_k)
            if group:
                setattr(mlp, _FUSED, {**group, "swiglu": swiglu, "kernel": kernel})
                mlp.forward = types.MethodType(_fused_mlp, mlp)
                done["mlp"] += 1
                done["adapters_in_swiglu"] += 2 * swiglu
                done["adapters_in_gemm"] += 2 * (shared and not swiglu)
        for module in (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)) if alone else ():
            group = _group([module], True, triton, plan.pad_k) if module is not None else None
            if group:
                setattr(module, _FUSED, group)
                module.forward = types.MethodType(_lora_layer, module)
                done["adapters_in_gemm"] += 1
    return done
