"""One window inside a Trainer: its state and the steps of its life, in the order the Trainer's events call them.

:class:`Window` owns what a window holds (the store of recorded deltas, the tracked tensors, the topology, the output
lock, the run id, the outputs of its own run a resume may replace, the metrics waiting for ``on_log``, timings) and
does each step of its life as a method: :meth:`~Window.begin` (a reused instance starts afresh),
:meth:`~Window.open` (:meth:`~Window.select`, :meth:`~Window.check_outputs`, the lock, the store),
:meth:`~Window.step` (a snapshot per recorded step, then :meth:`~Window.finish` at ``tcut``), :meth:`~Window.save`,
:meth:`~Window.log`, :meth:`~Window.end` (:meth:`~Window.keep_window` when training stops before ``tcut``) and
:meth:`~Window.release`. :class:`~.callback.RelexCallback` holds one and forwards the Trainer's events to it; the
steps' computations that need no window state are the functions of :mod:`.lifecycle`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from typing import Optional

from ..errors import RelexError, RelexInputError, RelexNonFiniteError, name_switch
from ..compat import check_versions, trl_in_use
from ..files.fs import STATE_INDEX_NAME, STATE_NAME, check_writable_dir
from ..files.report import REPORT_NAME, write_report
from ..files.writers import model_writer
from ..params import is_peft_model, select_names, trainable_named_parameters
from ..pipeline.finalize import BufferedSolve, finalize
from ..trajectory.persist import RUN_TRAJECTORY_DIR, THETA0_FILE, TRAJECTORY_DIR
from ..files.lock import OutputLock
from ..trajectory.window import open_window, resume_record
from . import lifecycle, notices
from .scoring import score_at_tcut
from .topology import Topology, deepspeed_engine
from .trainer_link import horizon_bytes, resumed_from
from .validation import Validation

logger = logging.getLogger("relex_callback")


class Window:
    """The window of one ``train()`` (a later ``train()`` of the same callback calls :meth:`begin` again, which starts
    afresh).

    Args:
        settings (`RelexSettings`): the callback's validated settings.
    """

    def __init__(self, settings):
        self.settings = settings
        self.entry = "callback"  # "trl_parser": messages name --relex_overwrite (errors.name_switch)
        self.store = None  # TrajectoryStore of the open window
        self.tracked: list = []  # TrackedTensor: this process's pieces
        self.topology: Optional[Topology] = None
        self.validation: Optional[Validation] = None  # after tcut with stop_training=False
        self.done = False
        self.report: Optional[dict] = None
        self.skipped_steps: list[int] = []
        self.pending_logs: dict = {}  # relex/* metrics for the trainer's next on_log
        self.scoring = False  # True while horizons are scored with trainer.evaluate()
        self.lock: Optional[OutputLock] = None  # owns the relex output_dir during the window
        self.step_seen = 0  # last global_step seen (for the record in trainer_state.json)
        self.ckpt_root: Optional[str] = None  # args.output_dir (where checkpoint-N is saved)
        self.run_id: Optional[str] = None
        self.replace_own: Optional[str] = None  # a resumed window's run id whose own outputs it replaces at tcut
        self.schedule: Optional[tuple] = None  # (learning rates read ahead, their source), fit_clock="lr"
        self.warned: set = set()
        self.end_of_window_seconds: Optional[float] = None
        self.began = False
        self._trainer = None  # weakref to the Trainer running this window

    @property
    def trainer(self):
        """The Trainer running this window (found or linked at :meth:`begin`), or ``None``."""
        return self._trainer() if self._trainer is not None else None

    def out_dir(self, args) -> str:
        return self.settings.output_dir or os.path.join(args.output_dir, "relex")

    # ------------------------------------------------------------------------------------------ on_train_begin
    def begin(self, args, state, trainer) -> Optional[str]:
        """Start of a ``train()`` run by ``trainer``: an instance that already ran a ``train()`` (a sweep loop, a
        notebook cell run again) drops what that run left, so it records its own window, resumes the one in its
        checkpoint, or is refused at step 0 like a new callback. Returns the checkpoint
        ``train(resume_from_checkpoint=PATH)`` is resuming from (``None`` at step 0)."""
        if trainer is not None and trl_in_use(trainer):  # an older TRL than supported: refused before step 1
            check_versions(("trl",))
        if self.began:
            self.begin_again()
        self.began = True
        notices.start_run(state)  # warnings: the main process's only, each once per run
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        self.schedule, why = lifecycle.read_schedule(self.settings, trainer, state)
        if why:
            self.warn_once(state, why)
        self.ckpt_root, self.step_seen = args.output_dir, state.global_step
        return resumed_from(trainer) if state.global_step > 0 else None

    def begin_again(self):
        """Drop the window, validation and report a previous ``train()`` left (the settings stay)."""
        if self.store is not None:
            self.store.release()
        self.release()
        self.store, self.tracked, self.topology, self.validation, self.report = None, [], None, None, None
        self.done, self.skipped_steps, self.pending_logs, self.scoring, self.run_id = False, [], {}, False, None
        self.replace_own = None

    def open(self, args, state, model, kwargs, resumed: Optional[str]):
        """Check the outputs and open the window (fresh or resumed), or, resumed after ``tcut``, mark it done (and
        resume validation mode)."""
        if self.done:
            return
        if model is None:
            raise RelexInputError("RelexCallback needs the model in on_train_begin (use it with a transformers "
                                  "Trainer)")
        out_dir, s = self.out_dir(args), self.settings
        record = resume_record(state, out_dir) if state.global_step > 0 else None
        checkpoints = lifecycle.resume_candidates(args, state, record, resumed)
        if state.global_step >= s.tcut:
            logger.info("relex: resumed at step %d >= tcut=%d; the window is already done", state.global_step, s.tcut)
            self.done = True
            self.run_id = (record or {}).get("run_id")
            if not s.stop_training:
                self.select(model)
                self.validation = Validation.resume(checkpoints, self.tracked, self.topology, state.global_step, s.tcut)
                self.link_theta0(out_dir)
            return
        if state.max_steps and 0 < state.max_steps < s.tcut:
            logger.warning("relex: the trainer will stop at max_steps=%d, before tcut=%d: no checkpoint will be "
                           "extrapolated; the recorded window is kept in %s for `relex extrapolate`",
                           state.max_steps, s.tcut, out_dir)
        check_writable_dir(out_dir, "output_dir")
        self.select(model)
        if self.topology.process_rank == 0:  # before anything is read or written there: a second writer is named
            self.lock = OutputLock(out_dir, self.trainer)
            self.lock.acquire()
        try:
            own_run = (record or {}).get("run_id")
            own = self.check_outputs(out_dir, model, own_run=own_run)
            if own and own_run and not s.overwrite:
                self.replace_own = own_run
                logger.warning("relex: resuming run %s at step %d, before tcut=%d: %s were written by this run after "
                               "that checkpoint and will be replaced at tcut", self.replace_own, state.global_step,
                               s.tcut, ", ".join(os.path.basename(p) for p in own))
            self.store = open_window(
                s, self.tracked, self.topology, out_dir=out_dir, global_step=state.global_step, checkpoints=checkpoints,
                expected=record, model_bytes=horizon_bytes(model, self.tracked, s.merge_lora),
                saves_in_window=str(getattr(args, "save_strategy", "steps")) not in ("no", "SaveStrategy.NO"),
                trainer_args=args, optimizer=kwargs.get("optimizer"),
            )
        except BaseException:
            self.release()
            raise
        if self.schedule and self.schedule[0] and s.fit_clock == "lr":  # every saved form is fitted on this clock
            self.store.window.update(learning_rates=[float(v) for v in self.schedule[0]],
                                     lr_source=str(self.schedule[1]))
        self.run_id = self.store.run_id

    def select(self, model):
        """The tensors this process records (:attr:`tracked`) and the process layout (:attr:`topology`)."""
        named = trainable_named_parameters(model)
        if not named:
            raise RelexInputError("the model has no trainable floating-point parameters to track")
        keep = set(select_names([n for n, _ in named], self.settings.include, self.settings.exclude))
        self.topology = Topology.from_model(model)
        if self.topology.is_distributed and is_peft_model(model):
            raise RelexInputError(
                f"RelexCallback does not support PEFT (LoRA) models in distributed runs ({self.topology.describe()}): "
                "the adapter directories are written by PEFT's save_pretrained on one process. Train the adapter on "
                "one process, or merge the adapter / train the full model under DDP, ZeRO or FSDP2"
            )
        # under DeepSpeed mixed precision the fp32 master weights are recorded (topology's module docstring)
        self.tracked = self.topology.track([(n, p) for n, p in named if n in keep],
                                           engine=deepspeed_engine(self.trainer))

    def check_outputs(self, out_dir: str, model, own_run: Optional[str] = None) -> list:
        """Every name the window will write is free (or relex's own, with ``overwrite``), derived ones too
        (``step-H-merged/``, state shards, report, plot): a refusal now costs nothing, at ``tcut`` it costs the window.
        ``own_run``: the run id of the window a resume continues; outputs that are all that run's (it passed ``tcut``
        after the checkpoint it resumes from, then stopped) are returned, to be replaced at ``tcut``."""
        try:
            return lifecycle.outputs_free(self.settings, out_dir, model, own_run)
        except RelexInputError as e:
            raise self.switch_named(e) from None

    def switch_named(self, e):
        """``e`` naming this callback's overwrite switch: ``overwrite=True``, or ``--relex_overwrite`` for a callback
        built by ``RelexCallback.from_config`` (a ``TrlParser`` / ``HfArgumentParser`` run)."""
        return name_switch(e, self.entry)

    def release(self):
        """Give up the output directory (the lock), if held."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def warn_once(self, state, msg: str):
        """A warning on the main process only, once per window owner and message (a DDP / ZeRO / FSDP run has one
        callback per process: without the test every process would print it)."""
        main = (getattr(state, "is_world_process_zero", True) if state is not None
                else self.topology is None or self.topology.process_rank == 0)
        if msg in self.warned or not main:
            return
        self.warned.add(msg)
        logger.warning(msg)

    def link_theta0(self, out_dir: str):
        """Validation checkpoints link theta_0 from ``<out_dir>/trajectory/`` instead of writing it each time."""
        if self.validation is not None:
            self.validation.theta0_file = os.path.join(
                self.topology.trajectory_dir(os.path.join(out_dir, RUN_TRAJECTORY_DIR)), THETA0_FILE)

    # --------------------------------------------------------------------------------------------- every step
    def step(self, args, state, control, kwargs):
        """``on_step_end``: a validation comparison, or a snapshot of this step, and the end of the window at tcut."""
        if self.scoring:
            return
        step = self.step_seen = state.global_step
        if self.lock is not None:
            self.lock.touch()
        if self.validation is not None:
            if step in self.validation.pending:
                res = self.validation.compare(step)
                self.emit({f"relex/validation/{step}/{k}": v for k, v in res["summary"].items()}, control)
                self.report = self.validation.record(self.out_dir(args), step, res, self.report)
            return
        if self.done or self.store is None:
            return
        if step % self.settings.stride == 0 and 0 < step <= self.settings.tcut:
            self.snapshot(step)
        if step >= self.settings.tcut:
            self.finish(args, state, control, kwargs)

    def snapshot(self, step: int):
        """Record ``Delta_step``; a non-finite delta (a divergence: a non-finite base was refused before step 1) is an
        error (``on_nonfinite="error"``) or the step skipped with a warning."""
        try:
            self.store.snapshot(step, [t.read() for t in self.tracked])
        except RelexNonFiniteError as e:
            if self.settings.on_nonfinite != "skip":
                raise RelexNonFiniteError(f"relex: {e}. Training stopped (on_nonfinite='error'); no checkpoint was "
                                          "written from it. Pass on_nonfinite='skip' to drop such steps") from None
            self.skipped_steps.append(int(step))
            logger.warning("relex: %s; step skipped (on_nonfinite='skip', %d skipped so far)", e,
                           len(self.skipped_steps))

    def save(self, args, state):
        """``on_save``: the window (or the validation state) into the checkpoint just saved."""
        if self.topology is None or (self.store is None and self.validation is None):
            return
        if not (args.should_save or self.topology.is_distributed):  # distributed: every process saves its own share
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(ckpt):
            return
        target = self.topology.trajectory_dir(os.path.join(ckpt, TRAJECTORY_DIR))
        if self.validation is not None:
            self.validation.save(target)
        elif not self.done and self.store is not None:
            self.store.save(target, live=[t.read() for t in self.tracked], step=state.global_step)

    def emit(self, logs: dict, control):
        """Queue ``relex/*`` metrics for the trainer's next ``on_log`` (this step: ``should_log`` is set)."""
        logs = {k: v for k, v in logs.items() if v is not None}
        self.pending_logs.update(logs)
        logger.info("relex: %s", ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        control.should_log = True

    def log(self, state, logs):
        """``on_log``: the queued metrics into ``logs`` (seen by the reporting callbacks after this one) and into the
        entry ``Trainer.log`` appended to ``state.log_history`` before calling ``on_log``."""
        if self.scoring:  # an evaluation of an extrapolated model: its log entry is not this step's
            return
        if self.pending_logs and logs is not None:
            logs.update(self.pending_logs)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step:
                last.update(self.pending_logs)
            self.pending_logs = {}

    # ------------------------------------------------------------------------------------------------- at tcut
    def finish(self, args, state, control, kwargs):
        """The end of the window at ``tcut``: the pipeline, the metrics, scoring, the summary, then stop or
        validate."""
        s, out_dir, model = self.settings, self.out_dir(args), kwargs.get("model")
        t0 = time.perf_counter()
        trend, flat = lifecycle.reward_trend_of(s, state)
        writer = model_writer(model, kwargs.get("processing_class"), self.topology, self.tracked,
                              max_shard_size=s.max_shard_size, merge_lora=s.merge_lora)
        sol = self._pipeline_or_keep(args, kwargs, writer, out_dir, model, trend, flat)
        self.end_of_window_seconds = time.perf_counter() - t0
        self.emit(lifecycle.window_metrics(self.report, self.store, trend, self.end_of_window_seconds), control)
        if flat and s.on_flat_reward == "error":
            self.done = True
            store, self.store = self.store, None
            store.release()
            self.release()
            raise RelexInputError(f"relex: {flat}; on_flat_reward='error': the state file and report.json are in "
                                  f"{out_dir} but no horizon was written (write them anyway with `relex materialize`, "
                                  "or pass on_flat_reward='warn')")
        if s.evaluate_horizons:  # before the store is released: scoring needs theta_0
            self.score(sol, model, out_dir, control)
        notices.summary(self, out_dir, state, model)  # the one summary of the window, printed by the main process
        self.close(state, control, sol, out_dir)

    def clock(self):
        """The clock of the window at ``tcut`` (:func:`relex_callback.core.clock.resolve`), or ``None``: the step."""
        clock, beyond = lifecycle.window_clock(self.settings, self.schedule)
        if beyond:
            self.warn_once(None, beyond)
        return clock

    def _pipeline_or_keep(self, args, kwargs, writer, out_dir, model, trend, flat):
        """The pipeline; a window refused at ``tcut`` keeps its recorded steps (unless the state file holds them
        already) and the error says how to finish from them."""
        s, start_wall = self.settings, time.time() - 1.0  # (file times may be rounded to the second)

        def written():  # the state file holds the window (finalize writes it atomically before any horizon)
            return any(os.path.isfile(p) and os.path.getmtime(p) >= start_wall for p in
                       (os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)))

        try:
            sol, self.report = self.run_pipeline(writer, out_dir, model, trend, flat)
            return sol
        except RelexInputError as e:  # refused at tcut: keep the window unless the state file holds it already
            self.release()
            e = self.switch_named(e)
            if written() or self.store is None or not self.store.num_rows:
                raise e from None
            keep, base = self.keep_window(args, kwargs, s.tcut)  # the model is at tcut
            raise type(e)(lifecycle.refused_message(e, self.store.num_rows, keep, base, s.horizons)) from None
        except Exception as e:  # anything else (a kernel, CUDA, out of memory, a bug): the window is never lost
            was_written = written()
            if isinstance(e, RelexError) or self.store is None or not self.store.num_rows:
                self.release()
                raise
            raise self._kept_after_failure(args, kwargs, e, out_dir, was_written) from e
        except BaseException:
            self.release()  # the output directory is no longer in use (relex materialize may finish it)
            raise

    def _kept_after_failure(self, args, kwargs, e, out_dir, written):
        """An unexpected error at the end of the window: the recorded window is kept in ``partial_trajectory/``
        unless the state file already holds it; the error names the command that finishes the job."""
        keep = base = kept_error = None
        if not written:
            try:
                keep, base = self.keep_window(args, kwargs, self.settings.tcut)  # the model is at tcut
            except Exception as e2:  # noqa: BLE001 - said, with the first error
                kept_error = e2
        self.release()
        return lifecycle.failure_error(e, self.settings.horizons, out_dir, written, self.store.num_rows, keep, base,
                                       kept_error)

    def run_pipeline(self, writer, out_dir, model, trend, flat):
        """The end-of-window pipeline with this run's settings and report entries; a resumed window replaces what
        its own run wrote at tcut before it stopped, checked again now that every output there still carries this
        run id (nothing that appeared since is replaced: it is refused like any taken name)."""
        s, clock = self.settings, self.clock()
        replace_own = self.replace_own is not None and self.replace_own == self.store.run_id and not s.overwrite
        if replace_own:
            self.check_outputs(out_dir, model, own_run=self.replace_own)
            s = dataclasses.replace(s, overwrite=True)
        store, topology = self.store, self.topology
        solver = BufferedSolve(store, reduce=topology.reduce_grams if topology.sharded else None,
                               skipped_nonfinite=self.skipped_steps, clock=clock)
        return finalize(
            solver, writer, s, out_dir=out_dir, kept=store.directory if store.storage == "disk" else None,
            skip_horizons=flat if s.on_flat_reward == "error" else None,
            report_extra={"recorded": topology.recorded, "skipped_nonfinite_steps": list(self.skipped_steps),
                          "reward_trend": trend, "skipped_unchanged_steps": list(store.skipped_unchanged_steps),
                          "format": "peft_adapter" if is_peft_model(model) else "full"},
        )

    def score(self, sol, model, out_dir: str, control):
        """Score the horizons with the trainer's ``evaluate()`` (:func:`.scoring.score_at_tcut`); update and rewrite
        ``report.json`` (process 0) and log ``relex/eval/<step>/<metric>``."""
        self.scoring = True
        try:
            scored = score_at_tcut(self.settings, self.trainer, sol, self.store, self.tracked, self.topology,
                                   self.report, model, out_dir)
        finally:
            self.scoring = False
        if scored is None:
            return
        self.report, logs = scored
        coordinator = self.topology is None or self.topology.process_rank == 0
        if coordinator:
            write_report(os.path.join(out_dir, REPORT_NAME), self.report)
        if self.topology is not None and self.topology.is_distributed:
            self.topology.barrier()
        self.emit(logs, control)

    def close(self, state, control, sol, out_dir):
        """Release the buffer and the run's trajectory files (the state file and the horizons hold the result now),
        then stop training, or open validation mode (which keeps theta_0 for its checkpoints)."""
        s = self.settings
        self.done = True
        store, self.store = self.store, None
        store.release()
        freed = store.discard_files(keep=() if s.stop_training else (THETA0_FILE,))
        if freed:
            logger.info("relex: removed the run's trajectory files %s (%.2f GiB); the trainer checkpoints inside the "
                        "window keep theirs in relex_trajectory/", store.directory, freed / 2**30)
        if s.stop_training:
            self.release()
            control.should_training_stop = True
            return
        pending = sorted(h for h in s.horizons if h > state.global_step)
        late = [h for h in pending if state.max_steps and h > state.max_steps]
        if late:
            logger.warning("relex: validation horizons %s are beyond max_steps=%d and will not be reached", late,
                           state.max_steps)
        self.validation = Validation(sol, store.theta0, store.specs, pending, self.tracked, self.topology, s.tcut)
        self.link_theta0(out_dir)

    def keep_window(self, args, kwargs, step: int) -> tuple[str, str]:
        """Save the recorded steps to ``<output_dir>/partial_trajectory`` (this process's share) for
        ``relex extrapolate --trajectory``; returns ``(directory, the --base to pass)``."""
        keep = self.topology.trajectory_dir(os.path.join(self.out_dir(args), "partial_trajectory"))
        return lifecycle.keep_window(self.store, self.topology, self.tracked, keep, kwargs.get("model"),
                                     kwargs.get("processing_class"), step)

    # -------------------------------------------------------------------------------------------- on_train_end
    def end(self, args, state, kwargs):
        """``on_train_end``: the lock released, validation's link to theta_0 removed, and a window that never reached
        ``tcut`` kept with the command that finishes it."""
        self.release()
        notices.end_run()  # repeated warnings pass again
        if self.validation is not None and self.validation.theta0_file:  # the checkpoints keep their links
            for p in (self.validation.theta0_file, os.path.dirname(self.validation.theta0_file)):
                try:
                    os.remove(p) if os.path.isfile(p) else os.rmdir(p)
                except OSError:
                    pass
        if not self.done and self.store is not None and self.store.num_rows:
            keep, base = self.keep_window(args, kwargs, state.global_step)
            logger.warning(
                "relex: training ended at step %d before tcut=%d; nothing was extrapolated. The %d recorded steps are "
                "in %s: extrapolate from them with `relex extrapolate --trajectory %s --base %s --horizons H "
                "--out DIR`",
                state.global_step, self.settings.tcut, self.store.num_rows, keep, keep, base,
            )
