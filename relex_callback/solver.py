"""The rank-1 (or rank-r) solve over the whole arena in a constant number of passes.

Math (DESIGN.md, "The math"): for every tracked tensor with recorded deltas ``M`` (``T x n``, rows = steps in
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
from typing import Callable, Optional, Sequence

import torch

from . import kernels
from .fit import fit_lines
from .params import TensorSpec

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

    @property
    def explained(self) -> torch.Tensor:
        """sigma1^2 / ||M||_F^2 per tensor (1.0 for a tensor that never moved)."""
        tot = self.total
        return torch.where(tot > 0, self.sigma[:, 0] ** 2 / tot.clamp_min(1e-300), torch.ones_like(tot)).clamp(0.0, 1.0)

    @property
    def explained_rank(self) -> torch.Tensor:
        tot = self.total
        return torch.where(tot > 0, (self.sigma**2).sum(1) / tot.clamp_min(1e-300), torch.ones_like(tot)).clamp(0.0, 1.0)

    @property
    def delta_norm(self) -> torch.Tensor:
        return self.last_sq.clamp_min(0).sqrt()

    def coef_at(self, horizon: float) -> torch.Tensor:
        """``a*H + b`` per tensor and component: ``[S, r]`` float64."""
        return self.slope * float(horizon) + self.intercept

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
    """``theta0 + sum_k coefs[k] * V[k]`` in float32 (one float32 copy of theta0; the directions are added in their
    stored dtype, widened inside the add), cast to ``dtype``. Shared by :class:`Solution` and the state file."""
    out = theta0.reshape(-1).to(torch.float32, copy=True)
    for k in range(V.shape[0]):
        c = float(coefs[k])
        if c != 0.0:
            out.add_(V[k].to(out.device), alpha=c)
    return out.to(dtype)


# Below this many recorded steps the CPU Gram (T^2 n multiply-adds, GEMM-efficient) beats the Krylov passes
# (4 T n multiply-adds each, GEMV-bound): bench/extrapolate.py, 20 checkpoints of 76.6M parameters on the 2-core
# machine: gram 2.4 s vs power 4.2 s; bench/solver.py at T=75: power 0.48 s vs gram 0.84 s.
CPU_GRAM_MAX_STEPS = 32


def default_method(device: torch.device, rank: int, distributed: bool, steps: int = 75) -> str:
    """The dispatch table, from ``bench/solver.py`` measurements (README, "Solver figures").

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


