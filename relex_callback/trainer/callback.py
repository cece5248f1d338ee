"""RelexCallback: the adapter between Trainer events and the RELEX pieces.

``on_train_begin`` checks the outputs and opens the window (:func:`relex_callback.trajectory.window.open_window`, fresh or
resumed); ``on_step_end`` records a snapshot and, at tcut, runs the end-of-window pipeline
(:func:`relex_callback.pipeline.finalize.finalize`) with the writer for this model (:func:`relex_callback.files.writers.model_writer`);
``on_save`` keeps the window (or the validation state) in each trainer checkpoint; ``on_log`` hands the ``relex/*``
metrics to the reporting integrations. Validation mode lives in :mod:`relex_callback.trainer.validation`.
"""

from __future__ import annotations

import itertools
import logging
import os
import textwrap
import weakref
from typing import Optional, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..trajectory.persist import TRAJECTORY_DIR
from ..trajectory.window import OutputLock, open_window, resume_record
from ..config import SETTINGS, SETTINGS_DOC, RelexConfig, RelexSettings
from ..errors import RelexInputError, RelexNonFiniteError
from ..files.fs import check_writable_dir
from . import lifecycle
from .trainer_link import _horizon_bytes, take_back_original

logger = logging.getLogger("relex_callback")


_CREATED = itertools.count()


