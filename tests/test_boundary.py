"""The boundary recipe (paying vs harming tasks on the toy model): its exact per-prompt scorers agree with the
replication's expected reward and with a separate enumeration, and a tiny grid runs end to end through the real
GRPOTrainer with the tcut checkpoint scored as the real run at tcut, the band taken from the per-prompt spread, and
the analysis and doc block written."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes", "replicate")
SCRIPT = os.path.join(RECIPES, "boundary.py")
sys.path.insert(0, RECIPES)


def test_sums_scorer_is_the_expected_reward(tokenizer, tiny_model):
    import boundary
    from task import ExpectedReward, all_problems

    per_prompt = boundary.scorer("sums", tokenizer)(tiny_model)
    assert per_prompt.shape == (100,)
    assert float(per_prompt.mean()) == pytest.approx(ExpectedReward(tokenizer, all_problems(9))(tiny_model), rel=1e-5)
    graded = boundary.scorer("graded", tokenizer)(tiny_model)
    assert bool((graded >= per_prompt - 1e-7).all()) and bool((graded <= 1).all())  # partial credit only adds


@torch.no_grad()
def test_char_scorer_matches_enumeration(tokenizer, tiny_model):
    import boundary
    from task import encode

    problems = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "9+9=", "answer": "18"}]
    got = boundary.CharScore(tokenizer, problems)(tiny_model)
    eos, t = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(boundary.TARGET)
    for i, p in enumerate(problems):
        def dist(prefix):
            return torch.softmax(tiny_model(input_ids=torch.tensor([prefix])).logits[0, -1].double(), -1)

        prompt = encode(tokenizer, p["prompt"])
        total, d1 = 0.0, dist(prompt)
        for a in range(len(tokenizer)):
            if a == eos:
                continue
            total += float(d1[a]) * (a == t)
            d2 = dist(prompt + [a])
            for b in range(len(tokenizer)):
                if b == eos:
                    continue
                total += float(d1[a] * d2[b]) * ((b == t) + float(dist(prompt + [a, b])[t]))
        assert float(got[i]) == pytest.approx(total / 3, rel=1e-4)


def test_prompts_needed_and_verdict():
    import boundary_report as br

    row = {"gain": 0.1, "gain_sd": 0.5, "relex_per_prompt": [0.5] * 4}
    exact, sampled = br.prompts_needed(row, [0.5] * 4)
    assert exact == 100  # (2 * 0.5 / 0.1)^2
    assert sampled == 300  # 4 (0.5^2 + 0.25 + 0.25) / 0.1^2: plus p(1-p) of each checkpoint
    assert br.verdict(0.03, 0.01) == "pays" and br.verdict(-0.03, 0.01) == "harms" and br.verdict(0.01, 0.01) == "tie"


@pytest.mark.slow
def test_boundary_tiny(tmp_path, subprocess_env):
    pytest.importorskip("trl")
    out, doc = tmp_path / "b", tmp_path / "doc.md"
    doc.write_text("head\n<!-- boundary:begin -->\nold\n<!-- boundary:end -->\nmid\n"
                   "<!-- boundary-controls:begin -->\nold\n<!-- boundary-controls:end -->\ntail\n")
    args = ["--tasks", "char", "sums", "--lrs", "1e-3", "--seeds", "0", "--tcuts", "6", "--mults", "2", "3",
            "--steps", "12", "--warmup", "5", "--eval_every", "6", "--out", str(out), "--doc", str(doc),
            "--controls", "linear", "warmup", "sgd", "beta2_0.99", "--control_tasks", "sums", "--control_lrs", "1e-3",
            "--control_steps", "12", "--control_warmup", "3"]
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=subprocess_env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("char", "sums"):
        cell = json.loads((out / "cells" / f"{task}_lr0.001_s0.json").read_text())
        w = cell["tcuts"]["6"]
        assert [r["H"] for r in w["rows"]] == [12]  # 3x = 18 is past the run's 12 steps: not scored
        r = w["rows"][0]
        # the tcut checkpoint is the real run at tcut, and real training at H is the run's own curve
        assert r["tcut"] == pytest.approx(cell["curve"]["6"]) and r["real_H"] == pytest.approx(cell["curve"]["12"])
        tc = torch.tensor(w["tcut_per_prompt"], dtype=torch.float64)
        rx = torch.tensor(r["relex_per_prompt"], dtype=torch.float64)
        assert len(tc) == len(rx) == 100 and float(tc.mean()) == pytest.approx(r["tcut"], abs=1e-5)
        d = rx - tc  # the band is the paired spread over the prompts
        assert r["gain"] == pytest.approx(float(d.mean()), abs=1e-5)
        assert r["gain_se"] == pytest.approx(float(d.std() / 10), rel=1e-3, abs=1e-7)
        assert w["trend"]["points"] == 6 and 0 <= w["signal"]["drift_share"] <= 1
        assert w["backtest"]["norm_ratio_global"] > 0
    R = json.loads((out / "boundary.json").read_text())
    assert R["cells"] == 2 and {e["task"] for e in R["table"]} == {"char", "sums"}
    assert all(e["pays"] + e["ties"] + e["harms"] == e["seeds"] == 1 for e in R["table"])
    assert set(R["separation"]) >= {"drift share@2x", "backtest cosine@2x", "reward trend slope@2x"}
    text = doc.read_text()
    assert text.startswith("head\n<!-- boundary:begin -->\n")
    assert text.endswith("<!-- boundary-controls:end -->\ntail\n")
    assert "#### RELEX against the `tcut` checkpoint" in text and "eval prompts needed" in text
    assert "\n<!-- boundary:end -->\nmid\n<!-- boundary-controls:begin -->\n" in text and "under each control" in text

    # the optimizer controls: their own cache, the optimizer and schedule really changed, the schedules on the lr clock
    import boundary

    assert sorted(p.name for p in (out / "cells").iterdir()) == ["char_lr0.001_s0.json", "sums_lr0.001_s0.json"]
    ctl = {k: json.loads((out / "controls" / f"sums_{k}_lr0.001_s0.json").read_text())
           for k in ("linear", "warmup", "sgd", "beta2_0.99")}
    assert "control" not in cell  # the default grid's cells keep their format
    for k, c in ctl.items():
        info = c["control"]
        assert info["control"] == k and len(info["ran_lrs"]) == 12
        # the lr each step ran with (read from the optimizer) is the schedule the lr clock was built from
        assert info["ran_lrs"] == pytest.approx(info["schedule_lrs"], rel=1e-9, abs=1e-15)
        assert c["tcuts"]["6"]["rows"][0]["H"] == 12 and len(c["tcuts"]["6"]["rows"][0]["relex_per_prompt"]) == 100
    lin, wu = ctl["linear"]["control"]["ran_lrs"], ctl["warmup"]["control"]["ran_lrs"]
    assert lin[0] == pytest.approx(1e-3) and lin[-1] == pytest.approx(1e-3 / 12)
    assert all(a > b for a, b in zip(lin, lin[1:]))  # decays every step
    assert wu[0] == 0 and wu[:3] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3]) and wu[3:] == pytest.approx([1e-3] * 9)
    for k, lrs in (("linear", lin), ("warmup", wu)):
        w = ctl[k]["tcuts"]["6"]
        assert w["clock"] == "lr"
        # x(H) = tcut tau(H) / tau(tcut)
        assert w["horizons_on_clock"]["12"] == pytest.approx(6 * sum(lrs) / sum(lrs[:6]))
        assert w["horizons_on_clock"]["12"] != pytest.approx(12, abs=0.5)
        lr_row, step_row = w["rows"][0], w["rows_steps"][0]  # the same window on both clocks: different extrapolations
        assert lr_row["norm_ratio"] != pytest.approx(step_row["norm_ratio"], rel=1e-3)
    x_lin, x_wu = (ctl[k]["tcuts"]["6"]["horizons_on_clock"]["12"] for k in ("linear", "warmup"))
    assert x_lin < 12 < x_wu  # a decay places the horizon earlier on the clock, a warmup (inside the window) later
    sgd, b2 = ctl["sgd"]["control"], ctl["beta2_0.99"]["control"]
    assert sgd["optimizer"] == "SGD" and sgd["momentum"] == 0.9 and sgd["betas"] is None
    assert sgd["lr"] == pytest.approx(1e-3 * boundary.SGD_LR_PER_ADAM_LR) and set(sgd["ran_lrs"]) == {sgd["lr"]}
    assert b2["optimizer"] == "AdamW" and b2["betas"] == [0.9, 0.99] and set(b2["ran_lrs"]) == {1e-3}
    for k in ("sgd", "beta2_0.99"):  # a constant lr: the step clock, one fit
        assert ctl[k]["tcuts"]["6"]["clock"] == "steps" and "rows_steps" not in ctl[k]["tcuts"]["6"]
    C = json.loads((out / "controls.json").read_text())
    assert C["cells"] == 4
    assert {(e["control"], e["H"]) for e in C["table"]} == {(k, 12) for k in ("constant", *ctl)}
    assert all(e["pays"] + e["ties"] + e["harms"] == e["seeds"] == 1 for e in C["table"])
