"""The rank-1 (or rank-r) solve over the whole arena in a constant number of passes.

Math (docs/math.md, "The extrapolation"): for every tracked tensor with recorded deltas ``M`` (``T x n``, rows =
steps in
order), take the top singular triplet ``(sigma, u, v)``; ``c_t = sigma*u[t] = <Delta_t, v>``; fit
``c_t = a*t + b`` on the real step numbers ``t >= fit_start``; ``theta(H) = theta_0 + (a*H + b) * v``.

Two ways to get the triplet, both a constant number of passes over the buffer:

* ``gram``: one pass builds ``G_i = M_i M_i^T`` for every segment (float32 accumulation), a batched float64
  ``eigh`` of all the small ``T x T`` matrices gives ``(sigma, u)``, one more pass gives ``v = M^T u / sigma``.
  Exact for any trajectory; supports rank r > 1; the only path for sharded (distributed) tensors, whose Grams
  are all-reduced between the two passes.
* ``power``: a Krylov (Lanczos) iteration on ``G_i = M_i M_i^T`` without ever forming ``G_i``: each step is one
  fused pass over the segment, ``w = M (M^T q)`` computed chunk by chunk while the chunk is in cache (``4 T n``
  multiply-adds instead of the Gram's ``T^2 n``; no ``n``-vector is stored). It starts from the last step
  (``q = e_T``, so the first step yields the last row's Gram column: the warm start) and does Rayleigh-Ritz on the
  small Krylov basis in float64. A near-rank-1 trajectory converges in 2-3 passes. A segment whose Ritz pair has
  not converged after ``max_iter`` passes falls back to the Gram path, so the result is the same. Then the same
  direction pass as ``gram``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from . import kernels
from . import noise as _noise
from .precision import exact
from .backtest import (
    Backtest,
    _check_fit_rows,
    _skipped,
    backtest_from_gram,
    backtest_from_projections,
    resolve_fit_rows,
)
from .fit import Fit, Selection, fit_lines
from ..params import TensorSpec

# A component whose singular value is below this fraction of the largest one in its tensor carries no signal
# (round-off): its direction is set to zero instead of dividing by ~0.
REL_SIGMA_FLOOR = 1e-10


@dataclass
class Solution:
    """Everything the writer, the state file and the report need. Per-tensor arrays are float64, indexed like
    ``specs``; ``V`` holds the directions ``[r, D]`` (buffer dtype) in the arena layout."""

    specs: list[TensorSpec]
    steps: list[int]
    fit_start: Optional[int]
    rank: int
    sigma: torch.Tensor  # [S, r]
    coeffs: torch.Tensor  # [S, r, T]   c_t = sigma * u[t]
    slope: torch.Tensor  # [S, r]
    intercept: torch.Tensor  # [S, r]
    r2: torch.Tensor  # [S, r]
    total: torch.Tensor  # [S]   ||M||_F^2 = trace(G)
    last_sq: torch.Tensor  # [S]   ||Delta_tcut||^2
    V: Optional[torch.Tensor] = None  # [r, D]
    method: str = "gram"
    seconds: dict = field(default_factory=dict)
    fallbacks: int = 0
    bytes_read: int = 0  # bytes of the buffer read by the solve (passes x segment bytes)
    backtest: Optional[Backtest] = None  # the in-window backtest (``SolveOptions(backtest=...)``), else None
    curve: Optional[Fit] = None  # the fitted coefficient curves when not the plain line (``SolveOptions(fit=...)``)
    selection: Optional[Selection] = None  # fit="auto": every family's backtest score and the choice
    noise: Any = None  # relex_callback.core.noise.DriftShare, or the reason it was not computed (str)
    clock: Any = None  # relex_callback.core.clock.Clock: fitted against the lr clock; None: against the step

    @property
    def explained(self) -> torch.Tensor:
        """sigma1^2 / ||M||_F^2 per tensor (1.0 for a tensor that never moved)."""
        tot = self.total
        return torch.where(tot > 0, self.sigma[:, 0] ** 2 / tot.clamp_min(1e-300), torch.ones_like(tot)).clamp(0.0, 1.0)

    @property
    def explained_rank(self) -> torch.Tensor:
        tot = self.total
        return torch.where(tot > 0, (self.sigma**2).sum(1) / tot.clamp_min(1e-300), torch.ones_like(tot)).clamp(
            0.0, 1.0
        )

    @property
    def delta_norm(self) -> torch.Tensor:
        return self.last_sq.clamp_min(0).sqrt()

    def coef_at(self, horizon: float) -> torch.Tensor:
        """The fitted coefficient at step ``horizon`` per tensor and component: ``[S, r]`` float64 (``a*H + b`` for
        the line). With an lr clock the horizon is placed at ``clock.at(horizon)``."""
        if self.clock is not None:
            horizon = self.clock.at(horizon)
        if self.curve is not None:
            return self.curve.coef_at(horizon)
        return self.slope * float(horizon) + self.intercept

    @property
    def fit_family(self) -> str:
        return self.curve.family if self.curve is not None else "linear"

    def direction(self, i: int) -> torch.Tensor:
        s = self.specs[i]
        return self.V[:, s.offset : s.offset + s.local_numel]

    @torch.no_grad()
    def extrapolate(self, i: int, horizon: float, theta0: torch.Tensor) -> torch.Tensor:
        """This rank's piece of tensor ``i`` at step ``horizon``: ``theta0 + sum_k (a_k H + b_k) v_k`` computed in
        float32 and cast to the tensor's dtype. ``theta0`` is the flat local piece."""
        return extrapolate_piece(theta0, self.coef_at(horizon)[i], self.direction(i), self.specs[i].dtype)


