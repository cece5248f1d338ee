"""The trust signals wired end to end: the in-window backtest and the fit family in report.json, the logs and the
state file; the reward trend and on_flat_reward; the CLI's --fit and its printed signals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from relex_callback import RelexCallback, RelexInputError
from relex_callback.offline.api import materialize
from relex_callback.files.state import load_state

from grpo import grpo_trainer
from test_callback import read_weights
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.offline.cli import main


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("power")
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    cb = RelexCallback(tcut=6, horizons=[12, 24], dtype="float32", fit="power")
    trainer = grpo_trainer(out, [cb], model=model, tok=tok)
    trainer.train()
    return {"out": out, "cb": cb, "trainer": trainer}


def test_report_and_logs_carry_the_backtest_and_the_fit(power_run):
    rep = json.load(open(power_run["out"] / "relex" / "report.json"))
    bt = rep["backtest"]
    assert bt["fit_steps"] == [1, 2, 3] and bt["predicted_step"] == 6 and bt["reason"] is None
    for k in ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine"):
        assert isinstance(bt[k], float), k
    assert -1 <= bt["cosine_global"] <= 1 and bt["norm_ratio_global"] > 0
    assert len(bt["tensors"]) == len(rep["tensors"])
    assert rep["fit"]["family"] == "power" and set(rep["fit"]["coefficient_vs_line"]) == {"12", "24"}
    assert all(t["fit"]["family"] == "power" and len(t["fit"]["params"][0]) == 3 for t in rep["tensors"])
    trend = rep["reward_trend"]
    assert trend["metric"] == "reward" and trend["points"] >= 3 and isinstance(trend["slope"], float)
    logged = {k: v for e in power_run["trainer"].state.log_history for k, v in e.items() if k.startswith("relex/")}
    assert abs(logged["relex/backtest/cosine_global"] - bt["cosine_global"]) < 1e-9
    assert abs(logged["relex/backtest/direction_drift"] - (1 - bt["direction_cosine"])) < 1e-9
    assert "relex/reward_trend/slope" in logged


def test_the_state_file_keeps_the_curve(power_run, tmp_path):
    """materialize writes what the callback wrote: the power curve survives the state file (a line would not)."""
    relex = power_run["out"] / "relex"
    st = load_state(str(relex))
    assert st.curve is not None and st.curve.family == "power"
    again = materialize(str(relex / "relex_state.safetensors"), str(power_run["out"] / "base"), [24],
                        out_dir=str(tmp_path))[0]
    a, b = read_weights(str(relex / "step-24")), read_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    line = st.slope * 24.0 + st.intercept
    assert not torch.allclose(st.coef_at(24), line)  # the curve is not the line


def test_flat_reward_error_writes_the_state_but_no_horizon(tmp_path):
    calls = [0]

    def falling(completions, **kw):  # falls with every call, varies within a group (advantages are not zero)
        calls[0] += 1
        return [1.0 - 0.05 * calls[0] + 0.1 * (i % 2) for i in range(len(completions))]

    tok = build_tokenizer()
    cb = RelexCallback(tcut=6, horizons=[12], dtype="float32", on_flat_reward="error")
    trainer = grpo_trainer(tmp_path, [cb], tok=tok, reward=falling)
    with pytest.raises(RelexInputError, match="did not rise"):
        trainer.train()
    relex = tmp_path / "relex"
    assert (relex / "relex_state.safetensors").exists() and not (relex / "step-12").exists()
    rep = json.load(open(relex / "report.json"))
    assert rep["reward_trend"]["rising"] is False and rep["reward_trend"]["slope"] < 0
    assert "did not rise" in rep["horizons_skipped"] and rep["checkpoints"] == []


def test_cli_fit_auto_prints_the_signals(power_run, tmp_path, capsys):
    """relex extrapolate over the callback's own trainer checkpoints is not possible here (save_strategy=no), so
    build checkpoints along a square-root path: --fit auto picks power and the printed lines say so."""
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
    for s in range(1, 11):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + s ** 0.5 * dirs[n])
        model.save_pretrained(tmp_path / "ckpts" / f"checkpoint-{s}")
    assert main(["extrapolate", "--base", str(tmp_path / "base"), "--checkpoints", str(tmp_path / "ckpts"),
                 "--horizons", "40", "--out", str(tmp_path / "out"), "--no-progress", "--dtype", "float32",
                 "--fit", "auto"]) == 0
    out = capsys.readouterr().out
    assert "backtest (line fitted on steps" in out and "fit: power" in out
    rep = json.load(open(tmp_path / "out" / "report.json"))
    assert rep["fit"]["selection"]["choice"] == "power"
    # the power curve's extrapolation to 40 recovers sqrt(40) * d (the line would give ~ 4.3 * d)
    w = load_file(str(tmp_path / "out" / "step-40" / "model.safetensors"))
    n = "model.layers.0.mlp.up_proj.weight"
    got = (w[n].double() - base[n].double()).norm() / dirs[n].double().norm()
    assert abs(float(got) - 40 ** 0.5) < 0.05 * 40 ** 0.5, float(got)
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "backtest (line fitted" in capsys.readouterr().out
    assert main(["extrapolate", "--base", str(tmp_path / "base"), "--checkpoints", str(tmp_path / "ckpts"),
                 "--horizons", "40", "--out", str(tmp_path / "o2"), "--fit", "cubic"]) == 2


@pytest.mark.parametrize("tcut", [3, 4, 5])
def test_fit_auto_on_windows_too_short_for_a_candidate_still_writes(tmp_path, tcut):
    """fit="auto" accepted at step 0 must never fail at tcut: with 3-5 recorded steps the backtest's first part holds
    1-2 steps, too few for power (3 parameters); it is dropped from the candidates (the report says why) or the line
    is kept, and the horizon is written."""
    cb = RelexCallback(tcut=tcut, horizons=[4 * tcut], fit="auto", dtype="float32")
    t = grpo_trainer(tmp_path, [cb])
    t.train()
    rep = json.load(open(tmp_path / "relex" / "report.json"))
    assert (tmp_path / "relex" / f"step-{4 * tcut}" / "model.safetensors").exists()
    sel = rep["fit"]["selection"]
    assert sel["choice"] in ("linear", "log")
    if "scores" in sel:  # the backtest ran: power could not be fitted on its first part
        assert sel["scores"]["power"] is None and "needs at least 3 fitted steps" in sel["skipped"]["power"]
    else:
        assert "kept the line" in sel["reason"]
