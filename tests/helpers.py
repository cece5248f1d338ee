"""Helpers shared by the tests (not part of the package)."""

import torch

from relex_callback.params import TensorSpec
from relex_callback.examples.toy import _text


def arena_specs(sizes):
    """Float32 specs ``t0, t1, ...`` laid out one after the other in an arena; returns ``(specs, D)``."""
    specs, o = [], 0
    for i, n in enumerate(sizes):
        specs.append(TensorSpec(name=f"t{i}", shape=(n,), dtype=torch.float32, local_numel=n, offset=o))
        o += n
    return specs, o


def digit_reward(completions, **kwargs) -> list[float]:
    """A dense shaping reward for tests: the fraction of the completion's characters that are digits. Unlike
    :func:`arithmetic_reward` it separates the completions of an untrained model, so GRPO moves the weights from
    step 1."""
    out = []
    for c in completions:
        text = _text(c).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out
