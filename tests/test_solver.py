"""The solver (both methods) against ``torch.linalg.svd`` in float64, and the OLS fit against a direct computation."""

import math

import pytest
import torch

from relex_callback.core.solver import CPU_GRAM_MAX_STEPS, SolveOptions, solve

from helpers import U32, arena_specs, direction_tolerance

METHODS = ["gram", "power"]


_specs = arena_specs


def _trajectory(T, sizes, kind, seed=0, steps=None):
    """float64 ``[T, D]``: ``near1`` = (a t + b) v + 1% noise per segment, ``random`` = Gaussian."""
    g = torch.Generator().manual_seed(seed)
    specs, D = _specs(sizes)
    steps = steps or [3 * (k + 1) for k in range(T)]
    M = torch.empty(T, D, dtype=torch.float64)
    for sp in specs:
        n = sp.local_numel
        if kind == "random":
            M[:, sp.offset : sp.offset + n] = torch.randn(T, n, generator=g, dtype=torch.float64) * 1e-3
        else:
            v = torch.randn(n, generator=g, dtype=torch.float64)
            v /= v.norm()
            a, b = 1e-3 * (1 + float(torch.rand(1, generator=g))), 2e-3 * float(torch.randn(1, generator=g))
            c = torch.tensor([a * t + b for t in steps], dtype=torch.float64)
            noise = torch.randn(T, n, generator=g, dtype=torch.float64) * (0.01 * c.abs().max() / math.sqrt(n))
            M[:, sp.offset : sp.offset + n] = c[:, None] * v[None, :] + noise
    return M, steps, specs


def _svd_reference(M64, steps, spec, rank=1, fit_start=None):
    """float64 truth for one segment: per component (sigma, v with the solver's sign convention, slope, intercept)."""
    m = M64[:, spec.offset : spec.offset + spec.local_numel]
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    t = torch.tensor(steps, dtype=torch.float64)
    keep = t >= (fit_start if fit_start is not None else -math.inf)
    out = []
    for k in range(rank):
        c = S[k] * U[:, k]
        v = Vh[k]
        if c[-1] < 0:
            c, v = -c, -v
        A = torch.stack([t[keep], torch.ones_like(t[keep])], 1)
        a, b = torch.linalg.lstsq(A, c[keep][:, None]).solution[:, 0]
        out.append((float(S[k]), v, float(a), float(b), c))
    return out


def _bounds(M64, steps, spec, rank, fit_start, solver_tol):
    """Per component k, what the float32 solve guarantees against the float64 SVD of the same (float32) data
    (tests/helpers.py, "tolerances derived from the math"): ||dG|| <= sqrt(n) u ||M||_F^2 for the float32 Gram;
    the direction turns by theta_k <= ||dG|| / gap_k (+ the power path's own acceptance ``solver_tol``), so
    1 - cos <= theta_k^2 / 2; |d sigma_k| <= ||dG|| / (2 sigma_k) + solver_tol sigma_1 (|d lambda| <= ||dG||);
    the coefficients c_k = sigma_k u_k move by ||dc|| <= |d sigma_k| + sigma_k theta_k, and the line's slope and
    intercept by at most the norm of the matching row of pinv(X) times that. A few u more for rounding v, sigma and
    the fit to float32."""
    m = M64[:, spec.offset : spec.offset + spec.local_numel]
    T, n = m.shape
    S = torch.linalg.svdvals(m)
    s = [float(x) for x in S] + [0.0] * max(0, T - len(S))
    dG = math.sqrt(n) * U32 * sum(x * x for x in s)
    t = torch.tensor(steps, dtype=torch.float64)
    keep = t >= (fit_start if fit_start is not None else -math.inf)
    P = torch.linalg.pinv(torch.stack([t[keep], torch.ones_like(t[keep])], 1))
    ka, kb = float(P[0].norm()), float(P[1].norm())
    out = []
    for k in range(rank):
        gap = min(abs(s[k] ** 2 - s[j] ** 2) for j in range(len(s)) if j != k) if len(s) > 1 else s[0] ** 2
        theta = min(1.0, dG / gap + solver_tol + 8 * U32) if gap > 0 else 1.0
        dsig = (dG / (2 * s[k]) if s[k] > 0 else math.sqrt(dG)) + (solver_tol + 8 * U32) * s[0]
        dc = dsig + s[k] * theta
        out.append({"cos_min": 1 - theta**2 / 2 - 8 * U32, "sigma": dsig, "slope": ka * dc + 8 * U32 * s[0],
                    "intercept": kb * dc + 8 * U32 * s[0]})
    return out


