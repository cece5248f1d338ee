"""Fits of each direction's coefficient on the real step numbers, batched over tensors, in float64.

:func:`fit_lines` is the paper's straight line (what the solver computes). :func:`fit` adds the other families
(``power``, ``log``, ``polynomial``, any of them on a sliding window) behind one :class:`Fit` object,
and :func:`select_family` chooses a family by how well each one, fitted on the first part of the window,
predicts the recorded deltas of the later part (the in-window backtest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from ..errors import RelexInputError


def fit_lines(coeffs: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor):
    """Fit ``c_t = a*t + b`` for each row of ``coeffs``.

    Args:
        coeffs: ``[..., T]`` coefficients (any float dtype; computed in float64).
        steps: ``[T]`` step numbers (the real ones, not positions).
        mask: ``[T]`` bool, the steps that enter the fit (``t >= fit_start``); at least two.

    Returns:
        ``(slope, intercept, r2)``, each ``[...]`` float64. ``r2`` is 1 for a perfect fit, also when the
        coefficients are constant (e.g. a tensor that never moved), never NaN.
    """
    c = coeffs.to(torch.float64)[..., mask]
    t = steps.to(torch.float64)[mask]
    tm = t.mean()
    dt = t - tm
    cm = c.mean(-1, keepdim=True)
    slope = ((c - cm) * dt).sum(-1) / (dt * dt).sum()
    intercept = cm.squeeze(-1) - slope * tm
    pred = slope.unsqueeze(-1) * t + intercept.unsqueeze(-1)
    ss_res = ((c - pred) ** 2).sum(-1)
    ss_tot = ((c - cm) ** 2).sum(-1)
    scale = (c**2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    flat = ss_tot <= 1e-24 * scale
    r2 = torch.where(flat, torch.where(ss_res <= 1e-24 * scale, 1.0, 0.0), 1.0 - ss_res / ss_tot.where(~flat, 1.0))
    return slope, intercept, r2


# ---------------------------------------------------------------------------------------------------------------
# Fit families
# ---------------------------------------------------------------------------------------------------------------

FAMILIES = ("linear", "power", "log", "polynomial")
"""Every family :func:`fit` knows, in the order used to break ties (the paper's line first)."""

AUTO_FAMILIES = ("linear", "power", "log")
"""The candidates of ``fit="auto"`` by default. ``polynomial`` is left out: the in-window backtest extrapolates
about 2x (from the first part of the window to its end) while a horizon is 10-20x ``tcut``, and a parabola that
predicts 2x well can still turn round before the horizon. Pass it in ``families`` to consider it anyway."""

POWER_RANGE = (0.2, 1.5)
"""Bounds of the exponent ``p`` of the ``power`` family (``p = 1`` is the line)."""

_N_PARAMS = {"linear": 2, "log": 2, "power": 3}
_GRID = 27  # grid points in p before the golden-section refinement
_GOLDEN_ITERS = 64  # bracket shrinks 0.618^64 ~ 4e-14 of two grid cells
MARGIN = 0.0
"""Default ``margin`` of :func:`select_family` (how much better than the first family, the line, another must
predict to replace it). 0 by measurement (bench/fit_families.py): a margin keeps noisy lines linear per tensor,
but a power fitted to a line has p near 1 and costs little at the horizon, while a curved trajectory kept linear
costs a lot; see the issue notes for the figures."""
_TIE = 1e-6  # backtest scores within this (relative-error units) of the best are ties, broken by family order


def _err(msg: str) -> RelexInputError:
    return RelexInputError(msg)


def _r2(c: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """R^2 of ``pred`` for ``c`` (``[..., n]`` float64), with the conventions of :func:`fit_lines`: 1 for a perfect
    fit, also of constant data; 0 for constant data the fit misses; never NaN."""
    cm = c.mean(-1, keepdim=True)
    ss_res = ((c - pred) ** 2).sum(-1)
    ss_tot = ((c - cm) ** 2).sum(-1)
    scale = (c**2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    flat = ss_tot <= 1e-24 * scale
    return torch.where(flat, torch.where(ss_res <= 1e-24 * scale, 1.0, 0.0), 1.0 - ss_res / ss_tot.where(~flat, 1.0))


def _check_family(family: str, degree: int):
    if not isinstance(family, str) or family not in FAMILIES:
        raise _err(f"unknown fit family {family!r}: use one of {', '.join(FAMILIES)} (or 'auto' where offered)")
    if family == "polynomial" and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
        raise _err(f"polynomial degree must be an integer >= 1, got {degree!r}: pass e.g. degree=2")


def _n_params(family: str, degree: Optional[int]) -> int:
    return degree + 1 if family == "polynomial" else _N_PARAMS[family]


def _fit_positions(steps: torch.Tensor, mask: torch.Tensor, family: str, degree: int, fit_window: Optional[int]):
    """Indices (into ``steps``) of the points the fit uses, after ``mask`` and ``fit_window``; validates."""
    idx = torch.nonzero(mask, as_tuple=False).flatten()
    n = int(idx.numel())
    if fit_window is not None:
        if isinstance(fit_window, bool) or not isinstance(fit_window, int) or fit_window < 2 or fit_window > n:
            raise _err(f"fit_window={fit_window!r} must be an integer between 2 and the {n} recorded steps the fit "
                       f"may use: raise tcut (or lower fit_start) or pass a smaller fit window")
        order = torch.argsort(steps[idx], stable=True)
        idx = torch.sort(idx[order[-fit_window:]]).values
        n = fit_window
    t = steps[idx]
    if n < 2 or torch.unique(t).numel() < 2:
        raise _err(f"a fit needs at least 2 distinct recorded steps, got {n}: record more steps (raise tcut, lower "
                   f"stride or fit_start)")
    k = _n_params(family, degree)
    if family == "polynomial" and degree >= n:
        raise _err(f"polynomial degree {degree} needs more than {degree} fitted steps, got {n}: lower the degree "
                   f"or fit more steps (a larger fit_window, tcut or a smaller fit_start)")
    if family == "power" and n < k:
        raise _err(f"the power family (c = a*t^p + b) needs at least 3 fitted steps, got {n}: use 'linear' or "
                   f"'log', or fit more steps")
    if family in ("power", "log") and bool((t <= 0).any()):
        raise _err(f"the {family} family needs step numbers > 0, got {t.min().item():g}: fit only t >= 1 "
                   f"(fit_start=1)")
    return idx


def _line(c: torch.Tensor, x: torch.Tensor):
    """Least squares ``c = a*x + b`` for ``c`` ``[B, n]`` and ``x`` ``[n]`` or ``[B, n]``; returns ``(a, b, sse)``."""
    xm = x.mean(-1, keepdim=True)
    dx = x - xm
    cm = c.mean(-1, keepdim=True)
    dc = c - cm
    a = (dc * dx).sum(-1) / (dx * dx).sum(-1)
    b = cm.squeeze(-1) - a * xm.squeeze(-1)
    sse = ((dc - a.unsqueeze(-1) * dx) ** 2).sum(-1)
    return a, b, sse


def _fit_power(c: torch.Tensor, t: torch.Tensor, p_range=POWER_RANGE) -> torch.Tensor:
    """``c = a*t^p + b`` per row of ``c`` ``[B, n]``: for a fixed ``p`` the least squares in ``(a, b)`` is closed
    form, so only ``p`` is searched: a grid over ``p_range``, then golden-section search (batched, a fixed number
    of iterations) in the two cells around each row's best grid point. Returns ``[B, 3]`` = ``(a, p, b)``."""
    lo, hi = float(p_range[0]), float(p_range[1])
    B = c.shape[0]
    grid = torch.linspace(lo, hi, _GRID, dtype=torch.float64)
    X = t.unsqueeze(0) ** grid.unsqueeze(1)  # [G, n]
    dX = X - X.mean(-1, keepdim=True)
    cm = c.mean(-1, keepdim=True)
    dc = c - cm
    sxc = dc @ dX.T  # [B, G]
    sxx = (dX * dX).sum(-1)  # [G]
    ss_tot = (dc * dc).sum(-1)
    sse_grid = ss_tot.unsqueeze(1) - sxc**2 / sxx  # coarse (cancellation), only to pick the cell
    g = sse_grid.argmin(1)
    step = (hi - lo) / (_GRID - 1)
    a_lo = (grid[g] - step).clamp(lo, hi)
    a_hi = (grid[g] + step).clamp(lo, hi)

    def sse_at(p):
        return _line(c, t.unsqueeze(0) ** p.unsqueeze(1))[2]

    r = (math.sqrt(5.0) - 1.0) / 2.0
    x1 = a_hi - r * (a_hi - a_lo)
    x2 = a_lo + r * (a_hi - a_lo)
    f1, f2 = sse_at(x1), sse_at(x2)
    for _ in range(_GOLDEN_ITERS):
        left = f1 <= f2  # minimum in [a_lo, x2]
        a_hi = torch.where(left, x2, a_hi)
        a_lo = torch.where(left, a_lo, x1)
        nx1 = torch.where(left, a_hi - r * (a_hi - a_lo), x2)
        nx2 = torch.where(left, x1, a_lo + r * (a_hi - a_lo))
        nf = sse_at(torch.where(left, nx1, nx2))
        f1, f2 = torch.where(left, nf, f2), torch.where(left, f1, nf)  # the kept interior point keeps its value
        x1, x2 = nx1, nx2
    p = torch.where(f1 <= f2, x1, x2)
    a, b, sse = _line(c, t.unsqueeze(0) ** p.unsqueeze(1))
    # The golden section resolves p only to ~sqrt(eps) (the sum of squares is flat at its minimum); a few
    # Gauss-Newton steps on the residuals themselves take exact data to round-off. A step is kept only where it
    # lowers the sum of squares and leaves p inside the range.
    logt = torch.log(t)
    for _ in range(3):
        tp = t.unsqueeze(0) ** p.unsqueeze(1)  # [B, n]
        res = c - a.unsqueeze(1) * tp - b.unsqueeze(1)
        J = torch.stack([tp, a.unsqueeze(1) * tp * logt, torch.ones_like(tp)], -1)  # [B, n, 3]
        step = torch.linalg.lstsq(J, res.unsqueeze(-1)).solution.squeeze(-1)  # [B, 3]
        p_new = p + step[:, 1]
        ok_p = torch.isfinite(step).all(-1) & (p_new >= lo) & (p_new <= hi)
        a_new, b_new, sse_new = _line(c, t.unsqueeze(0) ** p_new.where(ok_p, p).unsqueeze(1))
        ok = ok_p & (sse_new <= sse)
        p, a, b, sse = p.where(~ok, p_new), a.where(~ok, a_new), b.where(~ok, b_new), sse.where(~ok, sse_new)
    # Rows that never moved (or are constant): a = 0 exactly, p = 1, b = their mean; no 0/0 anywhere.
    scale = (c * c).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    flat = ss_tot <= 1e-24 * scale
    a = torch.where(flat, 0.0, a)
    p = torch.where(flat, 1.0, p)
    b = torch.where(flat, cm.squeeze(-1), b)
    if B == 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    return torch.stack([a, p, b], -1)


def _vandermonde(u: torch.Tensor, degree: int) -> torch.Tensor:
    return u.unsqueeze(-1) ** torch.arange(degree + 1, dtype=torch.float64)


def _eval(family: str, params: torch.Tensor, x, t_center: float, t_scale: float) -> torch.Tensor:
    """``c(x)`` for parameters ``[..., k]``; ``x`` a float or a tensor broadcastable to ``params[..., 0]``."""
    if family == "linear":
        return params[..., 0] * x + params[..., 1]
    if family == "log":
        return params[..., 0] * (torch.log(x) if torch.is_tensor(x) else math.log(x)) + params[..., 1]
    if family == "power":
        return params[..., 0] * torch.as_tensor(x, dtype=torch.float64) ** params[..., 1] + params[..., 2]
    u = (x - t_center) / t_scale
    out = params[..., -1] * 1.0
    for j in range(params.shape[-1] - 2, -1, -1):  # Horner
        out = out * u + params[..., j]
    return out


@dataclass(frozen=True)
class Fit:
    """The fitted coefficient curves of a batch of tensors (or of their rank-r components).

    The coefficient of direction ``v`` at step ``t`` is modelled as

    * ``linear``: ``c = a*t + b``, ``params = (a, b)`` (the paper's fit; what :func:`fit_lines` computes);
    * ``power``: ``c = a*t^p + b`` with ``p`` in :data:`POWER_RANGE`, ``params = (a, p, b)``;
    * ``log``: ``c = a*log(t) + b``, ``params = (a, b)``;
    * ``polynomial``: ``c = sum_j q_j u^j`` with ``u = (t - t_center) / t_scale`` (the fitted steps scaled to
      ``[-1, 1]`` for conditioning), ``params = (q_0, ..., q_degree)``;
    * ``mixed``: each entry has its own family (``choice``, indices into :data:`FAMILIES`); ``params`` are padded
      with zeros to the longest family's length.

    Args:
        family (`str`): one of :data:`FAMILIES`, or ``"mixed"``.
        params (`torch.Tensor`): ``[..., k]`` float64 parameters, in the family's order above.
        r2 (`torch.Tensor`): ``[...]`` float64 R^2 on the fitted steps; 1 for a perfect fit (also of a tensor that
            never moved), never NaN.
        steps (`tuple[int]`): the real step numbers the fit used (after ``fit_start`` and ``fit_window``).
        degree (`int`, *optional*): the polynomial degree, when a polynomial is involved.
        t_center (`float`): centre of the fitted steps (used by ``polynomial``).
        t_scale (`float`): half their span (used by ``polynomial``).
        fit_window (`int`, *optional*): the sliding window the fit used, if any.
        choice (`torch.Tensor`, *optional*): ``[...]`` int64, for ``mixed`` only.

    The extrapolated weights are ``theta(H) = theta_0 + coef_at(H) * v``.
    """

    family: str
    params: torch.Tensor
    r2: torch.Tensor
    steps: tuple
    degree: Optional[int] = None
    t_center: float = 0.0
    t_scale: float = 1.0
    fit_window: Optional[int] = None
    choice: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.r2.shape

    def families(self) -> list:
        """The family of every entry, as nested lists of names shaped like :attr:`shape`."""
        if self.choice is None:
            return _nest(torch.zeros(self.shape, dtype=torch.int64), (self.family,))
        return _nest(self.choice, FAMILIES)

    def coef_at(self, horizon: float) -> torch.Tensor:
        """The coefficient at step ``horizon``: ``[...]`` float64.

        Args:
            horizon (`float`): a step number; > 0 where a ``log`` or ``power`` curve is involved.
        """
        return self._coef(float(horizon))

    def coef_at_steps(self, steps) -> torch.Tensor:
        """The coefficients at several steps: ``[..., L]`` float64 for ``steps`` of length ``L``."""
        return self._coef(torch.as_tensor(steps, dtype=torch.float64).flatten())

    def _coef(self, x) -> torch.Tensor:
        vec = torch.is_tensor(x)
        fams = {self.family} if self.choice is None else {FAMILIES[i] for i in torch.unique(self.choice).tolist()}
        low = float(x.min()) if vec and x.numel() else (x if not vec else 1.0)
        if low <= 0 and fams & {"log", "power"}:
            raise _err(f"horizon {low!r}: the {'/'.join(sorted(fams & {'log', 'power'}))} fit is defined for "
                       f"steps > 0 only; pass a positive horizon")
        params = self.params.unsqueeze(-2) if vec else self.params
        if self.choice is None:
            return _eval(self.family, params, x, self.t_center, self.t_scale)
        choice = self.choice.unsqueeze(-1) if vec else self.choice
        out = torch.zeros(self.shape + ((x.numel(),) if vec else ()), dtype=torch.float64)
        for f in sorted(fams):
            k = _n_params(f, self.degree)
            out = torch.where(choice == FAMILIES.index(f), _eval(f, params[..., :k], x, self.t_center, self.t_scale),
                              out)
        return out

    def __getitem__(self, index) -> "Fit":
        """The fit of a subset of the entries (e.g. ``fit[i]``: tensor ``i``, for a per-tensor state entry)."""
        if self.params.dim() == 1:
            raise IndexError("this Fit has no leading dimensions (one curve) to index")
        params = self.params[index]
        choice = None if self.choice is None else self.choice[index]
        return _normalised(replace(self, params=params, r2=self.r2[index], choice=choice))

    def to_json(self) -> dict:
        """A JSON-able dict from which :meth:`from_json` rebuilds this fit exactly (floats round-trip)."""
        d = {
            "family": self.family,
            "params": self.params.tolist(),
            "r2": self.r2.tolist(),
            "steps": [int(s) for s in self.steps],
            "degree": self.degree,
            "t_center": float(self.t_center),
            "t_scale": float(self.t_scale),
            "fit_window": self.fit_window,
        }
        if self.choice is not None:
            d["families"] = self.families()
        return d

    @classmethod
    def from_json(cls, d: dict, steps: Optional[Sequence[int]] = None) -> "Fit":
        """Rebuild a fit from :meth:`to_json`'s dict. A dict with only ``slope`` and ``intercept`` (and ``r2``),
        as older state files record per tensor, loads as a ``linear`` fit (its ``r2`` NaN when not recorded).

        Args:
            d (`dict`): the JSON dict.
            steps (`Sequence[int]`, *optional*): the fitted steps, for a legacy dict that does not record them.
        """
        if "family" not in d:
            if "slope" not in d or "intercept" not in d:
                raise _err("a fit record needs 'family' and 'params' (or, from an older state file, 'slope' and "
                           "'intercept'): the state file is damaged or not a relex state")
            slope = torch.tensor(d["slope"], dtype=torch.float64)
            intercept = torch.tensor(d["intercept"], dtype=torch.float64)
            r2 = torch.tensor(d["r2"], dtype=torch.float64) if "r2" in d else torch.full_like(slope, math.nan)
            st = tuple(int(s) for s in (d.get("steps") or steps or ()))
            return cls("linear", torch.stack([slope, intercept], -1), r2, st)
        fam = d["family"]
        if fam != "mixed" and fam not in FAMILIES:
            raise _err(f"the state records fit family {fam!r}, which this version does not know (it knows "
                       f"{', '.join(FAMILIES)}): upgrade relex_callback to read it")
        choice = None
        if fam == "mixed":
            names = _flatten(d["families"])
            bad = sorted({n for n in names if n not in FAMILIES})
            if bad:
                raise _err(f"the state records fit families {bad}, which this version does not know: upgrade "
                           f"relex_callback to read it")
            r2_shape = torch.tensor(d["r2"], dtype=torch.float64).shape
            choice = torch.tensor([FAMILIES.index(n) for n in names], dtype=torch.int64).reshape(r2_shape)
        params = torch.tensor(d["params"], dtype=torch.float64)
        return cls(fam, params, torch.tensor(d["r2"], dtype=torch.float64),
                   tuple(int(s) for s in (d.get("steps") or steps or ())), d.get("degree"),
                   float(d.get("t_center", 0.0)), float(d.get("t_scale", 1.0)), d.get("fit_window"), choice)

    @staticmethod
    def stack(fits: Sequence["Fit"]) -> "Fit":
        """Stack fits of the same shape along a new leading dimension (e.g. the per-tensor fits of a state file
        back into ``[S, ...]``). Different families give a ``mixed`` fit. The fits must share their steps."""
        fits = list(fits)
        if not fits:
            raise ValueError("Fit.stack needs at least one fit")
        f0 = fits[0]
        for f in fits[1:]:
            if (tuple(f.steps), f.t_center, f.t_scale) != (tuple(f0.steps), f0.t_center, f0.t_scale):
                raise _err("the fits to stack were made on different steps; every tensor of one state must share "
                           "its fitted steps")
        degrees = {f.degree for f in fits if f.degree is not None}
        if len(degrees) > 1:
            raise _err(f"the fits to stack have different polynomial degrees {sorted(degrees)}")
        degree = degrees.pop() if degrees else None
        k = max(f.params.shape[-1] for f in fits)
        params = torch.stack([torch.nn.functional.pad(f.params, (0, k - f.params.shape[-1])) for f in fits])
        choice = torch.stack([f.choice if f.choice is not None
                              else torch.full(f.shape, FAMILIES.index(f.family), dtype=torch.int64) for f in fits])
        out = Fit("mixed", params, torch.stack([f.r2 for f in fits]), tuple(f0.steps), degree, f0.t_center,
                  f0.t_scale, f0.fit_window, choice)
        return _normalised(out)


def _nest(idx: torch.Tensor, names: Sequence[str]):
    if idx.dim() == 0:
        return names[int(idx)]
    return [_nest(x, names) for x in idx]


def _flatten(x) -> list:
    if isinstance(x, str):
        return [x]
    return [y for e in x for y in _flatten(e)]


def _normalised(f: Fit) -> Fit:
    """A ``mixed`` fit whose entries all share one family becomes a fit of that family (parameters trimmed)."""
    if f.choice is None:
        return f
    used = torch.unique(f.choice).tolist()
    if len(used) == 1 or f.choice.numel() == 0:
        fam = FAMILIES[used[0]] if used else "linear"
        k = _n_params(fam, f.degree)
        return replace(f, family=fam, params=f.params[..., :k].contiguous(), choice=None,
                       degree=f.degree if fam == "polynomial" else None)
    return replace(f, family="mixed")


def fit(coeffs: torch.Tensor, steps, mask: Optional[torch.Tensor] = None, family: str = "linear", degree: int = 2,
        fit_window: Optional[int] = None, p_range=POWER_RANGE) -> Fit:
    """Fit a coefficient curve of one family to every row of ``coeffs``, batched, in float64.

    Args:
        coeffs (`torch.Tensor`): ``[..., T]`` coefficients ``c_t = <Delta_t, v>`` (e.g. ``[S]`` or ``[S, r]`` leading
            dimensions; any float dtype).
        steps (`torch.Tensor` or `Sequence[int]`): ``[T]`` the real step numbers of the columns.
        mask (`torch.Tensor`, *optional*): ``[T]`` bool, the steps that may enter the fit (``t >= fit_start``);
            all of them by default.
        family (`str`, *optional*, defaults to `"linear"`): one of :data:`FAMILIES` (see :class:`Fit`).
        degree (`int`, *optional*, defaults to `2`): the polynomial degree (``polynomial`` only), ``>= 1`` and below
            the number of fitted steps.
        fit_window (`int`, *optional*): fit only the last ``fit_window`` steps the mask allows (a sliding window,
            any family); ``2 <= fit_window <=`` that number of steps.
        p_range (`tuple[float, float]`, *optional*, defaults to :data:`POWER_RANGE`): bounds of ``p`` (``power``).

    Returns:
        :class:`Fit`. ``family="linear"`` gives exactly :func:`fit_lines`' slope and intercept.

    Example:
        ```python
        f = fit(solution.coeffs, solution.steps, family="power")
        coef = f.coef_at(500)  # [S, r]; theta(500) = theta_0 + coef * v
        ```
    """
    _check_family(family, degree)
    c = coeffs.to(torch.float64)
    T = c.shape[-1]
    steps_t = torch.as_tensor(steps, dtype=torch.float64).flatten()
    if steps_t.numel() != T:
        raise _err(f"{T} coefficient columns but {steps_t.numel()} step numbers: pass one step per column")
    if mask is None:
        mask = torch.ones(T, dtype=torch.bool)
    mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
    if mask.numel() != T:
        raise _err(f"mask has {mask.numel()} entries but there are {T} steps")
    if family == "power":
        lo, hi = float(p_range[0]), float(p_range[1])
        if not (0 < lo < hi):
            raise _err(f"p_range {tuple(p_range)} must satisfy 0 < low < high, e.g. (0.2, 1.5)")
    idx = _fit_positions(steps_t, mask, family, degree, fit_window)
    t = steps_t[idx]
    fit_steps = tuple(int(round(x)) if float(x).is_integer() else float(x) for x in t.tolist())
    t_center = float((t.max() + t.min()) / 2)
    t_scale = float((t.max() - t.min()) / 2)
    lead = c.shape[:-1]
    cf = c[..., idx]
    common = dict(steps=fit_steps, t_center=t_center, t_scale=t_scale, fit_window=fit_window)
    if family == "linear":
        sel = torch.zeros(T, dtype=torch.bool)
        sel[idx] = True
        slope, intercept, r2 = fit_lines(c, steps_t, sel)
        return Fit("linear", torch.stack([slope, intercept], -1), r2, **common)
    flat = cf.reshape(-1, cf.shape[-1])
    if family == "log":
        a, b, _ = _line(flat, torch.log(t)) if flat.shape[0] else (flat[:, 0], flat[:, 0], None)
        params = torch.stack([a, b], -1)
    elif family == "power":
        params = _fit_power(flat, t, p_range)
    else:
        V = _vandermonde((t - t_center) / t_scale, degree)  # [n, d+1], |u| <= 1
        Q, R = torch.linalg.qr(V)
        params = torch.linalg.solve_triangular(R, Q.T @ flat.T, upper=True).T  # [B, d+1]
    params = params.reshape(*lead, params.shape[-1])
    pred = _eval(family, params.unsqueeze(-2), t, t_center, t_scale)
    r2 = _r2(cf, pred)
    return Fit(family, params, r2, degree=degree if family == "polynomial" else None, **common)


def fit_each(coeffs: torch.Tensor, steps, mask: Optional[torch.Tensor], families: Sequence[str],
             choice: torch.Tensor, degree: int = 2, fit_window: Optional[int] = None, p_range=POWER_RANGE) -> Fit:
    """Fit every entry with its own family: ``families[choice[...]]`` (a per-tensor choice, e.g.
    :attr:`Selection.tensor_choice`). ``choice`` may have fewer leading dimensions than ``coeffs`` (``[S]`` for
    ``[S, r, T]`` coefficients: every component of a tensor gets the tensor's family). Returns a ``mixed``
    :class:`Fit` (or a single-family one when every entry chose the same family)."""
    lead = coeffs.shape[:-1]
    choice = torch.as_tensor(choice, dtype=torch.int64)
    if tuple(lead[: choice.dim()]) != tuple(choice.shape):
        raise _err(f"choice of shape {tuple(choice.shape)} does not match coefficients {tuple(coeffs.shape)}")
    if not families:
        raise _err("families is empty: pass the candidate families that choice indexes")
    for f in families:
        _check_family(f, degree)
    if choice.numel() and (int(choice.min()) < 0 or int(choice.max()) >= len(families)):
        raise _err(f"choice indexes {len(families)} families; got values outside 0..{len(families) - 1}")
    ch = choice.reshape(*choice.shape, *([1] * (len(lead) - choice.dim()))).expand(lead)
    glob = torch.tensor([FAMILIES.index(f) for f in families], dtype=torch.int64)[ch]
    used = [f for f in FAMILIES if bool((glob == FAMILIES.index(f)).any())] or [families[0]]
    fits = {f: fit(coeffs, steps, mask, f, degree, fit_window, p_range) for f in used}
    if len(used) == 1:
        return fits[used[0]]
    k = max(v.params.shape[-1] for v in fits.values())
    any_fit = next(iter(fits.values()))
    params = torch.zeros(*lead, k, dtype=torch.float64)
    r2 = torch.zeros(lead, dtype=torch.float64)
    for f, v in fits.items():
        m = glob == FAMILIES.index(f)
        params = torch.where(m.unsqueeze(-1), torch.nn.functional.pad(v.params, (0, k - v.params.shape[-1])), params)
        r2 = torch.where(m, v.r2, r2)
    degree_out = degree if "polynomial" in fits else None
    return Fit("mixed", params, r2, any_fit.steps, degree_out, any_fit.t_center, any_fit.t_scale, fit_window, glob)


@dataclass(frozen=True)
class Selection:
    """The in-window backtest of every candidate family (:func:`select_family`).

    Attributes:
        families (`tuple[str]`): the candidates, in tie-breaking order.
        scores (`torch.Tensor`): ``[F]`` global relative error ``sqrt(sum err^2 / sum ||Delta_t||^2)`` over every
            tensor and later step.
        tensor_scores (`torch.Tensor`): ``[..., F]`` the same per tensor (0 for a tensor that never moved).
        choice (`str`): the global winner.
        tensor_choice (`torch.Tensor`): ``[...]`` int64, each tensor's winner (index into ``families``).
        per_tensor (`bool`): which of the two the caller asked for.
        skipped (`dict`): candidates that could not be fitted on the first part (family -> why); their scores are
            ``inf`` and they are never chosen.
    """

    families: tuple
    scores: torch.Tensor
    tensor_scores: torch.Tensor
    choice: str
    tensor_choice: torch.Tensor
    per_tensor: bool
    skipped: dict = field(default_factory=dict)

    def refit(self, coeffs: torch.Tensor, steps, mask: Optional[torch.Tensor] = None, degree: int = 2,
              fit_window: Optional[int] = None) -> Fit:
        """Fit the chosen family (or each tensor's) on the whole window: ``coeffs`` ``[S, ...,T]``."""
        if self.per_tensor:
            return fit_each(coeffs, steps, mask, self.families, self.tensor_choice, degree, fit_window)
        return fit(coeffs, steps, mask, self.choice, degree, fit_window)

    def to_json(self) -> dict:
        """Scores and choices for the report."""
        counts = torch.bincount(self.tensor_choice.flatten(), minlength=len(self.families)).tolist()
        return {
            "families": list(self.families),
            "scores": {f: (float(s) if math.isfinite(float(s)) else None) for f, s in zip(self.families, self.scores)},
            "choice": self.choice,
            "per_tensor": self.per_tensor,
            "tensor_choice_counts": dict(zip(self.families, counts)),
            **({"skipped": dict(self.skipped)} if self.skipped else {}),
        }


def _pick(scores: torch.Tensor, tie: float, margin: float = 0.0) -> torch.Tensor:
    """Per row: the first family (the baseline, the line) if its score is within ``best * (1 + margin) + tie`` of
    the row minimum ``best``; otherwise the first family within ``tie`` of the minimum (round-off ties go to the
    earlier family)."""
    best = scores.min(-1, keepdim=True).values
    first = (scores <= best + tie).to(torch.int64).argmax(-1)
    keep = scores[..., 0] <= best.squeeze(-1) * (1.0 + margin) + tie
    return torch.where(keep, torch.zeros_like(first), first)


def backtest_errors(fit_p: Fit, coeffs_on_vP: torch.Tensor, real_sq: torch.Tensor, steps, later_mask):
    """Squared prediction errors ``||c_hat_t v_P - Delta_t||^2 = c_hat^2 - 2 c_hat <Delta_t, v_P> + ||Delta_t||^2``
    (clamped at 0) at the later steps: ``[..., L]`` float64, and the matching ``||Delta_t||^2``."""
    steps_t = torch.as_tensor(steps, dtype=torch.float64).flatten()
    later = torch.as_tensor(later_mask, dtype=torch.bool).flatten()
    tl = steps_t[later]
    d = coeffs_on_vP.to(torch.float64)[..., later]
    q = real_sq.to(torch.float64)[..., later].clamp_min(0)
    ch = fit_p.coef_at_steps(tl)
    return (ch * ch - 2 * ch * d + q).clamp_min(0), q


def select_family(coeffs_on_vP: torch.Tensor, real_sq: torch.Tensor, steps, part_mask, later_mask,
                  families: Sequence[str] = AUTO_FAMILIES, per_tensor: bool = False, degree: int = 2,
                  fit_window: Optional[int] = None, tie: float = _TIE, margin: float = MARGIN) -> Selection:
    """Choose a fit family by the in-window backtest: fit each candidate on the first part ``P`` of the window,
    predict the later recorded deltas, keep the family that predicts them best.

    For tensor i, direction ``v_P`` (the top direction of the first part), the prediction at a later step t is
    ``c_hat_t v_P`` and its error ``||c_hat_t v_P - Delta_t||^2 = c_hat_t^2 - 2 c_hat_t <Delta_t, v_P> +
    ||Delta_t||^2``: all from the Gram, no pass over the weights. (The cosine of a rank-1 prediction with
    ``Delta_t`` is ``sign(c_hat_t) <Delta_t, v_P> / ||Delta_t||``, the same for every family that gets the sign
    right, so it cannot rank families; the error above sees the magnitude.) Global score: ``sqrt(sum err^2 /
    sum ||Delta_t||^2)`` over every tensor and later step; per tensor likewise over its later steps.

    Args:
        coeffs_on_vP (`torch.Tensor`): ``[..., T]`` ``<Delta_t, v_P>`` for every recorded step (e.g. ``[S, T]``).
        real_sq (`torch.Tensor`): ``[..., T]`` ``||Delta_t||^2``.
        steps (`torch.Tensor` or `Sequence[int]`): ``[T]`` real step numbers.
        part_mask (`torch.Tensor`): ``[T]`` bool, the steps of the first part (the fit).
        later_mask (`torch.Tensor`): ``[T]`` bool, the steps to predict (at least one).
        families (`Sequence[str]`, *optional*, defaults to :data:`AUTO_FAMILIES`): the candidates; earlier ones win
            ties (within ``tie``).
        per_tensor (`bool`, *optional*, defaults to `False`): whether :meth:`Selection.refit` uses each tensor's own
            winner instead of the global one. Both are computed either way.
        degree (`int`, *optional*, defaults to `2`): polynomial degree, if ``polynomial`` is a candidate.
        fit_window (`int`, *optional*): the sliding window of the final fit; the part's fit uses its last
            ``min(fit_window, |P|)`` steps.
        tie (`float`, *optional*, defaults to `1e-6`): scores (relative errors) this close to the best count as
            equal; the earlier family wins. Keeps round-off from choosing ``power`` (p = 1.000000001) over an
            exact line.
        margin (`float`, *optional*, defaults to :data:`MARGIN`): the first family (the baseline, normally
            ``linear``) is kept while its score is at most ``best * (1 + margin) + tie``, so another family must
            predict more than ``margin`` better to replace it; ``0``: plain argmin (up to ``tie``).

    Returns:
        :class:`Selection`.
    """
    families = tuple(families)
    if not families:
        raise _err("families is empty: pass at least one of " + ", ".join(FAMILIES))
    for f in families:
        _check_family(f, degree)
    if len(set(families)) != len(families):
        raise _err(f"families {families} lists a family twice")
    c = coeffs_on_vP.to(torch.float64)
    if real_sq.shape != c.shape:
        raise _err(f"real_sq {tuple(real_sq.shape)} must have the shape of coeffs_on_vP {tuple(c.shape)}")
    part = torch.as_tensor(part_mask, dtype=torch.bool).flatten()
    later = torch.as_tensor(later_mask, dtype=torch.bool).flatten()
    T = c.shape[-1]
    if part.numel() != T or later.numel() != T:
        raise _err(f"part_mask and later_mask need {T} entries (one per step), got {part.numel()} and "
                   f"{later.numel()}")
    if not bool(later.any()):
        raise _err("later_mask selects no step: the backtest needs at least one step after the first part")
    n_part = int(part.sum())
    w = None if fit_window is None else min(int(fit_window), n_part)
    errs, skipped = [], {}
    q = real_sq.to(torch.float64)[..., later].clamp_min(0)
    for f in families:
        try:
            fp = fit(c, steps, part, f, degree, w)
        except RelexInputError as exc:  # e.g. power on a 2-step first part: not a candidate in this window
            skipped[f] = f"cannot be fitted on the first part of the window ({n_part} steps): {exc}"
            errs.append(torch.full_like(q, math.inf))
            continue
        errs.append(backtest_errors(fp, c, real_sq, steps, later)[0])
    if len(skipped) == len(families):
        raise _err("in-window backtest: no candidate family can be fitted on the first part of the window: "
                   + "; ".join(f"{f} {r}" for f, r in skipped.items()))
    E = torch.stack(errs, -1)  # [..., L, F]
    num_t = E.sum(-2)  # [..., F]
    den_t = q.sum(-1, keepdim=True)  # [..., 1]
    tensor_scores = torch.where(den_t > 0, (num_t / den_t.clamp_min(1e-300)).sqrt(), torch.zeros_like(num_t))
    lead = tuple(range(E.dim() - 2))
    num = num_t.sum(lead) if lead else num_t
    den = den_t.sum()
    scores = (num / den).sqrt() if float(den) > 0 else torch.zeros_like(num)
    g = int(_pick(scores, tie, margin))
    return Selection(families, scores, tensor_scores, families[g], _pick(tensor_scores, tie, margin),
                     bool(per_tensor), skipped)
