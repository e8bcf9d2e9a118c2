"""Activation checkpointing of a decoder layer, whole or in two compiled halves (the MLP's
backward then in token chunks), with the saved layer input optionally in pinned host memory
and optionally kept in bf16 where the residual stream between layers is fp32.

A Llama-layout decoder layer is `h = x + attn(norm1(x))`, `out = h + mlp(norm2(h))` (Gemma's
norms each branch's output too, Phi-3 drops out each branch: their halves are below). Checkpointed
as one compiled graph, its backward holds the MLP's whole working set at once: the recomputed
gate and up projections, their gradients, the SwiGLU product and the gradient of the down
projection's input, each tokens x intermediate (224 MiB in bf16 at the 8B shape with 4 x 2048
tokens), several of them at once (docs/gpu.md has the memory trace). That is where the step's
memory peaks.

Here the layer runs as one autograd function:
  - forward: both halves without a graph (nothing is saved but the layer input), the MLP in
    the same token chunks as in backward;
  - backward: the attention half is recomputed with autograd; then the MLP half is recomputed
    and backpropagated in `chunks` slices of the tokens (it is per-token: norm, projections,
    SwiGLU, residual), so its working set is 1/chunks of a whole one; then the attention half
    is backpropagated with the gradient gathered from the chunks. Every matmul runs as many
    times as under plain checkpointing (forward, recompute, backward); only the MLP's are split.
The recompute runs under the forward's autocast state and, for layers that draw random numbers
(LoRA dropout), its RNG state; with random layers the MLP runs in one chunk, so the recompute
draws what the forward drew.

Whole (no second half): the layer is one function, run without autograd in forward and
recomputed with it in backward. Unlike torch's checkpoint, which runs the training graph in
forward and again in the recompute, the forward is a compiled graph of its own (nothing saved
for backward; other fusions, so other bf16 roundings: docs/gpu.md gives the measured loss),
and it takes the two options below, which torch's checkpoint has no place for. Like any
reentrant checkpoint: one backward per forward (no retain_graph), gradients land in .grad
(torch.autograd.grad does not see them), and under DDP find_unused_parameters must stay off
(the forward shows DDP no parameter).

offload: the layer input (tokens x hidden, 64 MiB a layer at the 8B shape) is copied to pinned
host memory on a side stream as soon as the layer's forward is issued, and freed on the GPU;
in backward each layer first asks for the input of the layer before it (the next to run), so
the copy back overlaps its own recompute and backward. The GPU then holds at most two layer
inputs instead of one a layer. Offloading is CUDA only; the rest runs anywhere.

keep: the dtype the layer input is saved in (None: its own). With an fp32 residual stream
(train.fp32_residual) the input is saved in the compute dtype (bf16), half the bytes, and the
backward recomputes the layer from that copy: the forward, and so the loss, carry the fp32
stream; the gradients are the layer's linearised at its input rounded to bf16 (a bf16 stream
computes both forward and gradients there).
"""

from __future__ import annotations

import weakref

import torch

_STREAMS: dict = {}