class RelexCallback(TrainerCallback, ExportableState):
    r"""
    Early stopping with rank-1 linear extrapolation of the weights (RELEX, arXiv 2605.21468).

    Under RL with verifiable rewards, each weight tensor moves along an almost fixed direction with a coefficient
    that grows almost linearly with the step. The callback records ``Delta_t = theta_t - theta_0`` for every
    ``stride``-th optimizer step up to ``tcut``, takes each tensor's top singular direction ``v`` with coefficients
    ``c_t = <Delta_t, v>``, fits ``c_t = a*t + b`` on the real step numbers, and writes

    $$\theta(H) = \theta_0 + (a H + b)\, v$$

    for every horizon ``H`` as a Hugging Face checkpoint ``<output_dir>/step-H`` that ``from_pretrained`` loads,
    plus ``relex_state.safetensors`` (any other horizon later, with ``relex materialize``) and ``report.json``.

    {settings}
    Example:

    ```python
    from trl import GRPOConfig, GRPOTrainer
    from relex_callback import RelexCallback

    trainer = GRPOTrainer(
        model="Qwen/Qwen2.5-Math-1.5B",
        reward_funcs=accuracy_reward,
        args=GRPOConfig(output_dir="runs/qwen-math", lr_scheduler_type="constant"),
        train_dataset=dataset,
        callbacks=[RelexCallback(tcut=75, horizons=[500, 1000])],
    )
    trainer.train()  # stops after step 75; writes runs/qwen-math/relex/step-500, step-1000
    ```
    """

    def __init__(
        self,
        tcut: int,
        horizons,
        stride: int = 1,
        fit_start: Optional[int] = None,
        rank: int = 1,
        storage: str = "auto",
        dtype: str = "bfloat16",
        max_buffer_bytes=None,
        stop_training: bool = True,
        output_dir: Optional[str] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        solver: str = "auto",
        overwrite: bool = False,
        max_shard_size="50GB",
        fold_rank: Optional[int] = None,
        buffer_slots: Optional[int] = None,
        on_nonfinite: str = "error",
        merge_lora: bool = False,
        fit: str = "linear",
        fit_window: Optional[int] = None,
        degree: int = 2,
        on_flat_reward: str = "warn",
        reward_metric: Optional[str] = None,
        evaluate_horizons: bool = False,
        keep_best: Optional[int] = None,
        fit_clock: str = "lr",
    ):
        given = dict(locals())  # the arguments as passed, before any other local is bound
        from ..compat import check_versions, trl_in_use

        check_versions(("transformers", "accelerate", "trl") if trl_in_use() else ("transformers", "accelerate"))
        self.settings = RelexSettings.validate(**{s.name: given[s.name] for s in SETTINGS})
        self.store = None  # TrajectoryStore of the open window
        self.tracked = []  # TrackedTensor: this process's pieces
        self.topology = None  # relex_callback.trainer.topology.Topology
        self.validation = None  # relex_callback.trainer.validation.Validation, after tcut with stop_training=False
        self.done = False
        self.report: Optional[dict] = None
        self.skipped_steps: list[int] = []
        self._pending_logs: dict = {}
        self._trainer = None  # weakref to the Trainer that runs this callback (found at on_train_begin)
        self._scoring = False  # True while horizons are scored with trainer.evaluate() (scoring.score_at_tcut)
        self._lock: Optional[OutputLock] = None  # owns the relex output_dir during the window
        self._step = 0  # last global_step seen (for the record in trainer_state.json)
        self._ckpt_root: Optional[str] = None  # args.output_dir (where checkpoint-N is saved)
        self._run_id: Optional[str] = None
        self._replace_own: Optional[str] = None  # a resumed window's run id whose own outputs it replaces at tcut
        self._created = next(_CREATED)
        RelexCallback._instances.add(self)

    _instances: "weakref.WeakSet[RelexCallback]" = weakref.WeakSet()

    # ----------------------------------------------------------------------------- trainer_state.json
    def state(self) -> dict:
        """What ``trainer_state.json`` keeps of this callback (``transformers.trainer_callback.ExportableState``): the
        arguments, and under ``relex_checkpoint`` the run id and step of the window and where this checkpoint's
        trajectory is saved. A resume reads it from the trainer state it resumed with, so the trajectory is found
        (and checked to be this run's) wherever the checkpoint is."""
        s = self.settings
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((f, getattr(s, f)) for f in RelexSettings.__dataclass_fields__ if f != "auto_horizons")}
        if s.auto_horizons:
            args["horizons"], args["evaluate_horizons"] = "auto", False  # validate() derives both again
        store_id = self.store.run_id if self.store is not None else self._run_id
        ckpt = os.path.join(self._ckpt_root, f"checkpoint-{self._step}") if self._ckpt_root else None
        record = {"run_id": store_id, "step": self._step, "window_done": self.done,
                  "checkpoint": os.path.abspath(ckpt) if ckpt else None,
                  "out_dir": os.path.abspath(self.settings.output_dir or os.path.join(self._ckpt_root, "relex"))
                  if (self.settings.output_dir or self._ckpt_root) else None}
        return {"args": args, "attributes": {"relex_checkpoint": record}}

    @classmethod
    def from_config(cls, cfg: RelexConfig, **overrides) -> "RelexCallback":
        kw = cfg.to_kwargs()
        kw.update(overrides)
        cb = cls(**kw)
        cb._entry = "trl_parser"  # messages name --relex_overwrite, not the argument (errors.name_switch)
        return cb

    def __getattr__(self, name):  # the settings read as attributes: cb.tcut, cb.horizons, cb.stop_training, ...
        settings = self.__dict__.get("settings")
        if settings is not None and name in RelexSettings.__dataclass_fields__:
            value = getattr(settings, name)
            return list(value) if name in ("include", "exclude") and value is not None else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _out_dir(self, args) -> str:
        return self.settings.output_dir or os.path.join(args.output_dir, "relex")

    def _select(self, model):
        lifecycle.select(self, model)

    # ---------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        orig = take_back_original(self, RelexCallback._instances)
        if orig is not None:
            return orig.on_train_begin(args, state, control, model=model, **kwargs)
        trainer, resumed_from = lifecycle.begin(self, state)  # attached first; a second train() starts afresh
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        self._ckpt_root, self._step = args.output_dir, state.global_step
        if isinstance(state.stateful_callbacks, dict):  # resumed from a checkpoint saved without this callback: the
            state.stateful_callbacks.setdefault("RelexCallback", self.state())  # Trainer's next save needs the key
        if self.done:
            return
        if model is None:
            raise RelexInputError("RelexCallback needs the model in on_train_begin (use it with a transformers Trainer)")
        out_dir, s = self._out_dir(args), self.settings
        record = resume_record(state, out_dir) if state.global_step > 0 else None
        checkpoints = lifecycle.resume_candidates(args, state, record, resumed_from)
        if state.global_step >= s.tcut:
            logger.info("relex: resumed at step %d >= tcut=%d; the window is already done", state.global_step, s.tcut)
            self.done = True
            self._run_id = (record or {}).get("run_id")
            if not s.stop_training:
                from .validation import Validation

                self._select(model)
                self.validation = Validation.resume(checkpoints, self.tracked, self.topology, state.global_step, s.tcut)
                lifecycle.link_theta0(self, out_dir)
            return
        if state.max_steps and 0 < state.max_steps < s.tcut:
            logger.warning("relex: the trainer will stop at max_steps=%d, before tcut=%d: no checkpoint will be "
                           "extrapolated; the recorded window is kept in %s for `relex extrapolate`",
                           state.max_steps, s.tcut, out_dir)
        check_writable_dir(out_dir, "output_dir")
        self._select(model)
        if self.topology.process_rank == 0:  # before anything is read or written there: a second writer is named
            self._lock = OutputLock(out_dir, self._trainer() if self._trainer is not None else None)
            self._lock.acquire()
        try:
            own_run = (record or {}).get("run_id")
            own = lifecycle.check_outputs(self, out_dir, model, own_run=own_run)
            if own and own_run and not s.overwrite:
                self._replace_own = own_run
                logger.warning("relex: resuming run %s at step %d, before tcut=%d: %s were written by this run after "
                               "that checkpoint and will be replaced at tcut", self._replace_own, state.global_step,
                               s.tcut, ", ".join(os.path.basename(p) for p in own))
            self.store = open_window(
                s, self.tracked, self.topology, out_dir=out_dir, global_step=state.global_step, checkpoints=checkpoints,
                expected=record, model_bytes=_horizon_bytes(model, self.tracked, s.merge_lora),
                saves_in_window=str(getattr(args, "save_strategy", "steps")) not in ("no", "SaveStrategy.NO"),
                trainer_args=args, optimizer=kwargs.get("optimizer"),
            )
        except BaseException:
            self._release()
            raise
        lifecycle.record_schedule(self)
        self._run_id = self.store.run_id

    def _release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._scoring:
            return
        step = self._step = state.global_step
        if self._lock is not None:
            self._lock.touch()
        if self.validation is not None:
            if step in self.validation.pending:
                res = self.validation.compare(step)
                self._emit({f"relex/validation/{step}/{k}": v for k, v in res["summary"].items()}, control)
                self.report = self.validation.record(self._out_dir(args), step, res, self.report)
            return
        if self.done or self.store is None:
            return
        if step % self.settings.stride == 0 and 0 < step <= self.settings.tcut:
            self._snapshot(step)
        if step >= self.settings.tcut:
            lifecycle.finish(self, args, state, control, kwargs)

    def _snapshot(self, step: int):
        try:
            self.store.snapshot(step, [t.read() for t in self.tracked])
        except RelexNonFiniteError as e:
            lifecycle.nonfinite_step(self, step, e)

    def on_save(self, args, state, control, **kwargs):
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

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._scoring:  # an evaluation of an extrapolated model: its log entry is not this step's
            return
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)  # seen by the reporting callbacks after this one (TensorBoard, W&B)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step:
                last.update(self._pending_logs)  # Trainer.log appended its copy before calling on_log
            self._pending_logs = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._release()
        lifecycle.end_run()
        if self.validation is not None and self.validation.theta0_file:  # the checkpoints keep their links
            for p in (self.validation.theta0_file, os.path.dirname(self.validation.theta0_file)):
                try:
                    os.remove(p) if os.path.isfile(p) else os.rmdir(p)
                except OSError:
                    pass
        if not self.done and self.store is not None and self.store.num_rows:
            keep, base = lifecycle.keep_window(self, args, kwargs, state.global_step)
            logger.warning(
                "relex: training ended at step %d before tcut=%d; nothing was extrapolated. The %d recorded steps are "
                "in %s: extrapolate from them with `relex extrapolate --trajectory %s --base %s --horizons H --out DIR`",
                state.global_step, self.settings.tcut, self.store.num_rows, keep, keep, base,
            )

    def _emit(self, logs: dict, control):
        """Queue ``relex/*`` metrics for the trainer's next ``on_log`` (this step: ``should_log`` is set)."""
        logs = {k: v for k, v in logs.items() if v is not None}
        self._pending_logs.update(logs)
        logger.info("relex: %s", ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        control.should_log = True


RelexCallback.__doc__ = RelexCallback.__doc__.replace("    {settings}\n", textwrap.indent(SETTINGS_DOC.strip("\n"), "    ") + "\n")
