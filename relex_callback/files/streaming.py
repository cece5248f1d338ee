"""Safetensors streamed to and from disk, a tensor (or a slice of one) at a time: what the tensor-major solve of
``relex extrapolate`` (:class:`relex_callback.pipeline.streamed.StreamedSolve`) reads and writes.

* reading: :class:`FileReader` fills caller-owned float32 memory with a slice of a checkpoint's tensor (``os.preadv``
  from the page cache: one copy, no page faults; bf16/fp16 staged then widened), the headers parsed once;
* the state file: each group's part (written by :func:`relex_callback.files.state.save_state`) joined into one
  ``relex_state.safetensors`` by :func:`merge_state_parts` (headers merged, data copied inside the kernel), read back
  lazily by :class:`MappedState` (directions memory-mapped one tensor at a time);
* the horizons: :func:`write_horizon_streaming` writes ``step-H/`` as ``relex materialize`` does, each shard tensor by
  tensor (:func:`write_shard_streaming`: the header first, sizes known from the metadata), so a shard is never held
  in memory; or commits the one :class:`EarlyHorizon` began during the solve (each tensor written at its place as
  its group was solved);
* :class:`StreamedWriter`: the :class:`~relex_callback.files.writers.CheckpointWriter` of the streamed solve, the two
  above behind the pipeline's writer interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..core.solver import extrapolate_piece
from ..errors import RelexInputError, RelexNonFiniteError
from ..params import TensorSpec
from .checkpoints import (ST_CODES, MappedSafetensors, MappedSource, Writeback, _produced, _raw, all_finite,
                          safetensors_header, st_dtype, tensor_bytes, weights_layout, write_index, write_relex_marker,
                          write_tensor_file)
from .fs import (STATE_NAME, atomic_directory, atomic_file, clean_stale_temporaries, free_bytes, horizon_dir,
                 loads_json, new_temporary_dir, read_safetensors_header)
from .writers import CheckpointWriter, WriteFailed, guarded

logger = logging.getLogger("relex_callback")

# Elements converted per read when a checkpoint is not float32 (bf16/fp16 checkpoints are staged then widened).
STAGE_ELEMS = 1 << 22

# ------------------------------------------------------------------------------------------------ reading
@dataclass
class _Loc:
    path: str
    offset: int  # absolute byte offset of the tensor's data in the file
    dtype: torch.dtype
    numel: int


class FileReader:
    """The tensors of one checkpoint (a :class:`~relex_callback.files.checkpoints.DirectorySource`) read with ``preadv``
    into caller-owned float32 memory: ``read(name, out, start)`` fills ``out`` with elements ``[start, start +
    out.numel())`` of the flattened tensor. Headers are parsed (and checked against the file sizes) once, by
    :class:`~relex_callback.files.checkpoints.MappedSafetensors`."""

    def __init__(self, source, names: Sequence[str]):
        self.path = source.path
        self.locs: dict[str, _Loc] = {}
        headers = {}
        for n in names:
            fp = source.key_file[n]
            if fp not in headers:
                headers[fp] = MappedSafetensors(fp)
            mf = headers[fp]
            h = mf.header[n]
            b, e = h["data_offsets"]
            dtype = st_dtype(h["dtype"])
            self.locs[n] = _Loc(fp, mf.start + b, dtype, (e - b) // dtype.itemsize)
        self._fds: dict[str, int] = {}
        self._stage: Optional[torch.Tensor] = None

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _pread(self, fd: int, dst: torch.Tensor, offset: int):
        if not dst.is_contiguous():  # reshape would copy, and the read would land in the copy
            raise ValueError("FileReader reads into contiguous memory only")
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
        done, total = 0, len(view)
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise RelexInputError(f"cannot read {total} bytes at offset {offset} of a checkpoint file: the file "
                                      "is truncated (it changed after it was opened)")
            done += n

    def read_raw(self, name: str, dst: torch.Tensor, start: int = 0):
        """The stored bytes of elements ``[start, start + dst.numel() // itemsize)`` of ``name`` into the contiguous
        uint8 ``dst`` (no conversion)."""
        loc = self.locs[name]
        self._pread(self._fd(loc.path), dst, loc.offset + start * loc.dtype.itemsize)

    def read(self, name: str, out: torch.Tensor, start: int = 0):
        loc = self.locs[name]
        count = out.numel()
        fd = self._fd(loc.path)
        if loc.dtype == torch.float32:
            self._pread(fd, out, loc.offset + 4 * start)
            return
        isz = loc.dtype.itemsize
        if self._stage is None:
            self._stage = torch.empty(STAGE_ELEMS * 8, dtype=torch.uint8)
        for a in range(0, count, STAGE_ELEMS):
            k = min(STAGE_ELEMS, count - a)
            raw = self._stage[: k * isz]
            self._pread(fd, raw, loc.offset + (start + a) * isz)
            out[a: a + k].copy_(raw.view(loc.dtype))

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ------------------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def one_thread():
    """torch's CPU operations on one thread while the block runs (the previous count restored after). For the
    element-wise passes of the writes (``theta_0 + c v``, the finiteness check): each element's value does not depend
    on the threads, and several OpenMP threads meet a barrier per tensor, which on a loaded host costs more than the
    pass itself (`python bench/extrapolate.py` prints the write phase beside its floor)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def write_shard_streaming(path: str, keys: list[str], meta: dict, produce: Callable[[str], torch.Tensor]):
    """:func:`relex_callback.files.checkpoints.write_tensor_file` with the tensors laid out in the order of ``keys``
    (the layout ``relex extrapolate``'s streamed outputs have always had; :func:`~relex_callback.files.checkpoints.
    write_shard` lays them out as ``save_file`` does): a plain safetensors file, ``{"format": "pt"}`` metadata, the
    header first, then each tensor as it is produced and checked (shape, dtype, NaN/Inf)."""
    write_tensor_file(path, keys, meta, produce, order="given")


def write_weights_streaming(out_dir: str, keys: list[str], meta: dict, produce, max_shard_size) -> list[str]:
    """:func:`relex_callback.files.checkpoints.write_weights` (same shard plan, names and index) with
    :func:`write_shard_streaming`."""
    names, shards, weight_map, total = weights_layout(keys, meta, max_shard_size)
    for name, shard in zip(names, shards):
        write_shard_streaming(os.path.join(out_dir, name), shard, meta, produce)
    if weight_map is not None:
        write_index(out_dir, weight_map, total)
    return names


def horizon_meta(source, specs: Sequence[TensorSpec]) -> dict:
    """``(shape, dtype)`` of every tensor a horizon of ``source`` holds: the source's, the tracked ones as their
    specs say."""
    meta = dict(source.meta)
    for s in specs:
        meta[s.name] = (tuple(s.shape), s.dtype)
    return meta


def _read_header(path: str):
    hdr, start, size = read_safetensors_header(path)
    return hdr, start, size - start


def merge_state_parts(parts: Sequence[str], path: str, offsets: dict[str, int]):
    """Join state files written by :func:`relex_callback.files.state.save_state` for consecutive groups of tensors
    into one state file at ``path`` (a temporary the caller renames): their ``relex`` metadata merged (``order``
    concatenated, ``tensors`` united, every other field equal), each tensor's ``spec.offset`` set to ``offsets``
    (its column in the whole model, as the buffered path records it), data copied without passing through Python."""
    metas, heads = [], []
    for p in parts:
        hdr, start, size = _read_header(p)
        md = hdr.pop("__metadata__")
        metas.append(loads_json(md["relex"], f"the relex metadata of {p}"))
        heads.append((hdr, start, size, md))
    merged = dict(metas[0])
    merged["order"], merged["tensors"] = [], {}
    for m in metas:
        same = {k: v for k, v in m.items() if k not in ("order", "tensors")}
        if same != {k: v for k, v in metas[0].items() if k not in ("order", "tensors")}:
            raise RuntimeError("state parts disagree on their settings")
        merged["order"] += m["order"]
        merged["tensors"].update(m["tensors"])
    for name, info in merged["tensors"].items():
        info["spec"]["offset"] = int(offsets[name])
    out_hdr: dict = {"__metadata__": {**heads[0][3], "relex": json.dumps(merged)}}
    base = 0
    for hdr, _, size, _ in heads:
        for k, v in hdr.items():
            b, e = v["data_offsets"]
            out_hdr[k] = {**v, "data_offsets": [base + b, base + e]}
        base += size
    raw = json.dumps(out_hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.flush()
        for (hdr, start, size, _), p in zip(heads, parts):
            with open(p, "rb") as src:
                done = 0
                while done < size:
                    try:
                        n = os.copy_file_range(src.fileno(), out.fileno(), size - done, start + done)
                    except (AttributeError, OSError) as e:
                        # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: no copy inside the kernel here, copied through Python
                        if isinstance(e, OSError) and e.errno not in (18, 22, 38, 95):
                            raise
                        src.seek(start + done)
                        out.seek(0, os.SEEK_END)
                        shutil.copyfileobj(_Limited(src, size - done), out, 1 << 24)
                        n = size - done
                    if n == 0:
                        raise OSError(f"{p} is shorter than its header says")
                    done += n


class _Limited:
    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, k=-1):
        k = self.n if k < 0 else min(k, self.n)
        b = self.f.read(k)
        self.n -= len(b)
        return b


def coef_at(slope: torch.Tensor, intercept: torch.Tensor, horizon: float, clock=None) -> torch.Tensor:
    """Each tensor's coefficients at ``horizon`` (``[S, rank]``): its line at the step, or at ``clock.at(step)`` with
    an lr clock. Element by element, so a group's rows are the same numbers as the whole model's."""
    if clock is not None:
        horizon = clock.at(horizon)
    return slope * float(horizon) + intercept


class MappedState:
    """A committed state file read back lazily: directions memory-mapped one tensor at a time, everything else from
    its metadata; ``extrapolate`` is :meth:`relex_callback.files.state.RelexState.extrapolate` (bit for bit what ``relex
    materialize`` writes from the same file)."""

    def __init__(self, path: str, specs: list[TensorSpec], slope: torch.Tensor, intercept: torch.Tensor, rank: int,
                 clock=None):
        self.file = MappedSafetensors(path)
        self.specs, self.slope, self.intercept, self.rank, self.clock = specs, slope, intercept, rank, clock

    def coef_at(self, horizon: float) -> torch.Tensor:
        return coef_at(self.slope, self.intercept, horizon, self.clock)

    @torch.no_grad()
    def extrapolate(self, i: int, horizon: float, theta0: torch.Tensor) -> torch.Tensor:
        spec = self.specs[i]
        return extrapolate_piece(theta0, self.coef_at(horizon)[i], self.file.get(spec.name)[: self.rank], spec.dtype)

    def close(self):
        self.file.close()


# Elements of a tensor extrapolated, checked and written at a time by :class:`EarlyHorizon` (the values are element by
# element, so the pieces do not change a bit; small pieces keep the memory of the writes small).
EARLY_PIECE = 1 << 20


def _pwrite_all(fd: int, data: memoryview, offset: int):
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class EarlyHorizon:
    """``out_dir/step-H`` begun while the streamed solve runs, so that its bytes reach the disk while the checkpoints
    are still being read (:meth:`StreamedWriter.begin_horizons`). It is the temporary directory
    :func:`~relex_callback.files.fs.new_temporary_dir` names (swept like any other after a failure or a signal), with
    the shards :func:`write_weights_streaming` would write (same plan, names, headers and layout): each header and
    every untracked tensor written at once, each tracked tensor at its place in its shard as soon as its group's
    directions are known (:meth:`put`, in pieces), the disk started on them as they come. Nothing is under the final
    name until :func:`write_horizon_streaming` commits it, after the state file, as it commits any horizon; a horizon
    that is not :meth:`complete` by then is deleted (:meth:`abort`) and written the usual way."""

    def __init__(self, out_dir: str, horizon: int, source, specs: Sequence[TensorSpec], max_shard_size):
        self.final = horizon_dir(out_dir, horizon)
        tracked = {s.name for s in specs}
        self.meta = meta = horizon_meta(source, specs)
        keys = list(source.keys)
        names, shards, self.index, self.nbytes = weights_layout(keys, meta, max_shard_size)
        self.places: dict = {}  # key -> (its file's Writeback, file offset of its data, its bytes, the file's path)
        self.left: dict = {}  # tracked key -> bytes not written yet
        self.fds: list[int] = []
        clean_stale_temporaries(os.path.dirname(self.final), os.path.basename(self.final))
        self.tmp = new_temporary_dir(self.final)
        try:
            for name, shard in zip(names, shards):
                path = os.path.join(self.tmp, name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
                self.fds.append(fd)
                head, _ = safetensors_header([(k, meta[k][1], tuple(meta[k][0])) for k in shard])
                _pwrite_all(fd, memoryview(head), 0)
                disk = Writeback(fd)
                disk.wrote(0, len(head), kick=False)  # with the first tensor
                off = len(head)
                for k in shard:
                    nb = tensor_bytes(*meta[k])
                    self.places[k] = (disk, off, nb, path)
                    off += nb
            for k in keys:
                if k in tracked:
                    self.left[k] = self.places[k][2]
                else:
                    t = _produced(source.get, k, meta, self.places[k][3]).to("cpu")
                    self._write(k, 0, t)
        except BaseException:
            self.abort()
            raise

    def put(self, name: str, start: int, piece: torch.Tensor):
        """Elements ``[start, start + piece.numel())`` of the flattened tracked tensor ``name``: checked (dtype,
        NaN/Inf, as every checkpoint's tensors are) and written at their place."""
        dtype = self.meta[name][1]
        if piece.dtype != dtype:
            raise RuntimeError(f"{name}: produced {piece.dtype}, expected {dtype}")
        if piece.is_floating_point() and not all_finite(piece):
            raise RelexNonFiniteError(f"{name} would be written with NaN/Inf values into {self.final}")
        self.left[name] -= self._write(name, start, piece)

    def _write(self, name: str, start: int, t: torch.Tensor) -> int:
        disk, off, nb, _ = self.places[name]
        a, n = off + start * t.element_size(), t.numel() * t.element_size()
        if start < 0 or a + n > off + nb:
            raise RuntimeError(f"{name}: elements from {start} ({n} bytes) overrun its {nb} bytes")
        if n:
            _pwrite_all(disk.fd, _raw(t), a)
        disk.wrote(a, n)
        return n

    def complete(self) -> bool:
        """Every tracked tensor written whole."""
        return bool(self.fds) and not any(self.left.values())

    def finish(self):
        """Close the shards and write the index (a sharded horizon): what is left of ``write_weights_streaming``'s
        part before the config, tokenizer and marker."""
        whole = self.complete()
        self._close()
        if not whole:
            raise RuntimeError(f"{self.final}: begun during the solve but not every tensor was written")
        if self.index is not None:
            write_index(self.tmp, self.index, self.nbytes)

    def _close(self):
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def abort(self):
        """Close and delete everything begun (nothing was under the final name)."""
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_horizon_streaming(out_dir: str, horizon: int, tcut: int, result, theta0_of, source, *, overwrite=False,
                            max_shard_size="50GB", run_id: Optional[str] = None,
                            early: Optional[EarlyHorizon] = None) -> str:
    """:func:`relex_callback.files.writers.write_full_checkpoint` with shards written tensor by tensor:
    ``out_dir/step-H`` assembled in a temporary directory (weights, config, tokenizer, the relex marker) and renamed
    whole; a failed write raises :class:`~relex_callback.files.writers.WriteFailed` with nothing under the final
    name. ``early``: the horizon's weights already written during the solve (:class:`EarlyHorizon`, complete): only
    the rest is written, and it is committed the same way."""
    final = horizon_dir(out_dir, horizon)
    if early is None:  # an early horizon cleaned the stale temporaries when it began (its own is one of them now)
        clean_stale_temporaries(out_dir, os.path.basename(final))
    index = {s.name: i for i, s in enumerate(result.specs)}

    def produce(key):
        i = index.get(key)
        if i is None:
            return source.get(key)
        spec = result.specs[i]
        return result.extrapolate(i, horizon, theta0_of(i)).reshape(spec.shape)

    meta = horizon_meta(source, result.specs)

    def write():
        with atomic_directory(final, overwrite=overwrite, tmp=early.tmp if early is not None else None) as tmp:
            if early is not None:
                early.finish()
            else:
                write_weights_streaming(tmp, list(source.keys), meta, produce, max_shard_size)
            source.write_extras(tmp)
            write_relex_marker(tmp, horizon, tcut, run_id)

    guarded(write)
    return final


# ------------------------------------------------------------------------------------------------ the writer
class StreamedWriter(CheckpointWriter):
    """The writer of the streamed solve: the state file joined from the parts the solve wrote group by group, and each
    horizon from the committed state file and the memory-mapped base (as ``relex materialize`` writes them)."""

    def __init__(self, src_base, specs, offsets, rank: int, max_shard_size):
        self.src_base, self.specs, self.offsets, self.rank = src_base, specs, offsets, rank
        self.max_shard_size = max_shard_size
        self.part_files: list[str] = []
        self.scratch: Optional[str] = None
        self.mapped = self.base_mapped = None
        self.stamps: dict = {}
        self.early: dict[int, EarlyHorizon] = {}  # horizon -> its weights written during the solve
        self.clock = None  # the solution's lr clock (set by begin_horizons), or None: the step
        self._made_out: Optional[str] = None  # --out, where begin_horizons made it

    def bind(self, solution, store=None):
        self.solution = solution

    # -------------------------------------------------------------------------------- horizons during the solve
    def begin_horizons(self, out_dir: str, horizons: Sequence[int], state_bytes: int, clock=None):
        """Begin every horizon during the solve (:class:`EarlyHorizon`), so that the disk writes them while the
        checkpoints are read, where ``out_dir``'s file system has room for all of them, the state file's parts and
        the joined state file at once, an eighth and 16 MiB to spare; else none is begun and each is written after
        the state file, one at a time, from it. The bytes are the same either way (``tests/test_streaming.py``
        compares them)."""
        self.clock = clock
        if not horizons:
            return
        one = sum(tensor_bytes(*m) for m in horizon_meta(self.src_base, self.specs).values())
        need = len(horizons) * one + 2 * state_bytes
        if free_bytes(out_dir) < need + need // 8 + (16 << 20):  # room, with some to spare
            logger.debug("relex: the horizons are written after the state file (no room for them during the solve)")
            return
        self._made_out = None if os.path.isdir(out_dir) else os.path.abspath(out_dir)
        try:
            for h in horizons:
                self.early[int(h)] = EarlyHorizon(out_dir, h, self.src_base, self.specs, self.max_shard_size)
        except Exception as e:  # noqa: BLE001 - written after the state file instead, where a failure is reported
            self.drop_early(f"beginning the horizons failed ({e})")

    @torch.no_grad()
    def write_group(self, gspecs: Sequence[TensorSpec], slope: torch.Tensor, intercept: torch.Tensor,
                    V: torch.Tensor, theta0_of: Callable[[int], torch.Tensor]):
        """A solved group's tensors into every begun horizon: ``theta_0 + c(H) v`` by ``extrapolate_piece`` with the
        coefficients :class:`MappedState` gives (the same numbers, element by element, as the horizon written from
        the committed state file), in pieces. ``gspecs``' offsets are columns of ``V`` (``[rank, columns]``, the
        directions in the state file's dtype); ``theta0_of(j)``: tensor j's flattened theta_0. A failure (a full
        disk) drops every begun horizon: they are written after the state file, where it is reported."""
        if not self.early:
            return
        t = time.perf_counter()
        try:
            with one_thread():
                for h, e in self.early.items():
                    coef = coef_at(slope, intercept, h, self.clock)
                    for j, s in enumerate(gspecs):
                        th, n = theta0_of(j), s.local_numel
                        for a in range(0, n, EARLY_PIECE):
                            b = min(n, a + EARLY_PIECE)
                            e.put(s.name, a, extrapolate_piece(th[a:b], coef[j], V[:, s.offset + a: s.offset + b],
                                                               s.dtype))
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.drop_early(f"writing them during the solve failed ({e})")
        finally:
            self.stamps["early"] = self.stamps.get("early", 0.0) + time.perf_counter() - t

    def drop_early(self, why: str = "") -> bool:
        """Delete every horizon begun during the solve (freeing its disk space); whether there was one."""
        if not self.early:
            return False
        if why:
            logger.debug("relex: the horizons are written after the state file: %s", why)
        for e in self.early.values():
            e.abort()
        self.early = {}
        if self._made_out is not None:  # --out was made for them: a run refused or stopped leaves it as it was
            try:
                os.rmdir(self._made_out)  # only where nothing else is in it
            except OSError:
                pass
        return True

    def before_early(self, write: Callable[[], object]):
        """``write()`` (a write of the state file, which raises :class:`WriteFailed`), tried once more after dropping
        the horizons begun during the solve where it failed while they held disk space: the state file comes
        first."""
        try:
            return write()
        except WriteFailed:
            if not self.drop_early("the state file needed their space"):
                raise
            return write()

    def write_state(self, out_dir: str, tcut: int) -> str:
        state_path = os.path.join(out_dir, STATE_NAME)

        def commit_state():
            os.makedirs(out_dir, exist_ok=True)
            with atomic_file(state_path) as tmp:
                merge_state_parts(self.part_files, tmp, self.offsets)
            shutil.rmtree(self.scratch, ignore_errors=True)

        t = time.perf_counter()
        self.before_early(lambda: guarded(commit_state))
        self.stamps["state"] = time.perf_counter() - t
        sol = self.solution
        self.mapped = MappedState(state_path, self.specs, sol.slope, sol.intercept, self.rank, sol.clock)
        self.base_mapped = MappedSource(self.src_base)
        return state_path

    @torch.no_grad()
    def write_horizon(self, out_dir: str, horizon: int, tcut: int, overwrite: bool = False) -> str:
        t = time.perf_counter()
        early = self.early.pop(int(horizon), None)
        if early is not None and not early.complete():  # a bug, never the input's: written from the state file
            early.abort()
            early = None
        try:
            with one_thread():
                return write_horizon_streaming(out_dir, horizon, tcut, self.mapped,
                                               lambda i: self.base_mapped.get(self.specs[i].name).reshape(-1),
                                               self.src_base, overwrite=overwrite,
                                               max_shard_size=self.max_shard_size, run_id=self.run_id, early=early)
        finally:
            self.stamps["horizons"] = self.stamps.get("horizons", 0.0) + time.perf_counter() - t

    def close(self):
        self.drop_early()
        for m in (self.mapped, self.base_mapped):
            if m is not None:
                m.close()
        self.mapped = self.base_mapped = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


__all__ = ["EarlyHorizon", "FileReader", "MappedState", "coef_at", "horizon_meta", "StreamedWriter",
           "merge_state_parts", "safetensors_header", "write_horizon_streaming", "write_shard_streaming",
           "write_weights_streaming", "ST_CODES"]
