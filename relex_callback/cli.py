"""``relex``: RELEX over checkpoints saved on disk.

    relex extrapolate --base DIR --checkpoints DIR [DIR ...] --horizons 500,1000 --out DIR
    relex materialize --state OUT/relex_state.safetensors --base DIR --horizons 2000 --out DIR
    relex report OUT [--plot]

Every input mistake ends with one line ``relex: error: ...`` on stderr and exit code 2, before anything is
written. transformers (and trl, deepspeed) are never imported: checkpoints are read as safetensors, memory-mapped
tensor by tensor, and config and tokenizer files are copied. ``--stride k`` keeps the checkpoints whose step is a
multiple of k. Set ``RELEX_TIMING=1`` for a line of phase timings and peak RSS on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

_T_IMPORT = time.perf_counter()
# Directory names that carry a step number: checkpoint-N (Trainer), global_step_N (verl, DeepSpeed), step_N, step-N.
STEP_DIR = re.compile(r"^(?:checkpoint|global_step|step)[-_](\d+)$")
VERL_SUBDIR = os.path.join("actor", "huggingface")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class _InputError(Exception):
    """Raised before torch is imported; turned into ``relex: error: ...`` like RelexInputError."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        raise _InputError(message)


# --------------------------------------------------------------------------------------------- parsing
def _int_list(what: str, value: str) -> list[int]:
    parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise _InputError(f"{what} must be whole step numbers separated by commas, got {p!r} in {value!r}") from None
    if not out:
        raise _InputError(f"{what} is empty; give at least one step, e.g. {what}=500")
    return out


def _horizons(value: str) -> list[int]:
    hs = _int_list("--horizons", value)
    rep = sorted({h for h in hs if hs.count(h) > 1})
    if rep:
        raise _InputError(f"--horizons repeats {', '.join(map(str, rep))}: give each step once, e.g. "
                          f"--horizons {','.join(map(str, sorted(set(hs))))}")
    return hs


def _check_dir(option: str, path: str, what: str, weights: bool = False):
    if not os.path.exists(path):
        raise _InputError(f"{option} {path} does not exist; pass {what}")
    if not os.path.isdir(path):
        raise _InputError(f"{option} {path} is not a directory; pass {what}")
    if weights and not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise _InputError(f"{option} {path} has no {' or '.join(WEIGHT_FILES)}; pass {what}, saved with safetensors "
                          "(the default of save_pretrained)")


