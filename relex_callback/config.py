"""Every RELEX setting, declared once and validated once, without torch.

:data:`SETTINGS` declares each setting once (name, default, types, bounds, choices, help, documentation);
:class:`RelexSettings`, the defaults of :meth:`RelexSettings.validate`, :class:`RelexConfig`, :data:`SETTINGS_DOC`
(the callback's argument documentation) and the ``relex`` flags that take a setting (:func:`cli_argument`) are
generated from it. :meth:`RelexSettings.validate` is the single source of truth for what a valid value is. The callback
(``RelexCallback(**kw)`` builds one), :class:`RelexConfig` (the ``HfArgumentParser`` / ``TrlParser`` form, every
callback argument prefixed ``relex_``) and the CLI all go through :meth:`RelexSettings.validate`, so a bad value
gives the same message everywhere, before any work is done. This module imports no torch: ``relex --help`` and
argument mistakes answer at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import textwrap
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional, Sequence

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


# ---------------------------------------------------------------------------------------------- the declaration
REQUIRED = dataclasses.MISSING  # a setting without a default (tcut, horizons)
_SAME = object()  # Setting.stored: the validated default is the argument's default


@dataclass(frozen=True)
class Setting:
    """One RELEX setting, declared once. Everything that lists the settings is generated from :data:`SETTINGS`:
    :class:`RelexSettings` (``stored_type``, the validated ``stored`` default) and the defaults of
    :meth:`RelexSettings.validate`, :class:`RelexConfig` (``config_type``, ``help``, ``nargs``), :data:`SETTINGS_DOC`
    (``doc_type``, ``doc``: the callback's documentation) and the ``relex`` flags that take the setting
    (:func:`cli_argument`: ``cli``). ``RelexCallback.__init__`` spells the names and defaults out for editors;
    tests/test_settings.py holds it to this table."""

    name: str
    default: Any  # the argument's default (REQUIRED: none)
    config_type: Any  # RelexConfig's field type (HfArgumentParser / TrlParser read it)
    stored_type: str  # RelexSettings' annotation: the validated value
    doc_type: str  # the type as SETTINGS_DOC shows it
    help: str  # one line: RelexConfig's --relex_<name> help
    doc: str  # the callback's documentation of the argument
    stored: Any = _SAME  # RelexSettings' default when it differs from ``default`` (a parsed size, a resolved None)
    choices: tuple = ()  # the values a choice takes
    bounds: Optional[tuple[int, int]] = None  # (minimum, maximum) of a count, see BOUNDS
    nargs: Optional[str] = None  # RelexConfig: "+" for a list on the command line
    cli: Optional[str] = None  # the relex flags' help, without the default (which cli_argument adds)

    @property
    def stored_default(self):
        return self.default if self.stored is _SAME else self.stored

    @property
    def shown_default(self):
        """The default as the documentation states it: the argument's, else the value None resolves to."""
        return self.stored_default if self.default is None else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "tcut", REQUIRED, Optional[int], "int", "`int`", bounds=(2, MAX_STEP),
        help="Optimizer steps to observe before extrapolating (the paper: 75-100).",
        cli="optimizer steps observed (the window is tcut/stride rows)",
        doc="""
        Number of optimizer steps to observe (``state.global_step``; gradient accumulation does not change it).
        The paper uses 75 (1.5B-4B models) and 100 (8B)."""),
    Setting(
        "horizons", REQUIRED, Optional[list[str]], "tuple[int, ...]", "`list[int]` or `str`", bounds=(1, MAX_STEP),
        nargs="+",
        help="Steps to write extrapolated checkpoints for: 500 1000, or 500,1000 (a YAML list or string works too).",
        doc="""
        Steps to extrapolate to, each greater than ``tcut`` (e.g. ``[500, 1000]`` or ``"500,1000"``), or
        ``"auto"``: the ladder 2x, 4x, 8x and 16x ``tcut``, scored (``evaluate_horizons``) when the trainer has an
        ``eval_dataset``."""),
    Setting(
        "stride", 1, int, "int", "`int`", bounds=(1, MAX_STEP),
        help="Record every stride-th optimizer step.",
        cli="record every k-th step",
        doc="""
        Record every ``stride``-th step; must divide ``tcut``. Memory is ``tcut/stride`` rows."""),
    Setting(
        "fit_start", None, Optional[int], "Optional[int]", "`int`", bounds=(0, MAX_STEP),
        help="First step used in the linear fit (default: all recorded steps).",
        cli="first step used in the line fit (default: all)",
        doc="""
        First step used in the linear fit (earlier steps still define the direction). Default: all steps."""),
    Setting(
        "rank", 1, int, "int", "`int`", bounds=(1, MAX_STEP),  # SVD rank: directions per tensor (never a process rank)
        help="SVD rank: directions per tensor (the paper's default and best: 1).",
        cli="directions per tensor",
        doc="""
        SVD rank: directions per tensor, each extrapolated linearly (the paper's ablation found 1 best)."""),
    Setting(
        "storage", "auto", str, "str", "`str`", choices=STORAGES,
        help="Trajectory buffer tier: auto, device, host or disk.",
        cli="buffer tier",
        doc="""
        Where the buffer lives: ``"device"`` (accelerator memory), ``"host"`` (pinned CPU memory),
        ``"disk"`` (memory-mapped file under ``output_dir``; survives a crash) or ``"auto"``: the memory plan
        logged at ``on_train_begin`` (``relex plan`` prints the same) puts the exact window on the fastest tier
        that holds it, counting every process of the node and a colocated vLLM engine's share of the GPU; when
        none does, it folds (see ``fold_rank``) and says so."""),
    Setting(
        "dtype", "bfloat16", str, "str", "`str`", choices=DTYPES,
        help="Buffer dtype: bfloat16, float16 or float32.",
        cli="trajectory buffer dtype",
        doc="""
        Buffer dtype: ``"bfloat16"``, ``"float16"`` (underflows for lr ~1e-6 runs) or ``"float32"``."""),
    Setting(
        "max_buffer_bytes", None, Optional[str], "Optional[int]", "`int` or `str`", bounds=(1, MAX_BYTES),
        help="Upper bound on the buffer's bytes per rank (a number or a size like 8GB); a larger window folds.",
        cli="the callback's max_buffer_bytes, a cap on every tier",
        doc="""
        Upper bound on the buffer's bytes per process (a number or a size like ``"8GB"``); a window that does not
        fit folds (see ``fold_rank``)."""),
    Setting(
        "stop_training", True, bool, "bool", "`bool`",
        help="Stop training at tcut (False: keep training and validate at the horizons).",
        doc="""
        Stop training at ``tcut``. With ``False`` training continues, and the extrapolated weights are
        compared with the real ones when the run reaches each horizon (validation mode)."""),
    Setting(
        "output_dir", None, Optional[str], "Optional[str]", "`str`",
        help="Where to write (default <output_dir>/relex).",
        doc="""
        Where to write. Defaults to ``<args.output_dir>/relex``."""),
    Setting(
        "include", None, Optional[list[str]], "Optional[tuple[str, ...]]", "`list[str]`", nargs="+",
        help="Regexes over parameter names to track (default: all trainable).",
        doc="""
        Regexes (``re.search``) over parameter names to track. Default: every trainable parameter."""),
    Setting(
        "exclude", None, Optional[list[str]], "Optional[tuple[str, ...]]", "`list[str]`", nargs="+",
        help="Regexes over parameter names to leave untracked.",
        doc="""
        Regexes over parameter names not to track (written with their values at ``tcut``, kept in the state file)."""),
    Setting(
        "solver", "auto", str, "str", "`str`", choices=SOLVERS,
        help="auto, gram or power (see docs/math.md; figures in docs/architecture.md).",
        cli="solver",
        doc="""
        ``"gram"``, ``"power"`` or ``"auto"`` (per-device choice measured in ``bench/solver.py``)."""),
    Setting(
        "overwrite", False, bool, "bool", "`bool`",
        help="Replace existing step-H/ and state files instead of refusing before training starts.",
        cli="replace existing outputs in --out",
        doc="""
        Replace existing ``step-H`` directories in ``output_dir`` instead of refusing to start."""),
    Setting(
        "max_shard_size", "50GB", str, "int", "`str`", stored=50 * 10**9, bounds=(1, MAX_BYTES),
        help="Shard size of the written safetensors, as in save_pretrained.",
        cli="shard the written checkpoints above this size, as save_pretrained does",
        doc="""
        Shard size of the written safetensors, as in ``save_pretrained``."""),
    Setting(
        "fold_rank", None, Optional[int], "int", "`int`", stored=DEFAULT_FOLD_RANK, bounds=(1, MAX_STEP),
        help=f"Rank of the running factorisation a too-small buffer folds into (default {DEFAULT_FOLD_RANK}).",
        cli="basis rows of a folded buffer",
        doc="""
        When the window does not fit ``max_buffer_bytes`` (or ``buffer_slots``), the full ring of deltas is
        folded into a rank-``fold_rank`` factorisation per tensor (incremental SVD) and the slots reused:
        memory is ``fold_rank + slots`` rows whatever ``tcut`` is. Must be >= ``rank``."""),
    Setting(
        "buffer_slots", None, Optional[int], "Optional[int]", "`int`", bounds=(1, MAX_STEP),
        help="Ring slots; below tcut/stride the ring folds (default: from max_buffer_bytes, else the whole window).",
        doc="""
        Ring slots K; below ``tcut/stride`` the ring folds (see ``fold_rank``). Default: with
        ``storage="auto"`` the memory plan's (the whole window when it fits a tier, within ``max_buffer_bytes``);
        with an explicit tier, from ``max_buffer_bytes``, else the whole window (exact, no fold)."""),
    Setting(
        "on_nonfinite", "error", str, "str", "`str`", choices=ON_NONFINITE,
        help="NaN/Inf in a delta: error (stop) or skip (drop the step).",
        doc="""
        A NaN/Inf in a weight delta at a snapshot: ``"error"`` stops training with an error naming the tensors
        and the step (nothing is written from it); ``"skip"`` drops that step with a warning (counted in
        ``report.json`` as ``skipped_nonfinite_steps``)."""),
    Setting(
        "merge_lora", False, bool, "bool", "`bool`",
        help="PEFT models: also write each horizon merged into a full model (step-H-merged).",
        doc="""
        PEFT models only. Each horizon is always written as an adapter directory ``step-H/`` (loaded with
        ``PeftModel.from_pretrained(base, "step-H")``); with ``True`` also as a full model ``step-H-merged/``
        (``merge_and_unload`` on a copy of the model: needs memory for a second copy of the base weights)."""),
    Setting(
        "fit", "linear", str, "str", "`str`", choices=FITS,
        help="Curve fitted to each direction's coefficient: linear (the paper), power, log, polynomial, or auto "
             "(chosen by the in-window backtest).",
        cli="coefficient curve (linear is the paper's; auto is chosen by the in-window backtest)",
        doc="""
        Curve fitted to each direction's coefficient ``c_t``: ``"linear"`` (the paper), ``"power"``
        (``a t^p + b``), ``"log"``, ``"polynomial"`` (``degree``), or ``"auto"`` (each family fitted on the first
        part of the window and scored by how well it predicts the rest; the winner is refitted on the whole window).
        """),
    Setting(
        "fit_window", None, Optional[int], "Optional[int]", "`int`", bounds=(1, MAX_STEP),
        help="Fit only the last N recorded steps (default: all from fit_start).",
        cli="fit only the last N checkpoints' steps",
        doc="""
        Fit only the last ``fit_window`` recorded steps (the published scripts' sliding window)."""),
    Setting(
        "degree", 2, int, "int", "`int`", bounds=(1, MAX_STEP),
        help="Degree of the polynomial fit.",
        cli="degree of --fit polynomial",
        doc="""
        Degree of the ``"polynomial"`` fit."""),
    Setting(
        "on_flat_reward", "warn", str, "str", "`str`", choices=ON_FLAT_REWARD,
        help="Reward not rising over the window: warn, error (state file but no horizon) or ignore.",
        doc="""
        When the reward (``reward_metric``) did not rise over the window (least-squares slope <= 2 standard errors):
        ``"warn"``, ``"error"`` (the state file is written, no horizon) or ``"ignore"``."""),
    Setting(
        "reward_metric", None, Optional[str], "Optional[str]", "`str`",
        help="Logged metric whose trend is checked (default: reward, else the first *reward* metric).",
        doc="""
        The logged metric whose trend is checked (default: ``reward``, else the first metric named like a reward)."""),
    Setting(
        "evaluate_horizons", False, bool, "bool", "`bool`",
        help="At tcut, score the tcut model and every horizon with the trainer's own evaluation (needs an "
             "eval_dataset).",
        doc="""
        At ``tcut``, score the ``tcut`` model and every horizon with the trainer's own evaluation (GRPO: its
        reward functions on the ``eval_dataset`` prompts; other trainers: ``eval_loss``), the live weights restored
        bit for bit afterwards; results in ``report.json["horizon_eval"]`` and ``horizons.png``."""),
    Setting(
        "keep_best", None, Optional[int], "Optional[int]", "`int`", bounds=(1, MAX_STEP),
        help="With scored horizons: keep only the best N step-H/ on disk (the state file keeps every horizon).",
        doc="""
        With scored horizons, keep only the best ``keep_best`` checkpoints on disk (the state file keeps every
        horizon reachable through ``relex materialize``)."""),
    Setting(
        "fit_clock", "lr", str, "str", "`str`", choices=FIT_CLOCKS,
        help="Axis of the fit: lr (cumulative learning rate of the trainer's schedule) or steps (the paper's).",
        cli="axis of the fit (lr: the cumulative learning rate, from --schedule or the learning_rate log of the run's "
            "trainer_state.json, the step when neither reaches the last horizon, with a warning; steps: the paper's)",
        doc="""
        The axis the coefficients are fitted on and the horizons placed on. ``"lr"``: the cumulative learning rate
        ``tau(t) = sum_{s<=t} lr_s`` of the trainer's scheduler (read ahead at ``on_train_begin``, never stepped), so
        warmup, linear decay or cosine are followed; with a constant learning rate it is the step, bit for bit. A
        scheduler that cannot be read ahead (``ReduceLROnPlateau``, a custom class) falls back to the step with one
        warning. ``"steps"``: the step number (the paper's axis). See docs/schedule.md."""),
)
SETTING = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS if s.default is not REQUIRED}  # the arguments' defaults

