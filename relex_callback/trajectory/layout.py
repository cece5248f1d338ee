"""The arena of a :class:`~.store.TrajectoryStore`: its columns, its sizes and its memory.

Every tracked tensor (this process's piece of it, flattened) is a column segment ``[offset, offset + n)`` of ``D``
columns (:func:`lay_out`); the arena has ``fold_rank + K`` rows in the buffer dtype on a
:class:`~.tiers.StorageTier`. :func:`estimate` sizes it before anything is allocated; the other functions take the
store (its ``tier``, ``K``, ``fold_rank``, ``D``, ``dtype``) and are its allocation (:func:`choose_tier`,
:func:`allocate`, :func:`move_to_fresh_file`, :func:`release`) and where the passes over it run
(:func:`compute_device`). The store's hot path (snapshot, fold, solve inputs) is in :mod:`.store`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import dtype_name, torch_dtype
from ..params import TensorSpec, theta0_dtype
from .tiers import StorageTier


def lay_out(specs: Sequence[TensorSpec]) -> int:
    """Give each tensor its columns, in order (``spec.offset`` is set); returns ``D``, the arena's width."""
    off = 0
    for s in specs:
        s.offset = off
        off += s.local_numel
    return off


def estimate(specs: Sequence[TensorSpec], capacity: int, dtype="bfloat16") -> dict:
    """Bytes needed before allocating anything: ``buffer`` (K x D in the buffer dtype) and ``theta0``."""
    D = sum(s.local_numel for s in specs)
    dt = torch_dtype(dtype)
    return {
        "elements": D,
        "slots": int(capacity),
        "buffer": int(capacity) * D * dt.itemsize,
        "theta0": D * theta0_dtype(specs).itemsize,
    }


def choose_tier(store, storage: str, *, directory: Optional[str], max_bytes: Optional[int],
                prefault: bool) -> StorageTier:
    """The tier the store's arena will live on (``storage``: ``auto``, ``device``, ``host`` or ``disk``), refused
    with what it needs when it fits nowhere allowed."""
    what = (f"{store.rows_allocated} rows x {store.D:,} elements x {store.dtype.itemsize} bytes "
            f"({dtype_name(store.dtype)})")
    kind = StorageTier.choose(storage, store.buffer_bytes, what, device=store.device, directory=directory,
                              max_bytes=max_bytes)
    return StorageTier(kind, device=store.device, directory=directory, prefault=prefault)


def allocate(store, reuse_file: bool = False):
    """The arena on the store's tier; ``M`` is the view of its last ``K`` rows (the ring) when the store folds."""
    store.M = store.tier.allocate(store.rows_allocated, store.D, store.dtype, reuse_file=reuse_file)
    if store.fold_rank:
        store.arena = store.M
        store.M = store.arena[store.fold_rank :]


def move_to_fresh_file(store, copy_rows: bool = True) -> torch.Tensor:
    """Disk tier: continue in a new file (the old one stays, unchanged, for the checkpoints that link it).
    ``copy_rows``: copy the rows in use; the caller fills the new file otherwise. Returns the new arena."""
    store.synchronize()
    old = store.arena if store.fold_rank else store.M
    new = store.tier.map_disk(store.rows_allocated, store.D, store.dtype, fresh=True)
    if copy_rows:
        lo = (store.fold_rank - store.basis_rows) if store.fold_rank else 0
        hi = (store.fold_rank or 0) + store.num_ring_rows
        new[lo:hi].copy_(old[lo:hi])
    if store.fold_rank:
        store.arena, store.M = new, new[store.fold_rank :]
    else:
        store.M = new
    return new


def compute_device(store) -> Optional[torch.device]:
    """Where the passes over the arena run when that is not where the arena is: the training device, for an
    arena in host memory or on disk while training runs on a GPU (it goes through the device in blocks,
    :mod:`relex_callback.core.kernels.staged`); ``None`` otherwise (the arena's own device)."""
    buf = store.arena if store.arena is not None else store.M
    if store.device.type == "cpu" or buf is None or buf.device.type != "cpu":
        return None
    return store.device


def release(store):
    """Free the buffer memory (the disk file stays until the directory is removed)."""
    store.synchronize()
    store.M = None
    store.tier.release()
    store.arena = None
