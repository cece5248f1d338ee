"""Smoke test of the demo (``python -m relex_callback.examples.demo --quick``) in a child process, as `make demo` runs
it."""

import json
import logging
import os
import subprocess
import sys

import torch
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


def test_toy_pair_table(tmp_path, monkeypatch, capsys):
    """The demo's two toy runs (the paying task beside the harmful one), shortened: both tasks trained from one start,
    every horizon with the measured verdict, what the callback's scoring at tcut said and whether the two agree."""
    import argparse

    from relex_callback.examples import demo

    for k, v in dict(tcut=4, horizons=(8, 12), warmup=5, select=8, samples=4).items():
        monkeypatch.setitem(demo.TOY, k, v)
    from transformers.utils import logging as hf_logging

    args = argparse.Namespace(out=str(tmp_path), seed=0, threads=1, verbose=False)
    logger = logging.getLogger("relex_callback")
    before = (logger.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), torch.get_num_threads())
    result = demo.run_toy_pair(args)
    # the part quiets the logs while it runs, not after: a later run in the same process (a test, the real model's
    # part) must still see the package's warnings
    assert (logger.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
            torch.get_num_threads()) == before
    demo.print_toy_pair(result)
    out = capsys.readouterr().out
    assert [t["task"] for t in result["tasks"]] == ["char", "sums"]
    assert "ONE seed (0)" in out
    for t in result["tasks"]:
        assert [r["H"] for r in t["rows"]] == [8, 12]
        assert set(t["horizon_eval"]) == {"4", "8", "12"}
        for r in t["rows"]:
            assert r["measured_call"] in ("pays", "harms", "no clear effect") and r["band"] >= 0
            assert r["measured_call"] == ("pays" if r["gain"] > r["band"] else "harms" if r["gain"] < -r["band"]
                                          else "no clear effect")
            assert abs(r["gain"] - (r["relex"] - r["tcut"])) < 1e-9
            assert r["scored_call"] in ("pays", "harms", "no clear effect")
            assert r["right"] == (r["scored_call"] == r["measured_call"] if r["scored_call"] != "no clear effect"
                                  else None)
            assert f"{t['task']:<5} {r['H']:>4} {r['tcut']:>6.3f} {r['relex']:>6.3f} {r['real']:>6.3f}" in out
        # the callback's own end-of-window lines, one per horizon, are kept and printed
        assert [ln.split(" vs ")[0] for ln in t["summary_lines"]] == ["relex: step 8", "relex: step 12"]
        assert all("  " + ln in out for ln in t["summary_lines"])
        for h in (8, 12):
            assert os.path.isfile(os.path.join(str(tmp_path), "toy", t["task"], "relex", f"step-{h}",
                                               "model.safetensors"))
    assert json.load(open(tmp_path / "toy.json"))["tasks"][1]["task"] == "sums"
