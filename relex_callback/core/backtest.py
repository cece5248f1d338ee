"""In-window backtest: would the line fitted on the first part of the window have predicted its end?

At ``tcut`` nobody has trained to the horizon, but the window itself holds a test. Fit the rank-1 line on the first
part ``P`` of the recorded steps (by default the steps ``<= tcut / 2``), predict each later recorded step with it,
and compare the prediction with the delta that was actually recorded there. At the last step this is a 2x
extrapolation (the horizons are 5-20x): a line that already fails at 2x will not hold at 10x; one that holds at 2x is
evidence, not proof, for the horizon.

Everything comes from the per-tensor Gram ``G = M M^T`` of the trajectory (``T x T``), which the Gram solve already
has; no pass over the buffer. For one tensor, with ``P`` the first ``p`` rows:

* ``(lambda_P, u_P)``: top eigenpair of ``G[P, P]``; ``sigma_P = sqrt(lambda_P)``; ``v_P = M_P^T u_P / sigma_P`` (never
  formed) is the direction seen by the first part, ``c_t = sigma_P u_P[t]`` its coefficients on ``P``.
* ``c_t = a t + b``: least squares on ``P``'s steps ``>= fit_start`` (all of ``P`` when that leaves fewer than two).
* For a later row ``t``: the prediction is ``c_hat_t v_P`` with ``c_hat_t = a t + b``;
  ``<Delta_t, v_P> = G[t, P] u_P / sigma_P`` and ``||Delta_t||^2 = G[t, t]``, so

  - cosine ``= sign(c_hat_t) <Delta_t, v_P> / ||Delta_t||``,
  - norm ratio ``= |c_hat_t| / ||Delta_t||``,
  - squared error ``||c_hat_t v_P - Delta_t||^2 = c_hat_t^2 - 2 c_hat_t <Delta_t, v_P> + ||Delta_t||^2``,
    relative error ``= sqrt(squared error) / ||Delta_t||``.

* Drift: ``<v_P, v> = u_P^T G[P, :] u / (sigma_P sigma)`` with ``(sigma, u)`` the whole window's top pair; reported
  as its absolute value (a direction's sign is a convention).

Global figures treat the model as one long vector: they sum the per-tensor numerators and squared norms
(``dot = c_hat <Delta, v_P>``, ``pred_sq = c_hat^2``, ``real_sq = ||Delta||^2``, ``err_sq``), so a tensor counts
with its share of the movement. The global drift is the mean of the per-tensor ``|<v_P, v>|`` weighted by each
tensor's ``||M||_F^2 = trace(G)`` (the weighting of the report's explained variance); its sums are ``w |<v_P, v>|``
and ``w``. These sums are
additive across disjoint sets of tensors: :meth:`Backtest.sums` and :func:`combine` merge the results of ranks that
hold different tensors. In sharded runs the Grams are all-reduced before the solve, so every rank already holds the
global result for every tensor: do not add the ranks' sums there.

The power path (``SolveOptions(method="power")``) never forms ``G``; it delivers the same four inputs
(``lambda_P, u_P, G[:, P] u_P, diag G``) from a second Krylov iteration run on ``P``'s rows in the same passes over
the buffer (:func:`backtest_from_projections` takes those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch

from .fit import fit_lines

DEFAULT_FIT_FRACTION = 0.5

# names of the additive sums, per later step ([S, L] each) and for the drift ([S] each)
STEP_SUMS = ("dot", "pred_sq", "real_sq", "err_sq")
DRIFT_SUMS = ("dir_weighted", "dir_weight")


def resolve_fit_rows(steps: Sequence[int], fit: Union[None, bool, int, float] = None) -> int:
    """How many leading recorded steps form the fit part ``P``.

    Args:
        steps (`Sequence[int]`): the recorded step numbers, increasing.
        fit (`bool`, `int` or `float`, *optional*, defaults to `None`): ``None`` or ``True``: the steps
            ``<= 0.5 * last step``; a float in ``(0, 1)``: the steps ``<= fit * last step``; an int ``>= 1``: the steps
            ``<= fit`` (a step number, like ``fit_start``).

    Returns:
        `int`: the number ``p`` of leading rows in ``P`` (may be below 2 or equal to ``len(steps)``: the caller
        decides whether a backtest is possible).
    """
    steps = [int(s) for s in steps]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"the recorded steps must be increasing, got {steps}")
    if not steps:
        return 0
    if fit is None or fit is True:
        cutoff = DEFAULT_FIT_FRACTION * steps[-1]
    elif isinstance(fit, bool):
        raise ValueError("backtest=False: pass None to switch the backtest off")
    elif isinstance(fit, int):
        if fit < 1:
            raise ValueError(f"backtest fit part: a step number must be >= 1, got {fit}")
        cutoff = fit
    elif isinstance(fit, float):
        if not 0.0 < fit < 1.0:
            raise ValueError(
                f"backtest fit part: a fraction must be in (0, 1), got {fit}; pass an int for a step number"
            )
        cutoff = fit * steps[-1]
    else:
        raise ValueError(f"backtest fit part must be None, True, an int step number or a float fraction; got {fit!r}")
    return sum(1 for s in steps if s <= cutoff)


def _line_mask(steps_P: torch.Tensor, fit_start: Optional[int]) -> torch.Tensor:
    """The steps of ``P`` that enter the line: those ``>= fit_start`` if at least two, else all of ``P``."""
    if fit_start is not None:
        m = steps_P >= fit_start
        if int(m.sum()) >= 2:
            return m
    return torch.ones_like(steps_P, dtype=torch.bool)


def _ratio(num: torch.Tensor, den: torch.Tensor, both_zero: float, den_zero: float) -> torch.Tensor:
    """``num / den`` elementwise; ``both_zero`` where both vanish, ``den_zero`` where only ``den`` does (never NaN)."""
    out = num / den.where(den > 0, torch.ones_like(den))
    at_zero = torch.where(num.abs() > 0, torch.full_like(num, den_zero), torch.full_like(num, both_zero))
    out = torch.where(den > 0, out, at_zero)
    return out


def _figures(dot, pred_sq, real_sq, err_sq):
    """(cosine, norm ratio, relative error) from the additive sums (any matching shapes)."""
    pred, real = pred_sq.clamp_min(0).sqrt(), real_sq.clamp_min(0).sqrt()
    # the cosine of two vectors of which one is zero: 1 when both are (nothing predicted, nothing happened), else 0
    cos = _ratio(dot, pred * real, 1.0, 0.0)
    cos = torch.where((pred > 0) ^ (real > 0), torch.zeros_like(cos), cos).clamp(-1.0, 1.0)
    ratio = _ratio(pred, real, 1.0, math.inf)
    rel = _ratio(err_sq.clamp_min(0).sqrt(), real, 0.0, math.inf)
    return cos, ratio, rel


def _drift(dir_dot, dir_p_sq, dir_sq):
    den = (dir_p_sq.clamp_min(0) * dir_sq.clamp_min(0)).sqrt()
    out = _ratio(dir_dot, den, 1.0, 0.0)
    return torch.where((dir_p_sq > 0) ^ (dir_sq > 0), torch.zeros_like(out), out).clamp(0.0, 1.0)


@dataclass
class Backtest:
    """Result of the in-window backtest. Per-tensor arrays are float64 ``[S]`` (indexed like ``names``) and refer
    to the last recorded step (``predicted_step``); ``by_step`` holds the global figures at every later step.

    Undefined ratios never give NaN: a tensor with no movement at the predicted step and no prediction has cosine 1,
    norm ratio 1, relative error 0; one with movement but no prediction (it started moving after ``P``) has cosine 0,
    norm ratio 0 and relative error 1; a prediction where nothing moved gives an infinite ratio and error
    (``None`` in :meth:`to_report`).
    """

    names: list[str]
    fit_steps: list[int]  # the steps of the fit part P (the direction v_P comes from all of them)
    line_steps: list[int]  # the steps of P that enter the line (>= fit_start when that leaves two)
    predicted_steps: list[int]  # the later recorded steps, each predicted
    sums: dict  # additive sums: STEP_SUMS -> [S, L] float64, DRIFT_SUMS -> [S] float64
    reason: Optional[str] = None  # why there is no backtest (too few steps); the figures are then None / empty
    cosine_global: Optional[float] = None
    norm_ratio_global: Optional[float] = None
    relative_error_global: Optional[float] = None
    direction_cosine: Optional[float] = None
    by_step: dict = field(default_factory=dict)
    cosine: Optional[torch.Tensor] = None
    norm_ratio: Optional[torch.Tensor] = None
    relative_error: Optional[torch.Tensor] = None
    tensor_direction_cosine: Optional[torch.Tensor] = None
    projection: Optional[torch.Tensor] = field(default=None, repr=False)  # [S, T] <Delta_t, v_P> (family selection)
    row_sq: Optional[torch.Tensor] = field(default=None, repr=False)  # [S, T] ||Delta_t||^2

    @property
    def predicted_step(self) -> Optional[int]:
        return self.predicted_steps[-1] if self.predicted_steps else None

    def totals(self) -> torch.Tensor:
        """The additive sums over this result's tensors as one float64 vector ``[4 L + 2]`` (the per-step sums in
        :data:`STEP_SUMS` order, then :data:`DRIFT_SUMS`): all-reduce it over ranks that hold disjoint tensors and
        pass the result to :meth:`with_totals`."""
        parts = [self.sums[k].sum(0) for k in STEP_SUMS] + [self.sums[k].sum(0, keepdim=True) for k in DRIFT_SUMS]
        return torch.cat(parts).double()

    def with_totals(self, totals: torch.Tensor) -> "Backtest":
        """A copy whose global figures are those of ``totals`` (from :meth:`totals`, summed over ranks); the
        per-tensor arrays stay this result's own."""
        if self.reason is not None:
            return self
        L = len(self.predicted_steps)
        t = totals.double().cpu()
        n = 4 * L + len(DRIFT_SUMS)
        if t.shape != (n,):
            raise ValueError(f"totals of shape {tuple(t.shape)} do not match {L} predicted steps (expected {n})")
        dot, pred, real, err = (t[k * L : (k + 1) * L] for k in range(4))
        cos, ratio, rel = _figures(dot, pred, real, err)
        wsum = t[4 * L + 1]
        drift = float(t[4 * L] / wsum) if wsum > 0 else 1.0  # nothing moved: no drift
        return replace(
            self,
            cosine_global=float(cos[-1]),
            norm_ratio_global=float(ratio[-1]),
            relative_error_global=float(rel[-1]),
            direction_cosine=float(drift),
            by_step={"steps": list(self.predicted_steps), "cosine": cos, "norm_ratio": ratio, "relative_error": rel},
        )

    def log_metrics(self, prefix: str = "relex/backtest/") -> dict:
        """Scalars for the trainer's log: ``cosine_global``, ``norm_ratio_global``, ``relative_error_global`` and
        ``direction_drift`` ``= 1 - direction_cosine`` (0: the first part's directions are the window's; larger:
        they turned). Undefined (skipped backtest) or infinite figures are left out."""
        vals = {
            "cosine_global": self.cosine_global,
            "norm_ratio_global": self.norm_ratio_global,
            "relative_error_global": self.relative_error_global,
            "direction_drift": None if self.direction_cosine is None else 1.0 - self.direction_cosine,
        }
        return {prefix + k: float(v) for k, v in vals.items() if v is not None and math.isfinite(v)}

    def to_report(self, per_tensor: bool = True) -> dict:
        """The ``report.json["backtest"]`` dict (plain JSON: infinities become ``None``)."""
        return to_report(self, per_tensor=per_tensor)


