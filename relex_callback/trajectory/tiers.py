"""Storage tiers of the trajectory arena: where its ``[rows, D]`` tensor lives, and the memory each tier has.

``device`` (accelerator memory), ``host`` (CPU memory, pinned when CUDA is present, with a side stream and a staging
row so a snapshot's copy never waits on the training stream), ``disk`` (a memory-mapped file in the run directory,
allocated in full up front with ``posix_fallocate``: a full disk is an error when the window opens, never a ``SIGBUS``
during training; it survives a crash), ``auto`` (the fastest that fits). :class:`StorageTier` chooses a tier for a
size, allocates the arena there and maps the disk file; :func:`prefault` backs a large CPU tensor with pages up front.
The free memory functions are also what the memory plan (:mod:`.plan`) measures.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import uuid
from typing import Optional

import torch

from ..errors import RelexInputError, RelexMemoryError

logger = logging.getLogger("relex_callback")

GiB = 1024**3
# Largest number of elements converted to float32 at once while snapshotting (bounds the temporary memory).
SNAPSHOT_CHUNK = 1 << 20  # CPU: a 4 MiB float32 scratch stays in cache
SNAPSHOT_CHUNK_DEVICE = 1 << 24
BUFFER_FILE = "trajectory.bin"  # the disk tier's memory-mapped arena, in the run directory
TIERS = ("auto", "device", "host", "disk")


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


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


def available_disk_bytes(directory: str) -> int:
    d = directory
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    return shutil.disk_usage(d or ".").free


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



def _cudart_register(ptr: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def _cudart_unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


# How host memory is page-locked for the device's DMA: registered in place (``cudaHostRegister``), exactly the bytes
# asked for. ``torch.empty(..., pin_memory=True)`` goes through the caching host allocator instead, which rounds a
# block up to the next power of two (a 33 GB buffer pins 64 GB) and keeps it pinned after the tensor is freed.
HOST_REGISTER = _cudart_register
HOST_UNREGISTER = _cudart_unregister


class PinnedHost:
    """A CPU tensor whose pages are locked for DMA in place, exactly its bytes, until :meth:`release`.

    The pages are allocated pageable (and populated, :func:`prefault`), then registered; :meth:`release` unregisters
    them before the last reference is dropped. Registration that fails (a ``RLIMIT_MEMLOCK`` too low, a driver
    refusing) leaves the tensor pageable, with one warning: snapshots then copy synchronously."""

    def __init__(self, shape, dtype: torch.dtype, populate: bool = True):
        self.tensor = torch.empty(shape, dtype=dtype)
        self.nbytes = self.tensor.numel() * self.tensor.element_size()
        if populate:
            prefault(self.tensor)
        self.ptr = self.tensor.data_ptr()
        self.pinned = False
        if self.nbytes:
            err = HOST_REGISTER(self.ptr, self.nbytes)
            self.pinned = err == 0
            if not self.pinned:
                logger.warning("relex: could not pin %s of host memory for the trajectory buffer (CUDA error %d; "
                               "check `ulimit -l`): it stays pageable, snapshots copy synchronously", _fmt(self.nbytes),
                               err)

    def release(self):
        if self.pinned:
            HOST_UNREGISTER(self.ptr)
            self.pinned = False
        self.tensor = None


class StorageTier:
    """The tier an arena lives on, and what it needs there: the side stream and staging row of pinned host memory, the
    disk tier's mapped file.

    Args:
        kind (`str`): ``device``, ``host`` or ``disk`` (see :meth:`choose` for ``auto``).
        device (`torch.device`): where the parameters live.
        directory (`str`, *optional*): the run directory, holding the disk tier's file.
        prefault (`bool`, *optional*, defaults to `True`): populate the pages of a CPU arena when it is allocated.
    """

    def __init__(self, kind: str, *, device: torch.device, directory: Optional[str] = None, prefault: bool = True):
        self.kind = kind
        self.device = device
        self.directory = directory
        self.prefault_pages = prefault
        self.stream = None  # pinned host tier: the side stream its copies run on
        self.staging = None  # ... and the device row a snapshot is computed into first
        self.event = None  # the last copy's completion
        self.pinned: Optional[PinnedHost] = None  # host tier with CUDA: the registered arena

    @staticmethod
    def choose(storage: str, need: int, what: str, *, device: torch.device, directory: Optional[str],
               max_bytes: Optional[int]) -> str:
        """The tier for an arena of ``need`` bytes (``what`` describes its shape in errors): ``storage`` itself when
        it has the room, the fastest that fits for ``auto``; a clear :class:`RelexMemoryError` otherwise."""
        options = (
            "raise stride (fewer slots), use dtype='bfloat16', storage='disk' (memory-mapped file in the output "
            "directory) or storage='host'"
        )
        if max_bytes is not None and need > max_bytes:
            raise RelexMemoryError(
                f"the trajectory buffer needs {_fmt(need)} ({what}) but max_buffer_bytes is {_fmt(max_bytes)}; "
                f"{options}, or raise max_buffer_bytes"
            )
        on_accel = device.type != "cpu"
        if storage == "auto":
            if on_accel and need <= 0.5 * available_device_bytes(device):
                storage = "device"
            elif need <= 0.5 * available_host_bytes():
                storage = "host"
            elif directory is not None and need <= available_disk_bytes(directory):
                storage = "disk"
            else:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) and fits neither in device memory, nor in half "
                    f"of the free host memory ({_fmt(available_host_bytes())}), nor on disk; {options}"
                )
            logger.info("relex: trajectory buffer %s on tier %r (auto)", _fmt(need), storage)
            return storage
        if storage == "disk":
            if directory is None:
                raise RelexInputError("storage='disk' needs a directory for the memory-mapped buffer")
            free = available_disk_bytes(directory)
            if need > free:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) but the disk has {_fmt(free)} free; {options}"
                )
        elif storage == "device":
            free = available_device_bytes(device)
            if need > free:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) but {device} has {_fmt(free)} free; {options}"
                )
        elif storage == "host":
            free = available_host_bytes()
            if need > free:
                raise RelexMemoryError(
                    f"the trajectory buffer needs {_fmt(need)} ({what}) but the host has {_fmt(free)} free; {options}"
                )
        else:
            raise RelexInputError(f"storage={storage!r} is not one of ['auto', 'device', 'host', 'disk']")
        return storage

    def allocate(self, rows: int, D: int, dtype: torch.dtype, reuse_file: bool = False) -> torch.Tensor:
        """The ``[rows, D]`` arena on this tier (``reuse_file``: the disk tier maps the existing file in place)."""
        shape = (rows, D)
        if self.kind == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.kind == "host":
            pin = torch.cuda.is_available() and self.device.type == "cuda"
            if not pin:
                M = torch.empty(shape, dtype=dtype)
                if self.prefault_pages:
                    prefault(M)
                return M
            self.pinned = PinnedHost(shape, dtype, populate=self.prefault_pages)
            self.stream = torch.cuda.Stream(device=self.device)
            self.staging = torch.empty(D, dtype=dtype, device=self.device)
            return self.pinned.tensor
        if self.kind == "disk":
            return self.map_disk(rows, D, dtype, fresh=not reuse_file)
        raise AssertionError(self.kind)  # pragma: no cover

    def map_disk(self, rows: int, D: int, dtype: torch.dtype, fresh: bool = True) -> torch.Tensor:
        """Map ``directory/trajectory.bin`` as the ``[rows, D]`` arena. ``fresh``: a new, fully allocated file (a new
        inode: a file a checkpoint links is never written into), else the existing file (read it in place)."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, BUFFER_FILE)
        n = rows * D
        if fresh or not os.path.exists(path):
            allocate_file(path, n * dtype.itemsize)
        elif os.path.getsize(path) < n * dtype.itemsize:
            raise RelexInputError(f"{path} holds {os.path.getsize(path)} bytes, fewer than the {n * dtype.itemsize} "
                                  "its metadata describes: the trajectory is damaged")
        return torch.from_file(path, shared=True, size=n, dtype=dtype).view(rows, D)

    def file_linked(self) -> bool:
        """Disk tier: whether a trainer checkpoint hard-links the mapped file (then it must not be written into)."""
        try:
            return os.stat(os.path.join(self.directory, BUFFER_FILE)).st_nlink > 1
        except OSError:
            return False

    def synchronize(self):
        if self.event is not None:
            self.event.synchronize()

    def release(self):
        """Give back what the tier holds: the staging row and the pinned pages (unregistered, then freed once the
        store drops its views)."""
        self.synchronize()
        self.staging = None
        if self.pinned is not None:
            self.pinned.release()
            self.pinned = None
