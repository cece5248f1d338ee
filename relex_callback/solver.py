"""The rank-1 (or rank-r) solve over the whole arena in a constant number of passes.

Math (DESIGN.md, "The math"): for every tracked tensor with recorded deltas ``M`` (``T x n``, rows = steps in
order), take the top singular triplet ``(sigma, u, v)``; ``c_t = sigma*u[t] = <Delta_t, v>``; fit
``c_t = a*t + b`` on the real step numbers ``t >= fit_start``; ``theta(H) = theta_0 + (a*H + b) * v``.

Two ways to get the triplet, both a constant number of passes over the buffer:

* ``gram``: one pass builds ``G_i = M_i M_i^T`` for every segment (float32 accumulation), a batched float64
  ``eigh`` of all the small ``T x T`` matrices gives ``(sigma, u)``, one more pass gives ``v = M^T u / sigma``.
  Exact for any trajectory; supports rank r > 1; the only path for sharded (distributed) tensors, whose Grams
  are all-reduced between the two passes.
* ``power``: power iteration directly on ``M``, warm-started from the last delta (already close to ``v`` when the
  trajectory is near rank-1): ``2 T n`` multiply-adds per iteration instead of ``T^2 n`` for the Gram. A segment
  that has not converged after ``max_iter`` iterations falls back to the Gram path, so the result is the same.
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
        spec = self.specs[i]
        coef = self.coef_at(horizon)[i]
        out = theta0.reshape(-1).to(torch.float32).clone()
        v = self.direction(i)
        for k in range(self.rank):
            c = float(coef[k])
            if c != 0.0:
                out.add_(v[k].to(device=out.device, dtype=torch.float32), alpha=c)
        return out.to(spec.dtype)


def default_method(device: torch.device, rank: int, distributed: bool) -> str:
    """The dispatch table, from ``bench/solver.py`` measurements (see README, "Solver")."""
    if rank > 1 or distributed:
        return "gram"
    return "gram" if device.type == "cuda" else "power"


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
    max_iter: int = 30,
    tol: float = 2e-6,
    left: Optional[torch.Tensor] = None,
    total_sq: Optional[torch.Tensor] = None,
) -> Solution:
    """Solve every segment of ``M`` (``[T, D]``, rows in step order).

    Args:
        reduce: applied to the stacked Gram matrices (``[S, T, T]`` float64) before the eigen-decomposition; the
            distributed path passes an all-reduce here (one collective for all tensors).
        out_dtype: dtype of the direction arena ``V`` (default: the buffer dtype).
        left: a folded store's left factors (``TrajectoryStore.solve_inputs``): ``[S, T, R]`` float64 with the
            trajectory of segment ``i`` equal to ``left[i] @ M_i`` (``M`` then has ``R`` rows: the folded basis and
            the remaining deltas). ``None`` (no fold) is the plain path, unchanged.
        total_sq: exact ``||M_i||_F^2`` per segment for the report (a folded store knows it; the factorisation
            alone would understate it).
    """
    if left is not None:
        return _solve_left(M, steps, specs, left=left, total_sq=total_sq, rank=rank, fit_start=fit_start,
                           out_dtype=out_dtype, reduce=reduce)
    T, D = M.shape
    if T != len(steps):
        raise ValueError(f"{T} rows but {len(steps)} steps")
    if T < 2:
        raise ValueError("at least two recorded steps are needed")
    steps_t = torch.tensor(list(steps), dtype=torch.float64)
    mask = steps_t >= (fit_start if fit_start is not None else -math.inf)
    if int(mask.sum()) < 2:
        raise ValueError(f"fit_start={fit_start} leaves fewer than 2 steps to fit")
    offsets = [s.offset for s in specs]
    numels = [s.local_numel for s in specs]
    S = len(specs)
    if method == "auto":
        method = default_method(M.device, rank, reduce is not None)
    if method == "power" and (rank > 1 or reduce is not None):
        method = "gram"
    V = torch.zeros(rank, D, dtype=out_dtype or M.dtype, device=M.device)
    secs = {}
    t0 = time.perf_counter()
    fallbacks = 0
    if method == "gram":
        G = kernels.gram(M, offsets, numels)
        if reduce is not None:
            G = reduce(G)
        G = G.double().cpu()
        secs["gram"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        lam, U = _top_eigenpairs(G, rank)
        U = _fix_signs(U)
        total = torch.diagonal(G, dim1=1, dim2=2).sum(-1).clamp_min(0)
        last_sq = G[:, -1, -1].clamp_min(0)
        sigma = lam.sqrt()
        secs["eigen"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        keep = sigma > (REL_SIGMA_FLOOR * sigma[:, :1]).clamp_min(1e-300)
        scale = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), 0.0)
        Us = (U * scale.unsqueeze(1)).float()  # [S, T, r], u / sigma
        kernels.project(M, offsets, numels, Us, V)
        secs["direction"] = time.perf_counter() - t2
        coeffs = (U * (sigma * keep).unsqueeze(1)).transpose(1, 2)  # [S, r, T]
        sigma = sigma * keep
    elif method == "power":
        sigma = torch.zeros(S, 1, dtype=torch.float64)
        coeffs = torch.zeros(S, 1, T, dtype=torch.float64)
        total = torch.zeros(S, dtype=torch.float64)
        last_sq = torch.zeros(S, dtype=torch.float64)
        todo = []
        for i, (o, n) in enumerate(zip(offsets, numels)):
            res = _power_segment(M, o, n, max_iter=max_iter, tol=tol)
            if res is None:
                todo.append(i)
                continue
            v, c, tot, lsq = res
            V[0, o : o + n] = v
            sigma[i, 0] = float(c.norm())
            coeffs[i, 0] = c
            total[i] = tot
            last_sq[i] = lsq
        fallbacks = len(todo)
        if todo:
            sub = [specs[i] for i in todo]
            sol = solve_gram_subset(M, sub, rank=1)
            for j, i in enumerate(todo):
                o, n = offsets[i], numels[i]
                V[0, o : o + n] = sol["V"][j]
                sigma[i] = sol["sigma"][j]
                coeffs[i] = sol["coeffs"][j]
                total[i] = sol["total"][j]
                last_sq[i] = sol["last_sq"][j]
        secs["power"] = time.perf_counter() - t0
    else:
        raise ValueError(f"unknown method {method!r}")
    slope, intercept, r2 = fit_lines(coeffs, steps_t, mask)
    secs["total"] = time.perf_counter() - t0
    return Solution(
        specs=list(specs), steps=[int(s) for s in steps], fit_start=fit_start, rank=rank, sigma=sigma, coeffs=coeffs,
        slope=slope, intercept=intercept, r2=r2, total=total, last_sq=last_sq, V=V, method=method, seconds=secs,
        fallbacks=fallbacks,
    )


def solve_gram_subset(M: torch.Tensor, specs: Sequence[TensorSpec], rank: int) -> dict:
    """Gram path for a few segments (the power path's fallback); directions returned per segment."""
    offsets = [s.offset for s in specs]
    numels = [s.local_numel for s in specs]
    G = kernels.gram(M, offsets, numels).double().cpu()
    lam, U = _top_eigenpairs(G, rank)
    U = _fix_signs(U)
    sigma = lam.sqrt()
    keep = sigma > (REL_SIGMA_FLOOR * sigma[:, :1]).clamp_min(1e-300)
    scale = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), 0.0)
    Vs = []
    for j, (o, n) in enumerate(zip(offsets, numels)):
        out = torch.empty(rank, n, dtype=torch.float32, device=M.device)
        w = (U[j] * scale[j]).float().to(M.device)
        for k in range(rank):
            kernels.reference.rmatvec_reference(M, o, n, w[:, k], out[k])
        Vs.append(out)
    return {
        "V": Vs,
        "sigma": sigma * keep,
        "coeffs": (U * (sigma * keep).unsqueeze(1)).transpose(1, 2),
        "total": torch.diagonal(G, dim1=1, dim2=2).sum(-1).clamp_min(0),
        "last_sq": G[:, -1, -1].clamp_min(0),
    }


