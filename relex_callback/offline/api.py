"""RELEX after the fact, from Python: the functions behind ``relex extrapolate`` and ``relex materialize``.

* :func:`extrapolate_checkpoints`: saved checkpoints of a run (no callback needed) -> state, horizons, report.
* :func:`extrapolate_trajectory`: a trajectory the callback saved (``partial_trajectory/``, a checkpoint's
  ``relex_trajectory/``) -> the same.
* :func:`materialize`: more horizons from a state file and the base model.

All three check every input before anything is written and go through :func:`relex_callback.pipeline.finalize.finalize`
(or, for ``materialize``, the same full-checkpoint writer), so their outputs and failures are the callback's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..config import DEFAULTS, MAX_STEP, RelexSettings, parse_horizons, parse_size
from ..core.clock import resolve
from ..errors import RelexInputError, RelexNonFiniteError, RelexWriteError
from ..files.checkpoints import (ADAPTER_KEYS, check_same_tensors, DirectorySource, discover_checkpoints, MappedSource,
                                  nonfinite_base, read_tensors)
from ..files.fs import STATE_NAME, check_free_space, check_outputs_free, check_writable_dir, read_json
from ..files.lock import visible_entries, writing
from ..files.state import PEFT_THETA0, PEFT_VALUE, fingerprint, fingerprint_mismatch, load_state
from ..files.untracked import UntrackedSource
from ..files.writers import FullModelWriter, PeftAdapterWriter, WriteFailed, write_full_checkpoint
from ..params import TensorSpec
from ..pipeline.finalize import BufferedSolve, check_horizons_fit, finalize
from ..pipeline.streamed import DEFAULT_MEMORY_BUDGET, StreamedSolve
from ..trajectory.store import TrajectoryStore
from .belongs import check_belongs, same_directories, untracked_at_tcut
from .schedule import offline_clock

logger = logging.getLogger("relex_callback")


@dataclass(frozen=True)
class OfflineOptions:
    """The keyword arguments of :func:`extrapolate_checkpoints` and :func:`extrapolate_trajectory`, as the one object
    their steps receive. The settings shared with the callback keep its names and defaults
    (:data:`relex_callback.config.SETTINGS`); the others are the offline engine's own."""

    steps: Optional[Sequence[int]] = None  # step numbers of the checkpoints, in the order given
    stride: int = DEFAULTS["stride"]
    fit_start: Optional[int] = DEFAULTS["fit_start"]
    rank: int = DEFAULTS["rank"]
    dtype: str = DEFAULTS["dtype"]
    device: str = "cpu"
    storage: str = DEFAULTS["storage"]
    solver: str = DEFAULTS["solver"]
    max_shard_size: Any = DEFAULTS["max_shard_size"]
    overwrite: bool = DEFAULTS["overwrite"]
    progress: bool = False
    timing: bool = False
    streaming: Optional[bool] = None
    memory_budget: Optional[int] = None
    fit: str = DEFAULTS["fit"]
    fit_window: Optional[int] = DEFAULTS["fit_window"]
    degree: int = DEFAULTS["degree"]
    run_check: bool = True
    fit_clock: str = DEFAULTS["fit_clock"]
    schedule: Optional[str] = None
    untracked_from: Optional[str] = None
    untracked_frozen: bool = False

    @classmethod
    def of(cls, given: dict) -> "OfflineOptions":
        """The options among ``given`` (a public function's ``locals()``)."""
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


@dataclass(frozen=True)
class _Job:
    """The checked inputs of one ``extrapolate_checkpoints`` run, handed to its solve path."""

    base: str
    cks: list  # the checkpoints found, by step
    src_base: Any  # DirectorySource of the base
    sources: list  # DirectorySource of each checkpoint
    names: list[str]  # the tracked tensors
    specs: list  # their TensorSpec
    out: str  # the absolute output directory
    options: OfflineOptions
    t_main: float  # when the run began (RELEX_TIMING)
    clock: Any = None  # the lr clock, or None: the step


