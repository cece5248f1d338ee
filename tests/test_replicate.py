"""Smoke test of the replication script: the --quick setting (a few dozen GRPO steps) runs end to end and every
section of the report is there, with numbers in range."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("trl")


@pytest.mark.slow
def test_replicate_quick(tmp_path, subprocess_env):
    out = tmp_path / "rep"
    cmd = [sys.executable, os.path.join(REPO, "recipes", "replicate", "replicate.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    R = json.loads((out / "results.json").read_text())
    f1 = R["finding1"]
    assert 0 < f1["explained_min"] <= f1["explained_median"] <= 1
    assert len(f1["explained_per_tensor"]) > 10
    assert all(0 <= v["rank1"] <= 1 and 0 <= v["real"] <= 1 for v in f1["reconstruction"].values())
    assert R["finding2"] and all(-1 <= v["r2_whole_run"] <= 1 for v in R["finding2"].values())
    assert set(R["extrapolation"]) == {"4", "8", "12"}
    for e in R["extrapolation"].values():
        for r in e["rows"]:
            assert -1 <= r["cos"] <= 1 and r["norm_ratio"] > 0
    variants = [r["variant"] for r in R["ablations"]["rows"]]
    assert {"rank 1", "rank 5", "rank 1, bf16 buffer"} <= set(variants)
    assert any(v.startswith("naive") for v in variants)
    rows = {r["variant"]: r for r in R["ablations"]["rows"]}
    # the bf16 buffer changes the direction by rounding only
    assert rows["rank 1, bf16 buffer"]["cos"] == pytest.approx(rows["rank 1"]["cos"], abs=0.02)
    # the callback ran inside the real GRPOTrainer with stop_training=False and wrote its horizons
    assert R["logs"]["callback_report_summary"] is not None
    assert os.path.isdir(out / "run" / "relex" / "step-16")
    for name in ("finding1.png", "finding2.png", "extrapolation.png", "ablations.png", "results.md"):
        assert (out / name).stat().st_size > 1000
