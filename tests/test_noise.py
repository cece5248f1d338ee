"""The drift share (relex_callback/noise.py): a low-noise line and a random walk are told apart with their standard
errors; strides and skipped steps use the real step numbers; the Gram and power solvers, the streamed and buffered
`relex extrapolate` and the callback all write the same figure into report.json; `relex report` prints it."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_callback.core import noise
from relex_callback.core.solver import SolveOptions, solve
from relex_callback import RelexCallback

from helpers import U32, arena_specs, first_order_bound, gram_rounding, run_relex
from grpo import grpo_trainer

SIZES = [4000, 700, 64]


def _walk(T, drift, sigma, seed=0, sizes=SIZES):
    """Deltas [T, D] of a trajectory that moves by ``g + n_t`` per step: |g| = drift and E|n_t|^2 = sigma^2 for each
    tensor."""
    g = torch.Generator().manual_seed(seed)
    specs, D = arena_specs(sizes)
    steps = []
    for s in specs:
        d = torch.randn(s.local_numel, generator=g, dtype=torch.float64)
        n = torch.randn(T, s.local_numel, generator=g, dtype=torch.float64) * sigma / s.local_numel ** 0.5
        steps.append(drift * d / d.norm() + n)
    return torch.cat(steps, 1).cumsum(0), specs


def _share(M, steps, specs, method="gram"):
    sol = solve(M.float(), steps, specs, SolveOptions(method=method))
    return sol.noise


@pytest.mark.parametrize("method", ["gram", "power"])
def test_separates_a_low_noise_line_from_a_random_walk(method):
    steps = list(range(1, 21))
    line, specs = _walk(20, drift=1.0, sigma=0.2)
    walk, _ = _walk(20, drift=0.0, sigma=1.0, seed=1)
    a, b = _share(line, steps, specs, method), _share(walk, steps, specs, method)
    assert a.drift_share > 0.9 and b.drift_share < 0.1
    assert a.drift_share - b.drift_share > 10 * (a.global_share_se + b.global_share_se)
    # the figures themselves: |g|^2 = 3 tensors x 1, sigma^2 = 3 x 0.04 (line); 0 and 3 (walk)
    assert a.global_drift_sq == pytest.approx(3.0, rel=0.1) and a.global_noise_sq == pytest.approx(0.12, rel=0.2)
    assert abs(b.global_drift_sq) < 0.1 and b.global_noise_sq == pytest.approx(3.0, rel=0.1)
    # a half-and-half window lands in between
    mid, _ = _walk(20, drift=1.0, sigma=1.0, seed=2)
    c = _share(mid, steps, specs, method)
    assert 0.35 < c.drift_share < 0.65


def _figures(d):
    return torch.tensor([d.drift_share, d.coef_share, d.late_share, d.speed_ratio, *d.share.tolist()],
                        dtype=torch.float64)


def _path_difference_bound(M, steps, specs, tol, extra=0.0):
    """How far the Gram and power paths' figures (``_figures`` order) can be apart: every figure is a float64
    function of the per-tensor Grams (their diagonal, sub-diagonal and last column; the coefficients c = sqrt(lam_1)
    u_1 of the top eigenpair), each path reads entries within gram_rounding of the exact ones (float32 products in
    any order), so the two within first_order_bound of twice that; the power path's eigenpair is exact for G + F with
    ||F||_F <= sqrt(2) tol lam_1 (its acceptance). Summed over the tensors (each moves the global figures).
    ``extra``: a further entrywise move ``extra |m_i| |m_j|`` of each path's Gram (e.g. 2u for deltas formed by a
    float32 subtraction)."""
    M = M.double()
    segs = [M[:, s.offset : s.offset + s.local_numel] for s in specs]
    G = torch.stack([m @ m.T for m in segs])
    lam_all, U_all = torch.linalg.eigh(G)
    c_all = lam_all[:, -1:].clamp_min(0).sqrt() * U_all[:, :, -1]
    total = torch.zeros(4 + len(specs), dtype=torch.float64)
    for i, m in enumerate(segs):

        def f(P, i=i):
            lam, U = torch.linalg.eigh(P)
            out = []
            for b in range(P.shape[0]):
                Gb, c = G.clone(), c_all.clone()
                Gb[i] = P[b]
                c[i] = lam[b, -1].clamp_min(0).sqrt() * U[b, :, -1]
                out.append(_figures(noise.drift_share(Gb, steps, coeffs=c)))
            return torch.stack(out)

        F = math.sqrt(2) * tol * float(lam_all[i, -1])
        r = m.norm(dim=-1)
        E = 2 * (gram_rounding(m) + extra * r[:, None] * r[None, :])
        total += first_order_bound(f, G[i], E, backward_frobenius=F)
    return total


def test_gram_and_power_paths_agree():
    steps = list(range(2, 82, 2))
    M, specs = _walk(40, drift=0.5, sigma=1.0, seed=3)
    a, b = _share(M, steps, specs, "gram"), _share(M, steps, specs, "power")
    # (was abs 1e-5 / rel 1e-5) within the derived bound; it is tight enough to tell a 1e-3 error of a figure
    bound = _path_difference_bound(M.float(), steps, specs, tol=1e-6)
    fa, fb = _figures(a), _figures(b)
    err = (fa - fb).abs()
    print(f"gram vs power noise figures: error {err.tolist()}, bound {bound.tolist()}")
    assert bool((err <= bound).all()), (err, bound)
    # loose as it is (the increments' squared norms are differences of cumulative Gram entries ~j times larger,
    # 1-2% of a share here), a real bug is far outside: the rows numbered 1, 2, 3, ... instead of the real steps
    wrong = _figures(_share(M, list(range(1, 41)), specs, "power"))
    print(f"misnumbered steps: {((wrong - fa).abs() / bound).tolist()} x the bound")
    assert bool(((wrong - fa).abs()[[0, 1, 2, 4, 5, 6]] > 10 * bound[[0, 1, 2, 4, 5, 6]]).all())


def test_strides_and_skipped_steps_use_the_real_step_numbers():
    """Every 3rd step recorded, and one step skipped (it did not move): the same share as every step, within the
    standard errors. Numbering the rows 1, 2, 3, ... instead would read each 3-step increment as one step (biased
    towards a line)."""
    M, specs = _walk(90, drift=0.3, sigma=1.0, seed=4)
    every = _share(M, list(range(1, 91)), specs)
    keep = [t for t in range(3, 91, 3) if t != 45]
    sub = M[[t - 1 for t in keep]]
    strided = _share(sub, keep, specs)
    naive = _share(sub, list(range(1, len(keep) + 1)), specs)
    true = 0.09 / 1.09
    assert every.drift_share == pytest.approx(true, abs=3 * every.global_share_se + 0.02)
    assert strided.drift_share == pytest.approx(true, abs=3 * strided.global_share_se + 0.02)
    assert naive.drift_share > true + 0.1


def test_halves_see_a_decelerating_line():
    """A drift whose speed decays like t^-1/2 (|Delta_t| ~ sqrt(t), no noise): the speed ratio of the halves reads
    below 1 (about sqrt(2) - 1 over 1), a steady line reads 1; the second half alone still moves like a line."""
    T = 40
    specs, D = arena_specs([500])
    d = torch.randn(D, dtype=torch.float64)
    d /= d.norm()
    t = torch.arange(1, T + 1, dtype=torch.float64)
    steps = list(range(1, T + 1))
    slow = _share((t.sqrt()[:, None] * d).float(), steps, specs)
    steady = _share((t[:, None] * d).float(), steps, specs)
    assert slow.speed_ratio == pytest.approx(2**0.5 - 1, rel=0.02) and steady.speed_ratio == pytest.approx(1, rel=1e-3)
    assert slow.mid_step == 20 and slow.late_share > 0.95 and steady.late_share > 0.99
    j = slow.to_json()
    assert j["speed_ratio"] == pytest.approx(slow.speed_ratio, rel=1e-5) and j["mid_step"] == 20


def test_combine_equals_the_whole_window():
    steps = list(range(1, 16))
    M, specs = _walk(15, drift=0.5, sigma=0.7, seed=5)
    D = M.shape[1]
    G = torch.stack(
        [M[:, s.offset : s.offset + s.local_numel] @ M[:, s.offset : s.offset + s.local_numel].T for s in specs]
    )
    c = torch.randn(3, 15, dtype=torch.float64).cumsum(1)
    whole = noise.drift_share(G, steps, coeffs=c)
    parts = noise.combine(
        [noise.drift_share(G[:1], steps, coeffs=c[:1]), noise.drift_share(G[1:], steps, coeffs=c[1:])]
    )
    assert parts.drift_share == pytest.approx(whole.drift_share, abs=1e-12)
    assert parts.global_share_se == pytest.approx(whole.global_share_se, abs=1e-12)
    assert parts.coef_share == pytest.approx(whole.coef_share, abs=1e-12)
    assert parts.late_share == pytest.approx(whole.late_share, abs=1e-12)
    assert parts.speed_ratio == pytest.approx(whole.speed_ratio, abs=1e-12)
    assert D == sum(SIZES)


def test_a_window_too_short_gives_a_reason_not_a_figure():
    M, specs = _walk(2, drift=1.0, sigma=0.1)
    sol = solve(M.float(), [1, 2], specs, SolveOptions(method="gram"))
    assert isinstance(sol.noise, str) and "at least 3" in sol.noise
    assert noise.report_entry(sol.noise) == {"reason": sol.noise}
    with pytest.raises(ValueError, match="increasing"):
        noise.drift_share(torch.zeros(1, 3, 3), [1, 3, 2])


def _checkpoints(root, drift, sigma, seed):
    """Raw checkpoints of one random walk with drift (steps 2, 4, ..., 24) and its base."""
    M, specs = _walk(24, drift=drift, sigma=sigma, seed=seed, sizes=[3000, 500])
    g = torch.Generator().manual_seed(seed)
    th0 = 0.1 * torch.randn(M.shape[1], generator=g, dtype=torch.float64)

    def save(d, flat):
        os.makedirs(d)
        save_file({s.name: flat[s.offset:s.offset + s.local_numel].float().contiguous() for s in specs},
                  os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    save(os.path.join(root, "base"), th0)
    for t in range(2, 25, 2):
        save(os.path.join(root, "ckpts", f"checkpoint-{t}"), th0 + M[t - 1])
    return os.path.join(root, "base"), os.path.join(root, "ckpts")


@pytest.mark.slow
def test_relex_extrapolate_writes_it_and_relex_report_prints_it(tmp_path, subprocess_env):
    """Two sets of checkpoints, a near-line and a random walk: report.json's ``noise`` separates them, streamed and
    buffered paths agree, and `relex report` prints the line."""
    got = {}
    for name, drift, sigma in (("line", 1.0, 0.2), ("walk", 0.05, 1.0)):
        base, ckpts = _checkpoints(str(tmp_path / name), drift, sigma, seed=7)
        for flag in ("--streaming", "--no-streaming"):
            out = str(tmp_path / name / flag.strip("-"))
            r = run_relex("extrapolate", "--base", base, "--checkpoints", ckpts, "--horizons", "48", "--out", out,
                          "--no-progress", "--dtype", "float32", flag, env=subprocess_env)
            assert r.returncode == 0, r.stderr[-2000:]
            got[name, flag] = json.load(open(os.path.join(out, "report.json")))["noise"]
        r = run_relex("report", out, env=subprocess_env)
        assert r.returncode == 0, r.stderr[-2000:]
        line = next(x for x in r.stdout.splitlines() if x.startswith("drift share"))
        assert f"{got[name, '--no-streaming']['drift_share']:.3f}" in line and "steps 2..24" in line
    for name in ("line", "walk"):
        a, b = got[name, "--streaming"], got[name, "--no-streaming"]
        assert a["recorded_steps"] == 12
        # (was abs 1e-5) both paths read the same float32 checkpoints; their Grams are within gram_rounding of the
        # exact Gram of the deltas (+ 2u |m_i||m_j| where a delta is formed by a float32 subtraction), and
        # report.json rounds each figure to 6 significant digits
        specs, _ = arena_specs([3000, 500])
        root = tmp_path / name
        th0 = load_file(str(root / "base" / "model.safetensors"))
        steps = list(range(2, 25, 2))
        M = torch.stack([torch.cat([(load_file(str(root / "ckpts" / f"checkpoint-{t}" / "model.safetensors"))[s.name]
                                     .double() - th0[s.name].double()) for s in specs]) for t in steps])
        bound = float(_path_difference_bound(M, steps, specs, tol=1e-6, extra=2 * U32)[0])
        x = b["drift_share"]
        bound += 10.0 ** (math.floor(math.log10(abs(x))) - 5) if x else 0.0
        print(f"{name}: streamed vs buffered drift share {abs(a['drift_share'] - x):.1e}, bound {bound:.1e}")
        assert abs(a["drift_share"] - x) <= bound, (name, a["drift_share"], x, bound)
    assert got["line", "--streaming"]["drift_share"] > 0.9 > 0.1 > got["walk", "--streaming"]["drift_share"]


@pytest.mark.slow
def test_the_callback_logs_it_and_writes_it(tmp_path):
    """A real GRPOTrainer run: report.json's drift share is logged as ``relex/noise/drift_share``."""
    cb = RelexCallback(tcut=6, horizons=[12], dtype="float32")
    trainer = grpo_trainer(tmp_path, [cb])
    trainer.train()
    nz = json.load(open(tmp_path / "relex" / "report.json"))["noise"]
    assert 0.0 <= nz["drift_share"] <= 1.0 and nz["drift_share_se"] > 0 and nz["recorded_steps"] >= 3
    logged = {k: v for e in trainer.state.log_history for k, v in e.items() if k.startswith("relex/noise")}
    assert logged["relex/noise/drift_share"] == pytest.approx(nz["drift_share"], abs=1e-9)
