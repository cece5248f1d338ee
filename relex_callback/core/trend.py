"""Reward trend over the window, from the trainer's own log (no torch needed).

At ``tcut`` the question "is training still improving?" has a cheap answer in ``state.log_history``: fit a line to
the logged reward against the step over the window and ask whether its slope is clearly positive. The slope's
standard error comes from the residuals of the same least-squares fit,

    slope = sum (t - t_mean)(r - r_mean) / sum (t - t_mean)^2,
    stderr = sqrt( sum residual^2 / (n - 2) / sum (t - t_mean)^2 ),

and the trend is called rising when ``slope > 2 * stderr`` (about a 95% one-sided test for independent noise;
logged rewards are averages over a batch and not quite independent, so read it as a rule of thumb). A reward that
is flat or falling over the window says the extrapolated horizons continue a run that was not improving.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

STEP_KEY = "step"


def default_metric(log_history: Iterable[dict]) -> Optional[str]:
    """The reward key to follow in a log history: ``"reward"`` if any entry has it (GRPO's mean reward), else the
    first key, in order of appearance, that ends with ``"reward"`` or starts with ``"rewards/"`` (a per-function
    reward; keys ending with ``"/std"`` are skipped: a spread is not a reward), else ``None``.

    Args:
        log_history (`Iterable[dict]`): ``TrainerState.log_history``.
    """
    keys = []
    for entry in log_history:
        for k in entry:
            if k not in keys:
                keys.append(k)
    if "reward" in keys:
        return "reward"
    for k in keys:
        if isinstance(k, str) and (k.endswith("reward") or k.startswith("rewards/")) and not k.endswith("/std"):
            return k
    return None


def _number(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:  # numpy / torch scalars
            x = float(x)
        except (TypeError, ValueError):
            return None
    x = float(x)
    return x if math.isfinite(x) else None


def reward_trend(
    log_history: Iterable[dict],
    metric: Optional[str] = None,
    *,
    first: Optional[int] = None,
    last: Optional[int] = None,
) -> dict:
    """Least-squares slope of ``metric`` against the step over ``[first, last]``, with its standard error.

    Args:
        log_history (`Iterable[dict]`): ``TrainerState.log_history`` (a list of dicts; entries without ``"step"`` or
            without the metric are ignored; NaN, infinite and non-numeric values are skipped).
        metric (`str`, *optional*): the key to follow; default :func:`default_metric`.
        first (`int`, *optional*): first step of the window (inclusive); default: no lower bound.
        last (`int`, *optional*): last step of the window (inclusive), normally ``tcut``; default: no upper bound.

    Returns:
        `dict`: ``{"metric", "slope", "stderr", "rising", "points", "first_step", "last_step", "mean", "reason"}``.
        ``slope`` is per optimizer step; ``rising`` is ``slope > 2 * stderr``; ``points`` the number of logged values
        used; ``reason`` is ``None`` when the figures are defined, else why not (metric absent, fewer than 3
        points: then ``stderr`` and ``rising`` are ``None``, and ``slope`` too below 2 points).

    Example:

    ```python
    >>> from relex_callback.core.trend import reward_trend
    >>> reward_trend(trainer.state.log_history, last=75)
    {'metric': 'reward', 'slope': 0.0021, 'stderr': 0.0004, 'rising': True, 'points': 75, ...}
    ```
    """
    history = list(log_history)
    if first is not None and last is not None and first > last:
        raise ValueError(f"reward_trend: first={first} is after last={last}")
    name = metric if metric is not None else default_metric(history)
    out = {"metric": name, "slope": None, "stderr": None, "rising": None, "points": 0, "first_step": None,
           "last_step": None, "mean": None, "reason": None}
    if name is None:
        out["reason"] = "no reward in the log history (no key 'reward', '*reward' or 'rewards/*'); pass the metric name"
        return out
    pts = []
    present = False
    for entry in history:
        if name not in entry:
            continue
        present = True
        t, y = _number(entry.get(STEP_KEY)), _number(entry[name])
        if t is None or y is None:
            continue
        if (first is not None and t < first) or (last is not None and t > last):
            continue
        pts.append((t, y))
    window = f"steps [{first if first is not None else '-inf'}, {last if last is not None else 'inf'}]"
    if not present:
        out["reason"] = f"the metric {name!r} is not in the log history"
        return out
    n = len(pts)
    out["points"] = n
    if n:
        out["first_step"], out["last_step"] = int(min(t for t, _ in pts)), int(max(t for t, _ in pts))
        out["mean"] = sum(y for _, y in pts) / n
    if n < 2:
        out["reason"] = f"{n} logged value(s) of {name!r} in {window}; a trend needs at least 3"
        return out
    tm = sum(t for t, _ in pts) / n
    ym = out["mean"]
    sxx = sum((t - tm) ** 2 for t, _ in pts)
    if sxx == 0:
        out["reason"] = f"every logged value of {name!r} in {window} is at the same step"
        return out
    slope = sum((t - tm) * (y - ym) for t, y in pts) / sxx
    out["slope"] = slope
    if n < 3:
        out["reason"] = f"2 logged values of {name!r} in {window}: a slope but no standard error (needs at least 3)"
        return out
    b = ym - slope * tm
    ssr = sum((y - (slope * t + b)) ** 2 for t, y in pts)
    # round-off of an exactly linear or constant series: a residual below 1e-12 of the values' scale is zero
    scale = sum(y * y for _, y in pts)
    if ssr <= 1e-24 * max(scale, 1e-300):
        ssr = 0.0
    stderr = math.sqrt(ssr / (n - 2) / sxx)
    out["stderr"] = stderr
    out["rising"] = bool(slope > 2 * stderr)
    return out