def _check(sol, M64, steps, specs, *, rank=1, fit_start=None, solver_tol=1e-6):
    """The solver's result against the float64 SVD of the same data, each figure to its derived bound
    (:func:`_bounds`); ``solver_tol``: the power path's acceptance tolerance (``SolveOptions(tol=1e-6)``), 0 suffices
    for
    the Gram path."""
    for i, sp in enumerate(specs):
        ref = _svd_reference(M64, steps, sp, rank, fit_start)
        bounds = _bounds(M64, steps, sp, rank, fit_start, solver_tol if sol.method == "power" else 0.0)
        for k, ((s, v, a, b, c), bd) in enumerate(zip(ref, bounds)):
            vk = sol.direction(i)[k].double()
            cos = float(vk @ v) / max(float(vk.norm()), 1e-300)
            assert cos >= bd["cos_min"], (sp.name, k, cos, bd)
            assert abs(float(sol.sigma[i, k]) - s) <= bd["sigma"], (sp.name, k, float(sol.sigma[i, k]), s, bd)
            da, db = abs(float(sol.slope[i, k]) - a), abs(float(sol.intercept[i, k]) - b)
            assert da <= bd["slope"], (sp.name, k, a, da, bd)
            assert db <= bd["intercept"], (sp.name, k, b, db, bd)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["near1", "random"])
def test_matches_float64_svd_fp32_storage(method, kind):
    M64, steps, specs = _trajectory(12, [1, 7, 300, 2000], kind, seed=1)
    sol = solve(M64.float(), steps, specs, SolveOptions(method=method))
    assert sol.method == method
    assert all(torch.isfinite(x).all() for x in (sol.sigma, sol.slope, sol.intercept, sol.r2, sol.V.float()))
    # a 1-column segment is exactly rank 1: the check holds for it too
    _check(sol, M64.float().double(), steps, specs)


@pytest.mark.parametrize("method", METHODS)
def test_power_falls_back_on_random_data_and_agrees_with_gram(method):
    M64, steps, specs = _trajectory(30, [500, 800], "random", seed=2)
    a = solve(M64.float(), steps, specs, SolveOptions(method="gram"))
    b = solve(M64.float(), steps, specs, SolveOptions(method=method, max_iter=3))
    if method == "power":
        # flat spectrum: 3 Krylov steps are not enough, the Gram path finishes the job for every segment
        assert b.fallbacks == len(specs)
    # every segment then goes through the Gram path's own code on the same buffer: the same arithmetic, bitwise
    # (was rtol 1e-6)
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.V, b.V)
    # the report's figures of a fallen-back segment: the squared norms, sums of float32 products in either path
    # (the Gram's diagonal, the power pass's row norms), each within sqrt(n) u of the exact sums (was rtol 1e-6)
    M = M64.float().double()
    for i, sp in enumerate(specs):
        m = M[:, sp.offset : sp.offset + sp.local_numel]
        e = 2 * math.sqrt(sp.local_numel) * U32
        assert abs(float(a.total[i] - b.total[i])) <= e * float((m ** 2).sum())
        assert abs(float(a.last_sq[i] - b.last_sq[i])) <= e * float((m[-1] ** 2).sum())


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_segments_give_theta0(method):
    M64, steps, specs = _trajectory(6, [40, 50, 9], "near1", seed=3)
    M = M64.float()
    M[:, specs[1].offset : specs[1].offset + 50] = 0
    M[:, specs[2].offset : specs[2].offset + 9] = 0
    sol = solve(M, steps, specs, SolveOptions(method=method))
    for i in (1, 2):
        assert float(sol.sigma[i, 0]) == 0.0
        assert float(sol.slope[i, 0]) == 0.0 and float(sol.intercept[i, 0]) == 0.0
        assert (sol.direction(i) == 0).all()
        theta0 = torch.randn(specs[i].local_numel)
        out = sol.extrapolate(i, 1000, theta0)
        assert torch.equal(out, theta0)
        assert float(sol.explained[i]) == 1.0 and float(sol.r2[i, 0]) == 1.0
    for x in (sol.sigma, sol.slope, sol.intercept, sol.r2, sol.explained, sol.V.float(), sol.coeffs):
        assert torch.isfinite(x).all()
    # the moving segment is unaffected by its zero neighbours
    _check(sol, M.double(), steps, specs[:1])


