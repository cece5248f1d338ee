"""Helpers shared by the tests (not part of the package)."""

from relex_callback.toy import _text


def digit_reward(completions, **kwargs) -> list[float]:
    """A dense shaping reward for tests: the fraction of the completion's characters that are digits. Unlike
    :func:`arithmetic_reward` it separates the completions of an untrained model, so GRPO moves the weights from
    step 1."""
    out = []
    for c in completions:
        text = _text(c).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out
