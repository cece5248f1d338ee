"""The device check (bench/gpu_check.py, bench/gpu_checks.py) proven as far as a CPU allows: its time plan fits 600 s
with every check in it, each part runs under its own timeout, the results JSON is written after every part, and each
check's own code runs here at CPU scale (the kernels in Triton's interpreter, the 2^31 boundary shrunk to 2^12)."""

import json
import os
import subprocess
import sys
import time
import threading

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_check  # noqa: E402
import gpu_checks  # noqa: E402
from relex_callback.core import kernels  # noqa: E402
from relex_callback.core.kernels import triton_ops  # noqa: E402
from relex_callback.trajectory import tiers  # noqa: E402

PARTS = ["env", "kernels", "fallback", "memory", "pinned", "gram-bandwidth", "snapshot", "preset"]


# ------------------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("bundle", [False, True])
def test_dry_run_plan_fits_600_s_and_names_every_check(bundle, subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run"] + (["--bundle"] if bundle else []), env=subprocess_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln[:7].strip().isdigit()]
    names = [w[2] for w in rows]
    for part in PARTS:
        assert part in names, (part, r.stdout)
    if bundle:
        assert {"stage-part1", "assemble", "install", "imports"} <= set(names)
    plan = gpu_check.make_plan(600, bundle)
    assert plan["sum"] <= 600 and plan["fits"]
    # the sum is the longest side-by-side chain plus everything that runs alone
    alone = sum(s["budget"] for s in plan["steps"] if not s["runs"].startswith("beside"))
    assert alone + plan["group"] == plan["sum"]
    assert f"sum {plan['sum']:.0f} s" in r.stdout
    assert plan["preset"] >= gpu_check.PRESET_MIN


def test_a_plan_over_600_s_exits_non_zero(subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--total", "700"], env=subprocess_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout
    r = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_run.sh"), "plan", "250"],
                       env=dict(subprocess_env, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "the preset's" in r.stdout  # fits 600 s, but leaves the preset too little


def test_unknown_check_is_refused(subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT, "--only", "kernels,warp"], env=subprocess_env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown check(s) ['warp']" in r.stderr


# ------------------------------------------------------------------------------------------------- the runner
def test_orchestration_timeouts_lines_and_json_after_every_part(tmp_path, monkeypatch, capsys):
    """main() on a pretended GPU machine: the bundle chain runs beside the correctness checks, the timed checks alone
    after them; a part past its budget is killed and reported; every part gives one line and the JSON holds every
    part (written after each one)."""
    live, peak, order, writes = set(), [0], [], []
    lock = threading.Lock()

    def fake_check(name, budget, env):
        with lock:
            live.add(name)
            peak[0] = max(peak[0], len(live))
            order.append(name)
        time.sleep(0.2)
        with lock:
            live.discard(name)
        if name == "env":
            return {"status": "PASS", "seconds": 0.2, "budget": budget, "figure": "pretend GPU", "data": {"cuda": True}}
        if name == "snapshot":  # a real child past a (shrunk) budget: killed, reported as a timeout
            rc, out, dt = gpu_check.run_cmd([sys.executable, "-c", "import time; print('started'); time.sleep(30)"],
                                            1.0, dict(os.environ))
            assert rc == 124 and dt < 10
            return {"status": "FAIL", "seconds": dt, "budget": budget, "figure": f"timed out: {out.strip()}"}
        return {"status": "PASS", "seconds": 0.2, "budget": budget, "figure": f"{name} figure"}

    def fake_bundle(name, budget, env, site):
        return fake_check(name, budget, env)

    real_write = gpu_check.Results.write

    def write(self):
        writes.append(sorted(self.data["parts"]))
        real_write(self)

    monkeypatch.setattr(gpu_check, "run_check", fake_check)
    monkeypatch.setattr(gpu_check, "run_bundle_step", fake_bundle)
    monkeypatch.setattr(gpu_check, "run_preset", lambda budget, env, rd, od: {
        "status": "PASS", "seconds": 0.1, "budget": budget, "figure": f"preset given {budget:.0f} s"})
    monkeypatch.setattr(gpu_check.Results, "write", write)
    path = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--bundle", "--json", str(path)]) == 1  # the snapshot timed out
    out = capsys.readouterr().out
    assert peak[0] == 3, peak  # the bundle chain and the two check chains side by side
    assert order.index("memory") > max(order.index(x) for x in ("imports", "kernels", "pinned", "fallback"))
    assert order[-2:] == ["gram-bandwidth", "snapshot"]
    lines = [ln for ln in out.splitlines() if ln.startswith("gpu-check: ") and ("PASS" in ln or "FAIL" in ln)]
    names = [ln.split()[1] for ln in lines]
    for part in PARTS + ["stage-part3", "assemble", "install", "imports"]:
        assert names.count(part) == 1, (part, names)
    assert any("snapshot" in ln and "FAIL" in ln and "timed out: started" in ln for ln in lines)
    data = json.loads(path.read_text())
    assert set(PARTS) <= set(data["parts"]) and data["summary"]["failed"] == ["snapshot"]
    assert len(writes) >= len(data["parts"]) and writes[1] == ["env"]  # one write per part, as it finishes
    assert data["plan"]["sum"] <= 600 and data["parts"]["preset"]["budget"] >= gpu_check.PRESET_MIN


def test_a_child_prints_one_result_line(subprocess_env):
    r = subprocess.run([sys.executable, SCRIPT, "--child", "env"], env=subprocess_env, capture_output=True, text=True,
                       timeout=120)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("GPU-CHECK-RESULT ")]
    assert r.returncode == 0 and len(line) == 1, r.stdout + r.stderr
    rec = json.loads(line[0].split(" ", 1)[1])
    assert rec["status"] == "PASS" and rec["data"]["cuda"] == torch.cuda.is_available() and rec["data"]["torch"]


# -------------------------------------------------------------------------------------- each check at CPU scale
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs the kernels in Triton's interpreter on CPU tensors")


def test_kernel_cases_cross_the_boundary():
    for small in (True, False):
        c = gpu_checks.kernel_cases(small)
        B = c["boundary"]
        g = c["gram"]
        assert (g["T"] - 1) * g["D"] < B < g["T"] * g["D"]
        assert any((g["T"] - 1) * g["D"] + o < B < (g["T"] - 1) * g["D"] + o + n for o, n in g["segs"])
        assert any(o < B < o + n for o, n in c["wide"]["segs"])  # column numbers past 2^31
        p = c["proj"]
        assert p["r"] == 3 and (p["r"] - 1) * p["D"] > B and p["D"] >= B // 2  # row k = 2 of the output past 2^31
        for case in (g, c["wide"], p):  # segments inside the arena, not overlapping
            segs = sorted(case["segs"])
            assert all(o >= 0 and o + n <= case["D"] for o, n in segs)
            assert all(a[0] + a[1] <= b[0] for a, b in zip(segs, segs[1:]))
    assert gpu_checks.kernel_cases(False)["gram"]["T"] == 75


@needs_interpreter
def test_kernels_check_at_cpu_scale_and_its_bounds_bite(monkeypatch):
    pytest.importorskip("triton")
    r = gpu_checks.check_kernels("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    assert r["data"]["project_float32"]["written"] == r["data"]["project_float32"]["owned"]
    # a kernel 1e-3 off, or one writing outside its segments, fails

    real = triton_ops.gram
    monkeypatch.setattr(triton_ops, "gram", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    assert gpu_checks.check_kernels("cpu", small=True)["status"] == "FAIL"
    monkeypatch.setattr(triton_ops, "gram", real)
    real_p = triton_ops.project

    def spill(M, offsets, numels, U, out, span=None):
        real_p(M, offsets, numels, U, out, span=span)
        out[:, 0] = 0.0
        return out

    monkeypatch.setattr(triton_ops, "project", spill)
    r = gpu_checks.check_kernels("cpu", small=True)
    assert r["status"] == "FAIL" and "wrote" in r["figure"]


@needs_interpreter
def test_fallback_check_at_cpu_scale():
    pytest.importorskip("triton")
    r = gpu_checks.check_fallback("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    assert r["data"]["bitwise"] and r["data"]["calls"] == {"gram": 2, "project": 1} and len(r["data"]["warnings"]) == 2

    assert not kernels.disabled() and triton_ops.gram.__name__ == "gram"  # left as found
    assert "RELEX_DISABLE_TRITON" not in os.environ


def test_memory_check_at_cpu_scale():
    r = gpu_checks.check_memory("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    assert r["data"]["steps"] == 3 and r["data"]["rows_recorded"] == 3 and r["data"]["plan"]["tier"] == "host"


def test_memory_verdict_with_an_h100s_figures():
    plan = {"gpu_claims": {"trainer at train begin": 3_640_000_000,
                           "trainer, added by its first step (gradients, optimizer states)": 12_300_000_000,
                           "headroom (25%)": 21_380_000_000, "theta_0 + scratch": 3_150_000_000,
                           "solve at tcut (directions, a horizon's float32 copy, Gram chunk)": 4_530_000_000},
            "tier": "device", "buffer_bytes": 40_140_000_000, "staging_bytes": 3_090_000_000, "rows": 13,
            "folded": True}
    total = 85_520_809_984
    planned = 3_640_000_000 + 12_300_000_000 + 3_150_000_000 + 40_140_000_000
    st, fig, d = gpu_checks.memory_verdict(planned + 3_000_000_000, plan, total)
    assert st == "PASS" and d["planned"] == planned and "13 rows folded" in fig
    assert gpu_checks.memory_verdict(planned + 22_000_000_000, plan, total)[0] == "FAIL"  # past the headroom
    host = dict(plan, tier="host")
    assert gpu_checks.memory_verdict(planned, host, total)[2]["buffer_on_device"] == 3_090_000_000


def test_pinned_check_registers_the_planned_bytes(monkeypatch):
    assert gpu_checks.check_pinned("cpu", small=True)["status"] == "SKIP"  # the real cudaHostRegister needs CUDA
    calls = {"register": [], "unregister": []}
    monkeypatch.setattr(tiers, "HOST_REGISTER", lambda p, n: calls["register"].append((p, n)) or 0)
    monkeypatch.setattr(tiers, "HOST_UNREGISTER", lambda p: calls["unregister"].append(p) or 0)
    r = gpu_checks.check_pinned("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    want = 3 * 1_000_003 * 2
    assert r["data"]["registered"] == [want] == [n for _, n in calls["register"]] and not r["data"]["power_of_two"]
    assert calls["unregister"] == [calls["register"][0][0]]
    monkeypatch.setattr(tiers, "HOST_REGISTER", lambda p, n: 2)  # refused: reported
    assert gpu_checks.check_pinned("cpu", small=True)["status"] == "FAIL"


@needs_interpreter
def test_gram_bandwidth_check_at_cpu_scale():
    pytest.importorskip("triton")
    r = gpu_checks.check_gram_bandwidth("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    d = r["data"]
    assert d["segments"] == 24 and d["gbps_sum"] > 0 and d["gbps_kernel"] >= 0 and "ratio" in r["figure"]
    sizes = gpu_checks.qwen_tensor_sizes(gpu_checks.QWEN_1P5B)
    assert sum(sizes) == 1_543_714_304  # Qwen2.5-1.5B with tied embeddings
    assert 75 * sum(gpu_checks.qwen_tensor_sizes(gpu_checks.QWEN_1P5B, layers=2)) * 2 < 16e9


def test_snapshot_check_at_cpu_scale():
    r = gpu_checks.check_snapshot("cpu", small=True)
    assert r["status"] == "PASS", r["figure"]
    assert r["data"]["row_exact"] and r["data"]["ms_snapshot"] > 0 and r["data"]["ms_copy_per_tensor"] > 0
