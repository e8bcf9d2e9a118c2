"""Kernels and autograd functions of the fast path: tensors and constants in, tensors out.
Installing them on a model is tasks/fast/patch.py's."""

from __future__ import annotations

import torch


def triton_ops_can_run() -> bool:
    """What a Triton kernel registered as a torch op needs here: CUDA, a torch with
    torch.library.triton_op, and Triton importable."""
    if not torch.cuda.is_available() or not hasattr(torch.library, "triton_op"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
