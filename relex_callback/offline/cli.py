"""``relex``: RELEX over checkpoints saved on disk. Argument parsing and one call each; the work is in
:mod:`relex_callback.offline.api` (callable from Python).

    relex extrapolate --base DIR --checkpoints DIR [DIR ...] --horizons 500,1000 --out DIR
    relex materialize --state OUT/relex_state.safetensors --base DIR --horizons 2000 --out DIR
    relex report OUT [--plot]
    relex plan --model DIR --tcut 100 --world-size 8 [--gpu-memory 80GB] [--host-memory 1TB] ...

Every input mistake ends with one line ``relex: error: ...`` on stderr and exit code 2, before anything is written;
a failed write (disk full) likewise, saying what is intact. SIGINT, SIGTERM and SIGHUP end a command with one line
``relex: interrupted ...`` and exit code 128 + the signal's number, after the writer removed everything the run had
written (temporaries and outputs alike: a plain rerun starts afresh). ``extrapolate`` and ``materialize`` hold the
output directory's lock (:mod:`relex_callback.files.lock`) from before their first byte: a second writer there is
refused at once. transformers is never imported; torch only once the arguments are valid. ``RELEX_TIMING=1`` prints
phase timings and peak RSS on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Optional, Sequence

from ..config import (DEFAULT_FOLD_RANK, DEFAULTS, FIT_CLOCKS, FITS, SOLVERS, STORAGES, bounded, cli_argument,
                      parse_dtype, parse_horizons, parse_size)
from ..errors import RelexError, RelexInputError, RelexInterrupted, name_switch
from ..files.fs import (REPORT_PLOT_FILE, STATE_INDEX_NAME, STATE_NAME, foreign_output, horizon_dir,
                        output_run_id)
from ..files.lock import COMPLETED, visible_entries, writing
from ..files.report import format_summary, format_trust, load_report, plot_report, report_path
from ..files.schema import check_report
from ..trajectory.plan import (MODES, PlanMachine, PlanWindow, count_parameters, plan_memory, read_model_config,
                               torch_optimizer_bytes)
from .hub import label as model_label, resolve_model


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        raise RelexInputError(message)


def _horizons(value: str) -> list[int]:
    try:
        hs = parse_horizons(value)
    except RelexInputError:
        raise RelexInputError(f"--horizons must be whole step numbers separated by commas, got {value!r}") from None
    hs = [bounded("horizons", h, "--horizons") for h in hs]
    rep = sorted({h for h in hs if hs.count(h) > 1})
    if rep:
        raise RelexInputError(f"--horizons repeats {', '.join(map(str, rep))}: give each step once, e.g. "
                              f"--horizons {','.join(map(str, sorted(set(hs))))}")
    return hs


def _steps(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        steps = parse_horizons(value)
    except RelexInputError:
        raise RelexInputError(f"--steps must be whole step numbers separated by commas, got {value!r}") from None
    return [bounded("steps", t, "--steps") for t in steps]


def _check_dir(option: str, path: str, what: str, weights: bool = False):
    if not os.path.exists(path):
        raise RelexInputError(f"{option} {path} does not exist; pass {what}")
    if not os.path.isdir(path):
        raise RelexInputError(f"{option} {path} is not a directory; pass {what}")
    files = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    if weights and not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise RelexInputError(f"{option} {path} has no {' or '.join(files)}; pass {what}, saved with safetensors "
                              "(the default of save_pretrained)")


def _shard_size(value: str) -> int:
    try:
        return parse_size(value, "--max-shard-size")
    except RelexInputError:
        raise RelexInputError(f"--max-shard-size {value!r} is not a size; use e.g. 5GB, 500MB or a number of "
                              "bytes") from None


def _version() -> str:
    # relex_callback/__init__.py holds the version (setup.cfg reads it there); the package is always imported before
    # any of its modules, so it is read from sys.modules rather than imported from a lower layer
    return getattr(sys.modules.get((__package__ or "relex_callback").split(".")[0]), "__version__", "unknown")


def _setting(parser, name: str, help: Optional[str] = None, **extra):
    """The flag of a setting, as :data:`relex_callback.config.SETTINGS` declares it (default, choices, help)."""
    flag, kw = cli_argument(name, help, **extra)
    parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="relex", description="RELEX: rank-1 linear extrapolation of RL weight trajectories.")
    p.add_argument("--version", action="version", version=f"relex {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{extrapolate,materialize,report,plan}", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("extrapolate", help="fit the trajectory of saved checkpoints and write extrapolated ones")
    e.add_argument("--base", required=True, help="theta_0: the checkpoint training started from (step 0); a "
                   "directory, or a hub id read from the Hugging Face cache")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+",
                     help="checkpoint directories (checkpoint-N, global_step_N, step_N, step-N), or one parent "
                          "directory holding them")
    src.add_argument("--trajectory",
                     help="a trajectory the callback saved (<out>/partial_trajectory/ of a run that ended before "
                          "tcut, or a checkpoint's relex_trajectory/) instead of checkpoints; tcut is its last "
                          "recorded step")
    e.add_argument("--untracked-from", default=None,
                   help="with --trajectory: the checkpoint saved at its last recorded step, whose weights give the "
                        "tensors the trajectory does not track (default: the trajectory's untracked.safetensors, or "
                        "the checkpoint its relex_trajectory/ sits in); checked to be the model at that step")
    e.add_argument("--untracked-frozen", action="store_true",
                   help="with --trajectory: none of the tensors it does not track was trained (frozen parameters, "
                        "buffers): take them from --base")
    e.add_argument("--horizons", required=True,
                   help="steps to write, comma separated, each beyond the last checkpoint's step")
    e.add_argument("--out", required=True, help="output directory (step-H/, relex_state.safetensors, report.json)")
    e.add_argument("--steps", default=None, help="step numbers of --checkpoints, comma separated, in the order given "
                   "(default: from the directory names)")
    _setting(e, "fit_start")
    _setting(e, "stride", "use only checkpoints whose step is a multiple of N")
    _setting(e, "rank")
    _setting(e, "dtype")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    _setting(e, "storage")
    _setting(e, "solver")
    _setting(e, "max_shard_size")
    _setting(e, "fit")
    _setting(e, "fit_window")
    _setting(e, "degree")
    _setting(e, "fit_clock", choices=FIT_CLOCKS)
    e.add_argument("--schedule", default=None, help="the run's learning-rate schedule, "
                   "NAME[,warmup=W][,total=N][,KEY=VALUE...] as transformers.get_scheduler builds it (imports "
                   "transformers); N: the max_steps it was built for (default: the last horizon)")
    e.add_argument("--no-run-check", action="store_true",
                   help="with --checkpoints: skip the check that they are one run started from --base (copies, "
                        "never-trained tensors that differ from the base, a first checkpoint farther from the base "
                        "than the run's steps reach)")
    _setting(e, "overwrite")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read the checkpoints tensor by tensor, without a [T, D] buffer (exact float32 deltas, memory "
                        "bounded by a 256 MiB budget; --dtype is then the state file's direction dtype). Default: on "
                        "with --device cpu, --storage auto and --solver auto/gram; --no-streaming fills the buffer")

    m = sub.add_parser("materialize", help="write more horizons from a state file and the base model")
    m.add_argument("--state", required=True, help="relex_state.safetensors (or the directory holding it)")
    m.add_argument("--base", required=True, help="the same base checkpoint the state was computed from (a directory "
                   "or a cached hub id)")
    m.add_argument("--horizons", required=True, help="steps to write, comma separated")
    m.add_argument("--out", required=True, help="output directory (step-H/ for each horizon)")
    _setting(m, "max_shard_size")
    _setting(m, "overwrite", "replace existing step-H/ directories")

    r = sub.add_parser("report", help="summarise report.json (and plot it with --plot)")
    r.add_argument("dir", help="the directory `relex extrapolate` (or the callback) wrote, or its report.json")
    r.add_argument("--plot", action="store_true", help="also write report.png beside report.json (needs matplotlib)")
    r.add_argument("--worst", default="10", help="how many of the worst-fitting tensors to list (default 10)")

    q = sub.add_parser("plan", help="print the memory plan of a RELEX window (per process and node, each tier) without "
                                    "training")
    q.add_argument("--model", required=True, help="a model directory, its config.json, or a hub id read from the "
                   "Hugging Face cache (only the config is read)")
    _setting(q, "tcut")
    q.add_argument("--world-size", default="1", help="training processes in all (default 1)")
    q.add_argument("--local-world-size", default=None, help="processes per node (default: --world-size, one node)")
    q.add_argument("--mode", default=None, help="zero3 (default with several processes), fsdp2, replicated (DDP, "
                                                "ZeRO-1/2 in fp32), zero12 (ZeRO-1/2 with bf16/fp16 mixed precision) "
                                                "or single")
    _setting(q, "stride")
    _setting(q, "dtype")
    _setting(q, "fold_rank")
    _setting(q, "storage")
    _setting(q, "max_buffer_bytes")
    q.add_argument("--gpu-memory", default=None,
                   help="memory of one GPU, e.g. 80GB (default: the device tier is not planned)")
    q.add_argument("--trainer-memory", default=None, help="what the trainer holds on each GPU (default: model states, "
                   "16 bytes per parameter, divided by the world size when sharded; add a reference model when "
                   "beta > 0)")
    q.add_argument("--optimizer", default=None, help="without --trainer-memory: what the trainer holds on each GPU. "
                   "mixed-adam (default): DeepSpeed or mixed-precision Adam, 16 bytes per parameter of model states "
                   "(divided by the world size under ZeRO-3/FSDP2); adamw, adamw-fused, sgd: a plain torch optimizer "
                   "on the config's dtype, the weights plus what its first step adds (gradients, states, a foreach "
                   "temporary), counted as the callback counts them")
    q.add_argument("--vllm-colocate", default=None,
                   help="a colocated vLLM engine's vllm_gpu_memory_utilization, e.g. 0.3")
    q.add_argument("--gpu-headroom", default="0.25", help="fraction of each GPU kept for activations (default 0.25)")
    q.add_argument("--host-memory", default=None, help="host memory of one node, e.g. 1TB (default: not planned)")
    q.add_argument("--disk-free", default=None,
                   help="free disk of the output directory per node, e.g. 4TB (default: not planned)")
    q.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    return p


# ---------------------------------------------------------------------------------------------- commands
def _numbers(args, table):
    """Parse the whole-number options ``table`` (option -> BOUNDS name) of ``args`` in place, with the bounds the
    callback uses (:data:`relex_callback.config.BOUNDS`); ``None`` stays ``None``."""
    for option, name in table.items():
        attr = option[2:].replace("-", "_")
        value = getattr(args, attr)
        if value is not None:
            setattr(args, attr, bounded(name, value, option))


EXTRAPOLATE_NUMBERS = {"--fit-start": "fit_start", "--stride": "stride", "--rank": "rank", "--fit-window": "fit_window",
                       "--degree": "degree"}
PLAN_NUMBERS = {"--tcut": "tcut", "--stride": "stride", "--world-size": "world_size",
                "--local-world-size": "local_world_size", "--fold-rank": "fold_rank"}


def cmd_extrapolate(args) -> int:
    horizons = _horizons(args.horizons)
    steps = _steps(args.steps)
    if args.device not in ("cpu", "cuda"):
        raise RelexInputError(f"--device {args.device!r} is not one of ['cpu', 'cuda']")
    _numbers(args, EXTRAPOLATE_NUMBERS)
    args.base = resolve_model("--base", args.base)  # a hub id: its snapshot in the Hugging Face cache
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
    if args.fit not in FITS:
        raise RelexInputError(f"--fit {args.fit!r} is not one of {', '.join(FITS)}")
    if args.degree != DEFAULTS["degree"] and args.fit not in ("polynomial", "auto"):
        raise RelexInputError(f"--degree applies to --fit polynomial; this run fits {args.fit}")
    fit_kw = dict(fit=args.fit, fit_window=args.fit_window, degree=args.degree, fit_clock=args.fit_clock,
                  schedule=args.schedule)
    if args.trajectory is None and (args.untracked_from is not None or args.untracked_frozen):
        raise RelexInputError("--untracked-from and --untracked-frozen apply to --trajectory; checkpoints hold every "
                              "tensor")
    if args.untracked_from is not None and args.untracked_frozen:
        raise RelexInputError("--untracked-from and --untracked-frozen exclude each other: pass one")
    if args.trajectory is not None:
        if args.steps is not None or args.stride != DEFAULTS["stride"]:
            raise RelexInputError("--steps and --stride apply to --checkpoints; a saved trajectory keeps its own steps")
        if args.streaming:
            raise RelexInputError("--streaming applies to --checkpoints; a saved trajectory is already one buffer")
        if args.no_run_check:
            raise RelexInputError("--no-run-check applies to --checkpoints; a saved trajectory is checked against "
                                  "--base by its theta_0")
        _check_dir("--trajectory", args.trajectory,
                   "the partial_trajectory/ or relex_trajectory/ directory the callback wrote")
        if args.untracked_from is not None:
            _check_dir("--untracked-from", args.untracked_from, "the checkpoint saved at the trajectory's last step",
                       weights=True)
        with writing(args.out, "relex extrapolate"):
            if visible_entries(args.out) and not args.overwrite:
                raise RelexInputError(f"--out {args.out} exists and is not empty; choose a new directory, or pass "
                                      "--overwrite")
            from .api import extrapolate_trajectory  # imports torch: once the arguments are checked

            _, report = extrapolate_trajectory(args.trajectory, args.base, horizons, args.out, rank=args.rank,
                                               fit_start=args.fit_start, method=args.solver, overwrite=args.overwrite,
                                               max_shard_size=args.max_shard_size, untracked_from=args.untracked_from,
                                               untracked_frozen=args.untracked_frozen, **fit_kw)
        print(trust_lines(report))
        print(f"relex: wrote {', '.join(report['checkpoints'])}")
        return 0
    from .api import extrapolate_checkpoints  # imports torch: once the arguments are checked

    with writing(args.out, "relex extrapolate"):
        _, report = extrapolate_checkpoints(
            args.base, args.checkpoints, horizons, args.out, steps=steps, stride=args.stride, fit_start=args.fit_start,
            rank=args.rank, dtype=args.dtype, device=args.device, storage=args.storage, solver=args.solver,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress,
            timing=bool(os.environ.get("RELEX_TIMING")), streaming=args.streaming, run_check=not args.no_run_check,
            **fit_kw,
        )
    print(trust_lines(report))
    s = report["summary"]
    print(f"relex: {s['tensors']} tensors, explained variance mean {_f(s['explained_variance_mean'])}, "
          f"R^2 mean {_f(s['r2_mean'])}; wrote {', '.join(report['checkpoints'])}")
    return 0


def cmd_materialize(args) -> int:
    horizons = _horizons(args.horizons)
    args.base = resolve_model("--base", args.base)
    _check_dir("--base", args.base, "the same base checkpoint the state was computed from", weights=True)
    _shard_size(args.max_shard_size)
    from .api import materialize  # imports torch: once the arguments are checked

    with writing(args.out, "relex materialize"):
        written = materialize(args.state, args.base, horizons, args.out, overwrite=args.overwrite,
                              max_shard_size=args.max_shard_size)
    print(f"relex: wrote {', '.join(written)}")
    return 0


def cmd_report(args) -> int:

    args.worst = bounded("worst", args.worst, "--worst")
    rep = load_report(args.dir)
    if not isinstance(rep, dict) or not isinstance(rep.get("tensors"), list) or "tcut" not in rep:
        raise RelexInputError(f"{report_path(args.dir)} is JSON but not a RELEX report (no 'tcut' and 'tensors'); pass "
                              "the directory that `relex extrapolate` or the callback wrote")
    check_report(rep, report_path(args.dir), plot=args.plot)
    _check_one_run(rep, report_path(args.dir))
    png = os.path.join(os.path.dirname(report_path(args.dir)), REPORT_PLOT_FILE)
    why = foreign_output(png) if args.plot and os.path.lexists(png) else None
    if why:  # a picture relex did not draw is not replaced
        raise RelexInputError(f"{png} exists and {why}; it was left as it is: move it away to draw the plot")
    print(format_summary(rep, worst=args.worst))
    if args.plot:
        plot_report(rep, png)
        print(f"relex: wrote {png}")
    return 0


def _check_one_run(rep: dict, path: str):
    """The state file and the horizons beside ``report.json`` carry its run id (read back: two writers, or files
    copied in, must not pass for one run's results)."""
    rid = rep.get("run_id")
    if not isinstance(rid, str):  # a report written before run ids were recorded
        return
    d = os.path.dirname(os.path.abspath(path))
    names = [STATE_NAME, STATE_INDEX_NAME] + [os.path.basename(horizon_dir(d, h)) for h in rep.get("horizons") or []
                                              if isinstance(h, int)]
    other = [f"{n} (run {o})" for n in names for o in [output_run_id(os.path.join(d, n))] if o is not None and o != rid]
    if other:
        raise RelexInputError(f"{path} is RELEX run {rid}, but {', '.join(other)} beside it is another run's: the "
                              "directory mixes two runs' outputs (a writer that did not take the lock, or files copied "
                              "in); rerun `relex extrapolate` (or the training run) into a new directory")


def _size_arg(option: str, value):
    if value is None:
        return None
    try:
        return parse_size(value, option)
    except RelexInputError:
        raise RelexInputError(f"{option} {value!r} is not a size; use e.g. 80GB, 1TB or a number of bytes") from None


def _fraction_arg(option: str, value, low_open: bool):
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    ok = (0 < x <= 1) if low_open else (0 <= x < 1)
    if not ok:
        raise RelexInputError(f"{option} must be a fraction in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")
    return x


def cmd_plan(args) -> int:
    _numbers(args, PLAN_NUMBERS)
    tcut, stride = args.tcut, args.stride
    if stride > tcut // 2:
        raise RelexInputError(f"--stride {stride} leaves fewer than 2 snapshots in --tcut {tcut}; use --stride <= "
                              f"{tcut // 2}")
    world = args.world_size
    local = world if args.local_world_size is None else args.local_world_size
    if local > world or world % local:
        raise RelexInputError(f"--local-world-size {local} must divide --world-size {world} (processes per node)")
    mode = args.mode or ("zero3" if world > 1 else "single")
    if mode not in MODES:
        raise RelexInputError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "single" and world > 1:
        raise RelexInputError(f"--mode single with --world-size {world}; use zero3, fsdp2 or replicated")
    if mode != "single" and world == 1:
        raise RelexInputError(f"--mode {mode} needs --world-size > 1 (one process is --mode single)")
    try:
        dtype = parse_dtype(args.dtype)
    except RelexInputError:
        raise RelexInputError(f"--dtype {args.dtype!r} is not one of bfloat16, float16, float32 (the trajectory "
                              "buffer's dtype)") from None
    fold_rank = DEFAULT_FOLD_RANK if args.fold_rank is None else args.fold_rank
    if args.storage not in STORAGES:
        raise RelexInputError(f"--storage {args.storage!r} is not one of {', '.join(STORAGES)}")
    sizes = {o: _size_arg(o, v) for o, v in (("--gpu-memory", args.gpu_memory), ("--host-memory", args.host_memory),
                                              ("--disk-free", args.disk_free),
                                              ("--trainer-memory", args.trainer_memory),
                                              ("--max-buffer-bytes", args.max_buffer_bytes))}
    if sizes["--trainer-memory"] is not None and sizes["--gpu-memory"] is None:
        raise RelexInputError("--trainer-memory needs --gpu-memory (the device tier is planned only with it)")
    optimizers = ("mixed-adam", "adamw", "adamw-fused", "sgd")
    if args.optimizer is not None:
        if args.optimizer not in optimizers:
            raise RelexInputError(f"--optimizer {args.optimizer!r} is not one of {', '.join(optimizers)}")
        if sizes["--trainer-memory"] is not None:
            raise RelexInputError("--optimizer and --trainer-memory both say what the trainer holds; give one")
        if sizes["--gpu-memory"] is None:
            raise RelexInputError("--optimizer needs --gpu-memory (the device tier is planned only with it)")
        if args.optimizer != "mixed-adam" and mode in ("zero3", "zero12"):
            raise RelexInputError(f"--optimizer {args.optimizer} is a plain torch optimizer; --mode {mode} is "
                                  "DeepSpeed, whose optimizer holds mixed-precision Adam states: use --optimizer "
                                  "mixed-adam (the default)")
    vllm = _fraction_arg("--vllm-colocate", args.vllm_colocate, low_open=True)
    headroom = _fraction_arg("--gpu-headroom", args.gpu_headroom, low_open=False)
    if vllm is not None and sizes["--gpu-memory"] is None:
        raise RelexInputError("--vllm-colocate needs --gpu-memory (the share is a fraction of each GPU)")
    given, args.model = args.model, resolve_model("--model", args.model, config_only=True)
    read_model_config(args.model)  # input mistakes before torch is imported
    named, param_dtype = count_parameters(args.model)
    if mode in ("zero12", "zero3"):  # DeepSpeed: theta_0 is the fp32 master weights (or fp32 parameters)
        param_dtype = "float32"
    label = model_label(given, args.model)
    trainer_bytes, pending = sizes["--trainer-memory"], 0
    if args.optimizer not in (None, "mixed-adam"):
        trainer_bytes, pending = torch_optimizer_bytes([s for _, s in named], param_dtype, args.optimizer,
                                                       shards=world if mode == "fsdp2" else 1)
    win = PlanWindow(window=tcut // stride, shapes=[s for _, s in named], mode=mode, world_size=world,
                     local_world_size=local, dtype=dtype, param_dtype=param_dtype, fold_rank=fold_rank,
                     storage=args.storage, max_buffer_bytes=sizes["--max-buffer-bytes"])
    machine = PlanMachine(gpu_memory=sizes["--gpu-memory"], trainer_gpu_bytes=trainer_bytes,
                          trainer_pending_bytes=pending, use_vllm=vllm is not None,
                          vllm_gpu_memory_utilization=vllm or 0.3, gpu_headroom=headroom,
                          host_memory=sizes["--host-memory"], disk_free=sizes["--disk-free"])
    plan = plan_memory(win, machine, label=f"{label}, tcut {tcut}" + (f", stride {stride}" if stride > 1 else ""))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan.format())
    return 0


