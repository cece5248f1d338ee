"""Solver passes with per-device dispatch: Triton kernels on CUDA (``kernels/triton_ops.py``), the chunked torch
references on CPU (``kernels/reference.py``). Every Triton kernel is tested against its reference.

A kernel that cannot run is never the end of a window: :func:`probe` runs each kernel once on a tiny problem on the
buffer's device when a window opens and compares it with its reference; a kernel that fails to compile or launch
there, or gives another answer, or that raises later inside a solve, is replaced by its reference for the rest of the
process, with one warning naming the kernel and the error (:func:`disabled` lists them).

Environment switches:

* ``RELEX_DISABLE_TRITON=1``: always use the torch references (also on CUDA).
* ``RELEX_FORCE_TRITON=1``: use the Triton kernels on any device; on CPU tensors this only works when
  ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (the tests do this).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from . import reference, staged

logger = logging.getLogger("relex_callback")

OPS = ("gram", "project")
# (device, op) -> why the op's kernel is replaced by its reference on that device, for the rest of the process
_disabled: dict[tuple[str, str], str] = {}


def _use_triton(M: torch.Tensor, op: str = "gram") -> bool:
    if os.environ.get("RELEX_DISABLE_TRITON") == "1":
        return False
    if M.device.type != "cuda" and os.environ.get("RELEX_FORCE_TRITON") != "1":
        return False
    if (str(M.device), op) in _disabled:
        return False
    try:
        from . import triton_ops  # noqa: F401
    except Exception:
        return False
    return True


def disable(device, op: str, why: str):
    """Replace ``op``'s kernel by its reference on ``device`` for the rest of the process (one warning)."""
    key = (str(torch.device(device)), op)
    if key in _disabled:
        return
    _disabled[key] = why
    logger.warning("relex: the Triton %s kernel cannot be used on %s (%s); its torch reference computes it instead "
                   "for the rest of this process (slower on a GPU, the same result within rounding)", op, key[0], why)


def disabled() -> dict:
    """``{(device, op): reason}`` of the kernels replaced by their references in this process."""
    return dict(_disabled)


def reset():
    """Forget every replaced kernel (a new process starts so; the tests call it)."""
    _disabled.clear()


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def gram(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], device=None) -> torch.Tensor:
    """``[S, T, T]`` Gram matrices of every segment (float32 accumulation). ``device``: compute there when ``M`` is
    elsewhere (a host or disk arena through the GPU in blocks, :mod:`.staged`); the result is on ``device``."""
    dev = staged.through(M, device)
    if dev is not None:
        return staged.gram_staged(M, offsets, numels, dev, gram)
    if _use_triton(M, "gram"):
        from . import triton_ops

        try:
            return triton_ops.gram(M, offsets, numels)
        except Exception as e:  # a compile failure, a launch error, an OOM of the kernel's own buffers
            disable(M.device, "gram", _why(e))
    return reference.gram_reference(M, offsets, numels)


def project(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], U: torch.Tensor, out: torch.Tensor,
            device=None) -> torch.Tensor:
    """Direction pass ``out[:, seg] = U[i]^T M_i`` for every segment. ``device``: compute there when ``M`` and
    ``out`` are elsewhere (:mod:`.staged`; ``out`` may then be rows of ``M``)."""
    dev = staged.through(M, device)
    if dev is not None:
        return staged.project_staged(M, offsets, numels, U, out, dev, project)
    if _use_triton(M, "project"):
        from . import triton_ops

        try:
            return triton_ops.project(M, offsets, numels, U, out)
        except Exception as e:
            disable(M.device, "project", _why(e))
    return reference.project_reference(M, offsets, numels, U, out)


@torch.no_grad()
def probe(device, dtype: torch.dtype, rank: int = 1) -> dict:
    """Run each kernel once on a tiny problem on ``device`` in the buffer's ``dtype`` and compare it with its
    reference (5 rows, segments of 3, 37 and 200 columns, one unaligned); a kernel that raises or differs by more
    than 1e-3 of the problem's scale is replaced by its reference (:func:`disable`). Returns ``{op: "kernel" |
    "reference" | "reason it was replaced"}``. Where the kernels are not used (CPU, ``RELEX_DISABLE_TRITON``), it runs
    nothing."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 240, generator=g).to(dtype)
    offsets, numels = [0, 3, 40], [3, 37, 200]
    result = {}
    for op in OPS:
        probe_M = M.to(device)
        if not _use_triton(probe_M, op):
            result[op] = _disabled.get((str(device), op), "reference")
            continue
        from . import triton_ops

        try:
            if op == "gram":
                got = triton_ops.gram(probe_M, offsets, numels).cpu()
                want = reference.gram_reference(M, offsets, numels)
            else:
                U = torch.randn(3, 5, rank, generator=g)
                got = triton_ops.project(probe_M, offsets, numels, U, torch.zeros(rank, 240, device=device)).cpu()
                want = reference.project_reference(M, offsets, numels, U, torch.zeros(rank, 240))
            scale = float(want.abs().max()) or 1.0
            err = float((got.double() - want.double()).abs().max())
            if not err <= 1e-3 * scale:  # NaN too
                raise ValueError(f"differs from its reference by {err:.3g} (scale {scale:.3g}) on the probe")
            result[op] = "kernel"
        except Exception as e:
            disable(device, op, f"probe at window open: {_why(e)}")
            result[op] = _disabled[(str(device), op)]
    return result
