"""train.speed: how the training step runs, chosen once per run (`choose`), and the patches
that make it so, scoped to the training (`scoped`).

auto, on CUDA, for a causal LM with a 4-bit base and a Llama-layout decoder (Llama, Mistral,
Qwen2), takes the fast path, whatever train.liger_kernels, train.gradient_checkpointing and
train.precision say:
  - each decoder layer's forward is compiled by torch.compile (one graph for all layers, in
    which norms, RoPE, SwiGLU, casts and residual adds become a few fused kernels) and
    checkpointed by tasks/layer_checkpoint.py: the forward runs without autograd (a graph of
    its own, which saves nothing), backward recomputes the layer with it. Against torch's
    checkpoint, which runs the training graph twice, the speed is the same and the loss nearer
    fp32 (H100, 8B shape, side by side: largest difference over 22 steps 0.049 against 0.057;
    why was not isolated: lean's halves also run their forward without autograd and sit at
    0.057; TORCH_CHECKPOINT compares them);
  - the 4-bit base layers are traced by the compiler (tasks/fast_lora.py): the dequantization
    is one Triton kernel registered as a torch op on CUDA (tasks/nf4_triton.py; the tensor code
    elsewhere), called from the compiled graph (no Python call per layer), and their backward
    dequantizes again instead of keeping the bf16 weight;
  - q/k/v and gate/up run as one 4-bit GEMM each over their weights laid end to end, their
    adapters' A matrices as one GEMM (fast_lora.install_fused; H100, 8B shape: LoRA GEMMs
    69 -> 58 ms a step, peak 10.0 -> 9.6 GiB);
  - gate and up's adapters are added inside the SwiGLU kernel (tasks/swiglu_lora.py): the
    sums exact in fp32, no adapter output as wide as the MLP written and read back (H100, 8B
    shape, with the partitioner's budget at 0.9: 10,557 -> 11,192 tokens/s, 9.58 -> 9.44 GiB);
  - with train.adapters_in_gemm, q/k/v's adapters go into their GEMM (the sums then rounded
    to bf16 there; no longer faster next to the SwiGLU kernel: off by default);
  - Liger's fused linear + cross-entropy computes the loss without a (tokens x vocab) tensor;
  - activations are bf16 (half the memory of an fp32 residual stream, which train.fp32_residual
    chooses); compiled, each LoRA layer's `base + adapter` joins the next elementwise kernel
    (RoPE, SwiGLU, the residual add) and is rounded once with it from fp32, which keeps the
    adapters' small first updates (fast_lora says why). Adapters stay fp32.
lean: the fast path with each decoder layer as two compiled halves (attention, MLP) under
one checkpoint of ours (tasks/layer_checkpoint.py), the MLP's recompute and backward in two
token chunks: the peak of a step is the MLP backward's working set, and this halves it
(H100, 8B shape: 8.75 GiB where auto peaks at 9.50 and Unsloth at 9.54; 4% slower; its loss
as far from fp32 as with torch's checkpoint, 0.057 over 22 steps).
offload: the fast path, and the layer inputs that checkpointing keeps wait in pinned host
memory, copied there and back on a side stream while layers compute (H100, 8B shape: 7.69 GiB
where auto peaks at 9.50 and Unsloth's offloaded checkpointing at 7.88; 0.99x auto's speed).
The optimizer stays train.optimizer (auto: paged AdamW 32-bit on CUDA), run over one flat
buffer of all adapter weights (tasks/flat_optim.py: the same update in one kernel launch, not
one per tensor); `adamw` is torch's fused AdamW there, which keeps 8 bytes of state per adapter
weight on the GPU (bench/results/README.md).
auto anywhere else, and off: the train.* flags as set (the CPU path is unchanged). On CUDA
a model that cannot take the fast path says why in one log line.

Everything is undone when the `scoped` block ends: module-level patches (Liger's), and the
instance patches on the models it applied to, so evaluation and merge in the same process
build and run unpatched models.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import types

import torch
from torch.utils.checkpoint import checkpoint

FAST_TYPES = ("llama", "mistral", "qwen2")  # the decoder layout the fast path is written for

# What a compiled layer keeps for its backward (AOTAutograd's partitioner). cse: merging the
# backward's dequantization with the forward's would keep each bf16 weight from forward to
# backward (the 4-bit point is not to); off. activation_memory_budget: recompute the cheap
# elementwise results (RMSNorm outputs, SwiGLU's product) in backward rather than keep them.
# Together: 0.57 of the default's bytes for a small layer at 0.7 and at 0.9 (tests/test_speed.py
# checks < 0.7); at 0.5 the solver recomputed matmuls too (H100, 8B shape: step +6%). 0.9, not 0.7: once the
# MLP's adapters went inside the SwiGLU kernel (fast_lora.NF4LoRASwiGLU) there was less to
# save, and at 0.7 the solver recomputed attention's forward in backward (H100, 8B shape:
# 10,955 tokens/s at 0.7 and 0.8, 11,220 at 0.9, the same 9.44-9.5 GiB peak).
PARTITIONER = {"cse": False, "activation_memory_budget": 0.9}

# True: whole decoder layers on the fast path are checkpointed by torch.utils.checkpoint (unless
# their input goes to host memory or is kept in another dtype); False: by tasks/layer_checkpoint.py,
# whose forward runs the compiled layer without a graph, except layers with dropout (torch's then,
# see _checkpointed). bench/gpu_qlora_bench.py part torchcheckpoint compares them.
TORCH_CHECKPOINT = False

LIGER = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
         "qwen2": "apply_liger_kernel_to_qwen2"}


@dataclasses.dataclass(frozen=True)
class Plan:
    fast: bool                   # the fast path (compiled, checkpointed layers; fused LoRA)
    liger: bool                  # Liger kernels (on the fast path: the fused linear cross-entropy only)
    gradient_checkpointing: bool
    precision: str               # train.precision mode for the rest of the model (tasks/precision.py)
    optimizer: str = "auto"      # train.optimizer for make_optimizer
    compile: bool = False        # torch.compile each decoder layer (fast path)
    nf4_traced: bool = False     # tasks/fast_lora.py: 4-bit layers as tensor code (compiled fast path)
    split: int = 0               # tasks/layer_checkpoint.py: layers as two compiled halves, the MLP's backward
                                 # in this many token chunks (0: one compiled graph a layer)
    offload: bool = False        # checkpointed layers keep their input in pinned host memory
    fused_projections: bool = False  # tasks/fast_lora.py: q/k/v and gate/up as one 4-bit GEMM each (+ one for their A's)
    adapters_in_gemm: str = "none"  # tasks/fast_lora.install_fused: none, shared (q/k/v; gate/up unless in the
                                    # SwiGLU kernel) or all (o, down too)
    residual: str = "bf16"       # the residual stream between decoder layers: bf16, or fp32 (each layer's input
                                 # then checkpointed in bf16: tasks/layer_checkpoint.py)
    note: str = ""               # one line for the log ("" when there is nothing to say)

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "note"}


def choose(t, device: torch.device, task: str, model_type: str, quantized: bool) -> Plan:
    """The plan for this run from train.speed and where and what it trains."""
    flags = Plan(fast=False, liger=t.liger_kernels and device.type == "cuda" and model_type in LIGER,
                 gradient_checkpointing=t.gradient_checkpointing, precision=t.precision, optimizer=t.optimizer)
    if t.speed == "off" or device.type != "cuda":
        return flags if not t.fp32_residual else dataclasses.replace(
            flags, note="train.fp32_residual applies on the fast path only (CUDA, train.speed not off): ignored")
    why = None
    if task != "causal_lm":
        why = f"task {task} (the fast path is for causal LMs)"
    elif model_type not in FAST_TYPES:
        why = f"'{model_type}' is not a Llama/Mistral/Qwen2-layout decoder"
    elif not quantized:
        why = "the base is not 4-bit (quant.load_in_4bit: false)"
    if why:
        return dataclasses.replace(flags, note=f"speed: {t.speed}: {why}; using the train.* flags as set "
                                               f"(liger_kernels={flags.liger}, precision={t.precision})"
                                   + ("; train.fp32_residual ignored" if t.fp32_residual else ""))
    liger = importlib.util.find_spec("liger_kernel") is not None
    note = (f"speed: {t.speed}: fast path (compiled + checkpointed decoder layers with the 4-bit dequantization "
            "inside, " + ("Liger fused linear cross-entropy" if liger else "full logits: liger-kernel is not installed")
            + ", bf16 activations, LoRA sums rounded once with the next operation)")
    # Paged AdamW 32-bit (auto's choice on CUDA) over one flat buffer: the same update in one launch
    optimizer = "paged_adamw_32bit_flat" if t.optimizer in ("auto", "paged_adamw_32bit") else t.optimizer
    split, offload = {"lean": (2, False), "offload": (0, True)}.get(t.speed, (0, False))
    if split:
        note += f"; layers as two compiled halves, the MLP in {split} token chunks"
    if offload:
        note += "; layer inputs in pinned host memory"
    if t.adapters_in_gemm:
        note += "; q/k/v adapters (gate/up's where the MLP is not SiLU) added inside their base GEMMs (sums rounded " \
                "to bf16 there)"
    if t.fp32_residual:
        note += "; the residual stream in fp32 (layer inputs checkpointed in bf16)"
    return Plan(fast=True, liger=liger, gradient_checkpointing=True, precision="bf16", optimizer=optimizer,
                compile=True, nf4_traced=True, split=split, offload=offload, fused_projections=True,
                adapters_in_gemm="shared" if t.adapters_in_gemm else "none",
                residual="fp32" if t.fp32_residual else "bf16", note=note)


def decoder_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "input_layernorm") and hasattr(m, "post_attention_layernorm")
            and hasattr(m, "self_attn") and hasattr(m, "mlp")]


class Patches:
    """Snapshot of the patchable state of one model family; apply() patches models, undo()
    puts back the modules, classes and model instances as they were."""

    def __init__(self, model_type: str):
        self.modules = [importlib.import_module(name) for name in _modeling_modules(model_type)]
        self.module_state = [(m, dict(vars(m))) for m in self.modules]
        self.class_state = [(c, dict(vars(c))) for m in self.modules for c in list(vars(m).values())
                            if isinstance(c, type) and c.__module__ == m.__name__]
        self.models: list[tuple[object, set[int], dict]] = []
        self.hooks: list = []

    def apply(self, model, plan: Plan, model_type: str, compile_backend: str = "inductor",
              random: bool = True) -> dict:
        """Install the fast path on a PEFT model with adapters (after tasks.train.add_lora).
        random: the layers draw random numbers (LoRA dropout), so a recompute replays the RNG."""
        from tasks import fast_lora
        had_forward = {id(m) for m in model.modules() if "forward" in vars(m)}
        layers = decoder_layers(model)
        self.models.append((model, had_forward, {id(layer): layer.gradient_checkpointing for layer in layers}))
        done = {}
        if plan.liger and model_type in LIGER:
            import liger_kernel.transformers as liger
            hf = model.get_base_model() if hasattr(model, "get_base_model") else model
            # Only the head's fused linear cross-entropy when layers are compiled: inside a
            # compiled layer, Inductor fuses the norms, RoPE and SwiGLU itself.
            kernels = not plan.compile
            getattr(liger, LIGER[model_type])(rope=kernels, rms_norm=kernels, swiglu=kernels, cross_entropy=False,
                                              fused_linear_cross_entropy=True, model=hf)
            done["liger"] = "fused linear cross-entropy" + (", RMSNorm, RoPE, SwiGLU" if kernels else "")
        if plan.nf4_traced and plan.compile:
            done["nf4_traced_layers"] = fast_lora.install(model)
            if plan.fused_projections:
                done["fused_projections"] = fast_lora.install_fused(layers, plan.adapters_in_gemm)
        if plan.fast and plan.split:
            from tasks import layer_checkpoint as lc
            halves = (_compiled(lc.attention_half, compile_backend), _compiled(lc.mlp_half, compile_backend)) \
                if plan.compile else (lc.attention_half, lc.mlp_half)
            for layer in layers:
                layer.gradient_checkpointing = False
                layer.forward = types.MethodType(_split(*halves, plan.gradient_checkpointing, plan.split,
                                                        plan.offload, random, _original_forward(type(layer)),
                                                        _keep(plan, layer)), layer)
            done["compiled_layers" if plan.compile else "checkpointed_layers"] = len(layers)
            done["layer_checkpoint"] = f"two halves, MLP backward in {plan.split} chunk(s)" + \
                (", inputs offloaded to pinned host memory" if plan.offload else "")
        elif plan.fast:
            step = _compiled(type(layers[0]), compile_backend) if plan.compile else _original_forward(type(layers[0]))
            for layer in layers:
                layer.gradient_checkpointing = False  # checkpointed here instead (around the compiled forward)
                layer.forward = types.MethodType(_checkpointed(step, plan.gradient_checkpointing, random, plan.offload,
                                                               _keep(plan, layer)), layer)
            done["compiled_layers" if plan.compile else "checkpointed_layers"] = len(layers)
            if plan.offload:
                done["layer_checkpoint"] = "whole layers, inputs offloaded to pinned host memory"
        if plan.fast and plan.residual == "fp32":
            done["residual_stream"] = self._fp32_residual(model)
        return done

    def _fp32_residual(self, model) -> str:
        """The residual stream in fp32 between the embedding and the final norm: the embedding's
        output is cast up (each layer's residual adds then run in fp32, and what follows its
        norms in fp32 up to the bf16 matmuls: the norms' outputs, q/k/v and RoPE, the adapter
        sums), the final norm's output back to the compute dtype (the head's matmul takes it in
        that dtype anyway)."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = hf.get_decoder()
        dtype = decoder.norm.weight.dtype
        self.hooks += [decoder.embed_tokens.register_forward_hook(lambda m, args, out: out.float()),
                       decoder.norm.register_forward_hook(lambda m, args, out: out.to(dtype))]
        return f"fp32 (layer inputs checkpointed in {str(dtype).removeprefix('torch.')})"

    def undo(self) -> None:
        from tasks import fast_lora
        for hook in self.hooks:  # first: nothing below can leave them behind
            hook.remove()
        self.hooks.clear()
        for model, had_forward, checkpointing in self.models:
            fast_lora.uninstall(model)
            for m in model.modules():
                if id(m) not in had_forward:
                    m.__dict__.pop("forward", None)
                if id(m) in checkpointing:
                    m.gradient_checkpointing = checkpointing[id(m)]
        self.models.clear()
        for module, state in self.module_state:
            _restore(module, state)
        for cls, state in self.class_state:
            _restore(cls, state)


