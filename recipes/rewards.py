"""The verifiable math reward shared by ``grpo_relex.py`` and ``evaluate.py``.

The answer is the content of the last ``\\boxed{...}`` in the completion (nested braces allowed); it is compared
with the reference solution by ``math-verify`` (symbolic equality: ``\\frac{1}{2}`` = ``0.5``, ``\\sqrt{4}`` = ``2``).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

_MISSING = (
    "the recipes check answers with math-verify, which is not installed: run `pip install math-verify` "
    "(or `pip install 'relex_callback[recipes]'`)"
)


def _math_verify():
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(_MISSING) from e
    return math_verify


def require_math_verify():
    """Fail early, before a model is loaded, when the verifier is missing."""
    _math_verify()


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; ``None`` if absent."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def completion_text(completion) -> str:
    """Text of a completion in any of TRL's forms: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _parse(mv, expr: str):
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    return mv.parse(expr, parsing_timeout=timeout)


def is_correct(completion: str, solution: str, require_boxed: bool = True) -> bool:
    """Whether ``completion`` answers ``solution``.

    Args:
        completion (`str`): the model's text.
        solution (`str`): the reference: a full solution with a ``\\boxed{}`` answer, or the bare answer.
        require_boxed (`bool`, *optional*, defaults to `True`):
            Only the last ``\\boxed{}`` counts (what the paper's runs reward). With ``False`` a completion without one
            is parsed whole by math-verify (its last number or expression); tiny test models use this.
    """
    mv = _math_verify()
    gold_text = last_boxed(solution)
    gold_text = gold_text if gold_text is not None else str(solution).strip()
    pred_text = last_boxed(completion)
    if pred_text is None:
        if require_boxed:
            return False
        pred_text = completion
    gold = _parse(mv, f"${gold_text}$")
    if not gold:
        return False
    pred = _parse(mv, f"${pred_text}$") if last_boxed(completion) is not None else _parse(mv, pred_text)
    if not pred:
        return False
    try:
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        return bool(mv.verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on exotic inputs; an unverifiable answer earns nothing
        return False


def make_accuracy_reward(require_boxed: bool = True):
    """A GRPO reward function ``(completions, solution, **kwargs) -> list[float]``: 1.0 correct, 0.0 otherwise."""

    def accuracy_reward(completions, solution, **kwargs) -> list[float]:
        return [
            1.0 if is_correct(completion_text(c), s, require_boxed=require_boxed) else 0.0
            for c, s in zip(completions, solution)
        ]

    accuracy_reward.__name__ = "accuracy_reward"
    return accuracy_reward
