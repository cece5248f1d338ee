"""Is the window a line or a random walk? The drift share of the recorded trajectory, from the Gram the solver has.

Model (docs/math.md, "The drift share"): each optimizer step moves a tensor by ``g + n_t``, a constant drift
``g`` plus noise of mean square ``sigma^2`` (independent across steps). With recorded deltas ``Delta_j`` at steps
``t_1 < ... < t_T`` (``Delta_0 = 0`` at step 0) and the increments ``s_j = Delta_j - Delta_{j-1}`` over
``dt_j = t_j - t_{j-1}`` optimizer steps (a stride, or steps the buffer skipped because nothing moved):

    A = sum_j |s_j|^2     has expectation  |g|^2 sum_j dt_j^2 + sigma^2 t_T
    B = |Delta_T|^2       has expectation  |g|^2 t_T^2        + sigma^2 t_T

Solving the two gives ``|g|^2`` and ``sigma^2`` (per optimizer step); the **drift share**
``|g|^2 / (|g|^2 + sigma^2)`` is near 1 when the window moves like a line (``|Delta_t| ~ t``) and near 0 when it
moves like a random walk (``|Delta_t| ~ sqrt(t)``). Everything comes from three parts of the Gram
``G[j, k] = Delta_j . Delta_k``: the diagonal, the first sub-diagonal and the last column. The standard error is the
jackknife over the increments (leave one out; closed form from the same entries), so it costs ``O(S T)``.

The second variant applies the same split to the rank-1 coefficient ``c_t`` of each tensor (a scalar series):
the noise along the direction the extrapolation follows.

Global figures sum ``|g|^2`` and ``sigma^2`` over tensors (the whole model's move). Estimates of ``|g|^2`` can come
out negative in a noisy window (the moments are unbiased, not positive); the share is clamped to ``[0, 1]``.

Pure torch, no buffer access.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

# The field name in report.json (stable; documented in docs/architecture.md).
REPORT_FIELD = "noise"


@dataclass
class DriftShare:
    """The drift/noise split of a window; per-tensor arrays are float64 ``[S]``."""

    steps: list
    names: list
    drift_sq: torch.Tensor  # |g|^2 per optimizer step, per tensor
    noise_sq: torch.Tensor  # sigma^2 per optimizer step, per tensor
    share: torch.Tensor  # per tensor, clamped to [0, 1]
    global_drift_sq: float
    global_noise_sq: float
    global_share: float
    global_share_se: float  # jackknife standard error of global_share
    coef_share: Optional[float] = None  # the same split inside the rank-1 coefficients c_t (summed over tensors)
    coef_share_se: Optional[float] = None
    coef_share_per_tensor: Optional[torch.Tensor] = None
    mid_step: Optional[int] = None  # the last recorded step <= half the window: the halves' boundary
    late_share: Optional[float] = None  # the drift share of the window's second half alone (re-based at mid_step)
    speed_ratio: Optional[float] = None  # net speed of the second half / of the first half (1 = a line)
    _mom: Optional[tuple] = field(default=None, repr=False)  # per-tensor moments, for combine()
    _c_mom: Optional[tuple] = field(default=None, repr=False)

    @property
    def drift_share(self) -> float:
        return self.global_share

    def to_json(self, per_tensor: bool = False) -> dict:
        out = {
            "drift_share": _r(self.global_share), "drift_share_se": _r(self.global_share_se),
            "drift_sq_per_step": _r(self.global_drift_sq), "noise_sq_per_step": _r(self.global_noise_sq),
            "coef_drift_share": _r(self.coef_share), "coef_drift_share_se": _r(self.coef_share_se),
            "steps": [int(self.steps[0]), int(self.steps[-1])], "recorded_steps": len(self.steps),
            "median_tensor_drift_share": _r(float(self.share.median())) if self.share.numel() else None,
            "mid_step": self.mid_step, "late_drift_share": _r(self.late_share), "speed_ratio": _r(self.speed_ratio),
        }
        if per_tensor:
            out["per_tensor"] = {n: _r(float(v)) for n, v in zip(self.names, self.share)}
        return out


def _r(x, nd: int = 6):
    if x is None:
        return None
    x = float(x)
    return None if x != x else float(f"{x:.{nd}g}")  # NaN -> null; 6 significant digits


def _increments(steps: Sequence[int]):
    t = torch.tensor([int(s) for s in steps], dtype=torch.float64)
    if t.numel() < 3:
        raise ValueError(f"the drift share needs at least 3 recorded steps, got {t.numel()}")
    if bool((t[1:] <= t[:-1]).any()) or float(t[0]) <= 0:
        raise ValueError(f"steps must be positive and increasing, got {list(steps)[:8]}...")
    dt = torch.diff(t, prepend=t.new_zeros(1))
    return t, dt


def _moments(diag: torch.Tensor, sub: torch.Tensor, last: torch.Tensor):
    """Per segment ``[S, T]`` squared increment norms ``|s_j|^2`` and ``p_j = s_j . Delta_T`` from the Gram's
    diagonal ``diag [S, T]``, first sub-diagonal ``sub [S, T-1]`` (``G[j, j-1]``) and last column ``last [S, T]``."""
    prev_diag = torch.cat([diag.new_zeros(diag.shape[0], 1), diag[:, :-1]], 1)
    prev_sub = torch.cat([sub.new_zeros(sub.shape[0], 1), sub], 1)
    s_sq = diag - 2 * prev_sub + prev_diag
    p = last - torch.cat([last.new_zeros(last.shape[0], 1), last[:, :-1]], 1)
    return s_sq, p


def _solve(A, B, sum_dt2, tT):
    """|g|^2 and sigma^2 from the two moments (any broadcastable shapes)."""
    g2 = (B - A) / (tT * tT - sum_dt2)
    s2 = (A - g2 * sum_dt2) / tT
    return g2, s2


def _share(g2, s2):
    tot = g2 + s2
    sh = torch.where(tot > 0, g2 / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))
    return sh.clamp(0.0, 1.0)


def _split(s_sq: torch.Tensor, p: torch.Tensor, B: torch.Tensor, dt: torch.Tensor):
    """Per-row estimates and the jackknife (leave one increment out) of the summed (global) share.
    ``s_sq``, ``p``: ``[S, T]``; ``B``: ``[S]``. Returns (g2 [S], s2 [S], share [S], global share, its se, G2, S2)."""
    tT = float(dt.sum())
    sum_dt2 = float((dt * dt).sum())
    A = s_sq.sum(-1)
    g2, s2 = _solve(A, B, sum_dt2, tT)
    share = _share(g2, s2)
    A_all, B_all = float(A.sum()), float(B.sum())
    G2, S2 = _solve(torch.tensor(A_all, dtype=torch.float64), torch.tensor(B_all, dtype=torch.float64), sum_dt2, tT)
    glob = float(_share(G2, S2))
    # leave increment j out: A - |s_j|^2, |Delta_T - s_j|^2 = B - 2 p_j + |s_j|^2, t_T - dt_j, sum dt^2 - dt_j^2
    A_j = A_all - s_sq.sum(0)
    B_j = B_all - 2 * p.sum(0) + s_sq.sum(0)
    tT_j = tT - dt
    d2_j = sum_dt2 - dt * dt
    ok = tT_j * tT_j - d2_j > 0
    g2_j, s2_j = _solve(A_j[ok], B_j[ok], d2_j[ok], tT_j[ok])
    sh_j = _share(g2_j, s2_j)
    n = int(ok.sum())
    se = float(((n - 1) / n * ((sh_j - sh_j.mean()) ** 2).sum()).sqrt()) if n > 1 else float("nan")
    return g2, s2, share, glob, se, float(G2), float(S2)


def drift_share(G: torch.Tensor, steps: Sequence[int], *, coeffs: Optional[torch.Tensor] = None,
                names: Optional[Sequence[str]] = None) -> DriftShare:
    """The drift share of a window from its per-tensor Grams.

    Args:
        G (`torch.Tensor`): ``[S, T, T]`` Grams ``M_i M_i^T`` of the recorded deltas (rows in step order), as
            :func:`relex_callback.core.solver.factor_left` builds them.
        steps (`Sequence[int]`): the ``T`` recorded step numbers (increasing, counted from the window's start at 0;
            gaps from a stride or skipped steps are taken into account).
        coeffs (`torch.Tensor`, *optional*): ``[S, T]`` the rank-1 coefficients ``c_t`` for the second variant.
        names (`Sequence[str]`, *optional*): tensor names.
    """
    G = G.double().cpu()
    S, T, T2 = G.shape
    if T != T2 or T != len(steps):
        raise ValueError(f"Grams of shape {tuple(G.shape)} do not match {len(steps)} steps")
    diag = torch.diagonal(G, dim1=1, dim2=2)
    sub = torch.diagonal(G, offset=-1, dim1=1, dim2=2)
    return from_gram_parts(diag, sub, G[:, :, -1], steps, coeffs=coeffs, names=names)


def from_gram_parts(diag: torch.Tensor, sub: torch.Tensor, last: torch.Tensor, steps: Sequence[int], *,
                    coeffs: Optional[torch.Tensor] = None, names: Optional[Sequence[str]] = None) -> DriftShare:
    """:func:`drift_share` from the only Gram entries it reads: ``diag [S, T]``, ``sub [S, T-1]`` (``G[j, j-1]``)
    and ``last [S, T]`` (``G[j, T-1]``); for the power path, which never forms the whole Gram."""
    diag, sub, last = diag.double().cpu(), sub.double().cpu(), last.double().cpu()
    if diag.shape[1] != len(steps) or last.shape != diag.shape or sub.shape[1] != diag.shape[1] - 1:
        raise ValueError(f"Gram parts {tuple(diag.shape)}, {tuple(sub.shape)}, {tuple(last.shape)} do not match "
                         f"{len(steps)} steps")
    s_sq, p = _moments(diag, sub, last)
    c_mom = None
    if coeffs is not None:
        c = coeffs.double().cpu()
        if c.shape != diag.shape:
            raise ValueError(f"coeffs of shape {tuple(c.shape)} do not match the Grams' {tuple(diag.shape)}")
        ds = torch.diff(c, dim=1, prepend=c.new_zeros(c.shape[0], 1))
        c_mom = (ds * ds, ds * c[:, -1:], c[:, -1] ** 2)
    names = list(names) if names is not None else [f"t{i}" for i in range(diag.shape[0])]
    m = _mid(steps)
    return _from_moments((s_sq, p, diag[:, -1], diag[:, m], last[:, m]), c_mom, steps, names)


def _mid(steps) -> int:
    """Index of the last recorded step at or before half the window's last step (0 if none is)."""
    half = int(steps[-1]) / 2
    return max([j for j, t in enumerate(steps) if int(t) <= half] or [0])


