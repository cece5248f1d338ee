"""End of a window, shared by the callback and the CLI: solve the store, write the state file, every horizon
checkpoint and ``report.json``.

Order matters for failures: the state file is written first, so a failure while writing a horizon (disk full)
leaves the state from which ``relex materialize`` finishes the job later.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence

import torch

from .errors import RelexInputError, RelexWriteError
from .report import REPORT_NAME, build_report, write_report
from .solver import solve
from .state import STATE_NAME, save_state
from .writer import parse_size, atomic_directory, clean_stale_temporaries, write_weights

logger = logging.getLogger("relex_callback")


def horizon_dir(out_dir: str, horizon: int) -> str:
    return os.path.join(out_dir, f"step-{int(horizon)}")


def check_outputs_free(out_dir: str, horizons: Sequence[int], overwrite: bool, state: bool = True):
    """Refuse, before any work, to overwrite existing results unless asked (``state=False``: only the horizons, for
    ``materialize``, which writes beside the state file it reads)."""
    if overwrite:
        return
    from .state import STATE_INDEX_NAME

    states = [os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)] if state else []
    taken = [p for p in [horizon_dir(out_dir, h) for h in horizons] + states if os.path.exists(p)]
    if taken:
        raise RelexInputError(
            f"{', '.join(taken)} already exist(s); choose another output directory, remove them, or pass overwrite"
        )


def check_window(store):
    """At least two recorded steps (a line); said before anything is written."""
    if store.num_rows < 2:
        raise RelexInputError(
            f"only {store.num_rows} step(s) of the window were recorded ({store.steps}); a line needs at least 2. "
            "Non-finite steps skipped with on_nonfinite='skip' are not recorded: the run diverged; lower the learning "
            "rate or start from an earlier checkpoint"
        )


def check_before_window(store, out_dir: str, horizons: Sequence[int], overwrite: bool, max_shard_size):
    """Every check of an end of window that needs no work: free outputs, a valid shard size (a bad size must fail
    before the state file is written) and a window of at least two steps. Single-process and distributed."""
    check_outputs_free(out_dir, horizons, overwrite)
    parse_size(max_shard_size)
    check_window(store)


def solve_store(store, *, rank: int, fit_start: Optional[int], method: str, reduce=None):
    """Solve ``store`` (folded or not); returns ``(solution, seconds)``. ``reduce`` sums the Grams over ranks."""
    t0 = time.perf_counter()
    inputs = store.solve_inputs()
    # the inputs (a view of the buffer) die with this frame: they must not keep the buffer alive through the writes
    sol = solve(specs=store.specs, rank=rank, fit_start=fit_start, method=method, reduce=reduce, **inputs)
    return sol, time.perf_counter() - t0


def window_extra(store, buffer_bytes: int, storage: str, t_solve: float, t_write: float, written: list,
                 report_extra: Optional[dict] = None, **more) -> dict:
    """The report's entries about the buffer, the timings and the checkpoints (``buffer_bytes`` and ``storage``
    as they were before a release), then ``more`` (the distributed ones), then the caller's ``report_extra``."""
    extra = {
        "buffer_bytes": buffer_bytes,
        "buffer_rows": getattr(store, "rows_allocated", None),
        "fold_rank": getattr(store, "fold_rank", None),
        "folds": getattr(store, "folds", 0),
        "buffer_dtype": str(store.dtype).replace("torch.", ""),
        "storage": storage,
        "solve_seconds": round(t_solve, 6),
        "write_seconds": round(t_write, 6),
        "checkpoints": written,
        **more,
    }
    extra.update(report_extra or {})
    return extra


