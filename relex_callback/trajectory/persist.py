"""Persistence of a trajectory: trainer checkpoints' ``relex_trajectory/``, the run directory's row files, resume.

The bytes of a window are written once, in the run directory (``<relex output_dir>/trajectory/``):
``theta0.safetensors`` once, and at each trainer checkpoint one ``rows-*.bin`` file holding only the rows recorded since
the previous checkpoint (``basis-*.bin`` once per fold). Each checkpoint's ``relex_trajectory/`` hard-links those files
(a plain copy only across file systems) and adds its own ``trajectory.json``, so a checkpoint costs the new rows plus
metadata, older checkpoints stay valid when the trainer deletes newer or older ones, and a checkpoint still resumes
after the run directory is deleted. Files are never modified once linked: a new version is always a new file renamed
into place.
The disk tier's memory-mapped ``trajectory.bin`` is itself the linked file (its rows up to a checkpoint never change
afterwards; a fold or a replay after a resume first moves the ring to a fresh file when a checkpoint still links the
old one).

Functions of a :class:`~.store.TrajectoryStore` (its ``save``/``load``/``open``/``truncate``/``verify_live``/
``discard_files`` methods call them): ``save`` and ``load`` (with ``check_compatible``: a saved window this run cannot
continue is refused, naming what differs), ``truncate`` (back to an earlier step on a resume), ``verify_live``
(theta_0 + the last delta against the weights training resumed with), ``open_saved`` (a saved trajectory on its own,
for ``relex extrapolate --trajectory``), ``discard_files``; and the store's file bookkeeping, :class:`StoreFiles`
(``store.files``, kept by this module's functions only: ``start_files`` at theta_0, ``note_step`` after each disk-tier
step). What these functions read of the arena they read through the store's public API (``theta0``, ``rows_in_use()``,
``last_sums``); what they change of it, through its methods (``allocate``, ``set_steps``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..config import dtype_name, torch_dtype
from ..errors import RelexInputError
from ..files.fs import atomic_file, describe_failure, read_json, read_safetensors_header, write_json
from ..files.state import fingerprint, fingerprint_mismatch
from ..params import TensorSpec, theta0_dtype
from .layout import move_to_fresh_file
from .tiers import BUFFER_FILE, SNAPSHOT_CHUNK, SNAPSHOT_CHUNK_DEVICE

logger = logging.getLogger("relex_callback")

META_FILE = "trajectory.json"
THETA0_FILE = "theta0.safetensors"
FOLD_FILE = "fold.safetensors"
TRAJECTORY_DIR = "relex_trajectory"  # inside each trainer checkpoint: the window so far, for resume
RUN_TRAJECTORY_DIR = "trajectory"  # inside the relex output_dir: the files each checkpoint links
META_VERSION = 2


def save_theta0(directory: str, theta0: torch.Tensor):
    """Write a flat theta_0 arena as ``directory/theta0.safetensors`` atomically."""
    with atomic_file(os.path.join(directory, THETA0_FILE)) as tmp:
        save_file({"theta0": theta0.detach().cpu().contiguous()}, tmp)


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


def _fingerprints(tensors: Sequence[torch.Tensor]) -> list:
    return [fingerprint(t) for t in tensors]

@dataclass
class StoreFiles:
    """A store's bookkeeping of its files (``store.files``), created and updated by this module's functions only:
    where theta_0 was written, the entries (``file``, first ``row`` in it, number of ``rows``) of the fold basis and
    of the ring rows persisted in the run directory for checkpoints to link, the specs as every metadata update
    writes them, and whether a failed disk-tier metadata update was warned about (once per store)."""

    specs_json: list  # fixed from construction on; written with every metadata update
    theta0_file: Optional[str] = None  # where theta_0 is, once written
    basis_entry: Optional[dict] = None  # {"file", "row", "rows"}: the fold basis rows
    ring_entries: list = field(default_factory=list)  # ring rows 0.. in files, in order
    meta_warned: bool = False

    def entry_files(self) -> set:
        """The names of the files holding the persisted rows (basis and ring)."""
        return {e["file"] for e in self.ring_entries + ([self.basis_entry] if self.basis_entry else [])}


def new_files(specs: Sequence[TensorSpec]) -> StoreFiles:
    """A new store's files (its specs already laid out): none persisted yet (host/device tiers: written at the next
    save, see :func:`persist_rows`)."""
    return StoreFiles([s.to_json() for s in specs])


def forget_files(store):
    """No rows persisted in the run directory yet (a new theta_0: a new window)."""
    store.files.theta0_file, store.files.basis_entry, store.files.ring_entries = None, None, []


def start_files(store):
    """A new theta_0, a new window: nothing persisted; the disk tier writes theta_0 and the metadata at once."""
    forget_files(store)
    if store.storage == "disk":
        save_theta0(store.directory, store.theta0)
        store.files.theta0_file = os.path.join(store.directory, THETA0_FILE)
        write_meta(store, store.directory)


def note_step(store):
    """The disk tier's metadata after a recorded step, on the training step: atomic, no disk flush. It is
    crash-recovery metadata only (the rows are in the allocated file): a failure is warned once and training goes
    on."""
    try:
        write_meta(store, store.directory, durable=False)
    except OSError as e:
        if not store.files.meta_warned:
            store.files.meta_warned = True
            logger.warning("relex: cannot update %s (%s); training goes on, but a crash now would leave "
                           "stale metadata there", os.path.join(store.directory, META_FILE), describe_failure(e))


def truncate(store, last_step: int):
    """Forget rows recorded after ``last_step`` (a resume from an earlier checkpoint will replay them)."""
    if store.folded_steps and last_step < store.folded_steps[-1]:
        raise RelexInputError(
            f"cannot go back to step {last_step}: steps up to {store.folded_steps[-1]} were already folded into the "
            f"factorisation; resume from the checkpoint whose trajectory was saved at step {last_step}"
        )
    kept = [s for s in store.steps if s <= last_step]
    if len(kept) == len(store.steps):
        return
    store.set_steps(kept)  # the last kept step's delta sums are not kept: unknown
    truncate_entries(store, store.num_ring_rows)
    if store.storage == "disk":
        if store.tier.file_linked():  # a checkpoint links rows that a replay would overwrite
            move_to_fresh_file(store)
        write_meta(store, store.directory)


def truncate_entries(store, ring: int):
    """Forget the persisted ring rows beyond the first ``ring`` (a resume went back; their files stay for the
    checkpoints that link them)."""
    entries, n = [], 0
    for e in store.files.ring_entries:
        if n >= ring:
            break
        entries.append(dict(e, rows=min(e["rows"], ring - n)))
        n += entries[-1]["rows"]
    store.files.ring_entries = entries


def drop_entries(store):
    """Forget the persisted rows (a fold replaced them): unlink their files from the run directory; the
    checkpoints that link them keep theirs."""
    names = store.files.entry_files()
    store.files.ring_entries, store.files.basis_entry = [], None
    for name in names:
        if name != BUFFER_FILE and store.directory:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(store.directory, name))


def discard_files(store, keep: Sequence[str] = ()) -> int:
    """Delete the run directory's files (the disk tier's buffer, theta_0, metadata, the rows persisted for
    checkpoints) once the window's result is written; returns the bytes freed (a file a checkpoint still links
    frees nothing: its bytes stay with the checkpoint)."""
    if not store.directory or not os.path.isdir(store.directory):
        return 0
    store.release()
    try:  # the whole set only when the directory's metadata names this window
        owner = read_json(os.path.join(store.directory, META_FILE)).get("run_id")
    except (OSError, ValueError, AttributeError):
        owner = None
    freed = 0
    names = [BUFFER_FILE, META_FILE, THETA0_FILE, FOLD_FILE]
    names += [n for n in os.listdir(store.directory) if n.startswith(("rows-", "basis-"))]
    if owner is None or owner != store.run_id:  # else only the files this window wrote there (host tier)
        mine = store.files.entry_files()
        here = os.path.abspath(store.directory)
        if store.files.theta0_file and os.path.dirname(os.path.abspath(store.files.theta0_file)) == here:
            mine.add(THETA0_FILE)
        left = [n for n in names if n not in mine and os.path.exists(os.path.join(store.directory, n))]
        if left:
            logger.info("relex: left %s in %s: this window (run %s) did not write them", left, store.directory,
                        store.run_id)
        names = [n for n in names if n in mine]
    for name in (n for n in names if n not in keep):
        path = os.path.join(store.directory, name)
        if os.path.exists(path):
            st = os.stat(path)
            freed += st.st_size if st.st_nlink == 1 else 0
            os.remove(path)
    try:
        os.rmdir(store.directory)
    except OSError:
        pass  # something else lives there: leave it
    return freed


def metadata(store) -> dict:
    return {
        "version": META_VERSION,
        "K": store.K,
        "D": store.D,
        "dtype": dtype_name(store.dtype),
        "theta0_dtype": dtype_name(store.theta0_dtype),
        "steps": list(store.steps),
        "specs": store.files.specs_json,
        "fold_rank": store.fold_rank,
        "folded_steps": list(store.folded_steps),
        "folds": store.folds,
        "basis_rows": store.basis_rows,
        "run_id": store.run_id,
        "window": dict(store.window),
        "skipped_unchanged_steps": list(store.skipped_unchanged_steps),
        "last_sums": store.last_sums.tolist() if store.last_sums is not None else None,
        "files": disk_entries(store) if store.storage == "disk" else None,
    }


def disk_entries(store) -> list:
    """The disk tier's rows in use, in its mapped file (the file is the whole arena)."""
    row0 = (store.fold_rank - store.basis_rows) if store.fold_rank else 0
    n = store.basis_rows + store.num_ring_rows
    return [{"file": BUFFER_FILE, "row": row0, "rows": n}] if n else []