def _check_out(out: str):
    """``--out`` can be created: its nearest existing ancestor is a writable directory."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise _InputError(f"--out {out} exists and is not a directory")
        probe = out
    else:
        probe = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise _InputError(f"--out {out} cannot be created: {probe} is a file, not a directory; choose another --out")
    import tempfile

    try:  # permissions, read-only file systems, /proc: only trying tells (an empty directory, removed at once)
        os.rmdir(tempfile.mkdtemp(prefix=".relex-probe-", dir=probe))
    except OSError as e:
        raise _InputError(f"--out {out} cannot be written ({probe}: {e.strerror}); choose another --out") from None


def _shard_size(value: str) -> int:
    """``--max-shard-size`` in bytes, checked before any work (the writer would only refuse it at the end)."""
    from .errors import RelexInputError
    from .writer import parse_size

    try:
        n = parse_size(value)
    except RelexInputError:
        n = 0
    if n <= 0:
        raise _InputError(f"--max-shard-size {value!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="relex", description="RELEX: rank-1 linear extrapolation of RL weight trajectories.")
    sub = p.add_subparsers(dest="command", metavar="{extrapolate,materialize,report}", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("extrapolate", help="fit the trajectory of saved checkpoints and write extrapolated ones")
    e.add_argument("--base", required=True, help="theta_0: the checkpoint training started from (step 0)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+",
                     help="checkpoint directories (checkpoint-N, global_step_N, step_N, step-N), or one parent directory holding them")
    src.add_argument("--trajectory",
                     help="a trajectory the callback saved (<out>/partial_trajectory/ of a run that ended before tcut, or "
                          "a checkpoint's relex_trajectory/) instead of checkpoints; tcut is its last recorded step")
    e.add_argument("--horizons", required=True, help="steps to write, comma separated, each beyond the last checkpoint's step")
    e.add_argument("--out", required=True, help="output directory (step-H/, relex_state.safetensors, report.json)")
    e.add_argument("--steps", default=None, help="step numbers of --checkpoints, comma separated, in the order given (default: from the directory names)")
    e.add_argument("--fit-start", type=int, default=None, help="first step used in the line fit (default: all)")
    e.add_argument("--stride", type=int, default=1, help="use only checkpoints whose step is a multiple of N (default 1: all)")
    e.add_argument("--rank", type=int, default=1, help="directions per tensor (default 1, the paper's choice)")
    e.add_argument("--dtype", default="bfloat16", help="trajectory buffer dtype: bfloat16 (default), float16 or float32")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    e.add_argument("--storage", default="auto", help="buffer tier: auto (default), device, host or disk")
    e.add_argument("--solver", default="auto", help="auto (default), gram or power")
    e.add_argument("--max-shard-size", default="50GB", help="shard the written checkpoints above this size (default 50GB, like save_pretrained)")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("materialize", help="write more horizons from a state file and the base model")
    m.add_argument("--state", required=True, help="relex_state.safetensors (or the directory holding it)")
    m.add_argument("--base", required=True, help="the same base checkpoint the state was computed from")
    m.add_argument("--horizons", required=True, help="steps to write, comma separated")
    m.add_argument("--out", required=True, help="output directory (step-H/ for each horizon)")
    m.add_argument("--max-shard-size", default="50GB", help="shard the written checkpoints above this size (default 50GB, like save_pretrained)")
    m.add_argument("--overwrite", action="store_true", help="replace existing step-H/ directories")

    r = sub.add_parser("report", help="summarise report.json (and plot it with --plot)")
    r.add_argument("dir", help="the directory `relex extrapolate` (or the callback) wrote, or its report.json")
    r.add_argument("--plot", action="store_true", help="also write report.png beside report.json (needs matplotlib)")
    r.add_argument("--worst", type=int, default=10, help="how many of the worst-fitting tensors to list (default 10)")
    return p


# ----------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    step: int
    path: str  # the directory given (or found)
    weights: str  # the directory holding the safetensors (path, or path/actor/huggingface for verl)


def weights_dir(path: str) -> Optional[str]:
    """The directory with the weights: ``path`` itself or verl's ``path/actor/huggingface``; None when neither."""
    for d in (path, os.path.join(path, VERL_SUBDIR)):
        if any(os.path.isfile(os.path.join(d, f)) for f in WEIGHT_FILES):
            return d
    return None