@torch.no_grad()
def solve(
    M: torch.Tensor,
    steps: Sequence[int],
    specs: Sequence[TensorSpec],
    *,
    rank: int = 1,
    fit_start: Optional[int] = None,
    method: str = "auto",
    out_dtype: Optional[torch.dtype] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    max_iter: int = 6,
    tol: float = 1e-6,
    left: Optional[torch.Tensor] = None,
    folded_sq: Optional[torch.Tensor] = None,
    folded_steps: int = 0,
) -> Solution:
    """Solve every segment of ``M`` (``[T, D]``, rows in step order).

    Args:
        M (`torch.Tensor`): the arena ``[T, D]`` (rows in step order; any float dtype).
        steps (`Sequence[int]`): the step number of each row.
        specs (`Sequence[TensorSpec]`): the segments (``offset``, ``local_numel``).
        rank (`int`, *optional*, defaults to `1`): number of components per tensor.
        fit_start (`int`, *optional*): fit the lines on steps ``>= fit_start`` only.
        method (`str`, *optional*, defaults to `"auto"`): ``"gram"``, ``"power"`` or ``"auto"`` (see
            :func:`default_method`). ``power`` falls back to ``gram`` for ``rank > 1`` and with ``reduce``.
        out_dtype (`torch.dtype`, *optional*): dtype of the direction arena ``V`` (default: the buffer dtype).
        reduce (`Callable`, *optional*): applied to the stacked Gram matrices (``[S, T, T]`` float64) before the
            eigen-decomposition; the distributed path passes an all-reduce here (one collective for all tensors).
        max_iter (`int`, *optional*, defaults to `6`): passes over a segment before ``power`` gives it to ``gram``.
        tol (`float`, *optional*, defaults to `1e-6`): ``power`` accepts a Ritz pair when its residual is below
            ``tol`` times both the Ritz value and the gap to the next one (eigenvector error ~ ``tol``).
        left (`torch.Tensor`, *optional*): a folded store's left factors (``TrajectoryStore.solve_inputs``):
            ``[S, T, R]`` float64 with the trajectory of segment ``i`` equal to ``left[i] @ M_i`` (``M`` then has
            ``R`` rows: the folded basis and the remaining deltas). ``None`` (no fold) is the plain path.
        folded_sq (`torch.Tensor`, *optional*): with ``left``, the exact squared Frobenius norm per segment of the
            first ``folded_steps`` steps (the factorisation alone would understate it); the report's total adds the
            later steps' squared norms from the Gram diagonal, so the remaining deltas are not read again.
        folded_steps (`int`, *optional*, defaults to `0`): how many leading steps ``folded_sq`` covers.
    """
    T, D = M.shape
    offsets = [s.offset for s in specs]
    numels = [s.local_numel for s in specs]
    S = len(specs)
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
    steps_t, mask = _fit_steps(steps, fit_start)
    V = torch.zeros(rank, D, dtype=out_dtype or M.dtype, device=M.device)
    seg_bytes = T * sum(numels) * M.element_size()
    secs = {}
    t0 = time.perf_counter()
    fallbacks = 0
    if method != "power":
        sigma, U, X, _, G = factor_left(M, left, specs, rank, reduce=reduce)
        row_sq = torch.diagonal(G, dim1=1, dim2=2)
        if folded_sq is None:
            total = row_sq.sum(-1).clamp_min(0)
        else:
            total = folded_sq.double() + row_sq[:, folded_steps:].sum(-1).clamp_min(0)
        last_sq = G[:, -1, -1].clamp_min(0)
        secs["gram"] = time.perf_counter() - t0
        passes = float(S > 0)
    else:
        lam, U, total, last_sq, todo, passes = _power_eigs(M, offsets, numels, max_iter=max_iter, tol=tol)
        fallbacks = len(todo)
        if todo:
            sub_o = [offsets[i] for i in todo]
            sub_n = [numels[i] for i in todo]
            G = kernels.gram(M, sub_o, sub_n).double().cpu()
            lam_f, U_f = _top_eigenpairs(G, 1)
            idx = torch.tensor(todo)
            lam[idx] = lam_f
            U[idx] = U_f  # total and last_sq came with the first Krylov pass
            passes += T * sum(sub_n) * M.element_size() / max(seg_bytes, 1)
        sigma, U, X = _directions(lam, U, rank)
        secs["power"] = time.perf_counter() - t0
    t2 = time.perf_counter()
    kernels.project(M, offsets, numels, X, V)
    secs["direction"] = time.perf_counter() - t2
    passes += float(S > 0)
    coeffs = (U * sigma.unsqueeze(1)).transpose(1, 2)  # [S, r, T]
    slope, intercept, r2 = fit_lines(coeffs, steps_t, mask)
    secs["total"] = time.perf_counter() - t0
    return Solution(
        specs=list(specs), steps=[int(s) for s in steps], fit_start=fit_start, rank=rank, sigma=sigma, coeffs=coeffs,
        slope=slope, intercept=intercept, r2=r2, total=total, last_sq=last_sq, V=V, method=method, seconds=secs,
        fallbacks=fallbacks, bytes_read=int(round(passes * seg_bytes)),
    )


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


def _fused_gram_matvec(M: torch.Tensor, o: int, n: int, q: torch.Tensor, rowsq: Optional[torch.Tensor], tmp, y):
    """``M_i (M_i^T q)`` for one segment in one pass (float32 chunks, each used twice while in cache); with
    ``rowsq`` also the squared row norms (float64). Returns float64 ``[T]``."""
    w = torch.zeros(M.shape[0], dtype=torch.float32, device=M.device)
    for s, e, c in kernels.reference._float32_chunks(M, o, n, y.shape[0], tmp):
        yy = y[: e - s]
        torch.mv(c.T, q, out=yy)
        w.addmv_(c, yy)
        if rowsq is not None:
            rowsq += torch.linalg.vector_norm(c, dim=1).double().square()
    return w.double()