def _side(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Saved:
    """A layer's input until its backward: the tensor itself, or a host copy and its way back."""

    last: weakref.ref[_Saved] | None = None  # the most recent offloaded input whose backward has not run

    def __init__(self, x: torch.Tensor, offload: bool):
        self.gpu, self.host, self.ready, self.prev = None, None, None, None
        if not offload:
            self.gpu = x
            return
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        current, side = torch.cuda.current_stream(x.device), _side(x.device)
        side.wait_stream(current)  # x is written
        with torch.cuda.stream(side):
            self.host.copy_(x, non_blocking=True)
        x.record_stream(side)  # x's memory is not reused before the copy is done
        self.prev = _Saved.last  # the layer before this one in the same forward, if any
        _Saved.last = weakref.ref(self)

    def fetch(self) -> None:
        """Start the copy back to the GPU (on the side stream); idempotent."""
        if self.gpu is not None or self.host is None:
            return
        current, side = torch.cuda.current_stream(self.device), _side(self.device)
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        self.gpu.record_stream(side)

    def take(self) -> torch.Tensor:
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.gpu, self.host = self.gpu, None, None
        prev = self.prev() if self.prev is not None else None
        if prev is not None:
            prev.fetch()  # the next layer's input comes back while this one recomputes
        return x


class LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, attn, mlp, chunks, offload, random, keep):
        ctx.attn, ctx.mlp, ctx.chunks, ctx.random = attn, mlp, (1 if random else chunks), random
        kind = x.device.type
        ctx.autocast = (
            kind,
            torch.is_autocast_enabled(kind),
            torch.get_autocast_dtype(kind),
            torch.is_autocast_cache_enabled(),
        )
        ctx.rng = (
            (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if kind == "cuda" else None) if random else None
        )
        ctx.dtype = x.dtype
        ctx.saved = _Saved(x.detach().to(keep or x.dtype), offload)
        with torch.no_grad():
            h = attn(x)
            if mlp is None:
                return h
            if ctx.chunks == 1:
                return mlp(h)
            out = torch.empty_like(h)  # the MLP in token chunks here too: its forward's working set shrinks alike
            flat, out_flat = h.reshape(1, -1, h.shape[-1]), out.view(1, -1, h.shape[-1])
            for lo, hi in _bounds(flat.shape[1], ctx.chunks):
                out_flat[:, lo:hi] = mlp(flat[:, lo:hi])
            return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.saved is None:
            raise RuntimeError(
                "a checkpointed decoder layer (tasks/fast/ops/layer_checkpoint.py) was backpropagated "
                "twice: its saved input is used up by the first backward (retain_graph is not "
                "supported)"
            )
        x = ctx.saved.take().to(ctx.dtype).detach().requires_grad_(True)
        kind, enabled, dtype, cache = ctx.autocast

        def recompute():  # the forward's numerics, with autograd (backward calls stay outside)
            return torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache)

        on_cuda = ctx.random and kind == "cuda"
        with torch.random.fork_rng(devices=[x.device] if on_cuda else [], enabled=ctx.random):
            if ctx.random:
                torch.set_rng_state(ctx.rng[0])
                if on_cuda:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            with torch.enable_grad(), recompute():
                h = ctx.attn(x)
            if ctx.mlp is not None:  # two halves: the gradient reaching the attention half's output
                grad = _mlp_backward_in_chunks(ctx.mlp, h, grad, ctx.chunks, recompute)
        torch.autograd.backward(h, grad)
        ctx.saved = ctx.attn = ctx.mlp = None
        return x.grad, None, None, None, None, None, None


def _mlp_backward_in_chunks(mlp, h: torch.Tensor, grad: torch.Tensor, chunks: int, recompute) -> torch.Tensor:
    """The MLP half recomputed and backpropagated `chunks` token slices at a time (it is per
    token); returns the gradient of its input h, gathered from the slices."""
    shape = h.shape
    flat, grad = h.detach().reshape(1, -1, shape[-1]), grad.reshape(1, -1, shape[-1])
    grad_h = torch.empty_like(flat)
    for lo, hi in _bounds(flat.shape[1], chunks):
        part = flat[:, lo:hi].detach().requires_grad_(True)
        with torch.enable_grad(), recompute():
            out = mlp(part)
        torch.autograd.backward(out, grad[:, lo:hi])
        grad_h[:, lo:hi] = part.grad
        del out, part
    return grad_h.view(shape)


def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    cuts = [round(i * n / chunks) for i in range(chunks + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def checkpoint(
    attn,
    mlp,
    x: torch.Tensor,
    chunks: int = 1,
    offload: bool = False,
    random: bool = False,
    keep: torch.dtype | None = None,
) -> torch.Tensor:
    """mlp(attn(x)) for a decoder layer's two halves, or attn(x) for a whole layer (mlp None),
    checkpointed as above."""
    if not x.requires_grad:  # the adapters inside still need the backward to run
        x = x.detach().requires_grad_(True)
    return LayerCheckpoint.apply(x, attn, mlp, chunks, offload, random, keep)


def attention_half(layer, x, **kwargs):
    """x + attn(norm1(x)): the first half of a Llama-layout decoder layer (its forward's code)."""
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return x + h


def mlp_half(layer, h):
    """h + mlp(norm2(h)): the second half, per token."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


def sandwich_attention_half(layer, x, **kwargs):
    """x + norm(attn(norm(x))): the first half of a Gemma 2 / Gemma 3 decoder layer, whose
    attention output is normed again before the residual add (its forward's code)."""
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return x + layer.post_attention_layernorm(h)


def sandwich_mlp_half(layer, h):
    """h + norm(mlp(norm(h))): the second half of a Gemma layer, per token."""
    return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def dropout_attention_half(layer, x, **kwargs):
    """x + dropout(attn(norm1(x))): the first half of a Phi-3 decoder layer (a dropout on each
    residual branch; the identity at resid_pdrop 0)."""
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return x + layer.resid_attn_dropout(h)


def dropout_mlp_half(layer, h):
    """h + dropout(mlp(norm2(h))): the second half of a Phi-3 layer, per token."""
    return h + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(h)))
