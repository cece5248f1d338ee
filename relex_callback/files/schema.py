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


def LIST_OF(kind, nullable: bool = False):
    """A list whose every item is of ``kind`` (``None`` items allowed with ``nullable``)."""
    return ("list", kind, nullable)


def MAP_OF(kind, nullable: bool = False):
    """An object whose every value is of ``kind`` (``None`` values allowed with ``nullable``)."""
    return ("map", kind, nullable)


def _describe(kind) -> str:
    if isinstance(kind, tuple):
        what = "a list" if kind[0] == "list" else "an object"
        return f"{what} of {_describe(kind[1])}{' or null' if kind[2] else ''}"
    return kind


def _matches(value, kind) -> bool:
    if isinstance(kind, tuple):
        form, item, nullable = kind
        if form == "list":
            return isinstance(value, list) and all((x is None and nullable) or _matches(x, item) for x in value)
        return isinstance(value, dict) and all((x is None and nullable) or _matches(x, item) for x in value.values())
    return _is(value, kind)


# Every field of report.json that a reader reads (`relex report` and its --plot, the trust lines, evaluate_horizons
# merging scores, validation mode adding comparisons): (path, kind, required). "tensors[]." applies to each entry of
# "tensors". One table: check_report checks it, tests/test_ownership.py breaks each field in turn.
REPORT_FIELDS = [
    ("tcut", INT, True), ("steps", LIST_OF(INT), True), ("rank", INT, False), ("fit_start", INT, False),
    ("horizons", LIST_OF(INT), False), ("solver", STR, False), ("horizons_skipped", STR, False),
    ("tensors", LIST, True),
    ("tensors[].name", STR, True), ("tensors[].numel", INT, True), ("tensors[].explained_variance", NUM, True),
    ("tensors[].delta_norm", NUM, True), ("tensors[].r2", LIST_OF(NUM, nullable=True), True),
    ("tensors[].coeffs", LIST_OF(LIST_OF(NUM)), False), ("tensors[].slope", LIST_OF(NUM), False),
    ("tensors[].intercept", LIST_OF(NUM), False),
    ("backtest", DICT, False), ("backtest.reason", STR, False), ("backtest.fit_steps", LIST_OF(INT), False),
    ("backtest.predicted_step", INT, False), ("backtest.cosine_global", NUM, False),
    ("backtest.norm_ratio_global", NUM, False), ("backtest.relative_error_global", NUM, False),
    ("backtest.direction_cosine", NUM, False),
    ("reward_trend", DICT, False), ("reward_trend.slope", NUM, False), ("reward_trend.stderr", NUM, False),
    ("reward_trend.rising", BOOL, False), ("reward_trend.metric", STR, False), ("reward_trend.points", INT, False),
    ("reward_trend.reason", STR, False),
    ("fit", DICT, False), ("fit.family", STR, False), ("fit.selection", DICT, False),
    ("fit.selection.scores", MAP_OF(NUM, nullable=True), False), ("fit.selection.skipped", MAP_OF(STR), False),
    ("fit.selection.reason", STR, False),
    ("horizon_eval", MAP_OF(MAP_OF(NUM, nullable=True)), False), ("validation", DICT, False),
    ("horizon_calls", MAP_OF(DICT), False),
]
_MINIMUM = {"tensors[].numel": 0, "tensors[].delta_norm": 0, "tcut": 1}


def check_report(rep, path: str, plot: bool = False) -> dict:
    """Every field of :data:`REPORT_FIELDS` (and, for ``plot``, what the plot reads of each moving tensor: its
    coefficients over ``steps``, slope and intercept), with its type: one :class:`RelexInputError` naming the file
    and the field otherwise."""
    c = Checker(path, "rerun `relex extrapolate` (or the training run) to write it again")
    if not isinstance(rep, dict):
        c.fail("the file", f"is {type(rep).__name__}, expected {DICT}")

    def check(obj, key, kind, required, where):
        name = f"{where}{key}"
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            if required:
                c.fail(name, "is missing")
            return
        value = obj[key]
        if not _matches(value, kind):
            c.fail(name, f"is {value!r:.60}, expected {_describe(kind)}")
        path_key = name.split("[", 1)[0] + ("[]." + key if "[" in name else "")
        lo = _MINIMUM.get(path_key)
        if lo is not None and value < lo:
            c.fail(name, f"is {value}, expected >= {lo}")

    for field_path, kind, required in REPORT_FIELDS:
        if field_path.startswith("tensors[]."):
            key = field_path[len("tensors[]."):]
            for i, t in enumerate(rep.get("tensors") if isinstance(rep.get("tensors"), list) else []):
                if not isinstance(t, dict):
                    c.fail(f"tensors[{i}]", f"is {type(t).__name__}, expected {DICT}")
                check(t, key, kind, required, f"tensors[{i}].")
            continue
        *parents, key = field_path.split(".")
        obj, where = rep, ""
        for p in parents:
            obj, where = (obj.get(p) if isinstance(obj, dict) else None), f"{where}{p}."
        check(obj, key, kind, required, where)
    steps = rep["steps"]
    for i, t in enumerate(rep["tensors"]):
        w = f"tensors[{i}]."
        if not t["r2"]:
            c.fail(f"{w}r2", "is empty")
        for j, row in enumerate(t.get("coeffs") or []):
            if len(row) != len(steps):
                c.fail(f"{w}coeffs[{j}]", f"has {len(row)} values for {len(steps)} steps")
        if plot and t["delta_norm"] > 0:
            for key in ("coeffs", "slope", "intercept"):
                if not t.get(key):
                    c.fail(f"{w}{key}", "is missing or empty (the plot draws it)")
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
    c.field(meta, "run_id", STR, optional=True)
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
