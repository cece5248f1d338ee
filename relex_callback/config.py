"""Every RELEX setting, validated once, without torch.

:class:`RelexSettings` is the single source of truth for what a valid setting is. The callback
(``RelexCallback(**kw)`` builds one), :class:`RelexConfig` (the ``HfArgumentParser`` / ``TrlParser`` form, every
callback argument prefixed ``relex_``) and the CLI all go through :meth:`RelexSettings.validate`, so a bad value
gives the same message everywhere, before any work is done. This module imports no torch: ``relex --help`` and
argument mistakes answer at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import RelexInputError

DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
STORAGES = ("auto", "device", "host", "disk")
SOLVERS = ("auto", "gram", "power")
ON_NONFINITE = ("error", "skip")
FIT_CLOCKS = ("lr", "steps")  # relex_callback.core.clock: the cumulative learning rate, or the step
ON_FLAT_REWARD = ("warn", "error", "ignore")
FITS = ("linear", "power", "log", "polynomial", "auto")
LADDER = (2, 4, 8, 16)  # horizons="auto": these multiples of tcut
DEFAULT_FOLD_RANK = 8
# Step numbers (tcut, horizons, fit_start, stride) beyond this are refused: a float32 coefficient a*H + b and a
# directory name step-H stay exact and sane far below it, and no RL run has 10^9 optimizer steps.
MAX_STEP = 10**9
# Sizes (shards, buffer bounds) beyond this are refused (2^60 bytes = 1 EiB): safetensors offsets are 64-bit.
MAX_BYTES = 1 << 60
# Processes of a run (world sizes) beyond this are refused: no training run has a million processes.
MAX_PROCESSES = 1 << 20

# The one table of whole-number bounds: (minimum, maximum) of every count the callback, RelexSettings and the CLI
# take, so `--tcut 10**30` and `tcut=10**30` are refused alike (tests/test_ownership.py enumerates it).
BOUNDS = {
    "tcut": (2, MAX_STEP), "horizons": (1, MAX_STEP), "steps": (0, MAX_STEP), "stride": (1, MAX_STEP),
    "fit_start": (0, MAX_STEP), "rank": (1, MAX_STEP), "fold_rank": (1, MAX_STEP), "buffer_slots": (1, MAX_STEP),
    "fit_window": (1, MAX_STEP), "degree": (1, MAX_STEP), "keep_best": (1, MAX_STEP), "worst": (0, MAX_STEP),
    "max_buffer_bytes": (1, MAX_BYTES), "max_shard_size": (1, MAX_BYTES),
    "world_size": (1, MAX_PROCESSES), "local_world_size": (1, MAX_PROCESSES),
}


def bounded(name: str, value, option: Optional[str] = None) -> int:
    """``value`` as a whole number within ``BOUNDS[name]``; the error names ``option`` (a CLI flag) or ``name``.
    Strings of digits are accepted (the CLI's arguments, a YAML value)."""
    lo, hi = BOUNDS[name]
    return _whole(option or name, value.strip() if isinstance(value, str) else value, lo, hi)


def parse_dtype(name) -> str:
    """The buffer dtype's name (``"bfloat16"``, ``"float16"`` or ``"float32"``) from a name, alias or torch dtype."""
    key = str(name).replace("torch.", "").lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise RelexInputError(f"dtype {name!r} is not supported for the trajectory buffer; use one of {sorted(DTYPES)}")
    return key


def torch_dtype(name):
    """The torch dtype of a buffer dtype name (imports torch)."""
    import torch

    return getattr(torch, parse_dtype(name))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_size(size, what: str = "max_shard_size") -> int:
    """``"50GB"`` / ``"500MB"`` / ``"10KiB"`` / int -> bytes (decimal units like transformers), > 0 and finite."""
    n = None
    if isinstance(size, bool):
        n = None
    elif isinstance(size, int):
        n = size
    elif isinstance(size, float):
        n = int(size) if math.isfinite(size) and size.is_integer() else None
    elif isinstance(size, str):
        s = size.strip().upper()
        units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "TB": 10**12, "GB": 10**9, "MB": 10**6,
                 "KB": 10**3, "B": 1}
        mult, num = 1, s
        for u, m in units.items():
            if s.endswith(u):
                mult, num = m, s[: -len(u)].strip()
                break
        try:
            x = float(num)
            if math.isfinite(x):
                n = int(x * mult)
        except ValueError:
            n = None
    if n is None or n <= 0:
        raise RelexInputError(f"{what}={size!r} is not a size like '5GB', '500MB' or a number of bytes")
    if n > MAX_BYTES:
        raise RelexInputError(f"{what}={size!r} is beyond {MAX_BYTES:,} bytes; give a real size like '5GB'")
    return n


