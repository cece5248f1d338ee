"""The lr clock of ``relex extrapolate`` (:mod:`relex_callback.core.clock`): the learning rates come from a schedule
given as an option (``--schedule``), else from the ``learning_rate`` entries of the run's ``trainer_state.json`` log
history; without either (or when they do not reach the last horizon) the fit is on the step, and a warning says
why."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional, Sequence

from ..errors import RelexInputError

logger = logging.getLogger("relex_callback")

SCHEDULE_HELP = ("NAME[,warmup=W][,total=N][,KEY=VALUE...]: the learning-rate schedule of the run as "
                 "transformers.get_scheduler builds it (constant, constant_with_warmup, linear, cosine, "
                 "cosine_with_restarts, polynomial, inverse_sqrt, warmup_stable_decay, cosine_with_min_lr, ...): "
                 "W warmup steps, N the max_steps it was built for (default: the last horizon), other keys its "
                 "scheduler_specific_kwargs (e.g. num_decay_steps=20, min_lr_rate=0.1)")


def parse_schedule(spec: str) -> tuple[str, int, Optional[int], dict]:
    """``NAME[,warmup=W][,total=N][,KEY=VALUE...]`` -> ``(name, warmup, total, kwargs)``."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts or "=" in parts[0]:
        raise RelexInputError(f"--schedule {spec!r}: start with the schedule's name, e.g. --schedule linear,warmup=10")
    name, warmup, total, kw = parts[0], 0, None, {}
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise RelexInputError(f"--schedule {spec!r}: {p!r} is not KEY=VALUE")
        try:
            num = float(value) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value) else None
        except ValueError:
            num = None
        if key in ("warmup", "total"):
            if num is None or num != int(num) or num < 0:
                raise RelexInputError(f"--schedule {spec!r}: {key} must be a whole number of steps, got {value!r}")
            if key == "warmup":
                warmup = int(num)
            else:
                total = int(num)
        else:
            kw[key] = (int(num) if num is not None and num == int(num) and "." not in value and "e" not in value.lower()
                       else num if num is not None else value)
    return name, warmup, total, kw


def schedule_option_lrs(spec: str, n: int) -> tuple[list, str]:
    """The learning rates of steps ``1..n`` of the schedule ``spec`` (base rate 1: the clock is scale-free), built
    by ``transformers.get_scheduler`` on a throwaway optimizer and read with
    :func:`relex_callback.core.clock.schedule_lrs`."""
    # deferred: the torch-free command line imports this module (torch only once a schedule is built)
    import torch

    from ..core.clock import schedule_lrs

    name, warmup, total, kw = parse_schedule(spec)
    total = total or int(n)
    try:
        from transformers import get_scheduler

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kw or None)
    except Exception as e:
        raise RelexInputError(f"--schedule {spec!r}: transformers.get_scheduler refused it ({type(e).__name__}: "
                              f"{e})") from None
    lrs, why = schedule_lrs(sched, n, total)
    if lrs is None:
        raise RelexInputError(f"--schedule {spec!r}: {why}; pass a schedule get_scheduler builds as a LambdaLR, or "
                              "--fit-clock steps")
    return lrs, f"--schedule {spec}"


def _step_of(path: str) -> Optional[int]:
    m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def logged_lrs(checkpoint_paths: Sequence[str], upto: int) -> tuple[Optional[list], Optional[str]]:
    """The learning rates in the log history of the run's newest ``trainer_state.json``: the given checkpoints' and
    those of the later checkpoints beside the last one (a run that went on after ``tcut`` logged the rates the
    horizons need). ``(lrs or None, the file)``."""
    from ..core.clock import lrs_from_log  # deferred: core.clock imports torch

    last = os.path.normpath(checkpoint_paths[-1])
    cands = list(checkpoint_paths)
    parent = os.path.dirname(last)
    if os.path.isdir(parent):
        for d in os.listdir(parent):
            p = os.path.join(parent, d)
            if d.startswith("checkpoint-") and os.path.isfile(os.path.join(p, "trainer_state.json")):
                cands.append(p)
    best, best_step = None, -1
    for c in cands:
        f = os.path.join(c, "trainer_state.json")
        s = _step_of(c)
        if os.path.isfile(f) and s is not None and s > best_step:
            best, best_step = f, s
    if best is None:
        return None, None
    try:
        with open(best) as fh:
            hist = json.load(fh).get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return None, best
    return lrs_from_log(hist, upto), best


def offline_clock(checkpoint_paths: Sequence[str], tcut: int, horizons: Sequence[int], fit_clock: str = "lr",
                  schedule: Optional[str] = None, notices: Optional[list] = None):
    """The clock of ``relex extrapolate``: ``None`` (the step) or a :class:`~relex_callback.core.clock.Clock`. With
    ``fit_clock="lr"``: ``schedule`` when given, else the logged learning rates when they reach the last horizon;
    otherwise the step, with one warning saying why and what to pass (appended to ``notices`` when given, for the
    caller to say after the work succeeded)."""
    from ..core.clock import MAX_RECORDED, resolve  # deferred: core.clock imports torch

    if fit_clock not in ("lr", "steps"):
        raise RelexInputError(f"--fit-clock {fit_clock!r} is not one of lr, steps")
    if fit_clock == "steps":
        if schedule:
            raise RelexInputError("--schedule applies to --fit-clock lr; drop one of them")
        return None
    hmax = max(int(h) for h in horizons)
    n = min(max(hmax, tcut), MAX_RECORDED)
    if schedule:
        lrs, source = schedule_option_lrs(schedule, n)
    else:
        lrs, source = logged_lrs(checkpoint_paths, n) if checkpoint_paths else (None, None)
        if not lrs or len(lrs) < min(hmax, MAX_RECORDED):
            if lrs and len(lrs) >= tcut and len(set(lrs[:tcut])) == 1:
                return None  # a constant rate over the window: the step clock is the lr clock there, say nothing
            got = (f"the learning rates logged in {source} end at step {len(lrs)}, before the last horizon {hmax}"
                   if lrs else "no learning rates were found (no trainer_state.json with a learning_rate log "
                   "beside the checkpoints)")
            text = (f"relex: {got}: the coefficients are fitted on the step. Pass --schedule NAME[,warmup=W]"
                    "[,total=N] (the run's lr schedule) to fit on the cumulative learning rate, or --fit-clock steps "
                    "to silence this")
            if notices is None:
                logger.warning("%s", text)
            else:  # said by the caller once the outputs are written: an input error is then the only line
                notices.append(text)
            return None
        source = f"learning_rate log of {source}"
    clock, why = resolve(lrs, tcut, horizons, source)
    if clock is None and schedule:
        logger.info("relex: %s: the step clock is used (the same fit)", why)
    return clock
