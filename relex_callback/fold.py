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
"""

from __future__ import annotations

from typing import Optional

from .errors import RelexInputError, RelexMemoryError

DEFAULT_FOLD_RANK = 8


def validate_fold(fold_rank, buffer_slots, rank: int = 1):
    """Check the fold settings; returns ``(fold_rank, buffer_slots)`` as ints (``buffer_slots`` may be ``None``)."""

    def whole(name, v, minimum):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RelexInputError(f"{name} must be a whole number, got {v!r}")
        if v < minimum:
            raise RelexInputError(f"{name} must be >= {minimum}, got {v}")
        return v

    fold_rank = whole("fold_rank", DEFAULT_FOLD_RANK if fold_rank is None else fold_rank, 1)
    buffer_slots = whole("buffer_slots", buffer_slots, 1)
    if fold_rank < rank:
        raise RelexInputError(
            f"fold_rank={fold_rank} is below rank={rank}: the folded trajectory keeps only fold_rank directions per "
            f"tensor; use fold_rank >= {rank}"
        )
    return fold_rank, buffer_slots


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
                f"the window needs fold_rank={fold_rank} basis rows + at least 1 slot = {(fold_rank + 1) * row:,} bytes: "
                f"raise max_buffer_bytes, lower fold_rank, or track fewer tensors (include/exclude)"
            )
    else:
        return window, None
    if max_buffer_bytes is not None and (K + fold_rank) * row > max_buffer_bytes:
        raise RelexMemoryError(
            f"buffer_slots={K} + fold_rank={fold_rank} rows need {(K + fold_rank) * row:,} bytes but max_buffer_bytes is "
            f"{max_buffer_bytes:,}; lower buffer_slots or fold_rank"
        )
    return K, fold_rank
