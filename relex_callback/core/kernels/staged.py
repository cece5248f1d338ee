"""The solver's passes over an arena in host memory or on disk, computed on a GPU: the arena goes through the device
in column blocks of a fixed size and each block is reduced there by the device's own pass (the Triton kernel or its
reference), so that a host or disk tier does not leave the Gram, the projection and the fold to the CPU while a GPU
sits beside it (a fold of 16 rows x 3 GB on one CPU thread stalls training for tens of seconds; on the GPU it is
bound by the host-to-device copy).

A block spans the arena's columns ``[a, b)`` and every segment piece inside it: many small tensors share one copy
and one launch. The device holds one block of ``T`` rows (:data:`STAGE_BYTES`) and, for the projection, its ``r``
output rows: that is all the device memory the path takes. Each block is read before its output columns are
written, so the projection may write into rows of the arena it reads (the fold does).

The results are the device pass's, block by block: the Gram is the sum of per-block Grams in float64 (the CPU
reference sums per-chunk Grams the same way), the projection is exact per column.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..precision import exact

STAGE_BYTES = 64 << 20  # one [T, cols] block on the device: 64 MiB (~450k columns of a 75-row bfloat16 window)
_ALIGN = 64  # columns per block are a multiple of this: each row of a block starts 16-byte aligned for the kernels


def block_columns(T: int, itemsize: int, stage_bytes: int = STAGE_BYTES) -> int:
    """Columns of one staged block of ``T`` rows (at least :data:`_ALIGN`)."""
    cols = stage_bytes // max(1, T * itemsize)
    return max(_ALIGN, cols // _ALIGN * _ALIGN)


def _blocks(offsets: Sequence[int], numels: Sequence[int], cols: int):
    """``(a, b, [(i, local_offset, n)])``: column blocks ``[a, b)`` of at most ``cols`` columns covering every
    segment, with the segment pieces inside each. Blocks start at a segment's first column or where the previous
    block ended; columns outside every segment are never read."""
    order = sorted((o, n, i) for i, (o, n) in enumerate(zip(offsets, numels)) if n > 0)
    k = 0
    pos = None  # the next column to cover
    while k < len(order):
        o, n, i = order[k]
        a = max(o, pos) if pos is not None else o
        if a >= o + n:
            k += 1
            continue
        b = a + cols
        pieces = []
        j = k
        while j < len(order) and order[j][0] < b:
            oj, nj, ij = order[j]
            lo, hi = max(oj, a), min(oj + nj, b)
            if hi > lo:
                pieces.append((ij, lo - a, hi - lo))
            j += 1
        b = max(off + a + ln for _, off, ln in pieces)  # the block ends with its last piece
        yield a, b, pieces
        pos = b
        while k < len(order) and order[k][0] + order[k][1] <= pos:
            k += 1


def _stage(M: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
    """``M[:, a:b]`` copied into the device buffer as a contiguous ``[T, b - a]`` block."""
    T = M.shape[0]
    blk = buf[: T * (b - a)].view(T, b - a)
    blk.copy_(M[:, a:b])
    return blk


@torch.no_grad()
@exact
def gram_staged(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], device, gram: Callable,
                stage_bytes: int = STAGE_BYTES) -> torch.Tensor:
    """``[S, T, T]`` float64 Grams on ``device`` of the segments of ``M`` (any device), through ``device`` block by
    block; ``gram(block, offsets, numels)`` is the device's pass (:func:`relex_callback.core.kernels.gram`)."""
    device = torch.device(device)
    T = M.shape[0]
    G = torch.zeros(len(offsets), T, T, dtype=torch.float64, device=device)
    if not len(offsets):
        return G
    cols = block_columns(T, M.element_size(), stage_bytes)
    buf = torch.empty(T * cols, dtype=M.dtype, device=device)
    for a, b, pieces in _blocks(offsets, numels, cols):
        blk = _stage(M, a, b, buf)
        idx = [i for i, _, _ in pieces]
        part = gram(blk, [o for _, o, _ in pieces], [n for _, _, n in pieces])
        G.index_add_(0, torch.tensor(idx, device=device), part.to(torch.float64))
    return G


@torch.no_grad()
@exact
def project_staged(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], U: torch.Tensor,
                   out: torch.Tensor, device, project: Callable, stage_bytes: int = STAGE_BYTES) -> torch.Tensor:
    """``out[:, seg_i] = U[i]^T M_i`` with ``M`` and ``out`` where they are (host, disk), computed on ``device``
    block by block; ``project(block, offsets, numels, U_block, out_block)`` is the device's pass. ``out`` may be rows
    of ``M`` (each block is read before its columns are written). Columns outside every segment keep their values."""
    device = torch.device(device)
    T = M.shape[0]
    r = out.shape[0]
    if not len(offsets):
        return out
    cols = block_columns(T, M.element_size(), stage_bytes)
    buf = torch.empty(T * cols, dtype=M.dtype, device=device)
    obuf = torch.empty(r * cols, dtype=out.dtype, device=device)
    U_dev = U.to(device=device, dtype=torch.float32)
    for a, b, pieces in _blocks(offsets, numels, cols):
        blk = _stage(M, a, b, buf)
        res = obuf[: r * (b - a)].view(r, b - a)
        res.copy_(out[:, a:b])  # the gaps between pieces go back unchanged
        idx = torch.tensor([i for i, _, _ in pieces], device=device)
        project(blk, [o for _, o, _ in pieces], [n for _, _, n in pieces], U_dev.index_select(0, idx), res)
        out[:, a:b].copy_(res)
    return out


def through(M: torch.Tensor, device) -> Optional[torch.device]:
    """The device the passes over ``M`` should run on: ``device`` when it is given and is not where ``M`` is."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == M.device.type and (device.index is None or device == M.device):
        return None
    return device
