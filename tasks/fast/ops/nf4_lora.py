"""The 4-bit base layer under a LoRA adapter, written so that torch.compile sees all of it.

bitsandbytes' Linear4bit runs its matmul as an opaque operator whose Python wrapper
dequantizes the weight (three kernel launches with double quant) and calls the GEMM; inside a
compiled decoder layer that leaves a Python call per linear layer, per forward, recompute and
backward, and at the 1B shape the GPU waits on Python (H100 profile, bench/results/README.md).
Here the NF4 double-quant dequantization is plain tensor code (a 16-entry table lookup times
a per-block scale, itself an 8-bit code times a per-256-block scale plus an offset), so
Inductor turns it into one generated kernel launched from compiled code, next to the GEMM.

NF4Linear is an autograd function whose backward dequantizes the weight again instead of
keeping the bf16 copy from the forward: activations only (x is not needed: dx = g W).
PEFT's adapter (x A^T B^T s) and its sum with the base output stay PEFT's own code; compiled,
the sum joins the next elementwise kernel (RoPE, the residual add) and is rounded once with
it, from fp32, which is what keeps the adapters' small first updates (a bf16 sum on its own
rounds them away: train.precision: bf16's early lag). A SiLU MLP's gate and up go further
(NF4LoRASwiGLU, below). `install(model)` routes the
4-bit layers of a model through it; `uninstall` undoes it. Only worth it compiled (eager, the
lookups are separate kernels): tasks/speed.py installs it with the compiled decoder layers.
`install_fused` (train.speed's fused projections) runs the projections that share an input as
one GEMM (see there). For a SiLU MLP, NF4LoRASwiGLU adds gate and up's adapters inside the
SwiGLU kernel (tasks/swiglu_lora.py): exact sums, and no adapter output as wide as the MLP.
With train.adapters_in_gemm, NF4LoRALinear puts q/k/v's adapters in their GEMM: [x | x A^T]
[W | s B]^T, the Triton kernel writing B's columns next to W's. It saves the adapter outputs'
second pass but rounds each sum to bf16 before RoPE, which the default avoids
(bench/results/README.md).
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

_NF4 = "_qlora_flow_nf4"  # module attribute: the 4-bit weight as plain tensors and constants


# tasks/nf4_triton.py's kernel for the dequantization on CUDA (double quant); False: the tensor
# code below everywhere (bench/gpu_qlora_bench.py compares the two: variant part notriton).
TRITON = True
_triton_ready = False  # set by install(), outside compiled code: the kernel's op is registered


def dequantize_nf4(packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
                   offset: Tensor | None, code: Tensor, shape: list[int], blocksize: int,
                   dtype: torch.dtype, extra: Tensor | None = None) -> Tensor:
    """bitsandbytes' dequantize_4bit in tensor operations, the same arithmetic in fp32:
    w = code[q] * scale[block], scale = nested_code[absmax] * nested_absmax[block // 256] + offset
    (double quant), and two 4-bit codes a byte, the first in the high half. offset: one value,
    or one per 256 blocks (weights laid end to end by install_fused). extra: columns to put
    after the weight's, [W | extra] (NF4LoRALinear's adapters)."""
    if TRITON and _triton_ready:
        from tasks import nf4_triton
        if nf4_triton.usable(packed, nested_absmax, shape, blocksize):
            return nf4_triton.dequantize(packed, absmax, nested_absmax, nested_code, offset, code, shape, blocksize,
                                         dtype, extra)
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // 256
        shift = offset.view(-1)[blocks] if offset.numel() > 1 else offset
        absmax = nested_code[absmax.int()] * nested_absmax[blocks] + shift
    q = packed.view(-1)
    q = torch.stack((q >> 4, q & 15), dim=-1).view(-1, blocksize)
    w = code[q.int()] * absmax.view(-1, 1).float()
    w = w.view(shape).to(dtype)
    return w if extra is None else torch.cat((w, extra.to(dtype)), dim=1)


class NF4Linear(torch.autograd.Function):
    """y = x W^T for a 4-bit W; backward dequantizes again rather than saving the bf16 weight:
    dx = g W. meta: (shape, blocksize, dtype); tensors: packed, absmax, nested_absmax,
    nested_code, offset, code."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.meta = meta
        shape, blocksize, dtype = meta
        return F.linear(x.to(dtype), dequantize_nf4(*tensors, list(shape), blocksize, dtype))

    @staticmethod
    def backward(ctx, grad):
        shape, blocksize, dtype = ctx.meta
        return (grad.to(dtype) @ dequantize_nf4(*ctx.saved_tensors, list(shape), blocksize, dtype), None) + (None,) * 6