def base_theta0(src, base: str, specs, expected_of: Callable, whose: str, hint: str) -> dict[str, torch.Tensor]:
    """Each spec's piece of theta_0 read from the base checkpoint ``src`` (path ``base``), refused with ``hint``
    when its fingerprint differs from ``expected_of(spec)`` (``whose`` names where that came from). Returns
    ``name -> flat piece``."""
    thetas, differ = {}, []
    for spec in specs:
        t = src.get(spec.name).reshape(-1)[spec.flat_start: spec.flat_start + spec.local_numel]
        if not bool(torch.isfinite(t.float()).all()):  # said as the base's NaN, not as a mismatch
            nonfinite_base(src, base, [s.name for s in specs])
        why = fingerprint_mismatch(fingerprint(t), expected_of(spec))
        if why:
            differ.append((spec.name, why))
        thetas[spec.name] = t
    if differ:  # every tensor that differs is named: the same architecture with other weights differs everywhere
        names = ", ".join(f"{n} ({why})" for n, why in differ[:5]) + (f" and {len(differ) - 5} more"
                                                                      if len(differ) > 5 else "")
        raise RelexInputError(f"the base {base} does not match {whose} theta_0 for {len(differ)} of {len(specs)} "
                              f"tensor(s): {names}; {hint}")
    return thetas


def _check_out(out_dir: str, overwrite: bool):
    check_writable_dir(out_dir, "--out")
    if os.path.isdir(out_dir) and visible_entries(out_dir) and not overwrite:
        raise RelexInputError(f"--out {out_dir} exists and is not empty; choose a new directory, or pass --overwrite")


def materialize(state_path: str, base: str, horizons: Sequence[int], out_dir: Optional[str] = None, *,
                overwrite: bool = DEFAULTS["overwrite"], max_shard_size=DEFAULTS["max_shard_size"]) -> list[str]:
    """Write ``step-H`` for each horizon from a state file and the base checkpoint (theta_0 and every untracked
    tensor): what ``relex materialize`` runs. Refuses a base whose tracked tensors do not match the fingerprints
    of theta_0 in the state. Returns the written directories."""
    parse_size(max_shard_size)
    st = load_state(state_path)
    hs = sorted(parse_horizons(horizons))
    if len(set(hs)) != len(hs):
        raise RelexInputError(f"horizons repeat: give each step once, e.g. {','.join(map(str, sorted(set(hs))))}")
    bad = [h for h in hs if h <= st.tcut]
    if bad:
        raise RelexInputError(f"horizons {bad} are not beyond the state's last observed step {st.tcut}; use horizons "
                              f"> {st.tcut}")
    big = [h for h in hs if h > MAX_STEP]
    if big:
        raise RelexInputError(f"horizons {big} are beyond {MAX_STEP:,} steps; use smaller horizons")
    out_dir = out_dir or os.path.dirname(os.path.abspath(state_path if not os.path.isdir(state_path)
                                                         else os.path.join(state_path, STATE_NAME)))
    with writing(out_dir, "relex materialize"):  # the output directory's lock, from before the first byte
        if st.peft is not None:  # a LoRA run: its adapters (and merged models), through the callback's own writer
            return _materialize_peft(st, base, hs, out_dir, overwrite)
        return _materialize_full(st, base, hs, out_dir, overwrite, max_shard_size)


def _materialize_full(st, base: str, hs, out_dir: str, overwrite: bool, max_shard_size) -> list[str]:
    src = DirectorySource(base)
    # every check before anything is written
    check_writable_dir(out_dir, "--out")
    check_outputs_free(out_dir, hs, overwrite, include_state=False)
    for spec in st.specs:
        if spec.name not in src.meta:
            raise RelexInputError(f"the base {base} has no tensor {spec.name}: pass the base the state was computed "
                                  "from")
        shape, dtype = src.meta[spec.name]
        if tuple(shape) != tuple(spec.shape) or dtype != spec.dtype:
            raise RelexInputError(
                f"{spec.name}: {list(shape)} {dtype} in {base} but {list(spec.shape)} {spec.dtype} in the state; "
                "pass the base the state was computed from"
            )
    thetas = base_theta0(src, base, st.specs, lambda spec: st.info[spec.name]["theta0"], "the state's",
                         "pass the same base checkpoint given to `relex extrapolate` (or the model the callback "
                         "trained)")
    base_bytes = src.weights_bytes
    src = UntrackedSource(src, st)  # the untracked tensors the run wrote: from the state, or checked in the base
    src.check(base)
    check_horizons_fit(st, hs)  # every horizon finite in the parameters' dtype, before the first is written
    check_free_space(out_dir, {f"{len(hs)} horizon(s) of {base}'s size": len(hs) * base_bytes})
    return _write_each(hs, out_dir, lambda h: write_full_checkpoint(
        out_dir, h, st.tcut, st, lambda i: thetas[st.specs[i].name], src, overwrite=overwrite,
        max_shard_size=max_shard_size, run_id=st.run_id))


