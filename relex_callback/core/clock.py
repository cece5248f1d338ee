"""The fit's clock: the axis the coefficient of each direction is fitted against and each horizon is placed on.

Under Adam-like optimizers a step moves the weights by about ``lr_s`` times a slowly changing vector, so when the
learning rate follows a schedule (warmup, linear decay, cosine) the coefficient grows with the cumulative learning
rate ``tau(t) = sum_{s<=t} lr_s`` rather than with the step ``t``. The lr clock fits ``c = a x + b`` on

    x(t) = ref * tau(t) / tau(ref)        (ref = tcut: x(tcut) = tcut)

and writes horizon ``H`` at ``x(H)``, both from the same learning rates. The scale ``ref / tau(ref)`` only makes
``x`` read as "steps at the window's mean learning rate"; a line in ``x`` is a line in ``tau``. With a constant
learning rate ``x(t) = t``; :func:`resolve` then returns ``None`` and every caller takes the plain step path, so
the two clocks give the same bytes (the sums above would differ from ``t`` by round-off).

``lrs[s - 1]`` is the learning rate of optimizer step ``s`` (the one that produced ``theta_s``). A Trainer's
scheduler starts at ``last_epoch = 0`` and steps once per optimizer step, so step ``s`` runs with
``base_lr * lr_lambda(s - 1)``. Beyond the recorded learning rates (after the end the schedule was built for,
``max_steps``) the clock runs at the window's mean learning rate ``tau(ref) / ref``: one step there counts as one
step, as on the step clock, since the schedule says nothing about steps it does not have. See docs/schedule.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

CLOCKS = ("lr", "steps")
MAX_RECORDED = 200_000  # learning rates recorded in a state file at most (beyond: the last one held)


@dataclass(frozen=True)
class Clock:
    """The lr clock of a window (see the module docstring).

    Args:
        lrs (`tuple[float]`): the learning rate of optimizer steps ``1..len(lrs)``.
        ref (`int`): the reference step (``tcut``) where ``x(ref) = ref``.
        source (`str`): where the learning rates came from (for the report).
    """

    lrs: tuple
    ref: int
    source: str = ""
    _cum: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        cum, acc = [0.0], 0.0
        for v in self.lrs:  # sequential float64 sums: the same values on every platform
            acc += float(v)
            cum.append(acc)
        object.__setattr__(self, "_cum", tuple(cum))

    def tau(self, t: float) -> float:
        """The cumulative learning rate up to step ``t`` (linear between whole steps; 0 at ``t <= 0``)."""
        t = float(t)
        if t <= 0:
            return 0.0
        n = len(self.lrs)
        k = int(math.floor(t))
        if k >= n:
            return self._cum[n] + (t - n) * self.tail_lr
        return self._cum[k] + (t - k) * float(self.lrs[k])

    @property
    def tail_lr(self) -> float:
        """The rate after the recorded learning rates: the window's mean, ``tau(ref) / ref``."""
        return self._cum[min(self.ref, len(self.lrs))] / min(self.ref, len(self.lrs))

    @property
    def end(self) -> int:
        """The last step with a recorded learning rate (the schedule's end, ``max_steps``)."""
        return len(self.lrs)

    def at(self, t: float) -> float:
        """``x(t) = ref * tau(t) / tau(ref)``: the step ``t`` on the clock's axis."""
        return float(self.ref) * self.tau(t) / self.tau(self.ref)

    def at_steps(self, steps) -> torch.Tensor:
        """``x`` at each of ``steps``: ``[T]`` float64."""
        return torch.tensor([self.at(float(s)) for s in steps], dtype=torch.float64)

    def to_json(self) -> dict:
        return {
            "kind": "lr",
            "ref": int(self.ref),
            "source": self.source,
            "learning_rates": [float(v) for v in self.lrs],
        }

    def summary(self, horizons: Sequence[int] = ()) -> dict:
        """What the report shows: the source, the mean learning rate over the window and where each horizon went."""
        return {"kind": "lr", "source": self.source, "ref": int(self.ref),
                "window_mean_lr": self.tau(self.ref) / self.ref,
                "horizons_on_clock": {str(int(h)): self.at(h) for h in horizons}}

    @classmethod
    def from_json(cls, d: Optional[dict]) -> Optional["Clock"]:
        if not d or d.get("kind", "steps") == "steps":
            return None
        lrs = d.get("learning_rates")
        if (not isinstance(lrs, list) or not lrs or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                                             for v in lrs) or not isinstance(d.get("ref"), int)):
            raise ValueError("a clock needs 'learning_rates' (finite numbers >= 0) and an integer 'ref'")
        return cls(tuple(float(v) for v in lrs), int(d["ref"]), str(d.get("source", "")))


