"""Triton kernels for the solver passes, grouped over segments: one launch covers every tracked tensor.

The arena ``M`` is ``[T, D]`` (bf16, fp16 or fp32); segment ``i`` is the column range
``[offsets[i], offsets[i] + numels[i])``. Each launch gets a per-program table of ``(segment id, first column,
last column)`` rows, so a model with hundreds of small tensors and one with a few huge ones both fill the GPU in
one launch. Loads are in the buffer dtype, every product and sum in float32.

* :func:`gram` — ``G[i] = M_i M_i^T`` (``[S, T, T]``). ``T`` is padded to a power of two >= 16 inside the kernel;
  each program accumulates ``tl.dot`` of ``[BT, BLOCK_N] x [BLOCK_N, BT]`` tiles over its column range and adds its
  partial Gram into a float32 output with atomic adds. For ``T > 64`` the output is tiled into ``64 x 64`` blocks
  and only the upper triangle of blocks is computed (mirrored on write).
* :func:`project` — the direction pass ``out[:, seg_i] = U[i]^T M_i`` (``U`` float32 ``[S, T, r]``).

The plain-torch references are in :mod:`relex_callback.core.kernels.reference`; ``tests/test_kernels.py`` compares
the two (on a machine without a GPU, under ``TRITON_INTERPRET=1`` with CPU tensors).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

# Columns handled by one program of the Gram kernel (a multiple of every BLOCK_N used below). Large enough
# that the atomic reduction of the [T, T] partials is negligible, small enough to give every SM work.
SPAN = 1 << 14

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _on(device: torch.device):
    """The CUDA device guard of a launch on ``device`` (Triton launches on the current device, not the tensor's)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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


# Vector width in elements that the body of each program's column range is aligned to: 16 elements is 32 bytes of
# bf16 (two 16-byte loads) and 64 bytes of float32, so every row of a tile is read with 16-byte vector loads once the
# row stride is a multiple of 16 elements (Triton specializes an integer argument divisible by 16; the arena's width
# is) and the column start is a multiple of 16 (the ``tl.multiple_of`` / ``tl.max_contiguous`` hints on the column
# vector below; a hint on the scalar loop variable alone does not reach the loads). The unaligned head and the tail of a
# range
# are one masked tile each.
ALIGN = 16


@triton.jit
def _gram_tile(acc, M_ptr, row_i, row_j, mi, mj, c, mc, SINGLE: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr, MASKED: tl.constexpr):
    """``acc += A B^T`` for the ``[BT, BLOCK_N]`` tiles at columns ``c`` of rows ``row_i`` / ``row_j`` (int64 row
    offsets). ``MASKED``: the columns are masked by ``mc`` (the head and the tail of a range); else only the rows are,
    a mask that is constant along the columns and so keeps the loads vectorized."""
    if MASKED:
        a = tl.load(M_ptr + row_i[:, None] + c[None, :], mask=mi[:, None] & mc[None, :], other=0.0)
    else:
        a = tl.load(M_ptr + row_i[:, None] + c[None, :], mask=mi[:, None], other=0.0)
    if SINGLE:
        b = a  # T <= 64: one block, the tile is multiplied by its own transpose (one load)
    else:
        if MASKED:
            b = tl.load(M_ptr + row_j[:, None] + c[None, :], mask=mj[:, None] & mc[None, :], other=0.0)
        else:
            b = tl.load(M_ptr + row_j[:, None] + c[None, :], mask=mj[:, None], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _gram_kernel(
    M_ptr, G_ptr, table_ptr, T, stride_t, pairs_ptr,
    BT: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SINGLE: tl.constexpr,
    ALIGN: tl.constexpr, NPAIRS: tl.constexpr,
):
    # one grid dimension (no 65,535 limit): the block pairs of one column range are neighbours in launch order, so
    # the second and third reads of a range's tiles come from L2
    prog = tl.program_id(0).to(tl.int64)
    pid = prog // NPAIRS
    pair = prog % NPAIRS
    seg = tl.load(table_ptr + pid * 3)
    start = tl.load(table_ptr + pid * 3 + 1)  # int64: columns of a process's arena may pass 2^31
    end = tl.load(table_ptr + pid * 3 + 2)
    bi = tl.load(pairs_ptr + pair * 2)
    bj = tl.load(pairs_ptr + pair * 2 + 1)
    ri = bi * BT + tl.arange(0, BT)
    rj = bj * BT + tl.arange(0, BT)
    mi = ri < T
    mj = rj < T
    row_i = ri.to(tl.int64) * stride_t
    row_j = rj.to(tl.int64) * stride_t
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    # head: [start, a0) up to the first aligned column; body: whole aligned tiles; tail: what is left
    a0 = tl.minimum((start + ALIGN - 1) // ALIGN * ALIGN, end)
    b0 = a0 + (end - a0) // BLOCK_N * BLOCK_N
    if a0 > start:
        c = start + cols
        acc = _gram_tile(acc, M_ptr, row_i, row_j, mi, mj, c, c < a0, SINGLE, UPCAST, IEEE, True)
    for c0 in range(a0, b0, BLOCK_N):
        c = tl.max_contiguous(tl.multiple_of(c0 + cols, ALIGN), BLOCK_N)  # aligned: vector loads
        acc = _gram_tile(acc, M_ptr, row_i, row_j, mi, mj, c, mi, SINGLE, UPCAST, IEEE, False)
    if b0 < end:
        c = b0 + cols
        acc = _gram_tile(acc, M_ptr, row_i, row_j, mi, mj, c, c < end, SINGLE, UPCAST, IEEE, True)
    base = G_ptr + seg * T * T
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
        block_n (`int`, *optional*): columns per ``tl.dot`` step (default: :func:`gram_config`'s, 64; 32 in float32).
        span (`int`, *optional*, defaults to `SPAN`): columns per program (a multiple of ``block_n``).
    """
    if M.stride(1) != 1:
        M = M.contiguous()
    T = M.shape[0]
    S = len(offsets)
    G = torch.zeros(S, T, T, dtype=torch.float32, device=M.device)
    if S == 0 or T == 0:
        return G.double()
    cfg = gram_config(T, M.dtype, block_n, interpret=_INTERPRET)
    nb = triton.cdiv(T, cfg["BT"])
    pairs = torch.tensor([(i, j) for i in range(nb) for j in range(i, nb)], dtype=torch.int64, device=M.device)
    table = _table(offsets, numels, span or _auto_span(numels, M.device, cfg["BLOCK_N"]), M.device)
    if table.shape[0] == 0:
        return G.double()
    grid = (table.shape[0] * pairs.shape[0],)
    with _on(M.device):  # launched on the arena's device, whichever device is current
        _gram_kernel[grid](M, G, table, T, M.stride(0), pairs, **cfg)
    return G.double()


def gram_config(T: int, dtype: torch.dtype, block_n: int | None = None, interpret: bool = False) -> dict:
    """The constexprs and launch options of :func:`gram` for ``T`` rows of ``dtype`` (one compiled variant each;
    ``bench/compile_kernels.py`` compiles every one of them ahead of time)."""
    # T <= 64: one block, its tile multiplied by its own transpose; else 64 x 64 blocks, the upper triangle of them.
    # (One 128-row block spilled registers on sm_80 and sm_90 in the epilogue's 64-bit addresses:
    # bench/compile_kernels.py.)
    BT = _pow2(T) if T <= 64 else 64
    nb = triton.cdiv(T, BT)
    # Triton 3.x's interpreter multiplies bfloat16 tiles as raw 16-bit integers in tl.dot (wrong by ~1e10); under the
    # interpreter the tiles are widened to float32 first (exact: bf16 x bf16 products are exact in fp32 anyway).
    upcast = interpret and dtype == torch.bfloat16
    # BLOCK_N: float32 tiles at 64 columns spilled registers (sm_80, sm_90); 32 does not
    return dict(BT=BT, BLOCK_N=block_n or (32 if dtype == torch.float32 else 64), IEEE=dtype == torch.float32 or upcast,
                UPCAST=upcast, SINGLE=nb == 1, ALIGN=ALIGN, NPAIRS=nb * (nb + 1) // 2, num_warps=4)


def project_config(T: int, r: int) -> dict:
    """The constexprs of :func:`project` for ``T`` rows and ``r`` directions."""
    TP = _pow2(T, 1)
    return dict(TP=TP, R=r, BLOCK_N=max(16, min(1024, 8192 // TP)), ALIGN=ALIGN)


@triton.jit
def _project_tile(M_ptr, U_ptr, O_ptr, rows_off, rows, mr, c, mc, T, stride_o, R: tl.constexpr, MASKED: tl.constexpr):
    """``out[k, c] = sum_t U[t, k] M[t, c]`` for the ``[TP, BLOCK_N]`` tile at columns ``c`` (see :func:`_gram_tile`
    for ``MASKED``)."""
    if MASKED:
        x = tl.load(M_ptr + rows_off[:, None] + c[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
    else:
        x = tl.load(M_ptr + rows_off[:, None] + c[None, :], mask=mr[:, None], other=0.0)
    x = x.to(tl.float32)
    for k in tl.static_range(R):
        u = tl.load(U_ptr + rows * R + k, mask=mr, other=0.0)
        y = tl.sum(x * u[:, None], axis=0)
        dst = O_ptr + stride_o * k + c  # stride_o is int64 (see _project_kernel): k * stride_o passes 2^31
        if MASKED:
            tl.store(dst, y.to(O_ptr.dtype.element_ty), mask=mc)
        else:
            tl.store(dst, y.to(O_ptr.dtype.element_ty))


@triton.jit
def _project_kernel(
    M_ptr, U_ptr, O_ptr, table_ptr, T, stride_t, stride_o,
    TP: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(table_ptr + pid * 3)
    start = tl.load(table_ptr + pid * 3 + 1)
    end = tl.load(table_ptr + pid * 3 + 2)
    rows = tl.arange(0, TP)
    mr = rows < T
    rows_off = rows.to(tl.int64) * stride_t
    so = stride_o.to(tl.int64)
    ubase = U_ptr + seg * T * R
    cols = tl.arange(0, BLOCK_N)
    a0 = tl.minimum((start + ALIGN - 1) // ALIGN * ALIGN, end)
    b0 = a0 + (end - a0) // BLOCK_N * BLOCK_N
    if a0 > start:
        c = start + cols
        _project_tile(M_ptr, ubase, O_ptr, rows_off, rows, mr, c, c < a0, T, so, R, True)
    for c0 in range(a0, b0, BLOCK_N):
        c = tl.max_contiguous(tl.multiple_of(c0 + cols, ALIGN), BLOCK_N)  # aligned: vector loads
        _project_tile(M_ptr, ubase, O_ptr, rows_off, rows, mr, c, c < b0, T, so, R, False)
    if b0 < end:
        c = b0 + cols
        _project_tile(M_ptr, ubase, O_ptr, rows_off, rows, mr, c, c < end, T, so, R, True)


@torch.no_grad()
def project(
    M: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    U: torch.Tensor,
    out: torch.Tensor,
    span: int | None = None,
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
    cfg = project_config(T, r)
    table = _table(offsets, numels, span or _auto_span(numels, M.device, cfg["BLOCK_N"]), M.device)
    if table.shape[0]:
        with _on(M.device):
            _project_kernel[(table.shape[0],)](M, Uc, target, table, T, M.stride(0), target.stride(0), **cfg)
    if target is not out:
        for o, n in zip(offsets, numels):
            out[:, o : o + n] = target[:, o : o + n]
    return out
