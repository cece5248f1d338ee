"""Opening a window at ``on_train_begin``, and owning the relex output directory while it is open.

:func:`open_window` gives the callback its store: a fresh one holding theta_0 at step 0, or, when training resumed
inside the window, the saved trajectory that belongs to this run and these weights (:func:`resume_record` reads the
callback's record in ``trainer_state.json``; :func:`saved_trajectory` finds a checkpoint's ``relex_trajectory/``). It
sizes the ring (the memory plan, :mod:`.plan`, for ``storage="auto"``), checks the free disk space for everything the
window will write, and in distributed runs makes every process fail together before step 1 (:func:`_together`).
:class:`~relex_callback.files.lock.OutputLock` (``.relex-lock.json``) refuses a second writer of the
same output directory: another callback, ``relex extrapolate`` or ``relex materialize``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch

from ..core import kernels
from ..errors import RelexError, RelexInputError, RelexMemoryError, RelexNonFiniteError
from ..files.fs import describe_failure, write_failure
from . import persist
from .persist import META_FILE, RUN_TRAJECTORY_DIR, TRAJECTORY_DIR
from .plan import plan_for_run
from .store import TrajectoryStore
from .tiers import _fmt, available_disk_bytes

logger = logging.getLogger("relex_callback")



# ------------------------------------------------------------------------------------------ opening a window
def saved_trajectory(candidates: Sequence[Optional[str]], topology, marker: str = META_FILE) -> Optional[str]:
    """This process's ``relex_trajectory/`` in the first checkpoint of ``candidates`` that holds ``marker``."""
    for c in candidates:
        if isinstance(c, str):
            d = topology.trajectory_dir(os.path.join(c, TRAJECTORY_DIR))
            if os.path.isfile(os.path.join(d, marker)):
                return d
    return None


def resume_record(state, out_dir: Optional[str] = None) -> Optional[dict]:
    """What the callback recorded in the resumed checkpoint's ``trainer_state.json`` (``stateful_callbacks``): run id,
    step, where its trajectory was saved. Several RelexCallbacks: the last record for ``out_dir``, else none."""
    entry = (getattr(state, "stateful_callbacks", None) or {}).get("RelexCallback")
    entries = entry if isinstance(entry, list) else [entry] if entry else []
    recs = [e.get("attributes", {}).get("relex_checkpoint") for e in entries if isinstance(e, dict)]
    recs = [r for r in recs if isinstance(r, dict)]
    if len(recs) > 1 and out_dir is not None:
        mine = [r for r in recs if r.get("out_dir") == os.path.abspath(out_dir)]
        recs = mine if mine else []
    return recs[-1] if recs else None


def _load_verified(checkpoints, expected, topology, tracked, global_step: int, load_kw: dict):
    """The first saved trajectory among ``checkpoints`` that fits: same run as ``expected`` (the record the resumed
    trainer state holds), same settings, and theta_0 + its last delta (or its fingerprints) equal to the live
    weights. Returns ``(store, directory, notes, found_any)``; ``store`` is None when none fits."""
    notes, seen, found = [], set(), False
    for c in checkpoints:
        if not isinstance(c, str):
            continue
        d = topology.trajectory_dir(os.path.join(c, TRAJECTORY_DIR))
        real = os.path.realpath(d)
        if real in seen or not os.path.isfile(os.path.join(d, META_FILE)):
            continue
        seen.add(real)
        found = True
        try:
            meta = TrajectoryStore.read_meta(d)
            want = (expected or {}).get("run_id")
            if want and meta.get("run_id") != want:
                notes.append(f"{d} was saved by RELEX run {meta.get('run_id')}, while the checkpoint training resumed "
                             f"from was written by run {want}")
                continue
            store = TrajectoryStore.load(d, **load_kw)
        except RelexInputError as e:
            notes.append(str(e))
            continue
        except Exception as e:  # a damaged trajectory (truncated files)
            notes.append(f"{d} holds a damaged RELEX trajectory ({type(e).__name__}: {e})")
            continue
        store.truncate(global_step)
        problems = store.verify_live([t.read() for t in tracked], global_step)
        if problems:
            more = f" (and {len(problems) - 3} more tensors)" if len(problems) > 3 else ""
            notes.append(f"{d} does not belong to the weights training resumed with at step {global_step}: "
                         + "; ".join(problems[:3]) + more)
            store.discard_files()
            continue
        return store, d, notes, found
    return None, None, notes, found