def step_of(path: str) -> Optional[int]:
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def discover_checkpoints(paths: Sequence[str], steps: Optional[Sequence[int]] = None, stride: int = 1) -> list[Checkpoint]:
    """Resolve ``--checkpoints`` (+ ``--steps``, ``--stride``) to checkpoints sorted by step.

    A single path that is not itself a checkpoint is a parent directory: its subdirectories named like
    ``checkpoint-N`` / ``global_step_N`` / ``step_N`` / ``step-N`` are the checkpoints. ``stride`` keeps the
    checkpoints whose step is a multiple of it (``--stride 10`` over steps 5, 10, 15, 20 keeps 10 and 20).
    """
    for p in paths:
        if not os.path.isdir(p):
            what = "is not a directory" if os.path.exists(p) else "does not exist"
            raise _InputError(f"--checkpoints {p} {what}; pass checkpoint directories or one directory holding them")
    dirs = list(paths)
    if len(paths) == 1 and weights_dir(paths[0]) is None:
        parent = paths[0]
        dirs = [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                if STEP_DIR.match(d) and os.path.isdir(os.path.join(parent, d))]
        if not dirs:
            raise _InputError(
                f"{parent} is neither a checkpoint (no model.safetensors) nor a directory of checkpoints named "
                "checkpoint-N, global_step_N, step_N or step-N"
            )
    found = []
    for d in dirs:
        w = weights_dir(d)
        if w is None:
            raise _InputError(f"{d} has no model.safetensors or model.safetensors.index.json (nor actor/huggingface/ with them)")
        found.append((d, w))
    if steps is not None:
        if len(steps) != len(found):
            raise _InputError(f"--steps gives {len(steps)} step numbers for {len(found)} checkpoints; give one per checkpoint")
        numbered = list(steps)
    else:
        numbered = []
        for d, _ in found:
            s = step_of(d)
            if s is None:
                raise _InputError(
                    f"cannot tell the step of {d} from its name (expected checkpoint-N, global_step_N, step_N or step-N); pass --steps"
                )
            numbered.append(s)
    bad = [s for s in numbered if s <= 0]
    if bad:
        raise _InputError(f"checkpoint steps must be > 0 (the base is step 0), got {bad}")
    seen = {}
    for s, (d, _) in zip(numbered, found):
        if s in seen:
            raise _InputError(f"step {s} appears twice ({seen[s]} and {d}); give each step once")
        seen[s] = d
    cks = sorted((Checkpoint(s, d, w) for s, (d, w) in zip(numbered, found)), key=lambda c: c.step)
    if stride < 1:
        raise _InputError(f"--stride must be >= 1, got {stride}")
    if stride > 1:
        kept = [c for c in cks if c.step % stride == 0]
        if len(kept) < 2:
            raise _InputError(
                f"--stride {stride} keeps {len(kept)} of the steps {[c.step for c in cks]} (steps divisible by {stride}); "
                "a line needs at least 2: lower --stride"
            )
        cks = kept
    if len(cks) < 2:
        raise _InputError(f"{len(cks)} checkpoint given; a line needs at least 2")
    return cks


def _check_same_tensors(base, names, ck, src):
    """Every tracked tensor present in ``src`` with the base's shape and dtype; no extra floating tensors."""
    for n in names:
        if n not in src.meta:
            raise _InputError(f"{ck.weights} has no tensor {n!r} (present in the base); all checkpoints must be of the same model")
        if src.meta[n] != base.meta[n]:
            (s1, d1), (s2, d2) = base.meta[n], src.meta[n]
            raise _InputError(
                f"{n}: shape {list(s2)} {str(d2).replace('torch.', '')} in {ck.weights} but {list(s1)} "
                f"{str(d1).replace('torch.', '')} in the base; all checkpoints must be of the same model and dtype"
            )
    extra = [k for k, (_, dt) in src.meta.items() if k not in base.meta and dt.is_floating_point]
    if extra:
        raise _InputError(f"{ck.weights} has tensors the base lacks ({', '.join(extra[:3])}); all checkpoints must be of the same model")


def check_out_free(out: str, horizons: Sequence[int], overwrite: bool):
    """No ``step-H`` of ``horizons`` in ``out`` unless ``overwrite``. Unlike engine.check_outputs_free a state file
    there is fine: ``relex materialize`` usually writes beside the state it reads."""
    if overwrite:
        return
    taken = [os.path.join(out, f"step-{h}") for h in horizons if os.path.exists(os.path.join(out, f"step-{h}"))]
    if taken:
        raise _InputError(f"{', '.join(taken)} already exist(s); choose another --out, remove them, or pass --overwrite")