def _power_segment(M: torch.Tensor, o: int, n: int, *, max_iter: int, tol: float):
    """Rank-1 power iteration on one segment, warm-started from the last row. Returns ``(v [n] f32, c [T] f64,
    ||M||_F^2, ||Delta_last||^2)`` or ``None`` when it did not converge (the caller falls back to the Gram)."""
    T = M.shape[0]
    ref = kernels.reference
    x = M[-1, o : o + n].float()
    nx = x.norm()
    if nx == 0:
        return None  # rare (the last delta is zero): let the Gram path handle it exactly
    x = x / nx
    y = torch.empty(n, dtype=torch.float32, device=M.device)
    rowsq = torch.zeros(T, dtype=torch.float64, device=M.device)
    for it in range(max_iter):
        w = ref.matvec_reference(M, o, n, x, rowsq=rowsq if it == 0 else None)
        ref.rmatvec_reference(M, o, n, w, y)
        lam = float(w.double().square().sum())  # Rayleigh quotient x^T M^T M x
        ny = y.norm()
        if ny == 0 or lam == 0:
            return None
        # sin of the angle between x and M^T M x: zero exactly at an eigenvector
        res = float((y / ny - x).norm())
        x = y / ny
        if res < tol:
            break
    else:
        return None
    c = ref.matvec_reference(M, o, n, x).double()
    if float(c[-1]) < 0 or (float(c[-1]) == 0 and float(c[c.abs().argmax()]) < 0):
        c, x = -c, -x
    return x, c, float(rowsq.sum()), float(rowsq[-1])


