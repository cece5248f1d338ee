"""Triton kernels vs their plain-torch references (Liger-Kernel discipline): every op, several shapes and dtypes.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which ``tests/conftest.py`` switches on
before triton is first imported. ``test_interpreter_really_runs_the_kernels`` makes sure the cases below are not
silently skipped for want of it.
"""

import os

import pytest
import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton is an extra
    HAVE_TRITON = False

from relex_callback.core.kernels import reference, triton_ops
from relex_callback.core import kernels
from relex_callback.core.kernels.triton_ops import _table

from helpers import dot_error_bound


def _in_process_ok() -> bool:
    """Can the Triton kernels run here? (a GPU, or the interpreter active since triton's import)"""
    if not HAVE_TRITON:
        return False
    if torch.cuda.is_available():
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from relex_callback.core.kernels import triton_ops

        M = torch.ones(3, 40)
        return float(triton_ops.gram(M, [0], [40])[0, 0, 0]) == 40.0  # sums of 1.0 up to 40: exact in float32
    except Exception:
        return False


IN_PROCESS = _in_process_ok()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not IN_PROCESS,
    reason="triton is not installed (or its interpreter could not start: see test_interpreter_really_runs_the_kernels)",
)

# (segment sizes) cases: a single column, odd sizes, sizes that are not multiples of any block, many tiny segments
# and one big one. The tests shrink each program's column span to SPAN so that the big segments cover several
# programs and their partial Grams meet in the atomic reduction (the interpreter is too slow for real spans).
SPAN = 512
LAYOUTS = {
    "single": [1],
    "odd": [3, 17, 129],
    "tiny+big": [1] * 7 + [2, 5] + [1500],
    "two-spans": [SPAN + 1],
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances: the kernel and the reference both accumulate in float32, in different orders; each is compared with the
# exact float64 result of the same (already rounded) inputs, entry by entry, within the worst case of a float32 dot
# product, gamma_n sum_k |a_k b_k| (helpers.dot_error_bound; n the length of the sum: the segment's size for the
# Gram, T for the projection), plus one ulp of the output dtype where that is 16-bit (2 u16 |x|: any rounding mode;
# Triton's interpreter rounds float32 -> bfloat16 towards zero, one case here was 1.02 u16 off), and at least the
# spacing of its subnormals (float16's, 2^-24 = 6e-8, is far above 2 u16 |x| for the |x| ~ 1e-6 that occur here).
ULP16 = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _segments(M, offsets, numels):
    return [M.cpu().double()[:, o : o + n] for o, n in zip(offsets, numels)]


def _check_gram(G, M, offsets, numels, what=""):
    """Every entry of each Gram in ``G [S, T, T]`` within ``dot_error_bound`` of the exact ``M_i M_i^T``; returns the
    largest error / bound (for the record)."""
    worst = 0.0
    for i, m in enumerate(_segments(M, offsets, numels)):
        exact, bound = m @ m.T, dot_error_bound(m)
        err = (G[i].cpu().double() - exact).abs()
        assert bool((err <= bound).all()), (what, i, float((err - bound).max()))
        # the bound means something: an error of 1e-3 of the largest entry exceeds it
        assert float(bound.max()) < 1e-3 * float(exact.abs().max()) or float(exact.abs().max()) == 0.0
        worst = max(worst, float((err / bound.clamp_min(1e-300)).max()))
    return worst


def _check_project(out, M, offsets, numels, U, out_dtype, what=""):
    """Columns of each segment of ``out [r, D]`` within ``dot_error_bound`` (length ``T``) of the exact ``U_i^T M_i``,
    plus a 16-bit output's rounding (one ulp, ``2 u16 |x|``, or a subnormal's spacing)."""
    worst = 0.0
    for i, (o, n) in enumerate(zip(offsets, numels)):
        m, ui = M.cpu().double()[:, o : o + n], U[i].double()
        exact = ui.T @ m
        bound = dot_error_bound(ui.T, m.T)
        if out_dtype in ULP16:
            sub = torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps
            bound = bound + ULP16[out_dtype] * (exact.abs() + bound) + sub
        err = (out[:, o : o + n].cpu().double() - exact).abs()
        assert bool((err <= bound).all()), (what, i, float((err - bound).max()))
        worst = max(worst, float((err / bound.clamp_min(1e-300)).max()))
    return worst


def test_the_bounds_catch_a_planted_error():
    """A 1e-3 error of the largest entry, or a sign flip, fails the checks above (they are not vacuous)."""
    M, offsets, numels = _arena(20, [1500, 3], torch.bfloat16)
    G = reference.gram_reference(M, offsets, numels)
    _check_gram(G, M, offsets, numels)
    bad = G.clone()
    bad[0, 3, 5] += 1e-3 * float(G[0].abs().max())
    bad[0, 5, 3] = bad[0, 3, 5]
    with pytest.raises(AssertionError):
        _check_gram(bad, M, offsets, numels)
    bad = G.clone()
    bad[1, 0, 1] = -bad[1, 0, 1]
    with pytest.raises(AssertionError):
        _check_gram(bad, M, offsets, numels)
    U = torch.randn(2, 20, 1, generator=torch.Generator().manual_seed(2))
    out = torch.zeros(1, M.shape[1])
    reference.project_reference(M, offsets, numels, U, out)
    _check_project(out, M, offsets, numels, U, torch.float32)
    o = offsets[0]
    out[0, o] += 1e-3 * float(out[0, o : o + numels[0]].abs().max())
    with pytest.raises(AssertionError):
        _check_project(out, M, offsets, numels, U, torch.float32)


def _arena(T, sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets, o = [], 0
    for n in sizes:
        o += 3  # a gap between segments: columns no segment owns must be left alone
        offsets.append(o)
        o += n
    D = o + 5
    M = (torch.randn(T, D, generator=g) * 0.01).to(dtype)
    return M.to(DEVICE), offsets, list(sizes)


def _cases():
    for T in (2, 5, 20, 75):
        for name, sizes in LAYOUTS.items():
            for dt in DTYPES:
                yield pytest.param(T, sizes, dt, id=f"T{T}-{name}-{str(dt).split('.')[-1]}")


@needs_kernels
@pytest.mark.parametrize("T,sizes,dtype", list(_cases()))
def test_gram_matches_reference(T, sizes, dtype):
    M, offsets, numels = _arena(T, sizes, dtype)
    G = triton_ops.gram(M, offsets, numels, span=SPAN)
    R = reference.gram_reference(M.cpu(), offsets, numels)
    assert G.shape == (len(sizes), T, T)
    assert G.dtype == R.dtype == torch.float64
    G = G.cpu()
    assert torch.isfinite(G).all()
    print(f"gram T={T} {numels} {dtype}: error / bound kernel {_check_gram(G, M, offsets, numels, 'kernel'):.2e}, "
          f"reference {_check_gram(R, M, offsets, numels, 'reference'):.2e}")
    # the single-block path computes G_ij and G_ji as separate sums of the same products: each within the bound of
    # the exact value, so within twice it of each other (the tiled path mirrors: bitwise)
    if not torch.equal(G, G.transpose(1, 2)):
        for i, m in enumerate(_segments(M, offsets, numels)):
            assert bool(((G[i] - G[i].T).abs() <= 2 * dot_error_bound(m)).all()), i


@needs_kernels
@pytest.mark.parametrize("T", [2, 20, 150])
def test_gram_large_T_tiles_blocks(T):
    """T > 128 takes the tiled path (upper-triangle blocks mirrored): compare on a small segment set."""
    M, offsets, numels = _arena(T, [1, 70, 300], torch.bfloat16, seed=3)
    G = triton_ops.gram(M, offsets, numels, span=SPAN).cpu()
    _check_gram(G, M, offsets, numels, "tiled")


@needs_kernels
@pytest.mark.parametrize("T,sizes,dtype", list(_cases()))
@pytest.mark.parametrize("r", [1, 3])
def test_project_matches_reference(T, sizes, dtype, r):
    M, offsets, numels = _arena(T, sizes, dtype, seed=1)
    U = torch.randn(len(sizes), T, r, generator=torch.Generator().manual_seed(2))
    for out_dtype in {torch.float32, dtype}:
        out_k = torch.full((r, M.shape[1]), 7.0, dtype=out_dtype, device=DEVICE)
        out_r = torch.full((r, M.shape[1]), 7.0, dtype=out_dtype)
        res = triton_ops.project(M, offsets, numels, U, out_k, span=SPAN)
        assert res is out_k
        reference.project_reference(M.cpu(), offsets, numels, U, out_r)
        out_k = out_k.cpu().float()
        out_r = out_r.float()
        # columns outside every segment are untouched
        owned = torch.zeros(M.shape[1], dtype=torch.bool)
        for o, n in zip(offsets, numels):
            owned[o : o + n] = True
        assert (out_k[:, ~owned] == 7.0).all()
        wk = _check_project(out_k, M, offsets, numels, U, out_dtype, "kernel")
        wr = _check_project(out_r, M, offsets, numels, U, out_dtype, "reference")
        print(f"project T={T} {numels} {dtype} -> {out_dtype}: error / bound kernel {wk:.2e}, reference {wr:.2e}")


@needs_kernels
def test_dispatch_forced_triton_matches(monkeypatch):
    """kernels.gram/project dispatch to Triton with RELEX_FORCE_TRITON=1 and give the reference's answer."""
    monkeypatch.setenv("RELEX_FORCE_TRITON", "1")
    M, offsets, numels = _arena(5, [3, 40], torch.bfloat16, seed=6)
    assert kernels._use_triton(M)
    _check_gram(kernels.gram(M, offsets, numels).cpu(), M, offsets, numels, "dispatch")
    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    assert not kernels._use_triton(M)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_interpreter_really_runs_the_kernels():
    # the kernel cases are skipped only when they cannot run; with triton installed they must be able to
    assert IN_PROCESS, (
        "Triton kernels cannot run here: on CPU, TRITON_INTERPRET=1 must be set before triton is imported"
    )


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_program_table_covers_every_column_once():
    offsets, numels = [0, 10, 10, 50, 1000], [10, 0, 40, 901, 1]
    for span in (1, 7, 64, 5000):
        tab = _table(offsets, numels, span, "cpu").tolist()
        expect = [
            (i, s, min(o + n, s + span)) for i, (o, n) in enumerate(zip(offsets, numels)) for s in range(o, o + n, span)
        ]
        assert [tuple(r) for r in tab] == expect
    assert _table([5], [0], 16, "cpu").shape == (0, 3)


@needs_kernels
def test_default_span_matches_reference():
    M, offsets, numels = _arena(5, [3, 700], torch.bfloat16, seed=7)
    _check_gram(triton_ops.gram(M, offsets, numels).cpu(), M, offsets, numels, "default span")
    U = torch.randn(2, 5, 1)
    out_k = torch.zeros(1, M.shape[1], device=DEVICE)
    out_r = torch.zeros(1, M.shape[1])
    triton_ops.project(M, offsets, numels, U, out_k)
    reference.project_reference(M.cpu(), offsets, numels, U, out_r)
    _check_project(out_k, M, offsets, numels, U, torch.float32, "default span, kernel")
    _check_project(out_r, M, offsets, numels, U, torch.float32, "default span, reference")