def _materialize_peft(st, base: str, hs, out_dir: str, overwrite: bool) -> list[str]:
    """``step-H/`` (the adapter) and, when the run merged, ``step-H-merged/`` from a PEFT state: the base model
    ``base`` with the run's adapter config applied, its adapter parameters at the state's theta_0 (extrapolated) and
    tcut values (untracked), written by :class:`~relex_callback.files.writers.PeftAdapterWriter` as the callback did.
    Every check before anything is written: the outputs, the base loads, the adapter's parameters are the state's,
    and every frozen base weight matches the run's fingerprint (the merged model is made of them)."""
    rec = st.peft
    check_writable_dir(out_dir, "--out")
    check_outputs_free(out_dir, hs, overwrite, include_state=False, merged=rec["merge_lora"])
    check_horizons_fit(st, hs)  # every horizon finite in the adapter's dtype, before the first is written
    model = _load_peft_base(base, rec)
    params = dict(model.named_parameters())
    for sp in st.specs:
        p = params.get(sp.name)
        if p is None or tuple(p.shape) != tuple(sp.shape) or p.dtype != sp.dtype:
            got = "no such parameter" if p is None else f"{list(p.shape)} {p.dtype}"
            raise RelexInputError(f"the adapter built on {base} with the run's PEFT config has {got} for {sp.name} "
                                  f"({list(sp.shape)} {sp.dtype} in the state): pass the base model the adapter was "
                                  "trained on")
    for n, fp in rec["frozen"].items():
        p = params.get(n)
        why = ("it has no such parameter" if p is None else
               f"{str(p.dtype).replace('torch.', '')} instead of {fp['dtype']}"
               if str(p.dtype).replace("torch.", "") != fp["dtype"] else
               fingerprint_mismatch(fingerprint(p.detach()), fp))
        if why:
            raise RelexInputError(f"the base {base} does not match the run's base weight {n} ({why}); the merged "
                                  "model would not be the run's: pass the base model the adapter was trained on "
                                  "(loaded in the dtype it was trained in)")
    with torch.no_grad():
        for n in rec["values"]:
            if n not in params:
                raise RelexInputError(f"the adapter built on {base} has no parameter {n} (the run trained it)")
            params[n].copy_(st.tensors[PEFT_VALUE + n].reshape(params[n].shape))
    tok = None
    try:
        from transformers import AutoTokenizer  # a PEFT state only: the CLI never imports transformers otherwise

        tok = AutoTokenizer.from_pretrained(base)
    except Exception:  # no tokenizer beside the base: the adapters are written without one
        tok = None
    writer = PeftAdapterWriter(model, {sp.name: params[sp.name] for sp in st.specs}, tok,
                               merge_lora=rec["merge_lora"])
    writer.solution, writer.run_id = st, st.run_id
    writer.theta0_of = lambda i: st.tensors[PEFT_THETA0 + st.specs[i].name]
    return _write_each(hs, out_dir, lambda h: writer.write_horizon(out_dir, h, st.tcut, overwrite))


def _write_each(hs, out_dir: str, write_one) -> list[str]:
    """``write_one(h)`` for every horizon, in order; a failed write is a :class:`RelexWriteError` naming what was
    already written whole (nothing exists under the failed one's final name; the state file is untouched)."""
    written = []
    for h in hs:
        try:
            written.append(write_one(h))
        except WriteFailed as e:
            raise RelexWriteError(
                f"writing step-{h} into {out_dir} failed: {e}; nothing exists under the final name"
                + (f" ({', '.join(written)} were written whole)" if written else "")
                + "; the state file is unchanged: free space (or fix permissions) and run again"
            ) from e.__cause__
    return written


def _load_peft_base(base: str, rec: dict):
    """The base model in ``base`` with the run's adapter (its recorded PEFT config and adapter name) applied."""
    try:
        import peft  # optional: a PEFT state only
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise RelexInputError(f"the state is a PEFT (LoRA) run's: materializing it needs peft ({e})") from None
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise RelexInputError(f"{base} has no config.json: for a PEFT (LoRA) state pass the base model the adapter "
                              "was trained on (a directory from save_pretrained)")
    try:
        dtype = {fp["dtype"] for fp in rec["frozen"].values()}
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=getattr(torch, dtype.pop()) if len(dtype) == 1 else "auto")
        config = peft.PeftConfig.from_peft_type(**rec["config"])
        out = peft.get_peft_model(model, config, adapter_name=rec["adapter"])
    except RelexInputError:
        raise
    except Exception as e:
        raise RelexInputError(f"cannot build the run's adapter on {base} ({type(e).__name__}: {e}); pass the base "
                              "model the adapter was trained on") from None
    return out


