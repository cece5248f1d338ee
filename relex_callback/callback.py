"""RelexCallback: record the weight trajectory during training, stop at ``tcut``, write extrapolated checkpoints."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import time
from typing import Optional, Sequence

import torch
from transformers import TrainerCallback

from .buffer import META_FILE, THETA0_FILE, TrajectoryStore, save_theta0
from .config import RelexConfig, RelexSettings
from .engine import finalize, horizon_dir
from .errors import RelexInputError
from .params import select_names, trainable_named_parameters
from .report import REPORT_NAME, load_report, write_report
from .state import STATE_NAME, RelexState, load_state
from .writer import ModelSource, atomic_directory, clean_stale_temporaries

logger = logging.getLogger("relex_callback")

TRAJECTORY_DIR = "relex_trajectory"  # inside each trainer checkpoint: the window so far, for resume
VALIDATION_FILE = "validation.json"  # beside theta_0 in a checkpoint saved after tcut in validation mode


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is an optional extra
        return False
    return isinstance(model, PeftModel)


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
        merge_lora (`bool`, *optional*, defaults to `False`):
            PEFT models only. Each horizon is always written as an adapter directory ``step-H/`` (loaded with
            ``PeftModel.from_pretrained(base, "step-H")``); with ``True`` also as a full model ``step-H-merged/``
            (``merge_and_unload`` on a copy of the model: needs memory for a second copy of the base weights).

    Validation mode (``stop_training=False``): training continues after ``tcut``; when ``state.global_step``
    reaches each horizon ``H``, the real deltas ``theta_H - theta_0`` are compared per tensor with the
    extrapolated ones (cosine and norm ratio, the paper's Figure 6), logged as ``relex/validation/H/...`` and
    added to ``report.json`` under ``"validation"``.

    Resume: ``trainer.train(resume_from_checkpoint=...)`` inside the window continues the same trajectory
    (theta_0 and the rows recorded so far are saved in ``checkpoint-N/relex_trajectory/``); resuming after
    ``tcut`` writes nothing again.

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
        merge_lora: bool = False,
    ):
        self.settings = RelexSettings.validate(
            tcut=tcut, horizons=horizons, stride=stride, fit_start=fit_start, rank=rank, storage=storage, dtype=dtype,
            max_buffer_bytes=max_buffer_bytes, solver=solver,
        )
        if not isinstance(stop_training, bool):
            raise RelexInputError(f"stop_training must be True or False, got {stop_training!r}")
        if not isinstance(merge_lora, bool):
            raise RelexInputError(f"merge_lora must be True or False, got {merge_lora!r}")
        if not isinstance(overwrite, bool):
            raise RelexInputError(f"overwrite must be True or False, got {overwrite!r}")
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise RelexInputError(f"output_dir must be a path (str), got {type(output_dir).__name__}")
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
        self.merge_lora = merge_lora
        self.validation: Optional[dict] = None  # validation mode after tcut: result, theta_0, horizons left
        self.store: Optional[TrajectoryStore] = None
        self.tracked = []
        self.done = False
        self.report: Optional[dict] = None
        self._pending_logs: dict = {}
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
        """The Trainer that owns this callback (found on the call stack at ``on_init_end``), so this callback can run
        before the reporting callbacks in ``on_log``."""
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
        if self._dist.is_distributed and is_peft_model(model):
            raise RelexInputError(
                f"RelexCallback does not support PEFT (LoRA) models in distributed runs ({self._dist.describe()}): the "
                "adapter directories are written by PEFT's save_pretrained on one process. Train the adapter on one "
                "process, or merge the adapter / train the full model under DDP, ZeRO or FSDP2"
            )
        return self._dist.track([(n, p) for n, p in named if n in keep])

    def _read_all(self):
        return [t.read() for t in self.tracked]

    # ---------------------------------------------------------------------------------------- events
    def on_init_end(self, args, state, control, **kwargs):
        trainer = self._find_trainer()
        if trainer is not None:
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
            if not self.stop_training:
                self._resume_validation(args, state, model)
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
        resumed = self._saved_dir(args, state, META_FILE) if state.global_step > 0 else None
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

    def _saved_dir(self, args, state, marker: str) -> Optional[str]:
        """This rank's ``relex_trajectory/`` in the checkpoint training resumed from (``args.resume_from_checkpoint``,
        else ``checkpoint-<global_step>``) when it holds ``marker``; ``None`` otherwise."""
        for c in (getattr(args, "resume_from_checkpoint", None), os.path.join(args.output_dir, f"checkpoint-{state.global_step}")):
            if isinstance(c, str):
                d = self._dist.trajectory_dir(os.path.join(c, TRAJECTORY_DIR))
                if os.path.isfile(os.path.join(d, marker)):
                    return d
        return None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.validation is not None:
            if step in self.validation["pending"]:
                self._validate(args, step, control)
            return
        if self.done or self.store is None:
            return
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
        if self._dist is None or (self.store is None and self.validation is None):
            return
        if not (args.should_save or self._dist.is_distributed):  # distributed: every rank saves its own share
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(ckpt):
            return
        target = self._dist.trajectory_dir(os.path.join(ckpt, TRAJECTORY_DIR))
        if self.validation is not None:
            self._save_validation(target)
        elif not self.done and self.store is not None:
            self.store.save(target)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)  # seen by the reporting callbacks after this one (TensorBoard, W&B)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step:
                last.update(self._pending_logs)  # Trainer.log appended its copy before calling on_log
            self._pending_logs = {}

    def on_train_end(self, args, state, control, **kwargs):
        if not self.done and self.store is not None and self.store.num_rows:
            out_dir = self._out_dir(args)
            keep = self._dist.trajectory_dir(os.path.join(out_dir, "partial_trajectory"))
            self.store.save(keep)
            logger.warning(
                "relex: training ended at step %d before tcut=%d; nothing was extrapolated. The %d recorded steps are "
                "in %s: extrapolate from them with `relex extrapolate --trajectory %s --base <the checkpoint training "
                "started from> --horizons H --out DIR`", state.global_step, self.tcut,
                self.store.num_rows, keep, keep,
            )

    # ---------------------------------------------------------------------------------------- finish
    def _finish(self, args, state, control, kwargs):
        out_dir = self._out_dir(args)
        model = kwargs.get("model")
        tokenizer = kwargs.get("processing_class")
        peft = is_peft_model(model)
        t0 = time.perf_counter()
        extra = {"skipped_nonfinite_steps": list(self.skipped_steps), "format": "peft_adapter" if peft else "full"}
        if self._dist is not None and self._dist.is_distributed:
            sol, report = self._dist.finalize(
                self.store, tcut=self.tcut, horizons=self.horizons, out_dir=out_dir, model=model, tokenizer=tokenizer,
                rank=self.settings.rank, fit_start=self.settings.fit_start, method=self.settings.solver,
                overwrite=self.overwrite, max_shard_size=self.max_shard_size, report_extra=extra,
            )
        else:
            sol, report = finalize(
                self.store, tcut=self.tcut, horizons=self.horizons, out_dir=out_dir,
                source=None if peft else ModelSource(model, tokenizer),
                rank=self.settings.rank, fit_start=self.settings.fit_start, method=self.settings.solver,
                overwrite=self.overwrite, max_shard_size=self.max_shard_size,
                write_fn=self._peft_writer(model, tokenizer, out_dir) if peft else None,
                report_extra=extra,
            )
        seconds = time.perf_counter() - t0
        self.end_of_window_seconds = seconds
        self.report = report
        summ = report["summary"]
        logs = {
            "relex/explained_variance_mean": summ["explained_variance_mean"],
            "relex/explained_variance_min": summ["explained_variance_min"],
            "relex/r2_mean": summ["r2_mean"],
            "relex/solve_seconds": report["solve_seconds"],
            "relex/end_of_window_seconds": seconds,
            "relex/buffer_bytes": self.store.buffer_bytes,
        }
        self._emit(logs, control)
        self.done = True
        store, self.store = self.store, None
        store.release()
        freed = store.discard_files()  # disk tier: the state file and the horizons hold the result now
        if freed:
            logger.info("relex: removed the disk-tier trajectory %s (%.2f GiB); the trainer checkpoints inside the "
                        "window keep their own copy in relex_trajectory/", store.directory, freed / 2**30)
        if self.stop_training:
            control.should_training_stop = True
        else:
            self._start_validation(state, sol, store.theta0, store.specs)

    def _emit(self, logs: dict, control):
        """Queue ``relex/*`` metrics for the trainer's next ``on_log`` (this step: ``should_log`` is set)."""
        logs = {k: v for k, v in logs.items() if v is not None}
        self._pending_logs.update(logs)
        logger.info("relex: %s", ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        control.should_log = True

    # ------------------------------------------------------------------------------------------ PEFT
    def _peft_writer(self, model, tokenizer, out_dir):
        """A ``write_fn`` for :func:`engine.finalize` that writes each horizon as a PEFT adapter directory with
        PEFT's own ``save_pretrained``: the adapter parameters temporarily hold the extrapolated values and are
        restored bit for bit afterwards (also when writing fails)."""
        params = {t.spec.name: t.param for t in self.tracked}

        def write(horizon, result, theta0_of):
            final = horizon_dir(out_dir, horizon)
            clean_stale_temporaries(out_dir, os.path.basename(final))
            saved = {n: p.detach().clone() for n, p in params.items()}
            try:
                with torch.no_grad():
                    for i, spec in enumerate(result.specs):
                        p = params[spec.name]
                        p.copy_(result.extrapolate(i, horizon, theta0_of(i)).reshape(p.shape).to(p.device))
                with atomic_directory(final, overwrite=self.overwrite) as tmp:
                    model.save_pretrained(tmp)
                    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                        tokenizer.save_pretrained(tmp)
                if self.merge_lora:
                    self._write_merged(model, tokenizer, final + "-merged")
            finally:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(saved[n])
            return final

        return write

    def _write_merged(self, model, tokenizer, final: str):
        merged = copy.deepcopy(model).merge_and_unload()
        try:
            with atomic_directory(final, overwrite=self.overwrite) as tmp:
                merged.save_pretrained(tmp)
                if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                    tokenizer.save_pretrained(tmp)
        finally:
            del merged

    # ------------------------------------------------------------------------------------ validation
    # Validation works on this rank's pieces (single process: every tensor, whole; DDP / ZeRO-1/2: its share of the
    # tensors, whole; ZeRO-3 / FSDP2: its flat shard of every tensor). Per tensor, <real, extrapolated> and the
    # squared norms are sums over pieces: each rank computes its partial sums, one all-reduce adds them up
    # (DistContext.validation_sums), and every rank derives the same cosines; only rank 0 writes report.json.
    VALIDATION_SUMS = ("dot", "real_sq", "extrapolated_sq", "error_sq")

    def _start_validation(self, state, result, theta0, specs):
        """Keep what the horizon comparisons need after the buffer is freed: this rank's result (directions, lines)
        and theta_0 (``D`` local elements each)."""
        pending = sorted(h for h in self.horizons if h > state.global_step)
        if state.max_steps and any(h > state.max_steps for h in pending):
            late = [h for h in pending if h > state.max_steps]
            logger.warning("relex: validation horizons %s are beyond max_steps=%d and will not be reached", late, state.max_steps)
        self.validation = {"result": result, "theta0": theta0, "specs": list(specs), "pending": set(pending)}

    @torch.no_grad()
    def _partial_sums(self, horizon: int) -> dict:
        """For each tensor piece this rank holds: ``<real, pred>``, ``||real||^2``, ``||pred||^2``, ``||pred-real||^2``
        (float64) of the real delta ``theta_H - theta_0`` and the extrapolated one."""
        v = self.validation
        result, theta0 = v["result"], v["theta0"]
        reads = {t.spec.name: t.read for t in self.tracked}
        out = {}
        for i, spec in enumerate(v["specs"]):
            th0 = theta0[spec.offset : spec.offset + spec.local_numel]
            real = (reads[spec.name]().to(device=th0.device, dtype=torch.float32) - th0.float()).double()
            pred = (result.extrapolate(i, horizon, th0.to(spec.dtype)).to(device=th0.device, dtype=torch.float32)
                    - th0.float()).double()
            out[spec.name] = torch.stack([real @ pred, real @ real, pred @ pred, (pred - real).square().sum()]).cpu()
        return out

    def _compare(self, horizon: int) -> dict:
        """Per-tensor cosine and norm ratio of the extrapolated delta vs the real one at step ``horizon`` (every rank
        calls it at the same step in distributed runs; the result is the same on every rank)."""
        names = self._dist.names  # set by _select before validation starts; one process: the reduce is a no-op
        sums = self._dist.validation_sums(self._partial_sums(horizon), len(self.VALIDATION_SUMS))
        tensors = []
        for n, (dot, rr, pp, ee) in zip(names, sums.tolist()):
            rn, pn = math.sqrt(max(rr, 0.0)), math.sqrt(max(pp, 0.0))
            tensors.append({
                "name": n,
                "cosine": dot / (rn * pn) if rn > 0 and pn > 0 else None,
                "norm_ratio": pn / rn if rn > 0 else None,
                "real_norm": rn,
                "extrapolated_norm": pn,
            })
        dot_all, real_all, pred_all, err_all = (float(x) for x in sums.sum(0).tolist()) if len(names) else (0.0,) * 4
        cos = [t["cosine"] for t in tensors if t["cosine"] is not None]
        ratio = [t["norm_ratio"] for t in tensors if t["norm_ratio"] is not None]
        denom = math.sqrt(real_all * pred_all)
        summary = {
            "cosine_mean": sum(cos) / len(cos) if cos else None,
            "cosine_min": min(cos) if cos else None,
            "cosine_global": dot_all / denom if denom > 0 else None,
            "norm_ratio_mean": sum(ratio) / len(ratio) if ratio else None,
            "norm_ratio_global": math.sqrt(pred_all / real_all) if real_all > 0 else None,
            "relative_error_global": math.sqrt(err_all / real_all) if real_all > 0 else None,
        }
        return {"step": int(horizon), "summary": summary, "tensors": tensors}

    def _validate(self, args, horizon: int, control):
        res = self._compare(horizon)
        self.validation["pending"].discard(horizon)
        self._emit({f"relex/validation/{horizon}/{k}": val for k, val in res["summary"].items()}, control)
        self._record_validation(self._out_dir(args), horizon, res)

    def _is_writer(self) -> bool:
        return self._dist is None or self._dist.rank == 0

    def _record_validation(self, out_dir: str, horizon: int, res: dict):
        """Add the comparison to ``report.json`` under ``"validation"`` (rewritten atomically, by rank 0 only; the
        other ranks keep it in ``self.report``)."""
        path = os.path.join(out_dir, REPORT_NAME)
        report = self.report
        if report is None:
            report = load_report(path) if self._is_writer() and os.path.isfile(path) else {}
        report.setdefault("validation", {})[str(horizon)] = res
        self.report = report
        if self._is_writer():
            write_report(path, report)

    def _save_validation(self, directory: str):
        """At a checkpoint after tcut in validation mode, this rank's pieces: theta_0, and its result as a state file
        (directions and lines, ``relex_state.safetensors`` holding only its pieces), so a resume can still compare at
        the horizons. Written by every rank into its own directory (``rank-<r>/`` in distributed runs)."""
        from .state import save_state

        os.makedirs(directory, exist_ok=True)
        v = self.validation
        theta0, specs = v["theta0"], v["specs"]
        state_path = os.path.join(directory, STATE_NAME)
        if isinstance(v["result"], RelexState):  # resumed: the state loaded from the earlier checkpoint
            v["result"].save(state_path)
        else:
            save_state(state_path, v["result"],
                       lambda i: theta0[specs[i].offset : specs[i].offset + specs[i].local_numel], tcut=self.tcut)
        save_theta0(directory, theta0)
        tmp = os.path.join(directory, VALIDATION_FILE + ".tmp")
        with open(tmp, "w") as f:  # written last: its presence means the rest is complete
            json.dump({"pending": sorted(v["pending"]), "specs": [s.to_json() for s in specs]}, f)
        os.replace(tmp, os.path.join(directory, VALIDATION_FILE))

    def _resume_validation(self, args, state, model):
        """Resumed after tcut with ``stop_training=False``: reload this rank's pieces (theta_0 and the state saved
        beside it in the checkpoint) to keep validating. In distributed runs every rank must have its pieces (same
        world size, same tracked tensors) or no rank validates: the decision is collective, so no rank waits in an
        all-reduce the others never reach."""
        from safetensors.torch import load_file

        from .params import TensorSpec

        self.tracked = self._select(model)
        ckpt_dir, why = self._saved_dir(args, state, VALIDATION_FILE), None
        validation = None
        if ckpt_dir is None:
            why = "the checkpoint has no saved validation state for this rank (saved with another world size?)"
        else:
            with open(os.path.join(ckpt_dir, VALIDATION_FILE)) as f:
                saved = json.load(f)
            specs = [TensorSpec.from_json(d) for d in saved.get("specs", [])]
            mine = [t.spec for t in self.tracked]
            key = lambda s: (s.name, tuple(s.shape), s.local_numel, s.flat_start)  # noqa: E731
            if [key(s) for s in specs] != [key(s) for s in mine]:
                why = "the checkpoint's validation state holds other tensors (or other shards) than this rank tracks"
            else:
                state_file = os.path.join(ckpt_dir, STATE_NAME)
                result = load_state(state_file)
                theta0 = load_file(os.path.join(ckpt_dir, THETA0_FILE))["theta0"].to(self.tracked[0].read().device)
                validation = {"result": result, "theta0": theta0, "specs": specs,
                              "pending": {h for h in saved["pending"] if h > state.global_step}}
        everyone = self._dist.all_ok(validation is not None) if self._dist.is_distributed else validation is not None
        if not everyone:
            logger.warning("relex: resumed after tcut without the saved validation state%s; the horizons are not "
                           "validated", f" ({why})" if why else " on another rank")
            return
        self.validation = validation