# The one table of whole-number bounds: (minimum, maximum) of every count the callback, RelexSettings and the CLI
# take, so `--tcut 10**30` and `tcut=10**30` are refused alike (tests/test_ownership.py enumerates it): the settings'
# own, and the counts only the CLI takes.
BOUNDS = {
    **{s.name: s.bounds for s in SETTINGS if s.bounds is not None},
    "steps": (0, MAX_STEP), "worst": (0, MAX_STEP), "world_size": (1, MAX_PROCESSES),
    "local_world_size": (1, MAX_PROCESSES),
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


def _from_settings(cls):
    """``cls`` as a frozen dataclass with one field per setting (its validated type and default), in the declared
    order, then the fields the class body declares (values derived by validate)."""
    derived = dict(cls.__dict__.get("__annotations__", {}))
    cls.__annotations__ = {**{s.name: s.stored_type for s in SETTINGS}, **derived}
    for s in SETTINGS:
        if s.default is not REQUIRED:
            setattr(cls, s.name, s.stored_default)
    return dataclass(frozen=True)(cls)


def _given(given: dict) -> SimpleNamespace:
    """``RelexSettings.validate``'s keyword arguments with the declared defaults filled in."""
    unknown = [k for k in given if k not in SETTING]
    if unknown:
        raise TypeError(f"RelexSettings.validate() got an unexpected keyword argument {unknown[0]!r}")
    missing = [s.name for s in SETTINGS if s.default is REQUIRED and s.name not in given]
    if missing:
        raise TypeError(f"RelexSettings.validate() missing required keyword-only argument {missing[0]!r}")
    return SimpleNamespace(**{**DEFAULTS, **given})


@_from_settings
class RelexSettings:
    """Every setting of a RELEX window, after validation: one field per entry of :data:`SETTINGS` (validated types
    and defaults) plus ``auto_horizons``. Build with :meth:`validate` (the arguments of
    :class:`~relex_callback.RelexCallback`)."""

    auto_horizons: bool = False  # horizons="auto": the ladder LADDER x tcut, scored (evaluate_horizons) when possible

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
    def validate(cls, *, allow_partial_stride: bool = False, **given) -> "RelexSettings":
        """Check every setting (the keyword arguments of :class:`~relex_callback.RelexCallback`, declared in
        :data:`SETTINGS`; omitted ones take their default) and return them validated; a bad value raises
        :class:`~relex_callback.errors.RelexInputError` saying what to change."""
        v = _given(given)
        tcut, stride, steps = _check_window(v.tcut, v.stride, allow_partial_stride)
        hs, auto_horizons = _check_horizons(v.horizons, tcut)
        fit_start, rank = _check_fit_start_and_rank(v.fit_start, v.rank, steps, tcut, stride)
        _choice("storage", v.storage, STORAGES)
        _choice("solver", v.solver, SOLVERS)
        if v.solver == "power" and rank > 1:
            raise RelexInputError(f"solver='power' computes rank 1 only; use solver='gram' or 'auto' for rank={rank}")
        dt = parse_dtype(v.dtype)
        max_buffer_bytes = v.max_buffer_bytes
        if max_buffer_bytes is not None:
            if isinstance(max_buffer_bytes, str):
                max_buffer_bytes = parse_size(max_buffer_bytes, "max_buffer_bytes")
            max_buffer_bytes = bounded("max_buffer_bytes", max_buffer_bytes)
        _flag("stop_training", v.stop_training)
        _flag("overwrite", v.overwrite)
        _flag("merge_lora", v.merge_lora)
        output_dir = v.output_dir
        if (output_dir is not None and not isinstance(output_dir, (str, bytes))
                and not hasattr(output_dir, "__fspath__")):
            raise RelexInputError(f"output_dir must be a path (str), got {type(output_dir).__name__}")
        include = tuple(p.pattern for p in compile_patterns(v.include, "include")) if v.include is not None else None
        exclude = tuple(p.pattern for p in compile_patterns(v.exclude, "exclude")) if v.exclude is not None else None
        shard = parse_size(v.max_shard_size)
        fold_rank, buffer_slots = _check_fold(v.fold_rank, v.buffer_slots, rank)
        _choice("on_nonfinite", v.on_nonfinite, ON_NONFINITE)
        _choice("fit_clock", v.fit_clock, FIT_CLOCKS)
        fit_window, degree = _check_fit_family(v.fit, v.fit_window, v.degree, steps, fit_start)
        keep_best = _check_reward_options(v.on_flat_reward, v.reward_metric, v.evaluate_horizons, v.keep_best,
                                          auto_horizons)
        return cls(
            tcut=tcut, horizons=tuple(hs), stride=stride, fit_start=fit_start, rank=rank, storage=v.storage, dtype=dt,
            max_buffer_bytes=max_buffer_bytes, solver=v.solver, stop_training=v.stop_training,
            output_dir=None if output_dir is None else str(output_dir if not isinstance(output_dir, bytes)
                                                           else output_dir.decode()),
            include=include, exclude=exclude, overwrite=v.overwrite, max_shard_size=shard, fold_rank=fold_rank,
            buffer_slots=buffer_slots, on_nonfinite=v.on_nonfinite, merge_lora=v.merge_lora, fit=v.fit,
            fit_window=fit_window, degree=degree, on_flat_reward=v.on_flat_reward, reward_metric=v.reward_metric,
            evaluate_horizons=v.evaluate_horizons or auto_horizons, keep_best=keep_best, auto_horizons=auto_horizons,
            fit_clock=v.fit_clock,
        )


# what editors and help() show for validate: every setting with its default
RelexSettings.validate.__func__.__signature__ = inspect.Signature(
    [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY,
                         default=inspect.Parameter.empty if s.default is REQUIRED else s.default) for s in SETTINGS]
    + [inspect.Parameter("allow_partial_stride", inspect.Parameter.KEYWORD_ONLY, default=False)],
    return_annotation="RelexSettings")


