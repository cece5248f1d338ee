"""The solver's float32 products run in IEEE float32 even when the trainer asked for TF32.

``TrainingArguments(tf32=True)`` sets ``torch.backends.fp32_precision = "tf32"`` (transformers 5 on torch >= 2.9;
``allow_tf32`` before): on an Ampere-or-later GPU every float32 matmul would then round its inputs to 10 mantissa
bits, the Gram included. A CPU shows which setting each product ran under: a ``TorchFunctionMode`` records the CUDA
matmul precision in force at every matmul the solve, the fold, the references and the streamed engine make. The
settings themselves (global, per backend, legacy) are process-wide, so each way of asking for TF32 is tried in a
child process, and the test checks both that the products ran in IEEE and that the trainer's own setting reads back
unchanged afterwards through the API it used.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from relex_callback.core import kernels
from relex_callback.core.precision import float32_exact
from relex_callback.core.solver import factor_left, SolveOptions, solve
from relex_callback.params import TensorSpec
from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.offline.api import extrapolate_checkpoints

from helpers import arena_specs
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MATMULS = {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
            torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.addmm_, torch.Tensor.addmm, torch.Tensor.bmm,
            torch.baddbmm, torch.Tensor.baddbmm_, torch.einsum}


class _Spy(TorchFunctionMode):
    """Records the CUDA matmul precision in force at every float32 matmul-like call."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.dtype == torch.float32 for t in tensors):
                self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_requested():
    """The process asks for TF32 the way transformers 5 does for ``tf32=True``, and gets its setting back."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision (the legacy switch is tested in a child)")
    before = torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    yield
    torch.backends.fp32_precision = before


def _problem(seed=0, T=6, sizes=(300, 41, 1000)):
    specs, D = arena_specs(sizes)
    g = torch.Generator().manual_seed(seed)
    steps = [2 * (k + 1) for k in range(T)]
    v = torch.randn(D, generator=g)
    M = torch.stack([0.01 * t * v + 1e-3 * torch.randn(D, generator=g) for t in steps])
    return M, steps, specs


def _spied(fn):
    spy = _Spy()
    with spy:
        out = fn()
    return out, spy.seen


def test_every_solver_product_runs_in_ieee_under_tf32(tf32_requested):
    M, steps, specs = _problem()
    offsets, numels = [s.offset for s in specs], [s.local_numel for s in specs]
    U = torch.randn(len(specs), M.shape[0], 2)
    out = torch.empty(2, M.shape[1])
    calls = {
        "gram": lambda: kernels.gram(M, offsets, numels),
        "project": lambda: kernels.project(M, offsets, numels, U, out),
        "solve gram": lambda: solve(M, steps, specs, SolveOptions(method="gram", rank=2)),
        "solve power": lambda: solve(M, steps, specs, SolveOptions(method="power")),
        "factor_left": lambda: factor_left(M, None, specs, 2),
    }
    for name, fn in calls.items():
        _, seen = _spied(fn)
        assert seen, f"{name}: no float32 product seen (the spy missed the path)"
        assert set(seen) == {"ieee"}, f"{name}: {seen.count('tf32')} of {len(seen)} float32 products under TF32"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the trainer's setting is back after each call


def test_the_fold_runs_in_ieee_under_tf32(tf32_requested):
    M, steps, specs = _problem(T=8)
    st = TrajectoryStore([TensorSpec(s.name, s.shape, s.dtype, s.local_numel) for s in specs], 4, dtype="float32",
                         storage="host", fold_rank=2)
    st.set_theta0([torch.zeros(s.local_numel) for s in specs])
    seen_all = []
    for t, row in zip(steps, M):
        parts = list(torch.split(row, [s.local_numel for s in specs]))
        _, seen = _spied(lambda: st.snapshot(t, parts))
        seen_all += seen
    assert st.folds >= 1
    assert seen_all and set(seen_all) == {"ieee"}, seen_all


def test_the_streamed_engine_runs_in_ieee_under_tf32(tf32_requested, tmp_path):
    M, steps, specs = _problem(T=5, sizes=(64, 200))
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {s.name: torch.zeros(s.local_numel) for s in specs}, str(base / "model.safetensors"), metadata={"format": "pt"}
    )
    for t, row in zip(steps, M):
        d = tmp_path / "ckpts" / f"checkpoint-{t}"
        d.mkdir(parents=True)
        save_file({s.name: row[s.offset: s.offset + s.local_numel].contiguous() for s in specs},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
    _, seen = _spied(lambda: extrapolate_checkpoints(str(base), [str(tmp_path / "ckpts")], [20], str(tmp_path / "out"),
                                                     streaming=True))
    assert seen and set(seen) == {"ieee"}, f"{seen.count('tf32')} of {len(seen)} float32 products under TF32"


CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from relex_callback.core.precision import float32_exact
way = sys.argv[2]
b = torch.backends
if way == "transformers":
    from transformers.utils.import_utils import enable_tf32
    enable_tf32(True)
elif way == "legacy":
    b.cuda.matmul.allow_tf32 = True
elif way == "precision":
    torch.set_float32_matmul_precision("high")
elif way == "backend":
    b.cuda.matmul.fp32_precision = "tf32"

def read():
    out = []
    for f in (lambda: b.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision,
              lambda: getattr(b.cuda.matmul, "fp32_precision", None),
              lambda: getattr(b.mkldnn.matmul, "fp32_precision", None) if hasattr(b, "mkldnn") else None):
        try:
            out.append(repr(f()))
        except RuntimeError as e:
            out.append("raises")
    return out

before = read()
with float32_exact():
    inside = getattr(b.cuda.matmul, "fp32_precision", None) or ("tf32" if b.cuda.matmul.allow_tf32 else "ieee")
after = read()
print("RESULT", inside, before == after, before, after)
"""


@pytest.mark.parametrize("way", ["transformers", "legacy", "precision", "backend", "none"])
def test_each_way_of_asking_for_tf32_is_overridden_and_restored(way):
    r = subprocess.run([sys.executable, "-c", CHILD, REPO, way], capture_output=True, text=True, timeout=120)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    _, inside, restored, *rest = line[0].split(" ", 3)
    assert inside in ("ieee", "none"), f"{way}: the solve would run under {inside}"
    assert restored == "True", f"{way}: the trainer's settings read back differently: {rest}"


def test_float32_exact_restores_on_an_exception(tf32_requested):
    with pytest.raises(ValueError):
        with float32_exact():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            raise ValueError("inside")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