def _num(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def to_report(bt: Backtest, per_tensor: bool = True) -> dict:
    """``report.json["backtest"]``: ``fit_steps``, ``line_steps``, ``predicted_step``, ``cosine_global``,
    ``norm_ratio_global``, ``relative_error_global``, ``direction_cosine``, ``by_step`` (global figures at every later
    step), ``reason`` (``None`` unless skipped) and, with ``per_tensor``, ``tensors``: one
    ``{"name", "cosine", "norm_ratio", "relative_error", "direction_cosine"}`` per tensor."""
    rep = {
        "fit_steps": list(bt.fit_steps),
        "line_steps": list(bt.line_steps),
        "predicted_step": bt.predicted_step,
        "cosine_global": _num(bt.cosine_global),
        "norm_ratio_global": _num(bt.norm_ratio_global),
        "relative_error_global": _num(bt.relative_error_global),
        "direction_cosine": _num(bt.direction_cosine),
        "reason": bt.reason,
    }
    if bt.by_step:
        rep["by_step"] = {
            "steps": list(bt.by_step["steps"]),
            **{k: [_num(x) for x in bt.by_step[k]] for k in ("cosine", "norm_ratio", "relative_error")},
        }
    if per_tensor:
        rep["tensors"] = []
        if bt.reason is None:
            for i, name in enumerate(bt.names):
                rep["tensors"].append({
                    "name": name,
                    "cosine": _num(bt.cosine[i]),
                    "norm_ratio": _num(bt.norm_ratio[i]),
                    "relative_error": _num(bt.relative_error[i]),
                    "direction_cosine": _num(bt.tensor_direction_cosine[i]),
                })
    return rep


def _skipped(names, steps, p, reason) -> Backtest:
    S = len(names)
    empty = {k: torch.zeros(S, 0, dtype=torch.float64) for k in STEP_SUMS}
    empty.update({k: torch.zeros(S, dtype=torch.float64) for k in DRIFT_SUMS})
    return Backtest(names=list(names), fit_steps=[int(s) for s in steps[:p]], line_steps=[], predicted_steps=[],
                    sums=empty, reason=reason)


def _check_fit_rows(steps, p) -> Optional[str]:
    if p < 2:
        return f"the fit part holds {p} recorded step(s) (steps {list(steps[:p])}); the line needs at least 2"
    if p >= len(steps):
        return f"the fit part holds every recorded step ({len(steps)}): nothing is left to predict"
    return None


@torch.no_grad()
def backtest_from_projections(
    lam_P: torch.Tensor,
    u_P: torch.Tensor,
    g_P: torch.Tensor,
    diag: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor,
    steps: Sequence[int],
    *,
    fit_start: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    clock=None,
) -> Backtest:
    """The backtest from the few Gram quantities it needs (what the power path computes without forming ``G``).

    Args:
        lam_P (`torch.Tensor`): ``[S]`` top eigenvalue of each ``G[P, P]`` (``P`` = the first ``p`` rows).
        u_P (`torch.Tensor`): ``[S, p]`` its unit eigenvectors (any sign).
        g_P (`torch.Tensor`): ``[S, T]`` ``G[:, P] @ u_P`` (= ``sigma_P <Delta_t, v_P>`` for every row ``t``).
        diag (`torch.Tensor`): ``[S, T]`` the Gram diagonal ``||Delta_t||^2``.
        lam (`torch.Tensor`): ``[S]`` the whole window's top eigenvalue ``sigma^2``.
        u (`torch.Tensor`): ``[S, T]`` its unit eigenvector.
        steps (`Sequence[int]`): the ``T`` recorded step numbers (increasing).
        fit_start (`int`, *optional*): the line on ``P`` uses ``P``'s steps ``>= fit_start`` if that leaves two.
        names (`Sequence[str]`, *optional*): tensor names (for the report); default ``t0, t1, ...``.
        clock (`Clock`, *optional*): fit and predict on ``clock.at(step)`` (the lr clock) instead of the step.

    Returns:
        :class:`Backtest`.
    """
    lam_P, u_P, g_P, diag, lam, u = (x.double().cpu() for x in (lam_P, u_P, g_P, diag, lam, u))
    S, p = u_P.shape
    T = len(steps)
    names = list(names) if names is not None else [f"t{i}" for i in range(S)]
    steps_t = torch.tensor([int(s) for s in steps], dtype=torch.float64)
    if g_P.shape != (S, T) or diag.shape != (S, T) or u.shape != (S, T) or lam_P.shape != (S,) or lam.shape != (S,):
        raise ValueError("backtest inputs disagree in shape: lam_P [S], u_P [S, p], g_P/diag/u [S, T], lam [S]")
    reason = _check_fit_rows(steps, p)
    if reason:
        return _skipped(names, steps, p, reason)
    lam_P = lam_P.clamp_min(0.0)
    sig_P = lam_P.sqrt()
    moved_P = sig_P > 0
    inv = torch.where(moved_P, 1.0 / sig_P.where(moved_P, torch.ones_like(sig_P)), torch.zeros_like(sig_P))
    # coefficients on P along v_P: c_t = G[t, P] u_P / sigma_P (= sigma_P u_P[t] on P); their sign goes with v_P, so
    # c_hat v_P and every figure below do not depend on the sign of u_P
    proj = g_P * inv[:, None]  # [S, T] <Delta_t, v_P>
    line = _line_mask(steps_t[:p], fit_start)
    x_t = clock.at_steps(steps) if clock is not None else steps_t
    a, b, _ = fit_lines(proj[:, :p], x_t[:p], line)
    t_later = x_t[p:]
    c_hat = a[:, None] * t_later + b[:, None]  # [S, L]
    c_hat = torch.where(moved_P[:, None], c_hat, torch.zeros_like(c_hat))
    real_sq = diag[:, p:].clamp_min(0)
    dot = c_hat * proj[:, p:]
    pred_sq = c_hat**2
    err_sq = (pred_sq - 2 * dot + real_sq).clamp_min(0)
    # drift: |u_P^T G[P, :] u| = |g_P . u| = sigma_P sigma |<v_P, v>|
    dir_dot = (g_P * u).sum(-1).abs()
    dir_dot = torch.where(moved_P & (lam > 0), dir_dot, torch.zeros_like(dir_dot))
    drift = _drift(dir_dot, lam_P, lam.clamp_min(0))
    weight = diag.clamp_min(0).sum(-1)
    sums = {"dot": dot, "pred_sq": pred_sq, "real_sq": real_sq, "err_sq": err_sq,
            "dir_weighted": weight * drift, "dir_weight": weight}
    cos, ratio, rel = _figures(dot[:, -1], pred_sq[:, -1], real_sq[:, -1], err_sq[:, -1])
    bt = Backtest(
        names=names, fit_steps=[int(s) for s in steps[:p]], line_steps=[int(s) for s in steps_t[:p][line].tolist()],
        predicted_steps=[int(s) for s in steps[p:]], sums=sums, cosine=cos, norm_ratio=ratio, relative_error=rel,
        tensor_direction_cosine=drift, projection=proj, row_sq=diag,
    )
    return bt.with_totals(bt.totals())


def top_eigenpair(G: torch.Tensor):
    """``(lam [S], u [S, k])`` top eigenpair of each symmetric ``G[i]`` (float64 ``eigh``)."""
    lam, vec = torch.linalg.eigh(G.double())
    return lam[:, -1].clamp_min(0.0), vec[:, :, -1]


@torch.no_grad()
def backtest_from_gram(
    G: torch.Tensor,
    steps: Sequence[int],
    fit: Union[None, bool, int, float] = None,
    *,
    fit_start: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    lam: Optional[torch.Tensor] = None,
    u: Optional[torch.Tensor] = None,
    clock=None,
) -> Backtest:
    """The backtest from the stacked trajectory Grams (pure function; no buffer access).

    Args:
        G (`torch.Tensor`): ``[S, T, T]`` per-tensor Grams ``M_i M_i^T`` of the trajectory (rows in step order; for a
            folded store, the Gram of the folded trajectory ``C (B B^T) C^T`` as
            :func:`relex_callback.core.solver.factor_left` returns it).
        steps (`Sequence[int]`): the ``T`` recorded step numbers, increasing.
        fit (`bool`, `int` or `float`, *optional*): the fit part ``P`` (see :func:`resolve_fit_rows`); default the
            steps ``<= last step / 2``.
        fit_start (`int`, *optional*): the line on ``P`` uses ``P``'s steps ``>= fit_start`` if that leaves two.
        names (`Sequence[str]`, *optional*): tensor names.
        lam (`torch.Tensor`, *optional*): ``[S]`` the whole window's top eigenvalue (computed from ``G`` if absent).
        u (`torch.Tensor`, *optional*): ``[S, T]`` its eigenvector (with ``lam``).
        clock (`Clock`, *optional*): the lr clock (see :func:`backtest_from_projections`).

    Returns:
        :class:`Backtest`.
    """
    G = G.double().cpu()
    S, T, T2 = G.shape
    if T != T2 or T != len(steps):
        raise ValueError(f"Grams of shape {tuple(G.shape)} do not match {len(steps)} steps")
    p = resolve_fit_rows(steps, fit)
    names = list(names) if names is not None else [f"t{i}" for i in range(S)]
    reason = _check_fit_rows(steps, p)
    if reason:
        return _skipped(names, steps, p, reason)
    lam_P, u_P = top_eigenpair(G[:, :p, :p])
    g_P = G[:, :, :p] @ u_P.unsqueeze(-1)
    if lam is None or u is None:
        lam, u = top_eigenpair(G)
    return backtest_from_projections(lam_P, u_P, g_P.squeeze(-1), torch.diagonal(G, dim1=1, dim2=2), lam, u, steps,
                                     fit_start=fit_start, names=names, clock=clock)


def combine(parts: Sequence[Backtest]) -> Backtest:
    """Merge the results of disjoint tensor sets (ranks that each solved their own tensors) into one: per-tensor
    arrays concatenated, global figures from the summed additive sums. All parts must share the same steps and fit
    part. (Sharded runs: every rank already holds the global result; do not combine.)"""
    parts = list(parts)
    if not parts:
        raise ValueError("combine() needs at least one backtest")
    first = parts[0]
    for q in parts[1:]:
        if (q.fit_steps, q.predicted_steps, q.reason) != (first.fit_steps, first.predicted_steps, first.reason):
            raise ValueError("backtests to combine must share their fit part and predicted steps")
    if first.reason is not None:
        return replace(first, names=[n for q in parts for n in q.names])

    def cat(attr):
        return torch.cat([getattr(q, attr) for q in parts])

    merged = replace(
        first,
        projection=None, row_sq=None,
        names=[n for q in parts for n in q.names],
        sums={k: torch.cat([q.sums[k] for q in parts]) for k in first.sums},
        cosine=cat("cosine"), norm_ratio=cat("norm_ratio"), relative_error=cat("relative_error"),
        tensor_direction_cosine=cat("tensor_direction_cosine"),
    )
    return merged.with_totals(merged.totals())
