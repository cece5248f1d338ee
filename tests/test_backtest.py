"""In-window backtest (relex_callback.core.backtest): the Gram-derived figures against a brute-force float64
computation from
M itself, the power path against the Gram path, folded against unfolded stores, and the behaviour on exact, drifting,
zero and too-short trajectories."""

import json
import math

import pytest
import torch

from relex_callback.core.backtest import (
    _figures,
    backtest_from_gram,
    backtest_from_projections,
    combine,
    DRIFT_SUMS,
    resolve_fit_rows,
    STEP_SUMS,
    to_report,
    top_eigenpair,
)
from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.params import TensorSpec
from relex_callback.core.solver import BACKTEST_TOL_FACTOR, SolveOptions, solve

from helpers import U32, arena_specs, first_order_bound, gram_rounding

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


FIGS = ("cosine", "norm_ratio", "relative_error", "tensor_direction_cosine")
GLOBAL = ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine")


def _sums(bt):
    """``[S, 4 L + 2]``: each tensor's additive sums in the order of :meth:`Backtest.totals`."""
    return torch.cat([bt.sums[k] for k in STEP_SUMS] + [bt.sums[k][:, None] for k in DRIFT_SUMS], 1)


def _global(tot, L):
    """The global figures (``GLOBAL`` order) of summed totals ``[B, 4 L + 2]``, as :meth:`Backtest.with_totals`."""
    dot, pred, real, err = (tot[:, k * L + L - 1] for k in range(4))
    cos, ratio, rel = _figures(dot, pred, real, err)
    w = tot[:, 4 * L + 1]
    drift = torch.where(w > 0, tot[:, 4 * L] / w.where(w > 0, torch.ones_like(w)), torch.ones_like(w))
    return torch.stack([cos, ratio, rel, drift], 1)


def _bounds(M, steps, specs, *, fit=True, fit_start=None, power_tol=0.0, rounding_too=False):
    """What the float32 arithmetic guarantees for the backtest of ``M`` (float32 data; float64 here) against the same
    figures computed exactly (``backtest_from_gram`` of the float64 Grams, which the brute force agrees with to
    ~1e-13). Every figure is a function of the per-tensor Grams; the float32 Gram moves entry ``ij`` by at most
    ``sqrt(n) u |m_i| |m_j|`` (:func:`helpers.gram_rounding`), and :func:`helpers.first_order_bound` turns that into
    the largest move of each figure. ``power_tol``: the power path's acceptance tolerance; its Ritz pairs are exact
    eigenpairs of ``G + F`` with ``||F||_F <= sqrt(2) ||residual||``, the residual below ``tol lam`` for the main
    iteration and ``BACKTEST_TOL_FACTOR tol lam_P`` for the fit part's. Returns ``(per [S, 4] in FIGS order,
    glob [4] in GLOBAL order, sums [S, 4 L + 2])``; with ``rounding_too``, that for ``power_tol`` and that for 0 (the
    rounding part alone), from one evaluation."""
    M = M.double()
    segs = [M[:, s.offset : s.offset + s.local_numel] for s in specs]
    G = torch.stack([m @ m.T for m in segs])
    base = backtest_from_gram(G, steps, fit, fit_start=fit_start)
    base_sums = _sums(base)
    total = base_sums.sum(0)
    L = len(base.predicted_steps)
    out = {tol: ([], torch.zeros(4, dtype=torch.float64), []) for tol in {power_tol, 0.0}}
    for i, m in enumerate(segs):

        def f(Gb, i=i):
            bt = backtest_from_gram(Gb, steps, fit, fit_start=fit_start)
            own = _sums(bt)
            return torch.cat([torch.stack([getattr(bt, k) for k in FIGS], 1), _global(total - base_sums[i] + own, L),
                              own], 1)

        lam = float(torch.linalg.eigvalsh(G[i])[-1])
        rounding, per_F = first_order_bound(f, G[i], gram_rounding(m), parts=True)
        for tol, (per, glob, sums) in out.items():
            b = rounding + per_F * math.sqrt(2) * (1 + BACKTEST_TOL_FACTOR) * tol * lam
            per.append(b[:4])
            glob += b[4:8]
            sums.append(b[8:])
    res = {tol: (torch.stack(per), glob, torch.stack(sums)) for tol, (per, glob, sums) in out.items()}
    return (res[power_tol], res[0.0]) if rounding_too else res[power_tol]


