"""What scoring horizons with the trainer's evaluation says, and what it costs: the demo's task (a small warm-started
Qwen2-architecture model on single-digit sums, exact-answer reward, GRPO at a constant learning rate) with
``RelexCallback(tcut, horizons="auto", evaluate_horizons=True)`` and the held-out sums as GRPO's ``eval_dataset``.

Printed per model (the tcut model and each horizon of the 2x-16x ladder): GRPO's ``eval_reward`` (sampled at
temperature 1 on the held-out prompts, ``num_generations`` completions each, seeded alike for every model), the
greedy held-out accuracy of the written checkpoint (the demo's measure, computed here independently), and the
seconds each scoring took, compared with a training step.

    python bench/scoring.py                 # tcut 20: horizons 40, 80, 160, 320
    python bench/scoring.py --tcut 10 --seed 1

No assertion: figures are printed and written to ``<out>/scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from relex_callback import RelexCallback
from relex_callback.examples.toy import (
    arithmetic_reward,
    arithmetic_split,
    build_model,
    build_tokenizer,
    greedy_accuracy,
    supervised_warmup,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="relex_scoring")
    p.add_argument("--tcut", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--held-out", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    tok = build_tokenizer()
    train, test = arithmetic_split(a.held_out, seed=a.seed)
    model = build_model(tok, hidden_size=64, layers=2, seed=a.seed)
    supervised_warmup(model, tok, train, a.warmup_steps, seed=a.seed)
    cb = RelexCallback(tcut=a.tcut, horizons="auto", overwrite=True)
    args = GRPOConfig(
        output_dir=a.out, per_device_train_batch_size=32, num_generations=8, max_completion_length=3,
        per_device_eval_batch_size=8 * 5, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=10 * a.tcut, temperature=1.0, beta=0.0, logging_steps=5, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, seed=a.seed, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=args,
                          train_dataset=Dataset.from_list(train * 20), eval_dataset=Dataset.from_list(test),
                          processing_class=tok, callbacks=[cb])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rep = cb.report
    scoring = rep["horizon_eval_seconds"]
    step_seconds = (wall - scoring - rep.get("write_seconds", 0.0)) / a.tcut
    relex = os.path.join(a.out, "relex")
    rows = []
    for s in [a.tcut] + list(cb.horizons):
        m = trainer.model if s == a.tcut else AutoModelForCausalLM.from_pretrained(os.path.join(relex, f"step-{s}"))
        e = rep["horizon_eval"][str(s)]
        rows.append({"step": s, "eval_reward": e.get("reward"), "greedy_held_out": greedy_accuracy(m, tok, test),
                     "seconds": e["seconds"]})
    print(f"\n{'model':<14}{'eval_reward':>12}{'greedy acc':>12}{'scoring s':>11}")
    for r in rows:
        name = "tcut" if r["step"] == a.tcut else f"step-{r['step']}"
        print(f"{name:<14}{r['eval_reward']:>12.3f}{r['greedy_held_out']:>12.3f}{r['seconds']:>11.2f}")
    per = [r["seconds"] for r in rows[1:]]
    print(f"best_horizon {rep['best_horizon']} (beats tcut: {rep['horizon_eval_summary']['best_beats_tcut']}); "
          f"scoring {scoring:.1f}s in all, {sum(per) / len(per):.2f}s per horizon = "
          f"{sum(per) / len(per) / step_seconds:.1f} training steps ({step_seconds:.2f}s each); "
          f"{len(test)} held-out prompts x {args.num_generations} completions")
    with open(os.path.join(a.out, "scoring.json"), "w") as f:
        json.dump({"rows": rows, "best_horizon": rep["best_horizon"], "summary": rep["horizon_eval_summary"],
                   "scoring_seconds": scoring, "train_step_seconds": step_seconds, "settings": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
