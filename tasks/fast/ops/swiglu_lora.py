"""SwiGLU over gate and up whose LoRA adapters are added inside the SwiGLU kernel itself:

    h = silu(y_g + m_g B_g^T) * (y_u + m_u B_u^T)

y = [y_g | y_u] is the 4-bit base GEMM's bf16 output for gate and up laid end to end, m = [m_g |
m_u] the adapters' rank-r inputs (x A^T), B_g and B_u their B's times the scaling. Each program
multiplies its tile of m by its columns of B (a K = r dot on the tensor cores, fp32 accumulator)
and adds that to the base output in fp32: the adapter's part is never rounded on its own, and
no adapter output as wide as the MLP is written by a GEMM and read back. Why: on the fast path
the two adapter outputs of gate and up are the largest tensors the SwiGLU kernels would read.
Backward recomputes the sums the same way and gives [dg | du] laid like y, so that one GEMM over
[W | blockdiag(B_g, B_u)] gives dx and dm (nf4_lora.NF4LoRASwiGLU).

`forward` / `backward` take the Triton kernels (kernel=True) on CUDA once `available()` has
registered them (as torch ops, so compiled code calls them with no Python in between; call it
outside compiled code, as tasks/fast/patch.py does), and the same arithmetic as tensor code
elsewhere (what the CPU tests check the kernels against).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.fast.ops import triton_ops_can_run

# A program's tile (tokens x output columns) and its warps: the fastest setting of the tile
# sweep at the 8B MLP shape (bench/swiglu_tiles.py; docs/gpu.md)
TILES = (32, 128, 4)


@functools.cache
def available() -> bool:
    """Whether the Triton kernels run here; registers their ops (call outside compiled code)."""
    return triton_ops_can_run() and _ops() is not None


def _ranks(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, dh: Tensor | None = None) -> tuple[int, int, int]:
    n, r_gate, r_up = b_gate.shape[0], b_gate.shape[1], b_up.shape[1]
    if (
        b_up.shape[0] != n
        or y.shape[-1] != 2 * n
        or m.shape[-1] != r_gate + r_up
        or m.shape[:-1] != y.shape[:-1]
        or (dh is not None and dh.shape != (*y.shape[:-1], n))
    ):
        grad = f", dh {tuple(dh.shape)}" if dh is not None else ""
        raise ValueError(
            f"swiglu_lora: shapes do not match: y {tuple(y.shape)}, m {tuple(m.shape)}, B's "
            f"{tuple(b_gate.shape)} and {tuple(b_up.shape)}{grad}"
        )
    return n, r_gate, r_up


@functools.cache
def _ops():
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def swiglu_kernel(
        y,
        m,
        b_gate,
        b_up,
        dh,
        out,
        rows,
        n,
        r_gate,
        r_up,
        BT: tl.constexpr,
        BN: tl.constexpr,
        KC: tl.constexpr,
        R_MAX: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        """Forward: out = h. Backward: out = [dg | du] laid like y, from dh."""
        t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = (t < rows)[:, None], (c < n)[None, :]
        ok = row_ok & col_ok
        # the adapters' parts m B^T in fp32: dots over the ranks in chunks of KC (tensor cores)
        r = r_gate + r_up
        adapter_gate = tl.zeros((BT, BN), dtype=tl.float32)
        adapter_up = tl.zeros((BT, BN), dtype=tl.float32)
        for k in tl.static_range(0, R_MAX, KC):  # unrolled: R_MAX / KC dots (one for r <= 64)
            j = k + tl.arange(0, KC)
            m_gate = tl.load(m + t[:, None] * r + j[None, :], mask=row_ok & (j < r_gate)[None, :], other=0.0)
            m_up = tl.load(m + t[:, None] * r + r_gate + j[None, :], mask=row_ok & (j < r_up)[None, :], other=0.0)
            bt_gate = tl.load(b_gate + c[None, :] * r_gate + j[:, None], mask=(j < r_gate)[:, None] & col_ok, other=0.0)
            bt_up = tl.load(b_up + c[None, :] * r_up + j[:, None], mask=(j < r_up)[:, None] & col_ok, other=0.0)
            adapter_gate += tl.dot(m_gate, bt_gate)
            adapter_up += tl.dot(m_up, bt_up)
        at = t[:, None] * (2 * n) + c[None, :]
        gate = tl.load(y + at, mask=ok, other=0.0).to(tl.float32) + adapter_gate
        up = tl.load(y + at + n, mask=ok, other=0.0).to(tl.float32) + adapter_up
        sig = tl.sigmoid(gate)
        if BACKWARD:
            g = tl.load(dh + t[:, None] * n + c[None, :], mask=ok, other=0.0).to(tl.float32)
            d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(x) = s(x) (1 + x (1 - s(x)))
            tl.store(out + at, d_gate.to(out.dtype.element_ty), mask=ok)
            tl.store(out + at + n, (g * gate * sig).to(out.dtype.element_ty), mask=ok)
        else:
            tl.store(out + t[:, None] * n + c[None, :], (gate * sig * up).to(out.dtype.element_ty), mask=ok)

    def launch(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, dh: Tensor | None, tiles: tuple) -> Tensor:
        """Forward (dh None): h; backward: [dg | du] laid like y. tiles: (tokens, columns, warps)."""
        n, r_gate, r_up = _ranks(y, m, b_gate, b_up, dh)
        rows = y.numel() // (2 * n)
        if dh is None:
            out = y.new_empty(*y.shape[:-1], n)
        else:
            out = torch.empty(y.shape, dtype=y.dtype, device=y.device)  # contiguous, as the kernel writes it
        block_t, block_n, warps = tiles
        r_max = max(r_gate, r_up)  # KC, a chunk of the ranks: tl.dot needs K >= 16; 64 bounds the tiles' shared memory
        wrap_triton(swiglu_kernel)[(triton.cdiv(rows, block_t), triton.cdiv(n, block_n))](
            y,
            m,
            b_gate,
            b_up,
            y if dh is None else dh,
            out,
            rows,
            n,
            r_gate,
            r_up,
            BT=block_t,
            BN=block_n,
            KC=min(64, max(16, triton.next_power_of_2(r_max))),
            R_MAX=r_max,
            num_warps=warps,
            BACKWARD=dh is not None,
        )
        return out

    @triton_op("qlora_flow::swiglu_lora", mutates_args=())
    def swiglu_lora(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor) -> Tensor:
        return launch(y, m, b_gate, b_up, None, TILES)

    @triton_op("qlora_flow::swiglu_lora_backward", mutates_args=())
    def swiglu_lora_backward(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, dh: Tensor) -> Tensor:
        return launch(y, m, b_gate, b_up, dh, TILES)

    return swiglu_lora, swiglu_lora_backward, launch


def with_tiles(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, dh: Tensor | None, tiles: tuple) -> Tensor:
    """The kernel with other tiles than TILES, eager (bench/swiglu_tiles.py times them): forward
    (dh None) or backward, on contiguous CUDA tensors. Call available() first."""
    return _ops()[2](
        y.contiguous(),
        m.contiguous(),
        b_gate.contiguous(),
        b_up.contiguous(),
        None if dh is None else dh.contiguous(),
        tiles,
    )


def _sums(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor) -> tuple[Tensor, Tensor]:
    n, r_gate, _ = _ranks(y, m, b_gate, b_up)
    m = m.float()
    gate = y[..., :n].float() + F.linear(m[..., :r_gate], b_gate.float())
    up = y[..., n:].float() + F.linear(m[..., r_gate:], b_up.float())
    return gate, up


def _use_kernel(y: Tensor, kernel: bool) -> bool:
    """The Triton kernels for bf16/fp16 CUDA tensors when chosen and registered (kernel: the
    caller's available(), read outside compiled code); fp32 takes the tensor code, where the
    dots are not TF32."""
    return kernel and y.is_cuda and y.dtype in (torch.bfloat16, torch.float16)


def forward(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, kernel: bool) -> Tensor:
    """h = silu(y_g + m_g B_g^T) * (y_u + m_u B_u^T) in fp32, rounded once to y's dtype. y: (..., 2N);
    m: (..., r_g + r_u); b_gate: (N, r_g); b_up: (N, r_u); any ranks (the kernel takes them in
    chunks of at most 64). kernel: the Triton kernel where _use_kernel says so."""
    if _use_kernel(y, kernel):
        return torch.ops.qlora_flow.swiglu_lora(y.contiguous(), m.contiguous(), b_gate.contiguous(), b_up.contiguous())
    gate, up = _sums(y, m, b_gate, b_up)
    return (F.silu(gate) * up).to(y.dtype)


def backward(y: Tensor, m: Tensor, b_gate: Tensor, b_up: Tensor, dh: Tensor, kernel: bool) -> Tensor:
    """[dL/d(gate sum) | dL/d(up sum)] laid like y, in y's dtype, from dh = dL/dh."""
    if _use_kernel(y, kernel):
        return torch.ops.qlora_flow.swiglu_lora_backward(
            y.contiguous(), m.contiguous(), b_gate.contiguous(), b_up.contiguous(), dh.contiguous()
        )
    gate, up = _sums(y, m, b_gate, b_up)
    g, sig = dh.float(), torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    d_up = g * gate * sig
    return torch.cat((d_gate, d_up), dim=-1).to(y.dtype)
