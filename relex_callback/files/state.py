"""``relex_state.safetensors``: the whole result of a window, from which any horizon can be written later.

Tensors: ``<name>`` -> the directions ``v_k`` of that tensor, ``[rank, n]`` in the buffer dtype (``n`` the
elements this rank holds). Metadata ``relex`` (JSON): settings, steps, and per tensor slope, intercept, sigma,
R^2, explained variance, ``||Delta_tcut||`` and a fingerprint of theta_0 (so a different base is refused).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import RelexInputError
from ..params import TensorSpec
from .checkpoints import write_tensors

from .fs import STATE_INDEX_NAME, STATE_NAME, atomic_file, loads_json, read_json, write_json  # noqa: F401  (the names live in fs)
from ..core.clock import Clock
from ..core.fit import Fit
from ..core.solver import extrapolate_piece
from .schema import check_state_meta, Checker, STR
FORMAT_VERSION = 2  # 2: per-tensor "fit" (the coefficient curve, relex_callback.core.fit.Fit) beside slope/intercept
UNTRACKED_VERSION = 3  # 3: "untracked" (relex_callback.files.untracked), written only by states that record trained
#   untracked tensors, so that an older reader refuses the file instead of writing theta_0 where the run wrote them
CLOCK_VERSION = 4  # 4: "clock" (relex_callback.core.clock, the lr clock), written only by states fitted on it, so
#   that an older reader refuses the file instead of placing the horizons on the step
READABLE_VERSIONS = (1, 2, 3, 4)  # 1: the line only
PREFIX = "untracked/"  # key of an untracked tensor's value (relex_callback.files.untracked); names hold no "/"
SOURCES = ("state", "base")  # where an untracked tensor of a horizon comes from
PEFT_THETA0 = "peft/theta0/"  # a PEFT state: the tracked adapter parameter's theta_0 (a LoRA init is random)
PEFT_VALUE = "peft/value/"  # a PEFT state: a trainable adapter parameter not tracked, at tcut (as the adapters hold it)
N_SAMPLES = 8


FINGERPRINT_CHUNK = 1 << 18  # float64 scratch of 2 MiB: stays in cache (20x faster than one float64 copy)
# On a GPU the cost is per launch, not per cache miss: 2 MiB chunks make a 1.5B model's embedding (233M elements)
# ~2,700 launches of a few microseconds' work each; 128 MiB chunks make it 45.
FINGERPRINT_CHUNK_DEVICE = 1 << 24


def fingerprint_chunk(device) -> int:
    """Elements per float64 chunk of :func:`fingerprint` on ``device``."""
    return FINGERPRINT_CHUNK if torch.device(device).type == "cpu" else FINGERPRINT_CHUNK_DEVICE


@torch.no_grad()
def fingerprint(t: torch.Tensor) -> dict:
    """A cheap, order-robust fingerprint of a tensor's values: float64 sum and sum of squares (compared with a
    tolerance, as reduction order differs between devices) and a few sampled values (compared exactly)."""
    x = t.reshape(-1)
    n = x.numel()
    idx = sorted({(i * 2654435761) % n for i in range(N_SAMPLES)}) if n else []
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    if n:
        chunk = fingerprint_chunk(x.device)
        buf = torch.empty(min(n, chunk), dtype=torch.float64, device=x.device)
        for a in range(0, n, chunk):
            b = buf[: min(chunk, n - a)]
            b.copy_(x[a : a + chunk])
            total += b.sum()
            sq += torch.dot(b, b)
    return {"n": n, "sum": float(total), "sumsq": float(sq), "samples": [float(x[i]) for i in idx]}


def fingerprint_mismatch(a: dict, b: dict) -> Optional[str]:
    if a["n"] != b["n"]:
        return f"{a['n']} vs {b['n']} elements"
    if a["samples"] != b["samples"]:
        return "sampled values differ"
    scale = max(b["sumsq"], 1e-30) ** 0.5 * max(a["n"], 1) ** 0.5
    if abs(a["sum"] - b["sum"]) > 1e-5 * scale + 1e-30:
        return f"sum {a['sum']:.6g} vs {b['sum']:.6g}"
    if abs(a["sumsq"] - b["sumsq"]) > 1e-5 * max(b["sumsq"], 1e-30):
        return f"sum of squares {a['sumsq']:.6g} vs {b['sumsq']:.6g}"
    return None


@dataclass
class RelexState:
    specs: list[TensorSpec]
    steps: list[int]
    tcut: int
    rank: int
    fit_start: Optional[int]
    dtype: str
    slope: torch.Tensor  # [S, r] float64
    intercept: torch.Tensor  # [S, r]
    tensors: dict  # name -> [r, n]
    info: dict  # name -> per-tensor metadata dict

    curve: Optional[object] = None  # relex_callback.core.fit.Fit when the state records a curve other than the line
    run_id: Optional[str] = None  # the window that wrote it (its step-H/ markers carry the same id); None: older files
    untracked: Optional[dict] = None  # key -> {"source", "fingerprint"}: relex_callback.files.untracked
    peft: Optional[dict] = None  # a PEFT (LoRA) run: {"adapter", "config", "merge_lora", "values", "frozen"}
    clock: Optional[object] = None  # relex_callback.core.clock.Clock: fitted on the lr clock; None: on the step

    def coef_at(self, horizon: float) -> torch.Tensor:
        if self.clock is not None:
            horizon = self.clock.at(horizon)
        if self.curve is not None:
            return self.curve.coef_at(horizon)
        return self.slope * float(horizon) + self.intercept

    def direction(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s directions ``[rank, n]`` (the same view a solution gives the horizon checks)."""
        return self.tensors[self.specs[i].name][: self.rank]

    def save(self, path: str):
        """Write this (loaded) state again as one state file, atomically: what :func:`save_state` wrote for it."""
        meta = {"version": FORMAT_VERSION, "tcut": self.tcut, "steps": self.steps, "rank": self.rank,
                "fit_start": self.fit_start, "dtype": self.dtype, "order": [sp.name for sp in self.specs],
                "tensors": self.info, "run_id": self.run_id}
        tensors = {sp.name: self.tensors[sp.name].contiguous() for sp in self.specs}
        if self.untracked:
            meta["untracked"] = self.untracked
            if any(e["source"] == "state" for e in self.untracked.values()):
                meta["version"] = UNTRACKED_VERSION
            tensors.update({k: v.contiguous() for k, v in self.tensors.items() if k.startswith(PREFIX)})
        if self.peft:
            meta["peft"] = self.peft
            tensors.update({k: v.contiguous() for k, v in self.tensors.items()
                            if k.startswith((PEFT_THETA0, PEFT_VALUE))})
        if self.clock is not None:
            meta["clock"], meta["version"] = self.clock.to_json(), CLOCK_VERSION
        _write_state_file(path, tensors, meta)

    @torch.no_grad()
    def extrapolate(self, i: int, horizon: float, theta0: torch.Tensor) -> torch.Tensor:
        spec = self.specs[i]
        return extrapolate_piece(theta0, self.coef_at(horizon)[i], self.tensors[spec.name][: self.rank], spec.dtype)