def save_fold(store, directory: str):
    with atomic_file(os.path.join(directory, FOLD_FILE)) as tmp:
        save_file({"L": store.L.contiguous(), "folded_sq": store.folded_sq.contiguous()}, tmp)


def write_meta(store, directory: str, durable: bool = True, meta: Optional[dict] = None):
    """Write the metadata atomically (temporary + rename: a killed process leaves the old or the new file).
    ``durable=False`` skips the fsync: the disk tier's per-snapshot update, whose rows live in a memory-mapped
    file that is not msync'd either, so an fsync there would flush the disk on every training step without
    making the trajectory survive a power loss."""
    write_json(os.path.join(directory, META_FILE), meta or metadata(store), durable=durable)


def write_rows(path: str, rows: torch.Tensor):
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            if rows.numel():
                rows.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(f)


def persist_rows(store) -> list:
    """Make the run directory hold every row in use in files that never change: theta_0 once, the fold basis
    once per fold, and the ring rows not persisted yet as one new file. Returns the entries (``file``, first
    ``row`` in it, number of ``rows``) in arena order, basis first. A file missing from the run directory (it
    was deleted) is written again from memory."""
    run, files = store.directory, store.files
    os.makedirs(run, exist_ok=True)
    if files.theta0_file is None or not os.path.exists(files.theta0_file):
        save_theta0(run, store.theta0)
        files.theta0_file = os.path.join(run, THETA0_FILE)
    if store.storage == "disk":
        fd = os.open(os.path.join(run, BUFFER_FILE), os.O_RDONLY)
        try:  # the rows a checkpoint links reach the disk with it (the mapped pages are not msync'd per step)
            os.fsync(fd)
        finally:
            os.close(fd)
        return disk_entries(store)
    token = uuid.uuid4().hex[:8]
    r = store.fold_rank or 0
    if store.basis_rows and not (files.basis_entry and os.path.exists(os.path.join(run, files.basis_entry["file"]))):
        name = f"basis-{store.folds:04d}-{token}.bin"
        write_rows(os.path.join(run, name), store.arena[r - store.basis_rows : r])
        files.basis_entry = {"file": name, "row": 0, "rows": store.basis_rows}
    entries, pos = [], 0
    for e in files.ring_entries:
        if not os.path.exists(os.path.join(run, e["file"])):
            name = f"rows-again-{len(entries):04d}-{token}.bin"
            write_rows(os.path.join(run, name), store.M[pos : pos + e["rows"]])
            e = {"file": name, "row": 0, "rows": e["rows"]}
        entries.append(e)
        pos += e["rows"]
    if store.num_ring_rows > pos:
        new = store.steps[len(store.folded_steps) + pos :]
        name = f"rows-{new[0]:06d}-{new[-1]:06d}-{token}.bin"
        write_rows(os.path.join(run, name), store.M[pos : store.num_ring_rows])
        entries.append({"file": name, "row": 0, "rows": store.num_ring_rows - pos})
    files.ring_entries = entries
    return ([files.basis_entry] if store.basis_rows else []) + list(entries)


