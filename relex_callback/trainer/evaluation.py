"""One quiet evaluation of other weights inside a training run, and the noise of its scores.

:func:`isolated` runs evaluations without leaving a trace on the training run (what it restores is in its docstring;
the private parts of the Trainer it touches are :mod:`relex_callback.compat`'s):

* ``state.log_history``: the entries ``trainer.evaluate()`` appends for the extrapolated models are removed, so they
  are never mistaken for evaluations of the model being trained (``load_best_model_at_end``, plots of
  ``eval_reward`` over steps);
* the other callbacks: none of them (``EarlyStoppingCallback``, W&B, TensorBoard, the progress bar, ``RelexCallback``
  itself) sees the evaluations' ``on_evaluate`` / ``on_log``: they are detached from the trainer's handler meanwhile;
* the random number generators (Python, NumPy, torch CPU and CUDA): saved and restored, so sampling during training
  goes on as without scoring;
* ``model.training``, ``trainer.control``, GRPO's metric accumulators and completion log; with vLLM, the weights are
  synced to the engine before each evaluation and again for the next training step.

:func:`seeded_evaluate` seeds each evaluation with ``args.seed`` (per process, as GRPO seeds itself): the tcut model
and every horizon are scored on the same sampling noise (common random numbers: their differences are less noisy
than independent runs), and a score can be reproduced by ``set_seed(args.seed, device_specific=True);
trainer.evaluate()`` on the ``step-H`` checkpoint. It returns the scores cleaned (:func:`clean_metrics`) with their
standard errors (:func:`standard_errors`) and what they were measured on (:func:`scored_size`).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from accelerate.utils import set_seed

from ..compat import (callbacks_detached, completion_log, evaluate_with_logged_metrics, restore_trainer_buffers,
                      resync_generation, set_completion_log, trainer_buffers)

# Bookkeeping of an evaluation, not a property of the model scored: left out of horizon_eval.
_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "num_tokens", "epoch")


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def isolated(trainer):
    """Run evaluations of other weights inside a training run without leaving a trace: the RNG states,
    ``state.log_history`` (entries appended meanwhile are removed), the callbacks (detached meanwhile),
    ``trainer.control``, ``model.training`` and GRPO's metric accumulators and completion log are as they were
    afterwards (:func:`relex_callback.compat.trainer_buffers`)."""
    history_len = len(trainer.state.log_history)
    buffers = trainer_buffers(trainer)
    model = trainer.model
    was_training = model.training
    rng = _rng_state()
    try:
        with callbacks_detached(trainer):
            yield
    finally:
        del trainer.state.log_history[history_len:]
        model.train(was_training)
        _set_rng_state(rng)
        restore_trainer_buffers(trainer, buffers)  # with vLLM: synced before the next generation


def metric_name(key: str, prefix: str = "eval_") -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def clean_metrics(metrics: dict) -> dict:
    """The evaluation's metrics about the model (``eval_`` prefix dropped): numbers only, bookkeeping and memory
    metrics left out; a NaN becomes ``None``."""
    out = {}
    for k, v in metrics.items():
        name = metric_name(k)
        if name in _BOOKKEEPING or "_mem_" in name or isinstance(v, bool):
            continue
        if v is None:
            out[name] = None
        elif isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
            v = float(v)
            out[name] = v if math.isfinite(v) else None
    return out


def seeded_evaluate(trainer, seed: Optional[int] = None) -> dict:
    """``trainer.evaluate()`` with the RNGs seeded as ``set_seed(seed, device_specific=True)`` (default
    ``args.seed``), cleaned (:func:`clean_metrics`), with the standard error of each score as ``<metric>_stderr``
    (:func:`standard_errors`)."""
    set_seed(trainer.args.seed if seed is None else seed, device_specific=True)
    resync_generation(trainer)  # vLLM: sync the weights just put in before generating
    with _completion_log(trainer) as samples:
        metrics = clean_metrics(evaluate_with_logged_metrics(trainer))  # TRL < 1.5 logs GRPO's eval metrics
    metrics.update(standard_errors(metrics, samples, _eval_size(trainer)))
    metrics.update(scored_size(samples))
    return metrics


def scored_size(samples: dict) -> dict:
    """``{"scored_prompts": P, "scored_completions": C}``: how many distinct prompts and completions one GRPO
    evaluation scored (from its completion log); empty for other trainers. What a score's standard error was measured
    on, so that the prompts a call needs (:func:`relex_callback.trainer.scoring.prompts_needed`) can be priced."""
    prompts = samples.get("prompt") or []
    if not prompts:
        return {}
    return {"scored_prompts": float(len({_prompt_key(p) for p in prompts})), "scored_completions": float(len(prompts))}


# ------------------------------------------------------------------------------------------ a score's noise
STDERR = "_stderr"  # suffix of a score's standard error in horizon_eval ("reward_stderr")


def _unbounded(x):
    """A copy of GRPO's completion log structure whose deques keep everything (the log keeps one generation batch)."""
    if isinstance(x, deque):
        return deque()
    if isinstance(x, defaultdict):
        return defaultdict(deque)
    if isinstance(x, dict):
        return {k: _unbounded(v) for k, v in x.items()}
    return x


