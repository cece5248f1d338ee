"""The life of a window inside a Trainer, for :class:`~.callback.RelexCallback` (functions of the callback).

At ``on_train_begin``, :func:`select` picks the tensors this process records and :func:`resume_candidates` lists where
a resumed checkpoint may be. At ``tcut``, :func:`finish` checks the reward trend, picks the writer for the model, runs the one pipeline
(:func:`run_pipeline` -> :func:`relex_callback.pipeline.finalize.finalize`), emits the ``relex/*`` metrics, scores the
horizons when asked (:mod:`.scoring`), releases the buffer and its files, and either stops training or opens
validation mode (:mod:`.validation`). A window refused at ``tcut`` keeps its recorded steps in
``partial_trajectory/`` (:func:`keep_window`) with the ``relex extrapolate --trajectory`` command that finishes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

from ..errors import RelexEndOfWindowError, RelexError, RelexInputError
from ..files.fs import STATE_INDEX_NAME, STATE_NAME
from ..trajectory.persist import RUN_TRAJECTORY_DIR, THETA0_FILE

logger = logging.getLogger("relex_callback")


def begin(cb, state):
    """Start of a ``train()``: ``cb`` goes first in its trainer's callbacks (:func:`~.trainer_link._attach`); an
    instance that already ran a ``train()`` (a sweep loop, a notebook cell run again) drops what that run left
    (:func:`begin_again`), so it records its own window, resumes the one in its checkpoint, or is refused at step 0
    like a new callback. Returns ``(the Trainer or None, the checkpoint train(resume_from_checkpoint=PATH) is resuming
    from, None at step 0)``."""
    from .trainer_link import _attach, _resumed_from

    trainer = _attach(cb)
    if trainer is not None:
        from ..compat import check_versions, trl_in_use

        if trl_in_use(trainer):  # an older TRL than supported gives a different result: refused before step 1
            check_versions(("trl",))
    if cb.__dict__.get("_began"):
        begin_again(cb)
    cb._began = True
    from .notices import start_run

    start_run(state)  # warnings: the main process's only, each once per run
    read_schedule(cb, trainer, state)
    return trainer, (_resumed_from(trainer) if state.global_step > 0 else None)


def read_schedule(cb, trainer, state):
    """``fit_clock="lr"``: the learning rate of every step up to the last horizon (or ``max_steps``), read ahead from
    the trainer's scheduler at window open without stepping it (:func:`relex_callback.core.clock.schedule_lrs`);
    kept as ``cb._schedule = (lrs, source)``. A scheduler that cannot be read ahead: the step clock, said once."""
    from ..core.clock import MAX_RECORDED, schedule_lrs

    cb._schedule = None
    s = cb.settings
    if s.fit_clock != "lr":
        return
    sched = getattr(trainer, "lr_scheduler", None) if trainer is not None else None
    max_steps = int(getattr(state, "max_steps", 0) or 0)
    lrs, why = schedule_lrs(sched, min(max([s.tcut, *s.horizons]), MAX_RECORDED), max_steps or None)
    if lrs is None:
        warn_once(cb, state, f"relex: {why}; the coefficients are fitted on the step (as with fit_clock='steps')")
        return
    inner = getattr(sched, "scheduler", sched) if not hasattr(sched, "lr_lambdas") else sched
    cb._schedule = (lrs, f"the trainer's {type(inner).__name__} (max_steps={max_steps})")


def record_schedule(cb):
    """The learning rates read ahead (:func:`read_schedule`) go with the window's metadata, so that every saved form
    of the window (a checkpoint's ``relex_trajectory/``, ``partial_trajectory/``) is fitted offline on the clock the
    callback uses (``relex extrapolate --trajectory`` reads them)."""
    sched = cb.__dict__.get("_schedule")
    if sched and sched[0] and cb.settings.fit_clock == "lr":
        cb.store.window.update(learning_rates=[float(v) for v in sched[0]], lr_source=str(sched[1]))


def end_run():
    """``on_train_end``: repeated warnings pass again (:mod:`.notices`)."""
    from .notices import end_run as _end

    _end()


def warn_once(cb, state, msg: str):
    """A warning on the main process only, once per callback instance and message (a DDP / ZeRO / FSDP run has one
    callback per process: without the test every process would print it)."""
    seen = cb.__dict__.setdefault("_warned", set())
    topo = cb.__dict__.get("topology")
    main = (getattr(state, "is_world_process_zero", True) if state is not None
            else topo is None or topo.process_rank == 0)
    if msg in seen or not main:
        return
    seen.add(msg)
    logger.warning(msg)


def window_clock(cb, state=None):
    """The clock of the window at ``tcut`` (:func:`relex_callback.core.clock.resolve`), or ``None``: the step."""
    from ..core.clock import resolve

    s = cb.settings
    if s.fit_clock != "lr" or not cb.__dict__.get("_schedule"):
        return None
    lrs, source = cb._schedule
    clock, _why = resolve(lrs, s.tcut, s.horizons, source)
    if clock is not None and max(s.horizons) > clock.end:
        warn_once(cb, state, f"relex: horizons {[h for h in s.horizons if h > clock.end]} are beyond the end of the "
                             f"learning-rate schedule (step {clock.end}): past it the lr clock counts each step at the "
                             f"window's mean learning rate ({clock.tail_lr:.3g})")
    return clock


def begin_again(cb):
    """Drop the window, validation and report a previous ``train()`` left on ``cb`` (its settings stay)."""
    if cb.store is not None:
        cb.store.release()
    cb._release()
    cb.store, cb.tracked, cb.topology, cb.validation, cb.report = None, [], None, None, None
    cb.done, cb.skipped_steps, cb._pending_logs, cb._scoring, cb._run_id = False, [], {}, False, None
    cb._replace_own = None


def check_outputs(cb, out_dir: str, model, own_run: Optional[str] = None) -> list:
    """Every name the window will write is free (or relex's own, with ``overwrite``), derived ones too
    (``step-H-merged/``, state shards, report, plot): a refusal now costs nothing, at ``tcut`` it costs the window.
    ``own_run``: the run id of the window a resume continues; outputs that are all that run's (it passed ``tcut``
    after the checkpoint it resumes from, then stopped) are returned, to be replaced at ``tcut``."""
    from ..files.fs import check_outputs_free
    from ..params import is_peft_model

    s = cb.settings
    try:
        return check_outputs_free(out_dir, s.horizons, s.overwrite, merged=s.merge_lora and is_peft_model(model),
                                  plot=s.evaluate_horizons, own_run=own_run)
    except RelexInputError as e:
        raise switch_named(cb, e) from None


def switch_named(cb, e):
    """``e`` naming this callback's overwrite switch: ``overwrite=True``, or ``--relex_overwrite`` for a callback
    built by ``RelexCallback.from_config`` (a ``TrlParser`` / ``HfArgumentParser`` run)."""
    from ..errors import name_switch

    return name_switch(e, cb.__dict__.get("_entry", "callback"))


def nonfinite_step(cb, step: int, e):
    """A non-finite delta at ``step``: a divergence of this run (a non-finite base was refused before step 1, on every
    process: :func:`relex_callback.trajectory.window.check_base_finite`): an error (``on_nonfinite="error"``) or the
    step skipped with a warning."""
    from ..errors import RelexNonFiniteError

    if cb.settings.on_nonfinite != "skip":
        raise RelexNonFiniteError(f"relex: {e}. Training stopped (on_nonfinite='error'); no checkpoint was "
                                  "written from it. Pass on_nonfinite='skip' to drop such steps") from None
    cb.skipped_steps.append(int(step))
    logger.warning("relex: %s; step skipped (on_nonfinite='skip', %d skipped so far)", e, len(cb.skipped_steps))


def resume_candidates(args, state, record: Optional[dict] = None, resumed_from: Optional[str] = None) -> list:
    """Where the checkpoint training resumed from may be: the path given to ``train(resume_from_checkpoint=PATH)``
    (wherever it is: also a ``cp -r`` copy whose run directory is gone), where this callback saved it (its record in
    the ``trainer_state.json`` the Trainer resumed with), the ``resume_from_checkpoint`` of the arguments,
    ``<output_dir>/checkpoint-<global_step>``. Each is verified (run id, settings, live weights) before it is
    used."""
    return [resumed_from, (record or {}).get("checkpoint"), getattr(args, "resume_from_checkpoint", None),
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]


def select(cb, model):
    """The tensors this process records (``cb.tracked``) and the process layout (``cb.topology``)."""
    from ..params import is_peft_model, select_names, trainable_named_parameters
    from .topology import Topology, deepspeed_engine

    named = trainable_named_parameters(model)
    if not named:
        raise RelexInputError("the model has no trainable floating-point parameters to track")
    keep = set(select_names([n for n, _ in named], cb.settings.include, cb.settings.exclude))
    cb.topology = Topology.from_model(model)
    if cb.topology.is_distributed and is_peft_model(model):
        raise RelexInputError(
            f"RelexCallback does not support PEFT (LoRA) models in distributed runs ({cb.topology.describe()}): "
            "the adapter directories are written by PEFT's save_pretrained on one process. Train the adapter on one "
            "process, or merge the adapter / train the full model under DDP, ZeRO or FSDP2"
        )
    trainer = cb._trainer() if cb.__dict__.get("_trainer") is not None else None
    # under DeepSpeed mixed precision the fp32 master weights are recorded (topology's module docstring)
    cb.tracked = cb.topology.track([(n, p) for n, p in named if n in keep], engine=deepspeed_engine(trainer))


def keep_window(cb, args, kwargs, step: int) -> tuple[str, str]:
    """Save the recorded steps to ``<output_dir>/partial_trajectory`` (this process's share) for
    ``relex extrapolate --trajectory``; returns ``(directory, the --base to pass)``. When the model (at ``step``) is
    at the last recorded step, the untracked tensors are kept beside them (``untracked.safetensors``): what the
    callback would have written into every horizon."""
    from ..files.untracked import UNTRACKED_FILE
    from ..params import is_peft_model

    keep = cb.topology.trajectory_dir(os.path.join(cb._out_dir(args), "partial_trajectory"))
    cb.store.save(keep)
    model = kwargs.get("model")
    started = getattr(getattr(model, "config", None), "_name_or_path", None)  # from_pretrained's path, if a directory
    base = started if isinstance(started, str) and os.path.isdir(started) else "<the checkpoint training started from>"
    stale = os.path.join(keep, UNTRACKED_FILE)
    foreign = False
    if os.path.lexists(stale):  # an earlier window's is replaced (never read back as this one's); a user's is left
        from ..files.untracked import is_relex_untracked

        foreign = not is_relex_untracked(stale)
        if foreign:
            logger.warning("relex: %s was not written by relex; it was left as it is, and the untracked tensors at "
                           "the last recorded step were not saved beside the trajectory", stale)
        else:
            os.remove(stale)
    if (not foreign and model is not None and not is_peft_model(model) and not cb.topology.is_distributed and cb.store.steps
            and cb.store.steps[-1] == step):
        from ..files.checkpoints import ModelSource
        from ..files.untracked import record_untracked, save_untracked

        tensors, meta = record_untracked(ModelSource(model), [t.spec.name for t in cb.tracked])
        if meta:
            save_untracked(keep, tensors, meta, step=step, run_id=cb.store.run_id)
    if is_peft_model(model):  # the adapter at theta_0 is the base the trajectory extrapolates from
        from ..files.writers import save_adapter_at

        base = os.path.join(keep, "adapter")
        save_adapter_at(model, {t.spec.name: t.param for t in cb.tracked},
                        {t.spec.name: cb.store.theta0_of(t.spec) for t in cb.tracked}, base,
                        kwargs.get("processing_class"))
    return keep, base

def finish(cb, args, state, control, kwargs):
    """The end of the window at ``tcut``: the pipeline, the metrics, scoring, then stop or validate."""
    from ..files.writers import model_writer

    s, out_dir, model = cb.settings, cb._out_dir(args), kwargs.get("model")
    t0 = time.perf_counter()
    trend, flat = reward_trend_of(cb, state)
    writer = model_writer(model, kwargs.get("processing_class"), cb.topology, cb.tracked,
                          max_shard_size=s.max_shard_size, merge_lora=s.merge_lora)
    sol = _pipeline_or_keep(cb, args, kwargs, writer, out_dir, model, trend, flat)
    cb.end_of_window_seconds = time.perf_counter() - t0
    _emit_metrics(cb, trend, cb.end_of_window_seconds, control)
    if flat and s.on_flat_reward == "error":
        cb.done = True
        store, cb.store = cb.store, None
        store.release()
        cb._release()
        raise RelexInputError(f"relex: {flat}; on_flat_reward='error': the state file and report.json are in "
                              f"{out_dir} but no horizon was written (write them anyway with `relex materialize`, "
                              "or pass on_flat_reward='warn')")
    if s.evaluate_horizons:  # before the store is released: scoring needs theta_0 (scoring.py)
        from .scoring import score_at_tcut

        score_at_tcut(cb, cb._trainer() if cb._trainer is not None else None, sol, cb.store, model, out_dir, control)
    from .notices import summary

    summary(cb, out_dir, state, model)  # the one summary of the window, printed by the main process
    _close_window(cb, state, control, sol, out_dir)


def _pipeline_or_keep(cb, args, kwargs, writer, out_dir, model, trend, flat):
    """:func:`run_pipeline`; a window refused at ``tcut`` keeps its recorded steps (unless the state file holds them
    already) and the error says how to finish from them."""
    s, start_wall = cb.settings, time.time() - 1.0  # (file times may be rounded to the second)
    try:
        sol, cb.report = run_pipeline(cb, writer, s, out_dir, model, trend, flat)
        return sol
    except RelexInputError as e:  # refused at tcut: keep the window unless the state file holds it already
        cb._release()
        written = any(os.path.isfile(p) and os.path.getmtime(p) >= start_wall for p in
                      (os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)))
        e = switch_named(cb, e)
        if written or cb.store is None or not cb.store.num_rows:  # the state file holds the window
            raise e from None
        keep, base = keep_window(cb, args, kwargs, cb.settings.tcut)  # the model is at tcut
        raise type(e)(
            f"{e}. Nothing was extrapolated; the {cb.store.num_rows} recorded steps are kept in {keep}: once "
            f"fixed, extrapolate from them with `relex extrapolate --trajectory {keep} --base {base} --horizons "
            f"{','.join(map(str, s.horizons))} --out DIR` (its --fit/--fit-window/--degree as needed)"
        ) from None
    except Exception as e:  # anything else (a kernel, CUDA, out of memory, a bug): the window is never lost
        written = any(os.path.isfile(p) and os.path.getmtime(p) >= start_wall for p in
                      (os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)))
        if isinstance(e, RelexError) or cb.store is None or not cb.store.num_rows:
            cb._release()
            raise
        raise _kept_after_failure(cb, args, kwargs, e, out_dir, written) from e
    except BaseException:
        cb._release()  # the output directory is no longer in use (relex materialize may finish it)
        raise


def _kept_after_failure(cb, args, kwargs, e, out_dir, written) -> "RelexEndOfWindowError":
    """An unexpected error at the end of the window: the recorded window (the ring, wherever it lives, written out
    first) is kept in ``partial_trajectory/`` unless the state file already holds it, and one error names the
    command that finishes the job (it writes the bytes the callback would have)."""
    s = cb.settings
    what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    horizons = ",".join(map(str, s.horizons))
    if written:  # the state file is whole (finalize writes it atomically before any horizon)
        cb._release()
        return RelexEndOfWindowError(
            f"relex: the end of the window failed after the state file was written ({what}). The state file in "
            f"{out_dir} holds the window: write the horizons with `relex materialize --state {out_dir} --base <the "
            f"checkpoint training started from> --horizons {horizons} --out DIR`")
    try:
        keep, base = keep_window(cb, args, kwargs, cb.settings.tcut)  # the model is at tcut
    except Exception as e2:  # noqa: BLE001 - said, with the first error
        cb._release()
        return RelexEndOfWindowError(
            f"relex: the end of the window failed ({what}), and keeping the recorded window failed too "
            f"({type(e2).__name__}: {e2}); nothing could be saved")
    cb._release()
    return RelexEndOfWindowError(
        f"relex: the end of the window failed ({what}). Nothing was extrapolated; the {cb.store.num_rows} recorded "
        f"steps are kept in {keep}: extrapolate from them with `relex extrapolate --trajectory {keep} --base {base} "
        f"--horizons {horizons} --out DIR` (the same files the callback would have written)")


def _emit_metrics(cb, trend, seconds, control):
    summ, bt = cb.report["summary"], cb.report.get("backtest") or {}
    drift = bt.get("direction_cosine")
    cb._emit({
        "relex/explained_variance_mean": summ["explained_variance_mean"],
        "relex/explained_variance_min": summ["explained_variance_min"],
        "relex/r2_mean": summ["r2_mean"],
        "relex/solve_seconds": cb.report["solve_seconds"],
        "relex/end_of_window_seconds": seconds,
        "relex/buffer_bytes": cb.store.buffer_bytes,
        "relex/backtest/cosine_global": bt.get("cosine_global"),
        "relex/backtest/norm_ratio_global": bt.get("norm_ratio_global"),
        "relex/backtest/relative_error_global": bt.get("relative_error_global"),
        "relex/backtest/direction_drift": None if drift is None else 1.0 - drift,
        "relex/noise/drift_share": (cb.report.get("noise") or {}).get("drift_share"),
        "relex/reward_trend/slope": trend.get("slope"),
        "relex/reward_trend/stderr": trend.get("stderr"),
    }, control)


def _close_window(cb, state, control, sol, out_dir):
    """Release the buffer and the run's trajectory files (the state file and the horizons hold the result now), then
    stop training, or open validation mode (which keeps theta_0 for its checkpoints)."""
    s = cb.settings
    cb.done = True
    store, cb.store = cb.store, None
    store.release()
    freed = store.discard_files(keep=() if s.stop_training else (THETA0_FILE,))
    if freed:
        logger.info("relex: removed the run's trajectory files %s (%.2f GiB); the trainer checkpoints inside the "
                    "window keep theirs in relex_trajectory/", store.directory, freed / 2**30)
    if s.stop_training:
        cb._release()
        control.should_training_stop = True
        return
    from .validation import Validation

    pending = sorted(h for h in s.horizons if h > state.global_step)
    late = [h for h in pending if state.max_steps and h > state.max_steps]
    if late:
        logger.warning("relex: validation horizons %s are beyond max_steps=%d and will not be reached", late,
                       state.max_steps)
    cb.validation = Validation(sol, store.theta0, store.specs, pending, cb.tracked, cb.topology, s.tcut)
    link_theta0(cb, out_dir)


def run_pipeline(cb, writer, s, out_dir, model, trend, flat):
    """The end-of-window pipeline with this run's settings and report entries."""
    from ..params import is_peft_model
    from ..pipeline.finalize import BufferedSolve, finalize

    solver = BufferedSolve(cb.store, reduce=cb.topology.reduce_grams if cb.topology.sharded else None,
                           skipped_nonfinite=cb.skipped_steps, clock=window_clock(cb))
    if cb._replace_own is not None and cb._replace_own == cb.store.run_id and not s.overwrite:
        # a resumed window replaces what its own run wrote at tcut before it stopped: checked again now (it was at
        # on_train_begin) that every output there still carries this run id, so nothing that appeared since (a
        # user's file, another run's output) is replaced; it is refused like any taken name
        check_outputs(cb, out_dir, model, own_run=cb._replace_own)
        s = dataclasses.replace(s, overwrite=True)
    return finalize(
        solver, writer, s, out_dir=out_dir, kept=cb.store.directory if cb.store.storage == "disk" else None,
        skip_horizons=flat if s.on_flat_reward == "error" else None,
        report_extra={"recorded": cb.topology.recorded, "skipped_nonfinite_steps": list(cb.skipped_steps),
                      "reward_trend": trend,
                      "skipped_unchanged_steps": list(cb.store.skipped_unchanged_steps),
                      "format": "peft_adapter" if is_peft_model(model) else "full"},
    )

def link_theta0(cb, out_dir: str):
    """Validation checkpoints link theta_0 from ``<out_dir>/trajectory/`` instead of writing it each time."""
    if cb.validation is not None:
        cb.validation.theta0_file = os.path.join(
            cb.topology.trajectory_dir(os.path.join(out_dir, RUN_TRAJECTORY_DIR)), THETA0_FILE)

def reward_trend_of(cb, state):
    """The reward's least-squares trend over the window (``relex_callback.core.trend``) and, when it is measurably not
    rising, the sentence that says so (warned here unless ``on_flat_reward="ignore"``)."""
    from ..core.trend import reward_trend

    s = cb.settings
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