def save_state(path: str, solution, theta0_of, *, tcut: int, extra: Optional[dict] = None,
               untracked: Optional[tuple[dict, dict]] = None, peft: Optional[tuple[dict, dict]] = None):
    """Write the state file atomically. ``theta0_of(i)`` returns tensor i's local theta_0 (for the fingerprint).
    ``untracked``: ``(tensors, meta)`` of :func:`relex_callback.files.untracked.record_untracked`; ``peft``:
    ``(tensors, meta)`` of a PEFT run (:meth:`relex_callback.files.writers.PeftAdapterWriter.peft_record`)."""
    tensors = {}
    info = {}
    ev = solution.explained
    for i, spec in enumerate(solution.specs):
        tensors[spec.name] = solution.direction(i).detach().to("cpu")  # a view of V on the CPU: written, not copied
        info[spec.name] = {
            "spec": spec.to_json(),
            "slope": solution.slope[i].tolist(),
            "intercept": solution.intercept[i].tolist(),
            "sigma": solution.sigma[i].tolist(),
            "r2": solution.r2[i].tolist(),
            "explained_variance": float(ev[i]),
            "delta_norm": float(solution.delta_norm[i]),
            "theta0": fingerprint(theta0_of(i)),
        }
        if getattr(solution, "curve", None) is not None:
            info[spec.name]["fit"] = solution.curve[i].to_json()
    meta = {
        "version": FORMAT_VERSION,
        "tcut": int(tcut),
        "steps": solution.steps,
        "rank": solution.rank,
        "fit_start": solution.fit_start,
        "dtype": str(solution.V.dtype).replace("torch.", ""),
        "order": [s.name for s in solution.specs],
        "tensors": info,
    }
    if extra:
        meta.update(extra)
    if untracked is not None and untracked[1]:  # nothing untracked: the file is what it was before the record
        tensors.update(untracked[0])
        meta["untracked"] = untracked[1]
        if any(e["source"] == "state" for e in untracked[1].values()):
            meta["version"] = UNTRACKED_VERSION
    if peft is not None:
        tensors.update(peft[0])
        meta["peft"] = peft[1]
    if getattr(solution, "clock", None) is not None:  # the step clock: the file is what it was before the lr clock
        meta["clock"], meta["version"] = solution.clock.to_json(), CLOCK_VERSION
    _write_state_file(path, tensors, meta)