@torch.no_grad()
def extrapolate_piece(theta0: torch.Tensor, coefs: torch.Tensor, V: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``theta0 + sum_k coefs[k] * V[k]`` in float32 (the directions are added in their stored dtype, widened inside
    the add), cast to ``dtype``. Shared by :class:`Solution` and the state file. A float32 theta0 and the first
    direction go through one ``torch.add`` (one pass, no copy of theta0 first: the same float32 ``a + c b`` per
    element, so the same bits as the copy and ``add_`` it replaces); a theta0 in another dtype is widened first."""
    theta = theta0.reshape(-1)
    out = None
    for k in range(V.shape[0]):
        c = float(coefs[k])
        if c == 0.0:
            continue
        v = V[k].to(theta.device)
        if out is None and theta.dtype == torch.float32 and v.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.add(theta, v, alpha=c)
            continue
        if out is None:
            out = theta.to(torch.float32, copy=True)
        out.add_(v, alpha=c)
    if out is None:  # every coefficient zero: theta_0 itself
        out = theta.to(torch.float32, copy=True)
    return out.to(dtype)


# Below this many recorded steps the CPU Gram (T^2 n multiply-adds, GEMM-efficient) beats the Krylov passes
# (4 T n multiply-adds each, GEMV-bound): bench/extrapolate.py, 20 checkpoints of 76.6M parameters on the 2-core
# machine: gram 2.4 s vs power 4.2 s; bench/solver.py at T=75: power 0.48 s vs gram 0.84 s.
CPU_GRAM_MAX_STEPS = 32


# The power path's fit-part iteration (the backtest) stops at this multiple of ``tol``: at the solve's own ``tol`` it
# needed ~0.8 more buffer passes than the main iteration on noisy trajectories (bench/solver.py, noise 0.3: 4.00 vs
# 3.19 passes), at 10x it needs none more, and its figures move by < 1e-6 while they differ from the Gram path's by
# 1e-6 - 5e-5 anyway (the Gram's float32 accumulation of bf16 rows).
BACKTEST_TOL_FACTOR = 10.0


def default_method(device: torch.device, rank: int, distributed: bool, steps: int = 75) -> str:
    """The dispatch table, from ``bench/solver.py`` measurements (docs/architecture.md, "Solver figures").

    * CPU, rank 1: ``power``. On 2 cores, T=75, 8M bf16 elements, a fused Krylov pass costs ~0.14 s (about two
      plain copies of the buffer) while the Gram pass costs 0.72-1.0 s (compute-bound: T^2 n multiply-adds).
      Near-rank-1 trajectories converge in 3 passes (end of window 0.51 s vs 0.99 s for ``gram``); noisier ones
      (explained variance ~0.5) need ~5 passes and tie with ``gram``; flat spectra fall back to ``gram`` after
      ``max_iter`` passes (worst case ~2x ``gram``). RLVR trajectories are the first kind.
    * CPU with at most ``CPU_GRAM_MAX_STEPS`` recorded steps: ``gram`` (at small T its T^2 n is below the Krylov
      passes' cost).
    * CUDA: ``gram`` (one Triton launch over all segments reads the buffer once; no iteration beats one read).
    * rank > 1 or distributed (sharded tensors whose Grams are all-reduced): ``gram``.
    """
    if rank > 1 or distributed or device.type == "cuda" or steps <= CPU_GRAM_MAX_STEPS:
        return "gram"
    return "power"


def _fit_steps(steps, fit_start):
    """The real step numbers (float64) and the mask of those that enter the line fit (at least two)."""
    if len(steps) < 2:
        raise ValueError("at least two recorded steps are needed")
    steps_t = torch.tensor(list(steps), dtype=torch.float64)
    mask = steps_t >= (fit_start if fit_start is not None else -math.inf)
    if int(mask.sum()) < 2:
        raise ValueError(f"fit_start={fit_start} leaves fewer than 2 steps to fit")
    return steps_t, mask


def _top_eigenpairs(G: torch.Tensor, rank: int):
    """Top ``rank`` eigenpairs of each symmetric ``G[i]`` (float64): ``(lam [S, r], U [S, T, r])``, descending."""
    lam, vec = torch.linalg.eigh(G)
    lam = lam.flip(-1)[:, :rank].clamp_min(0.0)
    U = vec.flip(-1)[:, :, :rank]
    return lam, U


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Make each component's coefficient at the last step non-negative (so slopes read naturally)."""
    last = U[:, -1, :]
    pivot = torch.where(last.abs() > 1e-12, last, U.gather(1, U.abs().argmax(1, keepdim=True)).squeeze(1))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    return U * sign.unsqueeze(1)


@dataclass(frozen=True)
class SolveOptions:
    """What :func:`solve` computes, as one object (the pipeline builds it from the window's settings).

    Args:
        rank (`int`, *optional*, defaults to `1`): number of components per tensor.
        fit_start (`int`, *optional*): fit the lines on steps ``>= fit_start`` only.
        method (`str`, *optional*, defaults to `"auto"`): ``"gram"``, ``"power"`` or ``"auto"`` (see
            :func:`default_method`). ``power`` falls back to ``gram`` for ``rank > 1`` and with ``reduce``.
        out_dtype (`torch.dtype`, *optional*): dtype of the direction arena ``V`` (default: the buffer dtype).
        max_iter (`int`, *optional*, defaults to `6`): passes over a segment before ``power`` gives it to ``gram``.
        tol (`float`, *optional*, defaults to `1e-6`): ``power`` accepts a Ritz pair when its residual is below
            ``tol`` times both the Ritz value and the gap to the next one (eigenvector error ~ ``tol``).
        backtest (`bool`, `int` or `float`, *optional*): run the in-window backtest
            (:mod:`relex_callback.core.backtest`) with this fit part: ``True`` for the steps ``<= last step / 2``, a
            float in ``(0, 1)`` for a fraction of
            the last step, an int for a step number. ``None`` (default): no backtest. The result is
            ``Solution.backtest`` (with a ``reason`` instead of figures when the window is too short). The Gram paths
            take it from the Gram they already have; ``power`` runs a second Krylov iteration on the fit part in the
            same passes over the buffer (more arithmetic per pass, no extra read while both iterations converge
            together). Always on the rank-1 component.
        fit / fit_window / degree (*optional*): the coefficient curve (:func:`fit_curves`; the settings of the same
            names).
        per_tensor_fit (`bool`, *optional*, defaults to `False`): ``fit="auto"`` chooses the family per tensor.
        clock (`Clock`, *optional*): fit against ``clock.at(step)`` (:mod:`relex_callback.core.clock`, the lr clock)
            instead of the step; ``None``: the step (the paper's axis).
    """

    rank: int = 1
    fit_start: Optional[int] = None
    method: str = "auto"
    out_dtype: Optional[torch.dtype] = None
    max_iter: int = 6
    tol: float = 1e-6
    backtest: Any = None
    fit: str = "linear"
    fit_window: Optional[int] = None
    degree: int = 2
    per_tensor_fit: bool = False
    clock: Any = None


@dataclass
class _Run:
    """One solve's arena, options and bookkeeping, handed to the Gram or the power path."""

    M: torch.Tensor
    steps: Sequence[int]
    specs: Sequence[TensorSpec]
    options: SolveOptions
    left: Optional[torch.Tensor]
    folded_sq: Optional[torch.Tensor]
    folded_steps: int
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]
    compute_device: Any
    names: list
    backtest: Any  # the backtest's fit part, resolved (fit="auto" turns it on)
    bt: Any  # the backtest's result when it was skipped, else filled by the path
    bt_rows: Optional[int]
    seg_bytes: int
    secs: dict
    t0: float


@torch.no_grad()
@exact
def solve(
    M: torch.Tensor,
    steps: Sequence[int],
    specs: Sequence[TensorSpec],
    options: SolveOptions = SolveOptions(),
    *,
    left: Optional[torch.Tensor] = None,
    folded_sq: Optional[torch.Tensor] = None,
    folded_steps: int = 0,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    compute_device=None,
) -> Solution:
    """Solve every segment of ``M`` (``[T, D]``, rows in step order).

    Args:
        M (`torch.Tensor`): the arena ``[T, D]`` (rows in step order; any float dtype).
        steps (`Sequence[int]`): the step number of each row.
        specs (`Sequence[TensorSpec]`): the segments (``offset``, ``local_numel``).
        options (`SolveOptions`, *optional*): what to compute: rank, fit start, method, backtest, fit, clock.
        left (`torch.Tensor`, *optional*): a folded store's left factors (``TrajectoryStore.solve_inputs``):
            ``[S, T, R]`` float64 with the trajectory of segment ``i`` equal to ``left[i] @ M_i`` (``M`` then has
            ``R`` rows: the folded basis and the remaining deltas). ``None`` (no fold) is the plain path.
        folded_sq (`torch.Tensor`, *optional*): with ``left``, the exact squared Frobenius norm per segment of the
            first ``folded_steps`` steps (the factorisation alone would understate it); the report's total adds the
            later steps' squared norms from the Gram diagonal, so the remaining deltas are not read again.
        folded_steps (`int`, *optional*, defaults to `0`): how many leading steps ``folded_sq`` covers.
        reduce (`Callable`, *optional*): applied to the stacked Gram matrices (``[S, T, T]`` float64) before the
            eigen-decomposition; the distributed path passes an all-reduce here (one collective for all tensors).
        compute_device (`torch.device`, *optional*): run the passes over ``M`` there when ``M`` is elsewhere (a host
            or disk arena while training runs on a GPU: :mod:`relex_callback.core.kernels.staged`); the Gram method
            then (two passes, each block copied once).
    """
    o = options
    rank, fit_start, clock = o.rank, o.fit_start, o.clock
    T, D = M.shape
    offsets = [s.offset for s in specs]
    numels = [s.local_numel for s in specs]
    S = len(specs)
    method = _solve_method(M, steps, left, o.method, rank, reduce)
    if kernels.staged.through(M, compute_device) is not None and method == "power":
        method = "gram"  # the power path reads the arena once per iteration: through the device, two passes are less
    steps_t, mask = _fit_steps(steps, fit_start)
    x_t = clock.at_steps(steps) if clock is not None else steps_t
    names = [sp.name for sp in specs]
    backtest, bt, bt_rows = _backtest_rows(steps, names, o.fit, o.backtest)
    V = torch.zeros(rank, D, dtype=o.out_dtype or M.dtype, device=M.device)
    seg_bytes = T * sum(numels) * M.element_size()
    secs = {}
    t0 = time.perf_counter()
    fallbacks = 0
    run = _Run(M=M, steps=steps, specs=specs, options=o, left=left, folded_sq=folded_sq, folded_steps=folded_steps,
               reduce=reduce, compute_device=compute_device, names=names, backtest=backtest, bt=bt, bt_rows=bt_rows,
               seg_bytes=seg_bytes, secs=secs, t0=t0)
    if method != "power":
        sigma, U, X, total, last_sq, bt, passes, noise_in = _solve_gram(run)
    else:
        sigma, U, X, total, last_sq, bt, passes, fallbacks, noise_in = _solve_power(run, offsets, numels)
    t2 = time.perf_counter()
    kernels.project(M, offsets, numels, X, V, device=compute_device)
    secs["direction"] = time.perf_counter() - t2
    passes += float(S > 0)
    coeffs = (U * sigma.unsqueeze(1)).transpose(1, 2)  # [S, r, T]
    slope, intercept, r2 = fit_lines(coeffs, x_t, mask)
    if not isinstance(noise_in, str):
        noise_in = _noise.safe(_noise.from_gram_parts, *noise_in, steps, coeffs=coeffs[:, 0, :], names=names)
    curve, selection = fit_curves(coeffs, x_t, mask, bt, fit=o.fit, fit_window=o.fit_window, degree=o.degree,
                                  per_tensor=o.per_tensor_fit)
    secs["total"] = time.perf_counter() - t0
    return Solution(
        specs=list(specs), steps=[int(s) for s in steps], fit_start=fit_start, rank=rank, sigma=sigma, coeffs=coeffs,
        slope=slope, intercept=intercept, r2=r2, total=total, last_sq=last_sq, V=V, method=method, seconds=secs,
        fallbacks=fallbacks, bytes_read=int(round(passes * seg_bytes)), backtest=bt, curve=curve, selection=selection,
        noise=noise_in, clock=clock,
    )


def _solve_method(M, steps, left, method, rank, reduce):
    """Check the arena against the steps (or the left factors) and resolve the method solve uses."""
    T = M.shape[0]
    if left is not None:
        if left.shape[1] != len(steps) or left.shape[2] != T:
            raise ValueError(f"left factors {tuple(left.shape)} do not match {len(steps)} steps and {T} rows")
        method = "gram-folded"  # the Gram path through the left factors
    else:
        if T != len(steps):
            raise ValueError(f"{T} rows but {len(steps)} steps")
        if method == "auto":
            method = default_method(M.device, rank, reduce is not None, T)
        if method not in ("gram", "power"):
            raise ValueError(f"unknown method {method!r}")
        if method == "power" and (rank > 1 or reduce is not None):
            method = "gram"
    return method


def _backtest_rows(steps, names, fit, backtest):
    """Resolve the backtest's fit rows; return (backtest, skipped result or None, fit rows or None)."""
    if fit == "auto" and (backtest is None or backtest is False):
        backtest = True  # the family is chosen by the backtest
    bt = None
    bt_rows = None
    if backtest is not None and backtest is not False:
        bt_rows = resolve_fit_rows(steps, backtest)
        reason = _check_fit_rows(steps, bt_rows)
        if reason:
            bt, bt_rows = _skipped(names, list(steps), bt_rows, reason), None
    return backtest, bt, bt_rows


def _solve_gram(r: _Run):
    """The Gram paths (plain or folded): directions, norms, the drift share's inputs and backtest from the Gram
    matrices."""
    M, steps, specs, left, reduce, names, secs, t0 = r.M, r.steps, r.specs, r.left, r.reduce, r.names, r.secs, r.t0
    rank, fit_start, clock = r.options.rank, r.options.fit_start, r.options.clock
    folded_sq, folded_steps, backtest, bt, bt_rows = r.folded_sq, r.folded_steps, r.backtest, r.bt, r.bt_rows
    S = len(specs)
    sigma, U, X, _, G = factor_left(M, left, specs, rank, reduce=reduce, compute_device=r.compute_device)
    row_sq = torch.diagonal(G, dim1=1, dim2=2)
    if folded_sq is None:
        total = row_sq.sum(-1).clamp_min(0)
    else:
        total = folded_sq.double() + row_sq[:, folded_steps:].sum(-1).clamp_min(0)
    last_sq = G[:, -1, -1].clamp_min(0)
    secs["gram"] = time.perf_counter() - t0
    if left is None:
        noise_in = (torch.diagonal(G, dim1=1, dim2=2), torch.diagonal(G, offset=-1, dim1=1, dim2=2), G[:, :, -1])
    else:
        noise_in = "not computed on a folded window (its folded steps keep only rank r, which hides the noise)"
    if bt_rows is not None:
        t1 = time.perf_counter()
        bt = backtest_from_gram(G, steps, backtest, fit_start=fit_start, names=names, lam=sigma[:, 0] ** 2,
                                u=U[:, :, 0], clock=clock)
        secs["backtest"] = time.perf_counter() - t1
    passes = float(S > 0)
    return sigma, U, X, total, last_sq, bt, passes, noise_in


def _solve_power(r: _Run, offsets, numels):
    """The power path: Krylov eigenpairs per segment, the Gram fallback for the unconverged, the backtest."""
    M, steps, names, seg_bytes, secs, t0 = r.M, r.steps, r.names, r.seg_bytes, r.secs, r.t0
    bt, bt_rows = r.bt, r.bt_rows
    o = r.options
    rank, max_iter, tol, fit_start, clock = o.rank, o.max_iter, o.tol, o.fit_start, o.clock
    T = M.shape[0]
    p = bt_rows if bt_rows is not None else 0
    lam, U, diag, todo, passes, bt_in, noise_in = _power_eigs(M, offsets, numels, max_iter=max_iter, tol=tol,
                                                              fit_rows=p, fit_tol=BACKTEST_TOL_FACTOR * tol)
    total, last_sq = diag.sum(-1), diag[:, -1]
    fallbacks = len(todo)
    need = sorted(set(todo) | set(bt_in[3] if bt_in else ()))
    if need:
        sub_o = [offsets[i] for i in need]
        sub_n = [numels[i] for i in need]
        G_f = kernels.gram(M, sub_o, sub_n).double().cpu()
        idx = torch.tensor(need)
        if todo:
            sel = [need.index(i) for i in todo]
            lam_f, U_f = _top_eigenpairs(G_f[sel], 1)
            lam[torch.tensor(todo)] = lam_f
            U[torch.tensor(todo)] = U_f  # total and last_sq came with the first Krylov pass
        if bt_in:  # the backtest's inputs of these segments from their Gram (the same figures)
            lam_P, u_P, g_P, _ = bt_in
            lp, up = _top_eigenpairs(G_f[:, :p, :p], 1)
            lam_P[idx], u_P[idx] = lp[:, 0], up[:, :, 0]
            g_P[idx] = (G_f[:, :, :p] @ up)[:, :, 0]
        passes += T * sum(sub_n) * M.element_size() / max(seg_bytes, 1)
    sigma, U, X = _directions(lam, U, rank)
    secs["power"] = time.perf_counter() - t0
    if bt_in:
        t1 = time.perf_counter()
        bt = backtest_from_projections(bt_in[0], bt_in[1], bt_in[2], diag, sigma[:, 0] ** 2, U[:, :, 0], steps,
                                       fit_start=fit_start, names=names, clock=clock)
        secs["backtest"] = time.perf_counter() - t1
    return sigma, U, X, total, last_sq, bt, passes, fallbacks, noise_in


def fit_curves(coeffs, steps_t, mask, bt, *, fit: str = "linear", fit_window: Optional[int] = None, degree: int = 2,
               per_tensor: bool = False):
    """The coefficient curves other than the plain line over every fitted step: ``(curve, selection)``, both
    ``None`` for it. ``fit="auto"``: each family of :data:`relex_callback.core.fit.AUTO_FAMILIES` is fitted on the
    backtest's first part and scored by how well it predicts the later recorded deltas (from the Gram:
    ``bt.projection``, ``bt.row_sq``); the winner (global, or per tensor) is refitted on the whole window. A window too
    short for the backtest keeps the line (the selection says why in the report)."""
    from .fit import fit as fit_family, select_family

    if fit == "linear" and fit_window is None:
        return None, None
    if fit != "auto":
        return fit_family(coeffs, steps_t, mask, fit, degree, fit_window), None
    if bt is None or bt.reason is not None or bt.projection is None:
        why = bt.reason if bt is not None and bt.reason else "no backtest"
        lines = fit_family(coeffs, steps_t, mask, "linear", degree, fit_window) if fit_window is not None else None
        return lines, _NoSelection(why)
    T = len(steps_t)
    p = len(bt.fit_steps)
    part = torch.zeros(T, dtype=torch.bool)
    part[:p] = True
    if int((part & mask).sum()) >= 3:
        part = part & mask
    sel = select_family(bt.projection, bt.row_sq, steps_t, part, ~torch.cat([torch.ones(p, dtype=torch.bool),
                        torch.zeros(T - p, dtype=torch.bool)]), per_tensor=per_tensor, degree=degree,
                        fit_window=fit_window)
    return sel.refit(coeffs, steps_t, mask, degree, fit_window), sel


@dataclass
class _NoSelection:
    """fit="auto" on a window the backtest could not use: the line is kept, the report says why."""

    reason: str

    def to_json(self) -> dict:
        return {"choice": "linear", "reason": f"fit='auto' kept the line: {self.reason}"}


def _directions(lam: torch.Tensor, U: torch.Tensor, rank: int, C: Optional[torch.Tensor] = None):
    """From the top eigenpairs of the trajectory Grams to ``(sigma [S, r], U [S, T, r], X [S, R, r] float32)``:
    signs fixed, components padded with zeros up to ``rank`` (fewer steps than components), round-off components
    (below ``REL_SIGMA_FLOOR``) zeroed, and the weights ``X = C^T u / sigma`` (``u / sigma`` without ``C``) with
    which the direction pass gives ``v = M_i^T X_i``."""
    U = _fix_signs(U)
    if lam.shape[1] < rank:  # fewer steps than components so far (an early fold with few slots): pad with zeros
        pad = rank - lam.shape[1]
        lam = torch.nn.functional.pad(lam, (0, pad))
        U = torch.nn.functional.pad(U, (0, pad))
    sigma = lam.sqrt()
    keep = sigma > (REL_SIGMA_FLOOR * sigma[:, :1]).clamp_min(1e-300)
    scale = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), 0.0)
    Us = U * scale.unsqueeze(1)
    X = (Us if C is None else C.transpose(1, 2) @ Us).float()
    return sigma * keep, U, X


