"""Plain-torch implementations of the solver passes: the reference every fused kernel is tested against, and the
CPU path itself (chunked so that the float32 copy of a chunk stays in cache and nothing of size T x n is ever
materialised in float32).

Shapes: ``M`` is ``[T, D]`` (buffer dtype); segment ``i`` is the column range ``[offsets[i], offsets[i]+numels[i])``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..precision import exact

# Columns per float32 chunk: T x CHUNK x 4 bytes stays near the cache size for T ~ 75 (measured: 16K-64K columns
# are equally fast on the 2-core CI machine; 4K is 10% slower).
CHUNK = 1 << 15


def _chunks(offset: int, numel: int, chunk: int):
    for s in range(offset, offset + numel, chunk):
        yield s, min(offset + numel, s + chunk)


def float32_scratch(M: torch.Tensor, chunk: int):
    """A reusable ``[T, chunk]`` float32 scratch for widening chunks of ``M`` (None for a float32 ``M`` off the CPU).

    A float32 ``M`` on the CPU is copied too: a multi-threaded CPU BLAS product's last bit depends on where its
    operand sits in memory (the arena's width and the tensor's offset in it), so a view would make the callback (which
    tracks the trainable tensors) and ``relex extrapolate`` (every floating tensor of the base) differ by an ulp in
    a few tensors (measured: 5 of 21 with 2 threads). In a fixed-width scratch every path computes the same bits."""
    if M.dtype == torch.float32 and M.device.type != "cpu":
        return None
    return torch.empty(M.shape[0], chunk, dtype=torch.float32, device=M.device)


def _float32_chunks(M: torch.Tensor, o: int, n: int, chunk: int, tmp=False):
    """``(s, e, c)`` over the columns ``[o, o+n)``: ``c`` is ``M[:, s:e]`` as float32, copied into one reused,
    cache-sized scratch ``tmp`` (allocated here unless the caller passes its own; a view only for a float32 ``M`` off
    the CPU, see :func:`float32_scratch`)."""
    if tmp is False:
        tmp = float32_scratch(M, chunk)
    for s, e in _chunks(o, n, chunk):
        if tmp is None:
            yield s, e, M[:, s:e]
        else:
            c = tmp[:, : e - s]
            c.copy_(M[:, s:e])
            yield s, e, c


@torch.no_grad()
@exact
def gram_reference(M: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], chunk: int = CHUNK) -> torch.Tensor:
    """``G[i] = M_i M_i^T`` for every segment, float32 accumulation per chunk, summed in float64. ``[S, T, T]``."""
    T = M.shape[0]
    G = torch.zeros(len(offsets), T, T, dtype=torch.float64, device=M.device)
    if M.device.type != "cpu":  # on GPU the cast is cheap relative to the matmul
        for i, (o, n) in enumerate(zip(offsets, numels)):
            for s, e in _chunks(o, n, chunk * 8):
                c = M[:, s:e].float()
                G[i] += (c @ c.T).double()
        return G
    if M.dtype == torch.float32:  # each chunk copied into a fixed-width scratch (float32_scratch: the same bits on
        tmp = float32_scratch(M, chunk)  # every path), its Gram summed in float64 like the float32 buffer always was
        for i, (o, n) in enumerate(zip(offsets, numels)):
            for s, e in _chunks(o, n, chunk):
                c = tmp[:, : e - s]
                c.copy_(M[:, s:e])
                G[i] += (c @ c.T).double()
        return G
    tmp = torch.empty(T, chunk, dtype=torch.float32, device=M.device)
    acc = torch.empty(T, T, dtype=torch.float32, device=M.device)
    for i, (o, n) in enumerate(zip(offsets, numels)):
        acc.zero_()
        for s, e in _chunks(o, n, chunk):
            c = tmp[:, : e - s]
            c.copy_(M[:, s:e])
            acc.addmm_(c, c.T)
        G[i] = acc.double()
    return G


@torch.no_grad()
@exact
def project_reference(
    M: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    U: torch.Tensor,
    out: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Direction pass: ``out[:, seg_i] = U[i]^T M_i`` for every segment. ``U`` is ``[S, T, r]`` (float32, already
    divided by sigma), ``out`` is ``[r, D]`` in any float dtype. Returns ``out``."""
    tmp = float32_scratch(M, chunk)
    for i, (o, n) in enumerate(zip(offsets, numels)):
        Ui = U[i].to(device=M.device, dtype=torch.float32)
        for s, e, c in _float32_chunks(M, o, n, chunk, tmp):
            out[:, s:e] = Ui.T @ c
    return out
