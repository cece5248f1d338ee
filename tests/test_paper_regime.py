"""recipes/replicate/paper_regime.py: the budget plan (arithmetic, the reduced regime, nothing fits), and the
cpu-smoke preset end to end as `make gpu-check` runs it on a machine without CUDA (bench/gpu_run.sh checks): a real
tiny GRPOTrainer with one validation-mode RelexCallback per fit family, results written as it goes, partial results
on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "recipes", "replicate", "paper_regime.py")
sys.path.insert(0, os.path.join(REPO, "recipes", "replicate"))

import paper_regime as pr  # noqa: E402

M = {"startup": 40.0, "per_eval": 2.0, "per_step": 3.0, "first_step": 9.0, "probe_steps": 3, "probe_seconds": 20.0,
     "ckpt_read": 0.5, "ckpt_write": 1.0, "trainer_init": 4.0}


def test_plan_takes_the_largest_tcut_that_fits_and_shows_its_arithmetic():
    p = pr.plan(pr.PRESETS["gpu"], budget=600.0, elapsed=70.0, m=M)
    c = p["chosen"]
    assert p["fits"] and p["regime"] == "paper"
    # 4 x tcut steps (with the callbacks' factor); 1 + 3 x (real + 3 families + naive) = 16 evals, each with a load;
    # 3 families x (3 horizons + 1) writes
    assert c["total"] == pytest.approx(4 * c["tcut"] * 3.0 * pr.STEP_FACTOR + 16 * 2.5 + 12 * 1.0 + 4.0)
    assert c["total"] <= p["available"] < pr.run_cost(c["tcut"] + 1, M, 3)["total"]
    assert p["available"] == pytest.approx(600 - 70 - (0.05 * 600 + 2 * 3.0))
    assert c["horizons"] == [2 * c["tcut"], 3 * c["tcut"], 4 * c["tcut"]] and c["steps"] == 4 * c["tcut"]
    lines = "\n".join(pr.plan_lines(p, pr.PRESETS["gpu"]))
    assert (f"chosen: tcut {c['tcut']}: {c['steps']} steps x 3.00 x {pr.STEP_FACTOR} (callbacks) = "
            f"{c['steps'] * 3.0 * pr.STEP_FACTOR:.1f}") in lines
    assert "16 evals x (2.00 + 0.50 load) = 40.0" in lines and "regime: paper" in lines


def test_plan_reduces_below_the_preset_range_and_says_so_or_refuses():
    p = pr.plan(pr.PRESETS["gpu"], budget=360.0, elapsed=70.0, m=M)  # 25 x 4 x 3 s alone is 300 s
    assert p["fits"] and p["regime"] == "reduced" and p["chosen"]["tcut"] < 25
    lines = "\n".join(pr.plan_lines(p, pr.PRESETS["gpu"]))
    assert "does not fit: tcut 50" in lines and "tcut 25..50 does not fit this budget" in lines
    p = pr.plan(pr.PRESETS["gpu"], budget=100.0, elapsed=70.0, m=M)
    assert not p["fits"] and p["chosen"] is None
    assert "nothing fits" in pr.plan_lines(p, pr.PRESETS["gpu"])[-1]


def test_noise_band_verdicts():
    assert pr.compare(0.50, 0.50, 512)["verdict"] == "within noise"
    c = pr.compare(0.40, 0.60, 512)
    assert c["verdict"] == "below real" and c["band"] == pytest.approx(1.96 * (2 * 0.24 / 512) ** 0.5, rel=0.02)
    assert pr.compare(1.0, 1.0, 30)["band"] > 0  # both at the edge: one problem's worth, not a zero band


def test_gpu_preset_without_cuda_refuses_in_one_line(subprocess_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the gpu preset would run")
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "gpu", "--out", str(tmp_path)], env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs CUDA" in r.stderr and "--preset cpu-smoke" in r.stderr, r.stderr


def _results(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_make_gpu_check_on_cpu_runs_the_checks_then_the_cpu_smoke_preset(subprocess_env, tmp_path):
    pytest.importorskip("trl")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: `make gpu-check` would run the gpu preset")
    out, back = tmp_path / "pr", tmp_path / "out"  # back: $OUT, the directory the caller collects
    back.mkdir()
    env = dict(subprocess_env, PYTHON=sys.executable, RESULTS_DIR=str(out), OUT=str(back), PRESET_BUDGET="90")
    r = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_run.sh"), "checks"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no CUDA GPU visible" in r.stdout  # gpu_check.py said so, ran the checks at CPU scale, then the preset
    # the budget arithmetic, printed
    assert "budget 90 s; spent before the run" in r.stdout and "s/step (32 rollouts" in r.stdout
    assert "chosen: tcut 6: 24 steps x" in r.stdout and "plan: tcut 6, horizons [12, 18, 24]" in r.stdout
    res = _results(out)
    assert res["status"] == "complete" and res["plan"]["regime"] == "paper" and res["preset"]["name"] == "cpu-smoke"
    assert res["plan"]["chosen"]["total"] <= res["plan"]["available"]
    assert res["elapsed_seconds"] <= 90
    assert set(res["comparisons"]) == {"12", "18", "24"}
    for h, rows in res["comparisons"].items():
        assert set(rows) == {"linear", "power", "log", "naive"}
        for name, c in rows.items():
            assert 0 <= c["acc"] <= 1 and c["band"] > 0 and c["verdict"] in ("within noise", "above real", "below real")
            assert c["real"] == res["accuracy"][f"real@{h}"]["acc"]
            assert c["acc"] == res["accuracy"][f"{'naive' if name == 'naive' else 'relex-' + name}@{h}"]["acc"]
        for fam in ("linear", "power", "log"):  # the callbacks' own weight comparison at the horizon
            assert -1 <= res["validation"][fam][h]["cosine_global"] <= 1
    assert len(res["reward"]) == 24
    md = (out / "results.md").read_text()
    assert "Status: **complete**" in md and "| 24 | " in md and "## Budget" in md
    assert not any(n.startswith("step-") for n in os.listdir(out / "relex-linear"))  # checkpoints cleaned up
    assert json.loads((back / "paper_regime" / "results.json").read_text()) == res  # only the results come back
    assert sorted(os.listdir(back / "paper_regime")) == ["results.json", "results.md"]
    summary = json.loads((back / "gpu_check.json").read_text())["summary"]
    assert summary["cuda"] is False and not summary["failed"] and "preset" in summary["passed"]


@pytest.mark.slow
def test_sigterm_leaves_partial_results(subprocess_env, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "pr"
    # tcut 30: 120 steps, long enough to be interrupted while training
    p = subprocess.Popen([sys.executable, SCRIPT, "--preset", "cpu-smoke", "--tcut-range", "30,30",
                          "--budget-seconds", "600", "--out", str(out)], env=subprocess_env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 300:
            if (out / "results.json").exists() and _results(out)["status"] == "running":
                break
            assert p.poll() is None, p.stdout.read()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 143, p.stdout.read()[-3000:]
    res = _results(out)
    assert res["status"] == "terminated by signal 15: partial"
    assert res["plan"]["chosen"]["tcut"] == 30 and "base" in res["accuracy"]
    assert "terminated by signal 15" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_budget_smaller_than_the_start_up_runs_nothing_and_says_so(subprocess_env, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "pr"
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "cpu-smoke", "--budget-seconds", "3", "--out", str(out)],
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "nothing fits" in r.stderr and "raise --budget-seconds" in r.stderr, r.stderr
    res = _results(out)
    assert res["status"].startswith("budget too small") and res["comparisons"] == {}


@pytest.mark.slow
def test_a_window_that_does_not_move_fails_with_the_reason_in_the_results(subprocess_env, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "pr"
    # lr 1e-30: Adam's updates vanish below float32's resolution of the weights, so no step of the window moves
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "cpu-smoke", "--lr", "1e-30", "--budget-seconds", "120",
                        "--out", str(out)], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    res = _results(out)
    assert res["status"].startswith("failed: RelexInputError") and "did not move" in res["status"], res["status"]
    assert "base" in res["accuracy"] and res["plan"]["fits"]  # what was measured before the failure is kept
    assert "paper_regime: failed: RelexInputError" in r.stderr


def test_bad_lr_is_refused_before_any_work(subprocess_env, tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "cpu-smoke", "--lr", "0", "--out", str(tmp_path / "x")],
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--lr 0 must be positive" in r.stderr and not (tmp_path / "x").exists()
