"""Step clock vs lr clock, side by side, in validation mode: the extrapolated deltas against the real ones at 2x and
4x ``tcut`` (cosine and norm ratio, global over every tensor) on three small runs whose learning rate is scheduled.

* ``grpo_linear``: TRL's GRPOTrainer with GRPOConfig's default schedule (linear decay to 0 at ``max_steps``);
* ``grpo_warmup``: the same with a linear warmup over the first ``tcut / 2`` steps;
* ``toy_lm``: a plain Trainer on the toy model and arithmetic task (relex_callback/examples/toy.py), causal LM loss,
  TrainingArguments' default schedule (linear).

Each run trains to ``4 tcut`` twice with the same seed, once per ``fit_clock``; the two trajectories are the same
(checked: the real delta norms at each horizon agree) and only the fit differs. Prints one line per run, clock and
horizon, and a markdown table with ``--markdown``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/schedule_clock.py [--tcut 8] [--markdown]

Takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from transformers import Trainer, TrainingArguments
import torch
from relex_callback import RelexCallback
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def digit_reward(completions, **kwargs) -> list[float]:
    out = []
    for c in completions:
        text = (c if isinstance(c, str) else c[0]["content"]).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out


def run_grpo(out, tcut, clock, warmup):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok)
    cb = RelexCallback(tcut=tcut, horizons=[2 * tcut, 4 * tcut], stop_training=False, dtype="float32",
                       fit_clock=clock, output_dir=os.path.join(out, "relex"))
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      learning_rate=1e-3, warmup_steps=warmup, max_steps=4 * tcut, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    ds = Dataset.from_list(arithmetic_problems(256, seed=1))
    GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=ds, processing_class=tok,
                callbacks=[cb]).train()
    return cb.report


def run_toy_lm(out, tcut, clock):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok)
    rows = []
    for p in arithmetic_problems(512, seed=0):
        ids = tok(p["prompt"] + p["answer"])["input_ids"][:8]
        ids = ids + [tok.pad_token_id] * (8 - len(ids))
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 8})
    cb = RelexCallback(tcut=tcut, horizons=[2 * tcut, 4 * tcut], stop_training=False, dtype="float32",
                       fit_clock=clock, output_dir=os.path.join(out, "relex"))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, learning_rate=3e-3, max_steps=4 * tcut,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[cb]).train()
    return cb.report


RUNS = {
    "grpo_linear": lambda out, tcut, clock: run_grpo(out, tcut, clock, warmup=0),
    "grpo_warmup": lambda out, tcut, clock: run_grpo(out, tcut, clock, warmup=tcut // 2),
    "toy_lm": run_toy_lm,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tcut", type=int, default=8)
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="relex-clock-")
    rows = []
    for name in (a.only.split(",") if a.only else RUNS):
        for clock in ("steps", "lr"):
            rep = RUNS[name](os.path.join(root, f"{name}-{clock}"), a.tcut, clock)
            for h in (2 * a.tcut, 4 * a.tcut):
                v = rep["validation"][str(h)]
                s = v["summary"]
                real = sum(t["real_norm"] ** 2 for t in v["tensors"]) ** 0.5
                rows.append({"run": name, "clock": clock, "horizon": h, "cosine": s["cosine_global"],
                             "cosine_mean": s["cosine_mean"],
                             "norm_ratio": s["norm_ratio_global"], "relative_error": s["relative_error_global"],
                             "real_norm": real, "clock_in_report": (rep.get("clock") or {}).get("kind", "steps")})
                r = rows[-1]
                print(f"{name:12s} {clock:5s} H={h:3d} cosine {r['cosine']:.4f} (per-tensor mean "
                      f"{r['cosine_mean']:.4f}) norm ratio {r['norm_ratio']:.3f} "
                      f"rel. error {r['relative_error']:.3f} (|real| {real:.4g}; report clock: {r['clock_in_report']})",
                      flush=True)
    if a.markdown:
        print("\n| run | horizon | cosine (steps) | cosine (lr) | norm ratio (steps) | norm ratio (lr) |")
        print("|---|---|---|---|---|---|")
        for name in dict.fromkeys(r["run"] for r in rows):
            for h in (2 * a.tcut, 4 * a.tcut):
                st = next(r for r in rows if r["run"] == name and r["clock"] == "steps" and r["horizon"] == h)
                lr = next(r for r in rows if r["run"] == name and r["clock"] == "lr" and r["horizon"] == h)
                print(f"| {name} | {h} ({h // a.tcut}x) | {st['cosine']:.4f} | {lr['cosine']:.4f} | "
                      f"{st['norm_ratio']:.3f} | {lr['norm_ratio']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