def resolve(lrs: Optional[Sequence[float]], tcut: int, horizons: Sequence[int], source: str = "") -> tuple:
    """The clock for a window: ``(Clock or None, why None)``. ``None`` (the step path) when there are no learning
    rates, when they are constant over the window and every horizon (then ``x(t) = t`` and the step path gives the
    same result exactly), or when they do not reach ``tcut`` or sum to 0 over the window."""
    if not lrs:
        return None, "no learning rates"
    lrs = [float(v) for v in lrs]
    if not all(math.isfinite(v) and v >= 0 for v in lrs):
        return None, "the learning rates are not all finite and >= 0"
    if len(lrs) < tcut:
        return None, f"learning rates known for {len(lrs)} steps only, fewer than tcut={tcut}"
    span = lrs[: max([int(tcut)] + [int(h) for h in horizons])]
    if all(v == span[0] for v in span):
        return None, "the learning rate is constant over the window and the horizons"
    c = Clock(tuple(lrs[:MAX_RECORDED]), int(tcut), source)
    if not c.tau(tcut) > 0:
        return None, "the learning rate is 0 over the whole window"
    return c, None


def lrs_from_log(log_history: Sequence[dict], upto: int) -> Optional[list]:
    """The learning rates of steps ``1..n`` from a Trainer's ``log_history`` (``learning_rate`` entries, logged at
    step ``t`` with the learning rate step ``t`` ran with; between logged steps the rate is interpolated linearly,
    before the first logged step the first value is used). ``n`` is the last logged step, at most ``upto``;
    ``None`` when nothing was logged."""
    pts = {}
    for e in log_history or ():
        if isinstance(e, dict) and isinstance(e.get("learning_rate"), (int, float)) and isinstance(e.get("step"), int):
            if e["step"] >= 1:
                pts[int(e["step"])] = float(e["learning_rate"])
    if not pts:
        return None
    ks = sorted(pts)
    n = min(ks[-1], int(upto))
    out = []
    j = 0
    for s in range(1, n + 1):
        while j + 1 < len(ks) and ks[j + 1] <= s:
            j += 1
        if s <= ks[0]:
            out.append(pts[ks[0]])
        elif ks[j] == s or j + 1 >= len(ks):
            out.append(pts[ks[j]])
        else:
            a, b = ks[j], ks[j + 1]
            out.append(pts[a] + (pts[b] - pts[a]) * (s - a) / (b - a))
    return out


def schedule_lrs(scheduler, n: int, max_steps: Optional[int] = None) -> tuple:
    """The learning rates of optimizer steps ``1..n`` from a learning-rate scheduler, without stepping it:
    ``(lrs, None)``, or ``(None, why not)``.

    Whatever ``transformers.get_scheduler`` builds except ``reduce_lr_on_plateau`` is a ``LambdaLR`` (constant,
    warmup, linear, cosine, cosine with restarts or a floor, polynomial, inverse sqrt, warmup-stable-decay): step
    ``s`` runs with ``base_lrs[0] * lr_lambdas[0](s - 1)``, read from the pure function, never from the scheduler's
    state. A wrapper holding the scheduler as ``.scheduler`` (accelerate's) is looked through. Only steps up to
    ``max_steps`` (the end the schedule was built for) are read: a cosine's function is not meant to be read beyond
    its end (:class:`Clock` runs at the window's mean rate there). Anything else (a scheduler stepped on metrics, a
    chain, a custom class)
    cannot be read ahead: the reason names its class."""
    sched = scheduler
    for _ in range(3):
        if hasattr(sched, "lr_lambdas") or not hasattr(sched, "scheduler"):
            break
        sched = sched.scheduler
    name = type(sched).__name__
    if sched is None:
        return None, "the trainer has no learning-rate scheduler"
    lambdas, base = getattr(sched, "lr_lambdas", None), getattr(sched, "base_lrs", None)
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR) or not lambdas or not base:
        return None, f"the learning-rate scheduler {name} cannot be read ahead (only LambdaLR schedules can)"
    end = int(n) if not max_steps or max_steps <= 0 else min(int(n), int(max_steps))
    try:
        fn, b = lambdas[0], float(base[0])
        lrs = [b * float(fn(s - 1)) for s in range(1, end + 1)]
    except Exception as e:  # a user's lambda that fails on a future step
        return None, f"the learning-rate scheduler {name} failed when read ahead ({type(e).__name__}: {e})"
    if not lrs or not all(math.isfinite(v) and v >= 0 for v in lrs):
        return None, f"the learning-rate scheduler {name} gives learning rates that are not finite and >= 0"
    return lrs, None
