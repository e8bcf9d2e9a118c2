"""Paged AdamW 32-bit over one flat buffer: the same update as bitsandbytes' PagedAdamW32bit,
in one kernel launch per step instead of one per adapter tensor.

bitsandbytes' optimizers loop over the parameters in Python: per tensor a prefetch, a
kernel launch and bookkeeping, then a synchronize. With LoRA on every linear layer of a large
model that is hundreds of tensors, and the GPU waits for the host (docs/gpu.md gives the
figures). Its 32-bit Adam update is elementwise (no
per-tensor norm unless max_unorm is set, which it is not here), so running it once over all
adapter weights laid end to end gives the same numbers.

`flatten` moves the trainable tensors into one fp32 buffer (each parameter's .data becomes a
view of it) and gives each a .grad that is a view of one flat gradient buffer; backward then
accumulates into those views in place. The optimizer sees a single parameter. zero_grad zeroes
the flat gradient (one kernel) and never drops the views. The state (two fp32 values per
weight) is paged memory, as with PagedAdamW32bit. One process only: under DDP the
per-tensor optimizer is used (DDP's gradient buckets manage .grad themselves).
"""

from __future__ import annotations

import torch


def flatten(params: list[torch.Tensor]) -> tuple[torch.nn.Parameter, torch.Tensor] | None:
    """Lay the parameters end to end in one buffer; None where they differ in dtype/device."""
    if not params or len({(p.dtype, p.device) for p in params}) != 1 or any(p.is_sparse for p in params):
        return None
    total = sum(p.numel() for p in params)
    flat = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    grad = torch.zeros_like(flat)
    at = 0
    for p in params:
        n = p.numel()
        flat[at : at + n].copy_(p.detach().reshape(-1))
        p.data = flat[at : at + n].view_as(p)
        p.grad = grad[at : at + n].view_as(p)
        at += n
    owner = torch.nn.Parameter(flat)  # the optimizer's one tensor; the model keeps views
    owner.grad = grad
    return owner, grad


def make(params: list[torch.Tensor], lr: float, weight_decay: float):
    """A paged AdamW 32-bit over the flat buffer; the per-tensor one where that cannot be."""
    import bitsandbytes as bnb

    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay)
    flat = flatten(list(params))
    if flat is None:
        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay)
    owner, grad = flat

    class FlatPagedAdamW32bit(bnb.optim.PagedAdamW32bit):
        def zero_grad(self, set_to_none: bool = True) -> None:  # the model's .grad views stay
            grad.zero_()

    opt = FlatPagedAdamW32bit([owner], lr=lr, weight_decay=weight_decay)
    opt.flat_views = list(params)  # the model's parameters, views of the flat buffer
    return opt