@torch.no_grad()
def factor_left(M: torch.Tensor, left: torch.Tensor, specs: Sequence[TensorSpec], rank: int, reduce=None):
    """Top ``rank`` singular triplets of ``A_i = left[i] @ M_i`` for every segment without forming ``A``: the Gram
    ``A_i A_i^T = left[i] (M_i M_i^T) left[i]^T`` from one pass over ``M``, a float64 ``eigh``, and the weights
    ``X_i = left[i]^T u / sigma`` [S, R, r] with which one more pass gives ``v = M_i^T X_i``.

    Returns ``(sigma [S, r], U [S, T, r], X [S, R, r] float32, G_M [S, R, R] float64)``."""
    offsets = [s.offset for s in specs]
    numels = [s.local_numel for s in specs]
    G_M = kernels.gram(M, offsets, numels)
    if reduce is not None:
        G_M = reduce(G_M)
    G_M = G_M.double().cpu()
    C = left.double().cpu()
    G = C @ G_M @ C.transpose(1, 2)
    G = 0.5 * (G + G.transpose(1, 2))
    lam, U = _top_eigenpairs(G, rank)
    U = _fix_signs(U)
    if lam.shape[1] < rank:  # fewer steps than components so far (an early fold with few slots): pad with zeros
        pad = rank - lam.shape[1]
        lam = torch.nn.functional.pad(lam, (0, pad))
        U = torch.nn.functional.pad(U, (0, pad))
    sigma = lam.sqrt()
    keep = sigma > (REL_SIGMA_FLOOR * sigma[:, :1]).clamp_min(1e-300)
    scale = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), 0.0)
    X = (C.transpose(1, 2) @ (U * scale.unsqueeze(1))).float()
    return sigma * keep, U, X, G_M, G


def _solve_left(M, steps, specs, *, left, total_sq, rank, fit_start, out_dtype, reduce) -> Solution:
    """The Gram path for a folded trajectory (see ``solve(left=...)``)."""
    T = len(steps)
    if left.shape[1] != T or left.shape[2] != M.shape[0]:
        raise ValueError(f"left factors {tuple(left.shape)} do not match {T} steps and {M.shape[0]} rows")
    if T < 2:
        raise ValueError("at least two recorded steps are needed")
    steps_t = torch.tensor(list(steps), dtype=torch.float64)
    mask = steps_t >= (fit_start if fit_start is not None else -math.inf)
    if int(mask.sum()) < 2:
        raise ValueError(f"fit_start={fit_start} leaves fewer than 2 steps to fit")
    t0 = time.perf_counter()
    sigma, U, X, _, G = factor_left(M, left, specs, rank, reduce=reduce)
    secs = {"gram": time.perf_counter() - t0}
    t2 = time.perf_counter()
    V = torch.zeros(rank, M.shape[1], dtype=out_dtype or M.dtype, device=M.device)
    kernels.project(M, [s.offset for s in specs], [s.local_numel for s in specs], X, V)
    secs["direction"] = time.perf_counter() - t2
    coeffs = (U * sigma.unsqueeze(1)).transpose(1, 2)
    total = total_sq.double() if total_sq is not None else torch.diagonal(G, dim1=1, dim2=2).sum(-1).clamp_min(0)
    last_sq = G[:, -1, -1].clamp_min(0)
    slope, intercept, r2 = fit_lines(coeffs, steps_t, mask)
    secs["total"] = time.perf_counter() - t0
    return Solution(
        specs=list(specs), steps=[int(s) for s in steps], fit_start=fit_start, rank=rank, sigma=sigma, coeffs=coeffs,
        slope=slope, intercept=intercept, r2=r2, total=total, last_sq=last_sq, V=V, method="gram-folded",
        seconds=secs,
    )
