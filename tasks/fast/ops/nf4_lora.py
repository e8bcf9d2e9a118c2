"""The 4-bit base layer under a LoRA adapter as autograd functions that torch.compile sees whole.

bitsandbytes' Linear4bit runs its matmul as an opaque operator whose Python wrapper
dequantizes the weight (three kernel launches with double quant) and calls the GEMM; inside
a compiled decoder layer that leaves a Python call per linear layer, per forward, recompute and
backward, and on small models the GPU waits on Python. Here the NF4 double-quant dequantization
is plain tensor code (a 16-entry table lookup times a per-block scale, itself an 8-bit code
times a per-256-block scale plus an offset), so Inductor turns it into one generated kernel
launched from compiled code, next to the GEMM, or one Triton kernel (nf4_triton.py) where it
can run.

NF4Linear's backward dequantizes the weight again instead of keeping the bf16 copy from the
forward: activations only (x is not needed: dx = g W). PEFT's adapter (x A^T B^T s) and its sum
with the base output stay PEFT's own code; compiled, the sum joins the next elementwise kernel
(RoPE, the residual add) and is rounded once with it, from fp32, which is what keeps the
adapters' small first updates (a bf16 sum on its own rounds them away: train.precision: bf16's
early lag). Only worth it compiled (eager, the lookups are separate kernels).
NF4LoRALinear puts adapters in their GEMM: [x | x A^T] [W | s B]^T, the Triton kernel writing
B's columns next to W's: no second pass over the adapter outputs, but each sum rounded to bf16
(train.adapters_in_gemm). NF4LoRASwiGLU adds a SiLU MLP's gate and up adapters inside the SwiGLU
kernel (swiglu_lora.py): exact sums, and no adapter output as wide as the MLP.

Every function takes the fast path's choices as arguments (`meta`: shape, blocksize, dtype,
whether the Triton dequantization runs, K's padding); tasks/fast/patch.py installs these on a
model from the Plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.fast.ops import nf4_triton, swiglu_lora


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    code: Tensor,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
    extra: Tensor | None = None,
    triton: bool = False,
) -> Tensor:
    """bitsandbytes' dequantize_4bit in tensor operations, the same arithmetic in fp32:
    w = code[q] * scale[block], scale = nested_code[absmax] * nested_absmax[block // 256] + offset
    (double quant), and two 4-bit codes a byte, the first in the high half. offset: one value,
    or one per 256 blocks (weights laid end to end: laid_end_to_end). extra: columns to put
    after the weight's, [W | extra] (NF4LoRALinear's adapters). triton: nf4_triton's kernel where
    usable (the caller has registered it: nf4_triton.available(), outside compiled code)."""
    if triton and nf4_triton.usable(packed, nested_absmax, shape, blocksize):
        return nf4_triton.dequantize(
            packed, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, dtype, extra
        )
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // 256
        shift = offset.view(-1)[blocks] if offset.numel() > 1 else offset
        absmax = nested_code[absmax.int()] * nested_absmax[blocks] + shift
    q = packed.view(-1)
    q = torch.stack((q >> 4, q & 15), dim=-1).view(-1, blocksize)
    w = code[q.int()] * absmax.view(-1, 1).float()
    w = w.view(shape).to(dtype)
    return w if extra is None else torch.cat((w, extra.to(dtype)), dim=1)


TENSOR_KEYS = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code")


def meta(t: dict, triton: bool, pad_k: int) -> tuple:
    """What the autograd functions below take besides the tensors (t[k] for k in TENSOR_KEYS):
    (shape, blocksize, dtype, triton, pad_k), constants to the compiler. triton: the
    dequantization by nf4_triton.py where usable; pad_k: adapters in a GEMM pad its K (inputs +
    ranks) with zero columns to a multiple of this."""
    return (tuple(t["shape"]), t["blocksize"], t["dtype"], triton, pad_k)


def _weight(tensors, meta: tuple, extra: Tensor | None = None) -> Tensor:
    shape, blocksize, dtype, triton, _ = meta
    return dequantize_nf4(*tensors, list(shape), blocksize, dtype, extra, triton)


class NF4Linear(torch.autograd.Function):
    """y = x W^T for a 4-bit W; backward dequantizes again rather than saving the bf16 weight:
    dx = g W. meta: see meta(); tensors: packed, absmax, nested_absmax, nested_code, offset,
    code."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.meta = meta
        return F.linear(x.to(meta[2]), _weight(tensors, meta))

    @staticmethod
    def backward(ctx, grad):
        return (grad.to(ctx.meta[2]) @ _weight(ctx.saved_tensors, ctx.meta), None) + (None,) * 6


def _pad(k: int, r: int, pad_k: int) -> int:
    """Zero columns after [W | B] (k inputs, r ranks): a K of whole GEMM tiles."""
    return -(k + r) % pad_k


def _input_and_rank_grads(grad: Tensor, b: Tensor, meta: tuple, tensors) -> tuple[Tensor, Tensor]:
    """[dx | dm] = g [W | B]: the gradients of the input and of the adapters' rank inputs m in
    one GEMM over the weight dequantized again with B (N x R) in its last columns."""
    k, r = meta[0][1], b.shape[1]
    dxm = grad @ _weight(tensors, meta, F.pad(b, (0, _pad(k, r, meta[4]))))
    return dxm[..., :k], dxm[..., k : k + r]