PAD_K = 64  # NF4LoRALinear's K (inputs + ranks) padded with zero columns to a multiple of this


def _pad(k: int, r: int) -> int:
    """Zero columns after [W | B] (k inputs, r ranks): a K of whole GEMM tiles."""
    return -(k + r) % PAD_K


def _input_and_rank_grads(grad: Tensor, b: Tensor, meta: tuple, tensors) -> tuple[Tensor, Tensor]:
    """[dx | dm] = g [W | B]: the gradients of the input and of the adapters' rank inputs m in
    one GEMM over the weight dequantized again with B (N x R) in its last columns."""
    shape, blocksize, dtype = meta
    k, r = shape[1], b.shape[1]
    dxm = grad @ dequantize_nf4(*tensors, list(shape), blocksize, dtype, F.pad(b, (0, _pad(k, r))))
    return dxm[..., :k], dxm[..., k:k + r]


class NF4LoRALinear(torch.autograd.Function):
    """y = x W^T + m B^T = [x | m] [W | B]^T: a 4-bit layer and its adapter in one GEMM, where
    m = x A^T is the adapters' rank-r input (all the group's A's side by side) and B the
    block-diagonal of their B_i s_i (N x R). The adapter is added to the base in the GEMM's fp32
    accumulator and the sum rounded once: no adapter output of N columns is written and read
    again, and no separate GEMM over the output gradient gives dm. Backward dequantizes again:
    [dx | dm] = g [W | B] (one GEMM), dB = g^T m. K is padded with zero columns to a multiple
    of PAD_K. meta, tensors: as NF4Linear's."""

    @staticmethod
    def forward(ctx, x, m, b, meta, *tensors):
        shape, blocksize, dtype = meta
        b_dtype = b.dtype
        m, b = m.to(dtype), b.to(dtype)
        ctx.save_for_backward(m, b, *tensors)
        ctx.meta, ctx.b_dtype = meta, b_dtype
        pad = _pad(shape[1], m.shape[-1])
        return F.linear(torch.cat((x.to(dtype), F.pad(m, (0, pad))), dim=-1),
                        dequantize_nf4(*tensors, list(shape), blocksize, dtype, F.pad(b, (0, pad))))

    @staticmethod
    def backward(ctx, grad):
        m, b, *tensors = ctx.saved_tensors
        grad = grad.to(ctx.meta[2])
        dx, dm = _input_and_rank_grads(grad, b, ctx.meta, tensors)
        db = grad.reshape(-1, grad.shape[-1]).t() @ m.reshape(-1, m.shape[-1])
        return (dx, dm, db.to(ctx.b_dtype), None) + (None,) * 6


