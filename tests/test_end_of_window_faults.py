"""Faults at the end of a window that are not the user's input: a Triton kernel that cannot compile or launch, a CUDA
error, an out-of-memory inside the solve, a bug. None of them may lose the window.

* A kernel that fails at the probe when the window opens, or later inside the solve, is replaced by its torch
  reference with one warning; the run finishes and writes the bytes a run on the references writes.
* Any other exception at ``tcut`` keeps the recorded window in ``partial_trajectory/`` and raises one
  :class:`RelexEndOfWindowError` naming the command that finishes the job; that command, run as printed, writes the
  bytes an unharmed run writes.

Real Trainer runs on the tiny local model (``tests/fault_child.build_trainer``); the kernels run under Triton's
interpreter on CPU tensors (``RELEX_FORCE_TRITON=1``), the faults are injected by replacing one function.
"""

import logging
import os
import re
import shlex
import sys
import json

import pytest
import torch
from safetensors.torch import load_file

from relex_callback import RelexCallback, RelexEndOfWindowError
from relex_callback.core import kernels
from relex_callback.core.clock import Clock
from relex_callback.core.kernels import reference, triton_ops
from relex_callback.offline.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fault_child import build_trainer  # noqa: E402

pytest.importorskip("triton")
TCUT, H = 6, 18


@pytest.fixture(autouse=True)
def _fresh_kernels():
    kernels.reset()
    yield
    kernels.reset()