# ---------------------------------------------------------------------------------------------- commands
def cmd_extrapolate(args) -> int:
    t_main = time.perf_counter()
    horizons = _horizons(args.horizons)
    steps = _int_list("--steps", args.steps) if args.steps is not None else None
    if args.device not in ("cpu", "cuda"):
        raise _InputError(f"--device {args.device!r} is not one of ['cpu', 'cuda']")
    if args.fit_start is not None and args.fit_start < 0:
        raise _InputError(f"--fit-start must be >= 0 (a step number), got {args.fit_start}")
    _check_dir("--base", args.base, "the checkpoint training started from (step 0)", weights=True)
    from .config import SOLVERS, STORAGES, parse_dtype
    from .errors import RelexInputError

    for opt, value, allowed in (("--storage", args.storage, STORAGES), ("--solver", args.solver, SOLVERS)):
        if value not in allowed:
            raise _InputError(f"{opt} {value!r} is not one of {', '.join(allowed)}")
    try:
        parse_dtype(args.dtype)
    except RelexInputError:
        raise _InputError(f"--dtype {args.dtype!r} is not one of bfloat16, float16, float32 (the trajectory buffer's dtype)") from None
    _shard_size(args.max_shard_size)
    if args.trajectory is not None:
        return _extrapolate_trajectory(args, horizons)
    cks = discover_checkpoints(args.checkpoints, steps, args.stride)
    _check_out(args.out)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise _InputError(f"--out {args.out} exists and is not empty; choose a new directory, or pass --overwrite")

    t_start = time.perf_counter()
    import torch

    from .buffer import TrajectoryStore
    from .config import RelexSettings
    from .engine import finalize
    from .errors import RelexNonFiniteError
    from .params import TensorSpec
    from .writer import DirectorySource

    if args.device == "cuda" and not torch.cuda.is_available():
        raise _InputError("--device cuda but no CUDA device is visible; use --device cpu")
    tcut = cks[-1].step
    obs = [c.step for c in cks]
    early = [h for h in horizons if h <= tcut]
    if early:
        raise _InputError(f"--horizons {','.join(map(str, early))} not beyond the last checkpoint's step {tcut}: extrapolation "
                          f"writes steps after it; use horizons > {tcut} (the paper uses 5-10x the last step)")
    # The CLI's steps need not be every stride-th step, so settings are validated with stride 1 and the checks that
    # depend on the actual steps are done here.
    settings = RelexSettings.validate(tcut=max(tcut, 2), horizons=horizons, stride=1, fit_start=None, rank=1,
                                      storage=args.storage, dtype=args.dtype, solver=args.solver)
    if args.fit_start is not None:
        n_fit = len([s for s in obs if s >= args.fit_start])
        if args.fit_start < 0 or n_fit < 2:
            raise _InputError(f"--fit-start {args.fit_start} leaves {n_fit} of the steps {obs} to fit; the line needs 2: use --fit-start <= {obs[-2]}")
    if args.rank < 1 or args.rank > len(obs):
        raise _InputError(f"--rank {args.rank} must be between 1 and the number of checkpoints ({len(obs)})")
    if args.solver == "power" and args.rank > 1:
        raise _InputError(f"--solver power computes rank 1 only; use --solver gram or auto for --rank {args.rank}")

    base = DirectorySource(args.base)
    names = [k for k in base.keys if base.meta[k][1].is_floating_point]
    if not names:
        raise _InputError(f"{args.base} has no floating-point tensors to track")
    # DirectorySource has opened every safetensors file (safetensors refuses one its header does not cover whole)
    sources = []
    for ck in cks:
        src = DirectorySource(ck.weights)
        _check_same_tensors(base, names, ck, src)
        sources.append(src)
    specs = [TensorSpec(name=n, shape=base.meta[n][0], dtype=base.meta[n][1], local_numel=math.prod(base.meta[n][0])) for n in names]

    out = os.path.abspath(args.out)
    scratch = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.trajectory-{os.getpid()}")
    t_checked = time.perf_counter()
    method = settings.solver  # "auto": solver.default_method picks by device and number of steps
    store = TrajectoryStore(specs, len(cks), dtype=settings.dtype, storage=settings.storage, device=torch.device(args.device),
                            directory=scratch, prefault=False)  # each row is written once, now: lazy faults measured faster
    try:
        store.set_theta0(read_tensors(base, names, args.device))
        bar = _progress(len(cks), args.no_progress)
        for ck, src in zip(cks, sources):
            bar.set_postfix_str(os.path.basename(os.path.normpath(ck.path)))
            try:
                store.snapshot(ck.step, read_tensors(src, names, args.device))
            except RelexNonFiniteError as e:
                bar.close()
                raise _InputError(f"{ck.path}: {e}; leave this checkpoint (and later ones) out of --checkpoints") from None
            bar.update(1)
        bar.close()
        t_read = time.perf_counter()
        rss_read = _peak_rss()
        # theta_0 is the base checkpoint itself: free the in-memory copy before the solve (peak memory) and let the
        # writer read it back tensor by tensor from the page cache
        store.theta0 = None
        base_mapped = MappedSource(base)
        try:
            _, report = finalize(
                store, tcut=tcut, horizons=settings.horizons, out_dir=out, source=base, rank=args.rank,
                fit_start=args.fit_start, method=method, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                report_extra={"base": os.path.abspath(args.base), "checkpoints_read": [c.path for c in cks]},
                release_buffer=True, theta0_of=lambda i: base_mapped.get(specs[i].name).reshape(-1),
            )
        finally:
            base_mapped.close()
    finally:
        store.release()
        if os.path.isdir(scratch):
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    if os.environ.get("RELEX_TIMING"):
        t_end = time.perf_counter()
        print(f"relex: timing: process start to main {t_main - _T_IMPORT:.2f} s (module), imports {t_start - t_main:.2f}+"
              f"{t_checked - t_start:.2f} s (imports + header checks), read+snapshot {t_read - t_checked:.2f} s, "
              f"solve+write {t_end - t_read:.2f} s; peak RSS after reading {rss_read / 1e9:.2f} GB, at the end "
              f"{_peak_rss() / 1e9:.2f} GB", file=sys.stderr)
    s = report["summary"]
    print(f"relex: {s['tensors']} tensors, explained variance mean {_f(s['explained_variance_mean'])}, "
          f"R^2 mean {_f(s['r2_mean'])}; wrote {', '.join(report['checkpoints'])}")
    return 0


