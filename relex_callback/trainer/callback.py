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
import time
import weakref
from typing import Optional, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..trajectory.persist import RUN_TRAJECTORY_DIR, THETA0_FILE, TRAJECTORY_DIR
from ..trajectory.window import OutputLock, open_window, resume_record
from ..config import RelexConfig, RelexSettings
from ..errors import RelexInputError, RelexNonFiniteError
from ..files.fs import check_outputs_free, check_writable_dir
from .trainer_link import _attach, _handler_list, _horizon_bytes

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

    Args:
        tcut (`int`):
            Number of optimizer steps to observe (``state.global_step``; gradient accumulation does not change it).
            The paper uses 75 (1.5B-4B models) and 100 (8B).
        horizons (`list[int]` or `str`):
            Steps to extrapolate to, each greater than ``tcut`` (e.g. ``[500, 1000]`` or ``"500,1000"``), or
            ``"auto"``: the ladder 2x, 4x, 8x and 16x ``tcut``, scored (``evaluate_horizons``) when the trainer has an
            ``eval_dataset``.
        stride (`int`, *optional*, defaults to `1`):
            Record every ``stride``-th step; must divide ``tcut``. Memory is ``tcut/stride`` rows.
        fit_start (`int`, *optional*):
            First step used in the linear fit (earlier steps still define the direction). Default: all steps.
        rank (`int`, *optional*, defaults to `1`):
            SVD rank: directions per tensor, each extrapolated linearly (the paper's ablation found 1 best).
        storage (`str`, *optional*, defaults to `"auto"`):
            Where the buffer lives: ``"device"`` (accelerator memory), ``"host"`` (pinned CPU memory),
            ``"disk"`` (memory-mapped file under ``output_dir``; survives a crash) or ``"auto"``: the memory plan
            logged at ``on_train_begin`` (``relex plan`` prints the same) puts the exact window on the fastest tier
            that holds it, counting every process of the node and a colocated vLLM engine's share of the GPU; when
            none does, it folds (see ``fold_rank``) and says so.
        dtype (`str`, *optional*, defaults to `"bfloat16"`):
            Buffer dtype: ``"bfloat16"``, ``"float16"`` (underflows for lr ~1e-6 runs) or ``"float32"``.
        max_buffer_bytes (`int` or `str`, *optional*):
            Upper bound on the buffer's bytes per process (a number or a size like ``"8GB"``); a window that does not
            fit folds (see ``fold_rank``).
        stop_training (`bool`, *optional*, defaults to `True`):
            Stop training at ``tcut``. With ``False`` training continues, and the extrapolated weights are
            compared with the real ones when the run reaches each horizon (validation mode).
        output_dir (`str`, *optional*):
            Where to write. Defaults to ``<args.output_dir>/relex``.
        include (`list[str]`, *optional*):
            Regexes (``re.search``) over parameter names to track. Default: every trainable parameter.
        exclude (`list[str]`, *optional*):
            Regexes over parameter names not to track (they are written unchanged).
        solver (`str`, *optional*, defaults to `"auto"`):
            ``"gram"``, ``"power"`` or ``"auto"`` (per-device choice measured in ``bench/solver.py``).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace existing ``step-H`` directories in ``output_dir`` instead of refusing to start.
        max_shard_size (`str`, *optional*, defaults to `"50GB"`):
            Shard size of the written safetensors, as in ``save_pretrained``.
        fold_rank (`int`, *optional*, defaults to `8`):
            When the window does not fit ``max_buffer_bytes`` (or ``buffer_slots``), the full ring of deltas is
            folded into a rank-``fold_rank`` factorisation per tensor (incremental SVD) and the slots reused:
            memory is ``fold_rank + slots`` rows whatever ``tcut`` is. Must be >= ``rank``.
        buffer_slots (`int`, *optional*):
            Ring slots K; below ``tcut/stride`` the ring folds (see ``fold_rank``). Default: with
            ``storage="auto"`` the memory plan's (the whole window when it fits a tier, within ``max_buffer_bytes``);
            with an explicit tier, from ``max_buffer_bytes``, else the whole window (exact, no fold).
        on_nonfinite (`str`, *optional*, defaults to `"error"`):
            A NaN/Inf in a weight delta at a snapshot: ``"error"`` stops training with an error naming the tensors
            and the step (nothing is written from it); ``"skip"`` drops that step with a warning (counted in
            ``report.json`` as ``skipped_nonfinite_steps``).
        merge_lora (`bool`, *optional*, defaults to `False`):
            PEFT models only. Each horizon is always written as an adapter directory ``step-H/`` (loaded with
            ``PeftModel.from_pretrained(base, "step-H")``); with ``True`` also as a full model ``step-H-merged/``
            (``merge_and_unload`` on a copy of the model: needs memory for a second copy of the base weights).
        fit (`str`, *optional*, defaults to `"linear"`):
            Curve fitted to each direction's coefficient ``c_t``: ``"linear"`` (the paper), ``"power"``
            (``a t^p + b``), ``"log"``, ``"polynomial"`` (``degree``), or ``"auto"`` (each family fitted on the first
            part of the window and scored by how well it predicts the rest; the winner is refitted on the whole window).
        fit_window (`int`, *optional*):
            Fit only the last ``fit_window`` recorded steps (the published scripts' sliding window).
        degree (`int`, *optional*, defaults to `2`):
            Degree of the ``"polynomial"`` fit.
        on_flat_reward (`str`, *optional*, defaults to `"warn"`):
            When the reward (``reward_metric``) did not rise over the window (least-squares slope <= 2 standard errors):
            ``"warn"``, ``"error"`` (the state file is written, no horizon) or ``"ignore"``.
        reward_metric (`str`, *optional*):
            The logged metric whose trend is checked (default: ``reward``, else the first metric named like a reward).
        evaluate_horizons (`bool`, *optional*, defaults to `False`):
            At ``tcut``, score the ``tcut`` model and every horizon with the trainer's own evaluation (GRPO: its
            reward functions on the ``eval_dataset`` prompts; other trainers: ``eval_loss``), the live weights restored
            bit for bit afterwards; results in ``report.json["horizon_eval"]`` and ``horizons.png``.
        keep_best (`int`, *optional*):
            With scored horizons, keep only the best ``keep_best`` checkpoints on disk (the state file keeps every
            horizon reachable through ``relex materialize``).

    Validation mode (``stop_training=False``): training continues after ``tcut``; when ``state.global_step``
    reaches each horizon ``H``, the real deltas ``theta_H - theta_0`` are compared per tensor with the
    extrapolated ones (cosine and norm ratio, the paper's Figure 6), logged as ``relex/validation/H/...`` and
    added to ``report.json`` under ``"validation"``.

    Resume: ``trainer.train(resume_from_checkpoint=...)`` inside the window continues the same trajectory
    (theta_0 and the rows recorded so far are in ``checkpoint-N/relex_trajectory/``, hard links to files written
    once under ``output_dir/trajectory/``: a checkpoint adds only the rows recorded since the previous one). The
    trajectory is found where the Trainer loaded the checkpoint (any path, any ``output_dir``; the callback's
    record in ``trainer_state.json`` names the run and the step) and checked before one more step is recorded:
    the same run, the same ``tcut``/``stride``/``dtype``/tracked tensors/world size, and theta_0 plus the last
    recorded delta equal to the weights the trainer resumed with; anything else is refused with what differs.
    Resuming after ``tcut`` writes nothing again. One callback owns an output directory at a time
    (``.relex-lock.json`` while its window is open).

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
    ):
        self.settings = RelexSettings.validate(
            tcut=tcut, horizons=horizons, stride=stride, fit_start=fit_start, rank=rank, storage=storage, dtype=dtype,
            max_buffer_bytes=max_buffer_bytes, stop_training=stop_training, output_dir=output_dir, include=include,
            exclude=exclude, solver=solver, overwrite=overwrite, max_shard_size=max_shard_size, fold_rank=fold_rank,
            buffer_slots=buffer_slots, on_nonfinite=on_nonfinite, merge_lora=merge_lora, fit=fit, fit_window=fit_window,
            degree=degree, on_flat_reward=on_flat_reward, reward_metric=reward_metric,
            evaluate_horizons=evaluate_horizons, keep_best=keep_best,
        )
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

    def _take_back_original(self) -> Optional["RelexCallback"]:
        """With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces the callback the user passed by
        a new one built from :meth:`state`. Put the user's instance back in its place (the one the user holds, with
        the same settings, attached to no trainer), so that ``callback.report`` and friends stay on the object the
        user has. Returns it, or None when this instance is the user's."""
        if "relex_checkpoint" not in self.__dict__:
            return None
        lst = _handler_list(self)
        cands = [c for c in list(RelexCallback._instances) if c is not self and "relex_checkpoint" not in c.__dict__
                 and c.settings == self.settings and _handler_list(c) is None]
        if lst is None or not cands:
            return None
        orig = max(cands, key=lambda c: c._created)
        lst[lst.index(self)] = orig
        return orig

    @classmethod
    def from_config(cls, cfg: RelexConfig, **overrides) -> "RelexCallback":
        kw = cfg.to_kwargs()
        kw.update(overrides)
        return cls(**kw)

    def __getattr__(self, name):  # the settings read as attributes: cb.tcut, cb.horizons, cb.stop_training, ...
        settings = self.__dict__.get("settings")
        if settings is not None and name in RelexSettings.__dataclass_fields__:
            value = getattr(settings, name)
            return list(value) if name in ("include", "exclude") and value is not None else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _out_dir(self, args) -> str:
        return self.settings.output_dir or os.path.join(args.output_dir, "relex")

    def _checkpoints(self, args, state, record: Optional[dict] = None) -> list:
        """Where the checkpoint training resumed from may be: where this callback saved it (its record in the
        ``trainer_state.json`` the Trainer resumed with), the ``resume_from_checkpoint`` of the arguments,
        ``<output_dir>/checkpoint-<global_step>``. Each is verified (run id, settings, live weights) before it is
        used."""
        return [(record or {}).get("checkpoint"), getattr(args, "resume_from_checkpoint", None),
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]

    def _select(self, model):
        from ..params import is_peft_model, select_names, trainable_named_parameters
        from .topology import Topology

        named = trainable_named_parameters(model)
        if not named:
            raise RelexInputError("the model has no trainable floating-point parameters to track")
        keep = set(select_names([n for n, _ in named], self.settings.include, self.settings.exclude))
        self.topology = Topology.from_model(model)
        if self.topology.is_distributed and is_peft_model(model):
            raise RelexInputError(
                f"RelexCallback does not support PEFT (LoRA) models in distributed runs ({self.topology.describe()}): "
                "the adapter directories are written by PEFT's save_pretrained on one process. Train the adapter on one "
                "process, or merge the adapter / train the full model under DDP, ZeRO or FSDP2"
            )
        self.tracked = self.topology.track([(n, p) for n, p in named if n in keep])

    # ---------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        orig = self._take_back_original()
        if orig is not None:
            return orig.on_train_begin(args, state, control, model=model, **kwargs)
        trainer = _attach(self)
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
        checkpoints = self._checkpoints(args, state, record)
        if state.global_step >= s.tcut:
            logger.info("relex: resumed at step %d >= tcut=%d; the window is already done", state.global_step, s.tcut)
            self.done = True
            self._run_id = (record or {}).get("run_id")
            if not s.stop_training:
                from .validation import Validation

                self._select(model)
                self.validation = Validation.resume(checkpoints, self.tracked, self.topology, state.global_step, s.tcut)
                self._link_theta0(out_dir)
            return
        if state.max_steps and 0 < state.max_steps < s.tcut:
            logger.warning("relex: the trainer will stop at max_steps=%d, before tcut=%d: no checkpoint will be "
                           "extrapolated; the recorded window is kept in %s for `relex extrapolate`",
                           state.max_steps, s.tcut, out_dir)
        check_writable_dir(out_dir, "output_dir")
        check_outputs_free(out_dir, s.horizons, s.overwrite)
        self._select(model)
        if self.topology.process_rank == 0:
            self._lock = OutputLock(out_dir, self._trainer() if self._trainer is not None else None)
            self._lock.acquire()
        try:
            self.store = open_window(
                s, self.tracked, self.topology, out_dir=out_dir, global_step=state.global_step, checkpoints=checkpoints,
                expected=record, model_bytes=_horizon_bytes(model, self.tracked, s.merge_lora),
                saves_in_window=str(getattr(args, "save_strategy", "steps")) not in ("no", "SaveStrategy.NO"),
                trainer_args=args,
            )
        except BaseException:
            self._release()
            raise
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
            self._finish(args, state, control, kwargs)

    def _snapshot(self, step: int):
        try:
            self.store.snapshot(step, [t.read() for t in self.tracked])
        except RelexNonFiniteError as e:
            if self.settings.on_nonfinite != "skip":
                raise RelexNonFiniteError(f"relex: {e}. Training stopped (on_nonfinite='error'); no checkpoint was "
                                          "written from it. Pass on_nonfinite='skip' to drop such steps") from None
            self.skipped_steps.append(int(step))
            logger.warning("relex: %s; step skipped (on_nonfinite='skip', %d skipped so far)", e, len(self.skipped_steps))

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
        if self.validation is not None and self.validation.theta0_file:  # the checkpoints keep their links
            for p in (self.validation.theta0_file, os.path.dirname(self.validation.theta0_file)):
                try:
                    os.remove(p) if os.path.isfile(p) else os.rmdir(p)
                except OSError:
                    pass
        if not self.done and self.store is not None and self.store.num_rows:
            keep, base = self._keep_window(args, kwargs)
            logger.warning(
                "relex: training ended at step %d before tcut=%d; nothing was extrapolated. The %d recorded steps are "
                "in %s: extrapolate from them with `relex extrapolate --trajectory %s --base %s --horizons H --out DIR`",
                state.global_step, self.settings.tcut, self.store.num_rows, keep, keep, base,
            )

    def _keep_window(self, args, kwargs) -> tuple[str, str]:
        """Save the recorded steps to ``<output_dir>/partial_trajectory`` (this process's share) for
        ``relex extrapolate --trajectory``; returns ``(directory, the --base to pass)``."""
        from ..params import is_peft_model

        keep = self.topology.trajectory_dir(os.path.join(self._out_dir(args), "partial_trajectory"))
        self.store.save(keep)
        base = "<the checkpoint training started from>"
        model = kwargs.get("model")
        if is_peft_model(model):  # the adapter at theta_0 is the base the trajectory extrapolates from
            from ..files.writers import save_adapter_at

            base = os.path.join(keep, "adapter")
            save_adapter_at(model, {t.spec.name: t.param for t in self.tracked},
                            {t.spec.name: self.store.theta0_of(t.spec) for t in self.tracked}, base,
                            kwargs.get("processing_class"))
        return keep, base

    # ---------------------------------------------------------------------------------------- finish
    def _finish(self, args, state, control, kwargs):
        from ..files.writers import model_writer

        s, out_dir, model = self.settings, self._out_dir(args), kwargs.get("model")
        t0, start_wall = time.perf_counter(), time.time() - 1.0  # (file times may be rounded to the second)
        trend, flat = self._reward_trend(state)
        writer = model_writer(model, kwargs.get("processing_class"), self.topology, self.tracked,
                              max_shard_size=s.max_shard_size, merge_lora=s.merge_lora)
        try:
            sol, self.report = self._finalize(writer, s, out_dir, model, trend, flat)
        except RelexInputError as e:  # refused at tcut: keep the window unless the state file holds it already
            self._release()
            from ..files.fs import STATE_INDEX_NAME, STATE_NAME

            written = any(os.path.isfile(p) and os.path.getmtime(p) >= start_wall for p in
                          (os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)))
            if written or self.store is None or not self.store.num_rows:  # the state file holds the window
                raise
            keep, base = self._keep_window(args, kwargs)
            raise type(e)(
                f"{e}. Nothing was extrapolated; the {self.store.num_rows} recorded steps are kept in {keep}: once "
                f"fixed, extrapolate from them with `relex extrapolate --trajectory {keep} --base {base} --horizons "
                f"{','.join(map(str, s.horizons))} --out DIR` (its --fit/--fit-window/--degree as needed)"
            ) from None
        except BaseException:
            self._release()  # the output directory is no longer in use (relex materialize may finish it)
            raise
        self.end_of_window_seconds = seconds = time.perf_counter() - t0
        summ, bt = self.report["summary"], self.report.get("backtest") or {}
        drift = bt.get("direction_cosine")
        self._emit({
            "relex/explained_variance_mean": summ["explained_variance_mean"],
            "relex/explained_variance_min": summ["explained_variance_min"],
            "relex/r2_mean": summ["r2_mean"],
            "relex/solve_seconds": self.report["solve_seconds"],
            "relex/end_of_window_seconds": seconds,
            "relex/buffer_bytes": self.store.buffer_bytes,
            "relex/backtest/cosine_global": bt.get("cosine_global"),
            "relex/backtest/norm_ratio_global": bt.get("norm_ratio_global"),
            "relex/backtest/relative_error_global": bt.get("relative_error_global"),
            "relex/backtest/direction_drift": None if drift is None else 1.0 - drift,
            "relex/reward_trend/slope": trend.get("slope"),
            "relex/reward_trend/stderr": trend.get("stderr"),
        }, control)
        if flat and s.on_flat_reward == "error":
            self.done = True
            store, self.store = self.store, None
            store.release()
            self._release()
            raise RelexInputError(f"relex: {flat}; on_flat_reward='error': the state file and report.json are in "
                                  f"{out_dir} but no horizon was written (write them anyway with `relex materialize`, "
                                  "or pass on_flat_reward='warn')")
        if s.evaluate_horizons:  # before the store is released: scoring needs theta_0 (scoring.py)
            from .scoring import score_at_tcut

            score_at_tcut(self, self._trainer() if self._trainer is not None else None, sol, self.store, model,
                          out_dir, control)
        self.done = True
        store, self.store = self.store, None
        store.release()
        # the state file and the horizons hold the result now; validation mode keeps theta_0 for its checkpoints
        freed = store.discard_files(keep=() if s.stop_training else (THETA0_FILE,))
        if freed:
            logger.info("relex: removed the run's trajectory files %s (%.2f GiB); the trainer checkpoints inside the "
                        "window keep theirs in relex_trajectory/", store.directory, freed / 2**30)
        if s.stop_training:
            self._release()
            control.should_training_stop = True
        else:
            from .validation import Validation

            pending = sorted(h for h in s.horizons if h > state.global_step)
            late = [h for h in pending if state.max_steps and h > state.max_steps]
            if late:
                logger.warning("relex: validation horizons %s are beyond max_steps=%d and will not be reached", late,
                               state.max_steps)
            self.validation = Validation(sol, store.theta0, store.specs, pending, self.tracked, self.topology, s.tcut)
            self._link_theta0(out_dir)

    def _finalize(self, writer, s, out_dir, model, trend, flat):
        """The end-of-window pipeline with this run's settings and report entries."""
        from ..params import is_peft_model
        from ..pipeline.finalize import BufferedSolve, finalize

        solver = BufferedSolve(self.store, reduce=self.topology.reduce_grams if self.topology.sharded else None,
                               skipped_nonfinite=self.skipped_steps)
        return finalize(
            solver, writer, s, out_dir=out_dir, kept=self.store.directory if self.store.storage == "disk" else None,
            skip_horizons=flat if s.on_flat_reward == "error" else None,
            report_extra={"skipped_nonfinite_steps": list(self.skipped_steps), "reward_trend": trend,
                          "skipped_unchanged_steps": list(self.store.skipped_unchanged_steps),
                          "format": "peft_adapter" if is_peft_model(model) else "full"},
        )

    def _link_theta0(self, out_dir: str):
        """Validation checkpoints link theta_0 from ``<out_dir>/trajectory/`` instead of writing it each time."""
        if self.validation is not None:
            self.validation.theta0_file = os.path.join(
                self.topology.trajectory_dir(os.path.join(out_dir, RUN_TRAJECTORY_DIR)), THETA0_FILE)

    def _reward_trend(self, state):
        """The reward's least-squares trend over the window (``relex_callback.core.trend``) and, when it is measurably not
        rising, the sentence that says so (warned here unless ``on_flat_reward="ignore"``)."""
        from ..core.trend import reward_trend

        s = self.settings
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

    def _emit(self, logs: dict, control):
        """Queue ``relex/*`` metrics for the trainer's next ``on_log`` (this step: ``should_log`` is set)."""
        logs = {k: v for k, v in logs.items() if v is not None}
        self._pending_logs.update(logs)
        logger.info("relex: %s", ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        control.should_log = True