class NF4LoRASwiGLU(torch.autograd.Function):
    """h = silu(x W_g^T + m_g B_g^T) * (x W_u^T + m_u B_u^T) for gate and up laid end to end
    (W = [W_g; W_u], one 4-bit GEMM): the adapters are added to the GEMM's bf16 output in fp32
    inside the SwiGLU kernel (tasks/swiglu_lora.py): the adapter's part is never rounded on
    its own (more exact than PEFT under autocast, which rounds B's output to bf16) and no
    adapter output as wide as the MLP is written. Backward: the kernel's
    derivative gives [dg | du] laid like the GEMM's output; [dx | dm] = [dg | du] [W | B] is one
    GEMM over the weight dequantized again with B = blockdiag(B_g, B_u) in its last columns, as
    in NF4LoRALinear; dB_g = dg^T m_g, dB_u = du^T m_u. Keeps the base output (bf16) for backward.
    b_gate, b_up: the B's times their scaling. meta, tensors: as NF4Linear's."""

    @staticmethod
    def forward(ctx, x, m, b_gate, b_up, meta, *tensors):
        from tasks import swiglu_lora
        shape, blocksize, dtype = meta
        ctx.b_dtypes = (b_gate.dtype, b_up.dtype)
        m, b_gate, b_up = m.to(dtype).contiguous(), b_gate.to(dtype), b_up.to(dtype)
        y = F.linear(x.to(dtype), dequantize_nf4(*tensors, list(shape), blocksize, dtype))
        ctx.save_for_backward(y, m, b_gate, b_up, *tensors)
        ctx.meta = meta
        return swiglu_lora.forward(y, m, b_gate, b_up)

    @staticmethod
    def backward(ctx, grad):
        from tasks import swiglu_lora
        y, m, b_gate, b_up, *tensors = ctx.saved_tensors
        dy = swiglu_lora.backward(y, m, b_gate, b_up, grad.to(ctx.meta[2]))
        dx, dm = _input_and_rank_grads(dy, torch.block_diag(b_gate, b_up), ctx.meta, tensors)
        n, r_gate = b_gate.shape
        flat_dy, flat_m = dy.reshape(-1, 2 * n), m.reshape(-1, m.shape[-1])
        d_gate = flat_dy[:, :n].t() @ flat_m[:, :r_gate]
        d_up = flat_dy[:, n:].t() @ flat_m[:, r_gate:]
        return (dx, dm, d_gate.to(ctx.b_dtypes[0]), d_up.to(ctx.b_dtypes[1]), None) + (None,) * 6


