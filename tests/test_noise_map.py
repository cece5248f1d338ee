"""Smoke test of the noise-map recipe: one tiny grid cell and one extrapolate-and-continue cell run end to
end through the real GRPOTrainer, and the report has the map, the ranking and the item-6 table, with numbers in
range and the doc block spliced."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "recipes", "replicate", "noise_map.py")
pytest.importorskip("trl")


@pytest.mark.slow
def test_noise_map_tiny(tmp_path, subprocess_env):
    out, doc = tmp_path / "nm", tmp_path / "doc.md"
    doc.write_text("head\n<!-- noise-map:begin -->\nold\n<!-- noise-map:end -->\ntail\n")
    common = ["--tcut", "4", "--rollouts", "16", "--lrs", "1e-4", "--seeds", "0", "--warmup", "20", "--out", str(out),
              "--cache", str(tmp_path / "grams"), "--doc", str(doc)]
    for extra in ([], ["--continue_cells", "16,1e-4"]):
        proc = subprocess.run([sys.executable, SCRIPT, *common, *extra], env=subprocess_env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    cell = json.loads((out / "cells" / "r16_lr0.0001_s0.json").read_text())
    assert [r["H"] for r in cell["rows"]] == [8, 20, 40]
    for r in cell["rows"]:
        assert 0 <= r["relex"] <= 1 and 0 <= r["tcut"] <= 1 and -1 <= r["cos"] <= 1 and r["norm_ratio"] > 0
    s = cell["signal"]
    assert 0 <= s["drift_share"] <= 1 and s["drift_share_se"] > 0 and s["recorded_steps"] == 4
    assert s["speed_ratio"] > 0 and cell["backtest"]["norm_ratio_global"] > 0
    R = json.loads((out / "noise_map.json").read_text())
    assert R["cells"] == 1 and "drift share@2x" in R["ranking"]
    arms = R["continue"]["16|0.0001"]["arms"]
    assert set(arms) == {"plain", "jump, Adam kept", "jump, Adam reset", "Adam reset only"}
    assert arms["plain"][0] == arms["Adam reset only"][0]  # identical until the reset at tcut (a deterministic run)
    assert arms["jump, Adam kept"][0] == arms["jump, Adam reset"][0] != arms["plain"][0]  # the jump happened
    text = doc.read_text()
    assert text.startswith("head\n<!-- noise-map:begin -->\n") and text.endswith("<!-- noise-map:end -->\ntail\n")
    assert "RELEX beat the `tcut` checkpoint in" in text and "Extrapolate-and-continue" in text
    assert (out / "noise_map.png").stat().st_size > 1000
