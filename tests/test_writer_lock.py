"""One lock for every writer of an output directory: each pair of writers (the callback, `relex extrapolate`,
`relex materialize`), the first one held live in the middle of its writes, the second refused at once with the holder
named (its process, host and command) and nothing of its own written; a lock whose process is gone is taken over; and
what a finished directory holds (state file, report, horizons) is one run's, checked again when read back."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from relex_callback.errors import RelexInputError
from relex_callback.files.lock import LOCK_FILE

from helpers import cli_env, run_relex

HERE = os.path.dirname(os.path.abspath(__file__))
SIGNAL_CHILD = os.path.join(HERE, "cli_signal_child.py")
FAULT_CHILD = os.path.join(HERE, "fault_child.py")
WRITERS = ("callback", "extrapolate", "materialize")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    g = torch.Generator().manual_seed(0)
    t0 = {"a.weight": torch.randn(48, 24, generator=g), "b.bias": torch.randn(24, generator=g)}
    os.makedirs(root / "base")
    save_file(t0, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    v = {k: torch.randn(x.shape, generator=g) for k, x in t0.items()}
    for s in (2, 4, 6, 8):
        d = root / "ckpts" / f"checkpoint-{s}"
        os.makedirs(d)
        save_file({k: t0[k] + 0.01 * s * v[k] + 1e-4 * torch.randn(x.shape, generator=g) for k, x in t0.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
    r = run_relex("extrapolate", "--base", str(root / "base"), "--checkpoints", str(root / "ckpts"), "--horizons",
                  "20", "--out", str(root / "ref"), "--no-progress")
    assert r.returncode == 0, r.stderr
    return root


def _argv(writer, root, out):
    if writer == "extrapolate":
        return ["extrapolate", "--base", str(root / "base"), "--checkpoints", str(root / "ckpts"), "--horizons",
                "30,50", "--out", str(out), "--no-progress", "--overwrite"]
    return ["materialize", "--state", str(root / "ref" / "relex_state.safetensors"), "--base", str(root / "base"),
            "--horizons", "60", "--out", str(out)]


def _hold(writer, root, work):
    """Start ``writer`` on ``work/out`` and hold it live in the middle of its writes (after its lock, before its last
    output). Returns (process, out_dir, the words a refusal must name)."""
    if writer == "callback":
        run = work / "run"
        p = subprocess.Popen([sys.executable, FAULT_CHILD, str(run), "--tcut", "4", "--horizons", "20",
                              "--stall-write-horizon", "20"], env=cli_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        marker, out = run / "WRITING", run / "relex"
        words = ["RelexCallback", f"process {p.pid} on {socket.gethostname()}"]
    else:
        out = work / "out"
        argv = _argv(writer, root, out)
        counted = subprocess.run([sys.executable, SIGNAL_CHILD, str(work), "0", "before", "TERM", "--", *argv],
                                 env=cli_env(), capture_output=True, text=True, timeout=300)
        shutil.rmtree(out, ignore_errors=True)
        lines = [ln.split(" ", 3) for ln in counted.stderr.splitlines() if ln.startswith("BOUNDARY ")]
        k = next(int(n) for _, n, op, path in lines if path.endswith(LOCK_FILE) and op == "os.open") + 3
        p = subprocess.Popen([sys.executable, SIGNAL_CHILD, str(work), str(k), "before", "PAUSE", "--", *argv],
                             env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        marker = work.parent / f"PAUSED-{k}"
        words = [f"`relex {writer}`", f"process {p.pid} on {socket.gethostname()}", f"{argv[0]} --"]
    t0 = time.time()
    while not marker.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.time() - t0 < 300, "the holder never got to its writes"
        time.sleep(0.05)
    assert (out / LOCK_FILE).exists()
    return p, out, words


def _tree(d):
    return sorted(os.path.relpath(os.path.join(a, n), d) for a, ds, fs in os.walk(d) for n in ds + fs)


def _second(writer, root, out, tmp_path):
    """Run the second writer on ``out``; returns the refusal's message."""
    if writer == "callback":
        from relex_callback import RelexCallback
        from fault_child import build_trainer

        cb = RelexCallback(tcut=4, horizons=[20], dtype="float32", output_dir=str(out))
        trainer, _, _ = build_trainer(str(tmp_path / "second-run"), [cb], max_steps=8)
        with pytest.raises(RelexInputError) as e:
            trainer.train()
        assert trainer.state.global_step == 0  # refused at on_train_begin, before step 1
        return str(e.value)
    r = run_relex(*_argv(writer, root, out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("holder", WRITERS)
@pytest.mark.parametrize("second", WRITERS)
def test_every_writer_pair_refuses_the_second_naming_the_holder(inputs, tmp_path, holder, second):
    work = tmp_path / "w" / "hold"
    work.mkdir(parents=True)
    p, out, words = _hold(holder, inputs, work)
    try:
        before = _tree(out)
        t0 = time.time()
        msg = _second(second, inputs, out, tmp_path)
        took = time.time() - t0
        assert "is in use by" in msg and all(w in msg for w in words), (words, msg)
        assert _tree(out) == before, "the refused writer wrote into the holder's directory"
        assert took < 60, took
    finally:
        p.send_signal(signal.SIGKILL) if holder == "callback" else p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    if holder != "callback":  # the holder, interrupted, removed its own outputs and lock: the directory is free again
        assert not (out / LOCK_FILE).exists()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("writer", ["extrapolate", "materialize"])
def test_a_lock_of_a_dead_process_is_taken_over(inputs, tmp_path, writer):
    """A writer killed with SIGKILL leaves its lock; the next writer takes it over, writes, and releases it."""
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "x",
                                             "since": time.time(), "started": "1", "writer": "relex extrapolate",
                                             "command": "relex extrapolate --out x"}))
    r = run_relex(*_argv(writer, inputs, out))
    assert r.returncode == 0, r.stderr
    assert not (out / LOCK_FILE).exists()
    assert any(n.startswith("step-") for n in os.listdir(out))


