"""In-window backtest (relex_callback.core.backtest): the Gram-derived figures against a brute-force float64 computation from
M itself, the power path against the Gram path, folded against unfolded stores, and the behaviour on exact, drifting,
zero and too-short trajectories."""

import json
import math

import pytest
import torch

from relex_callback.core.backtest import (
    backtest_from_gram,
    combine,
    resolve_fit_rows,
    to_report,
)
from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.params import TensorSpec
from relex_callback.core.solver import solve

from helpers import U32, arena_specs

METHODS = ["gram", "power"]


_specs = arena_specs


def _trajectory(steps, sizes, *, noise=0.0, drift=0.0, seed=0):
    """float64 ``[T, D]``: per tensor ``(a t + b) v + drift * c_T * (t / t_T)^2 w + noise``, ``w`` orthogonal to ``v``:
    the direction turns more and more towards ``w`` (a curving trajectory the line of the first half cannot see)."""
    g = torch.Generator().manual_seed(seed)
    specs, D = _specs(sizes)
    t = torch.tensor(steps, dtype=torch.float64)
    M = torch.empty(len(steps), D, dtype=torch.float64)
    for sp in specs:
        n = sp.local_numel
        Q, _ = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))
        v, w = Q[:, 0], Q[:, 1]
        a, b = 1e-3 * (1 + float(torch.rand(1, generator=g))), 2e-3 * float(torch.rand(1, generator=g))
        c = a * t + b
        m = c[:, None] * v[None, :] + (drift * c[-1] * (t / t[-1]) ** 2)[:, None] * w[None, :]
        if noise:
            m += torch.randn(len(steps), n, generator=g, dtype=torch.float64) * (noise * c[-1] / math.sqrt(n))
        M[:, sp.offset : sp.offset + n] = m
    return M, specs


