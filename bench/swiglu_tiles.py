"""Times tasks/fast/ops/swiglu_lora.py's Triton kernels (forward, backward) at the 8B MLP shape for
several tiles and warp counts, next to the bandwidth floor (bytes read and written at the
GPU's copy rate, measured here with a device-to-device copy). Prints one line per setting.

    python bench/swiglu_tiles.py [--tokens 8192 --n 14336 --rank 16]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def ms(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    from tasks.fast.ops import swiglu_lora

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    if not swiglu_lora.available():
        print("no CUDA/Triton: skipped")
        return
    t, n, r = a.tokens, a.n, a.rank
    bf = dict(device="cuda", dtype=torch.bfloat16)
    y, m, dh = torch.randn(t, 2 * n, **bf), torch.randn(t, 2 * r, **bf), torch.randn(t, n, **bf)
    b_gate, b_up = torch.randn(n, r, **bf) * 0.1, torch.randn(n, r, **bf) * 0.1
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_gbs = 2 * big.numel() / ms(lambda: big.clone()) / 1e6
    fwd_bytes, bwd_bytes = y.numel() * 2 + t * n * 2, y.numel() * 2 * 2 + t * n * 2
    print(
        f"copy rate {copy_gbs:.0f} GB/s; floor: forward {fwd_bytes / copy_gbs / 1e6:.3f} ms, "
        f"backward {bwd_bytes / copy_gbs / 1e6:.3f} ms"
    )
    for bt, bn, warps in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        try:
            f = ms(lambda: swiglu_lora.with_tiles(y, m, b_gate, b_up, None, (bt, bn, warps)))
            b = ms(lambda: swiglu_lora.with_tiles(y, m, b_gate, b_up, dh, (bt, bn, warps)))
        except Exception as e:  # a tile too large for shared memory or registers
            print(f"BT {bt:4d} BN {bn:4d} warps {warps}: {type(e).__name__}")
            continue
        print(
            f"BT {bt:4d} BN {bn:4d} warps {warps}: forward {f:.3f} ms ({fwd_bytes / f / 1e6:.0f} GB/s), "
            f"backward {b:.3f} ms ({bwd_bytes / b / 1e6:.0f} GB/s)"
        )


if __name__ == "__main__":
    main()
