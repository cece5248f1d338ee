"""Reward trend (relex_callback.core.trend) against a direct least-squares computation, on synthetic histories and on
the
log history of a real tiny TRL GRPOTrainer run."""

import math
import random

import pytest
import torch
from grpo import grpo_trainer

from relex_callback.core.trend import default_metric, reward_trend


def _ols(points):
    """Slope and its standard error from numpy-free normal equations in float64 torch (an independent route)."""
    t = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    X = torch.stack([t, torch.ones_like(t)], 1)
    beta = torch.linalg.solve(X.T @ X, X.T @ y)
    res = y - X @ beta
    s2 = float(res @ res) / (len(points) - 2)
    cov = s2 * torch.linalg.inv(X.T @ X)
    return float(beta[0]), math.sqrt(float(cov[0, 0]))


def _history(values, key="reward", start=1):
    h = []
    for k, v in enumerate(values):
        h.append({"loss": 0.1, key: v, "epoch": 0.01 * k, "step": start + k})
    h.append({"train_runtime": 1.0, "step": start + len(values) - 1})  # the trainer's closing entry
    return h


def test_slope_and_stderr_match_least_squares():
    rng = random.Random(0)
    vals = [0.2 + 0.003 * t + rng.gauss(0, 0.05) for t in range(1, 61)]
    hist = _history(vals)
    out = reward_trend(hist, last=40)
    pts = [(t, v) for t, v in zip(range(1, 61), vals) if t <= 40]
    slope, se = _ols(pts)
    assert out["metric"] == "reward" and out["points"] == 40 and out["reason"] is None
    assert abs(out["slope"] - slope) < 1e-12 and abs(out["stderr"] - se) < 1e-12
    assert out["rising"] == (slope > 2 * se)
    assert (out["first_step"], out["last_step"]) == (1, 40)
    # the window bounds matter
    late = reward_trend(hist, first=21, last=40)
    assert late["points"] == 20 and abs(late["slope"] - _ols(pts[20:])[0]) < 1e-12


def test_rising_flat_and_falling():
    rng = random.Random(1)
    up = reward_trend(_history([0.1 + 0.01 * t + rng.gauss(0, 0.02) for t in range(30)]))
    flat = reward_trend(_history([0.5 + rng.gauss(0, 0.05) for _ in range(30)]))
    down = reward_trend(_history([0.9 - 0.01 * t + rng.gauss(0, 0.02) for t in range(30)]))
    assert up["rising"] is True and up["slope"] > 0
    assert flat["rising"] is False
    assert down["rising"] is False and down["slope"] < 0


def test_constant_and_exactly_linear():
    const = reward_trend(_history([0.25] * 10))
    assert const["slope"] == 0.0 and const["stderr"] == 0.0 and const["rising"] is False and const["reason"] is None
    lin = reward_trend(_history([0.1 + 0.02 * t for t in range(10)]))
    assert lin["stderr"] == 0.0 and lin["rising"] is True and abs(lin["slope"] - 0.02) < 1e-12


def test_nan_and_non_numeric_entries_are_skipped():
    vals = [0.1, float("nan"), 0.3, None, 0.5, float("inf"), 0.7, "n/a"]
    out = reward_trend(_history(vals))
    good = [(t, v) for t, v in zip(range(1, 9), vals) if isinstance(v, float) and math.isfinite(v)]
    assert out["points"] == len(good) == 4
    assert abs(out["slope"] - _ols(good)[0]) < 1e-12
    assert not math.isnan(out["stderr"])


def test_metric_absent_and_too_few_points():
    hist = [{"loss": 1.0, "step": t} for t in range(1, 6)]
    out = reward_trend(hist)
    assert out["metric"] is None and out["slope"] is None and out["rising"] is None and "no reward" in out["reason"]
    out = reward_trend(hist, metric="accuracy")
    assert out["metric"] == "accuracy" and out["slope"] is None and "not in the log history" in out["reason"]
    two = reward_trend(_history([0.1, 0.4]))
    assert two["points"] == 2 and abs(two["slope"] - 0.3) < 1e-12 and two["stderr"] is None and two["rising"] is None
    assert "at least 3" in two["reason"]
    one = reward_trend(_history([0.1, 0.4, 0.5]), last=1)
    assert one["points"] == 1 and one["slope"] is None and one["reason"]
    with pytest.raises(ValueError, match="first"):
        reward_trend(_history([0.1] * 5), first=4, last=2)


def test_default_metric():
    assert default_metric([{"loss": 1, "step": 1}, {"reward": 0.1, "reward_std": 0.2, "step": 1}]) == "reward"
    per_fn = [{"rewards/digit_reward/std": 0.1, "rewards/digit_reward/mean": 0.2}]
    assert default_metric(per_fn) == "rewards/digit_reward/mean"
    assert default_metric([{"loss": 1}, {"train/accuracy_reward": 0.1}]) == "train/accuracy_reward"
    assert default_metric([{"loss": 1.0}]) is None
    assert default_metric([]) is None
    # a named metric works for anything logged, rewards or not
    out = reward_trend(_history([3.0 - 0.1 * t for t in range(6)], key="loss_x"), metric="loss_x")
    assert out["metric"] == "loss_x" and out["slope"] < 0


@pytest.fixture(scope="module")
def grpo_history(tmp_path_factory):
    """``state.log_history`` of a real tiny GRPO run (local model and tokenizer, CPU, a few seconds)."""
    out = tmp_path_factory.mktemp("grpo_trend")
    trainer = grpo_trainer(out, max_steps=12)
    trainer.train()
    return trainer.state.log_history


@pytest.mark.slow
def test_real_grpo_log_history(grpo_history):
    assert default_metric(grpo_history) == "reward"
    out = reward_trend(grpo_history, last=10)
    pts = [(e["step"], e["reward"]) for e in grpo_history if "reward" in e and e["step"] <= 10]
    assert out["points"] == len(pts) == 10
    slope, se = _ols(pts)
    assert abs(out["slope"] - slope) < 1e-9 and abs(out["stderr"] - se) < 1e-9
    assert out["rising"] == (slope > 2 * se)
    # the per-function key TRL logs beside the mean gives the same series here (one reward function)
    per_fn = [k for k in grpo_history[0] if k.startswith("rewards/") and k.endswith("/mean")]
    assert per_fn, sorted(grpo_history[0])
    assert abs(reward_trend(grpo_history, per_fn[0], last=10)["slope"] - slope) < 1e-9
