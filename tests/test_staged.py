"""A host or disk arena solved and folded through a GPU in column blocks (relex_callback/core/kernels/staged.py).

No GPU here: the staged functions take the compute device as an argument and run the same code with the CPU as that
device, with blocks small enough that every segment is split, shared and ragged. The wiring (solve, factor_left,
the store's fold) is exercised by making the CPU count as "elsewhere" for the store and the solver; each result is
compared with the plain path's.
"""

from __future__ import annotations

import random

import pytest
import torch

from relex_callback.core import kernels
from relex_callback.core.kernels import reference, staged
from relex_callback.core.solver import SolveOptions, solve
from relex_callback.params import TensorSpec
from relex_callback.trajectory.store import TrajectoryStore

from helpers import arena_specs


def _layout(seed, S=12, gap=True):
    rnd = random.Random(seed)
    offsets, numels, o = [], [], 0
    for _ in range(S):
        o += rnd.choice([0, 0, 3, 17]) if gap else 0
        n = rnd.choice([0, 1, 5, 63, 64, 65, 200, 1000])
        offsets.append(o)
        numels.append(n)
        o += n
    perm = list(range(S))
    rnd.shuffle(perm)  # segments need not be listed in column order
    return [offsets[i] for i in perm], [numels[i] for i in perm], o


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cols", [64, 128, 1024])
def test_blocks_cover_every_segment_column_once(seed, cols):
    offsets, numels, D = _layout(seed)
    covered = {}
    for a, b, pieces in staged._blocks(offsets, numels, cols):
        assert 0 < b - a <= cols
        for i, lo, n in pieces:
            assert n > 0 and 0 <= lo and lo + n <= b - a
            for c in range(a + lo, a + lo + n):
                assert c not in covered, f"column {c} read twice"
                covered[c] = i
    want = {c: i for i, (o, n) in enumerate(zip(offsets, numels)) for c in range(o, o + n)}
    assert covered == want


def test_block_columns_are_aligned_and_bounded():
    for T in (2, 5, 75, 200):
        for item in (2, 4):
            c = staged.block_columns(T, item)
            assert c % 64 == 0 and c >= 64 and T * c * item <= max(staged.STAGE_BYTES, T * 64 * item)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_gram_and_projection_through_the_device_equal_the_references(seed, dtype):
    offsets, numels, D = _layout(seed)
    T, r = 7, 2
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(T, D, generator=g).to(dtype)
    want = reference.gram_reference(M, offsets, numels)
    got = staged.gram_staged(M, offsets, numels, "cpu", kernels.gram, stage_bytes=T * 64 * M.element_size())
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-5 * float(want.abs().max()))
    U = torch.randn(len(offsets), T, r, generator=g)
    out_want = torch.full((r, D), 7.0)
    reference.project_reference(M, offsets, numels, U, out_want)
    out = torch.full((r, D), 7.0)  # columns outside every segment keep their values
    staged.project_staged(M, offsets, numels, U, out, "cpu", kernels.project, stage_bytes=T * 128 * M.element_size())
    torch.testing.assert_close(out, out_want, rtol=1e-5, atol=1e-5)


def test_projection_into_rows_of_the_arena_it_reads():
    """The fold writes the new basis over the arena's first rows while reading them: each block is read first."""
    offsets, numels, D = _layout(3, gap=False)
    T, r = 6, 2
    g = torch.Generator().manual_seed(1)
    M = torch.randn(T, D, generator=g)
    U = torch.randn(len(offsets), T, r, generator=g)
    want = torch.zeros(r, D)
    reference.project_reference(M.clone(), offsets, numels, U, want)
    staged.project_staged(M, offsets, numels, U, M[:r], "cpu", kernels.project, stage_bytes=T * 64 * 4)
    covered = torch.zeros(D, dtype=torch.bool)
    for o, n in zip(offsets, numels):
        covered[o:o + n] = True
    torch.testing.assert_close(M[:r][:, covered], want[:, covered], rtol=1e-5, atol=1e-5)


