"""One lock for every writer of a relex output directory: the callback, ``relex extrapolate``, ``relex materialize``.

``<out>/.relex-lock.json`` names the writer that owns the directory (process id, host, start time, a token, what it
is: ``RelexCallback`` or the ``relex`` command line) from before its first byte until it is done. A second writer is
refused at once with the holder named. A holder that is gone is taken over: its process ended (same host; a pid now
used by an unrelated process is told apart by its start time), its trainer object is gone or is another trainer
(same process: a notebook that trains again after an error), or, on another host, its heartbeat (the file's mtime)
is older than ``STALE_SECONDS``. Taking over renames the stale file away and creates a new one with ``O_EXCL``, so two
writers that both found it stale cannot both win.

:func:`writing` is the offline writers' use of it: the output path checked, the lock taken (creating ``--out`` if
needed), and on the way out every temporary of this process removed; a signal (:class:`RelexInterrupted`) also
removes what the interrupted run had written, and an ``--out`` the run created is removed again when it is left
empty, so that "nothing was written" is true and a plain rerun works. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
import weakref
from typing import Optional

from ..errors import RelexInputError, RelexInterrupted
from .fs import check_writable_dir, read_json, sweep_temporaries

LOCK_FILE = ".relex-lock.json"  # inside the output directory while a writer owns it
CALLBACK = "RelexCallback"

_HELD: "weakref.WeakValueDictionary[str, OutputLock]" = weakref.WeakValueDictionary()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_started(pid: int) -> Optional[str]:
    """When process ``pid`` started (Linux: field 22 of ``/proc/<pid>/stat``, in clock ticks since boot), or ``None``
    where that cannot be read: with the pid it names one process, so a pid reused by an unrelated process is told
    from the lock's holder."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _pid_command(pid: int) -> str:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except (OSError, ValueError):
        return ""


def command_line(limit: int = 200) -> str:
    """This process's command line, shortened (recorded in the lock, shown to a refused writer)."""
    cmd = " ".join([os.path.basename(sys.argv[0] or "python")] + list(sys.argv[1:]))
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."


class OutputLock:
    """The lock of one output directory (see the module docstring).

    Args:
        out_dir (`str`): the directory; created when missing.
        trainer (*optional*): the callback's trainer (same-process ownership; ``None`` for the command line).
        writer (`str`, *optional*): what holds it, named to a refused writer: ``"RelexCallback"`` or
            ``"relex extrapolate"`` / ``"relex materialize"``.
        what (`str`, *optional*): how the refusal names the directory (``output_dir``, ``--out``).
    """

    STALE_SECONDS = 1800

    def __init__(self, out_dir: str, trainer=None, *, writer: str = CALLBACK, what: str = "output_dir"):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.trainer = weakref.ref(trainer) if trainer is not None else None
        self.writer, self.what = writer, what
        self.held = False
        self._touched = 0.0

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "since": time.time(),
                "started": _pid_started(os.getpid()), "writer": self.writer, "command": command_line()}

    def acquire(self):
        self._created = not os.path.lexists(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        for _ in range(8):  # a takeover raced by another writer: look again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except BaseException as e:
                if not isinstance(e, FileExistsError):  # a signal right after the file was created: not left behind
                    self._remove_if_empty()
                    raise
                held, why = self._holder()
                if why:
                    raise RelexInputError(
                        f"{self.what} {self.out_dir} is in use by {why}; two writers of one directory would mix their "
                        "state file, report and horizons, so nothing was written. Wait for it to finish, or give each "
                        f"writer its own {self.what}; if no such process runs, delete {self.path}"
                    ) from None
                self._take_over(held)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self._record(), f)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise
            self.held = True
            _HELD[self.token] = self
            return
        raise RelexInputError(f"{self.what} {self.out_dir}: its lock {self.path} keeps changing hands; another writer "
                              "is starting there: wait for it or choose another directory")

    def _remove_if_empty(self):
        with contextlib.suppress(OSError):
            if os.path.getsize(self.path) == 0:
                os.remove(self.path)

    def _take_over(self, held: Optional[dict]):
        """Move the stale lock away; if what was moved is not the stale holder (another writer took over first),
        put it back."""
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = read_json(aside)
        except (OSError, ValueError):
            moved = None
        token = held.get("token") if isinstance(held, dict) else None
        if token is not None and isinstance(moved, dict) and moved.get("token") != token:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # a fresh lock: back where it was (never over a newer one)
        with contextlib.suppress(OSError):
            os.remove(aside)

    def _holder(self) -> tuple[Optional[dict], Optional[str]]:
        """``(record, why it is alive)``; ``why`` is ``None`` when the lock may be taken over."""
        try:
            h = read_json(self.path)
            age = time.time() - os.stat(self.path).st_mtime
        except (OSError, ValueError):
            return None, None  # unreadable or half written: take it over
        if not isinstance(h, dict):
            return None, None
        writer = h.get("writer") if isinstance(h.get("writer"), str) else CALLBACK
        name = f"a {CALLBACK}" if writer == CALLBACK else f"`{writer}`"
        who = f"process {h.get('pid')} on {h.get('host')}"
        if isinstance(h.get("since"), (int, float)):
            who += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since']))}"
        if isinstance(h.get("command"), str) and writer != CALLBACK:
            who += f": {h['command'][:200]}"
        if h.get("host") != socket.gethostname():
            return h, (f"{name} in {who}, active {age:.0f} s ago" if age < self.STALE_SECONDS else None)
        pid = h.get("pid")
        if pid != os.getpid():
            if not isinstance(pid, int) or isinstance(pid, bool) or not _pid_alive(pid):
                return h, None
            started, now = h.get("started"), _pid_started(pid)
            if started is not None and now is not None and started != now:
                return h, None  # the pid was reused: the holder ended, an unrelated process has its number now
            if started is None:  # a lock without the holder's start time: only the pid is known
                cmd = _pid_command(pid)
                return h, (f"process {pid} on {h.get('host')} (still running{': ' + cmd if cmd else ''}; the lock does "
                           f"not say whether that is the relex writer that wrote it)")
            return h, f"{name} in {who}"
        other = _HELD.get(h.get("token"))
        if other is None or not other.held:
            return h, None
        if other.trainer is None or self.trainer is None:  # an offline writer of this process holds it
            return h, f"{name} in this process ({who})"
        mine, theirs = self.trainer(), other.trainer()
        if mine is not None and mine is theirs:
            return h, f"another {CALLBACK} of this trainer"
        return h, None

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
            if read_json(self.path).get("token") == self.token:
                os.remove(self.path)
        except (OSError, ValueError, AttributeError):
            pass
        if getattr(self, "_created", False):  # a directory made only for the lock goes with it (when left empty)
            with contextlib.suppress(OSError):
                os.rmdir(self.out_dir)