def nf4_tensors(layer) -> dict | None:
    """A bitsandbytes Linear4bit's NF4 weight as plain tensors and constants, or None."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(layer, "bias", None) is not None:
        return None
    if len(state.shape) != 2 or (state.nested and state.state2.blocksize != 256):
        return None
    if state.shape[0] * state.shape[1] % state.blocksize:
        return None
    nested = state.nested
    return {"packed": weight.data, "absmax": state.absmax,
            "nested_absmax": state.state2.absmax if nested else None,
            "nested_code": state.state2.code if nested else None,
            "offset": state.offset if nested else None, "code": state.code.float(),
            "shape": [int(n) for n in state.shape], "blocksize": int(state.blocksize),
            "dtype": getattr(layer, "compute_dtype", None) or torch.bfloat16}


_KEYS = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code")


def _meta(t: dict) -> tuple:
    return (tuple(t["shape"]), t["blocksize"], t["dtype"])


def _forward(self, x: Tensor) -> Tensor:
    t = getattr(self, _NF4)
    y = NF4Linear.apply(x, _meta(t), *(t[k] for k in _KEYS))
    return y.to(x.dtype)  # as bitsandbytes does


def install(model) -> int:
    """Route every NF4 Linear4bit of the model through NF4Linear; returns how many."""
    import bitsandbytes as bnb
    global _triton_ready
    if TRITON and not _triton_ready and torch.cuda.is_available():
        from tasks import nf4_triton
        _triton_ready = nf4_triton.available()
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        tensors = nf4_tensors(module)
        if tensors is None:
            continue
        setattr(module, _NF4, tensors)
        module.forward = types.MethodType(_forward, module)
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
# GEMM over the concatenated weight (K = 6144 or 28672 at the 8B shape) instead of two or three
# GEMMs and the adds of their outputs, and the adapters' A gradients one GEMM that reads the
# input once.
# By default ("none") each B and its sum with its slice of the base output stay apart as PEFT
# computes them (q/k/v; gate/up when SWIGLU_KERNEL does not take them), and Inductor adds them
# in fp32 in the next elementwise kernel (RoPE, SwiGLU),
# reading a second output as large as the base's. With adapters in the GEMM (train.
# adapters_in_gemm), each group's B's go into its base GEMM's K dimension (NF4LoRALinear): "shared"
# for q/k/v (and gate/up when SWIGLU_KERNEL does not take them); "all" also o and down as groups
# of one, slower (their input must be copied next to the adapter's: bench/results/README.md).
# SiLU MLPs take NF4LoRASwiGLU: gate and up's adapters added inside the SwiGLU kernel (exact
# sums, no adapter outputs written; tasks/swiglu_lora.py). False: lora_projections for them too
# (bench/gpu_qlora_bench.py compares the two: variant part noswiglu).
SWIGLU_KERNEL = True
_FUSED = "_qlora_flow_fused"  # attention / MLP / LoRA-layer attribute: its fused projection group
ATTENTION_CLASSES = ("LlamaAttention",)  # whose forward _fused_attention reproduces
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x))


def _plain_adapter(module) -> str | None:
    """The adapter of a PEFT LoRA layer over a routed NF4 base when it is the case fusing
    reproduces (one active adapter, vanilla LoRA, no dropout, not merged), else None."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(base, _NF4) or not hasattr(module, "lora_A") or module.merged \
            or module.disable_adapters or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) \
            or getattr(module, "use_dora", {}).get(name, False) or getattr(module, "lora_bias", {}).get(name, False) \
            or not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def laid_end_to_end(nf4: list[dict]) -> dict | None:
    """4-bit weights of the same input width as ONE NF4 weight of shape (sum of outputs,
    inputs), so that one dequantization (one kernel) writes them side by side: packed codes,
    block scales and nested scales concatenated, the offset one value per 256 blocks. None
    where that cannot be (other dtypes or tables, a weight whose blocks do not fill whole
    256-block groups of nested scales)."""
    first = nf4[0]
    if len(nf4) == 1:
        return first
    if len({(t["dtype"], t["shape"][1], t["blocksize"]) for t in nf4}) != 1 \
            or any(not torch.equal(t["code"], first["code"]) for t in nf4):
        return None
    nested = first["nested_absmax"] is not None
    if nested and any(t["nested_absmax"] is None or t["absmax"].numel() % 256
                      or not torch.equal(t["nested_code"], first["nested_code"]) for t in nf4):
        return None
    if not nested and any(t["nested_absmax"] is not None for t in nf4):
        return None
    return {"packed": torch.cat([t["packed"].view(-1) for t in nf4]),
            "absmax": torch.cat([t["absmax"].view(-1) for t in nf4]),
            "code": first["code"], "nested_code": first["nested_code"],
            "nested_absmax": torch.cat([t["nested_absmax"] for t in nf4]) if nested else None,
            "offset": torch.cat([t["offset"].reshape(1).expand(t["nested_absmax"].numel()) for t in nf4])
            if nested else None,
            "shape": [sum(t["shape"][0] for t in nf4), first["shape"][1]], "blocksize": first["blocksize"],
            "dtype": first["dtype"]}


def _group(modules: list, adapters_in_gemm: bool) -> dict | None:
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
                views[key] = fused[key][at[key]: at[key] + n].view_as(t[key])
                at[key] += n
            weight, state = m.base_layer.weight, m.base_layer.weight.quant_state
            weight.data = views["packed"]
            state.absmax = views["absmax"]
            if "nested_absmax" in views:
                state.state2.absmax = views["nested_absmax"]
            t.update(views)
    return {"modules": modules, "adapters": adapters, "meta": _meta(fused),
            "tensors": tuple(fused[k] for k in _KEYS), "sizes": [t["shape"][0] for t in nf4],
            "ranks": [m.lora_A[a].out_features for m, a in zip(modules, adapters)],
            "adapters_in_gemm": adapters_in_gemm}


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
    h = NF4LoRASwiGLU.apply(x, mids, gate.lora_B[g].weight * gate.scaling[g], up.lora_B[u].weight * up.scaling[u],
                            group["meta"], *group["tensors"])
    return h.to(x.dtype)