def _extrapolate_trajectory(args, horizons) -> int:
    if args.steps is not None or args.stride != 1:
        raise _InputError("--steps and --stride apply to --checkpoints; a saved trajectory keeps its own steps")
    _check_dir("--trajectory", args.trajectory, "the partial_trajectory/ or relex_trajectory/ directory the callback wrote")
    _check_out(args.out)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise _InputError(f"--out {args.out} exists and is not empty; choose a new directory, or pass --overwrite")
    from .engine import extrapolate_trajectory

    _, report = extrapolate_trajectory(args.trajectory, args.base, horizons, args.out, rank=args.rank,
                                       fit_start=args.fit_start, method=args.solver, overwrite=args.overwrite,
                                       max_shard_size=args.max_shard_size)
    print(f"relex: wrote {', '.join(report['checkpoints'])}")
    return 0


def cmd_materialize(args) -> int:
    horizons = _horizons(args.horizons)
    _check_dir("--base", args.base, "the same base checkpoint the state was computed from", weights=True)
    _shard_size(args.max_shard_size)
    _check_out(args.out)
    check_out_free(args.out, horizons, args.overwrite)

    from .engine import materialize

    written = materialize(args.state, args.base, horizons, args.out, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size)
    print(f"relex: wrote {', '.join(written)}")
    return 0


def cmd_report(args) -> int:
    from .report import format_summary, load_report, plot_report, report_path

    if args.worst < 0:
        raise _InputError(f"--worst must be >= 0 (how many tensors to list), got {args.worst}")
    rep = load_report(args.dir)
    if not isinstance(rep, dict) or not isinstance(rep.get("tensors"), list) or "tcut" not in rep:
        raise _InputError(f"{report_path(args.dir)} is JSON but not a RELEX report (no 'tcut' and 'tensors'); pass the "
                          "directory that `relex extrapolate` or the callback wrote")
    print(format_summary(rep, worst=args.worst))
    if args.plot:
        png = os.path.join(os.path.dirname(report_path(args.dir)), "report.png")
        plot_report(rep, png)
        print(f"relex: wrote {png}")
    return 0


