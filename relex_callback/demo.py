"""Early stop and extrapolate, end to end on CPU with nothing downloaded: ``python -m relex_callback.demo``.

1. Build a small Qwen2-architecture model and a character tokenizer locally (:mod:`relex_callback.toy`).
2. Warm it up with a few supervised steps on single-digit sums, so that RL starts from a non-zero success rate.
3. Run TRL's ``GRPOTrainer`` on the training sums with the exact-answer verifier as the reward and
   ``RelexCallback(tcut, horizons)``: training stops at ``tcut`` and the horizons are written.
4. Evaluate greedy accuracy (the same verifier) of the warm base, the ``tcut`` model and every extrapolated
   checkpoint on held-out sums (never trained on) and on the training sums; print a table, plot it with matplotlib
   when available.

``--quick`` runs a tiny setting (seconds) for the smoke test. The numbers are whatever this run gives.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

# transformers 5 deprecation notices raised inside TRL (gradient_checkpointing -> activation_checkpointing) say
# nothing a demo user can act on
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m relex_callback.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="relex_demo", help="output directory (default: ./relex_demo)")
    p.add_argument("--warmup-steps", type=int, default=100, help="supervised warm-up steps (default 100)")
    p.add_argument("--tcut", type=int, default=20, help="GRPO steps observed before extrapolating (default 20)")
    p.add_argument("--horizons", default="40,60,100", help="steps to extrapolate to (default 40,60,100)")
    p.add_argument("--lr", type=float, default=3e-5, help="GRPO learning rate, constant (default 3e-5)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--held-out", type=int, default=30, help="sums held out for evaluation (of 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny setting for a smoke test")
    p.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup_steps, a.tcut, a.horizons, a.hidden_size, a.layers = 10, 4, "8,12", 32, 1
    return a


def run(args) -> dict:
    import logging

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from relex_callback import RelexCallback
    from relex_callback.toy import (arithmetic_reward, arithmetic_split, build_model, build_tokenizer, greedy_accuracy,
                                    supervised_warmup)

    cb = RelexCallback(tcut=args.tcut, horizons=args.horizons, overwrite=True)  # bad settings fail before any work
    horizons = cb.horizons
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("relex_callback").setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    tok = build_tokenizer()
    train, test = arithmetic_split(args.held_out, seed=args.seed)
    model = build_model(tok, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)

    def evaluate(m):
        return {"held_out": greedy_accuracy(m, tok, test), "train": greedy_accuracy(m, tok, train)}

    rows = [("init (random)", None, evaluate(model))]
    t = time.perf_counter()
    supervised_warmup(model, tok, train, args.warmup_steps, seed=args.seed)
    rows.append((f"base (SFT {args.warmup_steps} steps)", 0, evaluate(model)))
    t_warm = time.perf_counter() - t

    grpo_args = GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=32, num_generations=8, max_completion_length=3,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=max(horizons),
        temperature=1.0, beta=0.0, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=args.seed, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=grpo_args,
                          train_dataset=Dataset.from_list(train * 20), processing_class=tok, callbacks=[cb])
    t = time.perf_counter()
    trainer.train()
    t_grpo = time.perf_counter() - t
    rows.append((f"GRPO step {trainer.state.global_step} (tcut)", trainer.state.global_step, evaluate(trainer.model)))
    relex_dir = os.path.join(args.out, "relex")
    for h in horizons:
        m = AutoModelForCausalLM.from_pretrained(os.path.join(relex_dir, f"step-{h}"))
        rows.append((f"RELEX step-{h}", h, evaluate(m)))
    rep = cb.report["summary"]
    result = {
        "rows": [{"model": n, "step": s, **acc} for n, s, acc in rows],
        "explained_variance_mean": rep["explained_variance_mean"],
        "r2_mean": rep["r2_mean"],
        "seconds": {"warmup": t_warm, "grpo": t_grpo, "total": time.perf_counter() - t_start},
        "settings": {k: v for k, v in vars(args).items()},
        "held_out_prompts": len(test),
        "train_prompts": len(train),
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_table(result: dict):
    print()
    print(f"{'model':<28} {'held-out acc':>12} {'train acc':>10}")
    for r in result["rows"]:
        print(f"{r['model']:<28} {r['held_out']:>12.3f} {r['train']:>10.3f}")
    print(f"\nexplained variance (mean over tensors) {result['explained_variance_mean']:.3f}, R^2 of the line "
          f"{result['r2_mean']:.3f}; held-out {result['held_out_prompts']} sums, train {result['train_prompts']} sums")
    s = result["seconds"]
    print(f"time: warm-up {s['warmup']:.1f}s, GRPO to tcut {s['grpo']:.1f}s, total {s['total']:.1f}s")


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r["step"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, style in (("held_out", "o-"), ("train", "s--")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=key.replace("_", "-"))
    tcut = result["settings"]["tcut"]
    ax.axvline(tcut, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("GRPO step (after tcut: extrapolated)")
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"RELEX: trained to step {tcut}, extrapolated beyond")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_DISABLED", "true")
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if not args.no_plot:
        path = os.path.join(args.out, "demo.png")
        if plot(result, path):
            print(f"plot: {path}")
        else:
            print("(no plot: install the plot extra, pip install 'relex_callback[plot]')")
    print(f"checkpoints: {os.path.join(args.out, 'relex')}/step-*  (from_pretrained loads them)")
    return result


if __name__ == "__main__":
    main()