def _fused_gram_matvecs(M: torch.Tensor, o: int, n: int, tasks, rowsq: Optional[torch.Tensor], tmp, y,
                        rowsub: Optional[torch.Tensor] = None):
    """Several ``M_i[:k_out] (M_i[:k_in]^T q)`` for one segment in one pass over it (float32 chunks, each used by every
    task while in cache); with ``rowsq`` also the squared row norms (float64). ``tasks`` is a list of
    ``(q [k_in] float32, k_in, k_out)`` on ``M``'s device (the rows are leading rows). Returns a float64 ``[k_out]``
    per task (on the CPU). With ``rowsub`` also the products of consecutive rows ``M[j] . M[j-1]`` (the Gram's first
    sub-diagonal, for :mod:`relex_callback.core.noise`)."""
    ws = [torch.zeros(k_out, dtype=torch.float32, device=M.device) for _, _, k_out in tasks]
    for s, e, c in kernels.reference._float32_chunks(M, o, n, y.shape[0], tmp):
        yy = y[: e - s]
        for (q, k_in, k_out), w in zip(tasks, ws):
            torch.mv(c[:k_in].T, q, out=yy)
            w.addmv_(c[:k_out], yy)
        if rowsq is not None:
            rowsq += torch.linalg.vector_norm(c, dim=1).double().square()
        if rowsub is not None:
            rowsub += (c[1:] * c[:-1]).sum(1, dtype=torch.float64)
    return [w.double().cpu() for w in ws]


