"""Which tensors are tracked, and how this rank reads its piece of each.

A :class:`TensorSpec` describes one tracked tensor: its checkpoint name, full shape and dtype, and the piece this
rank keeps (``local_numel`` elements starting at ``flat_start`` of the flattened full tensor). A
:class:`TrackedTensor` pairs a spec with a function returning the current local values as a flat tensor (a view
where possible, never a gather of the full tensor). Under DeepSpeed mixed precision the values recorded are the
optimizer's fp32 master weights of a 16-bit parameter: ``TensorSpec.recorded_dtype`` is then float32 while
``dtype`` stays the parameter's (the dtype the checkpoints are written in), and ``TrackedTensor.live`` reads the
parameter itself (what a forward pass uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .config import compile_patterns
from .errors import RelexInputError


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    local_numel: int
    flat_start: int = 0
    offset: int = 0  # column offset of this tensor's segment in the arena (filled by the store)
    # the dtype of the values recorded (theta_0's) when it is not ``dtype``: float32 for the fp32 master weights of a
    # 16-bit parameter (DeepSpeed mixed precision)
    recorded_dtype: Optional[torch.dtype] = None

    @property
    def record_dtype(self) -> torch.dtype:
        """The dtype of the recorded values (theta_0's): ``recorded_dtype`` where set, else ``dtype``."""
        return self.recorded_dtype or self.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_whole(self) -> bool:
        return self.flat_start == 0 and self.local_numel == self.numel

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "local_numel": self.local_numel,
            "flat_start": self.flat_start,
            "offset": self.offset,
        }
        if self.recorded_dtype is not None and self.recorded_dtype != self.dtype:
            out["recorded_dtype"] = str(self.recorded_dtype).replace("torch.", "")
        return out

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            dtype=getattr(torch, d["dtype"]),
            local_numel=d["local_numel"],
            flat_start=d.get("flat_start", 0),
            offset=d.get("offset", 0),
            recorded_dtype=getattr(torch, d["recorded_dtype"]) if d.get("recorded_dtype") else None,
        )


def theta0_dtype(specs: Sequence[TensorSpec]) -> torch.dtype:
    """The dtype theta_0 is kept in: the recorded values' (``TensorSpec.record_dtype``: float32 for the fp32 master
    weights of 16-bit parameters), or float32 / float64 when they mix dtypes."""
    dts = {s.record_dtype for s in specs}
    if len(dts) == 1:
        return dts.pop()
    return torch.float64 if torch.float64 in dts else torch.float32


@dataclass
class TrackedTensor:
    spec: TensorSpec
    read: Callable[[], torch.Tensor]  # returns the local piece, flat, in ``spec.record_dtype``
    param: Optional[torch.nn.Parameter] = field(default=None, repr=False)
    # a view of the live parameter's local piece (what a forward pass uses) where ``read`` returns something else
    # (an fp32 master weight): scoring puts the extrapolated weights there. None: ``read`` is that view
    live: Optional[Callable[[], torch.Tensor]] = field(default=None, repr=False)

    def live_view(self) -> torch.Tensor:
        return (self.live or self.read)()


def select_names(names: Sequence[str], include=None, exclude=None) -> list[str]:
    """Filter parameter names with include/exclude regexes (``re.search``). Errors when a pattern matches nothing."""
    inc = compile_patterns(include, "include")
    exc = compile_patterns(exclude, "exclude")
    for p in inc:
        if not any(p.search(n) for n in names):
            raise RelexInputError(
                f"include pattern {p.pattern!r} matches no trainable parameter; names look like {list(names)[:3]}"
            )
    for p in exc:
        if not any(p.search(n) for n in names):
            raise RelexInputError(
                f"exclude pattern {p.pattern!r} matches no trainable parameter; names look like {list(names)[:3]}"
            )
    out = [n for n in names if (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)]
    if not out:
        raise RelexInputError("include/exclude leave no parameter to track; loosen the patterns")
    return out


def _plain_reader(p: torch.Tensor) -> Callable[[], torch.Tensor]:
    def read():
        return p.detach().reshape(-1)

    return read


def plain_tracked(named_params: Sequence[tuple[str, torch.Tensor]]) -> list[TrackedTensor]:
    out = []
    for name, p in named_params:
        spec = TensorSpec(name=name, shape=tuple(p.shape), dtype=p.dtype, local_numel=p.numel())
        out.append(TrackedTensor(spec=spec, read=_plain_reader(p), param=p))
    return out


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` (tied weights once) that require grad and are floating point."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is an optional extra
        return False
    return isinstance(model, PeftModel)
