"""Streaming fold (relex_callback.core.fold): a ring smaller than the window gives the same extrapolation as the exact
path, within the bf16/rank-r truncation, and its memory does not grow with tcut."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.errors import RelexInputError, RelexMemoryError
from relex_callback.config import RelexSettings
from relex_callback.core.fold import plan_slots
from relex_callback.params import TensorSpec
from relex_callback.core.solver import SolveOptions, solve
from relex_callback import RelexCallback
from relex_callback.examples.toy import build_model

from grpo import grpo_trainer
from helpers import extrapolation_tolerance, gram_rounding
from safetensors.torch import load_file
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _specs():
    return [
        TensorSpec("w", (48, 40), torch.float32, 48 * 40),
        TensorSpec("b", (333,), torch.float32, 333),
        TensorSpec("frozen", (17,), torch.float32, 17),
    ]


def _trajectory(T, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = _specs()
    theta0 = [torch.randn(s.local_numel, generator=g) for s in specs]
    v = [torch.randn(s.local_numel, generator=g) for s in specs]
    snaps = []
    for t in range(1, T + 1):
        row = []
        for i, s in enumerate(specs):
            if s.name == "frozen":
                row.append(theta0[i].clone())
            else:
                row.append(
                    theta0[i] + (0.01 * t + 0.03) * v[i] + 0.01 * noise * torch.randn(s.local_numel, generator=g)
                )
        snaps.append(row)
    return specs, theta0, snaps


def _store(specs, theta0, snaps, K, fold_rank, dtype="float32", steps=None, **kw):
    st = TrajectoryStore([TensorSpec(s.name, s.shape, s.dtype, s.local_numel) for s in specs], K, dtype=dtype,
                         storage="host", fold_rank=fold_rank, **kw)
    st.set_theta0(theta0)
    for t, row in zip(steps or range(1, len(snaps) + 1), snaps):
        st.snapshot(t, row)
    return st


def _solve(st, rank=1, fit_start=None):
    return solve(specs=st.specs, options=SolveOptions(rank=rank, fit_start=fit_start, method="gram"),
                 **st.solve_inputs())


def compare(exact, other, theta0, H):
    """(min cosine of the moves theta(H) - theta_0, max relative error of theta(H)) over the moving tensors."""
    cos, rel = 1.0, 0.0
    for i in range(len(exact.specs)):
        a = exact.extrapolate(i, H, theta0[i]).float() - theta0[i].float()
        b = other.extrapolate(i, H, theta0[i]).float() - theta0[i].float()
        if a.norm() == 0:
            assert b.norm() == 0, "a frozen tensor moved"
            continue
        cos = min(cos, float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        rel = max(rel, float((a - b).norm() / a.norm()))
    return cos, rel


def fold_bounds(exact_st, folded_st, theta0, H, rank=1, fit_start=None):
    """Per moving tensor, the bound on ``||move_folded - move_exact|| / ||move_exact||`` (``move = theta(H) -
    theta_0``):
    each path within its :func:`helpers.extrapolation_tolerance` of the exact float64 extrapolation of the recorded
    deltas ``M`` (the unfolded store's rows). The folded path reads ``C B`` instead of ``M`` (read back from the store
    here, in float64): its Gram moves by ``(C B)(C B)^T - M M^T`` (what the folds discarded; the float32 rounding of
    ``W`` in a lossless fold) and its direction pass by ``C B - M`` (``extrapolation_tolerance(moved_to=C B)``).
    Returns ``{i: bound}``."""
    M = exact_st.solve_inputs()["M"].double()
    inp = folded_st.solve_inputs()
    B, Cs = inp["M"].double(), inp["left"].double()
    out = {}
    for i, (sp, fp) in enumerate(zip(exact_st.specs, folded_st.specs)):
        m = M[:, sp.offset : sp.offset + sp.local_numel]
        if float(m.norm()) == 0.0:
            continue
        mf = Cs[i] @ B[:, fp.offset : fp.offset + fp.local_numel]
        kw = dict(rank=rank, theta0_norm=float(theta0[i].norm()), fit_start=fit_start)
        out[i] = (extrapolation_tolerance(m, exact_st.steps, H, **kw)
                  + extrapolation_tolerance(m, exact_st.steps, H, moved_to=mf, **kw))
    return out


def check_fold(exact_st, folded_st, exact, folded, theta0, H, rank=1, fit_start=None, what=""):
    """Every moving tensor's folded move within :func:`fold_bounds` of the exact path's (relative error; the cosine,
    in float64, at least ``sqrt(1 - bound^2)``); prints the margins. Returns ``(max error, max bound)``."""
    bounds = fold_bounds(exact_st, folded_st, theta0, H, rank, fit_start)
    worst_err = worst_bound = worst_ratio = 0.0
    for i in range(len(exact.specs)):
        a = (exact.extrapolate(i, H, theta0[i]).float() - theta0[i].float()).double()
        b = (folded.extrapolate(i, H, theta0[i]).float() - theta0[i].float()).double()
        if i not in bounds:
            assert b.norm() == 0 and a.norm() == 0, "a frozen tensor moved"
            continue
        rel = float((a - b).norm() / a.norm())
        cos = float(a @ b / (a.norm() * b.norm()))
        bd = bounds[i]
        assert rel <= bd, (what, exact.specs[i].name, rel, bd)
        assert cos >= (1 - min(1.0, bd) ** 2) ** 0.5 - 1e-15, (what, exact.specs[i].name, cos, bd)
        worst_err, worst_bound, worst_ratio = max(worst_err, rel), max(worst_bound, bd), max(worst_ratio, rel / bd)
    print(f"fold {what}: max relative error {worst_err:.1e}, max bound {worst_bound:.1e}, "
          f"max error / bound {worst_ratio:.2e}")
    return worst_err, worst_bound


def test_no_fold_when_slots_cover_the_window_is_exact():
    specs, theta0, snaps = _trajectory(20)
    plain = _store(specs, theta0, snaps, 20, None, dtype="bfloat16")
    ready = _store(specs, theta0, snaps, 20, 4, dtype="bfloat16")  # fold enabled but never needed
    assert ready.folds == 0 and not ready.folded
    a, b = _solve(plain), _solve(ready)
    assert torch.equal(a.V, b.V)
    assert torch.equal(a.slope, b.slope) and torch.equal(a.intercept, b.intercept)
    # and the planner does not even allocate basis rows when the window fits
    assert plan_slots(20, 1000, 2, max_buffer_bytes=None, buffer_slots=20, fold_rank=8) == (20, None)
    assert plan_slots(20, 1000, 2, max_buffer_bytes=20 * 2000, buffer_slots=None, fold_rank=8) == (20, None)


@pytest.mark.parametrize("dtype,K", [("float32", 3), ("float32", 1), ("bfloat16", 4)])
def test_rank1_plus_noise_folded_matches_exact(dtype, K):
    T = 30
    specs, theta0, snaps = _trajectory(T, noise=0.05)
    ex_st = _store(specs, theta0, snaps, T, None, dtype=dtype)
    exact = _solve(ex_st, fit_start=5)
    st = _store(specs, theta0, snaps, K, 4, dtype=dtype)
    assert st.folds >= (T - 1) // K - 1 and st.folded
    folded = _solve(st, fit_start=5)
    cos, rel = compare(exact, folded, theta0, H=300)
    logger.warning("fold %s K=%d: cosine %.8f, relative error %.2e", dtype, K, cos, rel)
    check_fold(ex_st, st, exact, folded, theta0, 300, fit_start=5, what=f"{dtype} K={K}")
    # the report's explained variance uses ||M||_F^2 kept beside the factorisation: both totals are sums of the
    # same rows' squared norms from float32 Grams, each within sqrt(n) u of the exact (helpers.gram_rounding's
    # diagonal); the explained share sigma_1^2 / total moves by the folded Gram's move (Weyl: |d sigma^2| <= ||dG||)
    M = ex_st.solve_inputs()["M"].double()
    for i, sp in enumerate(ex_st.specs):
        m = M[:, sp.offset : sp.offset + sp.local_numel]
        tot = float((m * m).sum())
        if tot == 0:
            assert float(folded.total[i]) == float(exact.total[i]) == 0.0
            continue
        d_tot = 2 * float(torch.diagonal(gram_rounding(m)).sum())
        assert abs(float(folded.total[i]) - float(exact.total[i])) <= d_tot, (sp.name, d_tot)
        assert d_tot < 1e-4 * tot
        inp = st.solve_inputs()
        fp = st.specs[i]
        mf = inp["left"][i].double() @ inp["M"].double()[:, fp.offset : fp.offset + fp.local_numel]
        dG = float(torch.linalg.matrix_norm(m @ m.T - mf @ mf.T, ord=2)) + 2 * float(gram_rounding(m).norm())
        d_exp = (dG + float(exact.explained[i]) * d_tot) / (tot - d_tot)
        err = abs(float(folded.explained[i]) - float(exact.explained[i]))
        print(f"explained {sp.name}: error {err:.1e}, bound {d_exp:.1e}")
        assert err <= d_exp, (sp.name, err, d_exp)
    assert folded.steps == exact.steps and folded.coeffs.shape == exact.coeffs.shape


def test_rank2_folded_matches_exact_when_fold_rank_covers_it():
    T = 24
    g = torch.Generator().manual_seed(3)
    specs = _specs()
    theta0 = [torch.randn(s.local_numel, generator=g) for s in specs]
    v1 = [torch.randn(s.local_numel, generator=g) for s in specs]
    v2 = [torch.randn(s.local_numel, generator=g) for s in specs]
    snaps = [[theta0[i] + 0.01 * t * v1[i] + 0.003 * (t % 5) * v2[i] for i in range(3)] for t in range(1, T + 1)]
    ex_st, st = _store(specs, theta0, snaps, T, None), _store(specs, theta0, snaps, 5, 3)
    exact, folded = _solve(ex_st, rank=2), _solve(st, rank=2)  # the trajectory has rank 2 <= fold_rank: lossless
    err, bound = check_fold(ex_st, st, exact, folded, theta0, 100, rank=2, what="rank 2, lossless")
    assert bound < 1e-3  # lossless: the bound is rounding-sized, a 1e-3 error would fail it
    # and a planted error of 1e-3 of the move fails the check
    bad = folded.slope.clone()
    folded.slope[0, 0] *= 1 + 2e-3
    with pytest.raises(AssertionError):
        check_fold(ex_st, st, exact, folded, theta0, 100, rank=2, what="planted")
    folded.slope.copy_(bad)


def test_memory_is_flat_in_tcut_and_stride_steps():
    specs, theta0, snaps = _trajectory(200, noise=0.05)
    sizes = {}
    for T in (25, 50, 100, 200):
        st = _store(specs, theta0, snaps[:T], 6, 4)
        sizes[T] = st.buffer_bytes
        assert st.M.shape[0] == 6 and st.arena.shape[0] == 10
    assert len(set(sizes.values())) == 1, sizes
    exact = _store(specs, theta0, snaps, 200, None)
    assert exact.buffer_bytes > 10 * sizes[200]


def test_folded_store_save_load_roundtrip(tmp_path):
    specs, theta0, snaps = _trajectory(17)
    st = _store(specs, theta0, snaps, 4, 3)
    st.save(str(tmp_path / "traj"))
    back = TrajectoryStore.open(str(tmp_path / "traj"))
    assert back.steps == st.steps and back.folded_steps == st.folded_steps
    a, b = _solve(st), _solve(back)
    assert torch.equal(a.V, b.V) and torch.allclose(a.slope, b.slope, rtol=0, atol=0)
    # a resumed run may keep snapshotting into it
    more = _trajectory(20)[2][17:]
    for t, row in zip(range(18, 21), more):
        back.snapshot(t, row)
    assert back.steps[-1] == 20


def test_disk_tier_folds_in_the_mapped_file(tmp_path):
    specs, theta0, snaps = _trajectory(12)
    exact = _solve(_store(specs, theta0, snaps, 12, None))
    st = TrajectoryStore(_specs(), 3, dtype="float32", storage="disk", directory=str(tmp_path / "run"), fold_rank=2)
    st.set_theta0(theta0)
    for t, row in enumerate(snaps, 1):
        st.snapshot(t, row)
    assert os.path.getsize(tmp_path / "run" / "trajectory.bin") == 5 * st.D * 4
    back = TrajectoryStore.open(str(tmp_path / "run"), storage="disk")
    check_fold(_store(specs, theta0, snaps, 12, None), back, exact, _solve(back), theta0, 100, what="disk, rank 2")


def test_fold_settings_errors():
    with pytest.raises(RelexInputError, match="fold_rank=1 is below rank=2"):
        RelexSettings.validate(tcut=10, horizons=[20], fold_rank=1, rank=2)
    with pytest.raises(RelexInputError, match="buffer_slots must be >= 1"):
        RelexSettings.validate(tcut=10, horizons=[20], fold_rank=4, buffer_slots=0)
    with pytest.raises(RelexMemoryError, match="folding the window needs fold_rank=8"):
        plan_slots(100, 1000, 2, max_buffer_bytes=5 * 2000, buffer_slots=None, fold_rank=8)
    assert plan_slots(100, 1000, 2, max_buffer_bytes=20 * 2000, buffer_slots=None, fold_rank=8) == (12, 8)


def test_truncate_before_a_fold_is_refused():
    specs, theta0, snaps = _trajectory(10)
    st = _store(specs, theta0, snaps, 3, 2)
    with pytest.raises(RelexInputError, match="already folded"):
        st.truncate(2)


# ------------------------------------------------------------------------------------------ real GRPO run
@pytest.mark.slow
def test_grpo_callback_folded_matches_exact(tmp_path, tokenizer, caplog):
    """One tiny GRPOTrainer run with two callbacks on the same trajectory: the exact one (whole window in memory)
    and a folded one (3 slots + 4 fold rows, bf16: storage="auto" under a max_buffer_bytes the exact window exceeds,
    so the memory plan folds and says so). Their step-H checkpoints agree."""
    def digit_reward(completions, **kw):  # dense, so an untrained toy model gets a learning signal at once
        return [sum(ch == "7" for ch in c) / max(1, len(c)) for c in completions]

    model = build_model(tokenizer, hidden_size=32, layers=1)
    tcut, H = 12, 60
    exact_cb = RelexCallback(tcut=tcut, horizons=[H], output_dir=str(tmp_path / "exact"), dtype="bfloat16")
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    folded_cb = RelexCallback(tcut=tcut, horizons=[H], output_dir=str(tmp_path / "folded"), dtype="bfloat16",
                              max_buffer_bytes=7 * D * 2, fold_rank=4)
    # GRPOConfig's own bf16 and tqdm defaults, not the shared run's
    args = dict(per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=50, max_steps=40, beta=0.0,
                temperature=1.0, bf16=None, disable_tqdm=None)

    kept = {}

    class KeepInputs(TrainerCallback):
        """Test instrumentation: copies what each callback's store hands the solver (the exact rows; the folded
        store's B and C) just before the callback releases it after the window, for the bound below."""

        def on_train_begin(self, args, state, control, **kw):
            for key, cb in (("exact", exact_cb), ("folded", folded_cb)):
                st, release = cb.store, cb.store.release

                def keep(st=st, release=release, key=key):
                    inp = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.solve_inputs().items()}
                    th0 = [st.theta0_of(sp).double().clone() for sp in st.specs]
                    kept[key] = (SimpleNamespace(solve_inputs=lambda: inp, specs=list(st.specs), steps=list(st.steps)),
                                 th0)
                    release()

                st.release = keep

    trainer = grpo_trainer(tmp_path / "run", [exact_cb, folded_cb, KeepInputs()], model=model, tok=tokenizer,
                           reward=digit_reward, **args)
    with caplog.at_level(logging.INFO, logger="relex_callback"):
        trainer.train()
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relex memory plan")]
    assert len(plans) == 2  # one block per callback, at on_train_begin
    assert any(
        "auto     -> host: the exact window (12 rows" in p
        and "fits no tier; folded on host: 4 basis + 3 ring rows" in p
        for p in plans
    ), plans
    assert any("fits no memory tier; folding it" in r.getMessage() for r in caplog.records)
    assert trainer.state.global_step == tcut
    assert folded_cb.report["buffer_bytes"] == 7 * D * 2 and folded_cb.report["folds"] >= 2
    assert exact_cb.report["folds"] == 0
    a = load_file(str(tmp_path / "exact" / f"step-{H}" / "model.safetensors"))
    b = load_file(str(tmp_path / "folded" / f"step-{H}" / "model.safetensors"))
    # (was: cosine of the moves > 0.99, relative error of the weights < 1e-2) each move within fold_bounds of the
    # other: both paths within their float32 bound of the float64 extrapolation of the exact store's bf16 rows, the
    # folded one reading C B (its Gram and direction pass moved by what the bf16 folds discarded, measured)
    (exact_st, th0), (folded_st, _) = kept["exact"], kept["folded"]
    assert [sp.name for sp in exact_st.specs] == [sp.name for sp in folded_st.specs]
    bounds = fold_bounds(exact_st, folded_st, th0, H)
    init = build_model(tokenizer, hidden_size=32, layers=1).state_dict()
    worst, moved, rel_bounds = 0.0, 0, []
    for i, sp in enumerate(exact_st.specs):
        k = sp.name
        da = (a[k].double() - init[k].double()).flatten()
        db = (b[k].double() - init[k].double()).flatten()
        if i not in bounds:
            assert da.norm() == 0 and db.norm() == 0, k
            continue
        moved += 1
        rel = float((da - db).norm() / da.norm())
        assert rel <= bounds[i], (k, rel, bounds[i])
        worst = max(worst, rel / bounds[i])
        rel_bounds.append(bounds[i])
    print(f"GRPO tcut={tcut} H={H}: {moved} tensors, max relative error of the moves / bound {worst:.2e}, "
          f"bound {min(rel_bounds):.1e} .. {max(rel_bounds):.1e}")
    assert moved > 5
    assert max(rel_bounds) < 0.1  # not vacuous: a fold that lost the direction (error ~1) fails