@contextlib.contextmanager
def scoped(model_type: str):
    """Patches made inside the block (module-level, or by Patches.apply) end with it.

    torch.compile's limits are raised inside, too: one graph serves every decoder layer, but
    a run that sees new sequence lengths recompiles once for dynamic shapes; and a compiler
    failure falls back to running the layer uncompiled rather than stopping the run."""
    import torch._dynamo
    import torch._functorch.config
    patches = Patches(model_type)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    try:
        with torch._dynamo.config.patch({limit: 64, "suppress_errors": True}), \
                torch._functorch.config.patch(PARTITIONER):
            yield patches
    finally:
        patches.undo()



def _modeling_modules(model_type: str) -> list[str]:
    names = []
    if model_type.isidentifier():
        names.append(f"transformers.models.{model_type}.modeling_{model_type}")
    return [n for n in names if importlib.util.find_spec(n) is not None]


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


_COMPILED: dict = {}


def _compiled(fn, backend: str):
    """One compiled function per decoder class (or layer half), shared by its layers (one graph for all)."""
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_original_forward(fn) if isinstance(fn, type) else fn, backend=backend)
    return _COMPILED[key]


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


def _split(attn, mlp, gradient_checkpointing: bool, chunks: int, offload: bool, random: bool, whole, keep):
    """A decoder layer's forward as its two halves (tasks/layer_checkpoint.py); a call with
    more positional arguments than the hidden states runs the layer's own forward."""
    from tasks import layer_checkpoint

    def forward(self, *args, **kwargs):
        if len(args) > 1 or (not args and "hidden_states" not in kwargs):
            return whole(self, *args, **kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if gradient_checkpointing and self.training and torch.is_grad_enabled():
            kwargs = _no_cache(kwargs)
            return layer_checkpoint.checkpoint(lambda h: attn(self, h, **kwargs), lambda h: mlp(self, h), x,
                                               chunks, offload, random, keep)
        return mlp(self, attn(self, x, **kwargs))
    return forward


def _checkpointed(step, gradient_checkpointing: bool, random: bool, offload: bool = False, keep=None):
    """The whole layer checkpointed: by tasks/layer_checkpoint.py (forward without autograd),
    or by torch's checkpoint for layers that draw random numbers (LoRA dropout: the recompute
    then replays the very graph that drew the masks) and under TORCH_CHECKPOINT, unless the
    input goes to host memory or is kept in another dtype (which torch's checkpoint cannot do)."""
    from tasks import layer_checkpoint
    ours = offload or keep is not None or not (TORCH_CHECKPOINT or random)

    def forward(self, *args, **kwargs):
        if not (gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return step(self, *args, **kwargs)
        kwargs = _no_cache(kwargs)
        if ours and (args or "hidden_states" in kwargs):
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            return layer_checkpoint.checkpoint(lambda h: step(self, h, *rest, **kwargs), None, x, 1, offload, random,
                                               keep)
        # Keep only this layer's input; recompute the rest in backward (replaying the RNG
        # state only if dropout draws from it: saving it costs time on every layer).
        return checkpoint(step, self, *args, use_reentrant=False, preserve_rng_state=random, **kwargs)
    return forward