def _halves(s_sq, B, diag_m, last_m, t, dt, m):
    """The second half's drift share (no standard error) and the halves' speed ratio, both global.
    The second half's deltas are Delta_j - Delta_m, so its increments are the same s_j (j > m) and its end point's
    squared norm is |Delta_T - Delta_m|^2 = G[T,T] - 2 G[T,m] + G[m,m]."""
    late_sq = float((B - 2 * last_m + diag_m).sum())
    t_m, t_T = float(t[m]), float(t[-1])
    speed = None
    if t_T > t_m and float(diag_m.sum()) > 0:
        speed = (max(late_sq, 0.0) ** 0.5 / (t_T - t_m)) / (float(diag_m.sum()) ** 0.5 / t_m)
    dt2 = dt[m + 1:]
    if dt2.numel() < 2:
        return None, speed
    sum_dt2, tT = float((dt2 * dt2).sum()), float(dt2.sum())
    g2, s2 = _solve(torch.tensor(float(s_sq[:, m + 1:].sum()), dtype=torch.float64),
                    torch.tensor(late_sq, dtype=torch.float64), sum_dt2, tT)
    return float(_share(g2, s2)), speed


def _from_moments(mom, c_mom, steps, names) -> DriftShare:
    t, dt = _increments(steps)
    g2, s2, share, glob, se, G2, S2 = _split(*mom[:3], dt)
    out = DriftShare(steps=[int(s) for s in steps], names=list(names), drift_sq=g2, noise_sq=s2, share=share,
                     global_drift_sq=G2, global_noise_sq=S2, global_share=glob, global_share_se=se)
    m = _mid(steps)
    out.mid_step = int(steps[m])
    out.late_share, out.speed_ratio = _halves(mom[0], mom[2], mom[3], mom[4], t, dt, m)
    if c_mom is not None:
        _, _, cshare, cglob, cse, _, _ = _split(*c_mom, dt)
        out.coef_share, out.coef_share_se, out.coef_share_per_tensor = cglob, cse, cshare
    out._mom, out._c_mom = mom, c_mom
    return out


