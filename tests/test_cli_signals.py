"""SIGINT, SIGTERM and SIGHUP at every write boundary of the real `relex` command, just before the write and just
after it: nothing is left anywhere (no temporary inside or beside --out, no lock, no --out the run created, no output
of the interrupted run), the command exits 128 + the signal with one line and no traceback, and a plain rerun of the
same command writes the uninterrupted run's horizons byte for byte. A signal after the last output is whole says so
and leaves the complete outputs.

The boundaries are enumerated from the command itself (tests/cli_signal_child.py counts every call that changes the
file system under the directory holding --out); the command runs in a process forked from one that imported torch and
relex once, so that every signal x boundary x before/after case is a real process receiving a real signal."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "cli_signal_child.py")
SIGNALS = ("INT", "TERM", "HUP")
NEVER = 10 ** 9  # a boundary number no run reaches: the plain rerun


def _digest(root) -> dict:
    """relative path -> sha256 (files) or 'dir', everything under ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _weights(files: dict) -> dict:
    """The horizons' weight files of a digest (the state file, the report and the markers carry a run id or
    timings)."""
    return {k: v for k, v in files.items() if k.endswith("model.safetensors") and "/step-" in "/" + k}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sig")
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
    ref = root / "ref"
    r = subprocess.run([sys.executable, "-m", "relex_callback.offline.cli", "extrapolate", "--base", str(root / "base"),
                        "--checkpoints", str(root / "ckpts"), "--horizons", "20,40", "--out", str(ref),
                        "--no-progress", "--fit-clock", "steps"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


def _commands(root, watch):
    out = os.path.join(watch, "out")
    base, ckpts, ref = str(root / "base"), str(root / "ckpts"), str(root / "ref")
    # the checkpoints carry no learning-rate log: --fit-clock steps says so (else its warning is a second line)
    ex = ["extrapolate", "--base", base, "--checkpoints", ckpts, "--horizons", "20,40", "--out", out, "--no-progress",
          "--fit-clock", "steps"]
    return {
        "extrapolate": (ex, None),
        "extrapolate-buffered": (ex + ["--no-streaming", "--dtype", "float32"], None),
        "materialize": (["materialize", "--state", os.path.join(ref, "relex_state.safetensors"), "--base", base,
                         "--horizons", "60,80", "--out", out], None),
        # into a directory that exists and holds the extrapolation's outputs: they must stay as they were
        "materialize-existing": (["materialize", "--state", os.path.join(ref, "relex_state.safetensors"), "--base",
                                  base, "--horizons", "60,80", "--out", out], ref),
    }


def _serve(cases, work):
    cf, rf = os.path.join(work, "cases.json"), os.path.join(work, "results.json")
    with open(cf, "w") as f:
        json.dump(cases, f)
    r = subprocess.run([sys.executable, CHILD, "--serve", cf, rf], env=cli_env(), capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(rf) as f:
        return json.load(f)


def _count(root, work, name):
    watch = os.path.join(work, f"count-{name}")
    argv, existing = _commands(root, watch)[name]
    case = {"watch": watch, "n": 0, "when": "before", "sig": "TERM", "argv": argv, "copy": existing,
            "stderr": os.path.join(work, f"count-{name}.err")}
    (res,) = _serve([case], work)
    assert res["rc"] == 0, open(case["stderr"]).read()
    lines = [ln for ln in open(case["stderr"]).read().splitlines() if ln.startswith("BOUNDARY ")]
    assert lines, "no write boundary seen"
    return lines, res["files"]


def _check(name, cases, results, clean, reference):
    problems, complete = [], False
    for case, res in zip(cases, results):
        err = open(case["stderr"]).read()
        label = f"{name} {case['sig']} {case['when']} boundary {case['n']} ({case['op']})"
        if case["n"] == NEVER:  # the plain rerun after an interrupted run
            if complete:  # the interrupted run had finished: a rerun is refused as for any finished run
                continue
            if res["rc"] != 0:
                problems.append(f"{label}: the plain rerun failed ({res['rc']}): {err.strip()[-300:]}")
            elif _weights(res["files"]) != _weights(reference):
                problems.append(f"{label}: the rerun's horizons differ from the uninterrupted run's")
            continue
        signum, complete = getattr(signal, "SIG" + case["sig"]), False
        lines = err.strip().splitlines()
        if res["rc"] != 128 + signum:
            problems.append(f"{label}: exit {res['rc']}, expected {128 + signum}: {err.strip()[-400:]}")
            continue
        if len(lines) != 1 or "Traceback" in err or not lines[0].startswith(f"relex: interrupted by SIG{case['sig']}"):
            problems.append(f"{label}: stderr is not one line: {err.strip()[-400:]}")
            continue
        complete = "written whole" in lines[0]
        if complete:
            if set(res["files"]) != set(reference) or _weights(res["files"]) != _weights(reference):
                problems.append(f"{label}: said complete, but left {sorted(res['files'])}")
        elif res["files"] != clean:
            extra = sorted(set(res["files"]) ^ set(clean))
            changed = sorted(k for k in set(res["files"]) & set(clean) if res["files"][k] != clean[k])
            problems.append(f"{label}: left {extra} / changed {changed}: {lines[0]}")
    return problems


def _cases(root, work, name, lines, signals_of):
    cases = []
    for ln in lines:
        _, k, op, path = ln.split(" ", 3)
        for when in ("before", "after"):
            for sig in signals_of(int(k), when):
                watch = os.path.join(work, f"w-{name}")
                argv, existing = _commands(root, watch)[name]
                tag = f"{name}-{k}-{when}-{sig}"
                base = {"watch": watch, "argv": argv, "op": f"{op} {path}"}
                cases.append({**base, "n": int(k), "when": when, "sig": sig, "copy": existing,
                              "stderr": os.path.join(work, tag + ".err")})
                cases.append({**base, "n": NEVER, "when": when, "sig": sig, "copy": "keep",
                              "stderr": os.path.join(work, tag + ".rerun.err")})
    return cases


def _run(inputs, tmp_path, name, signals_of):
    work = str(tmp_path)
    lines, reference = _count(inputs, work, name)
    cases = _cases(inputs, work, name, lines, signals_of)
    results = _serve(cases, work)
    _, existing = _commands(inputs, os.path.join(work, "x"))[name]
    clean = {} if existing is None else {"out/" + k if k != "." else "out": v for k, v in _digest(existing).items()}
    if existing is not None:
        clean["out"] = "dir"
    problems = []
    # the rerun entries need the interrupted entry's verdict first: _check goes in order
    problems += _check(name, cases, results, clean, reference)
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:40])
    return len(lines)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["extrapolate", "extrapolate-buffered", "materialize", "materialize-existing"])