def extrapolate_trajectory(trajectory_dir: str, base: str, horizons: Sequence[int], out_dir: str, *,
                           rank: int = DEFAULTS["rank"], fit_start: Optional[int] = DEFAULTS["fit_start"],
                           method: str = DEFAULTS["solver"], overwrite: bool = DEFAULTS["overwrite"],
                           max_shard_size=DEFAULTS["max_shard_size"], fit: str = DEFAULTS["fit"],
                           fit_window: Optional[int] = DEFAULTS["fit_window"], degree: int = DEFAULTS["degree"],
                           untracked_from: Optional[str] = None, untracked_frozen: bool = False,
                           fit_clock: str = DEFAULTS["fit_clock"], schedule: Optional[str] = None):
    """Solve a saved trajectory (``<out>/partial_trajectory/`` of a run that ended before tcut, or a checkpoint's
    ``relex_trajectory/``) and write the state, the horizons and the report, as the callback would have. ``tcut``
    is the last recorded step. ``base`` is the checkpoint training started from (config, tokenizer); it must match
    the trajectory's theta_0.

    The tensors the trajectory does not track are written as the callback writes them, their values at tcut
    (:func:`relex_callback.offline.belongs.untracked_at_tcut`): from the trajectory's ``untracked.safetensors``, else
    from ``untracked_from`` or the checkpoint the ``relex_trajectory/`` sits in (verified to be the model at tcut),
    else from the base only with ``untracked_frozen`` (the user says none of them was trained); otherwise refused.
    ``fit_clock``, ``schedule``: as in :func:`extrapolate_checkpoints` (a trajectory has no log history: the lr clock
    needs ``schedule``). Returns ``(solution, report)``."""
    options = OfflineOptions.of({**locals(), "solver": method})
    with writing(out_dir, "relex extrapolate"):  # the output directory's lock, from before the first byte
        return _extrapolate_trajectory(trajectory_dir, base, horizons, out_dir, options)


def _extrapolate_trajectory(trajectory_dir, base, horizons, out_dir, o: OfflineOptions):
    rank, fit_start = o.rank, o.fit_start
    store = TrajectoryStore.open(trajectory_dir)
    if store.num_rows < 2:
        raise RelexInputError(f"{trajectory_dir} holds {store.num_rows} recorded step(s); a line needs at least 2")
    tcut = store.steps[-1]
    settings = RelexSettings.validate(tcut=tcut, horizons=horizons, stride=1, fit_start=fit_start,
                                      rank=min(rank, store.num_rows), solver=o.solver, max_shard_size=o.max_shard_size,
                                      fit=o.fit, degree=o.degree, allow_partial_stride=True)
    _check_fit_window(o.fit_window, store.steps, fit_start)
    if rank > store.num_rows:
        raise RelexInputError(f"rank={rank} exceeds the {store.num_rows} recorded steps in {trajectory_dir}")
    src = DirectorySource(base)
    keys_file = os.path.join(base, ADAPTER_KEYS)
    if os.path.isfile(keys_file):  # a PEFT adapter relex saved: its file keys drop the adapter name
        rename = read_json(keys_file)
        if not isinstance(rename, dict) or any(not isinstance(v, str) for v in rename.values()):
            raise RelexInputError(f"{keys_file} is not a mapping of parameter names to adapter keys; it was edited or "
                                  "is damaged: use the adapter/ directory the callback saved beside the trajectory")
        store.specs = [dataclasses.replace(sp, name=rename.get(sp.name, sp.name)) for sp in store.specs]
    missing = [s.name for s in store.specs if s.name not in src.meta]
    if missing:
        peft = any("lora_" in n for n in missing)
        raise RelexInputError(
            f"the base {base} has no tensor {missing[0]}: it is not the model of this trajectory"
            + ("; for a LoRA trajectory pass the adapter/ directory the callback saved beside it (--base "
               f"{os.path.join(trajectory_dir, 'adapter')})" if peft else "")
        )
    base_theta0(src, base, store.specs, lambda spec: fingerprint(store.theta0_of(spec)), "the trajectory's",
                "pass the checkpoint training started from")
    if not os.path.isfile(keys_file):  # a PEFT adapter base holds the adapter only (its keys are all tracked)
        src = untracked_at_tcut(store, trajectory_dir, src, base, o.untracked_from, o.untracked_frozen)
    elif o.untracked_from is not None:
        raise RelexInputError("--untracked-from applies to a full model's trajectory; a LoRA trajectory's base is "
                              "the adapter/ directory the callback saved beside it")
    check_free_space(out_dir, {f"{len(settings.horizons)} horizon(s) of the base's size":
                               len(settings.horizons) * DirectorySource(base).weights_bytes,
                               "the state file": rank * store.D * store.dtype.itemsize})
    logger.warning("relex: extrapolating a trajectory of %d steps (%s..%d) from %s", store.num_rows, store.steps[0],
                   tcut, trajectory_dir)
    window = dataclasses.replace(settings, rank=rank, fit_start=fit_start, solver=o.solver, overwrite=o.overwrite,
                                 fit=o.fit, fit_window=o.fit_window, degree=o.degree)
    notices = []
    clock = _trajectory_clock(store, trajectory_dir, tcut, settings.horizons, o.fit_clock, o.schedule, notices)
    result = finalize(BufferedSolve(store, clock=clock), FullModelWriter(src, max_shard_size=settings.max_shard_size),
                      window, out_dir=out_dir,
                      report_extra={"trajectory": os.path.abspath(trajectory_dir), "partial": True})
    for text in notices:  # after the outputs: a refusal on the way is the command's only line
        logger.warning("%s", text)
    return result