# names a run writes directly in its output directory (rolled back after a signal)
_OUTPUT = re.compile(r"^(step-\d+(-merged)?|relex_state(-\d{5}-of-\d{5})?\.safetensors|relex_state\.index\.json|"
                     r"report\.json|report\.png|horizons\.png)$")


def _entries(d: str) -> dict:
    try:
        return {e: os.lstat(os.path.join(d, e)).st_ino for e in os.listdir(d)}
    except OSError:
        return {}


def visible_entries(d: str) -> list[str]:
    """What ``d`` holds besides a lock file (``--out exists and is not empty`` counts these)."""
    try:
        return sorted(e for e in os.listdir(d) if e != LOCK_FILE)
    except OSError:
        return []


@contextlib.contextmanager
def writing(out_dir: str, writer: str, what: str = "--out"):
    """Own ``out_dir`` for an offline writer (``relex extrapolate`` / ``materialize``): the path checked
    (:func:`~relex_callback.files.fs.check_writable_dir`: a file, a dangling symlink, a read-only parent), the lock
    taken before the first byte, and on the way out: the lock released, this process's temporaries removed (in and
    beside ``out_dir``); after a signal (:class:`RelexInterrupted`) every output this run wrote is removed too
    (listed in ``removed`` of the exception); an ``out_dir`` this run created is removed when left empty. Nested
    use by one process on one directory is a no-op (the command line holds it around the Python API)."""
    key = os.path.realpath(out_dir)
    if key in _OWNED:
        yield _OWNED[key]
        return
    check_writable_dir(out_dir, what)
    created = not os.path.lexists(out_dir)
    lock = OutputLock(out_dir, writer=writer, what=what)
    try:
        lock.acquire()
    except BaseException:
        with _signals_deferred():
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(out_dir)
        raise
    before = _entries(out_dir)
    _OWNED[key] = lock
    ok = False
    try:
        yield lock
        ok = True
    except BaseException as e:
        with _signals_deferred():
            if isinstance(e, RelexInterrupted):  # what this run wrote goes (then a replaced output's old copy back)
                e.out_dir = out_dir
                for name, ino in _entries(out_dir).items():
                    if _OUTPUT.match(name) and before.get(name) != ino:
                        p = os.path.join(out_dir, name)
                        with contextlib.suppress(OSError):
                            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                            e.removed.append(name)
            sweep_temporaries(out_dir)
        raise
    finally:
        try:
            with _signals_deferred():
                _OWNED.pop(key, None)
                lock.release()
                sweep_temporaries(out_dir)
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(out_dir)  # only when empty: a refused or interrupted run leaves no directory behind
                if ok:
                    COMPLETED.append(out_dir)
        except RelexInterrupted as e:  # a signal during the cleanup of a finished run: its outputs are whole
            e.out_dir, e.complete = out_dir, ok
            raise


_OWNED: dict = {}
COMPLETED: list = []  # output directories whose writer finished whole in this process (a later signal names them)
_DEFERRED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP back while a cleanup runs (delivered when it is done), so that a signal cannot cut
    the removal of a temporary or the lock in half."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    except (AttributeError, ValueError, OSError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

__all__ = ["OutputLock", "LOCK_FILE", "writing", "visible_entries", "command_line"]
