"""IEEE float32 for the solver's products, whatever the trainer asked of the matmul backends.

``TrainingArguments(tf32=True)`` (and any ``torch.backends.fp32_precision = "tf32"`` or ``allow_tf32 = True`` in the
user's script) makes every float32 matmul on an Ampere-or-later GPU round its inputs to 10 mantissa bits. The
Gram of a window's deltas and the projection onto its directions are float32 products of values that differ from one
another in their low bits: under TF32 the Gram carries relative errors near 1e-3 and the device path would no longer
write what the CPU engine (``relex extrapolate``) writes from the same checkpoints. :func:`float32_exact` switches
the matmul backends to IEEE float32 for the duration of a solve and restores exactly what was there before, through
the API the process already uses (torch's per-backend ``fp32_precision`` where it exists, ``allow_tf32`` before it),
so that a later reading of either API in the trainer sees what it set.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_BACKENDS = ("cuda", "mkldnn")  # the matmul backends with a float32 precision switch (oneDNN has one on CPUs too)


def _matmul(backend: str):
    mod = getattr(torch.backends, backend, None)
    return getattr(mod, "matmul", None)


def _new_api() -> bool:
    return hasattr(torch.backends, "fp32_precision") and hasattr(_matmul("cuda"), "fp32_precision")


@contextlib.contextmanager
def float32_exact():
    """Run the body with IEEE float32 matmuls on every backend; the previous settings come back on exit (also on an
    exception). Nested uses are cheap no-ops in effect."""
    if _new_api():
        default = torch.backends.fp32_precision
        saved = []
        for name in _BACKENDS:
            m = _matmul(name)
            if m is None or not hasattr(m, "fp32_precision"):
                continue
            before = m.fp32_precision  # the effective value: the backend's own, or the global one it inherits
            if before in ("ieee", "none"):  # already IEEE ("none" everywhere: torch's default)
                continue
            saved.append((m, "none" if before == default else before))  # "none": inherit again, as it did
            m.fp32_precision = "ieee"
        try:
            yield
        finally:
            for m, value in reversed(saved):
                m.fp32_precision = value
        return
    cuda = _matmul("cuda")  # torch without per-backend precision: the legacy switch only
    before = bool(getattr(cuda, "allow_tf32", False))
    if before:
        cuda.allow_tf32 = False
    try:
        yield
    finally:
        if before:
            cuda.allow_tf32 = True


def exact(fn):
    """Decorator: ``fn`` runs under :func:`float32_exact`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with float32_exact():
            return fn(*args, **kwargs)

    return wrapper