def _within(got, want, bound, what):
    """``|got - want| <= bound`` entrywise, with the margins for the record (``-s`` shows them)."""
    got, want, bound = (torch.as_tensor(x, dtype=torch.float64) for x in (got, want, bound))
    err = (got - want).abs()
    ok = bool((err <= bound).all())
    inf = torch.where(err > 0, math.inf, 0.0)
    ratio = torch.where(bound > 0, err / bound.where(bound > 0, torch.ones_like(bound)), inf)
    print(f"{what}: max error {float(err.max()):.1e}, max error / bound {float(ratio.max()):.2e}, "
          f"bound {float(bound.min()):.1e} .. {float(bound.max()):.1e}")
    assert ok, (what, err, bound)


@pytest.mark.parametrize("method", METHODS)
def test_exact_linear_rank1_is_predicted_exactly(method):
    steps = list(range(2, 42, 2))
    M64, specs = _trajectory(steps, [300, 1000, 7])
    sol = solve(M64.float(), steps, specs, SolveOptions(method=method, backtest=True))
    bt = sol.backtest
    assert bt.reason is None
    assert bt.fit_steps == [s for s in steps if s <= 20] and bt.predicted_step == 40
    assert bt.predicted_steps == [s for s in steps if s > 20]
    # (was: cosines 1e-6 from 1, ratios 2 sqrt(n) u, relative_error_global < 2e-3) against the exact figures of the
    # float32 data (rounded once: no longer exactly rank 1, so these are 1 / 0 only to ~u), within what the float32
    # Gram's rounding (+ the power path's acceptance) can move them, by first_order_bound as in
    # test_matches_brute_force_float64. The figures read the Gram entrywise, and entrywise rounding is not a PSD
    # perturbation: the cosines move at first order (~sqrt(n) u), not at second.
    M = M64.float()
    per, glob = _brute_force(M.double(), steps, specs, len(bt.fit_steps))
    b_per, b_glob, b_sums = _bounds(M, steps, specs, power_tol=1e-6 if method == "power" else 0.0)
    cols = [0, 1, 3]  # cosine, norm ratio, direction cosine (the relative error below)
    got = torch.stack([getattr(bt, k) for k in FIGS], 1)
    _within(got[:, cols], torch.tensor(per)[:, cols], b_per[:, cols], f"{method} exact line, per tensor")
    _within([getattr(bt, GLOBAL[k]) for k in cols], [glob[k] for k in cols], b_glob[cols],
            f"{method} exact line, global")
    # the relative error is the root of a cancellation, sqrt(err_sq / real_sq) with err_sq = |p|^2 - 2 p.r + |r|^2
    # ~ 0: a function of the Gram without a useful derivative there, so it is bounded through the sums it is the root
    # of (smooth in the Gram: their first_order_bound holds): err_sq within +-b_e, real_sq within +-b_r
    segs = [M.double()[:, sp.offset : sp.offset + sp.local_numel] for sp in specs]
    exact = _sums(backtest_from_gram(torch.stack([m @ m.T for m in segs]), steps, True))
    L = len(bt.predicted_steps)

    def rel_within(got_rel, sums, bounds, what):
        e, r, be, br = sums[..., 4 * L - 1], sums[..., 3 * L - 1], bounds[..., 4 * L - 1], bounds[..., 3 * L - 1]
        hi = ((e + be) / (r - br)).sqrt()
        lo = ((e - be).clamp_min(0) / (r + br)).sqrt()
        got_rel = torch.as_tensor(got_rel, dtype=torch.float64)
        print(f"{what}: relative error {float(got_rel.max()):.1e}, interval up to {float(hi.max()):.1e}")
        assert bool(((lo <= got_rel) & (got_rel <= hi)).all()), (what, got_rel, lo, hi)

    rel_within(bt.relative_error, exact, b_sums, f"{method} exact line, relative error per tensor")
    rel_within(bt.relative_error_global, exact.sum(0), b_sums.sum(0), f"{method} exact line, relative error global")
    # the global cosine at every later step, from the summed dot products and squared norms (bounds summed over
    # the tensors; |d cos| <= |d dot| / sqrt(p r) + |cos| (|d p| / p + |d r| / r) / 2 at first order)
    (dot, pp, rr), (bd, bp, br) = ([x[k * L : (k + 1) * L] for k in range(3)] for x in (exact.sum(0), b_sums.sum(0)))
    cos = dot / (pp * rr).sqrt()
    _within(bt.by_step["cosine"], cos, bd / (pp * rr).sqrt() + cos.abs() * (bp / pp + br / rr) / 2,
            f"{method} exact line, by step")
    # and the exact figures of the rounded data are those of a line to ~u (cosines to u^2): every row is within u |m_t|
    # of the line; the fitted coefficient at 40 moves by <= ||L||_1 u max |c_t| <= 4.4 u c_40 (L: the line through
    # steps 2..20 evaluated at 40; c grows), the real row by u |m_40|, the direction by <= u: (4.4 + 2) u < 8 u
    assert all(abs(c - 1) < 1e-12 and abs(r - 1) < 8 * U32 and e < 8 * U32 for c, r, e, _ in per), per


