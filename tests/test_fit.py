"""Fit families (linear, power, log, polynomial, sliding window) and the in-window backtest that chooses one."""

import json
import math

import pytest
import torch

from relex_callback.errors import RelexInputError
from relex_callback.core.fit import _pick, AUTO_FAMILIES, FAMILIES, Fit, fit, fit_each, fit_lines, select_family

STEPS = torch.arange(1, 41, dtype=torch.float64)  # real step numbers 1..40


def _curve(kind, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return {
        "linear": 0.3 * t + 0.7,
        "power0.5": 2.0 * t**0.5 - 1.0,
        "power1.2": 0.05 * t**1.2 + 0.4,
        "log": 1.5 * torch.log(t) + 0.2,
        "poly2": 0.01 * t**2 - 0.3 * t + 2.0,
    }[kind]


FAMILY_OF = {"linear": "linear", "power0.5": "power", "power1.2": "power", "log": "log", "poly2": "polynomial"}


def test_linear_is_fit_lines():
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(7, 2, 40, generator=g, dtype=torch.float64) + 0.1 * STEPS
    mask = STEPS >= 5
    slope, intercept, r2 = fit_lines(coeffs, STEPS, mask)
    f = fit(coeffs, STEPS, mask)
    assert f.family == "linear" and f.params.shape == (7, 2, 2)
    assert torch.equal(f.params[..., 0], slope) and torch.equal(f.params[..., 1], intercept)
    assert torch.equal(f.r2, r2)
    assert torch.equal(f.coef_at(500), slope * 500.0 + intercept)  # what Solution.coef_at computes
    assert f.steps == tuple(range(5, 41))


@pytest.mark.parametrize("kind", ["linear", "power0.5", "power1.2", "log", "poly2"])
def test_exact_recovery(kind):
    fam = FAMILY_OF[kind]
    c = torch.stack([_curve(kind, STEPS), 3.0 * _curve(kind, STEPS), -_curve(kind, STEPS)])  # [3, T]
    f = fit(c, STEPS, family=fam, degree=2)
    for H in (40.0, 500.0, 1000.0):
        want = torch.stack([_curve(kind, H), 3.0 * _curve(kind, H), -_curve(kind, H)])
        assert torch.allclose(f.coef_at(H), want, rtol=1e-9, atol=1e-9), (kind, H, f.coef_at(H), want)
    assert torch.allclose(f.r2, torch.ones(3, dtype=torch.float64), atol=1e-12)
    if kind.startswith("power"):
        assert torch.allclose(f.params[:, 1], torch.full((3,), float(kind[5:]), dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("fam", FAMILIES)
def test_sliding_window_fits_only_the_last_steps(fam):
    # The last 15 steps follow the family's curve exactly; the earlier ones are far off it.
    kind = {"linear": "linear", "power": "power0.5", "log": "log", "polynomial": "poly2"}[fam]
    c = _curve(kind, STEPS).clone()
    c[:25] += torch.linspace(5.0, -3.0, 25, dtype=torch.float64) ** 2
    f = fit(c, STEPS, family=fam, fit_window=15)
    assert f.steps == tuple(range(26, 41)) and f.fit_window == 15
    assert torch.allclose(f.coef_at(600.0), _curve(kind, 600.0), rtol=1e-9)
    full = fit(c, STEPS, family=fam)  # without the window the early points spoil the fit
    assert not torch.allclose(full.coef_at(600.0), _curve(kind, 600.0), rtol=1e-3)


@pytest.mark.parametrize("fam", FAMILIES)
def test_flat_and_zero_coefficients(fam):
    c = torch.zeros(4, 2, 40, dtype=torch.float64)
    c[1] = 2.5  # constant, non-zero
    c[2, 1] = 1e-30  # tiny constant
    f = fit(c, STEPS, family=fam, degree=3)
    for H in (1.0, 40.0, 750.0):
        out = f.coef_at(H)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(2, dtype=torch.float64))  # never moved: theta_0 exactly
        assert torch.allclose(out[1], torch.full((2,), 2.5, dtype=torch.float64), rtol=1e-12)
    assert torch.isfinite(f.params).all()
    assert torch.equal(f.r2, torch.ones_like(f.r2))


@pytest.mark.parametrize("fam", ["linear", "power", "log"])
def test_monotone_families_extrapolate_monotonically(fam):
    g = torch.Generator().manual_seed(1)
    base = torch.stack([_curve(k, STEPS) for k in ("linear", "power0.5", "log", "power1.2")])
    c = base * (1 + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64))
    f = fit(c, STEPS, family=fam)
    H = torch.linspace(1, 2000, 400, dtype=torch.float64)
    d = f.coef_at_steps(H).diff(dim=-1)
    assert bool(((d >= 0).all(-1) | (d <= 0).all(-1)).all())
    assert bool((f.coef_at(2000.0) > f.coef_at(40.0)).all())  # increasing data, increasing extrapolation


def test_polynomial_uses_real_steps_and_scaling():
    steps = torch.tensor([1000.0, 1010.0, 1020.0, 1030.0, 1040.0], dtype=torch.float64)  # badly scaled raw powers
    c = 1e-6 * (steps - 1000.0) ** 3 + 2.0
    f = fit(c, steps, family="polynomial", degree=3)
    assert abs(float(f.coef_at(1100.0)) - (1e-6 * 100.0**3 + 2.0)) < 1e-10


def test_leading_dims_and_mixed_fit():
    kinds = ["linear", "power0.5", "log", "poly2"]
    c = torch.stack([torch.stack([_curve(k, STEPS), 2 * _curve(k, STEPS)]) for k in kinds])  # [4, 2, T]
    choice = torch.tensor([FAMILIES.index(FAMILY_OF[k]) for k in kinds])  # [S]: one family per tensor
    f = fit_each(c, STEPS, None, FAMILIES, choice, degree=2)
    assert f.family == "mixed" and f.params.shape == (4, 2, 3)
    want = torch.stack([torch.stack([_curve(k, 700.0), 2 * _curve(k, 700.0)]) for k in kinds])
    assert torch.allclose(f.coef_at(700.0), want, rtol=1e-9)
    assert torch.allclose(f.coef_at_steps([700.0, 800.0])[..., 0], want, rtol=1e-9)
    assert f.families()[1] == ["power", "power"]


def test_json_round_trip_and_legacy():
    kinds = ["linear", "power0.5", "log"]
    c = torch.stack([_curve(k, STEPS) for k in kinds]).unsqueeze(1)  # [3, 1, T]
    for f in [fit(c, STEPS, family="power", fit_window=30), fit(c, STEPS, family="polynomial", degree=2),
              fit_each(c, STEPS, None, AUTO_FAMILIES, torch.tensor([0, 1, 2]))]:
        back = Fit.from_json(f.to_json())
        assert back.family == f.family and back.steps == f.steps and back.fit_window == f.fit_window
        assert torch.equal(back.coef_at(500.0), f.coef_at(500.0))
        # per-tensor records (as a state file keeps them), stacked back
        per = Fit.stack([Fit.from_json(f[i].to_json()) for i in range(3)])
        assert per.family == f.family and torch.equal(per.coef_at(500.0), f.coef_at(500.0))
    # an older state records slope, intercept and r2 per tensor: loads as a line
    old = Fit.from_json({"slope": [0.5, 0.1], "intercept": [1.0, 0.0], "r2": [0.9, 0.8]}, steps=[1, 2, 3])
    assert old.family == "linear" and old.steps == (1, 2, 3)
    assert torch.equal(old.coef_at(10.0), torch.tensor([6.0, 1.0], dtype=torch.float64))
    with pytest.raises(RelexInputError, match="upgrade"):
        Fit.from_json({"family": "spline", "params": [1.0], "r2": 1.0})


def _trajectory(kinds, noise, n=300, seed=0, steps=STEPS):
    """Deltas ``Delta_t = c_i(t) v_i + noise`` for one tensor per kind; returns the backtest inputs computed by
    brute force from each M: coefficients on the first part's top direction v_P, ||Delta_t||^2, and the Ms."""
    g = torch.Generator().manual_seed(seed)
    part = steps <= steps.max() / 2
    coeffs, sq, Ms, vPs = [], [], [], []
    for k in kinds:
        v = torch.randn(n, generator=g, dtype=torch.float64)
        v /= v.norm()
        c = _curve(k, steps)
        M = c.unsqueeze(1) * v + noise * c.abs().mean() / math.sqrt(n) * torch.randn(len(steps), n, generator=g,
                                                                                   dtype=torch.float64)
        vP = torch.linalg.svd(M[part], full_matrices=False).Vh[0]
        vP = vP * torch.sign(M[part].sum(0) @ vP)
        coeffs.append(M @ vP)
        sq.append((M * M).sum(1))
        Ms.append(M)
        vPs.append(vP)
    return torch.stack(coeffs), torch.stack(sq), part, ~part, Ms, vPs


def test_backtest_error_matches_brute_force():
    kinds = ["power0.5", "log"]
    coeffs, sq, part, later, Ms, vPs = _trajectory(kinds, noise=0.2)
    sel = select_family(coeffs, sq, STEPS, part, later, families=("linear", "power"))
    for j, fam in enumerate(("linear", "power")):
        fp = fit(coeffs, STEPS, part, fam)
        num = den = 0.0
        for i, M in enumerate(Ms):
            ch = fp.coef_at_steps(STEPS[later])[i]
            pred = ch.unsqueeze(1) * vPs[i]
            e = ((pred - M[later]) ** 2).sum()
            d = (M[later] ** 2).sum()
            assert abs(float(sel.tensor_scores[i, j]) - math.sqrt(e / d)) < 1e-10
            num, den = num + e, den + d
        assert abs(float(sel.scores[j]) - math.sqrt(num / den)) < 1e-10


@pytest.mark.parametrize("kind,noise", [("linear", 0.0), ("linear", 1e-3), ("power0.5", 0.0), ("power0.5", 1e-3),
                                        ("log", 1e-3)])
def test_auto_chooses_the_generating_family(kind, noise):
    # noise 0 on a line: power fits it too (p = 1 to round-off), the tie goes to the earlier family, linear
    coeffs, sq, part, later, _, _ = _trajectory([kind] * 4, noise=noise, seed=3)
    sel = select_family(coeffs, sq, STEPS, part, later)
    assert sel.choice == FAMILY_OF[kind], sel.to_json()
    assert [sel.families[i] for i in sel.tensor_choice.tolist()] == [FAMILY_OF[kind]] * 4
    f = sel.refit(coeffs, STEPS)
    assert f.family == FAMILY_OF[kind]


def test_auto_per_tensor_on_mixed_trajectories():
    kinds = ["linear", "power0.5", "log", "linear", "power0.5"]
    coeffs, sq, part, later, _, _ = _trajectory(kinds, noise=1e-3, seed=4)
    sel = select_family(coeffs, sq, STEPS, part, later, per_tensor=True)
    assert [sel.families[i] for i in sel.tensor_choice.tolist()] == [FAMILY_OF[k] for k in kinds]
    f = sel.refit(coeffs, STEPS)
    assert f.family == "mixed" and f.families() == [FAMILY_OF[k] for k in kinds]


def test_auto_with_a_tensor_that_never_moved():
    coeffs, sq, part, later, _, _ = _trajectory(["power0.5", "power0.5"], noise=1e-3)
    coeffs = torch.cat([coeffs, torch.zeros(1, 40, dtype=torch.float64)])
    sq = torch.cat([sq, torch.zeros(1, 40, dtype=torch.float64)])
    sel = select_family(coeffs, sq, STEPS, part, later, families=FAMILIES)
    assert torch.isfinite(sel.scores).all() and torch.isfinite(sel.tensor_scores).all()
    assert torch.equal(sel.tensor_scores[2], torch.zeros(4, dtype=torch.float64))
    assert sel.choice == "power"
    assert torch.equal(sel.refit(coeffs, STEPS).coef_at(500.0)[2], torch.tensor(0.0, dtype=torch.float64))


def test_argument_errors():
    c = torch.ones(2, 40, dtype=torch.float64)
    with pytest.raises(RelexInputError, match="unknown fit family 'spline'"):
        fit(c, STEPS, family="spline")
    with pytest.raises(RelexInputError, match="degree must be an integer >= 1"):
        fit(c, STEPS, family="polynomial", degree=0)
    with pytest.raises(RelexInputError, match="polynomial degree 5 needs more than 5"):
        fit(c, STEPS, family="polynomial", degree=5, fit_window=5)
    for w in (1, 41):
        with pytest.raises(RelexInputError, match="fit_window"):
            fit(c, STEPS, fit_window=w)
    with pytest.raises(RelexInputError, match="fit_window"):
        fit(c, STEPS, STEPS > 30, fit_window=11)  # only 10 steps allowed by the mask
    with pytest.raises(RelexInputError, match="step numbers > 0"):
        fit(torch.ones(1, 3), [0, 1, 2], family="log")
    with pytest.raises(RelexInputError, match="at least 3"):
        fit(torch.ones(1, 2), [1, 2], family="power")
    with pytest.raises(RelexInputError, match="positive horizon"):
        fit(c, STEPS, family="power").coef_at(0)
    with pytest.raises(RelexInputError, match="one step per column"):
        fit(c, STEPS[:-1])
    with pytest.raises(RelexInputError, match="later_mask selects no step"):
        select_family(c, c, STEPS, STEPS <= 20, torch.zeros(40, dtype=torch.bool))
    with pytest.raises(RelexInputError, match="unknown fit family"):
        select_family(c, c, STEPS, STEPS <= 20, STEPS > 20, families=("linear", "auto"))
    # a candidate that cannot be fitted on a short first part is dropped (never chosen, the reason kept) ...
    sel = select_family(c, c, STEPS, STEPS <= 2, STEPS > 2)
    assert sel.choice != "power" and not math.isfinite(float(sel.scores[sel.families.index("power")]))
    assert "2 steps" in sel.skipped["power"] and sel.to_json()["scores"]["power"] is None
    json.dumps(sel.to_json(), allow_nan=False)
    # ... and only when no candidate can be fitted is it an error
    with pytest.raises(RelexInputError, match="no candidate family can be fitted.*power.*2 steps"):
        select_family(c, c, STEPS, STEPS <= 2, STEPS > 2, families=("power",))


def test_empty_batch():
    for fam in FAMILIES:
        f = fit(torch.zeros(0, 2, 40), STEPS, family=fam)
        assert f.params.shape[:2] == (0, 2) and f.coef_at(100.0).shape == (0, 2)


def test_margin_keeps_the_line_on_noisy_lines():
    # A noisy line: power (p near 1) and log can win the backtest by a hair on some tensors; a margin keeps the
    # line unless another family predicts clearly better. The default (0) is the plain argmin.
    coeffs, sq, part, later, _, _ = _trajectory(["linear"] * 16, noise=0.1, seed=5)
    plain = select_family(coeffs, sq, STEPS, part, later)
    kept = select_family(coeffs, sq, STEPS, part, later, margin=0.05)
    assert torch.equal(plain.tensor_scores, kept.tensor_scores)
    assert bool((plain.tensor_choice != 0).any())  # the argmin strays on some tensors...
    assert bool((kept.tensor_choice == 0).all()) and kept.choice == "linear"  # ...the margin does not
    # the margin only protects the first family: between the others the best still wins
    s = torch.tensor([[1.0, 0.5, 0.49], [1.0, 0.97, 0.99], [1.0, 0.5, 0.5]], dtype=torch.float64)
    coeffs2, sq2, part2, later2, _, _ = _trajectory(["log"] * 2, noise=1e-3, seed=6)
    sel = select_family(coeffs2, sq2, STEPS, part2, later2, margin=0.5)
    assert sel.choice == "log"  # log beats the line by far more than 50%; power, earlier, is not preferred to it

    assert _pick(s, 1e-6, 0.05).tolist() == [2, 0, 1]


def test_power_fit_is_the_least_squares_optimum_over_p():
    # Noisy curves (optimum inside the range or on its bounds): the fitted p beats every p of a dense grid.
    g = torch.Generator().manual_seed(7)
    p_true = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.3, 2.0], dtype=torch.float64)
    c = STEPS ** p_true.unsqueeze(1) * (1 + 0.05 * torch.randn(6, 40, generator=g, dtype=torch.float64))
    f = fit(c, STEPS, family="power")
    sse = ((c - f.coef_at_steps(STEPS)) ** 2).sum(-1)
    grid = torch.linspace(0.2, 1.5, 2601, dtype=torch.float64)
    X = STEPS ** grid.unsqueeze(1)  # [G, T]
    dX = X - X.mean(-1, keepdim=True)
    dc = c - c.mean(-1, keepdim=True)
    best = ((dc * dc).sum(-1, keepdim=True) - (dc @ dX.T) ** 2 / (dX * dX).sum(-1)).min(-1).values
    assert bool((sse <= best * (1 + 1e-9) + 1e-12).all()), (sse, best)
    assert bool(((f.params[:, 1] >= 0.2) & (f.params[:, 1] <= 1.5)).all())
    assert abs(float(f.params[0, 1]) - 0.2) < 1e-9 and abs(float(f.params[-1, 1]) - 1.5) < 1e-9  # on the bounds