@contextmanager
def _completion_log(trainer):
    """GRPO keeps the prompts and every reward function's reward of the last generated completions (gathered over
    processes) in its completion log (:func:`relex_callback.compat.completion_log`); during one evaluation it keeps
    all of them here: ``samples`` is filled with
    ``{"prompt": [...], "rewards": {func: [...]}}`` afterwards (empty for other trainers). The log is put back."""
    samples: dict = {}
    logs = completion_log(trainer)
    if logs is None:
        yield samples
        return
    set_completion_log(trainer, _unbounded(logs))
    try:
        yield samples
        kept = completion_log(trainer)
        samples["prompt"] = list(kept["prompt"])
        samples["rewards"] = {k: list(v) for k, v in kept["rewards"].items()}
        weights = getattr(trainer, "reward_weights", None)
        names = getattr(trainer, "reward_func_names", None)
        if weights is not None and names is not None and len(names) == len(weights):
            samples["weights"] = {n: float(w) for n, w in zip(names, weights)}
    finally:
        set_completion_log(trainer, logs)


def _eval_size(trainer) -> Optional[int]:
    try:
        return len(trainer.eval_dataset)
    except TypeError:
        return None


def _prompt_key(p) -> str:
    try:
        return json.dumps(p, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(p)


def _clustered_se(keys: list, values: list) -> Optional[float]:
    """Standard error of the mean of ``values`` with the prompt as the sampling unit: the spread of the per-prompt
    means over sqrt(number of prompts) (completions of one prompt are not independent draws). ``None`` below two
    prompts or without finite values."""
    groups: dict = {}
    for k, v in zip(keys, values):
        if v is not None and math.isfinite(v):
            groups.setdefault(k, []).append(v)
    means = [sum(g) / len(g) for g in groups.values()]
    n = len(means)
    if n < 2:
        return None
    m = sum(means) / n
    return math.sqrt(sum((x - m) ** 2 for x in means) / (n - 1) / n)


def standard_errors(metrics: dict, samples: dict, n_eval: Optional[int] = None) -> dict:
    """``{"<metric>_stderr": se}`` for the scores whose noise can be measured:

    * GRPO's ``reward`` and ``rewards/<func>/mean``: from the per-prompt spread of the eval rewards
      (:func:`_clustered_se`; ``reward`` is the weighted sum of the functions, as GRPO computes it);
    * a score named like an accuracy (a fraction in ``[0, 1]``) without per-sample data: binomial,
      ``sqrt(p (1 - p) / n)`` over the ``n`` eval examples.

    Others (``loss``) get none."""
    out = {}
    prompts, rewards = samples.get("prompt") or [], samples.get("rewards") or {}
    keys = [_prompt_key(p) for p in prompts]
    usable = {f: r for f, r in rewards.items() if len(r) == len(keys)}
    if keys and usable:
        for f, r in usable.items():
            if f"rewards/{f}/mean" in metrics:
                se = _clustered_se(keys, [float("nan") if v is None else float(v) for v in r])
                if se is not None:
                    out[f"rewards/{f}/mean{STDERR}"] = se
        weights = samples.get("weights") or {f: 1.0 for f in rewards}
        if "reward" in metrics and len(usable) == len(rewards) and set(weights) == set(rewards):
            total = []
            for j in range(len(keys)):
                vals = [(weights[f], rewards[f][j]) for f in rewards]
                ok = [(w, float(v)) for w, v in vals if v is not None and math.isfinite(float(v))]
                total.append(sum(w * v for w, v in ok) if ok else float("nan"))
            se = _clustered_se(keys, total)
            if se is not None:
                out["reward" + STDERR] = se
    for k, v in metrics.items():
        if (k + STDERR not in out and "accuracy" in k and not k.endswith(STDERR) and v is not None and 0 <= v <= 1
                and n_eval):
            out[k + STDERR] = math.sqrt(v * (1 - v) / n_eval)
    return out