def _trajectory_clock(store, trajectory_dir, tcut, horizons, fit_clock, schedule, notices):
    """The clock of a saved trajectory: ``--schedule`` when given; else the learning rates the callback recorded
    with a window it kept (``partial_trajectory/``: the trainer's schedule read ahead, so the fit is the one the
    callback would have made); else the step, with the warning :func:`offline_clock` gives."""
    recorded = store.window.get("learning_rates")
    if fit_clock != "lr" or schedule or not isinstance(recorded, list) or not recorded:
        return offline_clock([], tcut, horizons, fit_clock, schedule, notices=notices)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in recorded):
        raise RelexInputError(f"{trajectory_dir}: the learning rates recorded with the trajectory are not numbers; the "
                              "file was edited or is damaged: pass --schedule (the run's lr schedule) or "
                              "--fit-clock steps")
    source = str(store.window.get("lr_source") or "recorded with the trajectory")
    clock, _why = resolve(recorded, tcut, horizons, source)
    return clock


def _check_fit_window(fit_window, steps, fit_start):
    """``fit_window`` against the steps a saved trajectory or a set of checkpoints actually has."""
    if fit_window is None:
        return
    n = len([t for t in steps if fit_start is None or t >= fit_start])
    if isinstance(fit_window, bool) or not isinstance(fit_window, int) or not 2 <= fit_window <= n:
        raise RelexInputError(f"--fit-window {fit_window} must be between 2 and the {n} steps the fit can use "
                              f"({list(steps)}{f' from {fit_start}' if fit_start is not None else ''})")


