"""train.speed: how the training step runs, chosen once per run (`choose`) as a frozen Plan.

Every choice of the fast path is a field of the Plan; tasks/fast/patch.py installs what it
says and reads nothing else, so a run (or a benchmark variant, built with dataclasses.replace)
is described by its Plan alone.

auto, on CUDA, for a causal LM with a 4-bit base of a family the fast path is written for
(FAST_TYPES: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3), takes the fast path,
whatever train.liger_kernels, train.gradient_checkpointing and train.precision say:
  - each decoder layer's forward is compiled by torch.compile (one graph for all layers, in
    which norms, RoPE, SwiGLU, casts and residual adds become a few fused kernels) and
    checkpointed by tasks/fast/ops/layer_checkpoint.py: the forward runs without autograd (a
    graph of its own, which saves nothing), backward recomputes the layer with it. Against
    torch's checkpoint, which runs the training graph twice, the speed is the same and the
    loss nearer fp32 (docs/gpu.md; Plan.checkpoint "torch" compares them);
  - the 4-bit base layers are traced by the compiler (tasks/fast/ops/nf4_lora.py): the
    dequantization is one Triton kernel registered as a torch op on CUDA
    (tasks/fast/ops/nf4_triton.py; the tensor code elsewhere), called from the compiled graph
    (no Python call per layer), and their backward dequantizes again instead of keeping the
    bf16 weight;
  - q/k/v and gate/up run as one 4-bit GEMM each over their weights laid end to end, their
    adapters' A matrices as one GEMM (tasks/fast/patch.py): fewer, larger GEMMs, and one read
    of the input for the A's (Phi-3's qkv_proj and gate_up_proj are one layer each already);
  - a SiLU MLP's gate and up adapters are added inside the SwiGLU kernel
    (tasks/fast/ops/swiglu_lora.py): the sums exact in fp32, no adapter output as wide as the
    MLP written and read back; Gemma's GeGLU MLP runs its own activation after the fused GEMM;
  - with train.adapters_in_gemm, q/k/v's adapters go into their GEMM (the sums then rounded
    to bf16 there; off by default: next to the SwiGLU kernel it does not pay);
  - Liger's fused linear + cross-entropy computes the loss without a (tokens x vocab) tensor;
  - activations are bf16 (half the memory of an fp32 residual stream, which train.fp32_residual
    chooses); compiled, each LoRA layer's `base + adapter` joins the next elementwise kernel
    (RoPE, SwiGLU, the residual add) and is rounded once with it from fp32, which keeps the
    adapters' small first updates (tasks/fast/ops/nf4_lora.py says why). Adapters stay fp32.
lean: the fast path with each decoder layer as two compiled halves (attention, MLP) under one
checkpoint of ours, the MLP's recompute and backward in two token chunks: the peak of a step is
the MLP backward's working set, and this halves it, for a little speed.
offload: the fast path, and the layer inputs that checkpointing keeps wait in pinned host
memory, copied there and back on a side stream while layers compute: less GPU memory at
nearly auto's speed.
The optimizer stays train.optimizer (auto: paged AdamW 32-bit on CUDA), run over one flat
buffer of all adapter weights (tasks/training/flat_optim.py: the same update in one kernel launch, not
one per tensor); `adamw` is torch's fused AdamW there, which keeps 8 bytes of state per adapter
weight on the GPU.
auto anywhere else, and off: the train.* flags as set (the CPU path is unchanged). On CUDA
a model that cannot take the fast path says why in one log line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types

import torch

# The model families (config.json's model_type) the fast path is written for: patch.APPLY has
# an apply function for each
FAST_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")

# Liger's patch function for each model family it covers (config.json's model_type)
LIGER = types.MappingProxyType(
    {
        "llama": "apply_liger_kernel_to_llama",
        "mistral": "apply_liger_kernel_to_mistral",
        "qwen2": "apply_liger_kernel_to_qwen2",
        "qwen3": "apply_liger_kernel_to_qwen3",
        "gemma2": "apply_liger_kernel_to_gemma2",
        "gemma3_text": "apply_liger_kernel_to_gemma3_text",
        "phi3": "apply_liger_kernel_to_phi3",
    }
)


@dataclasses.dataclass(frozen=True)
class Plan:
    fast: bool  # the fast path (compiled, checkpointed layers; fused LoRA)
    liger: bool  # Liger kernels (on the fast path: the fused linear cross-entropy only)
    gradient_checkpointing: bool
    precision: str  # train.precision mode for the rest of the model (tasks/model/precision.py)
    optimizer: str = "auto"  # train.optimizer for make_optimizer
    compile: bool = False  # torch.compile each decoder layer (fast path)
    nf4_traced: bool = False  # tasks/fast/ops/nf4_lora.py: 4-bit layers as tensor code (compiled fast path)
    split: int = 0  # layers as two compiled halves, the MLP's backward in this many token chunks
    # (tasks/fast/ops/layer_checkpoint.py; 0: one compiled graph a layer)
    offload: bool = False  # checkpointed layers keep their input in pinned host memory
    fused_projections: bool = False  # q/k/v and gate/up as one 4-bit GEMM each (+ one for their A's)
    adapters_in_gemm: str = "none"  # none, shared (q/k/v; gate/up unless in the SwiGLU kernel) or all (o, down
    # too): the LoRA B's inside their base GEMM (ops/nf4_lora.NF4LoRALinear)
    residual: str = "bf16"  # the residual stream between decoder layers: bf16, or fp32 (each layer's input
    # then checkpointed in bf16: tasks/fast/ops/layer_checkpoint.py)
    triton: bool = True  # the NF4 dequantization by tasks/fast/ops/nf4_triton.py where it can run (CUDA);
    # False: the tensor code of ops/nf4_lora.dequantize_nf4 everywhere
    swiglu_kernel: bool = True  # a SiLU MLP's gate/up adapters added inside the SwiGLU kernel
    # (ops/swiglu_lora.py); False: apart, as PEFT adds them
    pad_k: int = 64  # adapters in a GEMM: its K (inputs + ranks) padded with zero columns to a
    # multiple of this, a K of whole GEMM tiles (1: no padding)
    partitioner_cse: bool = False  # AOTAutograd's partitioner: merging the backward's dequantization with the
    # forward's would keep each bf16 weight from forward to backward (the 4-bit
    # point is not to): off
    activation_memory_budget: float = 0.9  # the partitioner recomputes cheap elementwise results (RMSNorm
    # outputs, SwiGLU's product) in backward rather than keep them; lower
    # budgets make it recompute matmuls or attention too (1.0: keep all)
    checkpoint: str = "ours"  # whole decoder layers checkpointed by "ours" (tasks/fast/ops/layer_checkpoint.py:
    # forward without a graph) or "torch" (torch.utils.checkpoint); layers with
    # LoRA dropout take torch's unless offloaded or kept in another dtype
    note: str = ""  # one line for the log ("" when there is nothing to say)

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "note"}

    def partitioner(self) -> dict:
        """torch._functorch.config settings for the compiled layers' backward (what they keep)."""
        return {"cse": self.partitioner_cse, "activation_memory_budget": self.activation_memory_budget}


