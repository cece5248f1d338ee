"""The trajectory store: theta_0 and a ring of weight deltas in one arena per rank.

Layout: every tracked tensor (this rank's piece of it, flattened) is a column segment ``[offset, offset+n)`` of
an arena of ``D`` columns. ``theta0`` is one flat tensor of length ``D`` in the parameters' dtype (or float32 when
tracked tensors mix dtypes: every 16-bit value is exact in float32). The buffer ``M`` is ``K x D`` in the buffer
dtype; row ``i`` holds ``Delta_t = theta_t - theta_0`` (computed in float32) for the i-th recorded step. Rows are
always kept in step order.

Tiers: ``device`` (accelerator memory), ``host`` (CPU memory, pinned when CUDA is present, copies on a side
stream), ``disk`` (a memory-mapped file in ``directory``; survives a crash), ``auto`` (the fastest that fits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Iterable, Optional, Sequence

import torch

from .config import dtype_name, torch_dtype
from .errors import RelexInputError, RelexMemoryError, RelexNonFiniteError
from .fs import atomic_file, write_json
from .params import TensorSpec

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
            tensor instead of raising (``relex_callback.fold``); the arena then has ``fold_rank + capacity`` rows.
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
        self.storage = self.choose_storage(storage) if _allocate else storage
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
    def _allocate(self):
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
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, BUFFER_FILE)
            n = self.rows_allocated * self.D
            with open(path, "ab") as f:
                if f.tell() < n * self.dtype.itemsize:
                    f.truncate(n * self.dtype.itemsize)
            self.M = torch.from_file(path, shared=True, size=n, dtype=self.dtype).view(shape)
        else:  # pragma: no cover
            raise AssertionError(self.storage)
        if self.fold_rank:
            self.arena = self.M
            self.M = self.arena[self.fold_rank :]

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
        if self.storage == "disk":
            self._save_theta0(self.directory)
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
        self.steps = [s for s in self.steps if s <= last_step]
        if self.storage == "disk":
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
                if self.check_finite:
                    cs = buf.sum()
                    acc = cs if acc is None else acc + cs
                target[o + s : o + e].copy_(buf)
            if self.check_finite:
                sums.append(acc if acc is not None else torch.zeros((), device=self.theta0.device))
        if self.check_finite and sums:
            flags = ~torch.isfinite(torch.stack(sums))  # one host sync for all tensors
            if bool(flags.any()):
                names = [self.specs[i].name for i in torch.nonzero(flags).flatten().tolist()]
                raise RelexNonFiniteError(
                    f"non-finite weight delta at step {step} in {len(names)} tensor(s): {', '.join(names[:5])}"
                    + (" ..." if len(names) > 5 else "")
                    + "; the step was not recorded (the training run diverged or overflowed)"
                )
        if self._staging is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.M[slot].copy_(self._staging, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
        if slot == self.num_ring_rows:
            self.steps.append(int(step))
        if self.storage == "disk":
            self._write_meta(self.directory, durable=False)  # on the training step: atomic, no disk flush

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
        from .kernels.reference import project_reference
        from .solver import factor_left

        if not self.fold_rank:
            raise RuntimeError("this store was created without fold_rank")
        if not self.num_ring_rows:
            return
        self.synchronize()
        B = self._rows_in_use()
        C = self._left()
        sigma, U, X, G_B, _ = factor_left(B, C, self.specs, self.fold_rank)
        self.folded_sq = self.folded_sq + self._ring_sq(G_B)
        r = self.fold_rank
        # the new basis overwrites rows of B: safe in the chunked reference, which computes each chunk's product in
        # full before writing it (the Triton kernel makes no such promise)
        project_reference(B, [s.offset for s in self.specs], [s.local_numel for s in self.specs], X, self.arena[:r])
        self.L = U * sigma.unsqueeze(1)  # [S, T, r]
        self.folded_steps = list(self.steps)
        self.basis_rows = r
        self.folds += 1
        if self.storage == "disk":
            self._save_fold(self.directory)
            self._write_meta(self.directory)

    def solve_inputs(self) -> dict:
        """Keyword arguments for :func:`relex_callback.solver.solve`: ``M`` and ``steps`` (plus ``left``,
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

    def discard_files(self) -> int:
        """Delete the disk tier's files (buffer, theta_0, metadata) once the window's result is written; returns the
        bytes freed. Other tiers have none."""
        if self.storage != "disk" or not self.directory:
            return 0
        self.release()
        freed = 0
        for name in (BUFFER_FILE, META_FILE, THETA0_FILE, FOLD_FILE):
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                freed += os.path.getsize(path)
                os.remove(path)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # something else lives there: leave it
        return freed

    # ------------------------------------------------------------ persistence
    def meta(self) -> dict:
        return {
            "version": 1,
            "K": self.K,
            "D": self.D,
            "dtype": dtype_name(self.dtype),
            "theta0_dtype": dtype_name(self.theta0_dtype),
            "steps": list(self.steps),
            "specs": self._specs_json,
            "fold_rank": self.fold_rank,
            "folded_steps": list(self.folded_steps),
            "basis_rows": self.basis_rows,
        }

    def _save_fold(self, directory: str):
        from safetensors.torch import save_file

        with atomic_file(os.path.join(directory, FOLD_FILE)) as tmp:
            save_file({"L": self.L.contiguous(), "folded_sq": self.folded_sq.contiguous()}, tmp)

    def _write_meta(self, directory: str, durable: bool = True):
        """Write the metadata atomically (temporary + rename: a killed process leaves the old or the new file).
        ``durable=False`` skips the fsync: the disk tier's per-snapshot update, whose rows live in a memory-mapped
        file that is not msync'd either, so an fsync there would flush the disk on every training step without
        making the trajectory survive a power loss."""
        write_json(os.path.join(directory, META_FILE), self.meta(), durable=durable)

    def _save_theta0(self, directory: str):
        save_theta0(directory, self.theta0)

    def save(self, directory: str):
        """Write theta_0, the recorded rows and the metadata to ``directory`` (used at trainer checkpoints)."""
        os.makedirs(directory, exist_ok=True)
        self.synchronize()
        self._save_theta0(directory)
        if not (self.storage == "disk" and os.path.abspath(directory) == os.path.abspath(self.directory)):
            rows = self._rows_in_use() if self.fold_rank else self.M[: len(self.steps)]
            with atomic_file(os.path.join(directory, BUFFER_FILE)) as tmp:
                with open(tmp, "wb") as f:
                    if rows.numel():
                        rows.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(f)
        if self.folded_steps:
            self._save_fold(directory)
        self._write_meta(directory)

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
    ) -> "TrajectoryStore":
        """Rebuild a store from ``save(directory)``; the specs must match the saved ones."""
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, META_FILE)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise RelexInputError(f"cannot read the saved trajectory in {directory}: {e}") from None
        saved = [TensorSpec.from_json(d) for d in meta["specs"]]
        if [(s.name, s.shape, s.local_numel) for s in saved] != [(s.name, tuple(s.shape), s.local_numel) for s in specs]:
            raise RelexInputError(
                f"the trajectory saved in {directory} tracks other tensors than this run "
                "(different model, include/exclude or world size); start from a checkpoint of this run"
            )
        if meta["dtype"] != dtype_name(torch_dtype(dtype)):
            raise RelexInputError(f"the trajectory in {directory} is {meta['dtype']}, this run asks for {dtype}; use the same dtype")
        saved_fold = meta.get("fold_rank")
        if meta.get("folded_steps") and (fold_rank != saved_fold or capacity != meta["K"]):
            raise RelexInputError(
                f"the trajectory in {directory} was folded with fold_rank={saved_fold} and {meta['K']} slots; resume "
                f"with the same fold_rank and buffer size (this run: fold_rank={fold_rank}, {capacity} slots)"
            )
        store = cls(specs, capacity, dtype=dtype, storage=storage, device=device, directory=run_directory or directory,
                    max_bytes=max_bytes, check_finite=check_finite, fold_rank=fold_rank)
        store.theta0 = load_file(os.path.join(directory, THETA0_FILE))["theta0"].to(store.device)
        steps = list(meta["steps"])
        same_file = store.storage == "disk" and os.path.abspath(store.directory) == os.path.abspath(directory)
        store.steps = steps
        if meta.get("folded_steps"):
            f = load_file(os.path.join(directory, FOLD_FILE))
            store.L, store.folded_sq = f["L"], f["folded_sq"]
            store.folded_steps = list(meta["folded_steps"])
            store.basis_rows = int(meta["basis_rows"])
        nrows = store.basis_rows + store.num_ring_rows
        if not same_file and nrows:
            raw = torch.from_file(os.path.join(directory, BUFFER_FILE), shared=False, size=nrows * store.D, dtype=store.dtype)
            target = store._rows_in_use() if store.fold_rank else store.M[:nrows]
            target.copy_(raw.view(nrows, store.D))
        if store.storage == "disk":
            store._write_meta(store.directory)
            store._save_theta0(store.directory)
            if store.folded_steps:
                store._save_fold(store.directory)
        return store

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