def save(store, directory: str, *, live: Optional[Sequence[torch.Tensor]] = None, step: Optional[int] = None):
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
    store.synchronize()
    here = os.path.abspath(directory)
    if store.directory is None or here == os.path.abspath(store.directory):
        if store.storage == "disk" and store.directory is not None:
            entries = disk_entries(store)
            if not os.path.exists(os.path.join(directory, THETA0_FILE)):
                save_theta0(directory, store.theta0)
        else:
            save_theta0(directory, store.theta0)
            rows = store.rows_in_use() if store.fold_rank else store.M[: len(store.steps)]
            write_rows(os.path.join(directory, BUFFER_FILE), rows)
            entries = [{"file": BUFFER_FILE, "row": 0, "rows": int(rows.shape[0])}] if rows.shape[0] else []
    else:
        entries = persist_rows(store)
        link_or_copy(store.files.theta0_file, os.path.join(directory, THETA0_FILE))
        names = list(dict.fromkeys(e["file"] for e in entries))
        for name in names:
            link_or_copy(os.path.join(store.directory, name), os.path.join(directory, name))
        for stale in os.listdir(directory):  # a checkpoint directory saved again (after a resume)
            if stale not in names and (stale.startswith(("rows-", "basis-")) or stale == BUFFER_FILE):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, stale))
    if store.folded_steps:
        save_fold(store, directory)
    meta = metadata(store)
    meta["files"] = entries
    if step is not None:
        meta["saved_step"] = int(step)
    if live is not None:
        meta["live"] = _fingerprints(live)
    write_meta(store, directory, meta=meta)