# ----------------------------------------------------------------------------------------------- helpers
def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


class MappedSafetensors:
    """One safetensors file whose tensors are memory-mapped one at a time: ``get(name)`` is a view of the page cache
    (a private mapping of just that tensor's pages, no copy), unmapped when the tensor is freed, so the resident
    memory never holds a whole checkpoint. The header is checked against the file size when opened: a truncated
    file is refused before any work."""

    def __init__(self, path: str):
        import json
        import struct

        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > size - 8:
                    raise ValueError(f"header length {hlen} beyond the file's {size} bytes")
                header = json.loads(f.read(hlen))
        except (OSError, ValueError, struct.error) as e:
            raise _InputError(f"cannot read {path}: {e}; the file is missing, truncated or corrupt") from None
        header.pop("__metadata__", None)
        self.start = 8 + hlen
        for k, v in header.items():
            b, e = v["data_offsets"]
            if self.start + e > size:
                raise _InputError(f"cannot read {path}: tensor {k} ends at byte {self.start + e} of a {size}-byte file; the file is truncated")
        self.header = header
        self.size = size
        self._fd = None
        self._last = None

    def get(self, name: str):
        import mmap

        import torch

        from .writer import _st_dtype

        h = self.header[name]
        b, e = h["data_offsets"]
        dtype = _st_dtype(h["dtype"])  # the dtype DirectorySource.meta reports for it (the shape/dtype checks use that)
        if e == b:
            return torch.empty(h["shape"], dtype=dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        lo = (self.start + b) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        if self._last is not None:
            # the previous tensor has been consumed: drop its pages from this process (they stay in the page cache;
            # a later touch faults them back in), so at most one tensor of a checkpoint is resident at a time
            try:
                self._last.madvise(mmap.MADV_DONTNEED)
            except (ValueError, OSError):
                pass
        mm = mmap.mmap(self._fd, self.start + e - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo)
        self._last = mm
        raw = torch.frombuffer(mm, dtype=torch.uint8, offset=self.start + b - lo, count=e - b)  # keeps mm alive
        if (self.start + b) % dtype.itemsize:  # unaligned (old writers): one copy
            raw = raw.clone()
        return raw.view(dtype).reshape(h["shape"])

    def close(self):
        self._last = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MappedSource:
    """The tensors of a :class:`~relex_callback.writer.DirectorySource`, memory-mapped one at a time
    (:class:`MappedSafetensors`, each file opened on first use)."""

    def __init__(self, source):
        self.key_file = source.key_file
        self.files: dict[str, MappedSafetensors] = {}

    def get(self, name: str):
        fp = self.key_file[name]
        if fp not in self.files:
            self.files[fp] = MappedSafetensors(fp)
        return self.files[fp].get(name)

    def close(self):
        for mf in self.files.values():
            mf.close()  # the mappings stay valid after the descriptor is closed


def read_tensors(source, names: Sequence[str], device: str = "cpu"):
    """Yield the tensors ``names`` of a :class:`~relex_callback.writer.DirectorySource` one at a time, memory-mapped
    from its safetensors files (no copy on CPU: the store subtracts theta_0 straight from the page cache)."""
    mapped = MappedSource(source)
    try:
        for n in names:
            t = mapped.get(n)
            yield t if device == "cpu" else t.to(device)
    finally:
        mapped.close()


class _NoBar:
    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, disabled: bool):
    if disabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="relex: reading checkpoints", unit="ckpt", file=sys.stderr, dynamic_ncols=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``relex`` console script. Returns the exit code (0, or 2 for an input mistake)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        fn = {"extrapolate": cmd_extrapolate, "materialize": cmd_materialize, "report": cmd_report}[args.command]
        return fn(args)
    except _InputError as e:
        print(f"relex: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .errors import RelexError

        if isinstance(e, RelexError):  # input mistakes, and non-finite values in a checkpoint
            print(f"relex: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
