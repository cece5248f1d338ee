"""Field-by-field checks of the files relex reads back (``relex_state*``, ``report.json``): an edited or damaged
file is one :class:`~relex_callback.errors.RelexInputError` naming the file, the field and what it holds, never a
traceback from deep inside. No torch."""

from __future__ import annotations

import math
from typing import Any

from ..errors import RelexInputError

INT, NUM, STR, LIST, DICT, BOOL = "a whole number", "a finite number", "a string", "a list", "an object", "true/false"


def _is(value: Any, kind: str) -> bool:
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == STR:
        return isinstance(value, str)
    if kind == LIST:
        return isinstance(value, list)
    if kind == DICT:
        return isinstance(value, dict)
    if kind == BOOL:
        return isinstance(value, bool)
    raise ValueError(kind)


class Checker:
    """``Checker(path, hint)``: ``field(obj, key, kind)`` returns ``obj[key]`` when it is of ``kind`` (``optional``:
    ``None`` allowed), else raises :class:`RelexInputError` naming ``path``, the field and ``hint``."""

    def __init__(self, path: str, hint: str):
        self.path, self.hint = path, hint

    def fail(self, where: str, what: str):
        raise RelexInputError(f"{self.path}: {where} {what}; the file was edited or is damaged: {self.hint}")

    def field(self, obj, key, kind: str, where: str = "", optional: bool = False, minimum=None):
        name = f"{where}{key}" if where else str(key)
        if not isinstance(obj, dict):
            self.fail(where or "the file", f"is {type(obj).__name__}, expected {DICT}")
        if key not in obj:
            if optional:
                return None
            self.fail(name, "is missing")
        value = obj[key]
        if value is None and optional:
            return None
        if not _is(value, kind):
            self.fail(name, f"is {value!r:.60}, expected {kind}")
        if minimum is not None and value < minimum:
            self.fail(name, f"is {value}, expected >= {minimum}")
        return value

    def items(self, obj, key, kind: str, where: str = "", length=None, optional_items: bool = False):
        """``obj[key]``: a list whose every item is of ``kind`` (``None`` items allowed with ``optional_items``)."""
        xs = self.field(obj, key, LIST, where)
        name = f"{where}{key}"
        if length is not None and len(xs) != length:
            self.fail(name, f"has {len(xs)} entries, expected {length}")
        for i, x in enumerate(xs):
            if not (x is None and optional_items) and not _is(x, kind):
                self.fail(f"{name}[{i}]", f"is {x!r:.60}, expected {kind}")
        return xs


def check_report(rep, path: str) -> dict:
    """The fields ``relex report`` and its plot read, with their types."""
    c = Checker(path, "rerun `relex extrapolate` (or the training run) to write it again")
    c.field(rep, "tcut", INT)
    c.items(rep, "steps", INT)
    c.field(rep, "rank", INT, optional=True)
    c.field(rep, "fit_start", INT, optional=True)
    tensors = c.field(rep, "tensors", LIST)
    for i, t in enumerate(tensors):
        w = f"tensors[{i}]."
        c.field(t, "name", STR, w)
        c.field(t, "numel", INT, w, minimum=0)
        c.field(t, "explained_variance", NUM, w)
        c.field(t, "delta_norm", NUM, w, minimum=0)
        c.items(t, "r2", NUM, w, optional_items=True)
        if not t["r2"]:
            c.fail(f"{w}r2", "is empty")
        if "coeffs" in t:
            for j, row in enumerate(c.field(t, "coeffs", LIST, w)):
                c.items({"row": row}, "row", NUM, f"{w}coeffs[{j}].")
    return rep


def check_state_meta(meta, path: str, dtypes) -> dict:
    """The ``relex`` metadata of a state file: settings, steps and every tensor's entry."""
    c = Checker(path, "use the relex_state.safetensors the run wrote, or rerun `relex extrapolate`")
    c.field(meta, "tcut", INT, minimum=1)
    steps = c.items(meta, "steps", INT)
    if len(steps) < 2 or sorted(set(steps)) != steps:
        c.fail("steps", f"are {steps}, expected at least 2 increasing step numbers")
    rank = c.field(meta, "rank", INT, minimum=1)
    c.field(meta, "fit_start", INT, optional=True)
    dtype = c.field(meta, "dtype", STR)
    if dtype not in dtypes:
        c.fail("dtype", f"is {dtype!r}, expected one of {sorted(dtypes)}")
    order = c.items(meta, "order", STR)
    tensors = c.field(meta, "tensors", DICT)
    for name in order:
        w = f"tensors[{name!r}]."
        if name not in tensors:
            c.fail(f"tensors[{name!r}]", "is missing (listed in 'order')")
        info = tensors[name]
        spec = c.field(info, "spec", DICT, w)
        c.field(spec, "name", STR, w + "spec.")
        shape = c.items(spec, "shape", INT, w + "spec.")
        if any(s < 0 for s in shape):
            c.fail(w + "spec.shape", f"is {shape}, expected sizes >= 0")
        sdt = c.field(spec, "dtype", STR, w + "spec.")
        if sdt not in ("float32", "float16", "bfloat16", "float64"):
            c.fail(w + "spec.dtype", f"is {sdt!r}, expected a floating-point dtype")
        n = c.field(spec, "local_numel", INT, w + "spec.", minimum=0)
        start = c.field(spec, "flat_start", INT, w + "spec.", optional=True, minimum=0) or 0
        if start + n > math.prod(shape):
            c.fail(w + "spec", f"covers elements [{start}, {start + n}) of a tensor of {math.prod(shape)}")
        for key in ("slope", "intercept", "sigma", "r2"):
            c.items(info, key, NUM, w, length=rank)
        fp = c.field(info, "theta0", DICT, w)
        c.field(fp, "n", INT, w + "theta0.", minimum=0)
        c.field(fp, "sum", NUM, w + "theta0.")
        c.field(fp, "sumsq", NUM, w + "theta0.", minimum=0)
        c.items(fp, "samples", NUM, w + "theta0.")
    return meta