def extrapolate_checkpoints(base: str, checkpoints: Sequence[str], horizons, out_dir: str, *,
                            steps: Optional[Sequence[int]] = None, stride: int = DEFAULTS["stride"],
                            fit_start: Optional[int] = DEFAULTS["fit_start"], rank: int = DEFAULTS["rank"],
                            dtype: str = DEFAULTS["dtype"], device: str = "cpu", storage: str = DEFAULTS["storage"],
                            solver: str = DEFAULTS["solver"], max_shard_size=DEFAULTS["max_shard_size"],
                            overwrite: bool = DEFAULTS["overwrite"], progress: bool = False, timing: bool = False,
                            streaming: Optional[bool] = None, memory_budget: Optional[int] = None,
                            fit: str = DEFAULTS["fit"], fit_window: Optional[int] = DEFAULTS["fit_window"],
                            degree: int = DEFAULTS["degree"], run_check: bool = True,
                            fit_clock: str = DEFAULTS["fit_clock"], schedule: Optional[str] = None):
    """RELEX over checkpoints saved on disk (a run without the callback, or verl's): what ``relex extrapolate`` runs.

    Args:
        base (`str`): theta_0, the checkpoint training started from (step 0).
        checkpoints (`list[str]`): checkpoint directories (``checkpoint-N``, ``global_step_N``, ``step_N``,
            ``step-N``), or one parent directory holding them. The last one (by step) is tcut.
        horizons (`list[int]` or `str`): steps to write, each beyond the last checkpoint's step.
        out_dir (`str`): where ``step-H/``, ``relex_state.safetensors`` and ``report.json`` go.
        steps (`list[int]`, *optional*): step numbers of ``checkpoints`` in the order given (default: their names).
        stride, fit_start, rank, dtype, solver, max_shard_size, overwrite: as in :class:`~relex_callback.RelexCallback`.
        device (`str`, *optional*, defaults to `"cpu"`): ``cpu`` or ``cuda``. storage: the buffer tier.
        streaming (`bool`, *optional*): read the checkpoints tensor by tensor
            (:mod:`relex_callback.pipeline.streamed`: no ``[T, D]`` buffer, float32/float64 arithmetic on the exact
            deltas, memory bounded by ``memory_budget``) instead of filling the trajectory buffer. Default
            (``None``): streaming on the CPU with the default ``storage`` and a Gram solver (``auto`` or ``gram``);
            the buffer otherwise (``--device cuda``, an explicit ``storage``, ``solver="power"``). With streaming,
            ``dtype`` is the dtype of the directions kept in the state file (the horizons are written from them).
        memory_budget (`int`, *optional*, defaults to 256 MiB): with streaming, the bytes of a float32 block
            (tensors whose ``T + 1`` rows fit are read once, larger ones twice in column chunks). Where the process
            may run on two CPUs or more, two blocks are in memory: the next one is read on a thread while the solve
            uses the other (``RELEX_READ_AHEAD=0`` in the environment reads each block when it is needed, one block
            in memory; ``=1`` reads ahead whatever the CPUs).
        run_check (`bool`, *optional*, defaults to `True`): refuse checkpoints that are not one run started from
            ``base`` (:mod:`relex_callback.offline.belongs`: copies, never-trained tensors that differ from the base,
            a first checkpoint farther from the base than the run's steps can reach), from sampled elements.
        fit_clock (`str`, *optional*, defaults to `"lr"`): ``"lr"``: fit on the cumulative learning rate
            (:mod:`relex_callback.core.clock`) of ``schedule``, else of the ``learning_rate`` log in the run's
            ``trainer_state.json`` when it reaches the last horizon; otherwise (and with ``"steps"``) on the step.
        schedule (`str`, *optional*): the run's schedule, ``NAME[,warmup=W][,total=N][,KEY=VALUE...]``
            (:func:`relex_callback.offline.schedule.parse_schedule`).

    Returns:
        ``(solution, report)``. Every input mistake raises :class:`~relex_callback.errors.RelexInputError` before
        anything is written.
    """
    options = OfflineOptions.of(locals())
    with writing(out_dir, "relex extrapolate"):  # the output directory's lock, from before the first byte
        return _extrapolate_checkpoints(base, checkpoints, horizons, out_dir, options)


def _extrapolate_checkpoints(base, checkpoints, horizons, out_dir, o: OfflineOptions):
    t_main = time.perf_counter()
    cks, tcut, settings, streaming = _check_checkpoint_args(base, checkpoints, horizons, out_dir, o)
    src_base, names, sources, specs = _open_checkpoints(base, cks)
    if o.run_check:
        check_belongs(base, src_base, cks, sources, names)  # before any heavy work
    else:
        logger.warning("relex: --no-run-check: the checkpoints are not checked to be one run started from %s", base)
    out = os.path.abspath(out_dir)
    _check_space(out, src_base, names, settings, streaming=streaming, rank=o.rank)
    notices = []
    clock = offline_clock([c.path for c in cks], tcut, settings.horizons, o.fit_clock, o.schedule, notices=notices)
    # the window as the pipeline sees it: tcut is the last checkpoint's step, the fit as asked (checked above)
    window = dataclasses.replace(settings, tcut=tcut, rank=o.rank, fit_start=o.fit_start, overwrite=o.overwrite,
                                 fit=o.fit, fit_window=o.fit_window, degree=o.degree)
    job = _Job(base=base, cks=cks, src_base=src_base, sources=sources, names=names, specs=specs, out=out, options=o,
               t_main=t_main, clock=clock)
    result = (_extrapolate_streamed if streaming else _extrapolate_buffered)(job, settings, window)
    for text in notices:  # after the outputs: a refusal on the way is the command's only line
        logger.warning("%s", text)
    return result


