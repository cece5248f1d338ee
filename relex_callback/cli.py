"""``relex``: RELEX over checkpoints saved on disk. Argument parsing and one call each; the work is in
:mod:`relex_callback.offline` (callable from Python).

    relex extrapolate --base DIR --checkpoints DIR [DIR ...] --horizons 500,1000 --out DIR
    relex materialize --state OUT/relex_state.safetensors --base DIR --horizons 2000 --out DIR
    relex report OUT [--plot]

Every input mistake ends with one line ``relex: error: ...`` on stderr and exit code 2, before anything is written;
a failed write (disk full) likewise, saying what is intact. transformers is never imported; torch only once the
arguments are valid. ``RELEX_TIMING=1`` prints phase timings and peak RSS on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .config import SOLVERS, STORAGES, parse_dtype, parse_horizons, parse_size
from .errors import RelexError, RelexInputError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        raise RelexInputError(message)


def _horizons(value: str) -> list[int]:
    try:
        hs = parse_horizons(value)
    except RelexInputError:
        raise RelexInputError(f"--horizons must be whole step numbers separated by commas, got {value!r}") from None
    rep = sorted({h for h in hs if hs.count(h) > 1})
    if rep:
        raise RelexInputError(f"--horizons repeats {', '.join(map(str, rep))}: give each step once, e.g. "
                              f"--horizons {','.join(map(str, sorted(set(hs))))}")
    return hs


def _steps(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return parse_horizons(value)
    except RelexInputError:
        raise RelexInputError(f"--steps must be whole step numbers separated by commas, got {value!r}") from None


def _check_dir(option: str, path: str, what: str, weights: bool = False):
    if not os.path.exists(path):
        raise RelexInputError(f"{option} {path} does not exist; pass {what}")
    if not os.path.isdir(path):
        raise RelexInputError(f"{option} {path} is not a directory; pass {what}")
    files = ("model.safetensors", "model.safetensors.index.json")
    if weights and not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise RelexInputError(f"{option} {path} has no {' or '.join(files)}; pass {what}, saved with safetensors "
                              "(the default of save_pretrained)")


def _shard_size(value: str) -> int:
    try:
        return parse_size(value, "--max-shard-size")
    except RelexInputError:
        raise RelexInputError(f"--max-shard-size {value!r} is not a size; use e.g. 5GB, 500MB or a number of bytes") from None


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
    e.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read the checkpoints tensor by tensor, without a [T, D] buffer (exact float32 deltas, memory "
                        "bounded by a 256 MiB budget; --dtype is then the state file's direction dtype). Default: on "
                        "with --device cpu, --storage auto and --solver auto/gram; --no-streaming fills the buffer")

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


# ---------------------------------------------------------------------------------------------- commands
def cmd_extrapolate(args) -> int:
    horizons = _horizons(args.horizons)
    steps = _steps(args.steps)
    if args.device not in ("cpu", "cuda"):
        raise RelexInputError(f"--device {args.device!r} is not one of ['cpu', 'cuda']")
    if args.fit_start is not None and args.fit_start < 0:
        raise RelexInputError(f"--fit-start must be >= 0 (a step number), got {args.fit_start}")
    if args.stride < 1:
        raise RelexInputError(f"--stride must be >= 1, got {args.stride}")
    _check_dir("--base", args.base, "the checkpoint training started from (step 0)", weights=True)
    for opt, value, allowed in (("--storage", args.storage, STORAGES), ("--solver", args.solver, SOLVERS)):
        if value not in allowed:
            raise RelexInputError(f"{opt} {value!r} is not one of {', '.join(allowed)}")
    try:
        parse_dtype(args.dtype)
    except RelexInputError:
        raise RelexInputError(f"--dtype {args.dtype!r} is not one of bfloat16, float16, float32 (the trajectory "
                              "buffer's dtype)") from None
    _shard_size(args.max_shard_size)
    if args.trajectory is not None:
        if args.steps is not None or args.stride != 1:
            raise RelexInputError("--steps and --stride apply to --checkpoints; a saved trajectory keeps its own steps")
        _check_dir("--trajectory", args.trajectory, "the partial_trajectory/ or relex_trajectory/ directory the callback wrote")
        from .fs import check_writable_dir

        check_writable_dir(args.out, "--out")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise RelexInputError(f"--out {args.out} exists and is not empty; choose a new directory, or pass --overwrite")
        from .offline import extrapolate_trajectory

        _, report = extrapolate_trajectory(args.trajectory, args.base, horizons, args.out, rank=args.rank,
                                           fit_start=args.fit_start, method=args.solver, overwrite=args.overwrite,
                                           max_shard_size=args.max_shard_size)
        print(f"relex: wrote {', '.join(report['checkpoints'])}")
        return 0
    from .offline import extrapolate_checkpoints

    _, report = extrapolate_checkpoints(
        args.base, args.checkpoints, horizons, args.out, steps=steps, stride=args.stride, fit_start=args.fit_start,
        rank=args.rank, dtype=args.dtype, device=args.device, storage=args.storage, solver=args.solver,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress,
        timing=bool(os.environ.get("RELEX_TIMING")), streaming=args.streaming,
    )
    s = report["summary"]
    print(f"relex: {s['tensors']} tensors, explained variance mean {_f(s['explained_variance_mean'])}, "
          f"R^2 mean {_f(s['r2_mean'])}; wrote {', '.join(report['checkpoints'])}")
    return 0


def cmd_materialize(args) -> int:
    horizons = _horizons(args.horizons)
    _check_dir("--base", args.base, "the same base checkpoint the state was computed from", weights=True)
    _shard_size(args.max_shard_size)
    from .offline import materialize

    written = materialize(args.state, args.base, horizons, args.out, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size)
    print(f"relex: wrote {', '.join(written)}")
    return 0


def cmd_report(args) -> int:
    from .report import format_summary, load_report, plot_report, report_path

    if args.worst < 0:
        raise RelexInputError(f"--worst must be >= 0 (how many tensors to list), got {args.worst}")
    from .schema import check_report

    rep = load_report(args.dir)
    if not isinstance(rep, dict) or not isinstance(rep.get("tensors"), list) or "tcut" not in rep:
        raise RelexInputError(f"{report_path(args.dir)} is JSON but not a RELEX report (no 'tcut' and 'tensors'); pass "
                              "the directory that `relex extrapolate` or the callback wrote")
    check_report(rep, report_path(args.dir))
    print(format_summary(rep, worst=args.worst))
    if args.plot:
        png = os.path.join(os.path.dirname(report_path(args.dir)), "report.png")
        plot_report(rep, png)
        print(f"relex: wrote {png}")
    return 0


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``relex`` console script. Returns the exit code (0, or 2 for an input mistake or a failed
    write)."""
    # OpenMP's default active wait spins idle threads; on cores other jobs hold that made runs 4-5x slower. Passive
    # unless the user chose (set before torch is imported, which reads it once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        fn = {"extrapolate": cmd_extrapolate, "materialize": cmd_materialize, "report": cmd_report}[args.command]
        return fn(args)
    except RelexError as e:  # input mistakes, non-finite values in a checkpoint, failed writes
        print(f"relex: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
