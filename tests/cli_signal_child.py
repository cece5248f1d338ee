"""Child process for tests/test_cli_signals.py and tests/test_writer_lock.py: the real `relex` command, signalled (or
held) at its N-th write boundary.

    python tests/cli_signal_child.py WATCH N WHEN SIGNAL -- extrapolate --base ... --out ...
    python tests/cli_signal_child.py --serve CASES.json RESULTS.json     (many cases, one fork each)

A write boundary is a call that changes the file system under WATCH (the directory holding --out): os.open/open for
writing, os.makedirs/mkdir, os.replace/rename, os.link, os.remove/unlink/rmdir, shutil.rmtree and safetensors'
save_file. At boundary N (1-based) the process sends itself SIGNAL (INT, TERM, HUP) just BEFORE the call runs or just
AFTER it returned (WHEN: before / after); the command's own handler then runs as it would for a user's Ctrl-C or a
scheduler's SIGTERM. SIGNAL ``PAUSE`` instead touches WATCH/../PAUSED-<N> and sleeps (the parent holds a live writer at
that point; tests/test_writer_lock.py). N = 0 only counts: the boundaries are printed to stderr as ``BOUNDARY k op
path`` lines, so the parent can enumerate them (test code only; the package is not changed).
"""

import builtins
import os
import shutil
import signal
import sys
import time
import hashlib
import json


STATE = {"watch": None, "n": 0, "when": "before", "sig": "TERM", "k": 0, "fired": False}


def boundary(op, path, run, *a, **kw):
    st = STATE
    p = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
    if st["watch"] is None or st["fired"] or not p.startswith(st["watch"] + os.sep):
        return run(*a, **kw)
    st["k"] += 1
    k, n = st["k"], st["n"]
    if n == 0:
        print(f"BOUNDARY {k} {op} {os.path.relpath(p, st['watch'])}", file=sys.stderr, flush=True)
        return run(*a, **kw)
    if k != n:
        return run(*a, **kw)
    st["fired"] = True
    if st["sig"] == "PAUSE":
        open(os.path.join(os.path.dirname(st["watch"]), f"PAUSED-{n}"), "w").close()
        time.sleep(300)
        return run(*a, **kw)
    if st["when"] == "before":
        os.kill(os.getpid(), getattr(signal, "SIG" + st["sig"]))
        return run(*a, **kw)
    try:
        return run(*a, **kw)
    finally:  # also after a call that raised (os.makedirs' inner mkdir of a directory that exists)
        os.kill(os.getpid(), getattr(signal, "SIG" + st["sig"]))


def install():
    def wrap(mod, name, op, writes=lambda a, kw: True):
        real = getattr(mod, name)

        def wrapped(*a, **kw):
            if a and writes(a, kw):
                return boundary(op, a[0], real, *a, **kw)
            return real(*a, **kw)

        setattr(mod, name, wrapped)

    def open_writes(a, kw):
        mode = a[1] if len(a) > 1 else kw.get("mode", "r")
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def os_open_writes(a, kw):
        flags = a[1] if len(a) > 1 else kw.get("flags", 0)
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    wrap(builtins, "open", "open", open_writes)
    wrap(os, "open", "os.open", os_open_writes)
    for name in ("makedirs", "mkdir", "replace", "rename", "link", "remove", "unlink", "rmdir"):
        wrap(os, name, f"os.{name}")
    wrap(shutil, "rmtree", "rmtree")
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **kw):
        return boundary("save_file", filename, real_save, tensors, filename, *a, **kw)

    safetensors.torch.save_file = save_file  # before relex imports it by name


def run_case(watch, n, when, sig, argv) -> int:
    from relex_callback.offline.cli import main as relex_main

    STATE.update(watch=os.path.abspath(watch), n=int(n), when=when, sig=sig, k=0, fired=False)
    rc = relex_main(argv)
    if 0 < n < 10 ** 9 and not STATE["fired"]:
        print(f"NOT FIRED: {STATE['k']} boundaries", file=sys.stderr)
    return rc


def digest(root) -> dict:
    """relative path -> sha256 (files) or 'dir', everything under ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def serve(cases_file: str, results_file: str):
    """Run every case of ``cases_file`` (JSON list of {watch, n, when, sig, argv, stderr}) in a process forked from
    this one (torch and relex imported once: a case costs a fork, not an interpreter start); the case's stderr goes
    to its file; the exit codes into ``results_file``."""
    import relex_callback.offline.api  # noqa: F401  (imported before the forks)

    results = []
    for case in json.load(open(cases_file)):
        watch = case["watch"]
        if case.get("copy") != "keep":  # a fresh directory holding --out (and a copy of an existing --out)
            shutil.rmtree(watch, ignore_errors=True)
            os.makedirs(watch)
            if case.get("copy"):
                shutil.copytree(case["copy"], os.path.join(watch, "out"))
        pid = os.fork()
        if pid == 0:
            fd = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = open(os.devnull, "w")
            try:
                rc = run_case(case["watch"], case["n"], case["when"], case["sig"], case["argv"])
            except BaseException as e:  # a traceback the test must see
                import traceback

                traceback.print_exc()
                rc = 99 if not isinstance(e, SystemExit) else (e.code or 0)
            sys.stderr.flush()
            os._exit(rc)
        _, status = os.waitpid(pid, 0)
        results.append({"rc": os.waitstatus_to_exitcode(status), "files": digest(watch)})
    json.dump(results, open(results_file, "w"))


def main():
    install()
    if sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
        return 0
    watch, n, when, sig = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    return run_case(watch, n, when, sig, sys.argv[sys.argv.index("--") + 1:])


if __name__ == "__main__":
    sys.exit(main())
