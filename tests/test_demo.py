"""Smoke test of the demo (``python -m relex_callback.examples.demo --quick``) in a child process, as `make demo` runs
it."""

import json
import os
import subprocess
import sys
from safetensors.torch import load_file



def test_demo_quick(tmp_path, subprocess_env):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "relex_callback.examples.demo", "--quick", "--out", str(out), "--threads", "1"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out acc" in r.stdout and "RELEX step-12" in r.stdout
    result = json.load(open(out / "demo.json"))
    names = [row["model"] for row in result["rows"]]
    assert names[-2:] == ["RELEX step-8", "RELEX step-12"] and any("tcut" in n for n in names)
    assert all(0.0 <= row["held_out"] <= 1.0 and 0.0 <= row["train"] <= 1.0 for row in result["rows"])
    # the window's drift share (relex_callback.core.noise) is printed and kept
    assert "drift share (line vs random walk" in r.stdout and 0.0 <= result["noise"]["drift_share"] <= 1.0
    for h in (8, 12):
        assert os.path.isfile(out / "relex" / f"step-{h}" / "model.safetensors")
    # the two horizons are distinct points on the extrapolated line, not copies of one checkpoint

    w8, w12 = (load_file(out / "relex" / f"step-{h}" / "model.safetensors") for h in (8, 12))
    assert w8.keys() == w12.keys()
    assert all(bool(w.isfinite().all()) for w in (*w8.values(), *w12.values()))
    assert any(not w8[k].equal(w12[k]) for k in w8)
    assert (out / "demo.png").is_file() or "no plot" in r.stdout