@pytest.mark.parametrize("method", METHODS)
def test_figures_fall_monotonically_with_drift(method):
    steps = list(range(1, 31))
    figs = []
    for drift in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        M64, specs = _trajectory(steps, [500, 200], drift=drift, noise=0.01, seed=1)
        bt = solve(M64.float(), steps, specs, SolveOptions(method=method, backtest=True)).backtest
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
    sol = solve(M, steps, specs, SolveOptions(method=method, fit_start=fit_start, backtest=True))
    bt = sol.backtest
    p = len(bt.fit_steps)
    assert p == 12
    # fit_start=14 leaves no step of P (<= 12): the line uses all of P
    assert bt.line_steps == ([s for s in steps[:p] if s >= fit_start] if fit_start == 7 else steps[:p])
    per, glob = _brute_force(M.double(), steps, specs, p, fit_start)
    # derived bounds (the Gram's float32 rounding, + the acceptance tolerance on the power path)
    (b_per, b_glob, _), (r_per, r_glob, _) = _bounds(M, steps, specs, fit_start=fit_start,
                                                     power_tol=1e-6 if method == "power" else 0.0, rounding_too=True)
    got = torch.stack([getattr(bt, k) for k in FIGS], 1)
    _within(got, torch.tensor(per, dtype=torch.float64), b_per, f"{method} fit_start={fit_start} per tensor")
    _within([getattr(bt, k) for k in GLOBAL], glob, b_glob, f"{method} fit_start={fit_start} global")
    # the rounding part of the bounds is tight enough to mean something: a 1e-3 relative error of any figure exceeds
    # it (the power path's acceptance term is the solver's own promise, tol = 1e-6 and 10x that for the fit part: up
    # to ~1e-2 of a figure by this first-order bound, while the iterations in fact stop far below it)
    assert bool((r_per < 1e-3 * torch.tensor(per, dtype=torch.float64).abs()).all()), r_per
    assert bool((r_glob < 1e-3 * torch.tensor(glob, dtype=torch.float64).abs()).all()), r_glob
    # and a planted 1e-3 relative error of one figure fails the check
    with pytest.raises(AssertionError):
        _within(got * torch.tensor([1.0, 1.0, 1.0 + 1e-3, 1.0]), torch.tensor(per, dtype=torch.float64), r_per,
                "planted")
    assert glob[0] < 0.999  # the drift makes this a real test, not 1 == 1


