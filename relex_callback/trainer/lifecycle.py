"""The computations of a window's life inside a Trainer, as functions of what each one uses (no window state).

:class:`~.window.Window` calls them in order: at ``on_train_begin`` :func:`read_schedule` (the learning rates read
ahead), :func:`resume_candidates` (where a resumed checkpoint may be) and :func:`outputs_free`; at ``tcut``
:func:`reward_trend_of`, :func:`window_clock`, :func:`run_pipeline` (->
:func:`relex_callback.pipeline.finalize.finalize`) and :func:`window_metrics`. A window refused at ``tcut`` or one
that never reaches it keeps its recorded steps in ``partial_trajectory/`` (:func:`keep_window`) with the
``relex extrapolate --trajectory`` command that finishes it
(:func:`refused_message`, :func:`failure_error`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..compat import model_source_path
from ..core.clock import MAX_RECORDED, resolve, schedule_lrs
from ..core.trend import reward_trend
from ..errors import RelexEndOfWindowError
from ..files.checkpoints import ModelSource
from ..files.fs import check_outputs_free
from ..files.untracked import UNTRACKED_FILE, is_relex_untracked, record_untracked, save_untracked
from ..files.writers import save_adapter_at
from ..params import is_peft_model

logger = logging.getLogger("relex_callback")


# ------------------------------------------------------------------------------------------------ at window open
def read_schedule(s, trainer, state) -> tuple[Optional[tuple], Optional[str]]:
    """``fit_clock="lr"``: the learning rate of every step up to the last horizon (or ``max_steps``), read ahead from
    the trainer's scheduler at window open without stepping it (:func:`relex_callback.core.clock.schedule_lrs`).
    Returns ``((lrs, source) or None, the warning to give once or None)``: a scheduler that cannot be read ahead
    gives the step clock."""
    if s.fit_clock != "lr":
        return None, None
    sched = getattr(trainer, "lr_scheduler", None) if trainer is not None else None
    max_steps = int(getattr(state, "max_steps", 0) or 0)
    lrs, why = schedule_lrs(sched, min(max([s.tcut, *s.horizons]), MAX_RECORDED), max_steps or None)
    if lrs is None:
        return None, f"relex: {why}; the coefficients are fitted on the step (as with fit_clock='steps')"
    inner = getattr(sched, "scheduler", sched) if not hasattr(sched, "lr_lambdas") else sched
    return (lrs, f"the trainer's {type(inner).__name__} (max_steps={max_steps})"), None


def resume_candidates(args, state, record: Optional[dict] = None, resumed_from: Optional[str] = None) -> list:
    """Where the checkpoint training resumed from may be: the path given to ``train(resume_from_checkpoint=PATH)``
    (wherever it is: also a ``cp -r`` copy whose run directory is gone), where this callback saved it (its record in
    the ``trainer_state.json`` the Trainer resumed with), the ``resume_from_checkpoint`` of the arguments,
    ``<output_dir>/checkpoint-<global_step>``. Each is verified (run id, settings, live weights) before it is
    used."""
    return [resumed_from, (record or {}).get("checkpoint"), getattr(args, "resume_from_checkpoint", None),
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]


def outputs_free(s, out_dir: str, model, own_run: Optional[str] = None) -> list:
    """:func:`relex_callback.files.fs.check_outputs_free` for every name a window with settings ``s`` writes for
    ``model``; returns the outputs of run ``own_run`` that a resume replaces."""
    return check_outputs_free(out_dir, s.horizons, s.overwrite, merged=s.merge_lora and is_peft_model(model),
                              plot=s.evaluate_horizons, own_run=own_run)


# ---------------------------------------------------------------------------------------------------- at tcut
def reward_trend_of(s, state):
    """The reward's least-squares trend over the window (``relex_callback.core.trend``) and, when it is measurably not
    rising, the sentence that says so (warned here unless ``on_flat_reward="ignore"``)."""
    trend = reward_trend(state.log_history, s.reward_metric, last=s.tcut)
    if trend.get("rising") is not False or s.on_flat_reward == "ignore":
        if trend.get("rising") is None:
            logger.info("relex: no reward trend over the window (%s)", trend.get("reason"))
        return trend, None
    flat = (f"the reward ({trend['metric']}) did not rise over the window: slope {trend['slope']:.3g} per step "
            f"+- {trend['stderr']:.3g} over {trend['points']} logged steps; extrapolating it is likely harmful")
    if s.on_flat_reward == "warn":
        logger.warning("relex: %s (on_flat_reward='warn': the horizons are written)", flat)
    return trend, flat


def window_clock(s, schedule: Optional[tuple]):
    """The clock of the window at ``tcut`` (:func:`relex_callback.core.clock.resolve`) or ``None`` (the step), and
    the warning to give once when horizons lie beyond the end of the schedule (or ``None``)."""
    if s.fit_clock != "lr" or not schedule:
        return None, None
    lrs, source = schedule
    clock, _why = resolve(lrs, s.tcut, s.horizons, source)
    if clock is not None and max(s.horizons) > clock.end:
        return clock, (f"relex: horizons {[h for h in s.horizons if h > clock.end]} are beyond the end of the "
                       f"learning-rate schedule (step {clock.end}): past it the lr clock counts each step at the "
                       f"window's mean learning rate ({clock.tail_lr:.3g})")
    return clock, None


def window_metrics(report: dict, store, trend: dict, seconds: float) -> dict:
    """The ``relex/*`` metrics of a finished window (``None`` values are dropped when emitted)."""
    summ, bt = report["summary"], report.get("backtest") or {}
    drift = bt.get("direction_cosine")
    return {
        "relex/explained_variance_mean": summ["explained_variance_mean"],
        "relex/explained_variance_min": summ["explained_variance_min"],
        "relex/r2_mean": summ["r2_mean"],
        "relex/solve_seconds": report["solve_seconds"],
        "relex/end_of_window_seconds": seconds,
        "relex/buffer_bytes": store.buffer_bytes,
        "relex/backtest/cosine_global": bt.get("cosine_global"),
        "relex/backtest/norm_ratio_global": bt.get("norm_ratio_global"),
        "relex/backtest/relative_error_global": bt.get("relative_error_global"),
        "relex/backtest/direction_drift": None if drift is None else 1.0 - drift,
        "relex/noise/drift_share": (report.get("noise") or {}).get("drift_share"),
        "relex/reward_trend/slope": trend.get("slope"),
        "relex/reward_trend/stderr": trend.get("stderr"),
    }


# ------------------------------------------------------------------------------------ a window that is kept
def keep_window(store, topology, tracked, keep: str, model, processing_class, step: int) -> tuple[str, str]:
    """Save the recorded steps of ``store`` to ``keep`` (this process's share of ``partial_trajectory/``) for
    ``relex extrapolate --trajectory``; returns ``(keep, the --base to pass)``. When the model (at ``step``) is at
    the last recorded step, the untracked tensors are kept beside them (``untracked.safetensors``): what the callback
    would have written into every horizon."""
    store.save(keep)
    started = model_source_path(model)  # from_pretrained's path, if a directory
    base = started if isinstance(started, str) and os.path.isdir(started) else "<the checkpoint training started from>"
    stale = os.path.join(keep, UNTRACKED_FILE)
    foreign = False
    if os.path.lexists(stale):  # an earlier window's is replaced (never read back as this one's); a user's is left
        foreign = not is_relex_untracked(stale)
        if foreign:
            logger.warning("relex: %s was not written by relex; it was left as it is, and the untracked tensors at "
                           "the last recorded step were not saved beside the trajectory", stale)
        else:
            os.remove(stale)
    if (not foreign and model is not None and not is_peft_model(model) and not topology.is_distributed
            and store.steps and store.steps[-1] == step):
        tensors, meta = record_untracked(ModelSource(model), [t.spec.name for t in tracked])
        if meta:
            save_untracked(keep, tensors, meta, step=step, run_id=store.run_id)
    if is_peft_model(model):  # the adapter at theta_0 is the base the trajectory extrapolates from
        base = os.path.join(keep, "adapter")
        save_adapter_at(model, {t.spec.name: t.param for t in tracked},
                        {t.spec.name: store.theta0_of(t.spec) for t in tracked}, base, processing_class)
    return keep, base


def refused_message(e, rows: int, keep: str, base: str, horizons) -> str:
    """The message of a window refused at ``tcut`` whose recorded steps were kept."""
    return (f"{e}. Nothing was extrapolated; the {rows} recorded steps are kept in {keep}: once "
            f"fixed, extrapolate from them with `relex extrapolate --trajectory {keep} --base {base} --horizons "
            f"{','.join(map(str, horizons))} --out DIR` (its --fit/--fit-window/--degree as needed)")


def failure_error(e, horizons, out_dir, written, rows, keep, base, kept_error) -> RelexEndOfWindowError:
    """The one error of an unexpected failure at the end of the window (``e``): the state file holds the window
    (``written``), or the recorded steps were kept in ``keep``, or keeping them failed too (``kept_error``). It names
    the command that finishes the job (which writes the bytes the callback would have)."""
    what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    horizons = ",".join(map(str, horizons))
    if written:  # the state file is whole (finalize writes it atomically before any horizon)
        return RelexEndOfWindowError(
            f"relex: the end of the window failed after the state file was written ({what}). The state file in "
            f"{out_dir} holds the window: write the horizons with `relex materialize --state {out_dir} --base <the "
            f"checkpoint training started from> --horizons {horizons} --out DIR`")
    if kept_error is not None:
        return RelexEndOfWindowError(
            f"relex: the end of the window failed ({what}), and keeping the recorded window failed too "
            f"({type(kept_error).__name__}: {kept_error}); nothing could be saved")
    return RelexEndOfWindowError(
        f"relex: the end of the window failed ({what}). Nothing was extrapolated; the {rows} recorded "
        f"steps are kept in {keep}: extrapolate from them with `relex extrapolate --trajectory {keep} --base {base} "
        f"--horizons {horizons} --out DIR` (the same files the callback would have written)")