def read_meta(directory: str) -> dict:
    try:
        return read_json(os.path.join(directory, META_FILE))
    except (OSError, ValueError) as e:
        raise RelexInputError(f"cannot read the saved trajectory in {directory}: {e}") from None


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
        raise RelexInputError(f"the trajectory in {directory} is {meta['dtype']}, this run asks for {dtype}; use the "
                              "same dtype")
    now = dtype_name(theta0_dtype(specs))
    if meta.get("theta0_dtype") not in (None, now):
        raise RelexInputError(
            f"the trajectory in {directory} recorded {meta['theta0_dtype']} values, this run records {now} ones (the "
            "fp32 master weights of DeepSpeed mixed precision are recorded in float32, the parameters in their own "
            "dtype): its rows do not continue this run's. Start a new window from step 0 (another output_dir, "
            "without resume_from_checkpoint)")
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


def check_sizes(meta: dict, directory: str, specs: Sequence[TensorSpec], dtype):
    """The sizes ``trajectory.json`` claims checked against the bytes present, before a buffer is allocated or a file
    mapped: theta_0's element count (its safetensors header) and each row file's length for the rows it is said to
    hold. A claim beyond the bytes (a damaged or edited file) is a :class:`RelexInputError` at no memory cost."""
    D = sum(int(s.local_numel) for s in specs)
    item = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    theta0 = os.path.join(directory, THETA0_FILE)
    try:
        header, start, size = read_safetensors_header(theta0)
        entry = header.get("theta0") or {}
        numel = 1
        for d in entry.get("shape") or [0]:
            numel *= int(d)
        b, e = entry.get("data_offsets") or (0, 0)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise RelexInputError(f"cannot read {theta0}: {err}; the trajectory is damaged") from None
    if numel != D:
        raise RelexInputError(
            f"{directory}/{META_FILE} claims {len(specs)} tensor(s) of {D:,} elements in all, but {THETA0_FILE} holds "
            f"{numel:,}: the trajectory is damaged or its metadata edited; nothing was allocated")
    if start + int(e) > size:
        raise RelexInputError(
            f"{theta0} is truncated: its header claims {start + int(e):,} bytes, the file holds {size:,}; the "
            "trajectory is damaged: use another checkpoint's relex_trajectory/ or the run's checkpoints with "
            "`relex extrapolate --checkpoints`; nothing was allocated")
    entries = meta.get("files")
    if entries is None:
        nrows = int(meta.get("basis_rows") or 0) + len(meta.get("steps") or [])
        entries = [{"file": BUFFER_FILE, "row": 0, "rows": nrows}] if nrows else []
    for en in entries:
        if (not isinstance(en, dict) or not isinstance(en.get("file"), str)
                or os.path.basename(en["file"]) != en["file"]):
            raise RelexInputError(f"{directory}/{META_FILE} lists a row file {en!r} that is not a file name in the "
                                  "trajectory: it is damaged")
        path = os.path.join(directory, en["file"])
        rows = int(en.get("row", 0)) + int(en.get("rows", 0))
        need = rows * D * item
        have = os.path.getsize(path) if os.path.isfile(path) else -1
        if have < need:
            raise RelexInputError(
                f"{path} holds {max(have, 0):,} bytes but {META_FILE} claims {rows} row(s) of {D:,} "
                f"{dtype_name(torch_dtype(dtype))} elements there ({need:,} bytes): the trajectory is damaged or its "
                "metadata edited; nothing was allocated")


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
):
    """Rebuild a store from ``save(directory)``; the specs (and ``window``, when given) must match the saved ones.
    With a ``run_directory`` other than ``directory``, the saved files are hard-linked into it, so that later
    checkpoints link them again without rewriting a byte, even after ``directory`` is deleted."""
    meta = read_meta(directory)
    check_compatible(meta, directory, specs, dtype, window)
    check_sizes(meta, directory, specs, dtype)  # before anything is allocated or mapped
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
    store.allocate(reuse_file=same_file)
    store.theta0 = load_file(os.path.join(directory, THETA0_FILE))["theta0"].to(store.device)
    store.set_steps(meta["steps"], meta.get("last_sums"))
    store.run_id = meta.get("run_id") or uuid.uuid4().hex
    store.window = dict(meta.get("window") or window or {})
    store.skipped_unchanged_steps = list(meta.get("skipped_unchanged_steps") or [])
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
        target = store.rows_in_use() if store.fold_rank else store.M[:nrows]
        pos = 0
        for e in entries:
            raw = torch.from_file(os.path.join(directory, e["file"]), shared=False,
                                  size=(e["row"] + e["rows"]) * store.D, dtype=store.dtype)
            target[pos : pos + e["rows"]].copy_(raw.view(-1, store.D)[e["row"] :])
            pos += e["rows"]
    if not same_dir:
        os.makedirs(store.directory, exist_ok=True)
        store.files.theta0_file = os.path.join(store.directory, THETA0_FILE)
        link_or_copy(os.path.join(directory, THETA0_FILE), store.files.theta0_file)
        if store.storage != "disk":
            adopt_entries(store, directory, entries)
    else:
        store.files.theta0_file = os.path.join(directory, THETA0_FILE)
    if store.storage == "disk":
        write_meta(store, store.directory)
        if store.folded_steps:
            save_fold(store, store.directory)
    return store