def parse_horizons(value) -> list[int]:
    """Accept ``[500, 1000]``, ``"500,1000"``, ``["500,1000"]`` (a YAML or command-line string) or ``500``; return
    the list as given (validated later)."""
    if value is None:
        raise RelexInputError("horizons is required: the steps to extrapolate to, e.g. horizons=[500, 1000]")
    if isinstance(value, int) and not isinstance(value, bool):
        return [int(value)]
    items = [value] if isinstance(value, str) else list(value)
    parts = []
    for p in items:
        parts += [q for q in re.split(r"[,\s]+", p.strip()) if q] if isinstance(p, str) else [p]
    out = []
    for p in parts:
        try:
            if isinstance(p, bool) or (isinstance(p, float) and not p.is_integer()):
                raise ValueError
            out.append(int(p))
        except (TypeError, ValueError, OverflowError):
            raise RelexInputError(f"horizons must be whole step numbers, got {p!r} in {value!r}") from None
    if not out:
        raise RelexInputError(f"horizons is empty ({value!r}); give at least one step, e.g. horizons=[500]")
    return out


def snapshot_steps(tcut: int, stride: int) -> list[int]:
    """The snapshot steps S = {t : t % stride == 0, 0 < t <= tcut}."""
    return list(range(stride, tcut + 1, stride))