def trust_lines(report: dict) -> str:
    return format_trust(report)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _interrupt(signum, frame):
    # the first signal interrupts the work; the writer's cleanup then runs with the signals ignored (a second Ctrl-C
    # must not leave half of it undone; SIGKILL still ends the process)
    for name in SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise RelexInterrupted(signum)


def _install_handlers() -> dict:
    old = {}
    for name in SIGNALS:
        if hasattr(signal, name):
            with_num = getattr(signal, name)
            try:
                old[with_num] = signal.signal(with_num, _interrupt)
            except ValueError:  # not the main thread: Python's defaults stay
                pass
    return old


def _interrupted_line(e: RelexInterrupted) -> str:
    if e.complete or (e.out_dir is None and COMPLETED):
        return (f"relex: interrupted by {e.name} after every output was written whole in "
                f"{e.out_dir or COMPLETED[-1]}; nothing is left to do")
    if e.removed:
        kept = (f"; removed what it had written in {e.out_dir} ({', '.join(sorted(e.removed))}) and its temporaries: "
                "nothing of it is left")
    elif e.out_dir is not None:
        kept = f"; nothing of it is left in or beside {e.out_dir}"
    else:
        kept = ""
    return f"relex: interrupted by {e.name}{kept}; run the same command again to start afresh"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``relex`` console script. Returns the exit code (0; 2 for an input mistake or a failed
    write; 128 + the signal's number after SIGINT, SIGTERM or SIGHUP)."""
    # OpenMP's default active wait spins idle threads; on cores other jobs hold that made runs 4-5x slower. Passive
    # unless the user chose (set before torch is imported, which reads it once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    old = _install_handlers()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        fn = {"extrapolate": cmd_extrapolate, "materialize": cmd_materialize, "report": cmd_report,
              "plan": cmd_plan}[args.command]
        return fn(args)
    except RelexError as e:  # input mistakes, non-finite values in a checkpoint, failed writes
        print(f"relex: error: {name_switch(e, 'cli')}", file=sys.stderr)
        return 2
    except RelexInterrupted as e:
        print(_interrupted_line(e), file=sys.stderr)
        return 128 + e.signum
    finally:
        for num, handler in old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(num, handler)


if __name__ == "__main__":
    sys.exit(main())