class _Lanczos:
    """Lanczos on a ``k x k`` symmetric PSD operator given by its products (full re-orthogonalisation, float64),
    started from ``e_k`` (the last row: the warm start). :meth:`step` takes ``w = G q`` for :meth:`q` and says whether
    the top Ritz pair converged (``True``), the iteration gave up (``False``: a flat spectrum or ``max_iter`` reached;
    the caller falls back to the Gram) or needs another product (``None``). On convergence ``lam``, ``u`` and the Ritz
    coefficients ``y`` (``u = Q y``) are set."""

    def __init__(self, k: int, max_iter: int, tol: float):
        self.Q = torch.zeros(k, max_iter + 1, dtype=torch.float64)
        self.H = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
        self.Q[-1, 0] = 1.0
        self.j = 0
        self.max_iter = max_iter
        self.tol = tol
        self.prev_err = math.inf
        self.lam = 0.0
        self.u = None
        self.y = None

    def q(self) -> torch.Tensor:
        return self.Q[:, self.j]

    def step(self, w: torch.Tensor) -> Optional[bool]:
        j, tol = self.j, self.tol
        Qj = self.Q[:, : j + 1]
        h = Qj.T @ w
        w = w - Qj @ h
        h2 = Qj.T @ w  # second Gram-Schmidt sweep: orthogonality to round-off
        w = w - Qj @ h2
        self.H[: j + 1, j] = h + h2
        beta = float(w.norm())
        self.H[j + 1, j] = beta
        Hj = self.H[: j + 1, : j + 1]
        theta, Y = torch.linalg.eigh(0.5 * (Hj + Hj.T))
        th1 = float(theta[-1])
        gap = th1 - (float(theta[-2]) if j > 0 else 0.0)
        res = beta * abs(float(Y[-1, -1]))
        if th1 > 0 and (beta <= 1e-12 * th1 or (j > 0 and res <= tol * th1 and res <= tol * gap)):
            self.lam, self.y = th1, Y[:, -1]
            self.u = Qj @ self.y
            return True
        if beta <= 1e-300:
            return False  # invariant subspace without a positive Ritz value: let the Gram path decide
        # Give up early when the observed convergence rate cannot reach tol within max_iter passes (a flat
        # spectrum): every further pass would be wasted before the Gram fallback.
        err = res / max(min(th1, gap), 1e-300) if th1 > 0 else math.inf
        if j >= 2 and math.isfinite(err) and self.prev_err > 0:
            rate = err / self.prev_err
            if rate >= 1.0 or (j + 1) + math.log(err / tol) / -math.log(rate) > self.max_iter:
                return False
        self.prev_err = err
        self.Q[:, j + 1] = w / beta
        self.j += 1
        return None if self.j < self.max_iter else False