class NF4LoRALinear(torch.autograd.Function):
    """y = x W^T + m B^T = [x | m] [W | B]^T: a 4-bit layer and its adapter in one GEMM, where
    m = x A^T is the adapters' rank-r input (all the group's A's side by side) and B the
    block-diagonal of their B_i s_i (N x R). The adapter is added to the base in the GEMM's fp32
    accumulator and the sum rounded once: no adapter output of N columns is written and read
    again, and no separate GEMM over the output gradient gives dm. Backward dequantizes again:
    [dx | dm] = g [W | B] (one GEMM), dB = g^T m. K is padded with zero columns to a multiple
    of meta's pad_k. meta, tensors: as NF4Linear's."""

    @staticmethod
    def forward(ctx, x, m, b, meta, *tensors):
        shape, dtype = meta[0], meta[2]
        b_dtype = b.dtype
        m, b = m.to(dtype), b.to(dtype)
        ctx.save_for_backward(m, b, *tensors)
        ctx.meta, ctx.b_dtype = meta, b_dtype
        pad = _pad(shape[1], m.shape[-1], meta[4])
        return F.linear(
            torch.cat((x.to(dtype), F.pad(m, (0, pad))), dim=-1), _weight(tensors, meta, F.pad(b, (0, pad)))
        )

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
    inside the SwiGLU kernel (swiglu_lora.py): the adapter's part is never rounded on
    its own (more exact than PEFT under autocast, which rounds B's output to bf16) and no
    adapter output as wide as the MLP is written. Backward: the kernel's
    derivative gives [dg | du] laid like the GEMM's output; [dx | dm] = [dg | du] [W | B] is one
    GEMM over the weight dequantized again with B = blockdiag(B_g, B_u) in its last columns, as
    in NF4LoRALinear; dB_g = dg^T m_g, dB_u = du^T m_u. Keeps the base output (bf16) for backward.
    b_gate, b_up: the B's times their scaling. kernel: swiglu_lora's Triton kernels where they
    run (registered by the caller: swiglu_lora.available()). meta, tensors: as NF4Linear's."""

    @staticmethod
    def forward(ctx, x, m, b_gate, b_up, kernel, meta, *tensors):
        dtype = meta[2]
        ctx.b_dtypes = (b_gate.dtype, b_up.dtype)
        m, b_gate, b_up = m.to(dtype).contiguous(), b_gate.to(dtype), b_up.to(dtype)
        y = F.linear(x.to(dtype), _weight(tensors, meta))
        ctx.save_for_backward(y, m, b_gate, b_up, *tensors)
        ctx.meta, ctx.kernel = meta, kernel
        return swiglu_lora.forward(y, m, b_gate, b_up, kernel)

    @staticmethod
    def backward(ctx, grad):
        y, m, b_gate, b_up, *tensors = ctx.saved_tensors
        dy = swiglu_lora.backward(y, m, b_gate, b_up, grad.to(ctx.meta[2]), ctx.kernel)
        dx, dm = _input_and_rank_grads(dy, torch.block_diag(b_gate, b_up), ctx.meta, tensors)
        n, r_gate = b_gate.shape
        flat_dy, flat_m = dy.reshape(-1, 2 * n), m.reshape(-1, m.shape[-1])
        d_gate = flat_dy[:, :n].t() @ flat_m[:, :r_gate]
        d_up = flat_dy[:, n:].t() @ flat_m[:, r_gate:]
        return (dx, dm, d_gate.to(ctx.b_dtypes[0]), d_up.to(ctx.b_dtypes[1]), None, None) + (None,) * 6


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
    return {
        "packed": weight.data,
        "absmax": state.absmax,
        "nested_absmax": state.state2.absmax if nested else None,
        "nested_code": state.state2.code if nested else None,
        "offset": state.offset if nested else None,
        "code": state.code.float(),
        "shape": [int(n) for n in state.shape],
        "blocksize": int(state.blocksize),
        "dtype": getattr(layer, "compute_dtype", None) or torch.bfloat16,
    }


def laid_end_to_end(nf4: list[dict]) -> dict | None:
    """4-bit weights of the same input width as ONE NF4 weight of shape (sum of outputs,
    inputs), so that one dequantization (one kernel) writes them side by side: packed codes,
    block scales and nested scales concatenated, the offset one value per 256 blocks. None
    where that cannot be (other dtypes or tables, a weight whose blocks do not fill whole
    256-block groups of nested scales)."""
    first = nf4[0]
    if len(nf4) == 1:
        return first
    if len({(t["dtype"], t["shape"][1], t["blocksize"]) for t in nf4}) != 1 or any(
        not torch.equal(t["code"], first["code"]) for t in nf4
    ):
        return None
    nested = first["nested_absmax"] is not None
    if nested and any(
        t["nested_absmax"] is None
        or t["absmax"].numel() % 256
        or not torch.equal(t["nested_code"], first["nested_code"])
        for t in nf4
    ):
        return None
    if not nested and any(t["nested_absmax"] is not None for t in nf4):
        return None
    return {
        "packed": torch.cat([t["packed"].view(-1) for t in nf4]),
        "absmax": torch.cat([t["absmax"].view(-1) for t in nf4]),
        "code": first["code"],
        "nested_code": first["nested_code"],
        "nested_absmax": torch.cat([t["nested_absmax"] for t in nf4]) if nested else None,
        "offset": torch.cat([t["offset"].reshape(1).expand(t["nested_absmax"].numel()) for t in nf4])
        if nested
        else None,
        "shape": [sum(t["shape"][0] for t in nf4), first["shape"][1]],
        "blocksize": first["blocksize"],
        "dtype": first["dtype"],
    }