def test_gram_and_power_agree_including_fallbacks():
    steps = list(range(3, 3 * 41, 3))
    M64, specs = _trajectory(steps, [800, 333, 64], drift=0.2, noise=0.2, seed=3)
    M = M64.float()
    M[:, specs[2].offset : specs[2].offset + 64] = 0  # a frozen tensor
    a = solve(M, steps, specs, SolveOptions(method="gram", backtest=0.4)).backtest
    b = solve(M, steps, specs, SolveOptions(method="power", backtest=0.4)).backtest
    assert a.fit_steps == b.fit_steps and a.predicted_steps == b.predicted_steps
    # each path within its derived bound of the exact figures (the power path's includes its acceptance tolerance)
    (bp_per, bp_glob, bp_sums), (bg_per, bg_glob, bg_sums) = _bounds(M, steps, specs, fit=0.4, power_tol=1e-6,
                                                                     rounding_too=True)
    _within(_sums(a), _sums(b), bg_sums + bp_sums, "gram vs power sums")
    _within([getattr(a, k) for k in GLOBAL], [getattr(b, k) for k in GLOBAL], bg_glob + bp_glob, "gram vs power global")
    # random data: the Krylov iterations give up after 3 passes and the Gram finishes. Everything then comes from
    # the same Gram arithmetic (bitwise) but the Gram diagonal, which the power path takes from its first pass
    # (float32 row norms): each of the two within sqrt(n) u |m_t|^2 of ||m_t||^2
    R = torch.randn(30, 700, generator=torch.Generator().manual_seed(4)) * 1e-3
    rs, _ = _specs([400, 300])
    steps = list(range(1, 31))
    ga = solve(R, steps, rs, SolveOptions(method="gram", backtest=True)).backtest
    pb = solve(R, steps, rs, SolveOptions(method="power", backtest=True, max_iter=3))
    assert pb.fallbacks >= 1
    _diag_only_differs(ga, pb.backtest, R, rs, len(steps) // 2)
    # only the fit part's iteration gives up (random first half, a strong line after it): the main solve converged,
    # the backtest's inputs of that segment come from its Gram
    g = torch.Generator().manual_seed(11)
    Q = torch.randn(30, 500, generator=g) * 1e-3
    v = torch.randn(500, generator=g)
    Q[15:] += torch.arange(1, 16, dtype=torch.float32)[:, None] * v / v.norm()
    qs, _ = _specs([500])
    ga = solve(Q, steps, qs, SolveOptions(method="gram", backtest=True)).backtest
    pq = solve(Q, steps, qs, SolveOptions(method="power", backtest=True, max_iter=4))
    plain = solve(Q, steps, qs, SolveOptions(method="power", max_iter=4))
    assert pq.fallbacks == 0 and pq.bytes_read > plain.bytes_read  # one Gram of the segment beyond the passes
    # the drift also reads the main iteration's (lam, u): converged to tol, not the Gram's
    _diag_only_differs(ga, pq.backtest, Q, qs, len(steps) // 2, main_tol=1e-6)


def _diag_only_differs(a, b, M, specs, p, main_tol=0.0):
    """``a`` (Gram path) and ``b`` (power path) share the fit part's Gram arithmetic (their ``dot`` and ``pred_sq`` are
    bitwise equal); the rest is within what the Gram diagonal's rounding (each path's within ``sqrt(n) u |m_t|^2``)
    and, with ``main_tol``, the main iteration's acceptance (``lam``, ``u`` of ``G + F``) allow: the backtest from
    the exact Gram with the fit part's ``(lam_P, u_P, g_P)`` held fixed, through :func:`first_order_bound`."""
    for k in ("dot", "pred_sq"):
        assert torch.equal(a.sums[k], b.sums[k]), k
    steps = list(range(1, M.shape[0] + 1))
    for i, sp in enumerate(specs):
        m = M[:, sp.offset : sp.offset + sp.local_numel].double()
        G = m @ m.T
        lam_P, u_P = top_eigenpair(G[None, :p, :p])
        g_P = (G[None, :, :p] @ u_P[..., None])[..., 0]

        def f(Gb):
            B = Gb.shape[0]
            lam, u = top_eigenpair(Gb)
            bt = backtest_from_projections(lam_P.expand(B), u_P.expand(B, p), g_P.expand(B, -1),
                                           torch.diagonal(Gb, dim1=1, dim2=2), lam, u, steps)
            return _sums(bt)

        F = math.sqrt(2) * main_tol * float(torch.linalg.eigvalsh(G)[-1])
        bound = first_order_bound(f, G, 2 * gram_rounding(m), backward_frobenius=F)
        _within(_sums(a)[i], _sums(b)[i], bound, f"gram vs power fallback, tensor {i}")


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_late_tensors_give_no_nan(method):
    steps = list(range(1, 13))
    M64, specs = _trajectory(steps, [50, 40, 30], noise=0.01, seed=5)
    M = M64.float()
    M[:, specs[1].offset : specs[1].offset + 40] = 0  # never moves
    M[:6, specs[2].offset : specs[2].offset + 30] = 0  # moves only after the fit part
    bt = solve(M, steps, specs, SolveOptions(method=method, backtest=True)).backtest
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
    bz = solve(Z, steps, specs, SolveOptions(method=method, backtest=True)).backtest
    figs = (bz.cosine_global, bz.norm_ratio_global, bz.relative_error_global, bz.direction_cosine)
    assert figs == (1.0, 1.0, 0.0, 1.0)


def test_restored_tensor_has_infinite_ratio_reported_as_none():
    steps = list(range(1, 9))
    specs, D = _specs([20])
    M = torch.zeros(8, D)
    M[:4] = torch.arange(1, 5, dtype=torch.float32)[:, None] * torch.ones(20) * 1e-3  # moved, then restored to theta_0
    bt = solve(M, steps, specs, SolveOptions(method="gram", backtest=True)).backtest
    assert math.isinf(float(bt.norm_ratio[0])) and math.isinf(float(bt.relative_error[0]))
    rep = to_report(bt)
    assert rep["tensors"][0]["norm_ratio"] is None and rep["norm_ratio_global"] is None
    json.dumps(rep, allow_nan=False)


def test_rank_r_backtests_the_rank1_component():
    steps = list(range(1, 21))
    M64, specs = _trajectory(steps, [300, 120], drift=0.3, noise=0.05, seed=6)
    one = solve(M64.float(), steps, specs, SolveOptions(method="gram", backtest=True)).backtest
    three = solve(M64.float(), steps, specs, SolveOptions(method="gram", rank=3, backtest=True)).backtest
    # the same float32 Gram and the same float64 eigh of it either way: bitwise
    for k in one.sums:
        assert torch.equal(one.sums[k], three.sums[k]), k


def _store(M64, specs, steps, K, fold_rank):
    st = TrajectoryStore([TensorSpec(s.name, s.shape, s.dtype, s.local_numel) for s in specs], K, dtype="float32",
                         storage="host", fold_rank=fold_rank)
    st.set_theta0([torch.zeros(s.local_numel) for s in specs])
    for r, t in enumerate(steps):
        st.snapshot(t, [M64[r, s.offset : s.offset + s.local_numel].float() for s in specs])
    return st


def _fold_bound(M, st, steps):
    """Bound on the global figures of the folded store's backtest against the plain float32 solve of ``M``: the folded
    trajectory ``C B`` (read back from the store, in float64) differs from ``M`` by what the folds discarded, so its
    Gram moves entry ``ij`` by ``|(M M^T - (C B)(C B)^T)_ij|`` (computed here) plus the float32 rounding of
    ``B B^T`` carried through ``C`` (``|C| gram_rounding(B) |C|^T``); the plain path adds its own ``gram_rounding(M)``.
    Returns ``(bound [4] in GLOBAL order, max relative Gram move)``."""
    inp = st.solve_inputs()
    B, Cs = inp["M"].double(), inp["left"].double()
    M = M.double()
    segs = [M[:, s.offset : s.offset + s.local_numel] for s in st.specs]
    G = torch.stack([m @ m.T for m in segs])
    base = backtest_from_gram(G, steps, True)
    base_sums = _sums(base)
    total = base_sums.sum(0)
    L = len(base.predicted_steps)
    out, worst = torch.zeros(4, dtype=torch.float64), 0.0
    for i, (sp, m) in enumerate(zip(st.specs, segs)):
        b, c = B[:, sp.offset : sp.offset + sp.local_numel], Cs[i]
        mf = c @ b
        E = (G[i] - mf @ mf.T).abs() + c.abs() @ gram_rounding(b) @ c.abs().T + gram_rounding(m)
        worst = max(worst, float(E.max() / G[i].abs().max()))

        def f(Gb, i=i):
            own = _sums(backtest_from_gram(Gb, steps, True))
            return _global(total - base_sums[i] + own, L)

        out += first_order_bound(f, G[i], E)
    return out, worst


def test_folded_store_agrees_with_unfolded():
    steps = list(range(1, 31))
    # rank-2 trajectories (line + quadratic drift, no noise): a rank-4 fold keeps them up to rounding
    M64, specs = _trajectory(steps, [200, 150], drift=0.3, seed=7)
    plain = solve(M64.float(), steps, specs, SolveOptions(method="gram", backtest=True)).backtest
    st = _store(M64, specs, steps, K=7, fold_rank=4)
    assert st.folds >= 3
    sol = solve(specs=st.specs, **st.solve_inputs(), options=SolveOptions(method="gram", backtest=True))
    assert sol.method == "gram-folded"
    fold = sol.backtest
    bound, move = _fold_bound(M64.float(), st, steps)
    assert move < 1e-5  # lossless: the folded Gram is the trajectory's up to float32 rounding
    _within([getattr(fold, k) for k in GLOBAL], [getattr(plain, k) for k in GLOBAL], bound, "folded, lossless")
    assert bool((bound < 1e-3 * torch.tensor([getattr(plain, k) for k in GLOBAL]).abs()).all()), bound
    # noisy trajectories: the fold truncates to rank 4, the figures move by what the discarded noise allows
    M64, specs = _trajectory(steps, [200, 150], drift=0.3, noise=0.05, seed=7)
    plain = solve(M64.float(), steps, specs, SolveOptions(method="gram", backtest=True)).backtest
    st = _store(M64, specs, steps, K=7, fold_rank=4)
    fold = solve(specs=st.specs, **st.solve_inputs(), options=SolveOptions(method="gram", backtest=True)).backtest
    bound, move = _fold_bound(M64.float(), st, steps)
    _within([getattr(fold, k) for k in GLOBAL], [getattr(plain, k) for k in GLOBAL], bound,
            f"folded, noise truncated (Gram moved by {move:.1e} of its largest entry)")


def test_combine_disjoint_tensor_sets_equals_the_whole():
    steps = list(range(1, 21))
    M64, specs = _trajectory(steps, [300, 50, 700, 20], drift=0.2, noise=0.05, seed=8)
    M = M64.float()
    whole = solve(M, steps, specs, SolveOptions(method="gram", backtest=True)).backtest
    parts = []
    for group in ([0, 2], [1, 3]):
        sub, o = [], 0
        cols = []
        for i in group:
            s = specs[i]
            sub.append(TensorSpec(s.name, s.shape, s.dtype, s.local_numel, offset=o))
            cols.append(M[:, s.offset : s.offset + s.local_numel])
            o += s.local_numel
        # the Gram path here: the power path's acceptance bound (tol 1e-6 on lam, 1e-5 on the fit part) is wider
        # than the difference between a part and the whole, so it could not tell them apart; the power path's
        # figures are checked against the Gram path's in test_gram_and_power_agree_including_fallbacks
        parts.append(solve(torch.cat(cols, 1), steps, sub, SolveOptions(method="gram", backtest=True)).backtest)
    merged = combine(parts)
    assert merged.names == ["t0", "t2", "t1", "t3"]
    # the same per-tensor data in another arena layout (its float32 Gram may be summed in another order): each
    # within the derived bound of the exact figures
    _, bg, _ = _bounds(M, steps, specs)
    _within([getattr(merged, k) for k in GLOBAL], [getattr(whole, k) for k in GLOBAL], 2 * bg, "combined vs whole")
    # the all-reduce form: summed totals give the combined figures (the same float64 sums, added in another order)
    total = parts[0].totals() + parts[1].totals()
    g = parts[0].with_totals(total)
    _within([getattr(g, k) for k in GLOBAL], [getattr(merged, k) for k in GLOBAL], 1e-12, "with_totals vs combine")
    assert torch.equal(g.cosine, parts[0].cosine)
    # a single part's own figures differ from the whole by far more than the bound (the test above could not pass
    # by accident)
    assert abs(parts[0].cosine_global - whole.cosine_global) > 10 * float(2 * bg[0])
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
        sol = solve(M64.float(), steps, specs, SolveOptions(backtest=fit))
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
    sol = solve(M, steps, specs, SolveOptions(method="gram", backtest=True))
    rep = sol.backtest.to_report()
    for k in ("fit_steps", "predicted_step", "cosine_global", "norm_ratio_global", "relative_error_global",
              "direction_cosine", "tensors", "by_step"):
        assert k in rep
    assert [t["name"] for t in rep["tensors"]] == ["t0", "t1"]
    assert rep["by_step"]["steps"] == list(range(9, 17)) and rep["by_step"]["cosine"][-1] == rep["cosine_global"]
    json.loads(json.dumps(rep, allow_nan=False))
    logs = sol.backtest.log_metrics()
    assert logs["relex/backtest/cosine_global"] == rep["cosine_global"]
    assert logs["relex/backtest/direction_drift"] == 1.0 - rep["direction_cosine"]  # the same float64 (was 1e-15)
    assert set(logs) == {"relex/backtest/cosine_global", "relex/backtest/norm_ratio_global",
                         "relex/backtest/relative_error_global", "relex/backtest/direction_drift"}
    # the pure function on stacked Grams gives the solve's figures
    segs = [M.double()[:, s.offset : s.offset + s.local_numel] for s in specs]
    G = torch.stack([m @ m.T for m in segs])
    bt = backtest_from_gram(G, steps, True, names=["t0", "t1"])
    # bt: exact (float64 Grams); the solve's: float32 Grams, within the derived bound
    _, b_glob, _ = _bounds(M, steps, specs)
    _within([getattr(sol.backtest, k) for k in GLOBAL], [getattr(bt, k) for k in GLOBAL], b_glob, "solve vs pure")
