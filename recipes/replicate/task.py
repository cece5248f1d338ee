"""The replication's synthetic task: two-operand sums ``a+b=`` with a verifiable answer, a supervised warm-up, and
fast greedy scoring. Uses the toy character tokenizer and Qwen2-architecture model from
``relex_callback.examples.toy``."""

from __future__ import annotations


import torch

from relex_callback.examples.toy import arithmetic_problems, arithmetic_reward


def all_problems(max_operand: int) -> list[dict]:
    """Every ``a+b=`` with ``0 <= a, b <= max_operand``: the fixed evaluation set (the reward of a checkpoint)."""
    return [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(max_operand + 1) for b in range(max_operand + 1)
    ]


def sample_problems(n: int, max_operand: int, seed: int) -> list[dict]:
    return arithmetic_problems(n, seed=seed, max_operand=max_operand)


def encode(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(list(text))


def supervised(model, tok, draw, *, steps: int, width: int, lr: float = 3e-3) -> list[float]:
    """Supervised steps on ``prompt + answer + <eos>`` with the loss on the answer only: each step ``draw()`` gives the
    batch's ``(prompt, answer)`` pairs, ``width`` tokens hold the longest. Returns the loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        pairs = draw()
        batch = len(pairs)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for r, (prompt, answer) in enumerate(pairs):
            p, ans = encode(tok, prompt), encode(tok, answer) + [tok.eos_token_id]
            seq = p + ans
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(ans)
            attn[r, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    return losses


def warm_up(model, tok, *, steps: int, max_operand: int, seed: int, lr: float = 3e-3, batch: int = 64) -> list[float]:
    """Supervised steps on ``a+b=`` + the sum (:func:`supervised`), so that RL starts from a model whose reward is
    above zero but far from 1. Returns the loss per step."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        ab = torch.randint(0, max_operand + 1, (batch, 2), generator=g).tolist()
        return [(f"{a}+{b}=", str(a + b)) for a, b in ab]

    return supervised(model, tok, draw, steps=steps, width=4 + 2 + 1, lr=lr)  # "a+b=" + two answer digits + eos


class Scorer:
    """Greedy accuracy of a model on a fixed problem set (all prompts have the same length, so no padding), with the
    same reward function GRPO trains on."""

    def __init__(self, tok, problems: list[dict], max_new_tokens: int = 3):
        self.tok = tok
        self.problems = problems
        self.ids = torch.tensor([encode(tok, p["prompt"]) for p in problems])
        self.answers = [p["answer"] for p in problems]
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        x = self.ids
        for _ in range(self.max_new_tokens):
            logits = model(input_ids=x).logits[:, -1]
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
        gen = x[:, self.ids.shape[1] :].tolist()
        texts = []
        for row in gen:
            if self.tok.eos_token_id in row:
                row = row[: row.index(self.tok.eos_token_id)]
            texts.append(self.tok.decode(row, skip_special_tokens=True))
        rewards = arithmetic_reward(texts, self.answers)
        return sum(rewards) / len(rewards)


class ExpectedReward:
    """The GRPO reward a model earns in expectation when sampling at temperature 1: the mean over the problems of
    P(answer digits, then <eos>), computed exactly by one teacher-forced forward pass. Unlike greedy accuracy it does
    not saturate at 1.0 as soon as the right answer is the most likely one."""

    def __init__(self, tok, problems: list[dict]):
        seqs, masks = [], []
        for p in problems:
            prompt, ans = encode(tok, p["prompt"]), encode(tok, p["answer"]) + [tok.eos_token_id]
            seqs.append(prompt + ans)
            masks.append([0] * len(prompt) + [1] * len(ans))
        width = max(map(len, seqs))
        self.ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        self.score_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float64)
        self.attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        logits = model(input_ids=self.ids, attention_mask=self.attn).logits[:, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        seq_logp = (logp * self.score_mask[:, 1:]).sum(-1)
        return float(seq_logp.exp().mean())