def compile_patterns(patterns: Optional[Sequence[str]], what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise RelexInputError(f"{what} patterns must be strings (regular expressions), got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise RelexInputError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def _whole(name, v, minimum, maximum=None):
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            v = int(v)
        except (TypeError, ValueError, OverflowError):
            raise RelexInputError(f"{name} must be a whole number, got {v!r}") from None
    if v < minimum:
        raise RelexInputError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise RelexInputError(f"{name}={v} is beyond {maximum:,}; use a smaller {name}")
    return v


def _flag(name, v):
    if not isinstance(v, bool):
        raise RelexInputError(f"{name} must be True or False, got {v!r}")
    return v


def _choice(name, v, allowed):
    if v not in allowed:
        raise RelexInputError(f"{name}={v!r} is not one of {list(allowed)}")
    return v


@dataclass(frozen=True)
class RelexSettings:
    """Every setting of a RELEX window, after validation. Build with :meth:`validate` (the arguments of
    :class:`~relex_callback.RelexCallback`)."""

    tcut: int
    horizons: tuple[int, ...]
    stride: int = 1
    fit_start: Optional[int] = None
    rank: int = 1  # SVD rank: directions per tensor (never a process rank)
    storage: str = "auto"
    dtype: str = "bfloat16"
    max_buffer_bytes: Optional[int] = None
    solver: str = "auto"
    stop_training: bool = True
    output_dir: Optional[str] = None
    include: Optional[tuple[str, ...]] = None
    exclude: Optional[tuple[str, ...]] = None
    overwrite: bool = False
    max_shard_size: int = 50 * 10**9
    fold_rank: int = DEFAULT_FOLD_RANK
    buffer_slots: Optional[int] = None
    on_nonfinite: str = "error"
    merge_lora: bool = False
    fit: str = "linear"
    fit_window: Optional[int] = None
    degree: int = 2
    on_flat_reward: str = "warn"
    reward_metric: Optional[str] = None
    evaluate_horizons: bool = False
    keep_best: Optional[int] = None
    auto_horizons: bool = False  # horizons="auto": the ladder LADDER x tcut, scored (evaluate_horizons) when possible
    fit_clock: str = "lr"  # the fit's axis: "lr" (cumulative learning rate, relex_callback.core.clock) or "steps"

    @property
    def steps(self) -> list[int]:
        return snapshot_steps(self.tcut, self.stride)

    @property
    def fit_steps(self) -> list[int]:
        start = self.fit_start if self.fit_start is not None else 0
        return [t for t in self.steps if t >= start]

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @classmethod
    def validate(
        cls,
        *,
        tcut,
        horizons,
        stride=1,
        fit_start=None,
        rank=1,
        storage="auto",
        dtype="bfloat16",
        max_buffer_bytes=None,
        solver="auto",
        stop_training=True,
        output_dir=None,
        include=None,
        exclude=None,
        overwrite=False,
        max_shard_size="50GB",
        fold_rank=None,
        buffer_slots=None,
        on_nonfinite="error",
        merge_lora=False,
        fit="linear",
        fit_window=None,
        degree=2,
        on_flat_reward="warn",
        reward_metric=None,
        evaluate_horizons=False,
        keep_best=None,
        fit_clock="lr",
        allow_partial_stride: bool = False,
    ) -> "RelexSettings":
        tcut, stride, steps = _check_window(tcut, stride, allow_partial_stride)
        hs, auto_horizons = _check_horizons(horizons, tcut)
        fit_start, rank = _check_fit_start_and_rank(fit_start, rank, steps, tcut, stride)
        _choice("storage", storage, STORAGES)
        _choice("solver", solver, SOLVERS)
        if solver == "power" and rank > 1:
            raise RelexInputError(f"solver='power' computes rank 1 only; use solver='gram' or 'auto' for rank={rank}")
        dt = parse_dtype(dtype)
        if max_buffer_bytes is not None:
            if isinstance(max_buffer_bytes, str):
                max_buffer_bytes = parse_size(max_buffer_bytes, "max_buffer_bytes")
            max_buffer_bytes = bounded("max_buffer_bytes", max_buffer_bytes)
        _flag("stop_training", stop_training)
        _flag("overwrite", overwrite)
        _flag("merge_lora", merge_lora)
        if output_dir is not None and not isinstance(output_dir, (str, bytes)) and not hasattr(output_dir, "__fspath__"):
            raise RelexInputError(f"output_dir must be a path (str), got {type(output_dir).__name__}")
        include = tuple(p.pattern for p in compile_patterns(include, "include")) if include is not None else None
        exclude = tuple(p.pattern for p in compile_patterns(exclude, "exclude")) if exclude is not None else None
        shard = parse_size(max_shard_size)
        fold_rank, buffer_slots = _check_fold(fold_rank, buffer_slots, rank)
        _choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        _choice("fit_clock", fit_clock, FIT_CLOCKS)
        fit_window, degree = _check_fit_family(fit, fit_window, degree, steps, fit_start)
        keep_best = _check_reward_options(on_flat_reward, reward_metric, evaluate_horizons, keep_best, auto_horizons)
        return cls(
            tcut=tcut, horizons=tuple(hs), stride=stride, fit_start=fit_start, rank=rank, storage=storage, dtype=dt,
            max_buffer_bytes=max_buffer_bytes, solver=solver, stop_training=stop_training,
            output_dir=None if output_dir is None else str(output_dir if not isinstance(output_dir, bytes) else output_dir.decode()),
            include=include, exclude=exclude, overwrite=overwrite, max_shard_size=shard, fold_rank=fold_rank,
            buffer_slots=buffer_slots, on_nonfinite=on_nonfinite, merge_lora=merge_lora, fit=fit,
            fit_window=fit_window, degree=degree, on_flat_reward=on_flat_reward, reward_metric=reward_metric,
            evaluate_horizons=evaluate_horizons or auto_horizons, keep_best=keep_best, auto_horizons=auto_horizons,
            fit_clock=fit_clock,
        )


def _check_window(tcut, stride, allow_partial_stride):
    """tcut and stride, and the snapshot steps they record (at least 2); return (tcut, stride, steps)."""
    if tcut is None:
        raise RelexInputError("tcut is required: the number of optimizer steps to observe, e.g. tcut=75")
    tcut = bounded("tcut", tcut)
    stride = bounded("stride", stride)
    if stride > tcut:
        raise RelexInputError(f"stride={stride} is larger than tcut={tcut}: no step would be recorded; use a stride <= tcut/2")
    if tcut % stride and not allow_partial_stride:
        lo, hi = tcut - tcut % stride, tcut - tcut % stride + stride
        raise RelexInputError(
            f"tcut={tcut} is not a multiple of stride={stride}: the last {tcut % stride} steps before tcut would be "
            f"trained but never recorded; use tcut={lo} or tcut={hi}, or a stride that divides {tcut}"
        )
    steps = snapshot_steps(tcut, stride)
    if len(steps) < 2:
        raise RelexInputError(
            f"tcut={tcut} with stride={stride} records {len(steps)} snapshot; a line needs at least 2: lower stride or raise tcut"
        )
    return tcut, stride, steps


def _check_horizons(horizons, tcut):
    """The horizons (or ``"auto"``: the ladder of multiples of tcut), distinct, beyond tcut, within MAX_STEP; return
    (sorted horizons, auto)."""
    auto_horizons = isinstance(horizons, str) and horizons.strip().lower() == "auto" or (
        isinstance(horizons, (list, tuple)) and len(horizons) == 1 and str(horizons[0]).strip().lower() == "auto")
    hs = [k * tcut for k in LADDER] if auto_horizons else parse_horizons(horizons)
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise RelexInputError(f"horizons repeat {dup}: give each step once, e.g. horizons={sorted(set(hs))}")
    bad = [h for h in hs if h <= tcut]
    if bad:
        raise RelexInputError(
            f"horizons {bad} are not beyond tcut={tcut}: extrapolation writes steps after the observed window; "
            f"use horizons > {tcut} (the paper uses 5-10x tcut)"
        )
    big = [h for h in hs if h > MAX_STEP]
    if big:
        raise RelexInputError(f"horizons {big} are beyond {MAX_STEP:,} steps; use horizons of at most {MAX_STEP:,} "
                              "(the paper uses 5-10x tcut)")
    return sorted(hs), auto_horizons


def _check_fit_start_and_rank(fit_start, rank, steps, tcut, stride):
    """fit_start leaves at least 2 snapshots to fit; rank is at most the number of snapshots."""
    if fit_start is not None:
        fit_start = bounded("fit_start", fit_start)
        n_fit = len([t for t in steps if t >= fit_start])
        if n_fit < 2:
            raise RelexInputError(
                f"fit_start={fit_start} leaves {n_fit} snapshot step(s) in [fit_start, tcut={tcut}] with stride={stride}; "
                f"the line needs at least 2: use fit_start <= {steps[-2]}"
            )
    rank = bounded("rank", rank)
    if rank > len(steps):
        raise RelexInputError(
            f"rank={rank} exceeds the number of snapshots ({len(steps)} = tcut/stride); use rank <= {len(steps)}"
        )
    return fit_start, rank


def _check_fold(fold_rank, buffer_slots, rank):
    """fold_rank (default DEFAULT_FOLD_RANK, at least rank) and buffer_slots; return both."""
    fold_rank = _strict_whole("fold_rank", DEFAULT_FOLD_RANK if fold_rank is None else fold_rank)
    if buffer_slots is not None:
        buffer_slots = _strict_whole("buffer_slots", buffer_slots)
    if fold_rank < rank:
        raise RelexInputError(
            f"fold_rank={fold_rank} is below rank={rank}: the folded trajectory keeps only fold_rank directions per "
            f"tensor; use fold_rank >= {rank}"
        )
    return fold_rank, buffer_slots


def _check_fit_family(fit, fit_window, degree, steps, fit_start):
    """The fit family against the steps it can use (fit_window, a polynomial's degree, power's 3 points); return
    (fit_window, degree)."""
    _choice("fit", fit, FITS)
    n_steps = len(steps) if fit_start is None else len([t for t in steps if t >= fit_start])
    if fit_window is not None:
        fit_window = _strict_whole("fit_window", fit_window)
        if not 2 <= fit_window <= n_steps:
            raise RelexInputError(f"fit_window={fit_window} must be between 2 and the {n_steps} recorded steps the "
                                  f"fit can use (tcut/stride, from fit_start); use fit_window <= {n_steps}")
    degree = _strict_whole("degree", degree)
    if fit == "polynomial" and degree >= min(n_steps, fit_window or n_steps):
        raise RelexInputError(f"degree={degree} needs more than {degree} fitted steps; the fit has "
                              f"{min(n_steps, fit_window or n_steps)}: lower degree or raise tcut")
    if fit == "power" and min(n_steps, fit_window or n_steps) < 3:
        raise RelexInputError(f"fit='power' (c = a*t^p + b) needs at least 3 fitted steps; the fit has "
                              f"{min(n_steps, fit_window or n_steps)}: raise tcut (or lower stride / fit_start, or "
                              "widen fit_window), or use fit='log' or 'linear'")
    return fit_window, degree


def _check_reward_options(on_flat_reward, reward_metric, evaluate_horizons, keep_best, auto_horizons):
    """The reward-trend and horizon-scoring options; return keep_best."""
    _choice("on_flat_reward", on_flat_reward, ON_FLAT_REWARD)
    if reward_metric is not None and (not isinstance(reward_metric, str) or not reward_metric.strip()):
        raise RelexInputError(f"reward_metric must be the name of a logged metric (e.g. 'reward'), got {reward_metric!r}")
    _flag("evaluate_horizons", evaluate_horizons)
    if keep_best is not None:
        keep_best = _strict_whole("keep_best", keep_best)
        if not (evaluate_horizons or auto_horizons):
            raise RelexInputError("keep_best needs scored horizons: pass evaluate_horizons=True (or horizons='auto')")
    return keep_best


def _strict_whole(name, v):
    """A count given as a Python int (a string or float here is a mistake in code, said as such), within
    ``BOUNDS[name]``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise RelexInputError(f"{name} must be a whole number, got {v!r}")
    return bounded(name, v)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RelexConfig:
    """RELEX settings for ``HfArgumentParser`` / ``TrlParser``: every :class:`~relex_callback.RelexCallback` argument,
    prefixed ``relex_`` so it sits beside ``GRPOConfig`` in one YAML or command line. Turn into a callback with
    ``RelexCallback.from_config(cfg)``; validated there, by the same :meth:`RelexSettings.validate`."""

    relex_tcut: Optional[int] = field(default=None, metadata=_help("Optimizer steps to observe before extrapolating (the paper: 75-100)."))
    relex_horizons: Optional[list[str]] = field(default=None, metadata=_help(
        "Steps to write extrapolated checkpoints for: 500 1000, or 500,1000 (a YAML list or string works too).", nargs="+"))
    relex_stride: int = field(default=1, metadata=_help("Record every stride-th optimizer step."))
    relex_fit_start: Optional[int] = field(default=None, metadata=_help("First step used in the linear fit (default: all recorded steps)."))
    relex_rank: int = field(default=1, metadata=_help("SVD rank: directions per tensor (the paper's default and best: 1)."))
    relex_storage: str = field(default="auto", metadata=_help("Trajectory buffer tier: auto, device, host or disk."))
    relex_dtype: str = field(default="bfloat16", metadata=_help("Buffer dtype: bfloat16, float16 or float32."))
    relex_max_buffer_bytes: Optional[str] = field(default=None, metadata=_help(
        "Upper bound on the buffer's bytes per rank (a number or a size like 8GB); a larger window folds."))
    relex_stop_training: bool = field(default=True, metadata=_help("Stop training at tcut (False: keep training and validate at the horizons)."))
    relex_output_dir: Optional[str] = field(default=None, metadata=_help("Where to write (default <output_dir>/relex)."))
    relex_include: Optional[list[str]] = field(default=None, metadata=_help("Regexes over parameter names to track (default: all trainable).", nargs="+"))
    relex_exclude: Optional[list[str]] = field(default=None, metadata=_help("Regexes over parameter names to leave untracked.", nargs="+"))
    relex_solver: str = field(default="auto", metadata=_help("auto, gram or power (see docs/math.md; figures in docs/architecture.md)."))
    relex_overwrite: bool = field(default=False, metadata=_help("Replace existing step-H/ and state files instead of refusing before training starts."))
    relex_max_shard_size: str = field(default="50GB", metadata=_help("Shard size of the written safetensors, as in save_pretrained."))
    relex_fold_rank: Optional[int] = field(default=None, metadata=_help(f"Rank of the running factorisation a too-small buffer folds into (default {DEFAULT_FOLD_RANK})."))
    relex_buffer_slots: Optional[int] = field(default=None, metadata=_help("Ring slots; below tcut/stride the ring folds (default: from max_buffer_bytes, else the whole window)."))
    relex_on_nonfinite: str = field(default="error", metadata=_help("NaN/Inf in a delta: error (stop) or skip (drop the step)."))
    relex_merge_lora: bool = field(default=False, metadata=_help("PEFT models: also write each horizon merged into a full model (step-H-merged)."))
    relex_fit: str = field(default="linear", metadata=_help("Curve fitted to each direction's coefficient: linear (the paper), power, log, polynomial, or auto (chosen by the in-window backtest)."))
    relex_fit_window: Optional[int] = field(default=None, metadata=_help("Fit only the last N recorded steps (default: all from fit_start)."))
    relex_degree: int = field(default=2, metadata=_help("Degree of the polynomial fit."))
    relex_on_flat_reward: str = field(default="warn", metadata=_help("Reward not rising over the window: warn, error (state file but no horizon) or ignore."))
    relex_reward_metric: Optional[str] = field(default=None, metadata=_help("Logged metric whose trend is checked (default: reward, else the first *reward* metric)."))
    relex_evaluate_horizons: bool = field(default=False, metadata=_help("At tcut, score the tcut model and every horizon with the trainer's own evaluation (needs an eval_dataset)."))
    relex_keep_best: Optional[int] = field(default=None, metadata=_help("With scored horizons: keep only the best N step-H/ on disk (the state file keeps every horizon)."))
    relex_fit_clock: str = field(default="lr", metadata=_help("Axis of the fit: lr (cumulative learning rate of the trainer's schedule) or steps (the paper's)."))

    def to_kwargs(self) -> dict:
        """The ``RelexCallback`` keyword arguments (prefix dropped)."""
        return {f.name[len("relex_"):]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_settings(self, **overrides) -> RelexSettings:
        kw = self.to_kwargs()
        kw.update(overrides)
        return RelexSettings.validate(**kw)


# The arguments of RelexCallback, documented once beside the settings they become (RelexSettings.validate checks
# them); the callback's docstring includes this text, so ``help(RelexCallback)`` shows every argument.
SETTINGS_DOC = """
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
        Regexes over parameter names not to track (written with their values at ``tcut``, kept in the state file).
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
    fit_clock (`str`, *optional*, defaults to `"lr"`):
        The axis the coefficients are fitted on and the horizons placed on. ``"lr"``: the cumulative learning rate
        ``tau(t) = sum_{s<=t} lr_s`` of the trainer's scheduler (read ahead at ``on_train_begin``, never stepped), so
        warmup, linear decay or cosine are followed; with a constant learning rate it is the step, bit for bit. A
        scheduler that cannot be read ahead (``ReduceLROnPlateau``, a custom class) falls back to the step with one
        warning. ``"steps"``: the step number (the paper's axis). See docs/schedule.md.

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
"""
