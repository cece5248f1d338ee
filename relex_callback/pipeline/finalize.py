"""The end of a window, one pipeline for every caller and every output form:

    checks -> solve -> state file -> report.json -> each horizon -> report.json (final)

The callback (single process, DDP / ZeRO / FSDP2, PEFT) and the CLI (``relex extrapolate``) both call
:func:`finalize`; what differs is the solve strategy (:class:`BufferedSolve` over a store's arena, or
:class:`~relex_callback.pipeline.streamed.StreamedSolve` tensor-major from memory-mapped checkpoints) and the
:class:`~relex_callback.files.writers.CheckpointWriter` they pass. Order matters for
failures: every check that needs no work runs first (outputs free, a window of at least two steps); the state file
is written before any horizon, so a failure while writing a horizon (disk full) leaves the state from which
``relex materialize`` finishes the job, and so is ``report.json`` (the trust signals; rewritten whole with the
horizons' list at the end). Every failure message lists each output with its state. Any failed write is one
:class:`~relex_callback.errors.RelexWriteError` saying what failed, what is intact and how to finish, on every
process.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from ..errors import RelexInputError, RelexWriteError
from ..files.fs import check_outputs_free, horizon_dir
from ..files.report import REPORT_NAME, build_report, write_report
from ..core import kernels
from ..core.solver import Solution, SolveOptions, solve
from ..files.writers import CheckpointWriter, WriteFailed
from ..trajectory.store import TrajectoryStore

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


@runtime_checkable
class SolveStrategy(Protocol):
    """What :func:`finalize` asks of a solve strategy, in the order it asks it: :class:`BufferedSolve` (a store's
    arena in memory) and :class:`~relex_callback.pipeline.streamed.StreamedSolve` (tensor-major from memory-mapped
    checkpoints) are the two. The writer is the output form; the strategy decides what the writer is bound to."""

    run_id: Optional[str]  # the window's id: recorded in the state file and every step-H/ marker

    def check(self, settings) -> None:
        """Refuse the window before anything is written (too few steps for the fit, a budget that holds nothing)."""

    def prepare(self, out_dir: str, writer: CheckpointWriter) -> None:
        """Make room for the outputs: the output directory, or a scratch directory beside it."""

    def solve(self, settings, writer: CheckpointWriter, horizons: Sequence[int]) -> Solution:
        """The window's solution; horizons that would overflow a tensor's dtype refused (on every process)."""

    def bind(self, writer: CheckpointWriter, sol: Solution) -> None:
        """Hand the solution (and whatever theta_0 comes from) to the writer, before the state file is written."""

    def report_extra(self, writer: CheckpointWriter) -> dict:
        """The strategy's entries of ``report.json`` (buffer, storage, folds, or the streaming figures)."""

    def distributed_extra(self, writer: CheckpointWriter, t_bind: float) -> dict:
        """The entries of ``report.json`` a distributed run adds (empty on one process)."""

    def close(self) -> None:
        """Release what the solve holds (files, memory); called whether or not the window succeeded."""