def choose(t, device: torch.device, task: str, model_type: str, quantized: bool) -> Plan:
    """The plan for this run from train.speed and where and what it trains (model_type:
    the checkpoint's config.json model_type)."""
    flags = Plan(
        fast=False,
        liger=t.liger_kernels and device.type == "cuda" and model_type in LIGER,
        gradient_checkpointing=t.gradient_checkpointing,
        precision=t.precision,
        optimizer=t.optimizer,
    )
    if t.speed == "off" or device.type != "cuda":
        return (
            flags
            if not t.fp32_residual
            else dataclasses.replace(
                flags, note="train.fp32_residual applies on the fast path only (CUDA, train.speed not off): ignored"
            )
        )
    why = None
    if task != "causal_lm":
        why = f"task {task} (the fast path is for causal LMs)"
    elif model_type not in FAST_TYPES:
        why = f"'{model_type}' has no fast path (it is written for {', '.join(FAST_TYPES)})"
    elif not quantized:
        why = "the base is not 4-bit (quant.load_in_4bit: false)"
    if why:
        return dataclasses.replace(
            flags,
            note=f"speed: {t.speed}: {why}; using the train.* flags as set "
            f"(liger_kernels={flags.liger}, precision={t.precision})"
            + ("; train.fp32_residual ignored" if t.fp32_residual else ""),
        )
    liger = importlib.util.find_spec("liger_kernel") is not None
    note = (
        f"speed: {t.speed}: fast path (compiled + checkpointed decoder layers with the 4-bit dequantization "
        "inside, "
        + ("Liger fused linear cross-entropy" if liger else "full logits: liger-kernel is not installed")
        + ", bf16 activations, LoRA sums rounded once with the next operation)"
    )
    # Paged AdamW 32-bit (auto's choice on CUDA) over one flat buffer: the same update in one launch
    optimizer = "paged_adamw_32bit_flat" if t.optimizer in ("auto", "paged_adamw_32bit") else t.optimizer
    split, offload = {"lean": (2, False), "offload": (0, True)}.get(t.speed, (0, False))
    if split:
        note += f"; layers as two compiled halves, the MLP in {split} token chunks"
    if offload:
        note += "; layer inputs in pinned host memory"
    if t.adapters_in_gemm:
        note += (
            "; q/k/v adapters (gate/up's where the MLP is not SiLU) added inside their base GEMMs (sums rounded "
            "to bf16 there)"
        )
    if t.fp32_residual:
        note += "; the residual stream in fp32 (layer inputs checkpointed in bf16)"
    return Plan(
        fast=True,
        liger=liger,
        gradient_checkpointing=True,
        precision="bf16",
        optimizer=optimizer,
        compile=True,
        nf4_traced=True,
        split=split,
        offload=offload,
        fused_projections=True,
        adapters_in_gemm="shared" if t.adapters_in_gemm else "none",
        residual="fp32" if t.fp32_residual else "bf16",
        note=note,
    )
