"""Tensor-major RELEX over checkpoints on disk: what ``relex extrapolate`` runs on the CPU by default.

The buffered path (:func:`relex_callback.offline.api.extrapolate_checkpoints` with ``streaming=False``) copies every
checkpoint into one ``[T, D]`` trajectory buffer (bf16 by default) and solves it. Offline, nothing needs that buffer:
each tensor's trajectory is independent. This strategy reads, tensor by tensor, the ``T`` slices of a tensor straight
from the checkpoint files into a float32 block (:class:`relex_callback.files.streaming.FileReader`: ``os.preadv``
from the page cache into memory reused for every tensor: one copy, no page faults, no bf16 rounding), subtracts
theta_0, builds the ``T x T`` Gram (float32 products per column chunk, summed in float64), takes the top eigenpairs
and fits the lines with the solver's own math (:func:`relex_callback.core.solver._top_eigenpairs`, ``_directions``,
:func:`relex_callback.core.fit.fit_lines`), and gets the directions ``v = M^T u / sigma`` from the same block.
Tensors are grouped so that a group's block fits ``memory_budget``: such a group is read once. A tensor larger than
the budget is read in column chunks twice (Gram, then direction). Where the process may run on two CPUs or more,
the next block is read on a thread while the solve uses the current one (:class:`_Prefetch`: two blocks in memory;
the reads and the subtraction release the GIL, so the reading runs beside the Gram, eigenpairs, directions, state
part and horizons of the block before); ``RELEX_READ_AHEAD=0`` or ``1`` decides it (:func:`read_ahead`).

It is a solve strategy of the one pipeline (:func:`relex_callback.pipeline.finalize.finalize` runs
:class:`StreamedSolve` with its :class:`~relex_callback.files.streaming.StreamedWriter`), so the order, the checks
and the messages are the pipeline's:

1. every check before anything is written (outputs free, horizons that would overflow the dtype, non-finite
   checkpoints with the buffered path's message);
2. the state file: each group's :class:`~relex_callback.core.solver.Solution` is written by
   :func:`relex_callback.files.state.save_state` into a scratch part, and the parts are joined into one
   ``relex_state.safetensors`` (:func:`relex_callback.files.streaming.merge_state_parts`: headers merged, data
   copied inside the kernel) and renamed into place;
3. each horizon, as ``relex materialize`` would write it from the committed state file: ``theta_0 + (a H + b) v``
   by :func:`relex_callback.core.solver.extrapolate_piece`, assembled in a temporary directory, NaN/Inf refused,
   renamed whole after the state file, with the relex marker. Where the disk has room for every output at once, the
   horizons are begun with the solve and each group's tensors written into their shards as soon as the group is
   solved (:class:`~relex_callback.files.streaming.EarlyHorizon`: the same numbers, from the group's theta_0 and
   directions, so the disk writes them while the checkpoints are read); else, or where such a write fails, each is
   written after the state file from it (directions and theta_0 memory-mapped, shards tensor by tensor:
   :func:`relex_callback.files.streaming.write_shard_streaming`). A shard is never held in memory;
4. ``report.json`` from :func:`relex_callback.files.report.build_report`.

Peak memory is about twice ``memory_budget`` with the read ahead (the block being solved and the one being read;
once without)
plus the largest tensor's direction and one float32 copy of it, whatever the number of checkpoints and the model
size. The bytes on disk (reading slices, joining the state parts, writing the horizons) are
:mod:`relex_callback.files.streaming`'s; this module is the solve.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import noise as _noise
from ..core.backtest import backtest_from_gram, combine
from ..core.fit import fit_lines
from ..core.precision import exact
from ..core.solver import Solution, _directions, _fit_steps, _top_eigenpairs
from ..errors import RelexInputError, RelexWriteError
from ..files.checkpoints import MappedSource, nonfinite_base
from ..files.fs import deferred_sync
from ..files.state import save_state
from ..files.streaming import FileReader, StreamedWriter
from ..files.writers import CheckpointWriter, WriteFailed, guarded
from ..params import TensorSpec
from .finalize import check_horizons_fit

DEFAULT_MEMORY_BUDGET = 256 << 20
# Columns per Gram product (float32 GEMM; the products are summed in float64). Per-call overhead dominates small
# products: on the 2-core machine, T=21 x 3M columns took 0.84 s CPU in 16K-column products, 0.36 s in 64K, 0.21 s in
# 256K and 0.13 s in one product (a micro-benchmark); 1M columns keeps float64 sums every 1M terms.
GRAM_CHUNK = 1 << 20
# Elements per read of a checkpoint slice: the piece (and theta_0's, read once for every checkpoint) is still in
# cache when theta_0 is subtracted from it (a separate subtraction over the whole block cost 1.4 s CPU of 11 for the
# 76.6M x 20 benchmark). The subtraction runs on one thread (numpy; each element's result is the same whatever the
# threads): torch's sub_ on several OpenMP threads meets a barrier per piece, which costs more than the subtraction
# on a loaded host (`python bench/extrapolate.py` prints the subtract phase beside the read).
SUB_PIECE = 1 << 18
# Read the next block on a thread while the solve uses the current one (:class:`_Prefetch`). RELEX_READ_AHEAD=1 turns
# it on, =0 off; unset, it is on where this process may run on two CPUs or more (:func:`read_ahead`). It shortens the
# wall only where a second core is free (the reads and the Gram each want one): `python bench/extrapolate.py --modes
# streaming,inturn --repeat 3` on the 2-core machine at a load near 1 measured it faster in every repeat, by 0.7-1.2 s
# of 10 (docs/cli.md, "Speed"), and at a load of 6-7 (both cores busy with other jobs) the same wall on average, for
# 0.27 GB more peak memory (two blocks). Off, each block is read when the solve asks for it, into one arena; the
# bytes written are the same either way (tests/test_streaming.py compares them).
READ_AHEAD_ENV = "RELEX_READ_AHEAD"


def read_ahead() -> bool:
    """Whether the streamed solve reads the next block on a thread: ``RELEX_READ_AHEAD`` 1 (on) or 0 (off); unset or
    empty, on where this process may run on two CPUs or more (its affinity, which a container's or ``taskset``'s
    limit narrows). Any other value is refused: a misspelt switch would otherwise do the opposite of what was meant."""
    v = os.environ.get(READ_AHEAD_ENV, "").strip()
    if v in ("0", "1"):
        return v == "1"
    if v:
        raise RelexInputError(f"{READ_AHEAD_ENV}={v!r}: give 1 (read the next block on a thread), 0 (read each block "
                              "when it is needed) or leave it unset (on with two CPUs or more)")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform: the CPUs of the machine
        cpus = os.cpu_count() or 1
    return cpus >= 2


# ------------------------------------------------------------------------------------------------ grouping
def plan_groups(numels: Sequence[int], rows: int, budget: int) -> list[tuple[list[int], bool]]:
    """Consecutive tensors in groups whose ``[rows + 1, columns]`` float32 block fits ``budget`` bytes: ``(indices,
    resident)``; a tensor too large for the budget is a group of its own with ``resident=False`` (read in column
    chunks, twice)."""
    cap = max(1, budget // (4 * (rows + 1)))
    groups: list[tuple[list[int], bool]] = []
    cur: list[int] = []
    cols = 0
    for i, n in enumerate(numels):
        if n > cap:
            if cur:
                groups.append((cur, True))
                cur, cols = [], 0
            groups.append(([i], False))
            continue
        if cur and cols + n > cap:
            groups.append((cur, True))
            cur, cols = [], 0
        cur.append(i)
        cols += n
    if cur:
        groups.append((cur, True))
    return groups


# ------------------------------------------------------------------------------------------------ the math
def _gram_into(G: torch.Tensor, block: torch.Tensor):
    """``G += block block^T`` (float64 ``[T, T]``) from float32 products over column chunks."""
    n = block.shape[1]
    for s in range(0, n, GRAM_CHUNK):
        c = block[:, s: s + GRAM_CHUNK]
        G += (c @ c.T).double()


def solve_grams(G: torch.Tensor, steps: Sequence[int], rank: int, fit_start: Optional[int], clock=None):
    """The solver's math from the Grams ``G`` (``[S, T, T]`` float64): ``(sigma, U, X, coeffs, slope, intercept, r2,
    total, last_sq)`` exactly as :func:`relex_callback.core.solver.solve` computes them on the Gram path (the lines on
    ``clock.at(step)`` with an lr clock)."""
    steps_t, mask = _fit_steps(steps, fit_start)
    lam, U = _top_eigenpairs(G, rank)
    sigma, U, X = _directions(lam, U, rank)
    row_sq = torch.diagonal(G, dim1=1, dim2=2)
    total = row_sq.sum(-1).clamp_min(0)
    last_sq = G[:, -1, -1].clamp_min(0)
    coeffs = (U * sigma.unsqueeze(1)).transpose(1, 2)
    slope, intercept, r2 = fit_lines(coeffs, clock.at_steps(steps) if clock is not None else steps_t, mask)
    return sigma, U, X, coeffs, slope, intercept, r2, total, last_sq


# ------------------------------------------------------------------------------------------------ the driver
def _cat_solutions(parts, specs, steps, fit_start, rank, seconds, bytes_read, clock=None):
    def cat(k):
        return torch.cat([getattr(p, k) for p in parts], 0)

    return Solution(specs=list(specs), steps=list(steps), fit_start=fit_start, rank=rank, sigma=cat("sigma"),
                    coeffs=cat("coeffs"), slope=cat("slope"), intercept=cat("intercept"), r2=cat("r2"),
                    total=cat("total"), last_sq=cat("last_sq"), V=None, method="gram", seconds=seconds,
                    bytes_read=bytes_read, clock=clock)


def _first_nonfinite(readers, ckpts, names, numels, base_reader):
    """The first checkpoint (in step order) with a non-finite delta, and its tensors: the buffered path's message."""
    th = {}
    for ck, rd in zip(ckpts, readers):
        bad = []
        for n, k in zip(names, numels):
            if n not in th:
                th[n] = torch.empty(k, dtype=torch.float32)
                base_reader.read(n, th[n])
            x = torch.empty(k, dtype=torch.float32)
            rd.read(n, x)
            if not bool(torch.isfinite(x.sub_(th[n])).all()):
                bad.append(n)
        if bad:
            return ck, bad
    return None, []


