"""Triton kernels for the solver passes, grouped over segments: one launch covers every tracked tensor.

The arena ``M`` is ``[T, D]`` (bf16, fp16 or fp32); segment ``i`` is the column range
``[offsets[i], offsets[i] + numels[i])``. Each launch gets a per-program table of ``(segment id, first column,
last column)`` rows, so a model with hundreds of small tensors and one with a few huge ones both fill the GPU in
one launch. Loads are in the buffer dtype, every product and sum in float32.

* :func:`gram` — ``G[i] = M_i M_i^T`` (``[S, T, T]``). ``T`` is padded to a power of two >= 16 inside the kernel;
  each program accumulates ``tl.dot`` of ``[BT, BLOCK_N] x [BLOCK_N, BT]`` tiles over its column range and adds its
  partial Gram into a float32 output with atomic adds. For ``T > 128`` the output is tiled into ``64 x 64`` blocks
  and only the upper triangle of blocks is computed (mirrored on write).
* :func:`project` — the direction pass ``out[:, seg_i] = U[i]^T M_i`` (``U`` float32 ``[S, T, r]``).

The plain-torch references are in :mod:`relex_callback.core.kernels.reference`; ``tests/test_kernels.py`` compares
the two (on a machine without a GPU, under ``TRITON_INTERPRET=1`` with CPU tensors).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

# Columns handled by one program of the Gram kernel (a multiple of every BLOCK_N used below). Large enough
# that the atomic reduction of the [T, T] partials is negligible, small enough to give every SM work.
SPAN = 1 << 14

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _table(offsets: Sequence[int], numels: Sequence[int], span: int, device) -> torch.Tensor:
    """``[P, 3]`` int64 rows ``(segment, start, end)``: every segment cut into column ranges of at most ``span``
    (built with tensor ops: a 1e9-column arena gives a large table, never a Python loop over its rows)."""
    o = torch.as_tensor([int(x) for x in offsets], dtype=torch.int64)
    n = torch.as_tensor([int(x) for x in numels], dtype=torch.int64)
    keep = n > 0
    seg_ids = torch.arange(len(o), dtype=torch.int64)[keep]
    o, n = o[keep], n[keep]
    if o.numel() == 0:
        return torch.empty(0, 3, dtype=torch.int64, device=device)
    counts = (n + span - 1) // span
    seg = torch.repeat_interleave(torch.arange(o.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(int(counts.sum()), dtype=torch.int64) - first[seg]
    start = o[seg] + k * span
    end = torch.minimum(start + span, o[seg] + n[seg])
    return torch.stack([seg_ids[seg], start, end], 1).contiguous().to(device)


def _auto_span(numels: Sequence[int], device, multiple: int) -> int:
    """Columns per program: at least ``SPAN``, and few enough programs (~8 per SM) that the atomic reduction of the
    partial results stays small on a large arena."""
    total = sum(int(x) for x in numels)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    span = max(SPAN, -(-total // (8 * sms)))
    return -(-span // multiple) * multiple


@triton.jit
def _gram_kernel(
    M_ptr, G_ptr, table_ptr, T, stride_t, pairs_ptr,
    BT: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    seg = tl.load(table_ptr + pid * 3)
    start = tl.load(table_ptr + pid * 3 + 1)
    end = tl.load(table_ptr + pid * 3 + 2)
    bi = tl.load(pairs_ptr + pair * 2)
    bj = tl.load(pairs_ptr + pair * 2 + 1)
    ri = bi * BT + tl.arange(0, BT)
    rj = bj * BT + tl.arange(0, BT)
    mi = ri < T
    mj = rj < T
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for c0 in range(start, end, BLOCK_N):
        c = c0 + cols
        mc = c < end
        a = tl.load(M_ptr + ri[:, None].to(tl.int64) * stride_t + c[None, :], mask=mi[:, None] & mc[None, :], other=0.0)
        if SINGLE:
            b = a  # T <= 128: one block, the tile is multiplied by its own transpose (one load)
        else:
            b = tl.load(M_ptr + rj[:, None].to(tl.int64) * stride_t + c[None, :], mask=mj[:, None] & mc[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    base = G_ptr + seg.to(tl.int64) * T * T
    m2 = mi[:, None] & mj[None, :]
    tl.atomic_add(base + ri[:, None] * T + rj[None, :], acc, mask=m2)
    if bi != bj:
        tl.atomic_add(base + rj[None, :] * T + ri[:, None], acc, mask=m2)


@torch.no_grad()
def gram(
    M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], block_n: int | None = None, span: int | None = None
) -> torch.Tensor:
    """``[S, T, T]`` float64 Gram matrices of every segment (float32 accumulation), like
    :func:`~relex_callback.core.kernels.reference.gram_reference`.

    Args:
        M (`torch.Tensor`): the arena ``[T, D]`` (bfloat16, float16 or float32; rows contiguous).
        offsets (`Sequence[int]`): first column of each segment.
        numels (`Sequence[int]`): number of columns of each segment.
        block_n (`int`, *optional*): columns per ``tl.dot`` step (default 64, 32 for ``T > 64``).
        span (`int`, *optional*, defaults to `SPAN`): columns per program (a multiple of ``block_n``).
    """
    if M.stride(1) != 1:
        M = M.contiguous()
    T = M.shape[0]
    S = len(offsets)
    G = torch.zeros(S, T, T, dtype=torch.float32, device=M.device)
    if S == 0 or T == 0:
        return G.double()
    BT = _pow2(T) if T <= 128 else 64
    nb = triton.cdiv(T, BT)
    pairs = torch.tensor([(i, j) for i in range(nb) for j in range(i, nb)], dtype=torch.int64, device=M.device)
    BLOCK_N = block_n or (64 if BT <= 64 else 32)
    table = _table(offsets, numels, span or _auto_span(numels, M.device, BLOCK_N), M.device)
    if table.shape[0] == 0:
        return G.double()
    grid = (table.shape[0], pairs.shape[0])
    # Triton 3.x's interpreter multiplies bfloat16 tiles as raw 16-bit integers in tl.dot (wrong by ~1e10); under the
    # interpreter the tiles are widened to float32 first (exact: bf16 x bf16 products are exact in fp32 anyway).
    upcast = _INTERPRET and M.dtype == torch.bfloat16
    _gram_kernel[grid](
        M, G, table, T, M.stride(0), pairs, BT=BT, BLOCK_N=BLOCK_N, IEEE=M.dtype == torch.float32 or upcast,
        UPCAST=upcast, SINGLE=nb == 1,
        num_warps=8 if BT >= 128 else 4,
    )
    return G.double()


@triton.jit
def _project_kernel(
    M_ptr, U_ptr, O_ptr, table_ptr, T, stride_t, stride_o,
    TP: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(table_ptr + pid * 3)
    start = tl.load(table_ptr + pid * 3 + 1)
    end = tl.load(table_ptr + pid * 3 + 2)
    rows = tl.arange(0, TP)
    mr = rows < T
    ubase = U_ptr + seg.to(tl.int64) * T * R
    for c0 in range(start, end, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        mc = c < end
        x = tl.load(M_ptr + rows[:, None].to(tl.int64) * stride_t + c[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
        x = x.to(tl.float32)
        for k in tl.static_range(R):
            u = tl.load(ubase + rows * R + k, mask=mr, other=0.0)
            y = tl.sum(x * u[:, None], axis=0)
            tl.store(O_ptr + k * stride_o + c, y.to(O_ptr.dtype.element_ty), mask=mc)


@torch.no_grad()
def project(
    M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], U: torch.Tensor, out: torch.Tensor, span: int | None = None
) -> torch.Tensor:
    """Direction pass: ``out[:, seg_i] = U[i]^T M_i`` for every segment, like
    :func:`~relex_callback.core.kernels.reference.project_reference`.

    Args:
        M (`torch.Tensor`): the arena ``[T, D]``.
        offsets (`Sequence[int]`), numels (`Sequence[int]`): the segments.
        U (`torch.Tensor`): ``[S, T, r]`` float32 (already divided by sigma).
        out (`torch.Tensor`): ``[r, D]`` in any float dtype; written in place and returned.
        span (`int`, *optional*): columns per program (default: enough for ~8 programs per SM).
    """
    if M.stride(1) != 1:
        M = M.contiguous()
    T = M.shape[0]
    r = out.shape[0]
    Uc = U.to(device=M.device, dtype=torch.float32).contiguous()
    target = out if out.stride(1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    TP = _pow2(T, 1)
    BLOCK_N = max(16, min(1024, 8192 // TP))
    table = _table(offsets, numels, span or _auto_span(numels, M.device, BLOCK_N), M.device)
    if table.shape[0]:
        _project_kernel[(table.shape[0],)](M, Uc, target, table, T, M.stride(0), target.stride(0), TP=TP, R=r, BLOCK_N=BLOCK_N)
    if target is not out:
        for o, n in zip(offsets, numels):
            out[:, o : o + n] = target[:, o : o + n]
    return out