def adopt_entries(store, directory: str, entries: list):
    """Link a loaded checkpoint's row files into the run directory and take them as persisted: basis rows first
    (split at ``basis_rows``), then the ring rows."""
    names = {}
    for e in entries:
        if e["file"] not in names:
            name = e["file"] if e["file"] != BUFFER_FILE else f"rows-resumed-{uuid.uuid4().hex[:8]}.bin"
            link_or_copy(os.path.join(directory, e["file"]), os.path.join(store.directory, name))
            names[e["file"]] = name
    basis, ring, left = [], [], store.basis_rows
    for e in entries:
        e = dict(e, file=names[e["file"]])
        take = min(left, e["rows"])
        if take:
            basis.append(dict(e, rows=take))
        if e["rows"] > take:
            ring.append(dict(e, row=e["row"] + take, rows=e["rows"] - take))
        left -= take
    store.files.basis_entry = basis[0] if len(basis) == 1 else None  # split over files: written again at next save
    store.files.ring_entries = ring


@torch.no_grad()
def verify_live(store, live: Sequence[torch.Tensor], global_step: int) -> list[str]:
    """Whether this (loaded) trajectory belongs to the weights training resumed with at ``global_step``: the
    fingerprints of the live tensors recorded at the save equal today's, and theta_0 plus the last recorded delta
    equals the live tensors to the buffer dtype's rounding (when the last recorded step is ``global_step`` and its
    row is in the ring; after a fold the fingerprints decide). Returns what differs (empty: verified).

    The bound per element: the delta was computed in float32 from the parameters (relative error <= u32 = 2^-24)
    and rounded once into the buffer dtype (<= u = eps/2, plus half its smallest subnormal), so
    ``|theta_0 + delta - theta| <= 2 (u + u32) |delta| + tiny``, exact float64 arithmetic for the sum."""
    problems = []
    fps = store.saved.get("live")
    if fps is not None and store.saved.get("step") == global_step:
        for spec, t, fp in zip(store.specs, live, fps):
            why = fingerprint_mismatch(fingerprint(t), fp)
            if why:
                problems.append(f"{spec.name}: the weights differ from those saved with the trajectory ({why})")
    if store.steps and store.steps[-1] == global_step and store.num_ring_rows:
        store.synchronize()
        row = store.M[store.num_ring_rows - 1]
        fi = torch.finfo(store.dtype)
        rel = 2 * (fi.eps / 2 + 2.0**-24)
        tiny = fi.tiny * fi.eps
        chunk = SNAPSHOT_CHUNK_DEVICE if store.theta0.device.type != "cpu" else SNAPSHOT_CHUNK
        for spec, t in zip(store.specs, live):
            o, n = spec.offset, spec.local_numel
            src = t.reshape(-1)
            bad, worst, worst_tol = 0, 0.0, 0.0
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                d = row[o + a : o + b].to(device=store.theta0.device, dtype=torch.float64)
                err = (src[a:b].to(device=d.device, dtype=torch.float64)
                       - store.theta0[o + a : o + b].to(torch.float64) - d).abs()
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
    elif fps is None or store.saved.get("step") != global_step:
        logger.warning("relex: the resumed trajectory (%s) cannot be checked against the live weights (no row and no "
                       "fingerprint at step %d)", store.saved.get("directory"), global_step)
    return problems