@pytest.fixture
def cpu_counts_as_elsewhere(monkeypatch):
    """The CPU stands in for the GPU: the solver and the store send their passes through staged.* with tiny blocks."""
    calls = {"gram": 0, "project": 0}
    real_g, real_p = staged.gram_staged, staged.project_staged

    def gram_staged(M, offsets, numels, device, gram, stage_bytes=None):
        calls["gram"] += 1
        return real_g(M, offsets, numels, device, gram, stage_bytes=M.shape[0] * 64 * M.element_size())

    def project_staged(M, offsets, numels, U, out, device, project, stage_bytes=None):
        calls["project"] += 1
        return real_p(M, offsets, numels, U, out, device, project, stage_bytes=M.shape[0] * 64 * M.element_size())

    monkeypatch.setattr(staged, "through", lambda M, device: None if device is None else torch.device("cpu"))
    monkeypatch.setattr(staged, "gram_staged", gram_staged)
    monkeypatch.setattr(staged, "project_staged", project_staged)
    return calls


def _trajectory(T=8, sizes=(300, 41, 1000, 7), seed=0):
    specs, D = arena_specs(sizes)
    g = torch.Generator().manual_seed(seed)
    steps = [2 * (k + 1) for k in range(T)]
    v = torch.randn(D, generator=g)
    w = torch.randn(D, generator=g)
    M = torch.stack([0.01 * t * v + 0.002 * (t % 3) * w + 1e-3 * torch.randn(D, generator=g) for t in steps])
    return M, steps, specs


@pytest.mark.parametrize("method", ["auto", "power", "gram"])
def test_solve_through_the_device_matches_the_plain_solve(cpu_counts_as_elsewhere, method):
    M, steps, specs = _trajectory()
    plain = solve(M, steps, specs, SolveOptions(method="gram", rank=2))
    assert cpu_counts_as_elsewhere == {"gram": 0, "project": 0}
    got = solve(M, steps, specs, SolveOptions(method=method, rank=2), compute_device="cuda")
    assert cpu_counts_as_elsewhere == {"gram": 1, "project": 1}  # one pass each: the power path is not taken
    assert got.method == "gram"
    # the same float32 products summed over other blocks: rounding relative to the largest singular value
    torch.testing.assert_close(got.sigma, plain.sigma, rtol=1e-5, atol=1e-5 * float(plain.sigma.max()))
    torch.testing.assert_close(got.slope[:, 0], plain.slope[:, 0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got.V[0], plain.V[0], rtol=1e-4, atol=1e-6)
    assert float((got.V[1] - plain.V[1]).abs().max()) < 1e-2 * float(plain.V[1].abs().max())


def _store(specs, K, fold_rank):
    return TrajectoryStore([TensorSpec(s.name, s.shape, s.dtype, s.local_numel) for s in specs], K, dtype="float32",
                           storage="host", fold_rank=fold_rank)


def test_the_fold_through_the_device_matches_the_plain_fold(cpu_counts_as_elsewhere, monkeypatch):
    M, steps, specs = _trajectory(T=10)
    sizes = [s.local_numel for s in specs]

    def run():
        st = _store(specs, 4, 2)
        st.set_theta0([torch.zeros(n) for n in sizes])
        for t, row in zip(steps, M):
            st.snapshot(t, list(torch.split(row, sizes)))
        assert st.folds >= 2
        return solve(specs=st.specs, options=SolveOptions(rank=1, method="gram"), compute_device=st.compute_device,
                     **st.solve_inputs())

    plain = run()
    assert cpu_counts_as_elsewhere == {"gram": 0, "project": 0}
    monkeypatch.setattr(TrajectoryStore, "compute_device", property(lambda self: torch.device("cpu")))
    got = run()
    assert cpu_counts_as_elsewhere["gram"] >= 3 and cpu_counts_as_elsewhere["project"] >= 3  # folds + the solve
    torch.testing.assert_close(got.sigma, plain.sigma, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.V, plain.V, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.slope, plain.slope, rtol=1e-4, atol=1e-9)


def test_a_host_store_computes_on_the_training_device_and_a_device_store_where_it_is():
    specs, _ = arena_specs((10, 20))
    st = _store(specs, 3, None)
    assert st.compute_device is None  # training on the CPU: nothing to go through
    st.device = torch.device("cuda", 1)  # as a host tier of a run on cuda:1 has it
    assert st.compute_device == torch.device("cuda", 1)
    assert staged.through(st.M, st.compute_device) == torch.device("cuda", 1)
    assert staged.through(st.M, None) is None and staged.through(st.M, "cpu") is None