def _run(out, monkeypatch=None, caplog=None, scheduler="constant"):
    cb = RelexCallback(tcut=TCUT, horizons=[H], dtype="float32")
    trainer, model, tok = build_trainer(str(out), [cb], max_steps=30, scheduler=scheduler)
    model.save_pretrained(str(out / "base"))
    tok.save_pretrained(str(out / "base"))
    trainer.train()
    return trainer


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:3]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The run on the torch references (what a run whose kernels were all replaced must write)."""
    out = tmp_path_factory.mktemp("ref")
    mp = pytest.MonkeyPatch()
    mp.setenv("RELEX_DISABLE_TRITON", "1")
    try:
        kernels.reset()
        _run(out)
    finally:
        mp.undo()
    return _weights(out / "relex" / f"step-{H}")


def _sabotage(monkeypatch, op, after_calls, error):
    """``triton_ops.<op>`` raises ``error`` from its ``after_calls``-th call on (0: at the probe)."""
    real = getattr(triton_ops, op)
    calls = {"n": 0}

    def broken(*a, **k):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(triton_ops, op, broken)
    return calls


FAILURES = {
    "compile": lambda: RuntimeError("CompilationError: at 12:4: failed to build the launcher (Python.h: No such file)"),
    "cuda": lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "readonly_cache": lambda: PermissionError(13, "Permission denied", "/root/.triton/cache"),
}


@pytest.mark.parametrize("when", ["probe", "solve"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failing_kernel_is_replaced_by_its_reference(tmp_path, monkeypatch, caplog, reference_run, when, failure):
    monkeypatch.setenv("RELEX_FORCE_TRITON", "1")
    # at the probe: both kernels fail from their first call; in the solve: each passes the probe, then fails
    after = 0 if when == "probe" else 1
    calls = {op: _sabotage(monkeypatch, op, after, FAILURES[failure]()) for op in ("gram", "project")}
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        _run(tmp_path)
    warned = [r.getMessage() for r in caplog.records if "Triton" in r.getMessage()]
    assert len(warned) == 2, warned  # one per kernel, once
    assert all(("probe at window open" in w) == (when == "probe") for w in warned), warned
    assert set(kernels.disabled()) == {("cpu", "gram"), ("cpu", "project")}
    assert all(c["n"] == after + 1 for c in calls.values()), calls  # never called again once replaced
    _same(_weights(tmp_path / "relex" / f"step-{H}"), reference_run)

    rep = json.load(open(tmp_path / "relex" / "report.json"))
    assert set(rep["kernels_replaced"]) == {"cpu gram", "cpu project"}


def test_a_kernel_that_answers_wrong_at_the_probe_is_replaced(tmp_path, monkeypatch, caplog, reference_run):
    monkeypatch.setenv("RELEX_FORCE_TRITON", "1")
    real = triton_ops.gram
    monkeypatch.setattr(triton_ops, "gram", lambda *a, **k: real(*a, **k) * 1.01)
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        _run(tmp_path)
    assert list(kernels.disabled()) == [("cpu", "gram")]
    assert "differs from its reference" in kernels.disabled()[("cpu", "gram")]


def _break_solve(monkeypatch, error):
    """Both the kernel and the reference of the Gram fail (a sticky CUDA error, an OOM, a bug in the solve)."""
    def broken(*a, **k):
        raise error

    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    monkeypatch.setattr(reference, "gram_reference", broken)


@pytest.mark.parametrize("failure", ["cuda", "oom", "bug"])
def test_any_error_at_tcut_keeps_the_window_and_names_the_command(tmp_path, monkeypatch, reference_run, failure):
    error = FAILURES[failure]() if failure in FAILURES else KeyError("planted bug")
    _break_solve(monkeypatch, error)
    with pytest.raises(RelexEndOfWindowError) as info:
        _run(tmp_path)
    msg = str(info.value)
    assert info.value.__cause__ is error
    assert type(error).__name__ in msg and "Nothing was extrapolated" in msg
    relex = tmp_path / "relex"
    assert not (relex / f"step-{H}").exists() and not (relex / "relex_state.safetensors").exists()
    assert (relex / "partial_trajectory").is_dir()
    monkeypatch.undo()
    kernels.reset()
    # the command the message names, run as printed (with a real base and an --out), writes what an unharmed run wrote
    cmd = re.search(r"`(relex extrapolate [^`]+)`", msg).group(1)
    base = re.search(r"--base (.+?) --horizons", cmd).group(1)
    assert base == "<the checkpoint training started from>"  # the toy model has no path of its own
    argv = shlex.split(cmd.replace(base, shlex.quote(str(tmp_path / "base"))))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "finished")

    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    assert main(argv + ["--no-progress"]) == 0
    _same(_weights(tmp_path / "finished" / f"step-{H}"), reference_run)


def test_a_later_train_call_can_run_after_a_kept_window(tmp_path, monkeypatch):
    """The failed window released its output directory: the next window in the same directory is not refused by a
    stale lock of the failed one (its partial trajectory stays where it was)."""
    _break_solve(monkeypatch, RuntimeError("CUDA error: unspecified launch failure"))
    with pytest.raises(RelexEndOfWindowError):
        _run(tmp_path / "a")
    monkeypatch.undo()
    kernels.reset()
    cb = RelexCallback(
        tcut=TCUT, horizons=[H], dtype="float32", output_dir=str(tmp_path / "a" / "relex"), overwrite=True
    )
    trainer, _, _ = build_trainer(str(tmp_path / "b"), [cb], max_steps=30)
    trainer.train()
    assert (tmp_path / "a" / "relex" / f"step-{H}" / "model.safetensors").exists()


def test_a_kept_window_of_a_scheduled_run_finishes_on_its_lr_clock(tmp_path, monkeypatch):
    """Under the default linear decay the callback fits on the lr clock; the window kept after a failure carries the
    learning rates it read ahead, so the printed command writes the callback's bytes (on the step clock it would
    not: the horizon lands 1.3-2.7x farther)."""
    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    kernels.reset()
    _run(tmp_path / "ok", scheduler="linear")
    report = json.loads((tmp_path / "ok" / "relex" / "report.json").read_text())
    assert (report.get("clock") or {}).get("kind") == "lr", report.get("clock")
    want = _weights(tmp_path / "ok" / "relex" / f"step-{H}")
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    _break_solve(monkeypatch, error)
    with pytest.raises(RelexEndOfWindowError) as info:
        _run(tmp_path / "bad", scheduler="linear")
    monkeypatch.undo()
    kernels.reset()
    cmd = re.search(r"`(relex extrapolate [^`]+)`", str(info.value)).group(1)
    base = re.search(r"--base (.+?) --horizons", cmd).group(1)
    argv = shlex.split(cmd.replace(base, shlex.quote(str(tmp_path / "bad" / "base"))))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "finished")

    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    assert main(argv + ["--no-progress"]) == 0
    got = json.loads((tmp_path / "finished" / "report.json").read_text())
    assert (got.get("clock") or {}).get("kind") == "lr", got.get("clock")
    _same(_weights(tmp_path / "finished" / f"step-{H}"), want)


def test_every_saved_form_of_a_scheduled_window_carries_its_lr_clock(tmp_path, monkeypatch):
    """A window can be finished offline from its partial_trajectory/ (above) or from any checkpoint's
    relex_trajectory/: each carries the learning rates the callback read ahead, so `relex extrapolate --trajectory`
    fits on the callback's lr clock from either (without them it fell back to the step, with a warning)."""
    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    kernels.reset()
    cb = RelexCallback(tcut=TCUT, horizons=[H], dtype="float32")
    trainer, model, tok = build_trainer(str(tmp_path), [cb], max_steps=30, save_steps=3, scheduler="linear")
    model.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    trainer.train()
    want = json.loads((tmp_path / "relex" / "report.json").read_text())["clock"]
    saved = tmp_path / "checkpoint-3" / "relex_trajectory"
    meta = json.loads((saved / "trajectory.json").read_text())
    lrs = meta["window"]["learning_rates"]
    assert len(lrs) >= H and Clock(tuple(lrs), TCUT, want["source"]).summary([H]) == want  # the callback's clock

    out = tmp_path / "from-checkpoint"
    assert main(["extrapolate", "--trajectory", str(saved), "--base", str(tmp_path / "base"), "--horizons", str(H),
                 "--out", str(out), "--no-progress"]) == 0
    got = json.loads((out / "report.json").read_text())["clock"]
    assert got["kind"] == "lr" and got["source"] == want["source"], got
