"""Streaming fold: any window in a fixed number of buffer rows.

When the snapshot steps outnumber the K ring slots, the full ring is folded into a running rank-``r``
factorisation per tensor and the slots are freed. For tensor ``i`` (``n`` local elements) the folded steps are kept as

    M_folded ~= L_i W_i^T,    L_i = U_f S  [T_folded, r] (float64, tiny),   W_i [n, r] (buffer dtype)

``W`` lives in ``r`` extra rows of the arena (row ``k`` of the arena holds column ``k`` of every ``W_i`` in that
tensor's column segment), so the arena is ``[r + K, D]`` whatever ``tcut`` is. The arena rows in use,
``B = [W^T; R]`` (``R`` the deltas still in the ring), and the block-diagonal left factor ``C = diag(L, I)`` give the
whole trajectory as ``C @ B``; the solver works on that product without forming it (``solver.factor_left``):

* Gram: ``(C B)(C B)^T = C (B B^T) C^T`` - one pass over ``B`` (the same Gram kernel as the plain path);
* direction: ``v = (C B)^T u / sigma = B^T (C^T u / sigma)`` - one more pass (the same projection kernel).

A fold is that same computation with ``rank = r``: ``L_new = U S`` and ``W_new^T = (C^T U S^-1)^T B``, written back
into the basis rows in place by the reference projection, chunk by chunk (each chunk's product is computed in full
before its basis columns are overwritten). Nothing ``n x n`` is formed; two passes over ``r + K`` rows per fold.
With no fold (``K`` at least the window) the store never allocates basis rows and the solve is the plain, exact path.

Distributed runs: every process plans its slots for the largest process's share (``buffer.open_window``), so all fold
at the same steps, and the per-step verdicts (non-finite, unchanged) are agreed (``TrajectoryStore.consensus``), so
all record the same steps. DDP / ZeRO-1/2 processes hold whole tensors: each folds its own, no collective. ZeRO-3 /
FSDP2 processes hold a slice of every tensor: the fold's ``[S, R, R]`` Grams of ``B`` are summed over processes with
one all-reduce (``TrajectoryStore.reduce``, the same one the final solve uses), so ``U``, ``S`` and ``X`` are the
whole tensors' and identical everywhere, and each process writes ``W^T = X^T B`` for its own columns: the basis is
sliced exactly like the parameters, and nothing of a tensor's size is ever gathered.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import RelexMemoryError


def plan_slots(window: int, D: int, itemsize: int, *, max_buffer_bytes: Optional[int], buffer_slots: Optional[int],
               fold_rank: int) -> tuple[int, Optional[int]]:
    """How many ring slots, and whether to fold: ``(K, None)`` when the whole window fits (the exact path),
    ``(K, fold_rank)`` with ``fold_rank + K`` rows in all when it does not."""
    row = D * itemsize
    if buffer_slots is not None:
        if buffer_slots >= window:
            return window, None
        K = buffer_slots
    elif max_buffer_bytes is not None and window * row > max_buffer_bytes:
        K = max_buffer_bytes // row - fold_rank
        if K < 1:
            raise RelexMemoryError(
                f"max_buffer_bytes={max_buffer_bytes} holds {max_buffer_bytes // row} row(s) of {row:,} bytes; folding "
                f"the window needs fold_rank={fold_rank} basis rows + at least 1 slot = {(fold_rank + 1) * row:,} "
                "bytes: "
                f"raise max_buffer_bytes, lower fold_rank, or track fewer tensors (include/exclude)"
            )
    else:
        return window, None
    if max_buffer_bytes is not None and (K + fold_rank) * row > max_buffer_bytes:
        raise RelexMemoryError(
            f"buffer_slots={K} + fold_rank={fold_rank} rows need {(K + fold_rank) * row:,} bytes but max_buffer_bytes "
            "is "
            f"{max_buffer_bytes:,}; lower buffer_slots or fold_rank"
        )
    return K, fold_rank


def left_factor(L: torch.Tensor, ring_rows: int) -> torch.Tensor:
    """``C = diag(L_i, I)`` per tensor, from the folded left factors ``L`` (``[S, T_folded, basis_rows]`` float64) and
    the ``k = ring_rows`` rows still in the ring: ``[S, T_folded + k, basis_rows + k]`` float64."""
    S, Tf, b = L.shape
    k = ring_rows
    C = torch.zeros(S, Tf + k, b + k, dtype=torch.float64)
    C[:, :Tf, :b] = L
    C[:, Tf:, b:] = torch.eye(k, dtype=torch.float64)
    return C
