"""The trajectory store: theta_0 and a ring of weight deltas in one arena per rank.

Layout: every tracked tensor (this rank's piece of it, flattened) is a column segment ``[offset, offset+n)`` of
an arena of ``D`` columns. ``theta0`` is one flat tensor of length ``D`` in the parameters' dtype (or float32 when
tracked tensors mix dtypes: every 16-bit value is exact in float32). The buffer ``M`` is ``K x D`` in the buffer
dtype; row ``i`` holds ``Delta_t = theta_t - theta_0`` (computed in float32) for the i-th recorded step. Rows are
always kept in step order.

Tiers: ``device`` (accelerator memory), ``host`` (CPU memory, pinned when CUDA is present, copies on a side
stream), ``disk`` (a memory-mapped file in ``directory``, allocated in full up front; survives a crash), ``auto``
(the fastest that fits).

Trainer checkpoints (:meth:`TrajectoryStore.save`): the bytes of the trajectory are written once, in the run
directory (``<relex output_dir>/trajectory/``): ``theta0.safetensors`` once, and at each checkpoint one
``rows-*.bin`` file holding only the rows recorded since the previous checkpoint (``basis-*.bin`` once per fold).
Each checkpoint's ``relex_trajectory/`` hard-links those files (a plain copy only across file systems) and adds its
own ``trajectory.json``, so a checkpoint costs the new rows plus metadata, older checkpoints stay valid when the
trainer deletes newer or older ones, and a checkpoint still resumes after the run directory is deleted. Files are
never modified once linked: a new version is always a new file renamed into place. The disk tier's memory-mapped
``trajectory.bin`` is itself the linked file (its rows up to a checkpoint never change afterwards; a fold or a
replay after a resume first moves the ring to a fresh file when a checkpoint still links the old one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
import weakref
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..config import dtype_name, torch_dtype
from ..errors import RelexError, RelexInputError, RelexMemoryError, RelexNonFiniteError
from ..files.fs import atomic_file, describe_failure, write_failure, write_json
from ..params import TensorSpec

logger = logging.getLogger("relex_callback")

GiB = 1024**3
# Largest number of elements converted to float32 at once while snapshotting (bounds the temporary memory).
SNAPSHOT_CHUNK = 1 << 20  # CPU: a 4 MiB float32 scratch stays in cache
SNAPSHOT_CHUNK_DEVICE = 1 << 24
BUFFER_FILE = "trajectory.bin"
META_FILE = "trajectory.json"
THETA0_FILE = "theta0.safetensors"
FOLD_FILE = "fold.safetensors"
TRAJECTORY_DIR = "relex_trajectory"  # inside each trainer checkpoint: the window so far, for resume
RUN_TRAJECTORY_DIR = "trajectory"  # inside the relex output_dir: the files each checkpoint links
LOCK_FILE = ".relex-lock.json"  # inside the relex output_dir while a callback owns it
META_VERSION = 2


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def theta0_dtype(specs: Sequence[TensorSpec]) -> torch.dtype:
    dts = {s.dtype for s in specs}
    if len(dts) == 1:
        return dts.pop()
    return torch.float64 if torch.float64 in dts else torch.float32


def available_host_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency of accelerate
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _madvise_populate():
    """``madvise`` from libc with ``MADV_POPULATE_WRITE`` semantics, or None where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lambda lo, n: libc.madvise(lo, n, _MADV_POPULATE_WRITE) == 0
    except Exception:  # pragma: no cover - no libc
        return None