def test_a_live_holder_is_refused_and_named(inputs, tmp_path):
    """Without pausing a writer: a lock naming a live process (this test's own parent shell) refuses extrapolate and
    materialize at once, naming the pid, and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from relex_callback.files.lock import _pid_started

        (out / LOCK_FILE).write_text(
            json.dumps(
                {
                    "pid": holder.pid,
                    "host": socket.gethostname(),
                    "token": "x",
                    "since": time.time(),
                    "started": _pid_started(holder.pid),
                    "writer": "relex materialize",
                    "command": "relex materialize --out y",
                }
            )
        )
        for writer in ("extrapolate", "materialize"):
            r = run_relex(*_argv(writer, inputs, out))
            assert r.returncode == 2, r.stderr
            assert (
                f"`relex materialize` in process {holder.pid}" in r.stderr and "relex materialize --out y" in r.stderr
            )
            assert sorted(os.listdir(out)) == [LOCK_FILE], os.listdir(out)
    finally:
        holder.kill()
        holder.wait()


def test_report_refuses_a_directory_mixing_two_runs(inputs, tmp_path):
    """Read back: `relex report` checks that report.json, the state file and the horizons beside it carry one run
    id; a state file of another run beside the report is refused naming both ids."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        r = run_relex("extrapolate", "--base", str(inputs / "base"), "--checkpoints", str(inputs / "ckpts"),
                      "--horizons", "20", "--out", str(d), "--no-progress")
        assert r.returncode == 0, r.stderr
    assert run_relex("report", str(a)).returncode == 0
    shutil.copy(b / "relex_state.safetensors", a / "relex_state.safetensors")
    r = run_relex("report", str(a))
    assert r.returncode == 2 and "another run" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    rid_a = json.loads((a / "report.json").read_text())["run_id"]
    assert rid_a in r.stderr, r.stderr
