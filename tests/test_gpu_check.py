"""`make gpu-check` (bench/gpu_check.py) on a machine without CUDA: it says so and exits 0; its GRPO check's
comparison with the CPU engine runs here on the CPU (the same code the GPU run uses, minus the device)."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: `make gpu-check` runs the real checks")
def test_no_gpu_says_so_and_exits_0(subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU visible" in r.stdout and "Skipped: kernels, solver, device, host" in r.stdout, r.stdout


def test_unknown_check_is_refused(subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT, "--only", "kernels,warp"], env=subprocess_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown check(s) ['warp']" in r.stderr


@pytest.mark.slow
def test_grpo_child_compares_with_the_cpu_engine(subprocess_env):
    pytest.importorskip("trl")
    env = dict(subprocess_env, RELEX_GPU_CHECK_ALLOW_CPU="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, SCRIPT, "--grpo", "host"], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("GPU-CHECK-RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(line[-1].split(" ", 1)[1])
    assert r.returncode == 0 and res["ok"], res
    assert "buffer host" in res["detail"] and "worst relative error" in res["detail"]
