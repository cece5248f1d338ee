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

from .errors import RelexInputError
from .report import REPORT_NAME, build_report, write_report
from .solver import solve
from .state import STATE_NAME, save_state
from .writer import atomic_directory, clean_stale_temporaries, write_weights

logger = logging.getLogger("relex_callback")


def horizon_dir(out_dir: str, horizon: int) -> str:
    return os.path.join(out_dir, f"step-{int(horizon)}")


def check_outputs_free(out_dir: str, horizons: Sequence[int], overwrite: bool):
    """Refuse, before any work, to overwrite existing results unless asked."""
    if overwrite:
        return
    taken = [p for p in [horizon_dir(out_dir, h) for h in horizons] + [os.path.join(out_dir, STATE_NAME)] if os.path.exists(p)]
    if taken:
        raise RelexInputError(
            f"{', '.join(taken)} already exist(s); choose another output directory, remove them, or pass overwrite"
        )


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

    def produce(key):
        i = index.get(key)
        if i is None:
            return source.get(key)
        spec = result.specs[i]
        return result.extrapolate(i, horizon, theta0_of(i)).reshape(spec.shape).to("cpu")

    meta = dict(source.meta)
    for n, i in index.items():
        meta[n] = (tuple(result.specs[i].shape), result.specs[i].dtype)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        write_weights(tmp, list(source.keys), meta, produce, max_shard_size=max_shard_size)
        source.write_extras(tmp)
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
    release_buffer: bool = False,
    theta0_of: Optional[Callable[[int], torch.Tensor]] = None,
):
    """Solve ``store`` and write state, horizons and report into ``out_dir``. Returns ``(solution, report)``.
    With ``release_buffer`` the store's buffer is freed right after the solve (the writer needs only theta_0 and
    the directions), which lowers the peak memory of the CLI. ``theta0_of(i)`` (default: the store's copy) returns
    tensor i's flat theta_0; the CLI reads it from the base checkpoint."""
    check_outputs_free(out_dir, horizons, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    sol = solve(store.rows(), store.steps, store.specs, rank=rank, fit_start=fit_start, method=method)
    t_solve = time.perf_counter() - t0
    buffer_bytes, storage = store.buffer_bytes, store.storage
    if release_buffer:
        store.release()
    if theta0_of is None:
        theta0_of = lambda i: store.theta0_of(store.specs[i])  # noqa: E731
    save_state(os.path.join(out_dir, STATE_NAME), sol, theta0_of, tcut=tcut)
    t1 = time.perf_counter()
    written = []
    for h in horizons:
        written.append(write_horizon(out_dir, h, sol, theta0_of, source, overwrite=overwrite, max_shard_size=max_shard_size))
    t_write = time.perf_counter() - t1
    extra = {
        "buffer_bytes": buffer_bytes,
        "buffer_dtype": str(store.dtype).replace("torch.", ""),
        "storage": storage,
        "solve_seconds": round(t_solve, 6),
        "write_seconds": round(t_write, 6),
        "checkpoints": written,
    }
    if report_extra:
        extra.update(report_extra)
    report = build_report(sol, tcut=tcut, horizons=horizons, extra=extra)
    write_report(os.path.join(out_dir, REPORT_NAME), report)
    logger.info("relex: solved %d tensors in %.2fs (%s), wrote %d checkpoint(s) in %.2fs to %s",
                len(sol.specs), t_solve, sol.method, len(written), t_write, out_dir)
    return sol, report
