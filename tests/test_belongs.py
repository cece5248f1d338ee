"""Checkpoints checked against theta_0: ``relex extrapolate --base B --checkpoints ...`` refuses,
before the solve (one line, exit 2, nothing written), checkpoints that are not one run started from B, and never
refuses a real run (``relex_callback.offline.belongs``). Real GRPO runs of the tiny model (Adam, checkpoints at every
step), the CLI as a subprocess.

Measured here (test_real_runs_stay_far_below_the_ratio_bound prints them): the distance ratio R of real
trajectories, every step and with a stride, against MAX_RATIO (20): 0 to 2.6 over four runs (learning rates 1e-4,
1e-3, 5e-3 warmup+cosine, 1e-5 on bf16 weights) and six choices of checkpoints each.
"""

import os
import shutil

import pytest
import torch

from relex_callback.offline.belongs import _indices, check_belongs, distance_ratio, MAX_RATIO, sampled
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.files.checkpoints import Checkpoint, DirectorySource, MappedSource
from grpo import grpo_trainer
from test_callback import read_weights
from helpers import cli_env, run_relex
from safetensors.torch import load_file, save_file

STEPS = 8
FROZEN = "model.norm.weight"


def _model(tok, seed=0):
    model = build_model(tok, seed=seed)
    model.get_parameter(FROZEN).requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def ckrun(tmp_path_factory):
    """GRPO for 8 steps, a checkpoint at every step; ``base/`` is theta_0. A second run (warmup + cosine decay of a
    5x larger learning rate) in ``cos/``, a third with a 10x smaller one in ``small/``.

    The toy's default learning rate (Adam, 1e-3 per element per step against an initialisation of scale 0.02) moves
    the weights as far as a re-initialisation in a few dozen steps, so a model of another seed is only ~24x a step
    away there; at 1e-4 (still 100x a real RL step relative to the weights) the refusals below have the margin a real
    run has."""
    out = tmp_path_factory.mktemp("belongs")
    tok = build_tokenizer()
    model = _model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    grpo_trainer(out, [], model=model, tok=tok, save_strategy="steps", save_steps=1, max_steps=STEPS).train()
    grpo_trainer(out / "cos", [], model=_model(tok), tok=tok, save_strategy="steps", save_steps=1, max_steps=STEPS,
                 learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=3).train()
    grpo_trainer(out / "small", [], model=_model(tok), tok=tok, save_strategy="steps", save_steps=1, max_steps=STEPS,
                 learning_rate=1e-4).train()

    bf16 = build_model(tok, dtype=torch.bfloat16)  # weights kept in bf16: a small step changes few elements
    bf16.save_pretrained(out / "bf16" / "base")
    grpo_trainer(out / "bf16", [], model=bf16, tok=tok, save_strategy="steps", save_steps=1, max_steps=STEPS,
                 learning_rate=1e-5).train()
    return out


@pytest.fixture(scope="module")
def env():
    return cli_env()


def _ck(run, *steps):
    return [run / f"checkpoint-{t}" for t in steps]


def test_real_runs_stay_far_below_the_ratio_bound(ckrun):
    """R of real GRPO/Adam trajectories (learning rates 1e-4 and 1e-3 constant, 5e-3 warmup+cosine, 1e-5 on bf16
    weights), every checkpoint, strides 2 and 3, a late first checkpoint, two far-apart checkpoints: at most
    MAX_RATIO / 4, and none of the checks refuses any of them."""
    rs = {}
    for run, tag in ((ckrun, "constant"), (ckrun / "cos", "cosine"), (ckrun / "small", "small-lr"),
                     (ckrun / "bf16", "bf16")):
        base_dir = ckrun / "bf16" / "base" if tag == "bf16" else ckrun / "base"
        src_base = DirectorySource(str(base_dir))
        base = MappedSource(src_base)
        names = list(src_base.keys)
        idx = {n: _indices(base.get(n).numel()) for n in names}
        x0 = sampled(base, names, idx)
        for label, steps in (("all", range(1, STEPS + 1)), ("stride2", (2, 4, 6, 8)), ("stride3", (3, 6)),
                             ("late", (5, 6, 7, 8)), ("far", (1, 8)), ("late-stride", (4, 8))):
            srcs = [DirectorySource(str(p)) for p in _ck(run, *steps)]
            xs = [sampled(MappedSource(s), names, idx) for s in srcs]
            rs[f"{tag}/{label}"] = distance_ratio(x0, xs, list(steps), names)[0]
            cks = [Checkpoint(t, str(p), str(p)) for t, p in zip(steps, _ck(run, *steps))]
            check_belongs(str(base_dir), src_base, cks, srcs, names)  # raises on a false refusal
    print("distance ratio R of real runs:", {k: round(v, 3) for k, v in rs.items()})
    assert max(rs.values()) <= MAX_RATIO / 4, rs


