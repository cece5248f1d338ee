"""Validated RELEX settings.

:class:`RelexSettings` is the single source of truth for what a valid setting is: the callback, the CLI and
:class:`RelexConfig` (the ``HfArgumentParser`` / ``TrlParser`` form, fields prefixed ``relex_``) all go through
:func:`RelexSettings.validate`, so a bad value gives the same message everywhere, before any work is done.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import RelexInputError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORAGES = ("auto", "device", "host", "disk")
SOLVERS = ("auto", "gram", "power")


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise RelexInputError(f"dtype {name} is not supported for the trajectory buffer; use one of {sorted(DTYPES)}")
    key = str(name).replace("torch.", "").lower()
    key = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(key, key)
    if key not in DTYPES:
        raise RelexInputError(f"dtype {name!r} is not supported for the trajectory buffer; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_horizons(value) -> list[int]:
    """Accept ``[500, 1000]``, ``"500,1000"`` or ``500``; return the list as given (validated later)."""
    if value is None:
        raise RelexInputError("horizons is required: the steps to extrapolate to, e.g. horizons=[500, 1000]")
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    else:
        parts = list(value)
    out = []
    for p in parts:
        try:
            if isinstance(p, float) and not p.is_integer():
                raise ValueError
            out.append(int(p))
        except (TypeError, ValueError):
            raise RelexInputError(f"horizons must be whole step numbers, got {p!r} in {value!r}") from None
    if not out:
        raise RelexInputError(f"horizons is empty ({value!r}); give at least one step, e.g. horizons=[500]")
    return out


def snapshot_steps(tcut: int, stride: int) -> list[int]:
    """The snapshot steps S = {t : t % stride == 0, 0 < t <= tcut}."""
    return list(range(stride, tcut + 1, stride))


@dataclass(frozen=True)
class RelexSettings:
    """Settings after validation. Build with :meth:`validate`."""

    tcut: int
    horizons: tuple[int, ...]
    stride: int = 1
    fit_start: Optional[int] = None
    rank: int = 1
    storage: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    max_buffer_bytes: Optional[int] = None
    solver: str = "auto"

    @property
    def steps(self) -> list[int]:
        return snapshot_steps(self.tcut, self.stride)

    @property
    def fit_steps(self) -> list[int]:
        start = self.fit_start if self.fit_start is not None else 0
        return [t for t in self.steps if t >= start]

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
        allow_partial_stride: bool = False,
    ) -> "RelexSettings":
        def whole(name, v, minimum):
            if isinstance(v, bool) or not isinstance(v, int):
                try:
                    if isinstance(v, float) and not v.is_integer():
                        raise ValueError
                    v = int(v)
                except (TypeError, ValueError):
                    raise RelexInputError(f"{name} must be a whole number, got {v!r}") from None
            if v < minimum:
                raise RelexInputError(f"{name} must be >= {minimum}, got {v}")
            return v

        if tcut is None:
            raise RelexInputError("tcut is required: the number of optimizer steps to observe, e.g. tcut=75")
        tcut = whole("tcut", tcut, 2)
        stride = whole("stride", stride, 1)
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
        hs = parse_horizons(horizons)
        if len(set(hs)) != len(hs):
            dup = sorted({h for h in hs if hs.count(h) > 1})
            raise RelexInputError(f"horizons repeat {dup}: give each step once, e.g. horizons={sorted(set(hs))}")
        bad = [h for h in hs if h <= tcut]
        if bad:
            raise RelexInputError(
                f"horizons {bad} are not beyond tcut={tcut}: extrapolation writes steps after the observed window; "
                f"use horizons > {tcut} (the paper uses 5-10x tcut)"
            )
        hs = sorted(hs)
        if fit_start is not None:
            fit_start = whole("fit_start", fit_start, 0)
            n_fit = len([t for t in steps if t >= fit_start])
            if n_fit < 2:
                raise RelexInputError(
                    f"fit_start={fit_start} leaves {n_fit} snapshot step(s) in [fit_start, tcut={tcut}] with stride={stride}; "
                    f"the line needs at least 2: use fit_start <= {steps[-2]}"
                )
        rank = whole("rank", rank, 1)
        if rank > len(steps):
            raise RelexInputError(
                f"rank={rank} exceeds the number of snapshots ({len(steps)} = tcut/stride); use rank <= {len(steps)}"
            )
        if storage not in STORAGES:
            raise RelexInputError(f"storage={storage!r} is not one of {list(STORAGES)}")
        if solver not in SOLVERS:
            raise RelexInputError(f"solver={solver!r} is not one of {list(SOLVERS)}")
        if solver == "power" and rank > 1:
            raise RelexInputError(f"solver='power' computes rank 1 only; use solver='gram' or 'auto' for rank={rank}")
        dt = parse_dtype(dtype)
        if max_buffer_bytes is not None:
            max_buffer_bytes = whole("max_buffer_bytes", max_buffer_bytes, 1)
        return cls(
            tcut=tcut,
            horizons=tuple(hs),
            stride=stride,
            fit_start=fit_start,
            rank=rank,
            storage=storage,
            dtype=dt,
            max_buffer_bytes=max_buffer_bytes,
            solver=solver,
        )


def compile_patterns(patterns: Optional[Sequence[str]], what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise RelexInputError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


@dataclass
class RelexConfig:
    """RELEX settings for ``HfArgumentParser`` / ``TrlParser`` (fields prefixed ``relex_`` so they sit beside
    ``GRPOConfig`` in one YAML). Turn into a callback with ``RelexCallback.from_config(cfg)``."""

    relex_tcut: Optional[int] = field(default=None, metadata={"help": "Optimizer steps to observe before extrapolating (the paper: 75-100)."})
    relex_horizons: Optional[list[int]] = field(default=None, metadata={"help": "Steps to write extrapolated checkpoints for, e.g. 500 1000.", "nargs": "+"})
    relex_stride: int = field(default=1, metadata={"help": "Record every stride-th optimizer step."})
    relex_fit_start: Optional[int] = field(default=None, metadata={"help": "First step used in the linear fit (default: all recorded steps)."})
    relex_rank: int = field(default=1, metadata={"help": "Number of singular directions per tensor (the paper's default and best: 1)."})
    relex_storage: str = field(default="auto", metadata={"help": "Trajectory buffer tier: auto, device, host or disk."})
    relex_dtype: str = field(default="bfloat16", metadata={"help": "Buffer dtype: bfloat16, float16 or float32."})
    relex_max_buffer_bytes: Optional[int] = field(default=None, metadata={"help": "Upper bound on the buffer's bytes per rank."})
    relex_stop_training: bool = field(default=True, metadata={"help": "Stop training at tcut (False: keep training and validate at the horizons)."})
    relex_output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write (default <output_dir>/relex)."})
    relex_include: Optional[list[str]] = field(default=None, metadata={"help": "Regexes over parameter names to track (default: all trainable).", "nargs": "+"})
    relex_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes over parameter names to leave untracked.", "nargs": "+"})
    relex_solver: str = field(default="auto", metadata={"help": "auto, gram or power (see the README's solver section)."})
    relex_merge_lora: bool = field(default=False, metadata={"help": "PEFT models: also write each horizon merged into a full model (step-H-merged)."})

    def to_kwargs(self) -> dict:
        return {f.name[len("relex_"):]: getattr(self, f.name) for f in dataclasses.fields(self)}