@pytest.mark.parametrize("method", METHODS)
def test_movement_only_in_early_rows(method):
    """A tensor that moved in the first steps and then stopped: the last delta is still the total movement, but a
    segment whose later rows are exactly zero (moved, then restored) must also work (warm start e_T is useless)."""
    T, n = 10, 64
    steps = list(range(1, T + 1))
    specs, D = _specs([n, n])
    g = torch.Generator().manual_seed(4)
    M = torch.zeros(T, D)
    v = torch.randn(n, generator=g)
    M[:3, :n] = torch.tensor([1.0, 2.0, 3.0])[:, None] * v * 1e-3  # later rows zero
    M[:3, n:] = torch.randn(3, n, generator=g) * 1e-3
    sol = solve(M, steps, specs, SolveOptions(method=method))
    assert torch.isfinite(sol.V.float()).all() and torch.isfinite(sol.slope).all()
    _check(sol, M.double(), steps, specs)


def test_rank_r_components_each_fitted():
    T, sizes = 10, [200, 333]
    g = torch.Generator().manual_seed(5)
    specs, D = _specs(sizes)
    steps = list(range(2, 2 * T + 1, 2))
    M = torch.zeros(T, D, dtype=torch.float64)
    for sp in specs:
        n = sp.local_numel
        Q, _ = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))
        t = torch.tensor(steps, dtype=torch.float64)
        C = torch.stack([5e-3 * t + 0.01, 3e-3 * t - 0.003, 2e-2 * torch.sin(t)], 1)
        M[:, sp.offset : sp.offset + n] = C @ Q.T + torch.randn(T, n, generator=g, dtype=torch.float64) * 1e-6
    for method in METHODS:  # power falls back to gram for rank > 1
        sol = solve(M.float(), steps, specs, SolveOptions(rank=3, method=method))
        assert sol.method == "gram" and sol.V.shape == (3, D)
        _check(sol, M.float().double(), steps, specs, rank=3)
        assert (sol.explained_rank >= sol.explained).all()


@pytest.mark.parametrize("method", METHODS)
def test_fit_start(method):
    M64, steps, specs = _trajectory(15, [120, 50], "near1", seed=6)
    sol = solve(M64.float(), steps, specs, SolveOptions(method=method, fit_start=steps[5]))
    _check(sol, M64.float().double(), steps, specs, fit_start=steps[5])
    full = solve(M64.float(), steps, specs, SolveOptions(method=method))
    assert not torch.allclose(sol.slope, full.slope, rtol=1e-9)
    with pytest.raises(ValueError, match="fit_start"):
        solve(M64.float(), steps, specs, SolveOptions(fit_start=steps[-1]))