def _brute_force(M64, steps, specs, p, fit_start=None):
    """Everything from M in float64 (SVDs, explicit vectors): per tensor (cos, ratio, rel, drift) at the last step
    and the global figures from the concatenated predicted and recorded deltas (the drift: the mean weighted by
    ||M||_F^2)."""
    t = torch.tensor(steps, dtype=torch.float64)
    preds, reals, out = [], [], []
    dir_num = dir_w = 0.0
    for sp in specs:
        m = M64[:, sp.offset : sp.offset + sp.local_numel]
        U, S, Vh = torch.linalg.svd(m[:p], full_matrices=False)
        vP = Vh[0]
        c = m[:p] @ vP
        keep = t[:p] >= fit_start if fit_start is not None else torch.ones(p, dtype=torch.bool)
        if int(keep.sum()) < 2:
            keep = torch.ones(p, dtype=torch.bool)
        A = torch.stack([t[:p][keep], torch.ones(int(keep.sum()), dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(A, c[keep][:, None]).solution[:, 0]
        pred = (a * t[-1] + b) * vP
        real = m[-1]
        preds.append(pred)
        reals.append(real)
        cos = float(pred @ real / (pred.norm() * real.norm()))
        ratio = float(pred.norm() / real.norm())
        rel = float((pred - real).norm() / real.norm())
        _, Sw, Vw = torch.linalg.svd(m, full_matrices=False)
        drift = abs(float(vP @ Vw[0]))
        out.append((cos, ratio, rel, drift))
        dir_num += float((m**2).sum()) * drift  # weighted by ||M||_F^2
        dir_w += float((m**2).sum())
    P, R = torch.cat(preds), torch.cat(reals)
    glob = (float(P @ R / (P.norm() * R.norm())), float(P.norm() / R.norm()), float((P - R).norm() / R.norm()),
            dir_num / dir_w)
    return out, glob


@pytest.mark.parametrize("method", METHODS)
def test_exact_linear_rank1_is_predicted_exactly(method):
    steps = list(range(2, 42, 2))
    M64, specs = _trajectory(steps, [300, 1000, 7])
    sol = solve(M64.float(), steps, specs, method=method, backtest=True)
    bt = sol.backtest
    assert bt.reason is None
    assert bt.fit_steps == [s for s in steps if s <= 20] and bt.predicted_step == 40
    assert bt.predicted_steps == [s for s in steps if s > 20]
    # cosines are second order in the float32 solve's error (1 - cos ~ theta^2 / 2: 1e-6 is ample); norm ratios are
    # first order: |ratio - 1| <= ||dG|| / sigma_1^2 <= sqrt(n) u for an exactly rank-1 path (tests/helpers.py), with
    # n = 1000 the largest tensor here: 2x that
    ratio_tol = 2 * math.sqrt(1000) * U32
    assert abs(bt.cosine_global - 1) < 1e-6 and abs(bt.norm_ratio_global - 1) < ratio_tol
    assert abs(bt.direction_cosine - 1) < 1e-6
    assert bt.relative_error_global < 2e-3  # sqrt of a float32-accumulated cancellation: ~sqrt(1e-7)
    assert (bt.cosine - 1).abs().max() < 1e-6 and (bt.norm_ratio - 1).abs().max() < ratio_tol
    assert (bt.by_step["cosine"] - 1).abs().max() < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_figures_fall_monotonically_with_drift(method):
    steps = list(range(1, 31))
    figs = []
    for drift in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        M64, specs = _trajectory(steps, [500, 200], drift=drift, noise=0.01, seed=1)
        bt = solve(M64.float(), steps, specs, method=method, backtest=True).backtest
        figs.append((bt.cosine_global, bt.relative_error_global, bt.direction_cosine))
    cos, rel, dirc = zip(*figs)
    assert all(x > y for x, y in zip(cos, cos[1:])), cos
    assert all(x < y for x, y in zip(rel, rel[1:])), rel
    assert all(x > y for x, y in zip(dirc, dirc[1:])), dirc
    assert cos[0] > 0.999 and cos[-1] < 0.95


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fit_start", [None, 7, 14])
def test_matches_brute_force_float64(method, fit_start):
    steps = list(range(1, 25))
    M64, specs = _trajectory(steps, [400, 90, 1500], drift=0.3, noise=0.05, seed=2)
    M = M64.float()
    sol = solve(M, steps, specs, method=method, fit_start=fit_start, backtest=True)
    bt = sol.backtest
    p = len(bt.fit_steps)
    assert p == 12
    # fit_start=14 leaves no step of P (<= 12): the line uses all of P
    assert bt.line_steps == ([s for s in steps[:p] if s >= fit_start] if fit_start == 7 else steps[:p])
    per, glob = _brute_force(M.double(), steps, specs, p, fit_start)
    for i, (cos, ratio, rel, drift) in enumerate(per):
        assert abs(float(bt.cosine[i]) - cos) < 1e-5, (i, float(bt.cosine[i]), cos)
        assert abs(float(bt.norm_ratio[i]) - ratio) < 1e-5 * ratio
        assert abs(float(bt.relative_error[i]) - rel) < 1e-4
        assert abs(float(bt.tensor_direction_cosine[i]) - drift) < 1e-5
    for got, want in zip((bt.cosine_global, bt.norm_ratio_global, bt.relative_error_global, bt.direction_cosine), glob):
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)
    assert glob[0] < 0.999  # the drift makes this a real test, not 1 == 1


def test_gram_and_power_agree_including_fallbacks():
    steps = list(range(3, 3 * 41, 3))
    M64, specs = _trajectory(steps, [800, 333, 64], drift=0.2, noise=0.2, seed=3)
    M = M64.float()
    M[:, specs[2].offset : specs[2].offset + 64] = 0  # a frozen tensor
    a = solve(M, steps, specs, method="gram", backtest=0.4).backtest
    b = solve(M, steps, specs, method="power", backtest=0.4).backtest
    assert a.fit_steps == b.fit_steps and a.predicted_steps == b.predicted_steps
    for k in a.sums:
        assert torch.allclose(a.sums[k], b.sums[k], rtol=1e-5, atol=1e-12), k
    for k in ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine"):
        assert abs(getattr(a, k) - getattr(b, k)) < 1e-5, k
    # random data: the Krylov iterations give up after 3 passes and the Gram finishes; same figures
    R = torch.randn(30, 700, generator=torch.Generator().manual_seed(4)) * 1e-3
    rs, _ = _specs([400, 300])
    steps = list(range(1, 31))
    ga = solve(R, steps, rs, method="gram", backtest=True).backtest
    pb = solve(R, steps, rs, method="power", backtest=True, max_iter=3)
    assert pb.fallbacks >= 1
    for k in ga.sums:
        assert torch.allclose(ga.sums[k], pb.backtest.sums[k], rtol=1e-6, atol=1e-15), k
    # only the fit part's iteration gives up (random first half, a strong line after it): the main solve converged,
    # the backtest's inputs of that segment come from its Gram
    g = torch.Generator().manual_seed(11)
    Q = torch.randn(30, 500, generator=g) * 1e-3
    v = torch.randn(500, generator=g)
    Q[15:] += torch.arange(1, 16, dtype=torch.float32)[:, None] * v / v.norm()
    qs, _ = _specs([500])
    ga = solve(Q, steps, qs, method="gram", backtest=True).backtest
    pq = solve(Q, steps, qs, method="power", backtest=True, max_iter=4)
    plain = solve(Q, steps, qs, method="power", max_iter=4)
    assert pq.fallbacks == 0 and pq.bytes_read > plain.bytes_read  # one Gram of the segment beyond the passes
    for k in ga.sums:
        assert torch.allclose(ga.sums[k], pq.backtest.sums[k], rtol=1e-6, atol=1e-15), k


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_late_tensors_give_no_nan(method):
    steps = list(range(1, 13))
    M64, specs = _trajectory(steps, [50, 40, 30], noise=0.01, seed=5)
    M = M64.float()
    M[:, specs[1].offset : specs[1].offset + 40] = 0  # never moves
    M[:6, specs[2].offset : specs[2].offset + 30] = 0  # moves only after the fit part
    bt = solve(M, steps, specs, method=method, backtest=True).backtest
    for x in (bt.cosine, bt.norm_ratio, bt.relative_error, bt.tensor_direction_cosine, *bt.sums.values()):
        assert not torch.isnan(x).any()
    assert (float(bt.cosine[1]), float(bt.norm_ratio[1]), float(bt.relative_error[1])) == (1.0, 1.0, 0.0)
    assert (float(bt.cosine[2]), float(bt.norm_ratio[2]), float(bt.relative_error[2])) == (0.0, 0.0, 1.0)
    assert float(bt.tensor_direction_cosine[1]) == 1.0 and float(bt.tensor_direction_cosine[2]) == 0.0
    # the late tensor's unpredicted movement shows in the global figures
    assert bt.norm_ratio_global < 1 and bt.relative_error_global > 0.1
    rep = to_report(bt)
    json.dumps(rep, allow_nan=False)
    # everything frozen: a prediction of nothing is exact, and still no NaN
    Z = torch.zeros(12, 120)
    bz = solve(Z, steps, specs, method=method, backtest=True).backtest
    figs = (bz.cosine_global, bz.norm_ratio_global, bz.relative_error_global, bz.direction_cosine)
    assert figs == (1.0, 1.0, 0.0, 1.0)


def test_restored_tensor_has_infinite_ratio_reported_as_none():
    steps = list(range(1, 9))
    specs, D = _specs([20])
    M = torch.zeros(8, D)
    M[:4] = torch.arange(1, 5, dtype=torch.float32)[:, None] * torch.ones(20) * 1e-3  # moved, then restored to theta_0
    bt = solve(M, steps, specs, method="gram", backtest=True).backtest
    assert math.isinf(float(bt.norm_ratio[0])) and math.isinf(float(bt.relative_error[0]))
    rep = to_report(bt)
    assert rep["tensors"][0]["norm_ratio"] is None and rep["norm_ratio_global"] is None
    json.dumps(rep, allow_nan=False)


def test_rank_r_backtests_the_rank1_component():
    steps = list(range(1, 21))
    M64, specs = _trajectory(steps, [300, 120], drift=0.3, noise=0.05, seed=6)
    one = solve(M64.float(), steps, specs, method="gram", backtest=True).backtest
    three = solve(M64.float(), steps, specs, method="gram", rank=3, backtest=True).backtest
    for k in one.sums:
        assert torch.allclose(one.sums[k], three.sums[k], rtol=1e-9, atol=1e-15), k


def _store(M64, specs, steps, K, fold_rank):
    st = TrajectoryStore([TensorSpec(s.name, s.shape, s.dtype, s.local_numel) for s in specs], K, dtype="float32",
                         storage="host", fold_rank=fold_rank)
    st.set_theta0([torch.zeros(s.local_numel) for s in specs])
    for r, t in enumerate(steps):
        st.snapshot(t, [M64[r, s.offset : s.offset + s.local_numel].float() for s in specs])
    return st


def test_folded_store_agrees_with_unfolded():
    steps = list(range(1, 31))
    # rank-2 trajectories (line + quadratic drift, no noise): a rank-4 fold keeps them exactly
    M64, specs = _trajectory(steps, [200, 150], drift=0.3, seed=7)
    plain = solve(M64.float(), steps, specs, method="gram", backtest=True).backtest
    st = _store(M64, specs, steps, K=7, fold_rank=4)
    assert st.folds >= 3
    sol = solve(specs=st.specs, method="gram", backtest=True, **st.solve_inputs())
    assert sol.method == "gram-folded"
    fold = sol.backtest
    for k in ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine"):
        assert abs(getattr(plain, k) - getattr(fold, k)) < 1e-5, (k, getattr(plain, k), getattr(fold, k))
    # noisy trajectories: the fold truncates to rank 4, the figures move by about the truncated noise
    M64, specs = _trajectory(steps, [200, 150], drift=0.3, noise=0.05, seed=7)
    plain = solve(M64.float(), steps, specs, method="gram", backtest=True).backtest
    st = _store(M64, specs, steps, K=7, fold_rank=4)
    fold = solve(specs=st.specs, method="gram", backtest=True, **st.solve_inputs()).backtest
    assert abs(plain.cosine_global - fold.cosine_global) < 1e-3
    assert abs(plain.norm_ratio_global - fold.norm_ratio_global) < 1e-2


def test_combine_disjoint_tensor_sets_equals_the_whole():
    steps = list(range(1, 21))
    M64, specs = _trajectory(steps, [300, 50, 700, 20], drift=0.2, noise=0.05, seed=8)
    M = M64.float()
    whole = solve(M, steps, specs, method="gram", backtest=True).backtest
    parts = []
    for group in ([0, 2], [1, 3]):
        sub, o = [], 0
        cols = []
        for i in group:
            s = specs[i]
            sub.append(TensorSpec(s.name, s.shape, s.dtype, s.local_numel, offset=o))
            cols.append(M[:, s.offset : s.offset + s.local_numel])
            o += s.local_numel
        parts.append(solve(torch.cat(cols, 1), steps, sub, method="power", backtest=True).backtest)
    merged = combine(parts)
    assert merged.names == ["t0", "t2", "t1", "t3"]
    for k in ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine"):
        assert abs(getattr(whole, k) - getattr(merged, k)) < 1e-6, k
    # the all-reduce form: summed totals give the same global figures on a part
    total = parts[0].totals() + parts[1].totals()
    g = parts[0].with_totals(total)
    assert abs(g.cosine_global - whole.cosine_global) < 1e-6 and abs(g.direction_cosine - whole.direction_cosine) < 1e-6
    assert torch.equal(g.cosine, parts[0].cosine)
    # a single part's own figures differ from the whole (the test above could not pass by accident)
    assert abs(parts[0].cosine_global - whole.cosine_global) > 1e-6
    with pytest.raises(ValueError, match="totals"):
        parts[0].with_totals(total[:-1])


def test_fit_part_spec_and_short_windows():
    steps = [2, 4, 6, 8, 10]
    assert resolve_fit_rows(steps, None) == 2 and resolve_fit_rows(steps, True) == 2
    assert resolve_fit_rows(steps, 0.8) == 4 and resolve_fit_rows(steps, 6) == 3
    for bad in (0, 1.0, 1.5, -0.2, "half", False):
        with pytest.raises(ValueError, match="backtest"):
            resolve_fit_rows(steps, bad)
    with pytest.raises(ValueError, match="increasing"):
        resolve_fit_rows([1, 3, 2], None)
    M64, specs = _trajectory(steps, [30], seed=9)
    # one step in the fit part, or every step: no backtest, a reason instead (the solve itself is unaffected)
    for fit in (3, 10):
        sol = solve(M64.float(), steps, specs, backtest=fit)
        assert sol.backtest.reason and sol.backtest.cosine_global is None
        rep = to_report(sol.backtest)
        assert rep["reason"] == sol.backtest.reason and rep["tensors"] == [] and rep["predicted_step"] is None
        assert sol.backtest.log_metrics() == {}
        json.dumps(rep, allow_nan=False)
    assert solve(M64.float(), steps, specs).backtest is None


def test_report_dict_and_pure_function():
    steps = list(range(1, 17))
    M64, specs = _trajectory(steps, [100, 60], drift=0.1, noise=0.02, seed=10)
    M = M64.float()
    sol = solve(M, steps, specs, method="gram", backtest=True)
    rep = sol.backtest.to_report()
    for k in ("fit_steps", "predicted_step", "cosine_global", "norm_ratio_global", "relative_error_global",
              "direction_cosine", "tensors", "by_step"):
        assert k in rep
    assert [t["name"] for t in rep["tensors"]] == ["t0", "t1"]
    assert rep["by_step"]["steps"] == list(range(9, 17)) and rep["by_step"]["cosine"][-1] == rep["cosine_global"]
    json.loads(json.dumps(rep, allow_nan=False))
    logs = sol.backtest.log_metrics()
    assert logs["relex/backtest/cosine_global"] == rep["cosine_global"]
    assert abs(logs["relex/backtest/direction_drift"] - (1 - rep["direction_cosine"])) < 1e-15
    assert set(logs) == {"relex/backtest/cosine_global", "relex/backtest/norm_ratio_global",
                         "relex/backtest/relative_error_global", "relex/backtest/direction_drift"}
    # the pure function on stacked Grams gives the solve's figures
    segs = [M.double()[:, s.offset : s.offset + s.local_numel] for s in specs]
    G = torch.stack([m @ m.T for m in segs])
    bt = backtest_from_gram(G, steps, True, names=["t0", "t1"])
    assert abs(bt.cosine_global - sol.backtest.cosine_global) < 1e-6
    assert abs(bt.direction_cosine - sol.backtest.direction_cosine) < 1e-6
