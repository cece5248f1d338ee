"""The end of a window, one pipeline for every caller and every output form:

    checks -> solve -> state file -> each horizon -> report.json

The callback (single process, DDP / ZeRO / FSDP2, PEFT) and the CLI (``relex extrapolate``) both call
:func:`finalize`; what differs is the :class:`~relex_callback.files.writers.CheckpointWriter` they pass. Order matters for
failures: every check that needs no work runs first (outputs free, a window of at least two steps); the state file
is written before any horizon, so a failure while writing a horizon (disk full) leaves the state from which
``relex materialize`` finishes the job. Any failed write is one :class:`~relex_callback.errors.RelexWriteError`
saying what failed, what is intact and how to finish, on every process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

from ..errors import RelexInputError, RelexWriteError
from ..files.fs import check_outputs_free, horizon_dir
from ..files.report import REPORT_NAME, build_report, write_report
from ..core.solver import solve
from ..files.writers import CheckpointWriter, WriteFailed

logger = logging.getLogger("relex_callback")


def check_window(store, skipped_nonfinite: Sequence[int] = (), *, fit: str = "linear", degree: int = 2,
                 fit_start: Optional[int] = None, fit_window: Optional[int] = None):
    """Enough recorded steps for the fit (2 for a line, 3 for ``power``, ``degree + 1`` for ``polynomial``, after
    ``fit_start`` and ``fit_window``); said before anything is written, with why steps are missing (steps whose weights
    did not move, non-finite steps skipped)."""
    n = len([t for t in store.steps if fit_start is None or t >= fit_start])
    need = max({"power": 3, "polynomial": int(degree) + 1}.get(fit, 2), int(fit_window or 0))
    if store.num_rows >= 2 and n >= need:
        return
    why = []
    unchanged = list(getattr(store, "skipped_unchanged_steps", []) or [])
    if unchanged:
        why.append(
            f"the weights did not move at step(s) {unchanged} (not recorded: a zero gradient - in GRPO, every group of "
            "the batch had the same reward, so no advantage - or a step skipped by the loss scaler); give the window "
            "steps that learn: a larger tcut, more generations per prompt or a higher temperature (groups with reward "
            "variance), or a task the model partly solves")
    if skipped_nonfinite:
        why.append(f"step(s) {list(skipped_nonfinite)} had non-finite weights and were skipped (on_nonfinite='skip'): "
                   "the run diverged; lower the learning rate or start from an earlier checkpoint")
    if store.num_rows < 2:
        head = f"only {store.num_rows} step(s) of the window were recorded ({store.steps}); a line needs at least 2"
    else:
        head = (f"fit={fit!r}{f' with fit_window={fit_window}' if fit_window else ''} needs at least {need} fitted "
                f"steps, but the window recorded {store.num_rows} ({store.steps}) of which {n} can be fitted "
                f"(fit_start={fit_start}); fit 'linear' or 'log' over 2 or more steps instead")
    raise RelexInputError(head + (": " + "; ".join(why) if why else ""))


def check_horizons_fit(sol, horizons: Sequence[int]):
    """Refuse, before anything is written, horizons at which ``|a H + b| max|v|`` would overflow a tensor's dtype
    (half its largest value, leaving room for theta_0): found after the state file and a first horizon otherwise."""
    import math

    import torch

    bad: dict[int, list[str]] = {}
    coefs = {h: sol.coef_at(h).abs() for h in horizons}
    for i, spec in enumerate(sol.specs):
        v = sol.direction(i)
        if v.numel() == 0:
            continue
        vmax = v.abs().amax(dim=1).double().cpu()
        limit = torch.finfo(spec.dtype).max / 2
        for h in horizons:
            bound = float((coefs[h][i].cpu() * vmax).sum())
            if not math.isfinite(bound) or bound > limit:
                bad.setdefault(h, []).append(spec.name)
    if bad:
        first = min(bad)
        raise RelexInputError(
            f"horizons {sorted(bad)} would overflow the parameters' dtype (e.g. {bad[first][:3]} at step {first}: "
            f"|a H + b| * max|v| beyond half the dtype's largest value); nothing was written. Use horizons below "
            f"{first}, or check the run: coefficients this large mean the trajectory diverged"
        )


def finalize(
    store,
    writer: CheckpointWriter,
    *,
    tcut: int,
    horizons: Sequence[int],
    out_dir: str,
    rank: int = 1,
    fit_start: Optional[int] = None,
    method: str = "auto",
    overwrite: bool = False,
    reduce=None,
    release_buffer: bool = False,
    kept: Optional[str] = None,
    report_extra: Optional[dict] = None,
    fit: str = "linear",
    fit_window: Optional[int] = None,
    degree: int = 2,
    backtest=True,
    skip_horizons: Optional[str] = None,
):
    """Solve ``store`` and write the state file, every horizon and ``report.json`` into ``out_dir`` with ``writer``.
    Returns ``(solution, report)``; in a distributed run every process calls it (the solution covers this
    process's pieces, the report every tensor).

    Args:
        store (`TrajectoryStore`): the recorded window (folded or not).
        writer (`CheckpointWriter`): the output form.
        tcut (`int`), horizons (`list[int]`), out_dir (`str`), rank (`int`: the SVD rank), fit_start, method: as
            in :class:`~relex_callback.RelexCallback`.
        reduce (`Callable`, *optional*): sums the stacked Grams over processes (sharded runs).
        release_buffer (`bool`, *optional*, defaults to `False`): free the buffer right after the solve (the writers
            need only theta_0 and the directions): lowers the CLI's peak memory.
        kept (`str`, *optional*): where the recorded window survives if even the state file cannot be written
            (named in the error).
        fit (`str`), fit_window (`int`), degree (`int`): the coefficient curve (:func:`relex_callback.core.fit.fit`);
            ``"auto"`` chooses it by the backtest (per tensor when each process solves its own tensors).
        backtest (`bool`, `int` or `float`, *optional*, defaults to `True`): the in-window backtest's first part
            (:func:`relex_callback.core.backtest.resolve_fit_rows`); ``None`` switches it off.
        skip_horizons (`str`, *optional*): write the state file and the report but no horizon, for this reason
            (recorded in the report).
    """
    horizons = [int(h) for h in horizons]
    check_outputs_free(out_dir, horizons, overwrite)
    check_window(store, (report_extra or {}).get("skipped_nonfinite_steps") or (), fit=fit, degree=degree,
                 fit_start=fit_start, fit_window=fit_window)
    if writer.is_coordinator:
        os.makedirs(out_dir, exist_ok=True)
    writer.barrier()
    t0 = time.perf_counter()
    inputs = store.solve_inputs()
    topo = getattr(writer, "topo", None)
    sol = solve(specs=store.specs, rank=rank, fit_start=fit_start, method=method, reduce=reduce, **inputs,
                backtest=backtest, fit=fit, fit_window=fit_window, degree=degree,
                per_tensor_fit=topo is not None and not topo.sharded)
    del inputs  # a view of the buffer: it must not keep the buffer alive through the writes
    t_solve = time.perf_counter() - t0
    buffer_bytes, storage = store.buffer_bytes, store.storage
    error = None
    try:
        check_horizons_fit(sol, [] if skip_horizons else horizons)
    except RelexInputError as e:
        error = e
    writer.agree(error)  # every process refuses alike (each checked its own pieces)
    t1 = time.perf_counter()
    writer.bind(sol, store)
    t_bind = time.perf_counter() - t1
    if release_buffer:
        store.release()
    t2 = time.perf_counter()
    try:
        state_path = writer.write_state(out_dir, tcut)
    except WriteFailed as e:
        where = f"the recorded window is kept in {kept}" if kept else "the recorded window was not saved"
        raise RelexWriteError(
            f"writing the state file in {out_dir} failed: {e}; no horizon was written and nothing exists under the "
            f"final names; {where}. Free space (or fix permissions) and run again"
        ) from e.__cause__
    written = []
    for h in ([] if skip_horizons else horizons):
        try:
            written.append(writer.write_horizon(out_dir, h, tcut, overwrite))
        except WriteFailed as e:
            done = f" ({', '.join(written)} were written whole)" if written else ""
            raise RelexWriteError(
                f"writing {horizon_dir(out_dir, h)} failed: {e}; the partial temporary was removed and nothing exists "
                f"under the final name{done}; the state file {state_path} is intact: free space (or fix permissions) "
                f"and write the remaining horizons with `relex materialize --state {state_path} --base <the model "
                f"training started from> --horizons {','.join(str(x) for x in horizons[len(written):])} --out {out_dir}`"
            ) from e.__cause__
    t_write = time.perf_counter() - t2
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
    }
    if skip_horizons:
        extra["horizons_skipped"] = skip_horizons
    if topo is not None:
        per_process = topo.gather_objects(store.buffer_bytes if not release_buffer else buffer_bytes)
        extra.update(buffer_bytes_per_rank=per_process, distributed={"mode": topo.mode, "world_size": topo.world},
                     gather_seconds=round(t_bind, 6))
    extra.update(report_extra or {})
    report = build_report(writer.report_solution(sol), tcut=tcut, horizons=horizons, extra=extra)
    error = None
    if writer.is_coordinator:
        try:
            write_report(os.path.join(out_dir, REPORT_NAME), report)
        except Exception as e:
            error = e
    try:
        writer.agree(error)
    except WriteFailed as e:
        raise RelexWriteError(
            f"writing {os.path.join(out_dir, REPORT_NAME)} failed: {e}; the state file and the checkpoints "
            f"{', '.join(written)} are whole (only the report is missing): free space and rerun into another directory"
        ) from e.__cause__
    writer.barrier()
    logger.info("relex: solved %d tensors in %.2fs (%s), wrote %d checkpoint(s) in %.2fs to %s",
                len(sol.specs), t_solve, sol.method, len(written), t_write, out_dir)
    return sol, report