def open_saved(cls, directory: str, *, storage: str = "host", device=None):
    """Load a saved trajectory (``save(directory)``, e.g. ``partial_trajectory/``) using only what it recorded:
    its tensors, dtype, slots and fold settings."""
    meta_path = os.path.join(directory, META_FILE)
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as e:
        raise RelexInputError(
            f"{directory} is not a saved RELEX trajectory (cannot read {META_FILE}: {e}); pass the "
            f"partial_trajectory/ or relex_trajectory/ directory the callback wrote"
        ) from None
    try:
        specs = [TensorSpec.from_json(d) for d in meta["specs"]]
        K = meta["K"] if meta.get("fold_rank") else max(1, len(meta["steps"]))
        return load(cls, directory, specs, K, dtype=meta["dtype"], storage=storage, device=device,
                        run_directory=directory if storage == "disk" else None, fold_rank=meta.get("fold_rank"))
    except RelexInputError:
        raise
    except Exception as e:  # safetensors raises its own error type for a truncated file
        # a damaged trajectory: missing fields, a truncated theta0.safetensors or buffer file
        raise RelexInputError(
            f"{directory} holds a damaged RELEX trajectory ({type(e).__name__}: {e}); use another checkpoint's "
            f"relex_trajectory/ or the run's checkpoints with `relex extrapolate --checkpoints`"
        ) from None