def write_horizon(
    out_dir: str,
    horizon: int,
    result,
    theta0_of: Callable[[int], torch.Tensor],
    source,
    *,
    overwrite: bool = False,
    max_shard_size="50GB",
) -> str:
    """Write ``out_dir/step-<horizon>`` atomically. ``result`` is a :class:`Solution` or :class:`RelexState`;
    tracked tensors are extrapolated, every other key of ``source`` is copied unchanged."""
    final = horizon_dir(out_dir, horizon)
    clean_stale_temporaries(out_dir, os.path.basename(final))
    index = {s.name: i for i, s in enumerate(result.specs)}
    missing = [n for n in index if n not in source.meta]
    if missing:
        raise RelexInputError(f"tracked tensors {missing[:3]} are not in the base model's checkpoint keys")

    def produce(key):  # write_shard refuses NaN/Inf
        i = index.get(key)
        if i is None:
            return source.get(key)
        spec = result.specs[i]
        return result.extrapolate(i, horizon, theta0_of(i)).reshape(spec.shape).to("cpu")

    meta = dict(source.meta)
    for n, i in index.items():
        meta[n] = (tuple(result.specs[i].shape), result.specs[i].dtype)
    try:
        with atomic_directory(final, overwrite=overwrite) as tmp:
            write_weights(tmp, list(source.keys), meta, produce, max_shard_size=max_shard_size)
            source.write_extras(tmp)
    except OSError as e:
        if isinstance(e, RelexWriteError):
            raise
        state = os.path.join(out_dir, STATE_NAME)
        hint = (f"the state file {state} is intact: free space (or fix permissions) and write the checkpoint with "
                f"`relex materialize` (relex_callback.engine.materialize)") if os.path.isfile(state) else \
            "free space (or fix permissions) and run again"
        raise RelexWriteError(
            f"writing {final} failed: {e.strerror or e} ({type(e).__name__}, errno {e.errno}); the partial temporary "
            f"was removed and nothing exists under the final name; {hint}"
        ) from e
    return final


def finalize(
    store,
    *,
    tcut: int,
    horizons: Sequence[int],
    out_dir: str,
    source,
    rank: int = 1,
    fit_start: Optional[int] = None,
    method: str = "auto",
    overwrite: bool = False,
    max_shard_size="50GB",
    report_extra: Optional[dict] = None,
    write_fn: Optional[Callable] = None,
    release_buffer: bool = False,
    theta0_of: Optional[Callable[[int], torch.Tensor]] = None,
):
    """Solve ``store`` and write state, horizons and report into ``out_dir``. Returns ``(solution, report)``.

    ``write_fn(horizon, solution, theta0_of) -> path`` replaces the full-checkpoint writer (the callback passes a
    PEFT adapter writer here); by default every horizon is written with :func:`write_horizon` from ``source``.
    With ``release_buffer`` the store's buffer is freed right after the solve (the writer needs only theta_0 and
    the directions), which lowers the peak memory of the CLI. ``theta0_of(i)`` (default: the store's copy) returns
    tensor i's flat theta_0; the CLI reads it from the base checkpoint."""
    check_before_window(store, out_dir, horizons, overwrite, max_shard_size)
    os.makedirs(out_dir, exist_ok=True)
    sol, t_solve = solve_store(store, rank=rank, fit_start=fit_start, method=method)
    buffer_bytes, storage = store.buffer_bytes, store.storage
    if release_buffer:
        store.release()
    if theta0_of is None:
        theta0_of = lambda i: store.theta0_of(store.specs[i])  # noqa: E731
    save_state(os.path.join(out_dir, STATE_NAME), sol, theta0_of, tcut=tcut)
    t1 = time.perf_counter()
    written = []
    for h in horizons:
        if write_fn is not None:
            written.append(write_fn(h, sol, theta0_of))
        else:
            written.append(write_horizon(out_dir, h, sol, theta0_of, source, overwrite=overwrite, max_shard_size=max_shard_size))
    t_write = time.perf_counter() - t1
    extra = window_extra(store, buffer_bytes, storage, t_solve, t_write, written, report_extra)
    report = build_report(sol, tcut=tcut, horizons=horizons, extra=extra)
    write_report(os.path.join(out_dir, REPORT_NAME), report)
    logger.info("relex: solved %d tensors in %.2fs (%s), wrote %d checkpoint(s) in %.2fs to %s",
                len(sol.specs), t_solve, sol.method, len(written), t_write, out_dir)
    return sol, report


# ------------------------------------------------------------------------- after the fact (state file, trajectory)
def base_theta0(src, base: str, specs, expected_of: Callable, whose: str, hint: str) -> dict[str, torch.Tensor]:
    """Each spec's piece of theta_0 read from the base checkpoint ``src`` (path ``base``), refused with ``hint``
    when its fingerprint differs from ``expected_of(spec)`` (``whose`` names where that came from). Returns
    ``name -> flat piece``."""
    from .state import fingerprint, fingerprint_mismatch

    thetas = {}
    for spec in specs:
        t = src.get(spec.name).reshape(-1)[spec.flat_start: spec.flat_start + spec.local_numel]
        why = fingerprint_mismatch(fingerprint(t), expected_of(spec))
        if why:
            raise RelexInputError(f"the base {base} does not match {whose} theta_0 for {spec.name} ({why}); {hint}")
        thetas[spec.name] = t
    return thetas