@pytest.mark.parametrize("method", METHODS)
def test_explained_variance_and_r2_direct(method):
    M64, steps, specs = _trajectory(9, [80, 31], "near1", seed=7)
    M = M64.float()
    sol = solve(M, steps, specs, SolveOptions(method=method))
    t = torch.tensor(steps, dtype=torch.float64)
    for i, sp in enumerate(specs):
        m = M.double()[:, sp.offset : sp.offset + sp.local_numel]
        S = torch.linalg.svdvals(m)
        # (was 1e-6 each) the Gram (or the power pass's sums) within sqrt(n) u ||M||_F^2 (tests/helpers.py): the
        # total within that; lam_1 within it too (Weyl) and, on the power path, within tol lam_1 (its acceptance);
        # explained = lam_1 / total within (||dG|| + tol lam_1 + explained d_total) / total; |m_T| from a float32
        # sum of squares: sqrt(n) u / 2 relative, plus its square root's rounding
        total = float((m**2).sum())
        dG = math.sqrt(sp.local_numel) * U32 * total
        expl = float(S[0] ** 2) / total
        tol = 1e-6 if method == "power" else 0.0
        assert abs(float(sol.explained[i]) - expl) <= (dG + tol * float(S[0] ** 2) + expl * dG) / total * (1 + 1e-9)
        assert abs(float(sol.total[i]) - total) <= dG
        assert abs(float(sol.delta_norm[i]) - float(m[-1].norm())) <= (dG / total / 2 + 2 * U32) * float(m[-1].norm())
        c = sol.coeffs[i, 0]
        pred = sol.slope[i, 0] * t + sol.intercept[i, 0]
        r2 = 1 - float(((c - pred) ** 2).sum() / ((c - c.mean()) ** 2).sum())
        assert abs(float(sol.r2[i, 0]) - r2) < 1e-9
        # c_t = <Delta_t, v> (was rtol 1e-5): c = s u from the Gram's eigenpair, v = M^T u / s from the float32
        # direction pass (T-term sums: within 2 T u ||M||_F / s, + 4u for the normalisation); m_t . M^T u / s =
        # (G u)_t / s equals s u_t for the exact Gram, and the computed one is off by ||dG|| / s (+ tol s, power)
        s1 = float(S[0])
        v_err = 2 * len(steps) * U32 * math.sqrt(total) / s1 + 4 * U32
        bound = m.norm(dim=1) * v_err + (dG + tol * s1 * s1) / s1
        err = (c - m @ sol.direction(i)[0].double()).abs()
        assert bool((err <= bound).all()), (err, bound)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_near_rank1(method, dtype):
    M64, steps, specs = _trajectory(20, [3000, 257], "near1", seed=8)
    M = M64.to(dtype)
    sol = solve(M, steps, specs, SolveOptions(method=method))
    assert sol.V.dtype == dtype
    for i, sp in enumerate(specs):
        _, Vh = torch.linalg.svd(M64[:, sp.offset : sp.offset + sp.local_numel], full_matrices=False)[1:]
        v = sol.direction(i)[0].double()
        assert float((v @ Vh[0]).abs() / v.norm()) >= 0.999


@pytest.mark.parametrize("method", METHODS)
def test_extrapolate_is_the_formula(method):
    M64, steps, specs = _trajectory(8, [100], "near1", seed=9)
    sol = solve(M64.float(), steps, specs, SolveOptions(method=method))
    theta0 = torch.randn(100)
    H = 500
    coef = float(sol.slope[0, 0]) * H + float(sol.intercept[0, 0])
    step = coef * sol.direction(0)[0].double()
    expect = theta0.double() + step
    # (was atol 1e-6) float32 arithmetic: the coefficient rounded to float32, its product with v and the sum each
    # round once: |got - expect| <= u |expect| (1 + u) + 2u |coef v| (1 + u)
    got = sol.extrapolate(0, H, theta0).double()
    assert bool(((got - expect).abs() <= (U32 * expect.abs() + 2 * U32 * step.abs()) * (1 + U32)).all())
    assert float(step.abs().max()) > 1e3 * U32 * float(expect.abs().max())  # the step is not lost in the rounding