class BufferedSolve:
    """The solve strategy over a store's arena in memory (the callback; ``relex extrapolate --no-streaming`` and
    ``--trajectory``): one :func:`~relex_callback.core.solver.solve` over every tensor, then the writer writes the
    state and each horizon from the solution and the store's theta_0.

    Args:
        store (`TrajectoryStore`): the recorded window (folded or not).
        reduce (`Callable`, *optional*): sums the stacked Grams over processes (sharded runs).
        release_buffer (`bool`, *optional*, defaults to `False`): free the buffer right after the solve (the writers
            need only theta_0 and the directions): lowers the CLI's peak memory.
        backtest (`bool`, `int` or `float`, *optional*, defaults to `True`): the in-window backtest's first part
            (:func:`relex_callback.core.backtest.resolve_fit_rows`); ``None`` switches it off.
        skipped_nonfinite (`list[int]`, *optional*): steps dropped as non-finite (named when too few remain).
        clock (`Clock`, *optional*): the lr clock (:mod:`relex_callback.core.clock`); ``None``: the step.
    """

    def __init__(self, store, *, reduce=None, release_buffer: bool = False, backtest=True,
                 skipped_nonfinite: Sequence[int] = (), clock=None):
        self.store, self.reduce, self.release_buffer, self.backtest = store, reduce, release_buffer, backtest
        self.clock = clock  # relex_callback.core.clock.Clock: fit on the lr clock; None: on the step
        self.skipped_nonfinite = list(skipped_nonfinite)
        self.buffer_bytes = self.storage = None

    @property
    def run_id(self):
        """The window's id (the store's): recorded in the state file and every ``step-H/`` marker."""
        return getattr(self.store, "run_id", None)

    def check(self, settings):
        check_window(self.store, self.skipped_nonfinite, fit=settings.fit, degree=settings.degree,
                     fit_start=settings.fit_start, fit_window=settings.fit_window)

    def prepare(self, out_dir: str, writer: CheckpointWriter):
        if writer.is_coordinator:
            os.makedirs(out_dir, exist_ok=True)
        writer.barrier()

    def solve(self, settings, writer: CheckpointWriter, horizons: Sequence[int]):
        """The solution, and every process's verdict on the horizons (no dtype overflow) agreed."""
        inputs = self.store.solve_inputs()
        topo = getattr(writer, "topo", None)
        try:
            options = SolveOptions(rank=settings.rank, fit_start=settings.fit_start, method=settings.solver,
                                   backtest=self.backtest, fit=settings.fit, fit_window=settings.fit_window,
                                   degree=settings.degree, per_tensor_fit=topo is not None and not topo.sharded,
                                   clock=self.clock)
            sol = solve(specs=self.store.specs, options=options, reduce=self.reduce, **inputs,
                        compute_device=self.store.compute_device)
        except Exception as e:  # every process learns it (the others would wait for this one in the next collective)
            inputs = None
            if topo is not None:
                writer.agree(e)
            raise
        inputs = None  # a view of the buffer: it must not keep the buffer alive through the writes
        self.buffer_bytes, self.storage = self.store.buffer_bytes, self.store.storage
        error = None
        try:
            check_horizons_fit(sol, horizons)
        except RelexInputError as e:
            error = e
        writer.agree(error)  # every process refuses alike (each checked its own pieces)
        return sol

    def bind(self, writer: CheckpointWriter, sol):
        writer.bind(sol, self.store)
        if self.release_buffer:
            self.store.release()

    def report_extra(self, writer: CheckpointWriter) -> dict:
        store = self.store
        return {
            "buffer_bytes": self.buffer_bytes,
            "buffer_rows": getattr(store, "rows_allocated", None),
            "fold_rank": getattr(store, "fold_rank", None),
            "folds": getattr(store, "folds", 0),
            "buffer_dtype": str(store.dtype).replace("torch.", ""),
            "storage": self.storage,
            # Triton kernels this process replaced by their torch references (at the probe or inside this solve)
            "kernels_replaced": {f"{d} {op}": why for (d, op), why in kernels.disabled().items()},
        }

    def distributed_extra(self, writer: CheckpointWriter, t_bind: float) -> dict:
        topo = getattr(writer, "topo", None)
        if topo is None:
            return {}
        per_process = topo.gather_objects(self.store.buffer_bytes if not self.release_buffer else self.buffer_bytes)
        return dict(buffer_bytes_per_rank=per_process, distributed={"mode": topo.mode, "world_size": topo.world},
                    gather_seconds=round(t_bind, 6))

    def close(self):
        pass


def finalize(solver: Union[SolveStrategy, TrajectoryStore], writer: CheckpointWriter, settings, *, out_dir: str,
             kept: Optional[str] = None, report_extra: Optional[dict] = None, skip_horizons: Optional[str] = None,
             base_hint: str = "<the model training started from>"):
    """Solve a window and write the state file, every horizon and ``report.json`` into ``out_dir``. Returns
    ``(solution, report)``; in a distributed run every process calls it (the solution covers this process's pieces,
    the report every tensor).

    Args:
        solver (`SolveStrategy` or a `TrajectoryStore`): the solve strategy, :class:`BufferedSolve` or
            :class:`~relex_callback.pipeline.streamed.StreamedSolve` (a store is solved buffered): it checks the
            window, solves, and binds the solution to the writer.
        writer (`CheckpointWriter`): the output form (the streamed strategy brings its own).
        settings (`RelexSettings`): the window's ``tcut``, ``horizons``, ``rank``, ``fit_start``, ``solver``,
            ``overwrite``, ``fit``, ``fit_window`` and ``degree``.
        out_dir (`str`): where everything goes.
        kept (`str`, *optional*): where the recorded window survives if even the state file cannot be written
            (named in the error).
        report_extra (`dict`, *optional*): more entries for ``report.json``.
        skip_horizons (`str`, *optional*): write the state file and the report but no horizon, for this reason
            (recorded in the report).
        base_hint (`str`, *optional*): the base model as the ``relex materialize`` command in an error names it.
    """
    if not hasattr(solver, "solve"):  # a store: solved buffered
        solver = BufferedSolve(solver, skipped_nonfinite=(report_extra or {}).get("skipped_nonfinite_steps") or ())
    tcut, horizons = settings.tcut, [int(h) for h in settings.horizons]
    try:
        check_outputs_free(out_dir, horizons, settings.overwrite)
        writer.run_id = getattr(solver, "run_id", None)  # the state file and every step-H/ marker name this window
        solver.check(settings)
        solver.prepare(out_dir, writer)
        t0 = time.perf_counter()
        sol = solver.solve(settings, writer, [] if skip_horizons else horizons)
        t_solve = time.perf_counter() - t0
        t1 = time.perf_counter()
        solver.bind(writer, sol)
        t_bind = time.perf_counter() - t1
        t2 = time.perf_counter()
        state_path = _write_state(writer, out_dir, tcut, kept)
        todo = [] if skip_horizons else horizons

        def report_of(written, t_write, pending=()):
            extra = solver.report_extra(writer)
            extra.update(solve_seconds=round(t_solve, 6), write_seconds=t_write, checkpoints=list(written),
                         run_id=writer.run_id)
            if pending:
                extra["horizons_pending"] = list(pending)
            if skip_horizons:
                extra["horizons_skipped"] = skip_horizons
            extra.update(solver.distributed_extra(writer, t_bind))
            extra.update(report_extra or {})
            return build_report(writer.report_solution(sol), tcut=tcut, horizons=horizons, extra=extra)

        # the report (backtest, reward trend, drift share) before any horizon: a horizon that fails (a full disk)
        # leaves the trust signals beside the state file; rewritten whole once the horizons are there
        pending = {"state": state_path, "horizons": todo, "base_hint": base_hint}
        if todo:
            _write_report(writer, out_dir, report_of([], None, todo), [], pending)
        written = _write_horizons(writer, out_dir, todo, tcut, settings.overwrite, state_path, base_hint)
        t_write = time.perf_counter() - t2
    finally:
        solver.close()
    report = report_of(written, round(t_write, 6))
    _write_report(writer, out_dir, report, written, None if todo else pending)
    logger.info("relex: solved %d tensors in %.2fs (%s), wrote %d checkpoint(s) in %.2fs to %s",
                len(sol.specs), t_solve, sol.method, len(written), t_write, out_dir)
    return sol, report


