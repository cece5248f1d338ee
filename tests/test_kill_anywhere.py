"""SIGKILL a training process at random moments of the window and of the end-of-window write (many seeds), then
recover as a user would (finish the horizons from the state file, else resume from the newest usable checkpoint,
else rerun) and check every final step-H equals the uninterrupted run's. RELEX_KILL_SEEDS sets the number of seeds
(default 6)."""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from relex_callback.offline.api import materialize

from helpers import compare_weights, load_recorded
import torch

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "fault_child.py")
COMMON = ["--tcut", "8", "--horizons", "20,40", "--save-steps", "2", "--max-shard-size", "20KB"]
HORIZONS = (20, 40)
TCUT = 8


def _tensors(d):
    out = {}
    for f in glob.glob(os.path.join(str(d), "*.safetensors")):
        out.update(load_file(f))
    return out


def _same(a_run, b_run, h):
    """The recovered run's step-h vs the uninterrupted run's: every step the recovered run recorded is bitwise the
    uninterrupted run's (a resume or a rerun replays the same float32 training), and each checkpoint is within its
    float32 solve's bound of the float64 reference of that trajectory (helpers.compare_weights; was rtol 1e-5).
    The recovered run's record may stop before tcut: a kill during the end-of-window write at tcut comes before the
    recorder's file of that step, and a materialize then reads the killed run's own window without training again.
    Returns the largest error / bound."""
    ref = load_recorded(str(a_run / "record"))
    mine = load_recorded(str(b_run / "record"))
    assert set(mine) <= set(ref) and 0 in mine, (b_run.name, sorted(mine))
    for t, snap in mine.items():
        for k in ref[t]:
            assert torch.equal(snap[k], ref[t][k]), (b_run.name, t, k)
    a, b = _tensors(a_run / "relex" / f"step-{h}"), _tensors(b_run / "relex" / f"step-{h}")
    return compare_weights(b, a, ref, h, list(range(1, TCUT + 1)), label=f"{b_run.name} step-{h}")[0]


def _child(out, *extra, env, timeline=None):
    cmd = [sys.executable, CHILD, str(out), *COMMON, "--record", str(out / "record"), *extra] + (
        ["--timeline", str(timeline)] if timeline else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _recover(run, env) -> str:
    """What a user does after the crash; returns which way it took."""
    relex = run / "relex"
    missing = [h for h in HORIZONS if not (relex / f"step-{h}").exists()]
    if not missing:
        return "complete"
    if (relex / "relex_state.safetensors").exists():
        materialize(str(relex / "relex_state.safetensors"), str(run / "base"), missing, max_shard_size="20KB")
        return "materialize"
    ckpts = sorted(glob.glob(str(run / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]), reverse=True)
    refused = []
    for ck in ckpts:
        p = _child(run, "--resume", ck, env=env)
        _, err = p.communicate(timeout=600)
        if p.returncode == 0:
            return f"resume {os.path.basename(ck)}" + (f" (refused: {refused})" if refused else "")
        refused.append(os.path.basename(ck))
        shutil.rmtree(ck)  # unusable (cut mid-save): the next older one
    for d in [relex] + glob.glob(str(run / "checkpoint-*")):
        shutil.rmtree(d, ignore_errors=True)
    p = _child(run, env=env)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return "rerun" + (f" (refused: {refused})" if refused else "")


def test_sigkill_at_random_moments_then_recover(tmp_path, subprocess_env):
    ref = tmp_path / "ref"
    timeline = tmp_path / "timeline"
    p = _child(ref, env=subprocess_env, timeline=timeline)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    marks = dict(line.split() for line in timeline.read_text().splitlines())
    duration = float(marks["end"]) - float(marks["begin"])  # the window and the end-of-window write
    rng = random.Random(0)
    ways = []
    for seed in range(int(os.environ.get("RELEX_KILL_SEEDS", "6"))):
        run = tmp_path / f"run{seed}"
        delay = rng.uniform(0.0, duration + 0.3)  # after this run's training began
        mine = tmp_path / f"timeline{seed}"
        proc = _child(run, env=subprocess_env, timeline=mine)
        while proc.poll() is None and not (mine.exists() and "begin" in mine.read_text()):
            time.sleep(0.02)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < delay:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for h in HORIZONS:  # nothing half-written under a final name
            d = run / "relex" / f"step-{h}"
            assert not d.exists() or (d / "config.json").exists() and glob.glob(str(d / "*.safetensors"))
        way = _recover(run, subprocess_env)
        worst = max(_same(ref, run, h) for h in HORIZONS)
        ways.append((seed, round(delay, 2), way, worst))
    print("\nseed, kill after (s), recovery, max error / bound:", *ways, sep="\n  ")
