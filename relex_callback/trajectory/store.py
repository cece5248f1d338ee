"""The trajectory store: theta_0 and a ring of weight deltas in one arena per process (the hot path).

Layout: every tracked tensor (this process's piece of it, flattened) is a column segment ``[offset, offset+n)`` of an
arena of ``D`` columns. ``theta0`` is one flat tensor of length ``D`` in the recorded values' dtype (the parameters',
or float32 for fp32 master weights, or float32 when tracked tensors mix dtypes: every 16-bit value is exact in
float32). The buffer ``M`` is ``K x D`` in the buffer dtype; row
``i`` holds ``Delta_t = theta_t - theta_0`` (computed in float32) for the i-th recorded step. Rows are always kept in
step order. When the steps outnumber the ``K`` slots, the ring folds into a running rank-``fold_rank`` factorisation
(:meth:`TrajectoryStore.fold`; the math in :mod:`relex_callback.core.fold`).

Composition: the arena lives on a :class:`~.tiers.StorageTier` (device, host, disk); its columns, sizes and memory
(allocation, a fresh disk file, release) are the functions of :mod:`.layout`; saving, loading, going back to an
earlier step and checking against live weights are the functions of :mod:`.persist`; opening a window (fresh or
resumed, sized by the memory plan) is :func:`.window.open_window`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..config import torch_dtype
from ..core import kernels
from ..core.fold import left_factor
from ..core.kernels.reference import project_reference
from ..core.precision import exact
from ..core.solver import factor_left
from ..errors import RelexInputError, RelexMemoryError, RelexNonFiniteError
from ..params import TensorSpec, theta0_dtype
from . import layout, persist
from .tiers import SNAPSHOT_CHUNK, SNAPSHOT_CHUNK_DEVICE, prefault

logger = logging.getLogger("relex_callback")


class TrajectoryStore:
    """Per-rank store of theta_0 and the recorded deltas.

    Args:
        specs (`list[TensorSpec]`): the tracked tensors, in arena order. Their ``offset`` is assigned here.
        capacity (`int`): number of slots K (rows).
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"bfloat16"`): buffer dtype.
        storage (`str`, *optional*, defaults to `"auto"`): ``auto``, ``device``, ``host`` or ``disk``.
        device (`torch.device`, *optional*): where the parameters live (theta_0 is kept there).
        directory (`str`, *optional*): run directory; required for the ``disk`` tier.
        max_bytes (`int`, *optional*): upper bound on the buffer's bytes.
        fold_rank (`int`, *optional*): when set, a full ring is folded into a rank-``fold_rank`` factorisation per
            tensor instead of raising (``relex_callback.core.fold``); the arena then has ``fold_rank + capacity`` rows.
        prefault (`bool`, *optional*, defaults to `True`): populate the pages of a CPU buffer and of theta_0 when
            they are allocated (see :func:`prefault`) rather than at first write.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        capacity: int,
        *,
        dtype="bfloat16",
        storage: str = "auto",
        device=None,
        directory: Optional[str] = None,
        max_bytes: Optional[int] = None,
        check_finite: bool = True,
        fold_rank: Optional[int] = None,
        prefault: bool = True,
        skip_unchanged: bool = True,
        _allocate: bool = True,
    ):
        if not specs:
            raise RelexInputError("nothing to track: no tensors were selected")
        self.specs = list(specs)
        self.D = layout.lay_out(self.specs)
        self.files = persist.new_files(self.specs)  # its files in the run directory, kept by .persist: none yet
        self.K = int(capacity)
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.directory = directory
        self.max_bytes = max_bytes
        self.check_finite = check_finite
        self.theta0_dtype = theta0_dtype(self.specs)
        self.steps: list[int] = []
        self.theta0: Optional[torch.Tensor] = None
        self.M: Optional[torch.Tensor] = None
        # streaming fold (None: off, the ring must hold the whole window)
        self.fold_rank = int(fold_rank) if fold_rank else None
        self.arena: Optional[torch.Tensor] = None  # [fold_rank + K, D]; M is a view of its last K rows
        self._reset_fold()
        self.run_id: Optional[str] = None  # names this window; kept across resumes, checked against trainer_state
        self.window: dict = {}  # the settings a resume must share (tcut, stride, world); set by open_window
        self.skipped_unchanged_steps: list[int] = []  # steps whose weights did not move (e.g. a skipped AMP step)
        # training: a step that did not move the weights is no progress (skipped); offline replays of saved
        # checkpoints record what they are given (two equal checkpoints are two observations)
        self.skip_unchanged = skip_unchanged
        self._last_sums: Optional[torch.Tensor] = None  # [S] float32 sums of the last recorded delta, per tensor
        # distributed runs (set by open_window): ``reduce`` sums the fold's [S, R, R] Grams over processes (sharded
        # modes: the fold then sees whole tensors, like the final solve); ``consensus`` sums a small int64 tensor
        # over processes, so every process records (or skips) the same steps and folds at the same steps
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.consensus: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.saved: dict = {}  # from load(): saved_step and the live-weight fingerprints at that step
        self.tier = layout.choose_tier(self, storage, directory=directory, max_bytes=max_bytes, prefault=prefault)
        self._scratch = None  # the snapshot's float32 chunk
        if _allocate:
            self.allocate()

    # ------------------------------------------------------------------ sizes
    @property
    def buffer_bytes(self) -> int:
        return self.rows_allocated * self.D * self.dtype.itemsize

    @property
    def rows_allocated(self) -> int:
        return self.K + (self.fold_rank or 0)

    @property
    def theta0_bytes(self) -> int:
        return self.D * self.theta0_dtype.itemsize

    # the functions of .layout, as methods (their first argument is the store)
    estimate = staticmethod(layout.estimate)
    allocate = layout.allocate
    compute_device = property(layout.compute_device)

    def release(self):
        """Free the buffer memory (:func:`.layout.release`) and the snapshot's scratch."""
        layout.release(self)
        self._scratch = None

    # --------------------------------------------------------------- theta_0
    def set_theta0(self, tensors: Iterable[torch.Tensor]):
        theta0 = torch.empty(self.D, dtype=self.theta0_dtype, device=self.device)
        if self.tier.prefault_pages:
            prefault(theta0)
        for spec, t in zip(self.specs, tensors, strict=True):
            if t.numel() != spec.local_numel:
                raise RelexInputError(f"{spec.name}: expected {spec.local_numel} elements, got {t.numel()}")
            theta0[spec.offset : spec.offset + spec.local_numel].copy_(t.reshape(-1))
        self.theta0 = theta0
        self.set_steps([])
        self._reset_fold()
        self.run_id = uuid.uuid4().hex
        persist.start_files(self)

    def theta0_of(self, spec: TensorSpec) -> torch.Tensor:
        """This process's piece of theta_0 in the recorded dtype (an fp32 master weight stays float32: the horizons
        are computed from it in float32 and cast to ``spec.dtype`` when written)."""
        return self.theta0[spec.offset : spec.offset + spec.local_numel].to(spec.record_dtype)

    # -------------------------------------------------------------- snapshot
    def set_steps(self, steps: Sequence[int], last_sums: Optional[Sequence[float]] = None):
        """The recorded steps (a new theta_0, a resume, a truncate), with the float32 sums of the last one's delta per
        tensor when known (``None``: the unchanged-step check decides on rows alone, see :meth:`_same_as_previous`)."""
        self.steps = list(steps)
        self._last_sums = torch.tensor(last_sums, dtype=torch.float32) if last_sums is not None else None

    @property
    def last_sums(self) -> Optional[torch.Tensor]:
        """``[S]`` float32 sums of the last recorded delta, per tensor (``None``: unknown); saved with the metadata."""
        return self._last_sums

    @property
    def num_rows(self) -> int:
        return len(self.steps)

    @property
    def num_ring_rows(self) -> int:
        return len(self.steps) - len(self.folded_steps)

    def _slot_for(self, step: int) -> Optional[int]:
        if step in self.folded_steps:
            return None  # already folded into the factorisation: the step is recorded
        if step in self.steps:
            return self.steps.index(step) - len(self.folded_steps)  # the same step twice is one row
        if self.steps and step < self.steps[-1]:
            raise RelexInputError(
                f"snapshot for step {step} after step {self.steps[-1]}: steps must increase (call truncate() when "
                f"training resumed from an earlier checkpoint)"
            )
        if self.num_ring_rows >= self.K and self.fold_rank:
            self.fold()
        if self.num_ring_rows >= self.K:
            raise RelexMemoryError(
                f"the trajectory buffer is full ({self.K} slots) at step {step}; raise the capacity or the stride"
            )
        return self.num_ring_rows

    @torch.no_grad()
    def snapshot(self, step: int, tensors: Iterable[torch.Tensor]):
        """Record Delta_step = theta_step - theta_0 (float32 arithmetic, stored in the buffer dtype)."""
        if self.theta0 is None:
            raise RuntimeError("set_theta0() must be called before snapshot()")
        slot = self._slot_for(step)
        if slot is None:
            return
        if self.tier.staging is not None:
            target = self.tier.staging
            if self.tier.event is not None:
                self.tier.event.synchronize()
        else:
            target = self.M[slot]
        sums = self._write_delta(target, tensors)
        bad = ~torch.isfinite(sums) if self.check_finite else torch.zeros(len(sums), dtype=torch.bool)
        new_row = slot == self.num_ring_rows
        same = self.skip_unchanged and new_row and not bool(bad.any()) and self._same_as_previous(slot, target, sums)
        any_bad, all_same = bool(bad.any()), same
        if self.consensus is not None:  # one verdict for every process: the same steps everywhere
            votes = self.consensus(torch.tensor([int(any_bad), int(not same)], dtype=torch.int64))
            any_bad, all_same = bool(votes[0] > 0), bool(votes[1] == 0)
        if any_bad:
            names = [self.specs[i].name for i in torch.nonzero(bad).flatten().tolist()]
            where = (f"in {len(names)} tensor(s): {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                     if names else "on another process")
            raise RelexNonFiniteError(
                f"non-finite weight delta at step {step} {where}; the step was not recorded (the training run diverged "
                "or overflowed)"
            )
        if self.skip_unchanged and new_row and all_same:
            self.skipped_unchanged_steps.append(int(step))
            logger.warning(
                "relex: the weights did not change at step %d (an optimizer step skipped by the loss scaler, a zero "
                "learning rate, or a zero gradient: in GRPO, a batch whose groups all had one reward); the step is not "
                "recorded (%d such step(s) so far)", step, len(self.skipped_unchanged_steps),
            )
            return
        if self.tier.staging is not None:
            self.tier.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.tier.stream):
                self.M[slot].copy_(self.tier.staging, non_blocking=True)
                self.tier.event = torch.cuda.Event()
                self.tier.event.record(self.tier.stream)
        if slot == self.num_ring_rows:
            self.steps.append(int(step))
            self._last_sums = sums
        if self.storage == "disk":
            persist.note_step(self)

    def _write_delta(self, target: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """``target[:] = theta - theta_0`` for every tracked tensor; returns each tensor's float32 delta sum (on the
        host, one sync for all tensors)."""
        # Delta in float32 through a small reusable scratch (stays in cache), one rounding into the buffer dtype
        # (measured 2.5x faster on CPU than a bfloat16 `out` or a fresh temporary per chunk). The finiteness check
        # rides on the same in-cache data: a chunk's float32 sum is NaN/Inf iff the chunk holds a NaN/Inf (or deltas
        # near 1e38, which are as broken); no second pass over the stored row.
        chunk = SNAPSHOT_CHUNK if self.theta0.device.type == "cpu" else SNAPSHOT_CHUNK_DEVICE
        if self._scratch is None or self._scratch.device != self.theta0.device:  # once: specs and chunk are fixed
            need = min(chunk, max(s.local_numel for s in self.specs))
            self._scratch = torch.empty(need, dtype=torch.float32, device=self.theta0.device)
        sums = []
        for spec, t in zip(self.specs, tensors, strict=True):
            src = t.reshape(-1)
            o, n = spec.offset, spec.local_numel
            th0 = self.theta0[o : o + n]
            acc = None
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                buf = self._scratch[: e - s]
                a = src[s:e]
                if a.dtype == torch.float32 and th0.dtype == torch.float32 and a.device == buf.device:
                    torch.sub(a, th0[s:e], out=buf)
                else:
                    buf.copy_(a)
                    buf.sub_(th0[s:e])
                cs = buf.sum()  # finiteness and the unchanged-step check ride on it
                acc = cs if acc is None else acc + cs
                target[o + s : o + e].copy_(buf)
            sums.append(acc if acc is not None else torch.zeros((), device=self.theta0.device))
        return torch.stack(sums).cpu()  # one host sync for all tensors

    def _same_as_previous(self, slot: int, row: torch.Tensor, sums: torch.Tensor) -> bool:
        """Whether the delta just computed for a new step equals the previous recorded one exactly on this process (the
        weights did not move: an optimizer step skipped by a mixed-precision loss scaler still advances
        ``global_step``; a zero gradient under Adam's first steps). The per-tensor sums decide cheaply; equal sums are
        confirmed on the whole row when the previous row is in the ring (after a fold or a resume it may not be: then
        equal sums over every tensor decide). Such a step is not recorded (when every process agrees) and is counted
        in ``skipped_unchanged_steps``."""
        prev = self._last_sums if self.steps else torch.zeros_like(sums)
        if prev is not None and not torch.equal(prev, sums):
            return False
        if not self.steps:
            return not bool(row.any())  # weights still theta_0
        if slot > 0:
            self.synchronize()
            prev_row = self.M[slot - 1]
            return torch.equal(row, prev_row if prev_row.device == row.device else prev_row.to(row.device))
        return prev is not None

    def synchronize(self):
        self.tier.synchronize()

    def rows(self) -> torch.Tensor:
        """The recorded rows, in step order: a view ``[T, D]`` (no copy). A folded store has no such matrix: use
        :meth:`solve_inputs`."""
        if self.folded_steps:
            raise RuntimeError("the trajectory was folded; use solve_inputs() instead of rows()")
        self.synchronize()
        return self.M[: len(self.steps)]

    # ------------------------------------------------------------------ fold
    def _reset_fold(self):
        self.folded_steps: list[int] = []
        self.basis_rows = 0  # rows of W in use (0 before the first fold, fold_rank after)
        self.L = torch.zeros(len(self.specs), 0, 0, dtype=torch.float64)  # [S, T_folded, basis_rows]
        self.folded_sq = torch.zeros(len(self.specs), dtype=torch.float64)  # [S] exact ||folded rows||_F^2
        self.folds = 0

    @property
    def folded(self) -> bool:
        return bool(self.folded_steps)

    def rows_in_use(self) -> torch.Tensor:
        """``B = [W^T; R]``: the basis rows in use followed by the ring rows, a contiguous view of the arena."""
        r = self.fold_rank
        return self.arena[r - self.basis_rows : r + self.num_ring_rows]

    def _ring_sq(self, G_B: torch.Tensor) -> torch.Tensor:
        b = self.basis_rows
        return torch.diagonal(G_B[:, b:, b:], dim1=1, dim2=2).sum(-1)

    @torch.no_grad()
    @exact
    def fold(self):
        """Fold every delta in the ring into the rank-``fold_rank`` factorisation and free the slots."""
        if not self.fold_rank:
            raise RuntimeError("this store was created without fold_rank")
        if not self.num_ring_rows:
            return
        self.synchronize()
        B = self.rows_in_use()
        C = left_factor(self.L, self.num_ring_rows)
        device = self.compute_device
        sigma, U, X, G_B, _ = factor_left(B, C, self.specs, self.fold_rank, reduce=self.reduce, compute_device=device)
        self.folded_sq = self.folded_sq + self._ring_sq(G_B)
        r = self.fold_rank
        out = self.arena
        if self.storage == "disk" and self.tier.file_linked():
            # a checkpoint links the mapped file: the new basis goes to a fresh file, the old one stays as linked
            old_arena = self.arena
            out = layout.move_to_fresh_file(self, copy_rows=False)
            B = old_arena[r - self.basis_rows : r + self.num_ring_rows]
        # the new basis overwrites rows of B when written in place: safe in the chunked reference and through the
        # device (kernels.staged), which compute each chunk's product in full before writing it (the Triton kernel on
        # the arena itself makes no such promise)
        offsets, numels = [s.offset for s in self.specs], [s.local_numel for s in self.specs]
        if device is not None:
            kernels.project(B, offsets, numels, X, out[:r], device=device)
        else:
            project_reference(B, offsets, numels, X, out[:r])
        persist.drop_entries(self)
        self.L = U * sigma.unsqueeze(1)  # [S, T, r]
        self.folded_steps = list(self.steps)
        self.basis_rows = r
        self.folds += 1
        if self.storage == "disk":
            persist.save_fold(self, self.directory)
            persist.write_meta(self, self.directory)

    def solve_inputs(self) -> dict:
        """Keyword arguments for :func:`relex_callback.core.solver.solve`: ``M`` and ``steps`` (plus ``left``,
        ``folded_sq`` and ``folded_steps`` for a folded store). Unfolded: exactly ``rows()`` and ``steps``."""
        if not self.folded_steps:
            return {"M": self.rows(), "steps": list(self.steps)}
        self.synchronize()
        return {"M": self.rows_in_use(), "steps": list(self.steps), "left": left_factor(self.L, self.num_ring_rows),
                "folded_sq": self.folded_sq, "folded_steps": len(self.folded_steps)}

    # ------------------------------------------------------------ persistence (see .persist)
    @property
    def storage(self) -> str:
        """The tier the arena lives on: ``device``, ``host`` or ``disk``."""
        return self.tier.kind

    # the functions of .persist, as methods (their first argument is the store, or the class for load/open)
    meta = persist.metadata
    truncate = persist.truncate
    save = persist.save
    load = classmethod(persist.load)
    open = classmethod(persist.open_saved)
    read_meta = staticmethod(persist.read_meta)
    check_compatible = staticmethod(persist.check_compatible)
    verify_live = persist.verify_live
    discard_files = persist.discard_files