def _power_eigs(M: torch.Tensor, offsets, numels, *, max_iter: int, tol: float, fit_rows: int = 0,
                fit_tol: Optional[float] = None):
    """Top eigenpair of every ``G_i = M_i M_i^T`` by Lanczos without forming ``G_i``.

    Returns ``(lam [S,1], U [S,T,1], diag [S,T], todo, passes, bt, noise_in)``: ``diag`` is the Gram diagonal
    (squared row
    norms, from the first pass), ``todo`` lists the segments that did not converge (their entries are left for the
    Gram fallback) and ``passes`` counts reads of the whole buffer.

    With ``fit_rows = p > 0`` (the backtest), a second Lanczos runs on ``G_i[P, P]`` (``P`` = the first ``p`` rows)
    in the same passes over the buffer (tolerance ``fit_tol``, default ``tol``), each of its products taken over all
    ``T`` rows,
    ``M_i (M_{i,P}^T q)``, so that the converged Ritz vector ``u_P = Q y`` also gives ``G_i[:, P] u_P = W y`` with no
    further pass. ``bt`` is then ``(lam_P [S], u_P [S, p], g_P [S, T], bt_todo)`` (``bt_todo``: segments whose
    ``P`` iteration did not converge; the caller takes them from the Gram), else ``None``. ``noise_in`` is
    ``(diag, sub [S,T-1], last [S,T])``: the Gram entries :func:`relex_callback.core.noise.from_gram_parts` reads, from
    the first pass (the sub-diagonal is one more product of each chunk while it is in cache)."""
    T = M.shape[0]
    S = len(offsets)
    p = int(fit_rows)
    chunk = kernels.reference.CHUNK
    lam = torch.zeros(S, 1, dtype=torch.float64)
    U = torch.zeros(S, T, 1, dtype=torch.float64)
    U[:, -1, 0] = 1.0
    diag = torch.zeros(S, T, dtype=torch.float64)
    sub = torch.zeros(S, max(T - 1, 0), dtype=torch.float64)  # G[j, j-1] and G[:, -1]: the drift share's inputs
    last = torch.zeros(S, T, dtype=torch.float64)
    lam_P = torch.zeros(S, dtype=torch.float64)
    u_P = torch.zeros(S, max(p, 0), dtype=torch.float64)
    g_P = torch.zeros(S, T, dtype=torch.float64)
    todo, bt_todo = [], []
    tmp = kernels.reference.float32_scratch(M, chunk)
    y = torch.empty(chunk, dtype=torch.float32, device=M.device)
    read = 0
    dev = dict(device=M.device, dtype=torch.float32)
    for i, (o, n) in enumerate(zip(offsets, numels)):
        main = _Lanczos(T, max_iter, tol)
        back = _Lanczos(p, max_iter, fit_tol or tol) if p > 0 else None
        W = torch.zeros(T, max_iter + 1, dtype=torch.float64) if back else None
        main_on, back_on = True, back is not None
        rowsq = torch.zeros(T, dtype=torch.float64, device=M.device)
        rowsub = torch.zeros(max(T - 1, 0), dtype=torch.float64, device=M.device)
        j = 0
        while main_on or back_on:
            tasks = [(main.q().to(**dev), T, T)] if main_on else []
            if back_on:
                tasks.append((back.q().to(**dev), p, T))
            ws = _fused_gram_matvecs(M, o, n, tasks, rowsq if j == 0 else None, tmp, y, rowsub if j == 0 else None)
            read += n
            if j == 0:
                diag[i] = rowsq.cpu()
                sub[i] = rowsub.cpu()
                last[i] = ws[0]  # the first product is G e_T (Lanczos starts from the last row)
                if diag[i].sum() == 0:
                    break  # the segment never moved: lam = 0, any u (the direction pass gives v = 0)
                if back_on and diag[i, :p].sum() == 0:
                    back_on = False  # nothing moved in P: lam_P = 0, g_P = 0 (nothing is predicted)
            if main_on:
                w = ws.pop(0)
                r = main.step(w)
                if r is not None:
                    main_on = False
                    if r:
                        lam[i, 0], U[i, :, 0] = main.lam, main.u
                    else:
                        todo.append(i)
            if back_on:
                w = ws.pop(0)
                W[:, back.j] = w
                r = back.step(w[:p])
                if r is not None:
                    back_on = False
                    if r:
                        lam_P[i], u_P[i] = back.lam, back.u
                        g_P[i] = W[:, : back.y.shape[0]] @ back.y
                    else:
                        bt_todo.append(i)
            j += 1
    passes = read * T / max(1, T * sum(numels)) if S else 0.0
    return lam, U, diag, todo, passes, ((lam_P, u_P, g_P, bt_todo) if p > 0 else None), (diag, sub, last)