def open_window(settings, tracked, topology, *, out_dir: str, global_step: int, checkpoints: Sequence[Optional[str]]):
    """The store of a window at ``on_train_begin``: a fresh one holding theta_0 at step 0, or, when training resumed
    inside the window, the one saved in the checkpoint it resumed from (``checkpoints``: the paths it may be),
    truncated to ``global_step``. Sizes the ring (``relex_callback.fold.plan_slots``) and refuses what cannot work
    (a fold in a distributed run, a resume without a saved trajectory) before the first step."""
    from .fold import plan_slots

    specs = [t.spec for t in tracked]
    device = tracked[0].read().device
    window = len(settings.steps)
    capacity, fold_rank = plan_slots(
        window, sum(s.local_numel for s in specs), torch.empty((), dtype=settings.torch_dtype).element_size(),
        max_buffer_bytes=settings.max_buffer_bytes, buffer_slots=settings.buffer_slots, fold_rank=settings.fold_rank,
    )
    if fold_rank is not None and topology.is_distributed:
        raise RelexInputError(
            f"the window of {window} snapshots does not fit max_buffer_bytes/buffer_slots on this process, and "
            "folding is not supported in distributed runs (each process's fold would differ); raise or drop "
            "max_buffer_bytes or buffer_slots, or raise stride"
        )
    run_dir = topology.trajectory_dir(os.path.join(out_dir, "trajectory"))
    common = dict(dtype=settings.dtype, storage=settings.storage, device=device, max_bytes=settings.max_buffer_bytes,
                  fold_rank=fold_rank)
    if global_step > 0:
        saved = saved_trajectory(checkpoints, topology)
        if saved is None:
            raise RelexInputError(
                f"training resumed at step {global_step} inside the RELEX window (tcut={settings.tcut}) but the "
                f"checkpoint has no {TRAJECTORY_DIR}/ (it was saved without RelexCallback); theta_0 is unknown. "
                "Resume from a checkpoint written with the callback, or start from step 0"
            )
        store = TrajectoryStore.load(saved, specs, capacity, run_directory=run_dir, **common)
        store.truncate(global_step)
        logger.info("relex: resumed the window from %s (%d steps recorded)", saved, store.num_rows)
    else:
        store = TrajectoryStore(specs, capacity, directory=run_dir, **common)
        store.set_theta0([t.read() for t in tracked])
    logger.info(
        "relex: tracking %d tensors (%d elements), %d snapshot slots%s, %.1f MiB buffer on %s",
        len(specs), store.D, capacity, f" + {fold_rank} fold rows (window of {window} folded)" if fold_rank else "",
        store.buffer_bytes / 2**20, store.storage,
    )
    return store
