"""Tiny local models, tokenizers and a verifiable arithmetic task: what the demo, the tests and the replication
use, so nothing is downloaded. Not part of the method itself."""

from __future__ import annotations

import random
import re
from typing import Optional

import torch

DIGITS = [str(i) for i in range(10)]
SYMBOLS = ["+", "-", "*", "=", "?", " "]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build_tokenizer():
    """A character-level WordLevel tokenizer (digits, + - * = ?) wrapped in ``PreTrainedTokenizerFast``."""
    # deferred here and below: importing transformers takes seconds, and this module is imported by every test
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + DIGITS + SYMBOLS[:-1])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    special = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if "token_type_ids" in fast.model_input_names:  # transformers 4.x's default; a causal LM's tokenizer has none
        # (TRL <= 0.29 passes them to generate(), which Qwen2 refuses). Given to the constructor, so that it is saved
        # with the tokenizer and a reloaded one has none either; on 5.x nothing changes (saved as before).
        names = [n for n in fast.model_input_names if n != "token_type_ids"]
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=names, **special)
    fast.padding_side = "left"
    return fast


def build_model(tokenizer=None, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate_size: Optional[int] = None, tie: bool = True, seed: int = 0, dtype=torch.float32):
    """A randomly initialised Qwen2-architecture causal LM sized for CPU tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=128, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """``{"prompt": "3+4=", "answer": "7"}`` items: single-digit sums with a verifiable answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def extract_answer(completion: str) -> Optional[str]:
    m = re.match(r"\s*(\d+)", completion)
    return m.group(1) if m else None


def _text(c) -> str:
    """Text of a completion: a string, or the last message of a chat completion."""
    return c if isinstance(c, str) else c[-1]["content"] if isinstance(c, list) else str(c)


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion starts with the right number, else 0.0 (a verifiable reward for GRPO)."""
    out = []
    for c, a in zip(completions, answer):
        out.append(1.0 if extract_answer(_text(c)) == str(a) else 0.0)
    return out


CHAR_TARGET = "7"  # the character task: the share of this character in the completion's slots
CHAR_SLOTS = 3  # max_completion_length of the character task


def char_reward(completions, **kwargs) -> list[float]:
    """The share of :data:`CHAR_TARGET` among a completion's :data:`CHAR_SLOTS` slots (a stop leaves slots empty): a
    reward that more of the character only raises, whatever the prompt (docs/replication.md, part 6)."""
    return [_text(c).count(CHAR_TARGET) / CHAR_SLOTS for c in completions]


def arithmetic_split(n_test: int, seed: int = 0, max_operand: int = 9) -> tuple[list[dict], list[dict]]:
    """All sums ``a+b`` with ``0 <= a, b <= max_operand``, split into disjoint train and held-out test problems
    (``n_test`` held out), so evaluation uses prompts never seen in training."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    items = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    if not 0 < n_test < len(items):
        raise ValueError(f"n_test must be between 1 and {len(items) - 1}, got {n_test}")
    return items[n_test:], items[:n_test]


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 3, batch_size: int = 64) -> float:
    """Mean :func:`arithmetic_reward` of greedy completions (the verifier used in training)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    total = 0.0
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            total += sum(arithmetic_reward(texts, [p["answer"] for p in chunk]))
    finally:
        tokenizer.padding_side = side
    return total / max(len(problems), 1)


@torch.no_grad()
def sampled_reward(model, tokenizer, problems: list[dict], reward, samples: int, max_new_tokens: int = 3,
                   seed: int = 0) -> torch.Tensor:
    """Per prompt, the mean ``reward`` of ``samples`` completions sampled at temperature 1 (as GRPO samples them):
    a tensor of ``len(problems)`` values, seeded by ``seed``."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    try:
        enc = tokenizer([p["prompt"] for p in problems], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        answers = [p.get("answer") for p in problems for _ in range(samples)]
        r = torch.tensor(reward(texts, answer=answers), dtype=torch.float64)
    finally:
        tokenizer.padding_side = side
    return r.view(len(problems), samples).mean(1)


def supervised_warmup(model, tokenizer, problems: list[dict], steps: int, lr: float = 3e-3, batch_size: int = 32,
                      seed: int = 0) -> list[float]:
    """A few plain supervised steps on ``prompt + answer + eos`` (loss on the answer only), so that the model
    starts RL with a non-zero success rate. Returns the losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for _ in range(steps):
            batch = [rng.choice(problems) for _ in range(batch_size)]
            texts = [p["prompt"] + p["answer"] + tokenizer.eos_token for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            for j, p in enumerate(batch):
                labels[j, : len(p["prompt"])] = -100  # character-level tokenizer: one token per prompt character
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        tokenizer.padding_side = side
    model.eval()
    return losses
