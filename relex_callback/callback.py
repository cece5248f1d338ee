"""RelexCallback: record the weight trajectory during training, stop at ``tcut``, write extrapolated checkpoints."""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Optional, Sequence

import torch
from transformers import TrainerCallback

from .buffer import TrajectoryStore
from .config import RelexConfig, RelexSettings
from .engine import finalize
from .errors import RelexInputError
from .params import plain_tracked, select_names, trainable_named_parameters
from .writer import ModelSource

logger = logging.getLogger("relex_callback")

TRAJECTORY_DIR = "relex_trajectory"  # inside each trainer checkpoint: the window so far, for resume


class RelexCallback(TrainerCallback):
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
            Steps to extrapolate to, each greater than ``tcut`` (e.g. ``[500, 1000]`` or ``"500,1000"``).
        stride (`int`, *optional*, defaults to `1`):
            Record every ``stride``-th step; must divide ``tcut``. Memory is ``tcut/stride`` rows.
        fit_start (`int`, *optional*):
            First step used in the linear fit (earlier steps still define the direction). Default: all steps.
        rank (`int`, *optional*, defaults to `1`):
            Directions per tensor, each extrapolated linearly (the paper's ablation found 1 best).
        storage (`str`, *optional*, defaults to `"auto"`):
            Where the buffer lives: ``"device"`` (accelerator memory), ``"host"`` (pinned CPU memory),
            ``"disk"`` (memory-mapped file under ``output_dir``; survives a crash) or ``"auto"`` (the fastest
            that fits, said in the log).
        dtype (`str`, *optional*, defaults to `"bfloat16"`):
            Buffer dtype: ``"bfloat16"``, ``"float16"`` (underflows for lr ~1e-6 runs) or ``"float32"``.
        max_buffer_bytes (`int`, *optional*):
            Upper bound on the buffer's bytes per rank; exceeding it is an error at ``on_train_begin``.
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
            Ring slots K; below ``tcut/stride`` the ring folds (see ``fold_rank``). Default: from
            ``max_buffer_bytes``, else the whole window (exact, no fold).
        on_nonfinite (`str`, *optional*, defaults to `"error"`):
            A NaN/Inf in a weight delta at a snapshot: ``"error"`` stops training with an error naming the tensors
            and the step (nothing is written from it); ``"skip"`` drops that step with a warning (counted in
            ``report.json`` as ``skipped_nonfinite_steps``).

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
        max_buffer_bytes: Optional[int] = None,
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
    ):
        self.settings = RelexSettings.validate(
            tcut=tcut, horizons=horizons, stride=stride, fit_start=fit_start, rank=rank, storage=storage, dtype=dtype,
            max_buffer_bytes=max_buffer_bytes, solver=solver,
        )
        if not isinstance(stop_training, bool):
            raise RelexInputError(f"stop_training must be True or False, got {stop_training!r}")
        from .config import compile_patterns

        compile_patterns(include, "include")
        compile_patterns(exclude, "exclude")
        from .writer import parse_size

        parse_size(max_shard_size)
        # --- streaming fold and fault options (relex_callback.fold)
        from .fold import validate_fold

        self.fold_rank, self.buffer_slots = validate_fold(fold_rank, buffer_slots, self.settings.rank)
        if on_nonfinite not in ("error", "skip"):
            raise RelexInputError(f"on_nonfinite={on_nonfinite!r} is not one of ['error', 'skip']")
        self.on_nonfinite = on_nonfinite
        self.skipped_steps: list[int] = []
        self.stop_training = stop_training
        self.output_dir = output_dir
        self.include = include
        self.exclude = exclude
        self.overwrite = overwrite
        self.max_shard_size = max_shard_size
        self.store: Optional[TrajectoryStore] = None
        self.tracked = []
        self.done = False
        self.report: Optional[dict] = None
        self.solution = None
        self._pending_logs: dict = {}
        self._trainer = None
        self._dist = None  # DistContext: mode, rank, this rank's share (see distributed.py)

    @classmethod
    def from_config(cls, cfg: RelexConfig, **overrides) -> "RelexCallback":
        kw = cfg.to_kwargs()
        kw.update(overrides)
        return cls(**kw)

    # --------------------------------------------------------------------------------------- helpers
    @property
    def tcut(self) -> int:
        return self.settings.tcut

    @property
    def horizons(self) -> tuple[int, ...]:
        return self.settings.horizons

    def _out_dir(self, args) -> str:
        return self.output_dir or os.path.join(args.output_dir, "relex")

    def _find_trainer(self):
        """The Trainer that owns this callback (found on the call stack at ``on_init_end``), so its logging can be
        used and this callback can run before the reporting callbacks in ``on_log``."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                obj = frame.f_locals.get("self")
                handler = getattr(obj, "callback_handler", None)
                if handler is not None and self in getattr(handler, "callbacks", []):
                    return obj
                frame = frame.f_back
        finally:
            del frame
        return None

    def _select(self, model) -> list:
        named = trainable_named_parameters(model)
        if not named:
            raise RelexInputError("the model has no trainable floating-point parameters to track")
        names = select_names([n for n, _ in named], self.include, self.exclude)
        keep = set(names)
        from .distributed import DistContext

        self._dist = DistContext.from_model(model)
        return self._dist.track([(n, p) for n, p in named if n in keep])

    def _read_all(self):
        return [t.read() for t in self.tracked]

    # ---------------------------------------------------------------------------------------- events
    def on_init_end(self, args, state, control, **kwargs):
        trainer = self._find_trainer()
        if trainer is not None:
            self._trainer = trainer
            cbs = trainer.callback_handler.callbacks
            cbs.remove(self)
            cbs.insert(0, self)  # inject relex/* metrics into `logs` before TensorBoard/W&B see them

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        if model is None:
            raise RelexInputError("RelexCallback needs the model in on_train_begin (use it with a transformers Trainer)")
        out_dir = self._out_dir(args)
        if state.global_step >= self.tcut:
            logger.info("relex: resumed at step %d >= tcut=%d; the window is already done", state.global_step, self.tcut)
            self.done = True
            return
        if state.max_steps and 0 < state.max_steps < self.tcut:
            logger.warning(
                "relex: the trainer will stop at max_steps=%d, before tcut=%d: no checkpoint will be extrapolated; "
                "the recorded window is kept in %s for `relex extrapolate`", state.max_steps, self.tcut, out_dir,
            )
        from .engine import check_outputs_free

        check_outputs_free(out_dir, self.horizons, self.overwrite)
        self.tracked = self._select(model)
        specs = [t.spec for t in self.tracked]
        device = self.tracked[0].read().device
        from .fold import plan_slots

        capacity, fold_rank = plan_slots(
            len(self.settings.steps), sum(s.local_numel for s in specs), self.settings.dtype.itemsize,
            max_buffer_bytes=self.settings.max_buffer_bytes, buffer_slots=self.buffer_slots, fold_rank=self.fold_rank,
        )
        if fold_rank is not None and self._dist is not None and self._dist.is_distributed:
            raise RelexInputError(
                f"the window of {len(self.settings.steps)} snapshots does not fit max_buffer_bytes/buffer_slots on this "
                f"rank, and folding is not supported in distributed runs (each rank's fold would differ); raise or drop "
                f"max_buffer_bytes or buffer_slots, or raise stride"
            )
        traj_dir = self._dist.trajectory_dir(os.path.join(out_dir, "trajectory"))
        resumed = self._resume_dir(args, state) if state.global_step > 0 else None
        if resumed is not None:
            self.store = TrajectoryStore.load(
                resumed, specs, capacity, dtype=self.settings.dtype, storage=self.settings.storage, device=device,
                run_directory=traj_dir, max_bytes=self.settings.max_buffer_bytes, fold_rank=fold_rank,
            )
            self.store.truncate(state.global_step)
            logger.info("relex: resumed the window from %s (%d steps recorded)", resumed, self.store.num_rows)
        else:
            if state.global_step > 0:
                raise RelexInputError(
                    f"training resumed at step {state.global_step} inside the RELEX window (tcut={self.tcut}) but the "
                    f"checkpoint has no {TRAJECTORY_DIR}/ (it was saved without RelexCallback); theta_0 is unknown. "
                    "Resume from a checkpoint written with the callback, or start from step 0"
                )
            self.store = TrajectoryStore(
                specs, capacity, dtype=self.settings.dtype, storage=self.settings.storage, device=device,
                directory=traj_dir, max_bytes=self.settings.max_buffer_bytes, fold_rank=fold_rank,
            )
            self.store.set_theta0(self._read_all())
        logger.info(
            "relex: tracking %d tensors (%d elements), %d snapshot slots%s, %.1f MiB buffer on %s",
            len(specs), self.store.D, capacity,
            f" + {fold_rank} fold rows (window of {len(self.settings.steps)} folded)" if fold_rank else "",
            self.store.buffer_bytes / 2**20, self.store.storage,
        )

    def _resume_dir(self, args, state) -> Optional[str]:
        cands = []
        rfc = getattr(args, "resume_from_checkpoint", None)
        if isinstance(rfc, str) and os.path.isdir(rfc):
            cands.append(rfc)
        cands.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for c in cands:
            d = self._dist.trajectory_dir(os.path.join(c, TRAJECTORY_DIR))
            if os.path.isfile(os.path.join(d, "trajectory.json")):
                return d
        return None

    def on_step_end(self, args, state, control, **kwargs):
        if self.done or self.store is None:
            return
        step = state.global_step
        if step % self.settings.stride == 0 and 0 < step <= self.tcut:
            self._snapshot(step)
        if step >= self.tcut:
            self._finish(args, state, control, kwargs)

    def _snapshot(self, step: int):
        from .errors import RelexNonFiniteError

        try:
            self.store.snapshot(step, self._read_all())
        except RelexNonFiniteError as e:
            if self.on_nonfinite != "skip":
                raise RelexNonFiniteError(f"relex: {e}. Training stopped (on_nonfinite='error'); no checkpoint was "
                                          "written from it. Pass on_nonfinite='skip' to drop such steps") from None
            self.skipped_steps.append(int(step))
            logger.warning("relex: %s; step skipped (on_nonfinite='skip', %d skipped so far)", e, len(self.skipped_steps))

    def on_save(self, args, state, control, **kwargs):
        if self.done or self.store is None:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt) and (args.should_save or self._dist.is_distributed):  # every rank saves its share
            self.store.save(self._dist.trajectory_dir(os.path.join(ckpt, TRAJECTORY_DIR)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            self._pending_logs = {}

    def on_train_end(self, args, state, control, **kwargs):
        if not self.done and self.store is not None and self.store.num_rows:
            out_dir = self._out_dir(args)
            keep = self._dist.trajectory_dir(os.path.join(out_dir, "partial_trajectory"))
            self.store.save(keep)
            logger.warning(
                "relex: training ended at step %d before tcut=%d; nothing was extrapolated. The %d recorded steps are "
                "in %s: extrapolate from them with relex_callback.engine.extrapolate_trajectory(%r, base=<the "
                "checkpoint training started from>, horizons=[...], out_dir=...)", state.global_step, self.tcut,
                self.store.num_rows, keep, keep,
            )

    # ---------------------------------------------------------------------------------------- finish
    def _finish(self, args, state, control, kwargs):
        out_dir = self._out_dir(args)
        model = kwargs.get("model")
        tokenizer = kwargs.get("processing_class")
        t0 = time.perf_counter()
        extra = {"skipped_nonfinite_steps": list(self.skipped_steps)}
        if self._dist is not None and self._dist.is_distributed:
            sol, report = self._dist.finalize(
                self.store, tcut=self.tcut, horizons=self.horizons, out_dir=out_dir, model=model, tokenizer=tokenizer,
                rank=self.settings.rank, fit_start=self.settings.fit_start, method=self.settings.solver,
                overwrite=self.overwrite, max_shard_size=self.max_shard_size, report_extra=extra,
            )
        else:
            sol, report = finalize(
                self.store, tcut=self.tcut, horizons=self.horizons, out_dir=out_dir,
                source=ModelSource(model, tokenizer), rank=self.settings.rank, fit_start=self.settings.fit_start,
                method=self.settings.solver, overwrite=self.overwrite, max_shard_size=self.max_shard_size,
                report_extra=extra,
            )
        seconds = time.perf_counter() - t0
        self.end_of_window_seconds = seconds
        self.solution, self.report = sol, report
        summ = report["summary"]
        self._pending_logs = {
            "relex/explained_variance_mean": summ["explained_variance_mean"],
            "relex/explained_variance_min": summ["explained_variance_min"],
            "relex/r2_mean": summ["r2_mean"],
            "relex/solve_seconds": report["solve_seconds"],
            "relex/end_of_window_seconds": seconds,
            "relex/buffer_bytes": self.store.buffer_bytes,
        }
        self._pending_logs = {k: v for k, v in self._pending_logs.items() if v is not None}
        logger.info("relex: %s", ", ".join(f"{k}={v:.4g}" for k, v in self._pending_logs.items()))
        control.should_log = True
        self.done = True
        self.store.release()
        self.store = None
        if self.stop_training:
            control.should_training_stop = True