def disk_needs(
    store, settings, *, model_bytes: int = 0, saves_in_window: bool = True, writes_outputs: bool = True
) -> dict:
    """Bytes this window still writes under the relex output_dir, by item (the disk tier's buffer is already
    allocated by then, so it is not counted again): theta_0 and the rows the trainer checkpoints link (host/device
    tiers, when checkpoints are saved inside the window), the state file (``rank`` float32 directions per element)
    and each horizon (``model_bytes``: the checkpoint written per horizon)."""
    need = {}
    if saves_in_window and store.storage != "disk":
        if store.files.theta0_file is None:
            need["theta_0 (once, linked by the checkpoints)"] = store.theta0_bytes
        left = max(0, len(settings.steps) - store.num_rows)
        rows = min(left, store.K) + (store.fold_rank or 0) if store.fold_rank else left
        if rows:
            need[f"{rows} trajectory rows (linked by the checkpoints)"] = rows * store.D * store.dtype.itemsize
    if writes_outputs:
        need["state file"] = settings.rank * store.D * 4
        if model_bytes:
            need[f"{len(settings.horizons)} horizon checkpoint(s) of {_fmt(model_bytes)}"] = (
                len(settings.horizons) * model_bytes
            )
    return need


def check_disk_space(directory: str, need: dict, *, what_to_change: str = ""):
    """Refuse before step 1 when the file system of ``directory`` has less free space than ``need`` (bytes by item)."""
    total = sum(need.values())
    free = available_disk_bytes(directory)
    if total > free:
        items = ", ".join(f"{k}: {_fmt(v)}" for k, v in need.items())
        raise RelexMemoryError(
            f"the RELEX outputs need {_fmt(total)} in {directory} ({items}) but its file system has {_fmt(free)} free; "
            f"free {_fmt(total - free)} there, or choose an output_dir on a larger disk{what_to_change}"
        )


def _together(topology, what: str, fn, write_failures: Optional[str] = None):
    """``fn()`` on every process of the run; when it fails on any process, every process raises (its own error, or
    one naming the step another process failed at), so none goes on into a collective that the failed one never
    joins (it would wait there for the collective timeout: 30 minutes). ``write_failures``: a directory; an OS error
    writing there becomes a RelexMemoryError that says to free space."""
    err, out = None, None
    try:
        out = fn()
    except Exception as e:
        err = e
        if write_failures is not None and write_failure(e):
            err = RelexMemoryError(f"cannot write the trajectory to {write_failures}: {describe_failure(e)}; free disk "
                                   "space there or choose another output_dir")
    ok = topology.all_ok(err is None) if topology.is_distributed else err is None
    if ok:
        return out
    if out is not None and hasattr(out, "discard_files"):
        out.discard_files()
    if err is not None:
        raise err
    raise RelexMemoryError(f"relex: another process failed while {what} (its error says why); this process stops "
                           "too, before the first step")


def _join(store, topology):
    """Tie a store to the other processes of a distributed run: agreed per-step verdicts (the same steps recorded
    everywhere) and, in the sharded modes, folds through the all-reduced Grams (every process then applies the same
    rotation to its own slice of the basis: nothing of a tensor's size is ever gathered)."""
    if topology.is_distributed:
        store.consensus = topology.sum_ints
        store.reduce = topology.reduce_grams if topology.sharded else None


