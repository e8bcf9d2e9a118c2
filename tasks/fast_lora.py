"""One autograd function for a LoRA adapter on a 4-bit (NF4, bitsandbytes) linear layer:

    y = x W^T + s (x A^T) B^T          W: frozen, 4-bit;  A (r x in), B (out x r): trained, fp32

PEFT computes this as two modules (bitsandbytes' 4-bit matmul, then the adapter), clones the
base output, scales the adapter output and adds: about six passes over a (tokens x out)
tensor, and the sum of a bf16-rounded base output and a small adapter output. Here:

- The adapter output is written once, and the base GEMM adds it in its epilogue
  (`out.addmm_(x, W^T)`: cuBLAS forms x W^T + out in its fp32 accumulator and rounds once).
  Rounding once is what keeps the adapter's first updates: they are ~1e-3 of the layer's
  output, below half a bf16 step. Rounding the base output first puts it on the bf16 grid,
  and `base + delta` then rounds back to `base` every time (why train.precision: bf16, and
  Unsloth, lag the fp32 loss early). Added to the unrounded accumulator, the delta moves the
  rounded result by its own size in expectation.
- Backward saves x and the (tokens x r) x A^T, not the weight: W is dequantized again.
- Dropout on the adapter's input keeps a 1-byte mask instead of the dropped input.

The forward and backward are torch.library custom ops, so a compiled decoder layer
(tasks/speed.py) keeps them whole and fuses the elementwise work around them.
`install(model)` routes every eligible LoRA layer of a PEFT model through them; anything
else (merged or disabled adapters, several active adapters, DoRA, non-4-bit bases) keeps
PEFT's forward. Nothing here is needed on CPU, but it runs there (tests check it against PEFT).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor

_NF4 = "_qlora_flow_nf4"  # module attribute: the 4-bit weight's tensors and constants


def dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
               offset: Optional[Tensor], shape: list[int], blocksize: int, quant_type: str, dtype: torch.dtype) -> Tensor:
    """bitsandbytes' dequantize_4bit, from plain tensors (double quant: the block scales are
    themselves 8-bit, with a second level of fp32 scales every 256 blocks)."""
    if nested_absmax is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested_absmax, nested_code, 256,
                                                             torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)


@torch.library.custom_op("qlora_flow::nf4_lora", mutates_args=())
def _nf4_lora(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
              nested_code: Optional[Tensor], offset: Optional[Tensor], shape: list[int], blocksize: int,
              quant_type: str, lora_a: Tensor, lora_b: Tensor, scale: float,
              dropout: float) -> tuple[Tensor, Tensor, Tensor]:
    """x: (tokens, in) in the compute dtype. Returns (y, x A^T, dropout mask or an empty one)."""
    with torch.autocast(x.device.type, enabled=False):
        if dropout:
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - dropout)
            xd = x * mask * (1 / (1 - dropout))
        else:
            mask, xd = x.new_empty(0, dtype=torch.bool), x
        xa = xd @ lora_a.to(x.dtype).t()                     # (tokens, r)
        out = (xa * scale) @ lora_b.to(x.dtype).t()          # the adapter's output, written once
        w = dequantize(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, x.dtype)
        if x.is_cuda:
            out.addmm_(x, w.t())  # epilogue: x W^T + out in fp32, one rounding
        else:  # the same arithmetic spelled out (CPU bf16 GEMMs need not add C before rounding)
            out = torch.addmm(out.float(), x.float(), w.float().t()).to(x.dtype)
    return out, xa, mask


@_nf4_lora.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, lora_a, lora_b, scale,
      dropout):
    mask = torch.empty_like(x, dtype=torch.bool) if dropout else x.new_empty(0, dtype=torch.bool)
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_a.shape[0]), mask


@torch.library.custom_op("qlora_flow::nf4_lora_backward", mutates_args=())
def _nf4_lora_backward(grad: Tensor, x: Tensor, xa: Tensor, mask: Tensor, packed: Tensor, absmax: Tensor,
                       nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                       shape: list[int], blocksize: int, quant_type: str, lora_a: Tensor, lora_b: Tensor, scale: float,
                       dropout: float, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of y = x W^T + s (drop(x) A^T) B^T for x, A and B (dx empty if not needed)."""
    with torch.autocast(grad.device.type, enabled=False):
        grad = grad.to(x.dtype)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        gb = (grad @ b) * scale                                  # (tokens, r)
        xd = x * mask * (1 / (1 - dropout)) if dropout else x
        da = (gb.t() @ xd).to(lora_a.dtype)                      # (r, in)
        db = ((grad.t() @ xa) * scale).to(lora_b.dtype)          # (out, r)
        if not need_dx:
            return x.new_empty(0), da, db
        dx = gb @ a                                              # the adapter's part of dx, (tokens, in)
        if dropout:
            dx = dx * mask * (1 / (1 - dropout))
        w = dequantize(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, x.dtype)
        if x.is_cuda:
            dx.addmm_(grad, w)  # dequantized again rather than saved from the forward
        else:
            dx = torch.addmm(dx.float(), grad.float(), w.float()).to(x.dtype)
    return dx, da, db