def _write_state_file(path: str, tensors: dict, meta: dict):
    """Directions + the ``relex`` metadata, written to a temporary and renamed into place, tensor by tensor
    (:func:`relex_callback.files.checkpoints.write_tensors`: ``save_file``'s bytes without a copy of the directions)."""
    with atomic_file(path) as tmp:
        write_tensors(tmp, tensors, metadata={"format": "pt", "relex": json.dumps(meta)})


def state_shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n`` of a sharded state."""
    return f"relex_state-{i + 1:05d}-of-{n:05d}.safetensors"


def save_state_index(out_dir: str, weight_map: dict[str, str], order: list[str], **metadata):
    """Commit a sharded state whose shard files (each written by :func:`save_state`) are already in ``out_dir``:
    write ``relex_state.index.json`` atomically (the commit point) and remove an older single-file state there.
    ``weight_map``: tensor name -> shard file; ``order``: the tensors in model order; ``metadata`` is kept."""
    single = os.path.join(out_dir, STATE_NAME)
    if os.path.exists(single):
        os.remove(single)  # an older single-process state (the caller checked overwrite)
    index = {"metadata": {"order": order, **metadata}, "weight_map": weight_map}
    write_json(os.path.join(out_dir, STATE_INDEX_NAME), index, indent=2)


def load_state(path: str) -> RelexState:
    """Read a state file, or a distributed run's sharded state (``relex_state.index.json`` + one
    ``relex_state-0000i-of-0000N.safetensors`` per writing rank, each holding whole tensors), merged."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, STATE_NAME)):
        if os.path.isfile(os.path.join(path, STATE_INDEX_NAME)):
            path = os.path.join(path, STATE_INDEX_NAME)
    if path.endswith(".index.json") and os.path.isfile(path):
        return _load_state_index(path)
    return _load_state_file(path)