@torch.no_grad()
@exact
def factor_left(M: torch.Tensor, left: Optional[torch.Tensor], specs: Sequence[TensorSpec], rank: int, reduce=None,
                compute_device=None):
    """Top ``rank`` singular triplets of ``A_i = left[i] @ M_i`` for every segment without forming ``A``: the Gram
    ``A_i A_i^T = left[i] (M_i M_i^T) left[i]^T`` from one pass over ``M``, a float64 ``eigh``, and the weights
    ``X_i = left[i]^T u / sigma`` [S, R, r] with which one more pass gives ``v = M_i^T X_i``. ``left=None`` is the
    identity (the plain, unfolded trajectory ``A_i = M_i``). ``compute_device``: as in :func:`solve`.

    Returns ``(sigma [S, r], U [S, T, r], X [S, R, r] float32, G_M [S, R, R] float64, G [S, T, T] float64)``."""
    failed = None
    try:
        G_M = kernels.gram(M, [s.offset for s in specs], [s.local_numel for s in specs], device=compute_device)
    except Exception as e:  # an OOM, a CUDA error on this process: the others must not wait for it in the reduce
        if reduce is None:
            raise
        failed, G_M = e, None
    if reduce is not None:
        G_M = reduce(G_M)  # None tells every process that this one failed: each raises instead of waiting
        if failed is not None:
            raise failed
    G_M = G_M.double().cpu()
    if left is None:
        C, G = None, G_M
    else:
        C = left.double().cpu()
        G = C @ G_M @ C.transpose(1, 2)
        G = 0.5 * (G + G.transpose(1, 2))
    lam, U = _top_eigenpairs(G, rank)
    sigma, U, X = _directions(lam, U, rank, C)
    return sigma, U, X, G_M, G
