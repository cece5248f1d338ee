"""Solver passes with per-device dispatch: Triton kernels on CUDA (``kernels/triton_ops.py``), the chunked torch
references on CPU (``kernels/reference.py``). Every Triton kernel is tested against its reference.

Environment switches:

* ``RELEX_DISABLE_TRITON=1``: always use the torch references (also on CUDA).
* ``RELEX_FORCE_TRITON=1``: use the Triton kernels on any device; on CPU tensors this only works when
  ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (the tests do this).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from . import reference


def _use_triton(M: torch.Tensor) -> bool:
    if os.environ.get("RELEX_DISABLE_TRITON") == "1":
        return False
    if M.device.type != "cuda" and os.environ.get("RELEX_FORCE_TRITON") != "1":
        return False
    try:
        from . import triton_ops  # noqa: F401
    except Exception:
        return False
    return True


def gram(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int]) -> torch.Tensor:
    """``[S, T, T]`` Gram matrices of every segment (float32 accumulation)."""
    if _use_triton(M):
        from . import triton_ops

        return triton_ops.gram(M, offsets, numels)
    return reference.gram_reference(M, offsets, numels)


def project(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], U: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Direction pass ``out[:, seg] = U[i]^T M_i`` for every segment."""
    if _use_triton(M):
        from . import triton_ops

        return triton_ops.project(M, offsets, numels, U, out)
    return reference.project_reference(M, offsets, numels, U, out)