def _load_state_index(path: str) -> RelexState:
    try:
        index = read_json(path)
        weight_map = index["weight_map"]
        order = index["metadata"]["order"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RelexInputError(f"{path} is not a valid RELEX state index: {e}") from None

    c = Checker(path, "use the relex_state.index.json the run wrote")
    c.items({"order": order}, "order", STR, "metadata.")
    if not isinstance(weight_map, dict) or any(not isinstance(weight_map.get(n), str) for n in order):
        c.fail("weight_map", "does not name a shard file (a string) for every tensor of metadata.order")
    if any(os.sep in weight_map[n] or weight_map[n].startswith("..") for n in order):
        c.fail("weight_map", "names a file outside the state's directory")
    base = os.path.dirname(path)
    shards = index["metadata"].get("shards") or []  # also the shards that hold only untracked tensors
    if not isinstance(shards, list) or any(not isinstance(x, str) or os.sep in x or x.startswith("..") for x in shards):
        c.fail("metadata.shards", "is not a list of file names in the state's directory")
    parts = [_load_state_file(os.path.join(base, fn))
             for fn in dict.fromkeys([weight_map[n] for n in order] + list(shards))]
    first = parts[0]
    where = {}
    for p in parts:
        if (p.steps, p.tcut, p.rank, p.fit_start, p.run_id, p.clock) != (first.steps, first.tcut, first.rank,
                                                                          first.fit_start, first.run_id, first.clock):
            raise RelexInputError(f"the state shards listed in {path} come from different runs")
        for i, s in enumerate(p.specs):
            where[s.name] = (p, i)
    missing = [n for n in order if n not in where]
    if missing:
        raise RelexInputError(
            f"{path} lists {missing[:3]} but their state shard does not hold them; the state is incomplete"
        )
    specs, tensors, info = [], {}, {}
    for n in order:
        p, i = where[n]
        specs.append(p.specs[i])
        tensors[n] = p.tensors[n]
        info[n] = p.info[n]
    untracked = {}
    for p in parts:  # the untracked values each shard recorded
        untracked.update(p.untracked or {})
        tensors.update({k: v for k, v in p.tensors.items() if k not in where})
    slope = torch.stack([where[n][0].slope[where[n][1]] for n in order])
    intercept = torch.stack([where[n][0].intercept[where[n][1]] for n in order])
    return RelexState(
        specs=specs, steps=first.steps, tcut=first.tcut, rank=first.rank, fit_start=first.fit_start, dtype=first.dtype,
        slope=slope, intercept=intercept, tensors=tensors, info=info, curve=_load_curve(info, order, path),
        run_id=first.run_id,
        untracked=untracked, clock=first.clock,
    )


def _load_state_file(path: str) -> RelexState:
    if os.path.isdir(path):
        path = os.path.join(path, STATE_NAME)
    if not os.path.isfile(path):
        raise RelexInputError(
            f"{path} does not exist; pass the relex_state.safetensors written by the callback or `relex extrapolate`"
        )
    try:
        with safe_open(path, "pt") as f:
            md = f.metadata() or {}
            if "relex" not in md:
                raise RelexInputError(f"{path} is a safetensors file but not a RELEX state file (no 'relex' metadata)")
            meta = loads_json(md["relex"], f"the relex metadata of {path}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except RelexInputError:
        raise
    except Exception as e:
        raise RelexInputError(f"cannot read {path}: {e}; the file is missing or corrupt") from None
    if not isinstance(meta, dict) or meta.get("version") not in READABLE_VERSIONS:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise RelexInputError(f"{path} has state format version {version}; this relex_callback reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade relex_callback to read it")

    check_state_meta(meta, path, ("bfloat16", "float16", "float32"))
    for n in meta["order"]:
        want = (meta["rank"], meta["tensors"][n]["spec"]["local_numel"])
        t = tensors.get(n)
        if t is None or tuple(t.shape) != want or not t.is_floating_point():
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise RelexInputError(
                f"{path}: the direction of {n} is {got}, expected a float tensor of shape {want}; the "
                "file was edited or is damaged: use the relex_state.safetensors the run wrote"
            )
    untracked = check_untracked_meta(meta, tensors, path)
    order = meta["order"]
    info = meta["tensors"]
    specs = [TensorSpec.from_json(info[n]["spec"]) for n in order]
    peft = check_peft_meta(meta, tensors, path, specs)
    slope = torch.tensor([info[n]["slope"] for n in order], dtype=torch.float64)
    intercept = torch.tensor([info[n]["intercept"] for n in order], dtype=torch.float64)
    return RelexState(
        specs=specs, steps=meta["steps"], tcut=meta["tcut"], rank=meta["rank"], fit_start=meta.get("fit_start"),
        dtype=meta["dtype"], slope=slope, intercept=intercept, tensors=tensors, info=info,
        curve=_load_curve(info, order, path), run_id=meta.get("run_id"), untracked=untracked, peft=peft,
        clock=_load_clock(meta, path),
    )


def _load_clock(meta: dict, path: str):
    """The state's lr clock (``None``: fitted on the step)."""
    try:
        return Clock.from_json(meta.get("clock"))
    except (ValueError, TypeError, AttributeError) as e:
        raise RelexInputError(f"{path}: its 'clock' entry is invalid ({e}); the file was edited or is damaged: use "
                              "the relex_state.safetensors the run wrote") from None


def check_peft_meta(meta, tensors: dict, path: str, specs) -> Optional[dict]:
    """The ``peft`` entry of a state file's metadata (``None`` when absent: a full-model state), checked against its
    tensors: the adapter name, its PEFT config, ``merge_lora``, the untracked trainable adapter parameters whose
    values it holds, and the fingerprints of the frozen base parameters the merged model is made of."""
    rec = meta.get("peft")
    if rec is None:
        return None
    hint = "the file was edited or is damaged: use the relex_state.safetensors the run wrote"
    if not isinstance(rec, dict):
        raise RelexInputError(f"{path}: 'peft' is {type(rec).__name__}, expected a mapping; {hint}")
    for key, kind in (("adapter", str), ("config", dict), ("merge_lora", bool), ("values", list), ("frozen", dict)):
        if not isinstance(rec.get(key), kind):
            raise RelexInputError(f"{path}: peft.{key} is {rec.get(key)!r}, expected a {kind.__name__}; {hint}")
    if not isinstance(rec["config"].get("peft_type"), str):
        raise RelexInputError(f"{path}: peft.config has no peft_type; {hint}")
    for sp in specs:
        t = tensors.get(PEFT_THETA0 + sp.name)
        if t is None or t.numel() != sp.local_numel or not t.is_floating_point():
            raise RelexInputError(f"{path}: the theta_0 of the adapter parameter {sp.name} is "
                                  f"{'missing' if t is None else f'{tuple(t.shape)} {t.dtype}'}; {hint}")
    for name in rec["values"]:
        if not isinstance(name, str) or PEFT_VALUE + name not in tensors:
            raise RelexInputError(f"{path}: the value of the untracked adapter parameter {name!r} is missing; {hint}")
    for name, fp in rec["frozen"].items():
        if not (isinstance(fp, dict) and fp.get("dtype") in ("float32", "float16", "bfloat16", "float64")
                and isinstance(fp.get("n"), int)
                and isinstance(fp.get("samples"), list) and all(isinstance(fp.get(k), (int, float))
                                                                 for k in ("sum", "sumsq"))):
            raise RelexInputError(f"{path}: peft.frozen[{name!r}] is not a fingerprint; {hint}")
    return rec


def _load_curve(info: dict, order: list, path: str):
    """The recorded coefficient curves (``None`` when every tensor records only the line)."""
    if not any(isinstance(info[n], dict) and "fit" in info[n] for n in order):
        return None

    try:
        return Fit.stack([Fit.from_json(info[n].get("fit") or info[n]) for n in order])
    except RelexInputError as e:
        raise RelexInputError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RelexInputError(f"{path}: a tensor's 'fit' record is damaged ({type(e).__name__}: {e}); use the "
                              "relex_state.safetensors the run wrote") from None


def check_untracked_meta(meta, tensors: dict, path: str) -> dict:
    """The ``untracked`` entry of a state file's metadata (``{}`` when absent), checked against its tensors."""
    rec = meta.get("untracked")
    if rec is None:
        return {}
    hint = "the file was edited or is damaged: use the relex_state.safetensors the run wrote"
    if not isinstance(rec, dict):
        raise RelexInputError(f"{path}: 'untracked' is {type(rec).__name__}, expected a mapping of keys; {hint}")
    for key, e in rec.items():
        if not isinstance(e, dict) or e.get("source") not in SOURCES:
            raise RelexInputError(f"{path}: untracked[{key!r}] has no source in {list(SOURCES)}; {hint}")
        if e["source"] == "state" and PREFIX + key not in tensors:
            raise RelexInputError(f"{path}: the value of the untracked tensor {key} is missing; {hint}")
    return rec
