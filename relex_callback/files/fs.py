"""Files and directories that appear whole or not at all, and the one check that outputs are free.

Every file the package writes goes through :func:`atomic_file` (a temporary sibling, flushed, renamed into place) and
every checkpoint directory through :func:`atomic_directory` (a hidden temporary sibling ``.step-500.tmp-<pid>-<rand>``
renamed at the end). A killed process leaves the old file or the new one, never half of one; a failed write removes
its temporary. :func:`write_failure` tells a failed write (``OSError``, safetensors' own ``SafetensorError``, which
is what a full disk raises from ``save_file``) from a bug. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Iterable, Optional

from ..errors import RelexInputError

STATE_NAME = "relex_state.safetensors"
STATE_INDEX_NAME = "relex_state.index.json"  # distributed runs: the state sharded by tensor


def horizon_dir(out_dir: str, horizon: int) -> str:
    return os.path.join(out_dir, f"step-{int(horizon)}")


def _fsync_path(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir_files(d: str):
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            _fsync_path(p)
    _fsync_path(d)


@contextlib.contextmanager
def atomic_file(path: str, durable: bool = True):
    """Yield a temporary path beside ``path``; when the block succeeds it is flushed (``durable``) and renamed to
    ``path``, when it raises it is removed. ``durable=False`` skips the fsync (a file rewritten at every training
    step whose data is not fsync'd either; the rename still protects against a killed process)."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        _fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str, durable: bool = True):
    """``text`` into ``path`` atomically."""
    with atomic_file(path, durable=durable) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path: str, obj, durable: bool = True, **dump_kw):
    """``obj`` as JSON into ``path`` atomically (one C-encoded string: cheap enough for a per-step rewrite)."""
    write_text(path, json.dumps(obj, **dump_kw), durable=durable)


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool = False):
    """Yield a temporary sibling of ``final``; rename it to ``final`` when the block succeeds, delete it when it
    raises. ``final`` existing is an error unless ``overwrite``."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise RelexInputError(f"{final} already exists; choose another output directory or pass overwrite")
    tmp = new_temporary_dir(final)
    try:
        yield tmp
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_temporary_dir(final: str, token: Optional[str] = None) -> str:
    """Create and return the hidden temporary sibling in which ``final`` is assembled (``token``: the same name on
    every rank of a distributed run)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    token = token or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{token}")
    os.makedirs(tmp, exist_ok=True)
    return tmp


def commit_directory(tmp: str, final: str):
    """Flush ``tmp`` and rename it to ``final`` (replacing an existing ``final`` only after the new one is whole)."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    _fsync_dir_files(tmp)
    if os.path.exists(final):
        trash = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(parent)


def clean_stale_temporaries(parent: str, name: str):
    """Remove temporaries a killed writer left beside ``parent/name`` (never the final directory)."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def check_outputs_free(out_dir: str, horizons: Iterable[int], overwrite: bool, include_state: bool = True):
    """Refuse, before any work, to overwrite existing results unless ``overwrite``. ``include_state=False`` checks
    only the horizons (``materialize`` writes beside the state file it reads)."""
    if overwrite:
        return
    paths = [horizon_dir(out_dir, h) for h in horizons]
    if include_state:
        paths += [os.path.join(out_dir, STATE_NAME), os.path.join(out_dir, STATE_INDEX_NAME)]
    taken = [p for p in paths if os.path.exists(p)]
    if taken:
        raise RelexInputError(
            f"{', '.join(taken)} already exist(s); choose another output directory, remove them, or pass overwrite"
        )


def check_writable_dir(path: str, what: str):
    """``path`` is, or can be created as, a directory this process can write: its nearest existing ancestor is a
    writable directory (tried with an empty temporary directory, removed at once). Raises :class:`RelexInputError`
    naming ``what`` and what to change."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise RelexInputError(f"{what} {path} exists and is not a directory; choose another {what}")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise RelexInputError(f"{what} {path} cannot be created: {probe} is a file, not a directory; choose another {what}")
    import tempfile

    try:  # permissions, read-only file systems, /proc: only trying tells
        os.rmdir(tempfile.mkdtemp(prefix=".relex-probe-", dir=probe))
    except OSError as e:
        raise RelexInputError(f"{what} {path} cannot be written ({probe}: {e.strerror}); choose another {what}") from None


def write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed write (full disk, permissions, I/O error), whatever library raised it: ``OSError``
    and safetensors' ``SafetensorError`` (its ``save_file`` reports ENOSPC as one), not our own input errors."""
    from ..errors import RelexError

    if isinstance(e, RelexError):
        return False
    if isinstance(e, OSError):
        return True
    return type(e).__name__ == "SafetensorError" or "No space left" in str(e)


def describe_failure(e: BaseException) -> str:
    """One line for a failed write: the OS reason when there is one."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({type(e).__name__}, errno {e.errno})"
    return f"{e} ({type(e).__name__})"