def _write_state(writer: CheckpointWriter, out_dir: str, tcut: int, kept: Optional[str]) -> str:
    """The state file, whole, before any horizon: what ``relex materialize`` finishes from."""
    try:
        return writer.write_state(out_dir, tcut)
    except WriteFailed as e:
        where = f"the recorded window is kept in {kept}" if kept else "the recorded window was not saved"
        raise RelexWriteError(
            f"writing the state file in {out_dir} failed: {e}. In {out_dir}: the state file, {REPORT_NAME} and every "
            f"horizon were NOT written (nothing exists under their names); {where}. Free space (or fix permissions) "
            "and run again"
        ) from e.__cause__


def _write_horizons(writer: CheckpointWriter, out_dir: str, horizons: Sequence[int], tcut: int, overwrite: bool,
                    state_path: str, base_hint: str) -> list[str]:
    """Each horizon, whole or not at all; a failure says which were written and how to write the rest."""
    written = []
    for h in horizons:
        try:
            written.append(writer.write_horizon(out_dir, h, tcut, overwrite))
        except WriteFailed as e:
            rest = horizons[len(written):]
            raise RelexWriteError(
                f"writing {horizon_dir(out_dir, h)} failed: {e}. In {out_dir}: "
                f"{_outputs_line(state_path, True, written, rest)}; "
                f"free space (or fix permissions) and write the remaining horizons with `relex materialize --state "
                f"{state_path} --base {base_hint} --horizons {','.join(str(x) for x in rest)} --out {out_dir}`"
            ) from e.__cause__
    return written


def _outputs_line(state_path: str, report_ok: bool, written: Sequence[str], rest: Sequence[int]) -> str:
    """Every output of a window with its state, for a failure message."""
    parts = [f"the state file {os.path.basename(state_path)} is intact",
             f"{REPORT_NAME} is {'intact (written before the horizons)' if report_ok else 'NOT written'}"]
    if written:
        parts.append(f"{', '.join(os.path.basename(w) for w in written)} written whole")
    if rest:
        parts.append(f"{', '.join(f'step-{h}' for h in rest)} not written (nothing under their names)")
    return "; ".join(parts)


def _write_report(writer: CheckpointWriter, out_dir: str, report: dict, written: Sequence[str],
                  pending: Optional[dict]):
    """``report.json``; ``pending``: written before the horizons (the state file and the horizons still to write,
    named when it fails)."""
    error = None
    if writer.is_coordinator:
        try:
            write_report(os.path.join(out_dir, REPORT_NAME), report)
        except Exception as e:
            error = e
    try:
        writer.agree(error)
    except WriteFailed as e:
        path = os.path.join(out_dir, REPORT_NAME)
        if pending is not None:  # before any horizon: the state is whole, the report and every horizon are not
            raise RelexWriteError(
                f"writing {path} failed: {e}. In {out_dir}: "
                f"{_outputs_line(pending['state'], False, [], pending['horizons'])}; the report's trust signals "
                "(backtest, reward trend, drift share) were not saved and need the window: free space and rerun "
                f"into another directory, or write the horizons without them with `relex materialize --state "
                f"{pending['state']} --base {pending['base_hint']} --horizons "
                f"{','.join(str(h) for h in pending['horizons'])} --out {out_dir}`"
            ) from e.__cause__
        raise RelexWriteError(
            f"writing {path} failed: {e}. In {out_dir}: the state file and {', '.join(written) or 'no horizon'} are "
            f"whole; {REPORT_NAME} is the one written before the horizons (its trust signals are complete; its "
            "'checkpoints' list is empty and 'horizons_pending' names the horizons, which were written since)"
        ) from e.__cause__
    writer.barrier()