def test_bad_inputs():
    M64, steps, specs = _trajectory(4, [10], "near1")
    with pytest.raises(ValueError, match="steps"):
        solve(M64.float(), steps[:-1], specs)
    with pytest.raises(ValueError, match="method"):
        solve(M64.float(), steps, specs, SolveOptions(method="svd"))
    with pytest.raises(ValueError, match="two"):
        solve(M64.float()[:1], steps[:1], specs)


def test_auto_dispatch():
    M64, steps, specs = _trajectory(CPU_GRAM_MAX_STEPS + 2, [30, 20], "near1", seed=10)
    sol = solve(M64.float(), steps, specs)
    assert sol.method == "power"  # CPU, rank 1, many steps (docs/architecture.md, "Solver figures")
    few = M64[: CPU_GRAM_MAX_STEPS]
    assert solve(few.float(), steps[: CPU_GRAM_MAX_STEPS], specs).method == "gram"  # small T: T^2 n is cheaper
    assert solve(M64.float(), steps, specs, SolveOptions(rank=2)).method == "gram"
    assert solve(M64.float(), steps, specs, reduce=lambda G: G).method == "gram"  # distributed: Grams all-reduced
    _check(sol, M64.float().double(), steps, specs)
    # bytes read: power = its passes + the direction pass; gram = exactly two reads of the buffer
    gram = solve(M64.float(), steps, specs, SolveOptions(method="gram"))
    assert gram.bytes_read == 2 * M64.shape[0] * M64.shape[1] * 4
    assert sol.bytes_read > gram.bytes_read


def test_direction_tolerance_holds_and_catches_a_planted_error():
    """helpers.direction_tolerance (used by test_callback's resume check): the float32 solve's direction within it of
    the float64 SVD's, the bound small enough that a 1e-3 turn of the direction fails it."""
    M64, steps, specs = _trajectory(12, [300, 2000], "near1", seed=3)
    sol = solve(M64.float(), steps, specs, SolveOptions(method="gram"))
    M = M64.float().double()
    for i, sp in enumerate(specs):
        m = M[:, sp.offset : sp.offset + sp.local_numel]
        v64 = torch.linalg.svd(m, full_matrices=False)[2][0]
        v = sol.direction(i)[0].double()
        tol = direction_tolerance(m)
        err = min(float((v - v64).norm()), float((v + v64).norm()))
        print(f"direction {sp.name}: error {err:.1e}, bound {tol:.1e}")
        assert err <= tol < 1e-3, (sp.name, err, tol)
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        w -= (w @ v) * v
        planted = v + 1e-3 * w / w.norm()  # turned by 1e-3
        assert min(float((planted - v64).norm()), float((planted + v64).norm())) > tol


def test_extrapolate_piece_is_the_widened_sum():
    """theta_0 + sum_k c_k v_k: bit for bit the float32 copy of theta_0 with each direction added in turn (what every
    horizon file holds), whatever theta_0's and the directions' dtypes, the rank, and zero coefficients (none, some,
    all)."""
    from relex_callback.core.solver import extrapolate_piece

    g = torch.Generator().manual_seed(0)
    for th_dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for v_dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for coefs in ([0.37], [0.0], [1.5, -0.25], [0.0, 2.0], [0.0, 0.0], [3.0, 0.0, -1e-3]):
                n = 1 + int(torch.randint(3000, (1,), generator=g))
                theta0 = torch.randn(n, generator=g).to(th_dt)
                V = torch.randn(len(coefs), n, generator=g).to(v_dt)
                want = theta0.to(torch.float32, copy=True)
                for k, c in enumerate(torch.tensor(coefs).tolist()):  # the coefficients as the solution holds them
                    if c:
                        want.add_(V[k], alpha=c)
                for out_dt in (torch.float32, th_dt):
                    got = extrapolate_piece(theta0, torch.tensor(coefs), V, out_dt)
                    assert got.dtype == out_dt and torch.equal(got, want.to(out_dt)), (th_dt, v_dt, coefs, out_dt)
                    assert got.data_ptr() != theta0.data_ptr()  # never theta_0's own memory