def _changed(group: dict) -> bool:
    """Adapters disabled or merged since fusing (then the module's own forward runs)."""
    return any(m.disable_adapters or m.merged for m in group["modules"])


def _fused_attention(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                     **kwargs):
    group = getattr(self, _FUSED)
    cache = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
    if cache is not None or _changed(group):  # generation with a cache: the layer's own code
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    kwargs.pop("past_key_value", None)
    modeling = group["modeling"]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in lora_projections(hidden_states, group))
    cos, sin = position_embeddings
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    attention = modeling.eager_attention_forward
    if self.config._attn_implementation != "eager":
        attention = modeling.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fused_mlp(self, x):
    group = getattr(self, _FUSED)
    if _changed(group):
        return type(self).forward(self, x)
    if group["swiglu"]:
        return self.down_proj(lora_swiglu(x, group))
    gate, up = lora_projections(x, group)
    return self.down_proj(self.act_fn(gate) * up)


def _lora_layer(self, x, *args, **kwargs):
    """A LoRA layer of its own (o, down) with its adapter in the GEMM; PEFT's own forward for
    anything else (adapters changed, PEFT's extra arguments such as adapter_names)."""
    group = getattr(self, _FUSED)
    if _changed(group) or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    return lora_projections(x, group)[0]


def install_fused(layers: list, adapters_in_gemm: str = "none") -> dict:
    """Fuse q/k/v and gate/up of Llama-layout decoder layers whose 4-bit LoRA layers are routed
    through NF4Linear (after install): a SiLU MLP's gate and up adapters inside its SwiGLU
    kernel (SWIGLU_KERNEL), the other groups' adapters in their GEMMs for adapters_in_gemm
    "shared" (and o and down's for "all"); returns how many attention and MLP blocks were fused,
    and how many LoRA layers have their adapter in a GEMM and in a SwiGLU kernel."""
    shared, alone = adapters_in_gemm in ("all", "shared"), adapters_in_gemm == "all"
    done = {"attention": 0, "mlp": 0, "adapters_in_gemm": 0, "adapters_in_swiglu": 0}
    if SWIGLU_KERNEL and torch.cuda.is_available():
        from tasks import swiglu_lora
        swiglu_lora.available()  # registers its ops outside compiled code (whatever TRITON says: a lever of its own)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(attn).__name__ in ATTENTION_CLASSES and not getattr(attn.config, "attention_bias", False):
            group = _group([attn.q_proj, attn.k_proj, attn.v_proj], shared)
            modeling = sys.modules[type(attn).__module__]
            if group and all(hasattr(modeling, n) for n in ("apply_rotary_pos_emb", "eager_attention_forward",
                                                             "ALL_ATTENTION_FUNCTIONS")):
                setattr(attn, _FUSED, {**group, "modeling": modeling})
                attn.forward = types.MethodType(_fused_attention, attn)
                done["attention"] += 1
                done["adapters_in_gemm"] += 3 * shared
        if type(mlp).__name__ in MLP_CLASSES:
            swiglu = SWIGLU_KERNEL and (isinstance(mlp.act_fn, torch.nn.SiLU)
                                        or type(mlp.act_fn).__name__ == "SiLUActivation")  # transformers' own
            group = _group([mlp.gate_proj, mlp.up_proj], shared and not swiglu)
            if group:
                setattr(mlp, _FUSED, {**group, "swiglu": swiglu})
                mlp.forward = types.MethodType(_fused_mlp, mlp)
                done["mlp"] += 1
                done["adapters_in_swiglu"] += 2 * swiglu
                done["adapters_in_gemm"] += 2 * (shared and not swiglu)
        for module in (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)) if alone else ():
            group = _group([module], True) if module is not None else None
            if group:
                setattr(module, _FUSED, group)
                module.forward = types.MethodType(_lora_layer, module)
                done["adapters_in_gemm"] += 1
    return done