def _check_checkpoint_args(base, checkpoints, horizons, out_dir, o: OfflineOptions):
    """Check extrapolate_checkpoints' arguments against the checkpoints found; return (cks, tcut, settings,
    streaming)."""
    device, storage, solver, fit, fit_window, degree = o.device, o.storage, o.solver, o.fit, o.fit_window, o.degree
    fit_start, rank, streaming = o.fit_start, o.rank, o.streaming
    if device not in ("cpu", "cuda"):
        raise RelexInputError(f"--device {device!r} is not one of ['cpu', 'cuda']")
    cks = discover_checkpoints(checkpoints, o.steps, o.stride)
    same_directories(cks)
    tcut = cks[-1].step
    obs = [c.step for c in cks]
    early = [h for h in parse_horizons(horizons) if h <= tcut]
    if early:
        raise RelexInputError(f"--horizons {','.join(map(str, early))} not beyond the last checkpoint's step {tcut}: "
                              f"extrapolation writes steps after it; use horizons > {tcut} (the paper uses 5-10x the "
                              "last step)")
    # The steps need not be every stride-th step, so settings are validated with stride 1 and the checks that depend
    # on the actual steps are done here.
    settings = RelexSettings.validate(tcut=max(tcut, 2), horizons=horizons, stride=1, rank=1, storage=storage,
                                      dtype=o.dtype, solver=solver, max_shard_size=o.max_shard_size, fit=fit,
                                      degree=degree)
    _check_fit_window(fit_window, obs, fit_start)
    if fit == "polynomial" and degree >= min(len(obs), fit_window or len(obs)):
        raise RelexInputError(f"--degree {degree} needs more than {degree} fitted checkpoints; there are "
                              f"{min(len(obs), fit_window or len(obs))}")
    if fit_start is not None:
        n_fit = len([s for s in obs if s >= fit_start])
        if fit_start < 0 or n_fit < 2:
            raise RelexInputError(f"--fit-start {fit_start} leaves {n_fit} of the steps {obs} to fit; the line needs "
                                  "2: "
                                  f"use --fit-start <= {obs[-2]}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > len(obs):
        raise RelexInputError(f"--rank {rank} must be between 1 and the number of checkpoints ({len(obs)})")
    if solver == "power" and rank > 1:
        raise RelexInputError(f"--solver power computes rank 1 only; use --solver gram or auto for --rank {rank}")
    _check_out(out_dir, o.overwrite)
    if device == "cuda" and not torch.cuda.is_available():
        raise RelexInputError("--device cuda but no CUDA device is visible; use --device cpu")
    plain_line = fit == "linear" and fit_window is None
    if streaming is None:
        streaming = device == "cpu" and storage == "auto" and solver in ("auto", "gram") and plain_line
    elif streaming and (device != "cpu" or solver == "power"):
        raise RelexInputError("--streaming reads and solves on the CPU with the Gram solver; drop --device cuda / "
                              "--solver power, or pass --no-streaming")
    elif streaming and not plain_line:
        raise RelexInputError("--streaming fits the line (the state is written group by group, before a fit family "
                              "could be chosen over every tensor); drop --fit/--fit-window, or pass --no-streaming")
    return cks, tcut, settings, streaming


def _check_space(out: str, src_base, names, settings, *, streaming: bool, rank: int):
    """The plan's bytes against ``out``'s free space, before the first write: each horizon a copy of the base's
    weights, the state file (``rank`` directions per tensor in the state's dtype), and with streaming its parts
    beside ``out`` until they are joined."""
    D = sum(math.prod(src_base.meta[n][0]) for n in names)
    state = rank * D * torch.empty((), dtype=settings.torch_dtype).element_size()
    parts = {f"{len(settings.horizons)} horizon(s) of the base's size": len(settings.horizons) * src_base.weights_bytes,
             "the state file": state}
    if streaming:
        parts["its parts until joined"] = state
    check_free_space(out, parts)


def _open_checkpoints(base, cks):
    """Open the base and every checkpoint, check they hold the same tensors; return (src_base, names, sources,
    specs)."""
    src_base = DirectorySource(base)
    names = [k for k in src_base.keys if src_base.meta[k][1].is_floating_point]
    if not names:
        raise RelexInputError(f"{base} has no floating-point tensors to track")
    # DirectorySource has opened every safetensors file (safetensors refuses one its header does not cover whole)
    sources = []
    for ck in cks:
        src = DirectorySource(ck.weights)
        check_same_tensors(src_base, names, ck, src)
        sources.append(src)
    specs = [TensorSpec(name=n, shape=src_base.meta[n][0], dtype=src_base.meta[n][1],
                        local_numel=math.prod(src_base.meta[n][0])) for n in names]
    return src_base, names, sources, specs


def _extrapolate_streamed(job: _Job, settings, window):
    """Solve and write tensor group by tensor group straight from the checkpoints (no trajectory buffer)."""
    o, base, cks = job.options, job.base, job.cks
    t_checked = time.perf_counter()
    streamed = StreamedSolve(src_base=job.src_base, sources=job.sources, cks=cks, names=job.names,
                             dtype=settings.torch_dtype, max_shard_size=settings.max_shard_size, rank=o.rank,
                             memory_budget=o.memory_budget or DEFAULT_MEMORY_BUDGET, progress=o.progress,
                             clock=job.clock)
    sol, report = finalize(streamed, streamed.writer, window, out_dir=job.out, base_hint=os.path.abspath(base),
                           report_extra={"base": os.path.abspath(base), "checkpoints_read": [c.path for c in cks]})
    phases = streamed.timings()
    if o.timing:
        print(f"relex: timing: header checks {t_checked - job.t_main:.2f} s, streaming "
              f"{time.perf_counter() - t_checked:.2f} s ({', '.join(f'{k} {v}' for k, v in phases.items())}); "
              f"peak RSS {_peak_rss() / 1e9:.2f} GB", file=sys.stderr)
    return sol, report


def _extrapolate_buffered(job: _Job, settings, window):
    """Read every checkpoint into a scratch trajectory buffer, solve and write it, remove the scratch."""
    base, cks, src_base, sources, names, specs, out = (job.base, job.cks, job.src_base, job.sources, job.names,
                                                       job.specs, job.out)
    o = job.options
    device, progress, timing, t_main, clock = o.device, o.progress, o.timing, job.t_main, job.clock
    scratch = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.trajectory-{os.getpid()}")
    t_checked = time.perf_counter()
    store = TrajectoryStore(specs, len(cks), dtype=settings.dtype, storage=settings.storage,
                            device=torch.device(device), directory=scratch, prefault=False, skip_unchanged=False)
    try:
        store.set_theta0(read_tensors(src_base, names, device))
        bar = _progress(len(cks), not progress)
        for ck, src in zip(cks, sources):
            bar.set_postfix_str(os.path.basename(os.path.normpath(ck.path)))
            try:
                store.snapshot(ck.step, read_tensors(src, names, device))
            except RelexNonFiniteError as e:
                bar.close()
                nonfinite_base(src_base, base, names)  # a NaN in theta_0 is the base's, not this checkpoint's
                raise RelexInputError(f"{ck.path}: {e}; leave this checkpoint (and later ones) out of "
                                      "--checkpoints") from None
            bar.update(1)
        bar.close()
        t_read = time.perf_counter()
        rss_read = _peak_rss()
        # theta_0 is the base checkpoint itself: free the in-memory copy before the solve (peak memory) and let the
        # writer read it back tensor by tensor from the page cache
        store.theta0 = None
        base_mapped = MappedSource(src_base)
        try:
            writer = FullModelWriter(src_base, theta0_of=lambda i: base_mapped.get(specs[i].name).reshape(-1),
                                     max_shard_size=settings.max_shard_size)
            sol, report = finalize(
                BufferedSolve(store, release_buffer=True, clock=clock), writer, window, out_dir=out,
                report_extra={"base": os.path.abspath(base), "checkpoints_read": [c.path for c in cks]},
            )
        finally:
            base_mapped.close()
    finally:
        store.release()
        if os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
    if timing:
        t_end = time.perf_counter()
        print(f"relex: timing: header checks {t_checked - t_main:.2f} s, read+snapshot {t_read - t_checked:.2f} s, "
              f"solve+write {t_end - t_read:.2f} s; peak RSS after reading {rss_read / 1e9:.2f} GB, at the end "
              f"{_peak_rss() / 1e9:.2f} GB", file=sys.stderr)
    return sol, report


def _peak_rss() -> int:
    import resource  # POSIX only: imported where the timing asks for it

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    return tqdm(total=total, desc="relex: reading checkpoints", unit="ckpt", file=sys.stderr, dynamic_ncols=True)


__all__ = ["extrapolate_checkpoints", "extrapolate_trajectory", "materialize", "base_theta0"]