def _power_eigs(M: torch.Tensor, offsets, numels, *, max_iter: int, tol: float):
    """Top eigenpair of every ``G_i = M_i M_i^T`` by Lanczos (full re-orthogonalisation, float64 in the small
    ``T``-space) without forming ``G_i``. Returns ``(lam [S,1], U [S,T,1], total [S], last_sq [S], todo, passes)``
    where ``todo`` lists the segments that did not converge (their entries are left for the Gram fallback) and
    ``passes`` counts reads of the whole buffer."""
    T = M.shape[0]
    S = len(offsets)
    chunk = kernels.reference.CHUNK
    lam = torch.zeros(S, 1, dtype=torch.float64)
    U = torch.zeros(S, T, 1, dtype=torch.float64)
    U[:, -1, 0] = 1.0
    total = torch.zeros(S, dtype=torch.float64)
    last_sq = torch.zeros(S, dtype=torch.float64)
    todo = []
    tmp = kernels.reference.float32_scratch(M, chunk)
    y = torch.empty(chunk, dtype=torch.float32, device=M.device)
    read = 0
    for i, (o, n) in enumerate(zip(offsets, numels)):
        Q = torch.zeros(T, max_iter + 1, dtype=torch.float64)
        H = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
        Q[-1, 0] = 1.0
        rowsq = torch.zeros(T, dtype=torch.float64, device=M.device)
        done = False
        prev_err = math.inf
        for j in range(max_iter):
            w = _fused_gram_matvec(M, o, n, Q[:, j].to(device=M.device, dtype=torch.float32), rowsq if j == 0 else None, tmp, y).cpu()
            read += n
            if j == 0:
                rowsq = rowsq.cpu()
                total[i] = rowsq.sum()
                last_sq[i] = rowsq[-1]
                if total[i] == 0:
                    done = True  # the segment never moved: lam = 0, any u (the direction pass gives v = 0)
                    break
            Qj = Q[:, : j + 1]
            h = Qj.T @ w
            w = w - Qj @ h
            h2 = Qj.T @ w  # second Gram-Schmidt sweep: orthogonality to round-off
            w = w - Qj @ h2
            H[: j + 1, j] = h + h2
            beta = float(w.norm())
            H[j + 1, j] = beta
            Hj = H[: j + 1, : j + 1]
            theta, Y = torch.linalg.eigh(0.5 * (Hj + Hj.T))
            th1 = float(theta[-1])
            gap = th1 - (float(theta[-2]) if j > 0 else 0.0)
            res = beta * abs(float(Y[-1, -1]))
            if th1 > 0 and (beta <= 1e-12 * th1 or (j > 0 and res <= tol * th1 and res <= tol * gap)):
                lam[i, 0] = th1
                U[i, :, 0] = Qj @ Y[:, -1]
                done = True
                break
            if beta <= 1e-300:
                break  # invariant subspace without a positive Ritz value: let the Gram path decide
            # Give up early when the observed convergence rate cannot reach tol within max_iter passes (a flat
            # spectrum): every further pass would be wasted before the Gram fallback.
            err = res / max(min(th1, gap), 1e-300) if th1 > 0 else math.inf
            if j >= 2 and math.isfinite(err) and prev_err > 0:
                rate = err / prev_err
                if rate >= 1.0 or (j + 1) + math.log(err / tol) / -math.log(rate) > max_iter:
                    break
            prev_err = err
            Q[:, j + 1] = w / beta
        if not done:
            todo.append(i)
    return lam, U, total, last_sq, todo, read * T / max(1, T * sum(numels)) if S else 0.0


@torch.no_grad()
def factor_left(M: torch.Tensor, left: Optional[torch.Tensor], specs: Sequence[TensorSpec], rank: int, reduce=None):
    """Top ``rank`` singular triplets of ``A_i = left[i] @ M_i`` for every segment without forming ``A``: the Gram
    ``A_i A_i^T = left[i] (M_i M_i^T) left[i]^T`` from one pass over ``M``, a float64 ``eigh``, and the weights
    ``X_i = left[i]^T u / sigma`` [S, R, r] with which one more pass gives ``v = M_i^T X_i``. ``left=None`` is the
    identity (the plain, unfolded trajectory ``A_i = M_i``).

    Returns ``(sigma [S, r], U [S, T, r], X [S, R, r] float32, G_M [S, R, R] float64, G [S, T, T] float64)``."""
    G_M = kernels.gram(M, [s.offset for s in specs], [s.local_numel for s in specs])
    if reduce is not None:
        G_M = reduce(G_M)
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
