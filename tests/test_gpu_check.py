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


def test_checks_run_side_by_side_then_the_solver_alone_within_two_minutes(monkeypatch, capsys):
    """The orchestration of main() on a (pretended) GPU machine: kernels, device and host overlap, the solver bench
    runs after them, every result lands in its row, and the timeouts add up to the 2 minutes it is given."""
    import threading

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu_check

    assert max(gpu_check.TIMEOUTS[c] for c in gpu_check.PARALLEL) + sum(
        t for c, t in gpu_check.TIMEOUTS.items() if c not in gpu_check.PARALLEL) <= 120
    live, peak, order = set(), [0], []
    lock = threading.Lock()

    def fake(name, status):
        def run():
            import time

            with lock:
                live.add(name)
                peak[0] = max(peak[0], len(live))
                order.append(name)
            time.sleep(0.3)
            with lock:
                live.discard(name)
            return status, 0.3, f"{name} detail"
        return run

    monkeypatch.setattr(gpu_check, "check_kernels", fake("kernels", "PASS"))
    monkeypatch.setattr(gpu_check, "check_solver", fake("solver", "PASS"))
    monkeypatch.setattr(gpu_check, "check_grpo", lambda tier: fake(tier, "FAIL" if tier == "host" else "PASS")())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "pretend GPU")
    assert gpu_check.main([]) == 1  # host failed
    out = capsys.readouterr().out
    assert peak[0] == 3 and order[-1] == "solver", (peak, order)
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| check |")]
    assert [r.split(" | ")[1] for r in rows] == ["PASS", "PASS", "PASS", "FAIL"], rows
    assert "kernels detail" in rows[0] and "solver detail" in rows[1] and "host detail" in rows[3]
    assert "3 passed, 1 failed, 0 skipped" in out
