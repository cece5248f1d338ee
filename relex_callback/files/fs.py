"""Files and directories that appear whole or not at all, and the one check that outputs are free.

Every file the package writes goes through :func:`atomic_file` (a temporary sibling, flushed, renamed into place) and
every checkpoint directory through :func:`atomic_directory` (a hidden temporary sibling ``.step-500.tmp-<pid>-<rand>``
renamed at the end). A killed process leaves the old file or the new one, never half of one; a failed write removes
its temporary. :func:`write_failure` tells a failed write (``OSError``, safetensors' own ``SafetensorError``, which
is what a full disk raises from ``save_file``) from a bug. No torch here.

Every JSON the package reads goes through :func:`read_json` / :func:`loads_json` (size and nesting bounded before the
parser runs: a 100,000-deep file is an input error, not a ``RecursionError``), and every safetensors header relex
parses itself through :func:`read_safetensors_header` (the length it claims checked against the file's bytes before
anything is read). Every temporary name carries the writer's process id, so :func:`sweep_temporaries` removes what
an interrupted writer left, and only that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import Iterable, Optional
import tempfile

from ..errors import RelexError, RelexInputError

STATE_NAME = "relex_state.safetensors"
STATE_INDEX_NAME = "relex_state.index.json"  # distributed runs: the state sharded by tensor
STATE_SHARD_PATTERN = re.compile(r"^relex_state-\d{5}-of-\d{5}\.safetensors$")  # its shards (state.state_shard_name)
REPORT_FILE = "report.json"
PLOT_FILE = "horizons.png"  # horizons scored (evaluate_horizons / horizons="auto")
REPORT_PLOT_FILE = "report.png"  # `relex report --plot`, beside report.json
MERGED_SUFFIX = "-merged"  # PEFT with merge_lora: step-H-merged/ beside the adapter step-H/
RELEX_MARKER = "relex_horizon.json"  # in every step-H/ relex writes: the run id, the horizon and tcut


MAX_JSON_BYTES = 256 << 20  # the largest JSON relex reads (an index of a very large model is a few MB)
MAX_JSON_DEPTH = 64  # relex's own files nest 5 deep, a transformers config.json about 4
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def _json_depth_over(text: str, limit: int) -> bool:
    """Whether ``text`` nests arrays/objects more than ``limit`` deep (strings skipped), without recursion."""
    if text.count("[") + text.count("{") <= limit:
        return False
    if '"' in text:
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):
        depth += 1 if m.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def loads_json(text, what: str, max_bytes: int = MAX_JSON_BYTES):
    """``json.loads(text)`` with its size and nesting bounded first: beyond them a :class:`RelexInputError` naming
    ``what`` (a ``ValueError``, like the parser's own errors, which pass through unchanged)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    if len(text) > max_bytes:
        raise RelexInputError(f"{what} is {len(text):,} bytes of JSON, more than the {max_bytes:,} relex reads: the "
                              "file is damaged or is not the file relex expects")
    if _json_depth_over(text, MAX_JSON_DEPTH):
        raise RelexInputError(
            f"{what} nests JSON more than {MAX_JSON_DEPTH} levels deep: the file is damaged or is not "
            "the file relex expects; replace it with the one relex (or save_pretrained) wrote"
        )
    try:
        return json.loads(text)
    except RecursionError:  # not reached below MAX_JSON_DEPTH; kept as the last guard
        raise RelexInputError(f"{what} nests JSON too deep to parse: the file is damaged") from None


def read_json(path: str, what: Optional[str] = None, max_bytes: int = MAX_JSON_BYTES):
    """The JSON file ``path``, its size checked (``os.fstat``) before a byte is read and its nesting before it is
    parsed (:func:`loads_json`). ``OSError`` and the parser's ``ValueError`` pass through to the caller's message."""
    what = what or path
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise RelexInputError(f"{what} is {size:,} bytes, more than the {max_bytes:,} bytes of JSON relex reads: "
                                  "the file is damaged or is not the file relex expects")
        data = f.read(max_bytes + 1)
    return loads_json(data, what, max_bytes)


def read_safetensors_header(path: str) -> tuple[dict, int, int]:
    """The header of the safetensors file ``path`` as ``(header, data_start, file_size)``: the header length it
    claims is checked against the bytes present (and safetensors' 100 MB limit) before it is read, and the header
    parsed by :func:`loads_json`. Raises ``ValueError`` (a :class:`RelexInputError` for a lying length) or
    ``OSError``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise RelexInputError(f"{path} is {size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise RelexInputError(f"{path} claims a {n:,}-byte header but holds {size:,} bytes: the file is truncated "
                                  "or corrupt")
        header = loads_json(f.read(n), f"the header of {path}")
    if not isinstance(header, dict):
        raise RelexInputError(f"the header of {path} is not a JSON object: the file is corrupt")
    return header, 8 + n, size


def horizon_dir(out_dir: str, horizon: int) -> str:
    return os.path.join(out_dir, f"step-{int(horizon)}")


def _libc_sync_file_range():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        f = libc.sync_file_range
    except Exception:  # noqa: BLE001 - not Linux, no such call, no C library to load: the commit's fsync does it all
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, wait for nothing


def start_writeback(fd: int, offset: int, nbytes: int):
    """Ask the kernel to start writing bytes ``[offset, offset + nbytes)`` of ``fd`` to the device now, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the disk works while the next tensor is
    computed and the fsync at the commit finds most of the file already written (`python bench/end_of_window.py`:
    the horizons' write phase). Nothing is promised by it: the fsync still makes the file durable and reports any
    error; where the call does not exist, or fails, this does nothing."""
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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


# Directories whose files are flushed by whoever commits them (a checkpoint being assembled: commit_directory fsyncs
# every file in it and the directory before the rename) or never needed after a crash (scratch parts joined into a
# durable file): atomic_file skips its own fsyncs there, so no file is flushed twice.
_DEFERRED: set[str] = set()


@contextlib.contextmanager
def deferred_sync(directory: str):
    """While the block runs, :func:`atomic_file` does not fsync files written directly in ``directory`` (nor the
    directory): the caller flushes them when it commits them (:func:`commit_directory`), or they are scratch."""
    d = os.path.abspath(directory)
    added = d not in _DEFERRED
    _DEFERRED.add(d)
    try:
        yield d
    finally:
        if added:
            _DEFERRED.discard(d)


@contextlib.contextmanager
def atomic_file(path: str, durable: bool = True):
    """Yield a temporary path beside ``path``; when the block succeeds it is flushed (``durable``) and renamed to
    ``path``, when it raises it is removed. ``durable=False`` skips the fsync (a file rewritten at every training
    step whose data is not fsync'd either; the rename still protects against a killed process); so does a
    directory under :func:`deferred_sync` (its committer flushes it)."""
    durable = durable and os.path.dirname(os.path.abspath(path)) not in _DEFERRED
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
def atomic_directory(final: str, overwrite: bool = False, marked_only: bool = True, tmp: Optional[str] = None):
    """Yield a temporary sibling of ``final``; rename it to ``final`` when the block succeeds, delete it when it
    raises. ``final`` existing is an error unless ``overwrite``; even then an existing ``final`` without the relex
    marker (not relex's output) is refused and left, unless ``marked_only=False`` (a directory inside relex's own
    files, e.g. ``partial_trajectory/adapter``). ``tmp``: a temporary of ``final`` already begun
    (:func:`new_temporary_dir`: a horizon written while the solve ran), finished by the block and committed, or
    deleted, the same way (deleted too when ``final`` is refused)."""
    final = os.path.abspath(final)
    try:
        if os.path.lexists(final) and not overwrite:
            raise RelexInputError(f"{final} already exists; choose another output directory or pass overwrite")
        if marked_only and os.path.lexists(final) and not_ours(final):
            raise RelexInputError(f"{final} {not_ours(final)}; overwrite replaces only what relex wrote, so it was "
                                  "left as it is: move it away or choose another output directory")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp = tmp or new_temporary_dir(final)
    try:
        with deferred_sync(tmp):  # commit_directory flushes every file in it once
            yield tmp
        commit_directory(tmp, final, marked_only=marked_only)
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


def commit_directory(tmp: str, final: str, marked_only: bool = True):
    """Flush ``tmp`` and rename it to ``final`` (replacing an existing ``final`` only after the new one is whole, and
    only when it carries the relex marker unless ``marked_only=False``)."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    _fsync_dir_files(tmp)
    if os.path.lexists(final):
        why = not_ours(final) if marked_only else None
        if why:  # overwrite replaces only relex's own output (checked before any work; checked again here)
            raise RelexInputError(
                f"{final} {why}; it was left as it is: move it away or choose another output directory"
            )
        trash = os.path.join(parent, f".{os.path.basename(final)}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        try:
            os.replace(tmp, final)
        except BaseException:  # a failure or a signal between the two renames: the old output goes back
            if not os.path.lexists(final):
                os.replace(trash, final)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(parent)


def _temporary_name(name: str) -> re.Pattern:
    """The names :func:`new_temporary_dir` / :func:`commit_directory` / ShardedWriter give the temporaries of
    ``name``: ``.<name>.tmp-<pid>-<hex>``, ``.<name>.tmp-dist-<pid>-<hex>``, ``.<name>.old-<hex>``."""
    return re.compile(rf"^\.{re.escape(name)}\.(tmp-(dist-)?\d+-[0-9a-f]{{6,8}}|old-(\d+-)?[0-9a-f]{{8}})$")


def clean_stale_temporaries(parent: str, name: str):
    """Remove temporaries a killed writer left beside ``parent/name``: only names this package gives them (see
    :func:`_temporary_name`), never the final directory nor anything else that starts alike."""
    if not os.path.isdir(parent):
        return
    pattern = _temporary_name(name)
    for entry in os.listdir(parent):
        if pattern.match(entry):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def sweep_temporaries(out_dir: str, pid: Optional[int] = None) -> list[str]:
    """Remove the temporaries process ``pid`` (default: this one) left in and beside ``out_dir`` after a failure or a
    signal: ``.NAME.tmp-PID-*`` directories, ``FILE.tmp-PID-*`` files, the streamed solve's ``.OUT.relex-parts-PID-*``
    and the buffered one's ``.OUT.trajectory-PID`` beside ``out_dir``; a ``.NAME.old-PID-*`` whose ``NAME`` is gone is
    put back (a replace cut between its two renames), else removed. Nothing another process or the user named is
    touched. Returns the names removed or restored."""
    pid = os.getpid() if pid is None else int(pid)
    out = os.path.abspath(out_dir)
    done = []
    inside = re.compile(rf"^(\..+\.tmp-(dist-)?{pid}-[0-9a-f]{{6,8}}|.+\.tmp-{pid}-[0-9a-f]{{6}})$")
    old = re.compile(rf"^\.(.+)\.old-{pid}-[0-9a-f]{{8}}$")
    beside = re.compile(rf"^\.{re.escape(os.path.basename(out))}\.(relex-parts-{pid}-[0-9a-f]{{6}}|trajectory-{pid}|"
                        rf"tmp-{pid}-[0-9a-f]{{6,8}})$")
    for d, pattern in ((out, inside), (os.path.dirname(out), beside)):
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for e in entries:
            p = os.path.join(d, e)
            m = old.match(e) if d == out else None
            if m:
                final = os.path.join(d, m.group(1))
                with contextlib.suppress(OSError):
                    if os.path.lexists(final):
                        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                    else:
                        os.replace(p, final)
                    done.append(e)
            elif pattern.match(e):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                    done.append(e)
    return done


# ------------------------------------------------------------------------------------ what a run may write and remove
def output_names(horizons: Iterable[int], *, state: bool = True, report: bool = True, merged: bool = False,
                 plot: bool = False) -> list[str]:
    """Every name a run with these settings writes directly in its output directory (the one table: the free-outputs
    check and the tests enumerate it). ``state``: the state file in both forms (single file, sharded index; the
    shards are matched by :data:`STATE_SHARD_PATTERN`); ``merged``: PEFT with ``merge_lora`` (``step-H-merged/``);
    ``plot``: scored horizons (``horizons.png``)."""
    names = []
    for h in horizons:
        names.append(os.path.basename(horizon_dir("", h)))
        if merged:
            names.append(os.path.basename(horizon_dir("", h)) + MERGED_SUFFIX)
    if state:
        names += [STATE_NAME, STATE_INDEX_NAME]
    if report:
        names.append(REPORT_FILE)
    if plot:
        names.append(PLOT_FILE)
    return names


def read_marker(path: str) -> Optional[dict]:
    """The relex marker of a directory (``relex_horizon.json``), or ``None`` when it has none (or it is unreadable)."""
    try:
        m = read_json(os.path.join(path, RELEX_MARKER))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "relex_callback" else None


def not_ours(path: str, run_id: Optional[str] = None, horizon: Optional[int] = None,
             tcut: Optional[int] = None) -> Optional[str]:
    """Why the directory ``path`` is not relex's output (of run ``run_id``, for ``horizon`` after ``tcut`` when
    given), or ``None`` when it is. The one ownership test of every removal and every read-back of a ``step-H/``."""
    if not os.path.isdir(path):
        return "is not a directory"
    m = read_marker(path)
    if m is None and os.path.lexists(os.path.join(path, RELEX_MARKER)):
        return f"has a {RELEX_MARKER} that is not relex's (unreadable, damaged or edited)"
    if m is None:
        return f"has no {RELEX_MARKER}: relex did not write it"
    if run_id is not None and m.get("run_id") != run_id:
        return (f"was written by another RELEX run (run id {m.get('run_id')}, tcut {m.get('tcut')}), not this one "
                f"({run_id})")
    if horizon is not None and m.get("horizon") != int(horizon):
        return f"holds horizon {m.get('horizon')}, not {horizon}"
    if tcut is not None and m.get("tcut") != int(tcut):
        return f"was extrapolated from tcut {m.get('tcut')}, not {tcut}"
    return None


def _relex_metadata(path: str) -> Optional[str]:
    """The ``relex`` metadata string of a safetensors file (only the header is read), or ``None`` when the file is
    not a safetensors file with one (or is unreadable)."""
    try:
        head, _, _ = read_safetensors_header(path)
    except (OSError, ValueError):
        return None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    value = meta.get("relex") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _is_relex_state(path: str) -> bool:
    """A safetensors file with the ``relex`` metadata."""
    return _relex_metadata(path) is not None


def _is_relex_json(path: str, keys: tuple) -> bool:
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def foreign_output(path: str) -> Optional[str]:
    """Why ``path`` (an existing output name) may not be replaced even with ``overwrite``: it is not something relex
    wrote (a directory without the marker, a state file without relex metadata, a ``report.json`` that is not a
    RELEX report), else ``None``."""
    name = os.path.basename(path)
    if name == STATE_NAME or STATE_SHARD_PATTERN.match(name):
        return None if os.path.isfile(path) and _is_relex_state(path) else "is not a RELEX state file"
    if name == STATE_INDEX_NAME:
        return None if os.path.isfile(path) and _is_relex_json(path, ("weight_map", "metadata")) else \
            "is not a RELEX state index"
    if name == REPORT_FILE:
        return None if os.path.isfile(path) and _is_relex_json(path, ("tcut", "tensors")) else "is not a RELEX report"
    if name in (
        PLOT_FILE,
        REPORT_PLOT_FILE,
    ):  # relex's plot carries a PNG text entry "Source: relex_callback" (scoring.plot_horizons)
        try:
            with open(path, "rb") as f:
                ours = b"Source\x00relex_callback" in f.read(1 << 16)
        except OSError:
            ours = False
        return None if ours else "is not a plot relex drew"
    return not_ours(path)


def output_run_id(path: str) -> Optional[str]:
    """The run id a relex output carries: a ``step-H/`` directory's marker, a state file's or shard's ``relex``
    metadata, a state index's metadata. ``None`` for names that carry none (the report, plots), for older outputs
    written before run ids, and for anything unreadable."""
    name = os.path.basename(path)
    try:
        if os.path.isdir(path):
            rid = (read_marker(path) or {}).get("run_id")
        elif name == STATE_NAME or STATE_SHARD_PATTERN.match(name):
            rid = loads_json(_relex_metadata(path) or "{}", path).get("run_id")
        elif name == STATE_INDEX_NAME:
            rid = (read_json(path).get("metadata") or {}).get("run_id")
        else:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def _all_of_run(taken: list, run_id: str) -> bool:
    """Every existing output is run ``run_id``'s: each one that carries a run id carries this one (at least one
    does), and the report and plots beside them, which carry none, are relex's (written by the same finalize)."""
    carriers = [p for p in taken if os.path.basename(p) not in (REPORT_FILE, PLOT_FILE, REPORT_PLOT_FILE)]
    return (bool(carriers) and all(output_run_id(p) == run_id for p in carriers)
            and not any(foreign_output(p) for p in taken))


def check_outputs_free(out_dir: str, horizons: Iterable[int], overwrite: bool, include_state: bool = True, *,
                       report: Optional[bool] = None, merged: bool = False, plot: bool = False,
                       own_run: Optional[str] = None) -> list:
    """Refuse, before any work, to overwrite existing results unless ``overwrite``; with ``overwrite``, refuse to
    replace anything relex did not write (a user's ``step-6/`` from another tool, a look-alike file). Every name of
    :func:`output_names` is checked, and the state's shards. ``include_state=False`` checks only the horizons
    (``materialize`` writes beside the state file it reads); ``report`` defaults to ``include_state``.

    ``own_run``: the run id of a window being resumed. Outputs that are all that run's (written after the checkpoint
    training resumed from, by the same run, before it stopped) are not refused: they are returned, and the caller
    replaces them when the resumed window reaches ``tcut``. Returns the existing outputs that may be replaced."""
    report = include_state if report is None else report
    horizons = list(horizons)
    paths = [os.path.join(out_dir, n) for n in output_names(horizons, state=include_state, report=report,
                                                             merged=merged, plot=plot)]
    if include_state and os.path.isdir(out_dir):
        paths += [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if STATE_SHARD_PATTERN.match(n)]
    taken = [p for p in paths if os.path.lexists(p)]
    if not taken:
        return []
    if not overwrite and own_run is not None and _all_of_run(taken, own_run):
        return taken
    if not overwrite:
        resumed = "" if own_run is None else (
            f" (the window being resumed is RELEX run {own_run}; not all of these are its own: "
            + ", ".join(f"{os.path.basename(p)} run {output_run_id(p) or 'unknown'}" for p in taken
                        if os.path.basename(p) not in (REPORT_FILE, PLOT_FILE, REPORT_PLOT_FILE)) + ")")
        raise RelexInputError(
            f"{', '.join(taken)} already exist(s){resumed}; choose another output directory, remove them, or pass "
            "overwrite"
        )
    foreign = [(p, why) for p in taken for why in [foreign_output(p)] if why]
    if foreign:
        raise RelexInputError(
            "overwrite replaces only what relex wrote, and " + "; ".join(f"{p} {why}" for p, why in foreign)
            + ": nothing was touched; move it away or choose another output directory"
        )
    return taken


def check_writable_dir(path: str, what: str):
    """``path`` is, or can be created as, a directory this process can write: its nearest existing ancestor is a
    writable directory (tried with an empty temporary directory, removed at once). Raises :class:`RelexInputError`
    naming ``what`` and what to change."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise RelexInputError(f"{what} {path} exists and is not a directory; choose another {what}")
    while not os.path.exists(probe):
        if os.path.islink(probe):  # a symlink to nothing: creating the directory would fail after all the work
            raise RelexInputError(f"{what} {path} cannot be created: {probe} is a symlink to {os.readlink(probe)}, "
                                  f"which does not exist; remove the link, create its target, or choose another {what}")
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise RelexInputError(
            f"{what} {path} cannot be created: {probe} is a file, not a directory; choose another {what}"
        )

    prefix = f".relex-probe-{os.getpid()}-"
    try:  # permissions, read-only file systems, /proc: only trying tells
        os.rmdir(tempfile.mkdtemp(prefix=prefix, dir=probe))
    except BaseException as e:
        with contextlib.suppress(OSError):  # a signal between the two: the probe is not left behind
            for entry in os.listdir(probe):
                if entry.startswith(prefix):
                    os.rmdir(os.path.join(probe, entry))
        if not isinstance(e, OSError):
            raise
        raise RelexInputError(
            f"{what} {path} cannot be written ({probe}: {e.strerror}); choose another {what}"
        ) from None


def free_bytes(path: str) -> int:
    """Free bytes of the file system ``path`` is (or will be) on: that of its nearest existing ancestor."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def check_free_space(out_dir: str, parts: dict, what: str = "--out"):
    """Refuse, before the first write, a plan whose outputs do not fit the free space of ``out_dir``'s file system.
    ``parts``: what will be written -> bytes (estimates from the inputs' own sizes)."""
    need = sum(int(v) for v in parts.values())
    free = free_bytes(out_dir)
    if need > free:
        gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,} bytes"  # noqa: E731
        listed = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v)
        raise RelexInputError(f"{what} {out_dir}: this run writes about {gb(need)} ({listed}) but its file system has "
                              f"{gb(free)} free; nothing was written: free space, write fewer horizons, or choose "
                              f"another {what}")


def write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed write (full disk, permissions, I/O error), whatever library raised it: ``OSError``
    and safetensors' ``SafetensorError`` (its ``save_file`` reports ENOSPC as one), not our own input errors."""
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
