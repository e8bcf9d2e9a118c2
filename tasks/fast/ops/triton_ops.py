"""What a Triton kernel registered as a torch op (torch.library.triton_op) needs to run here."""

from __future__ import annotations

import torch


def can_run() -> bool:
    """CUDA, a torch with triton_op, and Triton importable."""
    if not torch.cuda.is_available() or not hasattr(torch.library, "triton_op"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
