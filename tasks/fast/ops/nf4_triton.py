"""NF4 double-quant dequantization as one Triton kernel, registered as a torch op that
torch.compile calls from its generated code (torch.library.triton_op: no Python per call).

Why: the same arithmetic written as tensor code (nf4_lora.dequantize_nf4) becomes one
Inductor kernel over the output elements that, for every element, loads its block's 8-bit
scale code, looks up two tables and the per-256-block scale; a step dequantizes every weight
three times (forward, recompute, backward), so that per-element work shows. Here a program
takes a tile of whole 4-bit blocks: the block scales are computed once per block (a vector),
each byte is loaded once and gives two outputs (table lookups of its two halves times the
block's scale), stored interleaved, 16-byte stores of bf16.

Same formula as bitsandbytes (w = code[q] * (nested_code[absmax] * nested_absmax[block // 256]
+ offset)); the compiler may contract the scale's multiply-add into one fused multiply-add, so
a scale can differ from bitsandbytes' in its last fp32 bit (tests/test_gpu.py bounds it).
`extra` columns (the LoRA adapters' B matrices, nf4_lora.NF4LoRALinear) are written next
to the weight's: the kernel stores each row of W with a row stride of cols + extra columns, so
[W | B] costs no second pass over the bf16 weight.
CUDA only; `available()` says whether it can run here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tasks.fast.ops import triton_ops_can_run

ROWS = 64  # 4-bit blocks per program (64 x 64 weights for blocksize 64)


@functools.cache
def available() -> bool:
    return triton_ops_can_run() and _op() is not None


@functools.cache
def _op():
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def dequantize_kernel(
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        code,
        out,
        n_blocks,
        cols,
        stride,
        ROWS: tl.constexpr,
        HALF: tl.constexpr,
        OFFSET_PER_BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # 4-bit blocks of this program
        valid = rows < n_blocks
        nested = rows // 256
        if OFFSET_PER_BLOCK:
            shift = tl.load(offset + nested, mask=valid, other=0.0)
        else:
            shift = tl.load(offset)
        scale = (
            tl.load(nested_code + tl.load(absmax + rows, mask=valid, other=0).to(tl.int32), mask=valid, other=0.0)
            * tl.load(nested_absmax + nested, mask=valid, other=0.0)
            + shift
        )
        byte = tl.load(packed + rows[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=valid[:, None], other=0).to(
            tl.int32
        )
        high = tl.load(code + (byte >> 4)) * scale[:, None]  # the first weight of a byte is its high half
        low = tl.load(code + (byte & 15)) * scale[:, None]
        w = tl.interleave(high, low)
        first = rows * (2 * HALF)  # a block's first weight; blocks never straddle rows (cols % blocksize == 0)
        at = (first // cols * stride + first % cols)[:, None] + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out + at, w.to(out.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def columns_kernel(extra, out, rows, r, extra_stride, start, stride, ROWS: tl.constexpr, R: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, R)
        valid = (row < rows)[:, None] & (col < r)[None, :]
        value = tl.load(extra + row[:, None] * extra_stride + col[None, :], mask=valid)
        tl.store(out + row[:, None] * stride + start + col[None, :], value, mask=valid)

    @triton_op("qlora_flow::dequantize_nf4", mutates_args=())
    def dequantize_nf4(
        packed: Tensor,
        absmax: Tensor,
        nested_absmax: Tensor,
        nested_code: Tensor,
        offset: Tensor,
        code: Tensor,
        extra: Tensor,
        rows: int,
        cols: int,
        blocksize: int,
        dtype: torch.dtype,
    ) -> Tensor:
        stride = cols + extra.shape[1]
        out = torch.empty(rows, stride, dtype=dtype, device=packed.device)
        n_blocks = rows * cols // blocksize
        wrap_triton(dequantize_kernel)[(triton.cdiv(n_blocks, ROWS),)](
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            code,
            out,
            n_blocks,
            cols,
            stride,
            ROWS=ROWS,
            HALF=blocksize // 2,
            OFFSET_PER_BLOCK=offset.numel() > 1,
        )
        if extra.shape[1]:  # a kernel, not out[:, cols:] = extra (compiled, that copies all of out once more)
            wrap_triton(columns_kernel)[(triton.cdiv(rows, ROWS),)](
                extra,
                out,
                rows,
                extra.shape[1],
                extra.stride(0),
                cols,
                stride,
                ROWS=ROWS,
                R=triton.next_power_of_2(extra.shape[1]),
            )
        return out

    return dequantize_nf4


def usable(packed: Tensor, nested_absmax, shape: list[int], blocksize: int) -> bool:
    """The kernel's case: CUDA tensors, double quant, a power-of-two block of at least 32 that
    divides a row. Call available() once first, outside compiled code (it registers the op)."""
    return (
        packed.is_cuda
        and nested_absmax is not None
        and blocksize >= 32
        and blocksize & (blocksize - 1) == 0
        and shape[1] % blocksize == 0
    )


def dequantize(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor,
    nested_code: Tensor,
    offset: Tensor,
    code: Tensor,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
    extra: Tensor | None = None,
) -> Tensor:
    """The weight (shape), or [W | extra] with `extra` (shape[0] rows) in the last columns. The
    op by its registered name: compiled code traces it as one operator (a call of the cached
    _op() would break the graph)."""
    if shape[1] % blocksize:  # the kernel lays whole blocks in rows (usable() checks this first)
        raise ValueError(f"nf4_triton: a row of {shape[1]} weights is not whole blocks of {blocksize}")
    if extra is None:
        extra = packed.new_empty(shape[0], 0, dtype=dtype)
    return torch.ops.qlora_flow.dequantize_nf4(
        packed.view(-1),
        absmax,
        nested_absmax,
        nested_code,
        offset.reshape(-1),
        code,
        extra.to(dtype).contiguous(),
        shape[0],
        shape[1],
        blocksize,
        dtype,
    )
