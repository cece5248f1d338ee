"""The lr clock (relex_callback.core.clock): the learning rates read ahead from every schedule transformers'
get_scheduler builds, against hand-computed values; tau, the normalised clock and the horizons on it; the fallbacks;
and end to end: a constant rate gives the step clock's bytes, a decaying one is recorded in the state file and
report.json, and `relex materialize` / `relex extrapolate` write the callback's bytes from it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import logging

import pytest
import torch
from transformers import get_scheduler

from relex_callback.core.clock import Clock, lrs_from_log, resolve, schedule_lrs
from relex_callback import RelexCallback
from relex_callback.core.solver import SolveOptions, solve
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.files.state import load_state
from relex_callback.params import TensorSpec
from grpo import grpo_trainer

W, N, BASE = 2, 10, 0.5  # warmup steps, max_steps, base learning rate


def _sched(name, **kw):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    return get_scheduler(name, opt, num_warmup_steps=W, num_training_steps=N, scheduler_specific_kwargs=kw or None)


def _warm(k):
    return k / W


# lr of optimizer step s = BASE * f(k), k = s - 1 (the scheduler starts at 0 and steps after each optimizer step)
HAND = {
    "constant": (dict(), lambda k: 1.0),
    "constant_with_warmup": (dict(), lambda k: _warm(k) if k < W else 1.0),
    "linear": (dict(), lambda k: _warm(k) if k < W else max(0.0, (N - k) / (N - W))),
    "cosine": (dict(), lambda k: _warm(k) if k < W else 0.5 * (1 + math.cos(math.pi * (k - W) / (N - W)))),
    "cosine_with_restarts": (dict(num_cycles=2), lambda k: _warm(k) if k < W else
                             0.5 * (1 + math.cos(math.pi * ((2 * (k - W) / (N - W)) % 1.0)))),
    "polynomial": (dict(power=2.0, lr_end=0.05), lambda k: _warm(k) if k < W else
                   ((BASE - 0.05) * (1 - (k - W) / (N - W)) ** 2 + 0.05) / BASE),
    "inverse_sqrt": (dict(), lambda k: _warm(k) if k < W else 1 / math.sqrt((k + 0) / W)),
    "warmup_stable_decay": (dict(num_decay_steps=4), lambda k: _warm(k) if k < W else 1.0 if k < W + 4 else
                            0.5 * (1 + math.cos(math.pi * (k - W - 4) / 4)) if k < N else 0.0),
    "cosine_with_min_lr": (dict(min_lr_rate=0.1), lambda k: _warm(k) if k < W else
                           0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - W) / (N - W)))),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_every_scheduler_against_hand_computed_rates_tau_and_horizons(name):
    kw, f = HAND[name]
    sched = _sched(name, **kw)
    lrs, why = schedule_lrs(sched, 16, max_steps=N)
    assert why is None
    hand = [BASE * f(s - 1) for s in range(1, N + 1)]  # only up to the schedule's end
    assert len(lrs) == N
    assert lrs == pytest.approx(hand, rel=1e-12, abs=1e-15)
    assert sched.last_epoch == 0 and sched.get_last_lr()[0] == pytest.approx(BASE * f(0))  # never stepped
    tcut = 4
    c = Clock(tuple(lrs), tcut, "test")
    tau = [sum(hand[:t]) for t in range(N + 1)]
    for t in range(N + 1):
        assert c.tau(t) == pytest.approx(tau[t], rel=1e-12, abs=1e-15)
    assert c.at(tcut) == pytest.approx(tcut)
    mean = tau[tcut] / tcut
    for h in (6, 8, 10):  # horizons inside the schedule: tcut * tau(H) / tau(tcut)
        assert c.at(h) == pytest.approx(tcut * tau[h] / tau[tcut], rel=1e-12)
    for h in (12, 16):  # beyond max_steps: one step counts as the window's mean rate
        assert c.at(h) == pytest.approx(tcut * (tau[N] + (h - N) * mean) / tau[tcut], rel=1e-12)
    clock, why = resolve(lrs, tcut, [8, 16], "test")
    if name == "constant":
        assert clock is None and "constant" in why
    else:
        assert clock is not None and clock.lrs == tuple(lrs)


def test_constant_rate_is_the_step_clock_and_fallbacks():
    assert resolve([1e-3] * 12, 4, [8, 12])[0] is None  # x(t) = t: the step path, the same bytes
    assert resolve([1e-3] * 4 + [5e-4] * 8, 4, [8])[0] is not None
    # constant over the window and horizons, decaying later (warmup-stable-decay's plateau): the step path too
    assert resolve([1e-3] * 10 + [1e-4] * 10, 4, [8])[0] is None
    assert resolve(None, 4, [8])[0] is None
    assert resolve([1e-3, 1e-3], 4, [8])[0] is None  # fewer rates than tcut
    assert resolve([0.0] * 4 + [1.0] * 4, 4, [8])[0] is None  # no movement in the window
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    lrs, why = schedule_lrs(plateau, 8)
    assert lrs is None and "ReduceLROnPlateau" in why
    lrs, why = schedule_lrs(None, 8)
    assert lrs is None and "no learning-rate scheduler" in why


def test_clock_json_round_trip_and_log_history():
    c = Clock((0.0, 0.5, 1.0, 0.75, 0.5, 0.25), 4, "x")
    d = Clock.from_json(json.loads(json.dumps(c.to_json())))
    assert d == c and [d.at(h) for h in (1, 4, 6, 9)] == [c.at(h) for h in (1, 4, 6, 9)]
    assert Clock.from_json(None) is None and Clock.from_json({"kind": "steps"}) is None
    hist = [{"step": 1, "learning_rate": 1.0, "loss": 0.1}, {"step": 3, "learning_rate": 0.5}, {"step": 4, "loss": 2},
            {"step": 5, "learning_rate": 0.25}]
    assert lrs_from_log(hist, 10) == [1.0, 0.75, 0.5, 0.375, 0.25]
    assert lrs_from_log(hist, 3) == [1.0, 0.75, 0.5]
    assert lrs_from_log([{"step": 2, "loss": 1}], 5) is None


def test_solver_fits_on_the_clock_and_places_horizons_on_it():
    """An exactly linear-in-tau trajectory is extrapolated exactly by the lr clock (and not by the step clock)."""
    torch.manual_seed(0)
    lrs = [1.0 - 0.05 * k for k in range(20)]
    c = Clock(tuple(lrs), 8, "t")
    v = torch.randn(50, dtype=torch.float64)
    steps = list(range(1, 9))
    M = torch.stack([c.tau(t) * v for t in steps]).float()
    specs = [TensorSpec("w", (50,), torch.float32, 50, 0, 0)]
    sol = solve(M, steps, specs, SolveOptions(method="gram", clock=c))
    pred = float(sol.coef_at(16)[0, 0]) * sol.V[0].double()
    want = c.tau(16) * v
    assert torch.allclose(pred, want, rtol=1e-4, atol=1e-5)
    plain = solve(M, steps, specs, SolveOptions(method="gram"))
    assert not torch.allclose(float(plain.coef_at(16)[0, 0]) * plain.V[0].double(), want, rtol=1e-2)


# ------------------------------------------------------------------------------------------- end to end
def _run(out, clock="lr", schedule="linear", warmup=0, tcut=4, max_steps=8, step_lr=False):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1)
    model.save_pretrained(os.path.join(out, "base"))
    tok.save_pretrained(os.path.join(out, "base"))
    cb = RelexCallback(tcut=tcut, horizons=[2 * tcut, 3 * tcut], dtype="float32", fit_clock=clock)
    opts = (None, None)
    if step_lr:  # a scheduler that is not a LambdaLR: cannot be read ahead
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opts = (opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    trainer = grpo_trainer(os.path.join(out, "run"), [cb], model=model, tok=tok, optimizers=opts,
                           lr_scheduler_type=schedule, warmup_steps=warmup, max_steps=max_steps, save_strategy="steps",
                           save_steps=1)
    trainer.train()
    return cb, trainer


def _digests(d, names=("relex_state.safetensors",)):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f.endswith(".safetensors") and ("step-" in root or f in names):
                with open(os.path.join(root, f), "rb") as fh:
                    data = fh.read()
                n = int.from_bytes(data[:8], "little")
                out[os.path.relpath(os.path.join(root, f), d)] = hashlib.sha256(data[8 + n:]).hexdigest()
    return out


def test_constant_rate_both_clocks_write_the_same_bytes(tmp_path):
    a, _ = _run(str(tmp_path / "a"), clock="lr", schedule="constant")
    b, _ = _run(str(tmp_path / "b"), clock="steps", schedule="constant")
    da, db = _digests(str(tmp_path / "a" / "run" / "relex")), _digests(str(tmp_path / "b" / "run" / "relex"))
    assert da and da == db
    for r in (a.report, b.report):
        assert "clock" not in r
    for d in ("a", "b"):
        with open(tmp_path / d / "run" / "relex" / "relex_state.safetensors", "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(json.loads(f.read(n))["__metadata__"]["relex"])
        assert "clock" not in meta and meta["version"] in (2, 3)


def test_linear_schedule_recorded_and_rewritten_bit_for_bit(tmp_path):
    from tests.helpers import cli_env

    cb, trainer = _run(str(tmp_path), clock="lr", schedule="linear", warmup=1, tcut=4, max_steps=8)
    rep = cb.report
    assert rep["clock"]["kind"] == "lr" and "LambdaLR" in rep["clock"]["source"]
    # the rates the trainer logged are the ones read ahead (step t logs the rate step t ran with)
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    out = tmp_path / "run" / "relex"

    st = load_state(str(out))
    assert st.clock is not None
    for t, lr in logged.items():
        assert st.clock.lrs[t - 1] == pytest.approx(lr, rel=1e-12)
    assert rep["clock"]["horizons_on_clock"]["8"] == pytest.approx(st.clock.at(8))
    assert st.clock.at(8) < 8  # the decaying rate places 2x tcut before step 8 on the clock
    exe = os.path.join(os.path.dirname(sys.executable), "relex")
    r = subprocess.run([exe, "materialize", "--state", str(out), "--base", str(tmp_path / "base"), "--horizons", "8,12",
                        "--out", str(tmp_path / "mat")], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    cbw, mat = _digests(str(out), names=()), _digests(str(tmp_path / "mat"), names=())
    assert cbw and cbw == mat
    r = subprocess.run([exe, "materialize", "--state", str(out), "--base", str(tmp_path / "base"), "--horizons", "8",
                        "--out", str(tmp_path / "mat")], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 2 and "already exist" in r.stderr  # the message names the CLI's own switch
    assert "pass --overwrite" in r.stderr and "pass overwrite" not in r.stderr, r.stderr
    # offline: the checkpoints' trainer_state.json logs reach only tcut=4 here (training stopped): the step clock,
    # said once; with the schedule as an option, the callback's lr clock and its bytes
    ckpts = [str(tmp_path / "run" / f"checkpoint-{i}") for i in range(1, 5)]
    args = [exe, "extrapolate", "--base", str(tmp_path / "base"), "--checkpoints", *ckpts, "--horizons", "8,12",
            "--no-progress", "--dtype", "float32", "--no-streaming"]
    r = subprocess.run(args + ["--out", str(tmp_path / "x1")], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("fitted on the step") == 1 and "--schedule" in r.stderr
    with open(tmp_path / "x1" / "report.json") as f:
        assert "clock" not in json.load(f)
    for form in ("--no-streaming", "--streaming"):
        o = tmp_path / f"x2{form}"
        r = subprocess.run(args[:-1] + [form, "--schedule", "linear,warmup=1,total=8", "--out", str(o)],
                           capture_output=True, text=True, env=cli_env())
        assert r.returncode == 0, r.stderr
        with open(o / "report.json") as f:
            x = json.load(f)
        assert x["clock"]["kind"] == "lr"
        assert x["clock"]["horizons_on_clock"] == pytest.approx(rep["clock"]["horizons_on_clock"], rel=1e-12)
        xs = load_state(str(o))
        assert [v * 1e-3 for v in xs.clock.lrs] == pytest.approx(st.clock.lrs, rel=1e-12)  # base 1 vs 1e-3


def test_unreadable_scheduler_falls_back_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        cb, _ = _run(str(tmp_path), clock="lr", step_lr=True)
    msgs = [r.getMessage() for r in caplog.records if "StepLR" in r.getMessage()]
    assert len(msgs) == 1 and "fitted on the step" in msgs[0]
    assert "clock" not in cb.report