@pytest.mark.parametrize("order", ["names", "steps"])
def test_checkpoints_out_of_order_give_the_same_bytes(ckrun, env, tmp_path, order):
    """Checkpoints given out of order (named, or with --steps in the same shuffled order) are sorted by step: the
    same horizon, bitwise, as in order."""
    ordered = run_relex("extrapolate", "--base", ckrun / "base", "--checkpoints", *_ck(ckrun, 1, 2, 3, 4),
                        "--horizons", 20, "--out", tmp_path / "a", "--no-progress", env=env)
    assert ordered.returncode == 0, ordered.stderr[-2000:]
    extra = ["--steps", "3,1,4,2"] if order == "steps" else []
    shuffled = run_relex("extrapolate", "--base", ckrun / "base", "--checkpoints", *_ck(ckrun, 3, 1, 4, 2),
                         "--horizons", 20, "--out", tmp_path / "b", "--no-progress", *extra, env=env)
    assert shuffled.returncode == 0, shuffled.stderr[-2000:]
    a, b = read_weights(tmp_path / "a" / "step-20"), read_weights(tmp_path / "b" / "step-20")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _other_seed(run, d):
    _model(build_tokenizer(), seed=1).save_pretrained(d)


def _finetuned(run, d):
    """A fine-tune of a sibling: every trained tensor moved by 0.01 per element, what 100 coherent steps of the
    ``small/`` run's Adam (learning rate 1e-4, about 1e-4 per element per step) would move it."""
    shutil.copytree(run / "base", d)
    w = load_file(d / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    w = {k: v + (0.01 * torch.randn(v.shape, generator=g) if k != FROZEN else 0) for k, v in w.items()}
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


def _frozen_differs(run, d):
    shutil.copytree(run / "base", d)
    w = load_file(d / "model.safetensors")
    w[FROZEN] = w[FROZEN] + 0.5
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


BASES = {  # case -> (make the base, words the one-line error must hold)
    "another seed": (_other_seed, ["farther from the base", "--no-run-check"]),
    "a fine-tune of the base": (_finetuned, ["farther from the base", "--no-run-check"]),
    "a frozen tensor differs": (_frozen_differs, [FROZEN, "never trained", "did not start from this base"]),
}


def _refused(r, words):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("relex: error:") and not any("Traceback" in x for x in lines), r.stderr
    assert all(w in lines[-1] for w in words), lines[-1]


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
@pytest.mark.parametrize("case", list(BASES))
def test_a_base_the_checkpoints_did_not_start_from_is_refused(ckrun, env, tmp_path, case, streaming):
    make, words = BASES[case]
    make(ckrun, tmp_path / "base")
    r = run_relex("extrapolate", "--base", tmp_path / "base", "--checkpoints", *_ck(ckrun / "small", 2, 4, 6, 8),
                  "--horizons", 20, "--out", tmp_path / "out", "--no-progress", streaming, env=env)
    _refused(r, words)
    print(case, r.stderr.strip().splitlines()[-1][:300])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # refused before anything was written
    if case == "another seed":  # the flag the message names: the user's way past a false refusal
        r = run_relex("extrapolate", "--base", tmp_path / "base", "--checkpoints", *_ck(ckrun / "small", 2, 4, 6, 8),
                      "--horizons", 20, "--out", tmp_path / "out", "--no-progress", streaming, "--no-run-check",
                      env=env)
        assert r.returncode == 0 and "--no-run-check" in r.stderr, r.stderr[-2000:]


def test_duplicated_checkpoints_are_refused(ckrun, env, tmp_path):
    """The same step twice, the same directory twice (under two --steps), a copy under another step: refused."""
    shutil.copytree(ckrun / "checkpoint-3", tmp_path / "step-3")
    shutil.copytree(ckrun / "checkpoint-4", tmp_path / "checkpoint-9")  # a `cp -r` copy named as a later step
    cases = [
        ([*_ck(ckrun, 1, 2, 3), tmp_path / "step-3"], [], ["step 3 appears twice"]),
        (_ck(ckrun, 1, 2, 1), ["--steps", "1,2,3"], ["same directory"]),
        ([*_ck(ckrun, 2, 4, 6), str(ckrun / "checkpoint-6") + "/"], ["--steps", "2,4,6,8"], ["same directory"]),
        ([*_ck(ckrun, 2, 4), tmp_path / "checkpoint-9"], [], ["checkpoint-9", "same weights"]),
    ]
    for i, (cks, extra, words) in enumerate(cases):
        r = run_relex("extrapolate", "--base", ckrun / "base", "--checkpoints", *cks, *extra, "--horizons", 20,
                      "--out", tmp_path / f"out{i}", "--no-progress", env=env)
        _refused(r, words)
        assert not (tmp_path / f"out{i}").exists() or not os.listdir(tmp_path / f"out{i}")


def test_checkpoints_still_at_theta0_are_not_copies(ckrun, env, tmp_path):
    """Steps that did not move the weights (GRPO steps without reward variance: the checkpoints equal theta_0) are
    observations, not copies: accepted. The base itself copied as steps 1 and 2, then the run's checkpoints."""
    for t in (1, 2):
        shutil.copytree(ckrun / "base", tmp_path / f"step-{t}")
    r = run_relex("extrapolate", "--base", ckrun / "base", "--checkpoints", tmp_path / "step-1", tmp_path / "step-2",
                  *_ck(ckrun, 3, 4, 5, 6), "--horizons", 20, "--out", tmp_path / "out", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
