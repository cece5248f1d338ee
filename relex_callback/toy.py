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
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + DIGITS + SYMBOLS[:-1])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
    )
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


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion starts with the right number, else 0.0 (a verifiable reward for GRPO)."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"] if isinstance(c, list) else str(c)
        out.append(1.0 if extract_answer(text) == str(a) else 0.0)
    return out


def _text(c) -> str:
    return c if isinstance(c, str) else c[-1]["content"] if isinstance(c, list) else str(c)


def digit_reward(completions, **kwargs) -> list[float]:
    """A dense shaping reward for tests: the fraction of the completion's characters that are digits. Unlike
    :func:`arithmetic_reward` it separates the completions of an untrained model, so GRPO moves the weights from
    step 1."""
    out = []
    for c in completions:
        text = _text(c).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out