def prefault(t: torch.Tensor) -> bool:
    """Back a large CPU tensor with physical pages now (``madvise(MADV_POPULATE_WRITE)``): the kernel zero-fills them
    in one batch instead of taking a page fault per 4 KiB when a training step first writes them.

    Measured on the 2-core VM (39M-element bf16 rows): a snapshot into fresh pages took 30 ms, into populated pages
    14 ms, so the callback populates its buffer once when it is allocated, outside the training steps. The CLI does
    not: there every row is written exactly once right away, and lazy faults measured faster end to end (1.62 s vs
    1.95 s reading 20 checkpoints into a 3 GB buffer, interleaved runs). Transparent huge pages are not requested:
    with ``defrag=madvise`` their direct compaction stalled for seconds here. Returns whether the pages were
    populated (False off Linux >= 5.14: pages are then faulted in lazily)."""
    n = t.numel() * t.element_size()
    populate = _madvise_populate() if t.device.type == "cpu" and n >= (16 << 20) else None
    if populate is None:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    lo = -(-t.data_ptr() // page) * page
    hi = (t.data_ptr() + n) // page * page
    return hi > lo and populate(lo, hi - lo)


def save_theta0(directory: str, theta0: torch.Tensor):
    """Write a flat theta_0 arena as ``directory/theta0.safetensors`` atomically."""
    from safetensors.torch import save_file

    with atomic_file(os.path.join(directory, THETA0_FILE)) as tmp:
        save_file({"theta0": theta0.detach().cpu().contiguous()}, tmp)


def available_disk_bytes(directory: str) -> int:
    d = directory
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    return shutil.disk_usage(d or ".").free


def link_or_copy(src: str, dst: str) -> str:
    """Make ``dst`` name the bytes of ``src``: a hard link (no bytes written), or a copy when the two paths are on
    different file systems (``EXDEV``) or the file system has no hard links. Atomic: a temporary name renamed over
    ``dst``, so an existing ``dst`` (another inode, possibly linked from elsewhere) is replaced, never written into.
    Returns ``"same"``, ``"link"`` or ``"copy"``."""
    try:
        a, b = os.stat(src), os.stat(dst)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return "same"
    except FileNotFoundError:
        pass
    tmp = f"{dst}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        os.link(src, tmp)
        how = "link"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            raise
        with atomic_file(dst) as t:
            shutil.copyfile(src, t)
        return "copy"
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return how


def allocate_file(path: str, nbytes: int, what: str = "the disk-tier trajectory buffer"):
    """Create ``path`` (a new inode, renamed into place) with ``nbytes`` allocated on disk now
    (``posix_fallocate``), so that a full disk is an error here and never a ``SIGBUS`` when a memory-mapped page is
    first written during training. Raises :class:`RelexMemoryError` when the file system is full."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise RelexMemoryError(
                    f"{what} needs {_fmt(nbytes)} in {os.path.dirname(path)} but the file system refused to allocate "
                    f"it ({e.strerror}; {_fmt(available_disk_bytes(os.path.dirname(path)))} free): free disk space, "
                    "put output_dir on a larger disk, or use storage='host' / a larger stride"
                ) from None
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            _write_zeros(fd, nbytes)  # a file system without fallocate: allocate by writing
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_zeros(fd: int, nbytes: int):
    block = bytes(1 << 20)
    done = 0
    try:
        while done < nbytes:
            done += os.write(fd, block[: min(len(block), nbytes - done)])
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RelexMemoryError(f"the disk-tier trajectory buffer needs {_fmt(nbytes)} but the disk is full after "
                                   f"{_fmt(done)}: free disk space or use storage='host'") from None
        raise


def _fingerprints(tensors: Sequence[torch.Tensor]) -> list:
    from ..files.state import fingerprint

    return [fingerprint(t) for t in tensors]


class TrajectoryStore:
    """Per-rank store of theta_0 and the recorded deltas.

    Args:
        specs (`list[TensorSpec]`): the tracked tensors, in arena order. Their ``offset`` is assigned here.
        capacity (`int`): number of slots K (rows).
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"bfloat16"`): buffer dtype.
        storage (`str`, *optional*, defaults to `"auto"`): ``auto``, ``device``, ``host`` or ``disk``.
        device (`torch.device`, *optional*): where the parameters live (theta_0 is kept there).
        directory (`str`, *optional*): run directory; required for the ``disk`` tier.
        max_bytes (`int`, *optional*): upper bound on the buffer's bytes.
        fold_rank (`int`, *optional*): when set, a full ring is folded into a rank-``fold_rank`` factorisation per
            tensor instead of raising (``relex_callback.core.fold``); the arena then has ``fold_rank + capacity`` rows.
        prefault (`bool`, *optional*, defaults to `True`): populate the pages of a CPU buffer and of theta_0 when
            they are allocated (see :func:`prefault`) rather than at first write.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        capacity: int,
        *,
        dtype="bfloat16",
        storage: str = "auto",
        device=None,
        directory: Optional[str] = None,
        max_bytes: Optional[int] = None,
        check_finite: bool = True,
        fold_rank: Optional[int] = None,
        prefault: bool = True,
        skip_unchanged: bool = True,
        _allocate: bool = True,
    ):
        if not specs:
            raise RelexInputError("nothing to track: no tensors were selected")
        self.specs = list(specs)
        off = 0
        for s in self.specs:
            s.offset = off
            off += s.local_numel
        self.D = off
        self._specs_json = [s.to_json() for s in self.specs]  # fixed from here on; written with every metadata update
        self.K = int(capacity)
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.directory = directory
        self.max_bytes = max_bytes
        self.check_finite = check_finite
        self.theta0_dtype = theta0_dtype(self.specs)
        self.steps: list[int] = []
        self.theta0: Optional[torch.Tensor] = None
        self.M: Optional[torch.Tensor] = None
        # streaming fold (None: off, the ring must hold the whole window)
        self.fold_rank = int(fold_rank) if fold_rank else None
        self.arena: Optional[torch.Tensor] = None  # [fold_rank + K, D]; M is a view of its last K rows
        self._reset_fold()
        self.run_id: Optional[str] = None  # names this window; kept across resumes, checked against trainer_state
        self.window: dict = {}  # the settings a resume must share (tcut, stride, world); set by open_window
        self.skipped_unchanged_steps: list[int] = []  # steps whose weights did not move (e.g. a skipped AMP step)
        # training: a step that did not move the weights is no progress (skipped); offline replays of saved
        # checkpoints record what they are given (two equal checkpoints are two observations)
        self.skip_unchanged = skip_unchanged
        self._last_sums: Optional[torch.Tensor] = None  # [S] float32 sums of the last recorded delta, per tensor
        # distributed runs (set by open_window): ``reduce`` sums the fold's [S, R, R] Grams over processes (sharded
        # modes: the fold then sees whole tensors, like the final solve); ``consensus`` sums a small int64 tensor
        # over processes, so every process records (or skips) the same steps and folds at the same steps
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.consensus: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._meta_warned = False
        self.saved: dict = {}  # from load(): saved_step and the live-weight fingerprints at that step
        # rows persisted in the run directory for checkpoints to link (host/device tiers; see save())
        self._theta0_file: Optional[str] = None
        self._basis_entry: Optional[dict] = None  # {"file", "row", "rows"}: the fold basis rows
        self._ring_entries: list[dict] = []  # ring rows 0.. in files, in order
        self.storage = self.choose_storage(storage)
        self._stream = None
        self._staging = None
        self._event = None
        self._scratch = None
        self.prefault_pages = prefault
        if _allocate:
            self._allocate()

    # ------------------------------------------------------------------ sizes
    @property
    def buffer_bytes(self) -> int:
        return self.rows_allocated * self.D * self.dtype.itemsize

    @property
    def rows_allocated(self) -> int:
        return self.K + (self.fold_rank or 0)

    @property
    def theta0_bytes(self) -> int:
        return self.D * self.theta0_dtype.itemsize

    @staticmethod
    def estimate(specs: Sequence[TensorSpec], capacity: int, dtype="bfloat16") -> dict:
        """Bytes needed before allocating anything: ``buffer`` (K x D in the buffer dtype) and ``theta0``."""
        D = sum(s.local_numel for s in specs)
        dt = torch_dtype(dtype)
        return {
            "elements": D,
            "slots": int(capacity),
            "buffer": int(capacity) * D * dt.itemsize,
            "theta0": D * theta0_dtype(specs).itemsize,
        }

    def choose_storage(self, storage: str) -> str:
        need = self.buffer_bytes
        what = f"{self.rows_allocated} rows x {self.D:,} elements x {self.dtype.itemsize} bytes ({dtype_name(self.dtype)})"
        options = (
            "raise stride (fewer slots), use dtype='bfloat16', storage='disk' (memory-mapped file in the output "
            "directory) or storage='host'"
        )
        if self.max_bytes is not None and need > self.max_bytes:
            raise RelexMemoryError(
                f"the trajectory buffer needs {_fmt(need)} ({what}) but max_buffer_bytes is {_fmt(self.max_bytes)}; "
                f"{options}, or raise max_buffer_bytes"
            )
        on_accel = self.device.type != "cpu"
        if storage == "auto":
            if on_accel and need <= 0.5 * available_device_bytes(self.device):
                storage = "device"
            elif need <= 0.5 * available_host_bytes():
                storage = "host"
            elif self.directory is not None and need <= available_disk_bytes(self.directory):
                storage = "disk"
            else:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) and fits neither in device memory, nor in half "
                    f"of the free host memory ({_fmt(available_host_bytes())}), nor on disk; {options}"
                )
            logger.info("relex: trajectory buffer %s on tier %r (auto)", _fmt(need), storage)
            return storage
        if storage == "disk":
            if self.directory is None:
                raise RelexInputError("storage='disk' needs a directory for the memory-mapped buffer")
            free = available_disk_bytes(self.directory)
            if need > free:
                raise RelexMemoryError(f"the trajectory buffer needs {_fmt(need)} ({what}) but the disk has {_fmt(free)} free; {options}")
        elif storage == "device":
            free = available_device_bytes(self.device)
            if need > free:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) but {self.device} has {_fmt(free)} free; {options}"
                )
        elif storage == "host":
            free = available_host_bytes()
            if need > free:
                raise RelexMemoryError(f"the trajectory buffer needs {_fmt(need)} ({what}) but the host has {_fmt(free)} free; {options}")
        else:
            raise RelexInputError(f"storage={storage!r} is not one of ['auto', 'device', 'host', 'disk']")
        return storage

    # ------------------------------------------------------------- allocation
    def _allocate(self, reuse_file: bool = False):
        shape = (self.rows_allocated, self.D)
        if self.storage == "device":
            self.M = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif self.storage == "host":
            pin = torch.cuda.is_available() and self.device.type == "cuda"
            self.M = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
            if not pin and self.prefault_pages:
                prefault(self.M)
            if pin:
                self._stream = torch.cuda.Stream(device=self.device)
                self._staging = torch.empty(self.D, dtype=self.dtype, device=self.device)
        elif self.storage == "disk":
            self.M = self._map_disk(fresh=not reuse_file)
        else:  # pragma: no cover
            raise AssertionError(self.storage)
        if self.fold_rank:
            self.arena = self.M
            self.M = self.arena[self.fold_rank :]

    def _map_disk(self, fresh: bool = True) -> torch.Tensor:
        """Map ``directory/trajectory.bin`` as the ``[rows, D]`` arena. ``fresh``: a new, fully allocated file (a new
        inode: a file a checkpoint links is never written into), else the existing file (read it in place)."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, BUFFER_FILE)
        n = self.rows_allocated * self.D
        if fresh or not os.path.exists(path):
            allocate_file(path, n * self.dtype.itemsize)
        elif os.path.getsize(path) < n * self.dtype.itemsize:
            raise RelexInputError(f"{path} holds {os.path.getsize(path)} bytes, fewer than the {n * self.dtype.itemsize} "
                                  "its metadata describes: the trajectory is damaged")
        return torch.from_file(path, shared=True, size=n, dtype=self.dtype).view(self.rows_allocated, self.D)

    def _disk_file_linked(self) -> bool:
        try:
            return os.stat(os.path.join(self.directory, BUFFER_FILE)).st_nlink > 1
        except OSError:
            return False

    def _move_arena_to_fresh_file(self, copy_rows: bool = True) -> torch.Tensor:
        """Disk tier: continue in a new file (the old one stays, unchanged, for the checkpoints that link it).
        ``copy_rows``: copy the rows in use; the caller fills the new file otherwise. Returns the new arena."""
        self.synchronize()
        old = self.arena if self.fold_rank else self.M
        new = self._map_disk(fresh=True)
        if copy_rows:
            lo = (self.fold_rank - self.basis_rows) if self.fold_rank else 0
            hi = (self.fold_rank or 0) + self.num_ring_rows
            new[lo:hi].copy_(old[lo:hi])
        if self.fold_rank:
            self.arena, self.M = new, new[self.fold_rank :]
        else:
            self.M = new
        return new

    # --------------------------------------------------------------- theta_0
    def set_theta0(self, tensors: Iterable[torch.Tensor]):
        theta0 = torch.empty(self.D, dtype=self.theta0_dtype, device=self.device)
        if self.prefault_pages:
            prefault(theta0)
        for spec, t in zip(self.specs, tensors, strict=True):
            if t.numel() != spec.local_numel:
                raise RelexInputError(f"{spec.name}: expected {spec.local_numel} elements, got {t.numel()}")
            theta0[spec.offset : spec.offset + spec.local_numel].copy_(t.reshape(-1))
        self.theta0 = theta0
        self.steps = []
        self._reset_fold()
        self.run_id = uuid.uuid4().hex
        self._last_sums = None
        self._theta0_file, self._basis_entry, self._ring_entries = None, None, []
        if self.storage == "disk":
            self._save_theta0(self.directory)
            self._theta0_file = os.path.join(self.directory, THETA0_FILE)
            self._write_meta(self.directory)

    def theta0_of(self, spec: TensorSpec) -> torch.Tensor:
        return self.theta0[spec.offset : spec.offset + spec.local_numel].to(spec.dtype)

    # -------------------------------------------------------------- snapshot
    @property
    def num_rows(self) -> int:
        return len(self.steps)

    @property
    def num_ring_rows(self) -> int:
        return len(self.steps) - len(self.folded_steps)

    def _slot_for(self, step: int) -> Optional[int]:
        if step in self.folded_steps:
            return None  # already folded into the factorisation: the step is recorded
        if step in self.steps:
            return self.steps.index(step) - len(self.folded_steps)  # the same step twice is one row
        if self.steps and step < self.steps[-1]:
            raise RelexInputError(
                f"snapshot for step {step} after step {self.steps[-1]}: steps must increase (call truncate() when "
                f"training resumed from an earlier checkpoint)"
            )
        if self.num_ring_rows >= self.K and self.fold_rank:
            self.fold()
        if self.num_ring_rows >= self.K:
            raise RelexMemoryError(
                f"the trajectory buffer is full ({self.K} slots) at step {step}; raise the capacity or the stride"
            )
        return self.num_ring_rows

    def truncate(self, last_step: int):
        """Forget rows recorded after ``last_step`` (a resume from an earlier checkpoint will replay them)."""
        if self.folded_steps and last_step < self.folded_steps[-1]:
            raise RelexInputError(
                f"cannot go back to step {last_step}: steps up to {self.folded_steps[-1]} were already folded into the "
                f"factorisation; resume from the checkpoint whose trajectory was saved at step {last_step}"
            )
        kept = [s for s in self.steps if s <= last_step]
        if len(kept) == len(self.steps):
            return
        self.steps = kept
        self._last_sums = None
        ring = self.num_ring_rows
        entries, n = [], 0
        for e in self._ring_entries:  # persisted ring rows beyond the new end are dropped (files stay for checkpoints)
            if n >= ring:
                break
            entries.append(dict(e, rows=min(e["rows"], ring - n)))
            n += entries[-1]["rows"]
        self._ring_entries = entries
        if self.storage == "disk":
            if self._disk_file_linked():  # a checkpoint links rows that a replay would overwrite
                self._move_arena_to_fresh_file()
            self._write_meta(self.directory)

    @torch.no_grad()
    def snapshot(self, step: int, tensors: Iterable[torch.Tensor]):
        """Record Delta_step = theta_step - theta_0 (float32 arithmetic, stored in the buffer dtype)."""
        if self.theta0 is None:
            raise RuntimeError("set_theta0() must be called before snapshot()")
        slot = self._slot_for(step)
        if slot is None:
            return
        if self._staging is not None:
            target = self._staging
            if self._event is not None:
                self._event.synchronize()
        else:
            target = self.M[slot]
        # Delta in float32 through a small reusable scratch (stays in cache), one rounding into the buffer dtype
        # (measured 2.5x faster on CPU than a bfloat16 `out` or a fresh temporary per chunk). The finiteness check
        # rides on the same in-cache data: a chunk's float32 sum is NaN/Inf iff the chunk holds a NaN/Inf (or deltas
        # near 1e38, which are as broken); no second pass over the stored row.
        chunk = SNAPSHOT_CHUNK if self.theta0.device.type == "cpu" else SNAPSHOT_CHUNK_DEVICE
        if self._scratch is None or self._scratch.device != self.theta0.device:  # once: specs and chunk are fixed
            need = min(chunk, max(s.local_numel for s in self.specs))
            self._scratch = torch.empty(need, dtype=torch.float32, device=self.theta0.device)
        sums = []
        for spec, t in zip(self.specs, tensors, strict=True):
            src = t.reshape(-1)
            o, n = spec.offset, spec.local_numel
            th0 = self.theta0[o : o + n]
            acc = None
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                buf = self._scratch[: e - s]
                a = src[s:e]
                if a.dtype == torch.float32 and th0.dtype == torch.float32 and a.device == buf.device:
                    torch.sub(a, th0[s:e], out=buf)
                else:
                    buf.copy_(a)
                    buf.sub_(th0[s:e])
                cs = buf.sum()  # finiteness and the unchanged-step check ride on it
                acc = cs if acc is None else acc + cs
                target[o + s : o + e].copy_(buf)
            sums.append(acc if acc is not None else torch.zeros((), device=self.theta0.device))
        sums = torch.stack(sums).cpu()  # one host sync for all tensors
        bad = ~torch.isfinite(sums) if self.check_finite else torch.zeros(len(sums), dtype=torch.bool)
        new_row = slot == self.num_ring_rows
        same = self.skip_unchanged and new_row and not bool(bad.any()) and self._same_as_previous(slot, target, sums)
        any_bad, all_same = bool(bad.any()), same
        if self.consensus is not None:  # one verdict for every process: the same steps everywhere
            votes = self.consensus(torch.tensor([int(any_bad), int(not same)], dtype=torch.int64))
            any_bad, all_same = bool(votes[0] > 0), bool(votes[1] == 0)
        if any_bad:
            names = [self.specs[i].name for i in torch.nonzero(bad).flatten().tolist()]
            where = (f"in {len(names)} tensor(s): {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                     if names else "on another process")
            raise RelexNonFiniteError(
                f"non-finite weight delta at step {step} {where}; the step was not recorded (the training run diverged "
                "or overflowed)"
            )
        if self.skip_unchanged and new_row and all_same:
            self.skipped_unchanged_steps.append(int(step))
            logger.warning(
                "relex: the weights did not change at step %d (an optimizer step skipped by the loss scaler, a zero "
                "learning rate, or a zero gradient: in GRPO, a batch whose groups all had one reward); the step is not "
                "recorded (%d such step(s) so far)", step, len(self.skipped_unchanged_steps),
            )
            return
        if self._staging is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.M[slot].copy_(self._staging, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
        if slot == self.num_ring_rows:
            self.steps.append(int(step))
            self._last_sums = sums
        if self.storage == "disk":
            try:  # on the training step: atomic, no disk flush
                self._write_meta(self.directory, durable=False)
            except OSError as e:  # crash-recovery metadata only (the rows are in the allocated file): go on
                if not self._meta_warned:
                    self._meta_warned = True
                    logger.warning("relex: cannot update %s (%s); training goes on, but a crash now would leave "
                                   "stale metadata there", os.path.join(self.directory, META_FILE), describe_failure(e))

    def _same_as_previous(self, slot: int, row: torch.Tensor, sums: torch.Tensor) -> bool:
        """Whether the delta just computed for a new step equals the previous recorded one exactly on this process (the
        weights did not move: an optimizer step skipped by a mixed-precision loss scaler still advances
        ``global_step``; a zero gradient under Adam's first steps). The per-tensor sums decide cheaply; equal sums are
        confirmed on the whole row when the previous row is in the ring (after a fold or a resume it may not be: then
        equal sums over every tensor decide). Such a step is not recorded (when every process agrees) and is counted
        in ``skipped_unchanged_steps``."""
        prev = self._last_sums if self.steps else torch.zeros_like(sums)
        if prev is not None and not torch.equal(prev, sums):
            return False
        if not self.steps:
            return not bool(row.any())  # weights still theta_0
        if slot > 0:
            self.synchronize()
            prev_row = self.M[slot - 1]
            return torch.equal(row, prev_row if prev_row.device == row.device else prev_row.to(row.device))
        return prev is not None

    def synchronize(self):
        if self._event is not None:
            self._event.synchronize()

    def rows(self) -> torch.Tensor:
        """The recorded rows, in step order: a view ``[T, D]`` (no copy). A folded store has no such matrix: use
        :meth:`solve_inputs`."""
        if self.folded_steps:
            raise RuntimeError("the trajectory was folded; use solve_inputs() instead of rows()")
        self.synchronize()
        return self.M[: len(self.steps)]

    # ------------------------------------------------------------------ fold
    def _reset_fold(self):
        self.folded_steps: list[int] = []
        self.basis_rows = 0  # rows of W in use (0 before the first fold, fold_rank after)
        self.L = torch.zeros(len(self.specs), 0, 0, dtype=torch.float64)  # [S, T_folded, basis_rows]
        self.folded_sq = torch.zeros(len(self.specs), dtype=torch.float64)  # [S] exact ||folded rows||_F^2
        self.folds = 0

    @property
    def folded(self) -> bool:
        return bool(self.folded_steps)

    def _rows_in_use(self) -> torch.Tensor:
        """``B = [W^T; R]``: the basis rows in use followed by the ring rows, a contiguous view of the arena."""
        r = self.fold_rank
        return self.arena[r - self.basis_rows : r + self.num_ring_rows]

    def _left(self) -> torch.Tensor:
        """``C = diag(L_i, I)`` per tensor: ``[S, T_folded + k, basis_rows + k]`` float64."""
        S, Tf, b = self.L.shape
        k = self.num_ring_rows
        C = torch.zeros(S, Tf + k, b + k, dtype=torch.float64)
        C[:, :Tf, :b] = self.L
        C[:, Tf:, b:] = torch.eye(k, dtype=torch.float64)
        return C

    def _ring_sq(self, G_B: torch.Tensor) -> torch.Tensor:
        b = self.basis_rows
        return torch.diagonal(G_B[:, b:, b:], dim1=1, dim2=2).sum(-1)

    @torch.no_grad()
    def fold(self):
        """Fold every delta in the ring into the rank-``fold_rank`` factorisation and free the slots."""
        from ..core.kernels.reference import project_reference
        from ..core.solver import factor_left

        if not self.fold_rank:
            raise RuntimeError("this store was created without fold_rank")
        if not self.num_ring_rows:
            return
        self.synchronize()
        B = self._rows_in_use()
        C = self._left()
        sigma, U, X, G_B, _ = factor_left(B, C, self.specs, self.fold_rank, reduce=self.reduce)
        self.folded_sq = self.folded_sq + self._ring_sq(G_B)
        r = self.fold_rank
        out = self.arena
        if self.storage == "disk" and self._disk_file_linked():
            # a checkpoint links the mapped file: the new basis goes to a fresh file, the old one stays as linked
            old_arena = self.arena
            out = self._move_arena_to_fresh_file(copy_rows=False)
            B = old_arena[r - self.basis_rows : r + self.num_ring_rows]
        # the new basis overwrites rows of B when written in place: safe in the chunked reference, which computes
        # each chunk's product in full before writing it (the Triton kernel makes no such promise)
        project_reference(B, [s.offset for s in self.specs], [s.local_numel for s in self.specs], X, out[:r])
        self._drop_entries()
        self.L = U * sigma.unsqueeze(1)  # [S, T, r]
        self.folded_steps = list(self.steps)
        self.basis_rows = r
        self.folds += 1
        if self.storage == "disk":
            self._save_fold(self.directory)
            self._write_meta(self.directory)

    def solve_inputs(self) -> dict:
        """Keyword arguments for :func:`relex_callback.core.solver.solve`: ``M`` and ``steps`` (plus ``left``,
        ``folded_sq`` and ``folded_steps`` for a folded store). Unfolded: exactly ``rows()`` and ``steps``."""
        if not self.folded_steps:
            return {"M": self.rows(), "steps": list(self.steps)}
        self.synchronize()
        return {"M": self._rows_in_use(), "steps": list(self.steps), "left": self._left(), "folded_sq": self.folded_sq,
                "folded_steps": len(self.folded_steps)}

    def release(self):
        """Free the buffer memory (the disk file stays until the directory is removed)."""
        self.synchronize()
        self.M = None
        self._staging = None
        self._scratch = None
        self.arena = None

    def _drop_entries(self):
        """Forget the persisted rows (a fold replaced them): unlink their files from the run directory; the
        checkpoints that link them keep theirs."""
        names = {e["file"] for e in self._ring_entries + ([self._basis_entry] if self._basis_entry else [])}
        self._ring_entries, self._basis_entry = [], None
        for name in names:
            if name != BUFFER_FILE and self.directory:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))

    def discard_files(self, keep: Sequence[str] = ()) -> int:
        """Delete the run directory's files (the disk tier's buffer, theta_0, metadata, the rows persisted for
        checkpoints) once the window's result is written; returns the bytes freed (a file a checkpoint still links
        frees nothing: its bytes stay with the checkpoint)."""
        if not self.directory or not os.path.isdir(self.directory):
            return 0
        self.release()
        freed = 0
        names = [BUFFER_FILE, META_FILE, THETA0_FILE, FOLD_FILE]
        names += [n for n in os.listdir(self.directory) if n.startswith(("rows-", "basis-"))]
        for name in (n for n in names if n not in keep):
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                st = os.stat(path)
                freed += st.st_size if st.st_nlink == 1 else 0
                os.remove(path)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # something else lives there: leave it
        return freed

    # ------------------------------------------------------------ persistence
    def meta(self) -> dict:
        return {
            "version": META_VERSION,
            "K": self.K,
            "D": self.D,
            "dtype": dtype_name(self.dtype),
            "theta0_dtype": dtype_name(self.theta0_dtype),
            "steps": list(self.steps),
            "specs": self._specs_json,
            "fold_rank": self.fold_rank,
            "folded_steps": list(self.folded_steps),
            "folds": self.folds,
            "basis_rows": self.basis_rows,
            "run_id": self.run_id,
            "window": dict(self.window),
            "skipped_unchanged_steps": list(self.skipped_unchanged_steps),
            "last_sums": self._last_sums.tolist() if self._last_sums is not None else None,
            "files": self._disk_entries() if self.storage == "disk" else None,
        }

    def _disk_entries(self) -> list:
        """The disk tier's rows in use, in its mapped file (the file is the whole arena)."""
        row0 = (self.fold_rank - self.basis_rows) if self.fold_rank else 0
        n = self.basis_rows + self.num_ring_rows
        return [{"file": BUFFER_FILE, "row": row0, "rows": n}] if n else []

    def _save_fold(self, directory: str):
        from safetensors.torch import save_file

        with atomic_file(os.path.join(directory, FOLD_FILE)) as tmp:
            save_file({"L": self.L.contiguous(), "folded_sq": self.folded_sq.contiguous()}, tmp)

    def _write_meta(self, directory: str, durable: bool = True, meta: Optional[dict] = None):
        """Write the metadata atomically (temporary + rename: a killed process leaves the old or the new file).
        ``durable=False`` skips the fsync: the disk tier's per-snapshot update, whose rows live in a memory-mapped
        file that is not msync'd either, so an fsync there would flush the disk on every training step without
        making the trajectory survive a power loss."""
        write_json(os.path.join(directory, META_FILE), meta or self.meta(), durable=durable)

    def _save_theta0(self, directory: str):
        save_theta0(directory, self.theta0)

    @staticmethod
    def _write_rows(path: str, rows: torch.Tensor):
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                if rows.numel():
                    rows.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(f)

    def _persist(self) -> list:
        """Make the run directory hold every row in use in files that never change: theta_0 once, the fold basis
        once per fold, and the ring rows not persisted yet as one new file. Returns the entries (``file``, first
        ``row`` in it, number of ``rows``) in arena order, basis first. A file missing from the run directory (it
        was deleted) is written again from memory."""
        run = self.directory
        os.makedirs(run, exist_ok=True)
        if self._theta0_file is None or not os.path.exists(self._theta0_file):
            self._save_theta0(run)
            self._theta0_file = os.path.join(run, THETA0_FILE)
        if self.storage == "disk":
            fd = os.open(os.path.join(run, BUFFER_FILE), os.O_RDONLY)
            try:  # the rows a checkpoint links reach the disk with it (the mapped pages are not msync'd per step)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._disk_entries()
        token = uuid.uuid4().hex[:8]
        r = self.fold_rank or 0
        if self.basis_rows and not (self._basis_entry and os.path.exists(os.path.join(run, self._basis_entry["file"]))):
            name = f"basis-{self.folds:04d}-{token}.bin"
            self._write_rows(os.path.join(run, name), self.arena[r - self.basis_rows : r])
            self._basis_entry = {"file": name, "row": 0, "rows": self.basis_rows}
        entries, pos = [], 0
        for e in self._ring_entries:
            if not os.path.exists(os.path.join(run, e["file"])):
                name = f"rows-again-{len(entries):04d}-{token}.bin"
                self._write_rows(os.path.join(run, name), self.M[pos : pos + e["rows"]])
                e = {"file": name, "row": 0, "rows": e["rows"]}
            entries.append(e)
            pos += e["rows"]
        if self.num_ring_rows > pos:
            new = self.steps[len(self.folded_steps) + pos :]
            name = f"rows-{new[0]:06d}-{new[-1]:06d}-{token}.bin"
            self._write_rows(os.path.join(run, name), self.M[pos : self.num_ring_rows])
            entries.append({"file": name, "row": 0, "rows": self.num_ring_rows - pos})
        self._ring_entries = entries
        return ([self._basis_entry] if self.basis_rows else []) + list(entries)

    def save(self, directory: str, *, live: Optional[Sequence[torch.Tensor]] = None, step: Optional[int] = None):
        """Write the window so far to ``directory`` (a trainer checkpoint's ``relex_trajectory/``).

        With a run directory (``directory`` given at construction, another path than ``directory``) the rows are
        persisted there once (see :meth:`_persist`) and hard-linked here: this checkpoint adds the rows recorded
        since the previous one plus ``trajectory.json``. Without one, every byte is written here.

        Args:
            directory (`str`): where to write.
            live (`list[torch.Tensor]`, *optional*): the tracked tensors' current values: their fingerprints are
                recorded, so a resume can check that the weights it resumed with are the ones saved here.
            step (`int`, *optional*): the trainer's ``global_step`` at this save.
        """
        os.makedirs(directory, exist_ok=True)
        self.synchronize()
        here = os.path.abspath(directory)
        if self.directory is None or here == os.path.abspath(self.directory):
            if self.storage == "disk" and self.directory is not None:
                entries = self._disk_entries()
                if not os.path.exists(os.path.join(directory, THETA0_FILE)):
                    self._save_theta0(directory)
            else:
                self._save_theta0(directory)
                rows = self._rows_in_use() if self.fold_rank else self.M[: len(self.steps)]
                self._write_rows(os.path.join(directory, BUFFER_FILE), rows)
                entries = [{"file": BUFFER_FILE, "row": 0, "rows": int(rows.shape[0])}] if rows.shape[0] else []
        else:
            entries = self._persist()
            link_or_copy(self._theta0_file, os.path.join(directory, THETA0_FILE))
            names = list(dict.fromkeys(e["file"] for e in entries))
            for name in names:
                link_or_copy(os.path.join(self.directory, name), os.path.join(directory, name))
            for stale in os.listdir(directory):  # a checkpoint directory saved again (after a resume)
                if stale not in names and (stale.startswith(("rows-", "basis-")) or stale == BUFFER_FILE):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(directory, stale))
        if self.folded_steps:
            self._save_fold(directory)
        meta = self.meta()
        meta["files"] = entries
        if step is not None:
            meta["saved_step"] = int(step)
        if live is not None:
            meta["live"] = _fingerprints(live)
        self._write_meta(directory, meta=meta)

    @staticmethod
    def read_meta(directory: str) -> dict:
        try:
            with open(os.path.join(directory, META_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RelexInputError(f"cannot read the saved trajectory in {directory}: {e}") from None

    @staticmethod
    def check_compatible(meta: dict, directory: str, specs: Sequence[TensorSpec], dtype, window: Optional[dict] = None):
        """Refuse, naming what differs, a saved trajectory this run cannot continue: other tensors (model,
        include/exclude, world size), another buffer dtype, or another window (tcut, stride, world size)."""
        saved = [TensorSpec.from_json(d) for d in meta["specs"]]
        key = lambda s: (s.name, tuple(s.shape), s.local_numel, s.flat_start)  # noqa: E731
        if [key(s) for s in saved] != [key(s) for s in specs]:
            a, b = {s.name: key(s) for s in saved}, {s.name: key(s) for s in specs}
            only_saved, only_here = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            diff = [n for n in a if n in b and a[n] != b[n]]
            what = "; ".join(x for x in (
                f"only in the checkpoint: {only_saved[:3]}" if only_saved else "",
                f"only in this run: {only_here[:3]}" if only_here else "",
                f"{diff[0]}: shape/piece {a[diff[0]][1:]} saved vs {b[diff[0]][1:]} now" if diff else "",
            ) if x) or "the same tensors in another order"
            raise RelexInputError(
                f"the trajectory saved in {directory} tracks other tensors than this run ({len(saved)} saved, "
                f"{len(specs)} now; {what}): different model, include/exclude or world size; resume with the settings "
                "and world size of the run that saved it, or start from a checkpoint of this run"
            )
        if meta["dtype"] != dtype_name(torch_dtype(dtype)):
            raise RelexInputError(f"the trajectory in {directory} is {meta['dtype']}, this run asks for {dtype}; use the same dtype")
        saved_w = meta.get("window") or {}
        if window:
            diff = [f"{k}={saved_w[k]} saved vs {k}={window[k]} now" for k in ("tcut", "stride", "world")
                    if k in saved_w and k in window and saved_w[k] != window[k]]
            if diff:
                raise RelexInputError(
                    f"the trajectory in {directory} was recorded with other settings ({', '.join(diff)}): its rows do "
                    "not fit this window. Resume with the settings it was saved with, or start a new window from step 0 "
                    "(another output_dir, without resume_from_checkpoint)"
                )

    @classmethod
    def load(
        cls,
        directory: str,
        specs: Sequence[TensorSpec],
        capacity: int,
        *,
        dtype="bfloat16",
        storage="auto",
        device=None,
        run_directory: Optional[str] = None,
        max_bytes=None,
        check_finite=True,
        fold_rank=None,
        window: Optional[dict] = None,
        adopt_shape: bool = False,
    ) -> "TrajectoryStore":
        """Rebuild a store from ``save(directory)``; the specs (and ``window``, when given) must match the saved ones.
        With a ``run_directory`` other than ``directory``, the saved files are hard-linked into it, so that later
        checkpoints link them again without rewriting a byte, even after ``directory`` is deleted."""
        from safetensors.torch import load_file

        meta = cls.read_meta(directory)
        cls.check_compatible(meta, directory, specs, dtype, window)
        saved_fold = meta.get("fold_rank")
        if adopt_shape:  # a planned buffer (storage="auto") resumes with the shape it was saved with
            capacity, fold_rank = int(meta["K"]), saved_fold
        if meta.get("folded_steps") and (fold_rank != saved_fold or capacity != meta["K"]):
            raise RelexInputError(
                f"the trajectory in {directory} was folded with fold_rank={saved_fold} and {meta['K']} slots; resume "
                f"with the same fold_rank and buffer size (this run: fold_rank={fold_rank}, {capacity} slots)"
            )
        store = cls(specs, capacity, dtype=dtype, storage=storage, device=device, directory=run_directory or directory,
                    max_bytes=max_bytes, check_finite=check_finite, fold_rank=fold_rank, _allocate=False)
        same_dir = os.path.abspath(store.directory) == os.path.abspath(directory)
        same_file = store.storage == "disk" and same_dir
        store._allocate(reuse_file=same_file)
        store.theta0 = load_file(os.path.join(directory, THETA0_FILE))["theta0"].to(store.device)
        store.steps = list(meta["steps"])
        store.run_id = meta.get("run_id") or uuid.uuid4().hex
        store.window = dict(meta.get("window") or window or {})
        store.skipped_unchanged_steps = list(meta.get("skipped_unchanged_steps") or [])
        if meta.get("last_sums") is not None:
            store._last_sums = torch.tensor(meta["last_sums"], dtype=torch.float32)
        store.saved = {"directory": directory, "step": meta.get("saved_step"), "live": meta.get("live")}
        if meta.get("folded_steps"):
            f = load_file(os.path.join(directory, FOLD_FILE))
            store.L, store.folded_sq = f["L"], f["folded_sq"]
            store.folded_steps = list(meta["folded_steps"])
            store.basis_rows = int(meta["basis_rows"])
            store.folds = int(meta.get("folds") or 1)  # saved since the distributed fold; older metadata: at least 1
        nrows = store.basis_rows + store.num_ring_rows
        entries = meta.get("files")
        if entries is None:  # version 1: one file with the rows in use
            entries = [{"file": BUFFER_FILE, "row": 0, "rows": nrows}] if nrows else []
        if sum(e["rows"] for e in entries) != nrows:
            raise RelexInputError(f"{directory}/{META_FILE} lists {sum(e['rows'] for e in entries)} rows in its files "
                                  f"but records {nrows}: the trajectory is damaged")
        if not same_file and nrows:
            target = store._rows_in_use() if store.fold_rank else store.M[:nrows]
            pos = 0
            for e in entries:
                raw = torch.from_file(os.path.join(directory, e["file"]), shared=False, size=(e["row"] + e["rows"]) * store.D,
                                      dtype=store.dtype)
                target[pos : pos + e["rows"]].copy_(raw.view(-1, store.D)[e["row"] :])
                pos += e["rows"]
        if not same_dir:
            os.makedirs(store.directory, exist_ok=True)
            store._theta0_file = os.path.join(store.directory, THETA0_FILE)
            link_or_copy(os.path.join(directory, THETA0_FILE), store._theta0_file)
            if store.storage != "disk":
                store._adopt_entries(directory, entries)
        else:
            store._theta0_file = os.path.join(directory, THETA0_FILE)
        if store.storage == "disk":
            store._write_meta(store.directory)
            if store.folded_steps:
                store._save_fold(store.directory)
        return store

    def _adopt_entries(self, directory: str, entries: list):
        """Link a loaded checkpoint's row files into the run directory and take them as persisted: basis rows first
        (split at ``basis_rows``), then the ring rows."""
        names = {}
        for e in entries:
            if e["file"] not in names:
                name = e["file"] if e["file"] != BUFFER_FILE else f"rows-resumed-{uuid.uuid4().hex[:8]}.bin"
                link_or_copy(os.path.join(directory, e["file"]), os.path.join(self.directory, name))
                names[e["file"]] = name
        basis, ring, left = [], [], self.basis_rows
        for e in entries:
            e = dict(e, file=names[e["file"]])
            take = min(left, e["rows"])
            if take:
                basis.append(dict(e, rows=take))
            if e["rows"] > take:
                ring.append(dict(e, row=e["row"] + take, rows=e["rows"] - take))
            left -= take
        self._basis_entry = basis[0] if len(basis) == 1 else None  # split over files: written again at next save
        self._ring_entries = ring

    @torch.no_grad()
    def verify_live(self, live: Sequence[torch.Tensor], global_step: int) -> list[str]:
        """Whether this (loaded) trajectory belongs to the weights training resumed with at ``global_step``: the
        fingerprints of the live tensors recorded at the save equal today's, and theta_0 plus the last recorded delta
        equals the live tensors to the buffer dtype's rounding (when the last recorded step is ``global_step`` and its
        row is in the ring; after a fold the fingerprints decide). Returns what differs (empty: verified).

        The bound per element: the delta was computed in float32 from the parameters (relative error <= u32 = 2^-24)
        and rounded once into the buffer dtype (<= u = eps/2, plus half its smallest subnormal), so
        ``|theta_0 + delta - theta| <= 2 (u + u32) |delta| + tiny``, exact float64 arithmetic for the sum."""
        from ..files.state import fingerprint, fingerprint_mismatch

        problems = []
        fps = self.saved.get("live")
        if fps is not None and self.saved.get("step") == global_step:
            for spec, t, fp in zip(self.specs, live, fps):
                why = fingerprint_mismatch(fingerprint(t), fp)
                if why:
                    problems.append(f"{spec.name}: the weights differ from those saved with the trajectory ({why})")
        if self.steps and self.steps[-1] == global_step and self.num_ring_rows:
            self.synchronize()
            row = self.M[self.num_ring_rows - 1]
            fi = torch.finfo(self.dtype)
            rel = 2 * (fi.eps / 2 + 2.0**-24)
            tiny = fi.tiny * fi.eps
            chunk = SNAPSHOT_CHUNK_DEVICE if self.theta0.device.type != "cpu" else SNAPSHOT_CHUNK
            for spec, t in zip(self.specs, live):
                o, n = spec.offset, spec.local_numel
                src = t.reshape(-1)
                bad, worst, worst_tol = 0, 0.0, 0.0
                for a in range(0, n, chunk):
                    b = min(n, a + chunk)
                    d = row[o + a : o + b].to(device=self.theta0.device, dtype=torch.float64)
                    err = (src[a:b].to(device=d.device, dtype=torch.float64)
                           - self.theta0[o + a : o + b].to(torch.float64) - d).abs()
                    tol = rel * d.abs() + tiny
                    over = err > tol
                    if bool(over.any()):
                        bad += int(over.sum())
                        i = int(torch.argmax(torch.where(over, err, torch.zeros_like(err))))
                        if float(err[i]) > worst:
                            worst, worst_tol = float(err[i]), float(tol[i])
                if bad:
                    problems.append(f"{spec.name}: {bad} of {n} elements differ from theta_0 + the delta recorded at "
                                    f"step {global_step}, by up to {worst:.3g} (tolerance there {worst_tol:.3g})")
        elif fps is None or self.saved.get("step") != global_step:
            logger.warning("relex: the resumed trajectory (%s) cannot be checked against the live weights (no row and no "
                           "fingerprint at step %d)", self.saved.get("directory"), global_step)
        return problems

    @classmethod
    def open(cls, directory: str, *, storage: str = "host", device=None) -> "TrajectoryStore":
        """Load a saved trajectory (``save(directory)``, e.g. ``partial_trajectory/``) using only what it recorded:
        its tensors, dtype, slots and fold settings."""
        meta_path = os.path.join(directory, META_FILE)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise RelexInputError(
                f"{directory} is not a saved RELEX trajectory (cannot read {META_FILE}: {e}); pass the "
                f"partial_trajectory/ or relex_trajectory/ directory the callback wrote"
            ) from None
        try:
            specs = [TensorSpec.from_json(d) for d in meta["specs"]]
            K = meta["K"] if meta.get("fold_rank") else max(1, len(meta["steps"]))
            return cls.load(directory, specs, K, dtype=meta["dtype"], storage=storage, device=device,
                            run_directory=directory if storage == "disk" else None, fold_rank=meta.get("fold_rank"))
        except RelexInputError:
            raise
        except Exception as e:  # safetensors raises its own error type for a truncated file
            # a damaged trajectory: missing fields, a truncated theta0.safetensors or buffer file
            raise RelexInputError(
                f"{directory} holds a damaged RELEX trajectory ({type(e).__name__}: {e}); use another checkpoint's "
                f"relex_trajectory/ or the run's checkpoints with `relex extrapolate --checkpoints`"
            ) from None


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


def disk_needs(store, settings, *, model_bytes: int = 0, saves_in_window: bool = True, writes_outputs: bool = True) -> dict:
    """Bytes this window still writes under the relex output_dir, by item (the disk tier's buffer is already
    allocated by then, so it is not counted again): theta_0 and the rows the trainer checkpoints link (host/device
    tiers, when checkpoints are saved inside the window), the state file (``rank`` float32 directions per element)
    and each horizon (``model_bytes``: the checkpoint written per horizon)."""
    need = {}
    if saves_in_window and store.storage != "disk":
        if store._theta0_file is None:
            need["theta_0 (once, linked by the checkpoints)"] = store.theta0_bytes
        left = max(0, len(settings.steps) - store.num_rows)
        rows = min(left, store.K) + (store.fold_rank or 0) if store.fold_rank else left
        if rows:
            need[f"{rows} trajectory rows (linked by the checkpoints)"] = rows * store.D * store.dtype.itemsize
    if writes_outputs:
        need["state file"] = settings.rank * store.D * 4
        if model_bytes:
            need[f"{len(settings.horizons)} horizon checkpoint(s) of {_fmt(model_bytes)}"] = len(settings.horizons) * model_bytes
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
                trainer_args=None):
    """The store of a window at ``on_train_begin``: a fresh one holding theta_0 at step 0, or, when training resumed
    inside the window, the saved one that fits (see :func:`_load_verified`; ``checkpoints``: the paths the checkpoint
    may be, ``expected``: the record of the resumed trainer state), truncated to ``global_step``. Sizes the ring:
    with ``storage="auto"`` (and no ``buffer_slots``) by the memory plan (:func:`relex_callback.trajectory.plan.plan_for_run`,
    logged on process 0; ``trainer_args`` tells it about a colocated vLLM engine), which folds when the exact window
    fits no tier, else by ``relex_callback.core.fold.plan_slots``; a resumed planned window keeps the buffer shape it was
    saved with. Checks the free disk space for what the window will write, and refuses what
    cannot work (a resume without a fitting trajectory, a buffer that fits nowhere) before the first step."""
    from ..core.fold import plan_slots

    specs = [t.spec for t in tracked]
    device = tracked[0].read().device
    window = len(settings.steps)
    # every process plans for the largest share (same slots and the same fold steps everywhere: a sharded fold is a
    # collective, and the recorded steps must agree for the final solve)
    D = sum(s.local_numel for s in specs)
    D_plan = topology.max_int(D) if topology.is_distributed else D
    storage, planned = settings.storage, settings.storage == "auto" and settings.buffer_slots is None
    if planned:  # the memory plan decides tier and slots: folds (and says so) when the exact window fits nowhere
        from .plan import plan_for_run

        plan = plan_for_run(settings, specs, topology, trainer_args, elements=D_plan, device=device, out_dir=out_dir)
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
            window, D_plan, torch.empty((), dtype=settings.torch_dtype).element_size(),
            max_buffer_bytes=settings.max_buffer_bytes, buffer_slots=settings.buffer_slots, fold_rank=settings.fold_rank,
        )
    run_dir = topology.trajectory_dir(os.path.join(out_dir, RUN_TRAJECTORY_DIR))
    info = {"tcut": settings.tcut, "stride": settings.stride, "world": topology.world}
    common = dict(dtype=settings.dtype, storage=storage, device=device, max_bytes=settings.max_buffer_bytes,
                  fold_rank=fold_rank)
    try:
        if global_step > 0:
            store, saved, notes, found = _load_verified(
                checkpoints, expected, topology, tracked, global_step,
                dict(specs=specs, capacity=capacity, run_directory=run_dir, window=info, adopt_shape=planned, **common))
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
            store.window = info
            _join(store, topology)
            logger.info("relex: resumed the window from %s (%d steps recorded, run %s)", saved, store.num_rows,
                        store.run_id)
        else:
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
                              lambda: store._write_meta(store.directory), write_failures=run_dir)
    except Exception as e:
        if not write_failure(e):
            raise
        raise RelexMemoryError(f"cannot write the trajectory to {run_dir}: {describe_failure(e)}; free disk space there "
                               "or choose another output_dir") from None
    try:
        _together(topology, "checking the free disk space for the RELEX outputs", lambda: check_disk_space(
            out_dir, disk_needs(store, settings, model_bytes=model_bytes, saves_in_window=saves_in_window,
                                writes_outputs=topology.process_rank == 0 or topology.sharded),
            what_to_change=", fewer horizons, or storage='host'" if store.storage == "disk" else ", or fewer horizons"))
    except RelexError:
        store.discard_files()
        raise
    logger.info(
        "relex: tracking %d tensors (%d elements), %d snapshot slots%s, %.1f MiB buffer on %s",
        len(specs), store.D, store.K, f" + {store.fold_rank} fold rows (window of {window} folded)" if store.fold_rank else "",
        store.buffer_bytes / 2**20, store.storage,
    )
    return store


# ------------------------------------------------------------------------------------------ owning an output dir
_HELD: "weakref.WeakValueDictionary[str, OutputLock]" = weakref.WeakValueDictionary()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``<output_dir>/.relex-lock.json`` names the callback that owns a relex output_dir (process id, host, a token,
    the trainer) from ``on_train_begin`` to the end of its window. A second callback on the same directory is refused
    before step 1: two callbacks of one trainer, or a live process on this host. A holder that is gone is taken over:
    its process ended (same host), its trainer object is gone or is another trainer (same process: a notebook that
    trains again after an error), or, on another host, its heartbeat (the file's mtime, touched at each step) is
    older than ``STALE_SECONDS``."""

    STALE_SECONDS = 1800

    def __init__(self, out_dir: str, trainer=None):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.trainer = weakref.ref(trainer) if trainer is not None else None
        self.held = False
        self._touched = 0.0

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "since": time.time()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            why = self._holder_alive()
            if why:
                raise RelexInputError(
                    f"output_dir {os.path.dirname(self.path)} is in use by another RelexCallback ({why}); two windows "
                    "writing one directory would overwrite each other's trajectory and checkpoints. Give each callback "
                    f"its own output_dir; if no other run uses it, delete {self.path}"
                ) from None
            write_json(self.path, me)
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        self.held = True
        _HELD[self.token] = self

    def _holder_alive(self) -> Optional[str]:
        try:
            with open(self.path) as f:
                h = json.load(f)
            age = time.time() - os.stat(self.path).st_mtime
        except (OSError, ValueError):
            return None  # unreadable or half written: take it over
        who = f"process {h.get('pid')} on {h.get('host')}"
        if h.get("host") != socket.gethostname():
            return f"{who}, active {age:.0f} s ago" if age < self.STALE_SECONDS else None
        if h.get("pid") != os.getpid():
            return who if isinstance(h.get("pid"), int) and _pid_alive(h["pid"]) else None
        other = _HELD.get(h.get("token"))
        if other is None or not other.held:
            return None
        mine = self.trainer() if self.trainer else None
        theirs = other.trainer() if other.trainer else None
        if mine is not None and mine is theirs:
            return "another RelexCallback of this trainer"
        return None

    def touch(self, every: float = 60.0):
        """Heartbeat (at most once per ``every`` seconds)."""
        now = time.monotonic()
        if self.held and now - self._touched > every:
            self._touched = now
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        if not self.held:
            return
        self.held = False
        _HELD.pop(self.token, None)
        try:
            with open(self.path) as f:
                mine = json.load(f).get("token") == self.token
            if mine:
                os.remove(self.path)
        except (OSError, ValueError):
            pass