def combine(parts: Sequence[DriftShare]) -> Optional[DriftShare]:
    """One window's drift share from parts that hold disjoint tensors of it (the streamed path's groups): the
    moments are sums over tensors, so the result equals :func:`drift_share` on all the Grams at once."""
    parts = [x for x in parts if x is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    mom = tuple(torch.cat([x._mom[k] for x in parts]) for k in range(5))
    c_mom = None
    if all(x._c_mom is not None for x in parts):
        c_mom = tuple(torch.cat([x._c_mom[k] for x in parts]) for k in range(3))
    return _from_moments(mom, c_mom, parts[0].steps, [n for x in parts for n in x.names])


def gather_form(value):
    """What one process sends so that the processes' parts combine in :func:`from_gathered` (replicated runs: each
    process solves its own tensors): the reason it was not computed (str), ``None``, or the per-tensor moments on the
    CPU (a CUDA tensor unpickled on another process would land on that process's device)."""
    if value is None or isinstance(value, str):
        return value
    cpu = lambda xs: None if xs is None else tuple(x.detach().cpu() for x in xs)  # noqa: E731
    return {"mom": cpu(value._mom), "c_mom": cpu(value._c_mom), "steps": list(value.steps), "names": list(value.names)}


def from_gathered(parts: Sequence) -> "Optional[DriftShare | str]":
    """The whole window's drift share from every process's :func:`gather_form`: the moments are sums over tensors,
    so the result equals :func:`drift_share` on every tensor's Gram at once; the first reason when a process could
    not compute its part."""
    reasons = [p for p in parts if isinstance(p, str)]
    if reasons:
        return reasons[0]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    mom = tuple(torch.cat([p["mom"][k] for p in parts]) for k in range(5))
    c_mom = None
    if all(p["c_mom"] is not None for p in parts):
        c_mom = tuple(torch.cat([p["c_mom"][k] for p in parts]) for k in range(3))
    return _from_moments(mom, c_mom, parts[0]["steps"], [n for p in parts for n in p["names"]])


def report_entry(value) -> dict:
    """The ``noise`` field of report.json: the figures, or ``{"reason": ...}`` when they were not computed."""
    if value is None:
        return {"reason": "no drift-share figures reached the report"}
    if isinstance(value, str):
        return {"reason": value}
    return value.to_json()


def safe(fn, *args, **kw):
    """``fn(*args, **kw)``, or the reason it could not be computed (a window of fewer than 3 recorded steps)."""
    try:
        return fn(*args, **kw)
    except ValueError as e:
        return str(e)