def open_window(settings, tracked, topology, *, out_dir: str, global_step: int, checkpoints: Sequence[Optional[str]],
                expected: Optional[dict] = None, model_bytes: int = 0, saves_in_window: bool = True,
                trainer_args=None, optimizer=None):
    """The store of a window at ``on_train_begin``: a fresh one holding theta_0 at step 0, or, when training resumed
    inside the window, the saved one that fits (see :func:`_load_verified`; ``checkpoints``: the paths the checkpoint
    may be, ``expected``: the record of the resumed trainer state), truncated to ``global_step``. Sizes the ring:
    with ``storage="auto"`` (and no ``buffer_slots``) by the memory plan
    (:func:`relex_callback.trajectory.plan.plan_for_run`, logged on process 0; ``trainer_args`` tells it about a
    colocated vLLM engine, ``optimizer`` what the first step still allocates), which folds when the exact window fits
    no tier, else by ``relex_callback.core.fold.plan_slots``; a resumed planned window keeps the buffer shape it was
    saved with. Checks the free disk space for what the window will write, and refuses what cannot work (a resume
    without a fitting trajectory, a buffer that fits nowhere) before the first step."""
    if global_step == 0:  # theta_0 is taken here: a non-finite base is the base's fault, said before step 1
        check_base_finite(tracked, topology)
    specs = [t.spec for t in tracked]
    device = tracked[0].read().device
    window = len(settings.steps)
    storage, capacity, fold_rank, planned = _size_ring(settings, specs, topology, trainer_args, device=device,
                                                       out_dir=out_dir, window=window, optimizer=optimizer)
    run_dir = topology.trajectory_dir(os.path.join(out_dir, RUN_TRAJECTORY_DIR))
    info = {"tcut": settings.tcut, "stride": settings.stride, "world": topology.world}
    common = dict(dtype=settings.dtype, storage=storage, device=device, max_bytes=settings.max_buffer_bytes,
                  fold_rank=fold_rank)
    try:
        if global_step > 0:
            store = _resume_store(
                settings, topology, tracked, global_step, checkpoints, expected,
                dict(specs=specs, capacity=capacity, run_directory=run_dir, window=info, adopt_shape=planned, **common))
        else:
            store = _fresh_store(topology, tracked, specs, capacity, run_dir, info, common)
    except Exception as e:
        if not write_failure(e):
            raise
        raise RelexMemoryError(
            f"cannot write the trajectory to {run_dir}: {describe_failure(e)}; free disk space there "
            "or choose another output_dir"
        ) from None
    try:
        _together(topology, "checking the free disk space for the RELEX outputs", lambda: check_disk_space(
            out_dir, disk_needs(store, settings, model_bytes=model_bytes, saves_in_window=saves_in_window,
                                writes_outputs=topology.process_rank == 0 or topology.sharded),
            what_to_change=", fewer horizons, or storage='host'" if store.storage == "disk" else ", or fewer horizons"))
    except RelexError:
        store.discard_files()
        raise
    # each Triton kernel once where the passes over the buffer will run (the buffer's device, or the GPU a host or
    # disk buffer goes through): one that cannot compile or launch there is replaced by its reference now, with one
    # warning, not found out at tcut
    kernels.probe(store.compute_device or store.M.device, store.dtype)
    logger.info(
        "relex: tracking %d tensors (%d elements), %d snapshot slots%s, %.1f MiB buffer on %s",
        len(specs),
        store.D,
        store.K,
        f" + {store.fold_rank} fold rows (window of {window} folded)" if store.fold_rank else "",
        store.buffer_bytes / 2**20,
        store.storage,
    )
    return store