def test_each_boundary_once_cycling_the_signals(inputs, tmp_path, name):
    """Every write boundary, before and after it, one signal each (the three in turn)."""
    n = _run(inputs, tmp_path, name, lambda k, when: [SIGNALS[(k + (when == "after")) % 3]])
    assert n >= 10  # the boundaries were really enumerated (lock, state, horizons, report, cleanup)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["extrapolate", "materialize"])
def test_every_signal_at_every_boundary(inputs, tmp_path, name):
    """The full product: every signal x every boundary x before/after."""
    _run(inputs, tmp_path, name, lambda k, when: list(SIGNALS))


def test_ctrl_c_of_a_real_extrapolate_is_one_line_and_leaves_nothing(inputs, tmp_path):
    """A real `python -m relex_callback.offline.cli` (no test hooks) interrupted by SIGINT while it works: exit 130,
    one line, nothing left beside or inside --out; then a plain rerun succeeds."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "relex_callback.offline.cli", "extrapolate", "--base", str(inputs / "base"),
            "--checkpoints", str(inputs / "ckpts"), "--horizons", "20,40", "--out", str(out), "--no-progress",
            "--fit-clock", "steps"]
    p = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out / ".relex-lock.json"
    t0 = time.time()
    while not lock.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    if "written whole" in err:  # the signal came after the last output: they are all there
        assert p.returncode == 130 and sorted(os.listdir(out)) == ["relex_state.safetensors", "report.json",
                                                                   "step-20", "step-40"]
        return
    assert p.returncode == 130 and lines[0].startswith("relex: interrupted by SIGINT"), err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    r = subprocess.run(argv, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