class _Prefetch:
    """The blocks of ``jobs`` read one ahead on a thread: while the solve uses block ``k`` (its Gram, eigenpairs,
    directions, state part and horizons, on the calling thread), block ``k + 1`` is read into the other of two arenas
    (``preadv`` and numpy's subtraction release the GIL, so the two run on two cores). Nothing of the arithmetic
    moves: each block is read and subtracted by the same code in the same order, on one thread as before, so the
    bytes written are the same; at most two blocks exist at a time.

    ``read(job, slot)`` fills arena ``slot`` and returns the block; :meth:`next` returns ``(job, block)`` in the order
    of ``jobs`` (an error of the read raised there) and starts the read of the following job into the arena of the
    block before, which the caller has finished with when it asks for the next one. :meth:`stop` waits for a read in
    flight and ends the thread (before the files are closed, or read again by the caller). With ``ahead=False``
    there is no thread: :meth:`next` reads each block when asked, into arena 0."""

    def __init__(self, jobs: list, read, ahead: bool = True):
        self.jobs, self.read, self.k, self.ahead = jobs, read, 0, ahead
        self._pool = self._pending = None
        if jobs and ahead:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="relex-read")
            self._pending = self._pool.submit(read, jobs[0], 0)

    def next(self):
        if not self.ahead and self.k < len(self.jobs):  # read now, on this thread, into the one arena
            self.k += 1
            return self.jobs[self.k - 1], self.read(self.jobs[self.k - 1], 0)
        if self._pending is None:
            raise RuntimeError("streamed read: no block left (or the reads were stopped)")
        k = self.k
        block = self._pending.result()  # on an error (or an interrupt) the read stays pending: stop() waits for it
        self._pending = None
        self.k = k + 1
        if self.k < len(self.jobs):
            self._pending = self._pool.submit(self.read, self.jobs[self.k], self.k % 2)
        return self.jobs[k], block

    def stop(self):
        fut, self._pending = self._pending, None
        if fut is not None:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - a block nobody will use: its read error is not the caller's
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class StreamedSolve:
    """The tensor-major solve strategy of ``relex extrapolate`` (the module docstring has the plan): groups of tensors
    read from the memory-mapped checkpoints in float32, their Grams, eigenpairs and directions, each group's part of
    the state file written beside ``--out`` (nothing is created in ``--out`` before the state is whole: a refused input
    leaves it as it was). :attr:`writer` joins the parts and writes the horizons.

    Args:
        src_base (`DirectorySource`): the base checkpoint (theta_0; untracked tensors, config, tokenizer).
        sources (`list[DirectorySource]`), cks (`list[Checkpoint]`): the checkpoints, in step order, already checked
            against the base (same tensors, shapes and dtypes).
        names (`list[str]`): the tracked tensors (the base's floating-point keys).
        dtype (`torch.dtype`): the dtype of the directions kept in the state file (and used for the horizons).
        max_shard_size: of the written checkpoints.
        memory_budget (`int`, *optional*, defaults to 256 MiB): bytes of a float32 block (two in memory with the
            read ahead, :func:`read_ahead`: the next one is read while the solve uses the other).
        progress (`bool`, *optional*): a progress bar on stderr.
    """

    def __init__(self, *, src_base, sources, cks, names: Sequence[str], dtype: torch.dtype, max_shard_size,
                 rank: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False, clock=None):
        self.src_base, self.sources, self.cks, self.names = src_base, sources, cks, list(names)
        self.clock = clock  # relex_callback.core.clock.Clock (the lr clock), or None: the step
        self.dtype, self.memory_budget, self.progress = dtype, memory_budget, progress
        self.steps = [c.step for c in cks]
        self.numels = [math.prod(src_base.meta[n][0]) for n in self.names]
        self.specs, off = [], 0
        for n, k in zip(self.names, self.numels):
            self.specs.append(TensorSpec(name=n, shape=tuple(src_base.meta[n][0]), dtype=src_base.meta[n][1],
                                         local_numel=k, offset=off))
            off += k
        self.writer = StreamedWriter(src_base, self.specs, {s.name: s.offset for s in self.specs}, rank,
                                     max_shard_size)
        self.secs = {"read": 0.0, "gram": 0.0, "direction": 0.0, "state_parts": 0.0}
        self.bytes_read = 0
        self.sub_seconds = 0.0
        self.wait_seconds = 0.0  # the solve waiting for a block read ahead (in timings(), not the report's phases)
        self.run_id = uuid.uuid4().hex  # this extrapolation's id: in the state file and every step-H/ marker
        self.groups: list = []
        self._open: list = []
        self._arenas: list = [None, None]
        self._blocks = _Prefetch([], None)
        self.read_ahead: Optional[bool] = None  # decided by check() (RELEX_READ_AHEAD, or the CPUs this process has)

    def check(self, settings):
        T = len(self.cks)
        if self.memory_budget < 4 * (T + 1):
            raise RelexInputError(f"memory_budget={self.memory_budget} bytes holds no column of {T + 1} float32 rows; "
                                  f"give at least {4 * (T + 1)} bytes (default 256 MiB)")
        self.read_ahead = read_ahead()  # a misspelt RELEX_READ_AHEAD refused here, before anything is written

    def prepare(self, out_dir: str, writer: CheckpointWriter):
        self.out_dir = out_dir
        # the parts of the state file are written beside --out
        out_abs = os.path.abspath(out_dir)
        self.writer.scratch = os.path.join(os.path.dirname(out_abs), f".{os.path.basename(out_abs)}.relex-parts-"
                                           f"{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.makedirs(self.writer.scratch)

    @torch.no_grad()
    @exact
    def solve(self, settings, writer: CheckpointWriter, horizons: Sequence[int]):
        """Every group's Gram, eigenpairs, directions and state part; returns the solution over every tensor (``V`` is
        ``None``: the directions are in the parts)."""
        T, rank, fit_start = len(self.cks), settings.rank, settings.fit_start
        self.groups = plan_groups(self.numels, T, self.memory_budget)
        t0 = time.perf_counter()
        base_reader = FileReader(self.src_base, self.names)
        readers = [FileReader(s, self.names) for s in self.sources]
        fp_mapped = MappedSource(self.src_base)
        self._open = readers + [base_reader, fp_mapped]
        parts, backtests = [], []
        bar = None
        if self.progress:
            bar = tqdm(total=sum(self.numels), desc="relex: reading checkpoints", unit="param", unit_scale=True,
                       file=sys.stderr, dynamic_ncols=True)
            self._open.append(bar)
        if self.read_ahead is None:
            self.read_ahead = read_ahead()
        # the horizons are begun now, where the disk has room, and each group's tensors written as it is solved
        self.writer.begin_horizons(self.out_dir, horizons, rank * sum(self.numels) * self.dtype.itemsize, self.clock)
        self._blocks = _Prefetch(self._read_jobs(), lambda job, slot: self._read_block(
            (self._arena(slot), readers, base_reader), *job), ahead=self.read_ahead)
        try:
            for gi, (idx, resident) in enumerate(self.groups):
                sol, bt, col = self._solve_group(gi, idx, resident, readers, base_reader, fp_mapped, settings,
                                                 horizons)
                parts.append(sol)
                backtests.append(bt)
                if bar is not None:
                    bar.update(col)
        finally:
            self._close_readers()
        self.secs["total"] = time.perf_counter() - t0
        solution = _cat_solutions(parts, self.specs, self.steps, fit_start, rank, self.secs, self.bytes_read,
                                  self.clock)
        solution.backtest = combine(backtests)  # each group's tensors: additive sums, one global backtest
        reasons = [p.noise for p in parts if isinstance(p.noise, str)]
        solution.noise = reasons[0] if reasons else _noise.combine([p.noise for p in parts])  # the same sums
        return solution

    def _solve_group(self, gi, idx, resident, readers, base_reader, fp_mapped, settings, horizons):
        """One group: its Grams (one read of its slices, two for a tensor too large for the budget), eigenpairs,
        directions, the horizon overflow check, and its part of the state file. Returns ``(solution, backtest,
        columns)``."""
        T, steps, rank, fit_start = len(self.cks), self.steps, settings.rank, settings.fit_start
        gspecs, col = self._group_specs(idx)
        S = len(idx)
        G = torch.zeros(S, T, T, dtype=torch.float64)
        V = torch.zeros(rank, col, dtype=self.dtype)
        io = (None, readers, base_reader)
        if resident:
            fitted, theta0 = self._solve_resident(io, gspecs, col, G, V, rank, fit_start)
        else:
            fitted, theta0 = self._solve_chunked(io, gspecs[0], G, V, rank, fit_start)
        sigma, U, X, coeffs, slope, intercept, r2, total, last_sq = fitted
        sol = Solution(specs=gspecs, steps=steps, fit_start=fit_start, rank=rank, sigma=sigma, coeffs=coeffs,
                       slope=slope, intercept=intercept, r2=r2, total=total, last_sq=last_sq, V=V, method="gram",
                       clock=self.clock)
        # refused before anything is written (the state is committed only after every group passed)
        check_horizons_fit(sol, horizons)
        if theta0 is not None:
            th_of = lambda j, th=theta0, sp=gspecs: th[sp[j].offset: sp[j].offset + sp[j].local_numel]  # noqa: E731
        else:
            th_of = lambda j, sp=gspecs: fp_mapped.get(sp[j].name).reshape(-1)  # noqa: E731
        self._save_group_state(gi, sol, gspecs, th_of)
        self.writer.write_group(gspecs, sol.slope, sol.intercept, V, th_of)  # into the horizons begun, if any
        sol.V = None
        bt = backtest_from_gram(G, steps, True, fit_start=fit_start, names=[x.name for x in gspecs], clock=self.clock)
        sol.noise = _noise.safe(_noise.drift_share, G, steps, coeffs=sol.coeffs[:, 0, :],
                                names=[x.name for x in gspecs])
        return sol, bt, col

    def _read_jobs(self):
        """Every block the solve reads, in the order it reads them: ``(cols_of, width, start)`` per resident group,
        and for a tensor too large for the budget its column chunks twice (the Gram pass, then the directions)."""
        T = len(self.cks)
        jobs = []
        for idx, resident in self.groups:
            gspecs, col = self._group_specs(idx)
            if resident:
                jobs.append(([(s.name, s.offset, s.local_numel) for s in gspecs], col, 0))
                continue
            n = gspecs[0].local_numel
            width = max(1, self.memory_budget // (4 * (T + 1)))
            for _ in range(2):
                jobs += [([(gspecs[0].name, 0, min(width, n - a))], min(width, n - a), a) for a in range(0, n, width)]
        return jobs

    def _next_block(self, cols_of, width, s=0):
        """The next block of :meth:`_read_jobs` (read ahead by the prefetch thread while the previous block was
        used); the seconds waited for it go to ``read_wait`` in :meth:`timings`."""
        t = time.perf_counter()
        job, block = self._blocks.next()
        self.wait_seconds += time.perf_counter() - t
        if job != (cols_of, width, s):  # the plan and the solve disagree: a bug, never the input's fault
            raise RuntimeError(f"streamed read out of order: expected {(cols_of, width, s)}, got {job}")
        return block

    def _read_block(self, io, cols_of, width, s=0):
        """Rows 0..T-1: the deltas; row T: theta_0, for columns laid out by ``cols_of`` [(name, col, count)].
        Each checkpoint's slice is read in cache-sized pieces and theta_0 subtracted while the piece is in
        cache. With the read ahead it runs on the prefetch thread (:class:`_Prefetch`): its seconds are the thread's,
        not the wall's."""
        arena, readers, base_reader = io
        T = len(self.cks)
        clock = time.perf_counter
        ta = clock()
        t_sub = 0.0
        block = arena[: (T + 1) * width].view(T + 1, width)
        th = block[T]
        rows = block.numpy()  # the subtraction in numpy: one thread, no OpenMP barrier per piece (see SUB_PIECE)
        with np.errstate(all="ignore"):  # NaN/Inf deltas: refused from the Gram, as with torch (no warning)
            for n, c, k in cols_of:
                base_reader.read(n, th[c: c + k], s)
                for a in range(0, k, SUB_PIECE):  # theta_0's piece stays in cache for every checkpoint's piece
                    p = min(SUB_PIECE, k - a)
                    theta = rows[T, c + a: c + a + p]
                    for t, rd in enumerate(readers):
                        rd.read(n, block[t, c + a: c + a + p], s + a)
                        ts = clock()
                        np.subtract(rows[t, c + a: c + a + p], theta, out=rows[t, c + a: c + a + p])
                        t_sub += clock() - ts
        self.bytes_read += (T + 1) * width * 4
        self.sub_seconds += t_sub  # in secs["read"] (the report's phases), apart in timings()
        self.secs["read"] += clock() - ta
        return block

    def _check_finite(self, io, G, gnames):
        """Refuse a group whose Gram diagonal is not finite, naming the base or the first checkpoint at fault."""
        _, readers, base_reader = io
        d = torch.diagonal(G, dim1=-2, dim2=-1)
        if bool(torch.isfinite(d).all()):
            return
        self._blocks.stop()  # the readers are read again below: the block read ahead is not needed any more
        nonfinite_base(self.src_base, self.src_base.path, self.names)  # a NaN in theta_0 is the base's
        ck, bad = _first_nonfinite(readers, self.cks, self.names, self.numels, base_reader)
        if ck is None:  # Inf products of finite values: deltas beyond float32's square root
            raise RelexInputError(f"weight deltas of {gnames[0]} are too large to square in float32 (beyond "
                                  "1e19); the checkpoints are not a training run of the base")
        raise RelexInputError(
            f"{ck.path}: non-finite weight delta at step {ck.step} in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + "; the step was not recorded (the training run diverged or overflowed); leave this checkpoint (and "
            "later ones) out of --checkpoints")

    def _group_specs(self, idx):
        """The group's tensors laid out side by side in one block; return (specs with block offsets, columns)."""
        gspecs, col = [], 0
        for i in idx:
            s = self.specs[i]
            gspecs.append(TensorSpec(name=s.name, shape=s.shape, dtype=s.dtype, local_numel=s.local_numel, offset=col))
            col += s.local_numel
        return gspecs, col

    def _solve_resident(self, io, gspecs, col, G, V, rank, fit_start):
        """A group whose block fits the budget: one read, its Grams, eigenpairs and directions into ``V``; return
        (the fit, theta_0 of the group)."""
        T, secs = len(self.cks), self.secs
        S = len(gspecs)
        block = self._next_block([(s.name, s.offset, s.local_numel) for s in gspecs], col)
        tg = time.perf_counter()
        for j, s in enumerate(gspecs):
            _gram_into(G[j], block[:T, s.offset: s.offset + s.local_numel])
        secs["gram"] += time.perf_counter() - tg
        self._check_finite(io, G, [s.name for s in gspecs])
        fitted = solve_grams(G, self.steps, rank, fit_start, self.clock)
        X = fitted[2]
        td = time.perf_counter()
        for j, s in enumerate(gspecs):
            V[:, s.offset: s.offset + s.local_numel] = X[j].T @ block[:T, s.offset: s.offset + s.local_numel]
        secs["direction"] += time.perf_counter() - td
        theta0 = block[T].clone() if S else None  # the fingerprints (the arena is reused by the next group)
        return fitted, theta0

    def _solve_chunked(self, io, s, G, V, rank, fit_start):
        """One tensor too large for the budget: its Gram over column chunks, eigenpairs, then a second read for its
        directions into ``V``; return (the fit, None: theta_0 is read back from the base)."""
        T, secs = len(self.cks), self.secs
        n = s.local_numel
        width = max(1, self.memory_budget // (4 * (T + 1)))
        for a in range(0, n, width):
            k = min(width, n - a)
            block = self._next_block([(s.name, 0, k)], k, a)
            tg = time.perf_counter()
            _gram_into(G[0], block[:T])
            secs["gram"] += time.perf_counter() - tg
        self._check_finite(io, G, [s.name])
        fitted = solve_grams(G, self.steps, rank, fit_start, self.clock)
        X = fitted[2]
        for a in range(0, n, width):
            k = min(width, n - a)
            block = self._next_block([(s.name, 0, k)], k, a)
            td = time.perf_counter()
            V[:, a: a + k] = X[0].T @ block[:T]
            secs["direction"] += time.perf_counter() - td
        return fitted, None  # theta_0 read back from the base by the fingerprint (memory-mapped)

    def _save_group_state(self, gi, sol, gspecs, th_of):
        """Write the group's part of the state file in the scratch directory (a failed write: RelexWriteError; tried
        again once where horizons begun during the solve held space, which the state file needs first)."""
        steps, secs = self.steps, self.secs
        ts = time.perf_counter()
        part = os.path.join(self.writer.scratch, f"part-{gi:05d}.safetensors")

        def write():
            with deferred_sync(self.writer.scratch):  # scratch: the joined state file is the one flushed
                guarded(lambda: save_state(part, sol, th_of, tcut=steps[-1], extra={"run_id": self.run_id}))

        try:
            self.writer.before_early(write)
        except WriteFailed as e:
            raise RelexWriteError(
                f"writing the state file in {self.out_dir} failed: {e}; no horizon was written and nothing exists "
                "under the final names; the recorded window was not saved. Free space (or fix permissions) and run "
                "again"
            ) from e.__cause__
        secs["state_parts"] += time.perf_counter() - ts
        self.writer.part_files.append(part)

    def _arena(self, slot: int) -> torch.Tensor:
        """The float32 memory of the blocks read into ``slot`` (0 or 1: one block is read while the other is used),
        allocated when the slot is first read into (a run of one block never allocates the second)."""
        if self._arenas[slot] is None:
            T, budget = len(self.cks), self.memory_budget
            cols = max([sum(self.numels[i] for i in g) if res else max(1, budget // (4 * (T + 1)))
                        for g, res in self.groups] + [1])
            self._arenas[slot] = torch.empty((T + 1) * cols, dtype=torch.float32)
        return self._arenas[slot]

    def _close_readers(self):
        self._blocks.stop()  # before the files are closed: the prefetch thread may be reading them
        self._arenas = [None, None]  # the float32 blocks are not needed for the writes
        for r in self._open:
            r.close()
        self._open = []

    def bind(self, writer: CheckpointWriter, sol):
        writer.bind(sol)

    def report_extra(self, writer: CheckpointWriter) -> dict:
        return {
            "buffer_bytes": 0,
            "buffer_rows": None,
            "fold_rank": None,
            "folds": 0,
            "buffer_dtype": str(self.dtype).replace("torch.", ""),
            "storage": "streaming",
            "streaming": {"memory_budget": int(self.memory_budget), "groups": len(self.groups),
                          "tensors_read_twice": sum(1 for _, res in self.groups if not res),
                          "bytes_read": int(self.bytes_read)},
        }

    def distributed_extra(self, writer, t_bind) -> dict:
        return {}

    def timings(self) -> dict:
        """Seconds by phase (read, gram, direction, state parts, total solve, subtract, read_wait, early (the
        horizons' tensors written during the solve, part of its total), state, horizons) and bytes read (``read``
        here excludes the subtraction; the report's ``seconds.read`` includes it).
        With the read ahead, ``read`` and ``subtract`` are the prefetch thread's seconds, spent while the solve ran on
        the other block;
        ``read_wait`` is what the solve waited for them (the part of the reads the wall sees); without the read
        ahead, read and subtract are the wall's and there is no ``read_wait``."""
        out = {k: round(v, 4) for k, v in self.secs.items()}
        out.update(read=round(self.secs["read"] - self.sub_seconds, 4), subtract=round(self.sub_seconds, 4))
        if self._blocks.ahead:
            out.update(read_wait=round(self.wait_seconds, 4))
        out.update(early=round(self.writer.stamps.get("early", 0.0), 4),
                   state=round(self.writer.stamps.get("state", 0.0), 4),
                   horizons=round(self.writer.stamps.get("horizons", 0.0), 4), bytes_read=self.bytes_read)
        return out

    def close(self):
        self._close_readers()
        self.writer.close()


__all__ = ["StreamedSolve", "plan_groups", "read_ahead", "solve_grams", "DEFAULT_MEMORY_BUDGET"]