def check_base_finite(tracked, topology):
    """Refuse a base (theta_0) that holds NaN/Inf, on every process with the same message, before anything is
    allocated or written and before step 1: each process checks its own pieces (its share of the tensors under DDP,
    its shards under ZeRO-3 / FSDP2), and ONE collective
    (:meth:`~relex_callback.trainer.topology.Topology.first_holders`) tells every process which tensors hold one and
    on which process. Without it, only the process holding the NaN could say so; the others would see a non-finite
    delta at step 1 and call it a divergence of the run."""
    flags = {}
    for t in tracked:
        if t.spec.local_numel:
            x = t.read().reshape(-1)
            # a sum is NaN/Inf iff the tensor holds one (or overflows: then the exact check, in chunks, decides);
            # ~9x faster than isfinite().all() on CPU, half a plain copy (`python bench/base_check.py`)
            flags[t.spec.name] = x.is_floating_point() and not bool(torch.isfinite(x.sum())) and not all(
                bool(torch.isfinite(c).all()) for c in x.split(1 << 22))
    bad = topology.first_holders(flags)
    if not bad:
        return
    names = [n for n in topology.names if n in bad] or sorted(bad)
    where = (lambda n: f"{n} (on process {bad[n]})") if topology.is_distributed else (lambda n: n)
    listed = ", ".join(where(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
    raise RelexNonFiniteError(
        f"relex: the weights training starts from (theta_0, the base model) already hold NaN/Inf in {len(names)} "
        f"tensor(s): {listed}; every delta from them would be non-finite, whatever the step. Stopped before step 1, "
        "nothing written; load a finite base model (or exclude those tensors)")


def _size_ring(settings, specs, topology, trainer_args, *, device, out_dir, window, optimizer=None):
    """The window's tier and ring: by the memory plan (``storage="auto"``, no ``buffer_slots``) or by ``plan_slots``;
    return (storage, capacity, fold_rank, planned)."""
    from ..core.fold import plan_slots

    # every process plans for the largest share (same slots and the same fold steps everywhere: a sharded fold is a
    # collective, and the recorded steps must agree for the final solve)
    D = sum(s.local_numel for s in specs)
    D_plan = topology.max_int(D) if topology.is_distributed else D
    storage, planned = settings.storage, settings.storage == "auto" and settings.buffer_slots is None
    if planned:  # the memory plan decides tier and slots: folds (and says so) when the exact window fits nowhere
        plan = plan_for_run(settings, specs, topology, trainer_args, elements=D_plan, device=device, out_dir=out_dir,
                            optimizer=optimizer)
        if topology.process_rank == 0:
            logger.info("%s", plan.format())

        def check_plan():
            if plan.tier is None:
                raise RelexMemoryError(f"relex: no memory tier can hold the window: {plan.reason}\n{plan.format()}")

        _together(topology, "planning its trajectory buffer", check_plan)
        storage, capacity, fold_rank = plan.tier, plan.slots, (settings.fold_rank if plan.folded else None)
        if plan.folded:
            logger.warning("relex: the exact window (%d rows) fits no memory tier; folding it: %s", window, plan.reason)
    else:
        capacity, fold_rank = plan_slots(
            window,
            D_plan,
            torch.empty((), dtype=settings.torch_dtype).element_size(),
            max_buffer_bytes=settings.max_buffer_bytes,
            buffer_slots=settings.buffer_slots,
            fold_rank=settings.fold_rank,
        )
    return storage, capacity, fold_rank, planned


def _resume_store(settings, topology, tracked, global_step, checkpoints, expected, load_kwargs):
    """A resume inside the window: the saved store that fits on every process, or a RelexInputError saying why not."""
    store, saved, notes, found = _load_verified(checkpoints, expected, topology, tracked, global_step, load_kwargs)
    ok = topology.all_ok(store is not None) if topology.is_distributed else store is not None
    if not ok:
        if store is not None:
            store.discard_files()
        where = [c for c in checkpoints if isinstance(c, str)]
        if not found and not notes:
            raise RelexInputError(
                f"training resumed at step {global_step} inside the RELEX window (tcut={settings.tcut}) but the "
                f"checkpoint has no {TRAJECTORY_DIR}/ (it was saved without RelexCallback); theta_0 is unknown. "
                f"Looked in: {', '.join(dict.fromkeys(where)) or 'no checkpoint path'}. Resume from a checkpoint "
                "written with the callback, or start from step 0"
            )
        raise RelexInputError(
            f"training resumed at step {global_step} inside the RELEX window (tcut={settings.tcut}) but no saved "
            f"trajectory fits it: {' | '.join(notes) or 'another process found none'}. Resume from the checkpoint "
            "whose relex_trajectory/ was saved with these weights, or start a new window from step 0 (another "
            "output_dir, without resume_from_checkpoint)"
        )
    store.window = load_kwargs["window"]
    _join(store, topology)
    logger.info("relex: resumed the window from %s (%d steps recorded, run %s)", saved, store.num_rows,
                store.run_id)
    return store


def _fresh_store(topology, tracked, specs, capacity, run_dir, info, common):
    """A new window: the store allocated on every process holding theta_0, one run id for the run."""
    def fresh():
        st = TrajectoryStore(specs, capacity, directory=run_dir, **common)
        try:
            st.window = info
            st.set_theta0([t.read() for t in tracked])
        except Exception:
            st.discard_files()
            raise
        return st

    store = _together(topology, f"allocating its trajectory buffer in {run_dir}", fresh, write_failures=run_dir)
    _join(store, topology)
    if topology.is_distributed:  # one id for the run: trainer_state.json (process 0's) names it for all
        store.run_id = topology.broadcast_object(store.run_id)
        if store.storage == "disk":
            _together(topology, f"writing its trajectory metadata in {run_dir}",
                      lambda: persist.write_meta(store, store.directory), write_failures=run_dir)
    return store
