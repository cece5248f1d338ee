"""What a user sees: one end-of-window summary and every warning once, from the main process, in a 2-process
(DDP over gloo, torchrun) GRPO run; and the summary of a single-process run at the default log level."""

import os
import re

import pytest

from test_distributed import launch
from grpo import grpo_trainer
from relex_callback import RelexCallback


@pytest.mark.slow
def test_one_summary_and_no_duplicate_warning_in_a_two_process_run(tmp_path):
    p = launch("ddp", str(tmp_path / "run"))
    out = p.stdout + p.stderr
    assert out.count("relex: window done at step 6 (tcut)") == 1, out[-4000:]
    assert out.count("relex: next: `relex report") == 1
    relex_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("relex: ")]
    assert relex_lines, "the run printed no relex warning at all: the test would prove nothing"
    dup = sorted({ln for ln in relex_lines if relex_lines.count(ln) > 1})
    assert not dup, dup


def test_summary_at_the_default_log_level(tmp_path, capsys):
    cb = RelexCallback(tcut=4, horizons=[8, 12], dtype="float32")
    grpo_trainer(tmp_path, [cb]).train()
    out = capsys.readouterr().out
    assert out.count("relex: window done at step 4 (tcut): training stops here") == 1
    relex = os.path.join(str(tmp_path), "relex")
    assert f"relex: files in {relex}: step-8, step-12, relex_state.safetensors" in out
    assert re.search(r"relex: (backtest|drift share)", out)
    assert "relex: pick: not scored" in out and f"`relex report {relex}`" in out


def test_prompts_needed_arithmetic():
    """n = (2 sd / gain)^2 with sd = se_diff sqrt(P), the per-prompt spread of the difference measured on P prompts:
    at n prompts the 2-SE band equals the gain, one prompt fewer and it does not reach it."""
    import math

    from relex_callback.trainer.scoring import horizon_calls, prompts_needed

    assert prompts_needed(0.1, 0.02, 25) == 4  # sd = 0.1: (2 * 0.1 / 0.1)^2
    assert prompts_needed(-0.1, 0.02, 25) == 4  # a harm is called as a gain is
    n = prompts_needed(0.03, 0.011, 40)
    sd = 0.011 * math.sqrt(40)
    assert 2 * sd / math.sqrt(n) <= 0.03 < 2 * sd / math.sqrt(n - 1)
    assert prompts_needed(0.0, 0.02, 25) is None and prompts_needed(0.1, None, 25) is None
    assert prompts_needed(0.1, 0.02, None) is None
    scores = {"4": {"reward": 0.20, "reward_stderr": 0.03, "scored_prompts": 16.0, "scored_completions": 128.0},
              "8": {"reward": 0.50, "reward_stderr": 0.04, "scored_prompts": 16.0, "scored_completions": 128.0},
              "16": {"reward": 0.15, "reward_stderr": 0.04}, "32": {"loss": 1.0}}
    calls = horizon_calls(scores, 4, [8, 16, 32], "reward", "max", rollouts_per_step=64)
    assert set(calls) == {"8", "16"}  # 32 has no reward: nothing to call
    c8, c16 = calls["8"], calls["16"]
    assert c8["difference"] == pytest.approx(0.30) and c8["difference_stderr"] == pytest.approx(0.05)
    assert c8["call"] == "better" and c16["call"] == "within noise"  # -0.05 against a band of +-0.1
    # sd = 0.05 * 4 = 0.2: n = (0.4 / 0.3)^2 = 1.78 -> 2 prompts; 8 completions each, for 2 models: 32 = 0.5 steps
    assert c8["prompts_needed"] == 2 and c8["completions_needed"] == pytest.approx(32) and c8["rollouts_steps"] == 0.5
    assert c16["prompts_needed"] == 64 and c16["rollouts_steps"] == pytest.approx(2 * 64 * 8 / 64)
    lower = horizon_calls({"4": {"loss": 2.0, "loss_stderr": 0.1}, "8": {"loss": 1.0, "loss_stderr": 0.1}}, 4, [8],
                          "loss", "min")
    assert lower["8"]["difference"] == pytest.approx(1.0) and lower["8"]["call"] == "better"
    assert "completions_needed" not in lower["8"]  # no completions counted (not a GRPO evaluation)


def test_summary_says_per_horizon_call_and_its_cost(tmp_path, capsys):
    """A real tiny GRPO run scoring its horizons at tcut: the summary has one line per horizon with the difference
    against the tcut model, whether it is beyond its 2-SE band, the eval prompts a call needs and their cost in
    training steps' rollouts, all recomputed here from the scores in report.json."""
    import json
    import math

    from datasets import Dataset

    from relex_callback.examples.toy import arithmetic_problems

    cb = RelexCallback(tcut=4, horizons=[8, 12], dtype="float32", evaluate_horizons=True)
    trainer = grpo_trainer(tmp_path, [cb], per_device_eval_batch_size=4)
    trainer.eval_dataset = Dataset.from_list(arithmetic_problems(8, seed=2))
    trainer.train()
    out = capsys.readouterr().out
    with open(os.path.join(str(tmp_path), "relex", "report.json")) as f:
        rep = json.load(f)
    at_tcut = rep["horizon_eval"]["4"]
    prompts = len({p["prompt"] for p in arithmetic_problems(8, seed=2)})
    assert at_tcut["scored_prompts"] == prompts and at_tcut["scored_completions"] == 8 * 4  # num_generations 4
    assert "relex: pick: not scored" not in out
    for h in (8, 12):
        m, c = rep["horizon_eval"][str(h)], rep["horizon_calls"][str(h)]
        d = m["reward"] - at_tcut["reward"]
        se = math.sqrt(m["reward_stderr"] ** 2 + at_tcut["reward_stderr"] ** 2)
        assert c["difference"] == pytest.approx(d) and c["difference_stderr"] == pytest.approx(se)
        assert c["call"] == ("better" if d > 2 * se else "worse" if d < -2 * se else "within noise")
        line = next(ln for ln in out.splitlines() if ln.startswith(f"relex: step {h} vs tcut 4: "))
        where = {"better": "better, beyond", "worse": "worse, beyond", "within noise": "within"}[c["call"]]
        assert f": {where} its noise band (+-{2 * se:.4g})" in line, line
        if d == 0:
            assert c["prompts_needed"] is None
            continue
        n = math.ceil((2 * se * math.sqrt(prompts) / abs(d)) ** 2)
        assert c["prompts_needed"] == max(n, 1) and f"needs ~{c['prompts_needed']} eval prompt" in line
        rollouts = 2 * c["prompts_needed"] * 4 / 4  # 4 completions per prompt; 4 completions per training step
        shown = f"{rollouts:.2g}" if rollouts < 100 else f"{rollouts:.0f}"  # 350, not 3.5e+02
        assert c["rollouts_steps"] == pytest.approx(rollouts) and f"= {shown} training steps' rollouts" in line


def test_unscored_summary_names_the_check_and_its_prompts(tmp_path, capsys):
    cb = RelexCallback(tcut=4, horizons=[8], dtype="float32")
    grpo_trainer(tmp_path, [cb]).train()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("relex: pick: not scored"))
    assert "evaluate_horizons=True" in line and "28-100 eval prompts" in line and "docs/trust.md" in line
