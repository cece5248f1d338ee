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

from relex_callback.core.kernels import reference


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
        return abs(float(triton_ops.gram(M, [0], [40])[0, 0, 0]) - 40.0) < 1e-6
    except Exception:
        return False


IN_PROCESS = _in_process_ok()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not IN_PROCESS, reason="triton is not installed (or its interpreter could not start: see test_interpreter_really_runs_the_kernels)")

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
# relative tolerance of the kernel vs the reference (both accumulate in float32, in different orders)
TOL = 2e-5


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
    from relex_callback.core.kernels import triton_ops

    M, offsets, numels = _arena(T, sizes, dtype)
    G = triton_ops.gram(M, offsets, numels, span=SPAN)
    R = reference.gram_reference(M.cpu(), offsets, numels)
    assert G.shape == (len(sizes), T, T)
    assert G.dtype == R.dtype == torch.float64
    G = G.cpu()
    scale = R.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    assert torch.isfinite(G).all()
    assert ((G - R).abs() / scale).max() < TOL
    assert torch.equal(G, G.transpose(1, 2)) or ((G - G.transpose(1, 2)).abs() / scale).max() < 1e-6


@needs_kernels
@pytest.mark.parametrize("T", [2, 20, 150])
def test_gram_large_T_tiles_blocks(T):
    """T > 128 takes the tiled path (upper-triangle blocks mirrored): compare on a small segment set."""
    from relex_callback.core.kernels import triton_ops

    M, offsets, numels = _arena(T, [1, 70, 300], torch.bfloat16, seed=3)
    G = triton_ops.gram(M, offsets, numels, span=SPAN).cpu()
    R = reference.gram_reference(M.cpu(), offsets, numels)
    scale = R.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    assert ((G - R).abs() / scale).max() < TOL


@needs_kernels
@pytest.mark.parametrize("T,sizes,dtype", list(_cases()))
@pytest.mark.parametrize("r", [1, 3])
def test_project_matches_reference(T, sizes, dtype, r):
    from relex_callback.core.kernels import triton_ops

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
        scale = out_r.abs().max().clamp_min(1e-30)
        tol = TOL if out_dtype == torch.float32 else 1e-2  # one rounding to 16 bits, possibly on either side
        assert ((out_k - out_r).abs() / scale).max() < tol


@needs_kernels
def test_dispatch_forced_triton_matches(monkeypatch):
    """kernels.gram/project dispatch to Triton with RELEX_FORCE_TRITON=1 and give the reference's answer."""
    from relex_callback.core import kernels

    monkeypatch.setenv("RELEX_FORCE_TRITON", "1")
    M, offsets, numels = _arena(5, [3, 40], torch.bfloat16, seed=6)
    assert kernels._use_triton(M)
    G = kernels.gram(M, offsets, numels).cpu()
    R = reference.gram_reference(M.cpu(), offsets, numels)
    assert ((G - R).abs() / R.abs().max()).max() < TOL
    monkeypatch.setenv("RELEX_DISABLE_TRITON", "1")
    assert not kernels._use_triton(M)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_interpreter_really_runs_the_kernels():
    # the kernel cases are skipped only when they cannot run; with triton installed they must be able to
    assert IN_PROCESS, "Triton kernels cannot run here: on CPU, TRITON_INTERPRET=1 must be set before triton is imported"


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_program_table_covers_every_column_once():
    from relex_callback.core.kernels.triton_ops import _table

    offsets, numels = [0, 10, 10, 50, 1000], [10, 0, 40, 901, 1]
    for span in (1, 7, 64, 5000):
        tab = _table(offsets, numels, span, "cpu").tolist()
        expect = [(i, s, min(o + n, s + span)) for i, (o, n) in enumerate(zip(offsets, numels)) for s in range(o, o + n, span)]
        assert [tuple(r) for r in tab] == expect
    assert _table([5], [0], 16, "cpu").shape == (0, 3)


@needs_kernels
def test_default_span_matches_reference():
    from relex_callback.core.kernels import triton_ops

    M, offsets, numels = _arena(5, [3, 700], torch.bfloat16, seed=7)
    G = triton_ops.gram(M, offsets, numels).cpu()
    R = reference.gram_reference(M.cpu(), offsets, numels)
    assert ((G - R).abs() / R.abs().max()).max() < TOL
    U = torch.randn(2, 5, 1)
    out_k = torch.zeros(1, M.shape[1], device=DEVICE)
    out_r = torch.zeros(1, M.shape[1])
    triton_ops.project(M, offsets, numels, U, out_k)
    reference.project_reference(M.cpu(), offsets, numels, U, out_r)
    assert ((out_k.cpu() - out_r).abs() / out_r.abs().max()).max() < TOL