def materialize(state_path: str, base: str, horizons: Sequence[int], out_dir: Optional[str] = None, *,
                overwrite: bool = False, max_shard_size="50GB") -> list[str]:
    """Write ``step-H`` for each horizon from a state file and the base checkpoint (theta_0 and every untracked
    tensor): what ``relex materialize`` runs. Refuses a base whose tracked tensors do not match the fingerprints
    of theta_0 in the state. Returns the written directories."""
    from .state import load_state
    from .writer import DirectorySource

    parse_size(max_shard_size)
    st = load_state(state_path)
    hs = sorted(int(h) for h in horizons)
    if len(set(hs)) != len(hs):
        raise RelexInputError(f"horizons repeat: give each step once, e.g. {','.join(map(str, sorted(set(hs))))}")
    bad = [h for h in hs if h <= st.tcut]
    if bad:
        raise RelexInputError(f"horizons {bad} are not beyond the state's last observed step {st.tcut}; use horizons > {st.tcut}")
    src = DirectorySource(base)
    out_dir = out_dir or os.path.dirname(os.path.abspath(state_path if not os.path.isdir(state_path)
                                                         else os.path.join(state_path, STATE_NAME)))
    # every check before anything is written
    check_outputs_free(out_dir, hs, overwrite, state=False)
    for spec in st.specs:
        if spec.name not in src.meta:
            raise RelexInputError(f"the base {base} has no tensor {spec.name}: pass the base the state was computed from")
        shape, dtype = src.meta[spec.name]
        if tuple(shape) != tuple(spec.shape) or dtype != spec.dtype:
            raise RelexInputError(
                f"{spec.name}: {list(shape)} {dtype} in {base} but {list(spec.shape)} {spec.dtype} in the state; "
                "pass the base the state was computed from"
            )
    thetas = base_theta0(src, base, st.specs, lambda spec: st.info[spec.name]["theta0"], "the state's",
                         "pass the same base checkpoint given to `relex extrapolate` (or the model the callback trained)")
    return [write_horizon(out_dir, int(h), st, lambda i: thetas[st.specs[i].name], src, overwrite=overwrite,
                          max_shard_size=max_shard_size) for h in hs]


def extrapolate_trajectory(trajectory_dir: str, base: str, horizons: Sequence[int], out_dir: str, *,
                           rank: int = 1, fit_start: Optional[int] = None, method: str = "auto",
                           overwrite: bool = False, max_shard_size="50GB"):
    """Solve a saved trajectory (``<out>/partial_trajectory/`` of a run that ended before tcut, or a checkpoint's
    ``relex_trajectory/``) and write the state, the horizons and the report, as the callback would have. ``tcut``
    is the last recorded step. ``base`` is the checkpoint training started from (config, tokenizer, untracked
    tensors); it must match the trajectory's theta_0. Returns ``(solution, report)``."""
    from .buffer import TrajectoryStore
    from .config import RelexSettings
    from .state import fingerprint
    from .writer import DirectorySource

    store = TrajectoryStore.open(trajectory_dir)
    if store.num_rows < 2:
        raise RelexInputError(f"{trajectory_dir} holds {store.num_rows} recorded step(s); a line needs at least 2")
    tcut = store.steps[-1]
    RelexSettings.validate(tcut=tcut, horizons=horizons, stride=1, fit_start=fit_start, rank=min(rank, store.num_rows),
                           solver=method, allow_partial_stride=True)
    if rank > store.num_rows:
        raise RelexInputError(f"rank={rank} exceeds the {store.num_rows} recorded steps in {trajectory_dir}")
    src = DirectorySource(base)
    for spec in store.specs:
        if spec.name not in src.meta:
            raise RelexInputError(f"the base {base} has no tensor {spec.name}: it is not the model of this trajectory")
    base_theta0(src, base, store.specs, lambda spec: fingerprint(store.theta0_of(spec)), "the trajectory's",
                "pass the checkpoint training started from")
    logger.warning("relex: extrapolating a trajectory of %d steps (%s..%d) from %s", store.num_rows, store.steps[0],
                   tcut, trajectory_dir)
    return finalize(store, tcut=tcut, horizons=sorted(int(h) for h in horizons), out_dir=out_dir, source=src,
                    rank=rank, fit_start=fit_start, method=method, overwrite=overwrite, max_shard_size=max_shard_size,
                    report_extra={"trajectory": os.path.abspath(trajectory_dir), "partial": True})
