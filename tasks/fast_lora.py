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
the sum joins the next elementwise kernel (RoPE, SwiGLU, the residual add) and is rounded
once with it, from fp32, which is what keeps the adapters' small first updates (a bf16 sum
on its own rounds them away: train.precision: bf16's early lag). `install(model)` routes the
4-bit layers of a model through it; `uninstall` undoes it. Only worth it compiled (eager, the
lookups are separate kernels): tasks/speed.py installs it with the compiled decoder layers.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor

_NF4 = "_qlora_flow_nf4"  # module attribute: the 4-bit weight as plain tensors and constants


def dequantize_nf4(packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
                   offset: Tensor | None, code: Tensor, shape: list[int], blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """bitsandbytes' dequantize_4bit in tensor operations, the same arithmetic in fp32:
    w = code[q] * scale[block], scale = nested_code[absmax] * nested_absmax[block // 256] + offset
    (double quant), and two 4-bit codes a byte, the first in the high half."""
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // 256
        absmax = nested_code[absmax.int()] * nested_absmax[blocks] + offset
    q = packed.view(-1)
    q = torch.stack((q >> 4, q & 15), dim=-1).view(-1, blocksize)
    w = code[q.int()] * absmax.view(-1, 1).float()
    return w.view(shape).to(dtype)


class NF4Linear(torch.autograd.Function):
    """y = x W^T for a 4-bit W; backward dequantizes W again rather than saving it."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, dtype):
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, code)
        ctx.meta = (shape, blocksize, dtype)
        w = dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, dtype)
        return F.linear(x.to(dtype), w)

    @staticmethod
    def backward(ctx, grad):
        shape, blocksize, dtype = ctx.meta
        w = dequantize_nf4(*ctx.saved_tensors, shape, blocksize, dtype)
        return (grad.to(dtype) @ w, None, None, None, None, None, None, None, None, None)


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


def _forward(self, x: Tensor) -> Tensor:
    t = getattr(self, _NF4)
    y = NF4Linear.apply(x, t["packed"], t["absmax"], t["nested_absmax"], t["nested_code"], t["offset"], t["code"],
                        t["shape"], t["blocksize"], t["dtype"])
    return y.to(x.dtype)  # as bitsandbytes does


def install(model) -> int:
    """Route every NF4 Linear4bit of the model through NF4Linear; returns how many."""
    import bitsandbytes as bnb
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
        if hasattr(module, _NF4):
            delattr(module, _NF4)
            module.__dict__.pop("forward", None)