@_nf4_lora_backward.register_fake
def _(grad, x, xa, mask, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, lora_a,
      lora_b, scale, dropout, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(lora_a), torch.empty_like(lora_b))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, a, b, scale, dropout = inputs
    _, xa, mask = output
    ctx.save_for_backward(x, xa, mask, packed, absmax, nested_absmax, nested_code, offset, a, b)
    ctx.constants = (shape, blocksize, quant_type, scale, dropout)


def _backward(ctx, grad, _grad_xa, _grad_mask):
    x, xa, mask, packed, absmax, nested_absmax, nested_code, offset, a, b = ctx.saved_tensors
    shape, blocksize, quant_type, scale, dropout = ctx.constants
    dx, da, db = torch.ops.qlora_flow.nf4_lora_backward(
        grad, x, xa, mask, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, a, b,
        scale, dropout, ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None, None, None, None, None, None, None, None, None,
            da, db, None, None)


_nf4_lora.register_autograd(_backward, setup_context=_setup_context)


def nf4_lora_linear(x: Tensor, nf4: dict, lora_a: Tensor, lora_b: Tensor, scale: float, dropout: float) -> Tensor:
    """y = x W^T + s (drop(x) A^T) B^T for x of any leading shape, in nf4['dtype']."""
    lead = x.shape[:-1]
    y, _, _ = torch.ops.qlora_flow.nf4_lora(
        x.reshape(-1, x.shape[-1]).to(nf4["dtype"]), nf4["packed"], nf4["absmax"], nf4["nested_absmax"],
        nf4["nested_code"], nf4["offset"], nf4["shape"], nf4["blocksize"], nf4["quant_type"], lora_a, lora_b,
        scale, dropout)
    return y.view(*lead, y.shape[-1])


def _weights(base) -> dict | None:
    """The 4-bit weight of a bitsandbytes Linear4bit as plain tensors, or None."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(base, "bias", None) is not None or len(state.shape) != 2:
        return None
    if state.nested and state.state2.blocksize != 256:
        return None
    return {"packed": weight.data, "absmax": state.absmax,
            "nested_absmax": state.state2.absmax if state.nested else None,
            "nested_code": state.state2.code if state.nested else None,
            "offset": state.offset if state.nested else None,
            "shape": [int(n) for n in state.shape], "blocksize": int(state.blocksize),
            "quant_type": state.quant_type, "dtype": getattr(base, "compute_dtype", None) or state.dtype}


def _fused_forward(self, x, *args, **kwargs):
    """Replaces PEFT's Linear4bit.forward on one module (see install)."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    if self.disable_adapters or self.merged or len(names) != 1 or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    y = nf4_lora_linear(x, getattr(self, _NF4), self.lora_A[name].weight, self.lora_B[name].weight,
                        float(self.scaling[name]), p)
    return y if y.dtype == x.dtype else y.to(x.dtype)  # PEFT returns the input's dtype too


def install(model) -> int:
    """Route each eligible LoRA layer of a PEFT model through the fused function; returns how
    many. Undo with uninstall(model) (only instance attributes are set)."""
    from peft.tuners.lora import LoraLayer
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "base_layer"):
            continue
        if any(module.use_dora.values()) or getattr(module, "lora_variant", None):
            continue
        nf4 = _weights(module.base_layer)
        if nf4 is None:
            continue
        setattr(module, _NF4, nf4)
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count


def uninstall(model) -> None:
    for module in model.modules():
        if hasattr(module, _NF4):
            delattr(module, _NF4)
            module.__dict__.pop("forward", None)