def _check_window(tcut, stride, allow_partial_stride):
    """tcut and stride, and the snapshot steps they record (at least 2); return (tcut, stride, steps)."""
    if tcut is None:
        raise RelexInputError("tcut is required: the number of optimizer steps to observe, e.g. tcut=75")
    tcut = bounded("tcut", tcut)
    stride = bounded("stride", stride)
    if stride > tcut:
        raise RelexInputError(f"stride={stride} is larger than tcut={tcut}: no step would be recorded; use a stride "
                              "<= tcut/2")
    if tcut % stride and not allow_partial_stride:
        lo, hi = tcut - tcut % stride, tcut - tcut % stride + stride
        raise RelexInputError(
            f"tcut={tcut} is not a multiple of stride={stride}: the last {tcut % stride} steps before tcut would be "
            f"trained but never recorded; use tcut={lo} or tcut={hi}, or a stride that divides {tcut}"
        )
    steps = snapshot_steps(tcut, stride)
    if len(steps) < 2:
        raise RelexInputError(
            f"tcut={tcut} with stride={stride} records {len(steps)} snapshot; a line needs at least 2: lower stride or "
            "raise tcut"
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
                f"fit_start={fit_start} leaves {n_fit} snapshot step(s) in [fit_start, tcut={tcut}] with "
                f"stride={stride}; "
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
        raise RelexInputError(f"reward_metric must be the name of a logged metric (e.g. 'reward'), got "
                              f"{reward_metric!r}")
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


def _config_fields(cls):
    """``cls`` as a dataclass with a field ``relex_<name>`` per setting (``HfArgumentParser`` reads type, default,
    help and nargs); a required setting defaults to None there and is checked by validate."""
    cls.__annotations__ = {f"relex_{s.name}": s.config_type for s in SETTINGS}
    for s in SETTINGS:
        metadata = {"help": s.help, **({"nargs": s.nargs} if s.nargs else {})}
        setattr(cls, f"relex_{s.name}", field(default=None if s.default is REQUIRED else s.default, metadata=metadata))
    return dataclass(cls)


@_config_fields
class RelexConfig:
    """RELEX settings for ``HfArgumentParser`` / ``TrlParser``: every :class:`~relex_callback.RelexCallback` argument,
    prefixed ``relex_`` so it sits beside ``GRPOConfig`` in one YAML or command line. Turn into a callback with
    ``RelexCallback.from_config(cfg)``; validated there, by the same :meth:`RelexSettings.validate`."""

    def to_kwargs(self) -> dict:
        """The ``RelexCallback`` keyword arguments (prefix dropped)."""
        return {f.name[len("relex_"):]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_settings(self, **overrides) -> RelexSettings:
        kw = self.to_kwargs()
        kw.update(overrides)
        return RelexSettings.validate(**kw)


def _shown(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _doc_entry(s: Setting) -> str:
    if s.default is REQUIRED:
        kind = ""
    else:
        kind = ", *optional*" + ("" if s.shown_default is None else f", defaults to `{_shown(s.shown_default)}`")
    return f"    {s.name} ({s.doc_type}{kind}):\n" + textwrap.indent(textwrap.dedent(s.doc).strip("\n"), " " * 8)


# The arguments of RelexCallback, generated from SETTINGS; the callback's docstring includes this text, so
# ``help(RelexCallback)`` shows every argument.
SETTINGS_DOC = "\nArgs:\n" + "\n".join(_doc_entry(s) for s in SETTINGS) + """

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


def _alternatives(values) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def cli_argument(name: str, help: Optional[str] = None, **extra) -> tuple[str, dict]:
    """The ``relex`` flag of a setting, as ``(flag, add_argument keywords)``: ``--name-with-dashes``; a flag for a
    True/False setting; else its default as text (the command parses it like a value given); ``help`` (default: the
    setting's ``cli`` text) with the choices and the default appended. ``extra`` goes to ``add_argument`` as is."""
    s = SETTING[name]
    flag = "--" + name.replace("_", "-")
    text = help or s.cli or s.help
    if isinstance(s.default, bool):
        return flag, {"action": "store_true", "help": text, **extra}
    if s.choices:
        text += ": " + _alternatives(s.choices)
    if s.default is REQUIRED:
        return flag, {"required": True, "help": text, **extra}
    if s.shown_default is not None:
        text += f" (default {s.shown_default})"
    return flag, {"default": None if s.default is None else str(s.default), "help": text, **extra}
