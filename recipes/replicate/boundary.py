"""The boundary between tasks where RELEX pays and tasks where it harms, on the toy model.

One real GRPO run (``GRPOTrainer``, constant lr, 8 prompts x 8 completions per step) per (task, lr, seed), every
step's weights kept. From each window (steps 1..tcut, for every ``--tcuts``) the engine solves RELEX (rank 1, the
line, step clock), and RELEX's checkpoint, the ``tcut`` checkpoint and real training are scored at each horizon
``mult x tcut`` that the run reached. Tasks, from "reward keeps rising" to "reward saturates":

* ``char``: the share of the target character ``7`` in the completion's 3 slots (count / 3), from a random
  initialisation (no warm-up);
* ``char_w``: the same reward after the sums warm-up (the start of the sums tasks, whose completions are a number
  and ``<eos>``): a control for the start;
* ``graded``: sums ``a+b=`` with partial credit ``max(0, 1 - |n - (a+b)| / 5)`` for the answer n, after the sums
  warm-up;
* ``sums``: sums with the exact-match reward of parts 1 and 3, after the same warm-up;
* ``sums2``: two-digit sums ``ab+cd=`` (operands 00..99, zero-padded) with the exact-match reward, after a
  supervised warm-up on them (``--warmup2`` steps); a harder task whose reward starts low.

Each checkpoint is scored per prompt, exactly, on all 100 prompts ``a+b=`` (the training distribution): ``char``
by enumerating the 18^2 continuations that do not stop, ``graded`` and ``sums`` by the probability of each 1- or
2-digit answer followed by ``<eos>`` (the convention of ``task.ExpectedReward``); ``sums2`` on 100 fixed prompts
(of its 10,000) by P(answer, then ``<eos>``). The band of a difference between
two checkpoints is its paired standard error over the prompts, sd(d_i) / sqrt(100).

Optimizer controls (``--controls``, all four by default; ``--controls`` alone: none): the same windows on
``--control_tasks`` x ``--control_lrs`` x seeds, ``--control_steps``-step runs, under one change each against the
grid's constant-lr AdamW: ``warmup`` (linear warmup over ``--control_warmup`` steps, then constant), ``linear``
(decay to 0 at the run's last step), ``beta2_0.99`` (AdamW's beta2 0.99) and ``sgd`` (SGD with momentum 0.9 at
:data:`SGD_LR_PER_ADAM_LR` x the Adam lr, from ``--calibrate_sgd``). The scheduled ones are solved on the lr clock
(the learning rates read from the run's scheduler) and, beside it, on the step clock.

    PYTHONPATH=. python recipes/replicate/boundary.py                # the grid, then the controls (runs cached)
    PYTHONPATH=. python recipes/replicate/boundary.py --analyze      # tables and the doc blocks from the cache
    PYTHONPATH=. python recipes/replicate/boundary.py --calibrate_sgd  # short SGD runs for the SGD control's lr

Writes ``<out>/cells/*.json`` (one per run), ``<out>/boundary.json``, ``<out>/boundary.md`` and the block between
``<!-- boundary:begin -->`` / ``<!-- boundary:end -->`` of ``--doc``; for the controls ``<out>/controls/*.json``,
``<out>/controls.json``, ``<out>/controls.md`` and the ``<!-- boundary-controls:begin/end -->`` block.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

from task import all_problems, encode, sample_problems, supervised, warm_up  # noqa: E402
from noise_map import backtest, window_grams  # noqa: E402
from replicate import cos_ratio, extrapolated, make_store, solve_window  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from relex_callback.files.fs import write_json  # noqa: E402
from relex_callback.core import noise  # noqa: E402
from relex_callback.core.clock import resolve, schedule_lrs  # noqa: E402
from relex_callback.core.solver import SolveOptions, solve  # noqa: E402
from relex_callback.core.trend import reward_trend  # noqa: E402
from relex_callback.examples.toy import (CHAR_SLOTS, CHAR_TARGET, arithmetic_reward, build_model,  # noqa: E402
                                        build_tokenizer, char_reward, extract_answer)
from relex_callback.params import trainable_named_parameters  # noqa: E402

GENERATIONS = 8
PROMPTS = 8  # per step: 64 rollouts
COMPLETION = CHAR_SLOTS  # max_completion_length (the character task's slots, relex_callback.examples.toy)
TARGET = CHAR_TARGET
GRADED_SCALE = 5.0
TASKS = ("char", "char_w", "graded", "sums", "sums2")
COMPLETION2 = 4  # sums2: up to 3 answer digits and <eos>

# ---------------------------------------------------------------------------------------------- optimizer controls
# ``constant`` is the default grid itself (AdamW, constant lr, no warmup); the others change one thing each.
WARMUP_STEPS = 10
SGD_MOMENTUM = 0.9
# SGD's lr = SGD_LR_PER_ADAM_LR x the Adam lr of the paired runs: chosen with ``--calibrate_sgd`` (per task, the SGD
# lr of its grid whose exact reward change over the first 40 steps is closest, in log ratio, to constant-lr AdamW's
# at lr 1e-4, seed 0; char and sums both picked SGD lr 1e-3).
SGD_LR_PER_ADAM_LR = 10.0
CONTROLS = {
    "constant": {},
    "warmup": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": WARMUP_STEPS},
    "beta2_0.99": {"adam_beta2": 0.99},
    "sgd": {"optim": "sgd", "optim_args": f"momentum={SGD_MOMENTUM}"},
    "linear": {"lr_scheduler_type": "linear"},
}
SCHEDULED = ("warmup", "linear")  # solved on the lr clock (and on the step clock beside it)


# ---------------------------------------------------------------------------------------------- rewards (training)
def _text(c):
    return c if isinstance(c, str) else c[-1]["content"] if isinstance(c, list) else str(c)


def graded_value(answer: str, truth: str) -> float:
    return max(0.0, 1.0 - abs(int(answer) - int(truth)) / GRADED_SCALE)


def graded_reward(completions, answer, **kw):
    out = []
    for c, a in zip(completions, answer):
        n = extract_answer(_text(c))
        out.append(graded_value(n, a) if n is not None else 0.0)
    return out


def train_reward(task):
    return {
        "char": char_reward,
        "char_w": char_reward,
        "graded": graded_reward,
        "sums": arithmetic_reward,
        "sums2": arithmetic_reward,
    }[task]


# ---------------------------------------------------------------------------------------------- exact per-prompt scores
class CharScore:
    """Per-prompt expected ``char`` reward under sampling at temperature 1, exact: (1/3) sum_k P(x_k = target, no
    <eos> before k), by one teacher-forced pass over every prompt + x1 + x2 with x1, x2 not <eos>."""

    def __init__(self, tok, problems):
        V = len(tok)
        self.eos, self.t = tok.eos_token_id, tok.convert_tokens_to_ids(TARGET)
        self.cont = torch.tensor([v for v in range(V) if v != self.eos])
        K = len(self.cont)
        pr = torch.tensor([encode(tok, p["prompt"]) for p in problems])  # [P, L]
        P, L = pr.shape
        x1 = self.cont.repeat_interleave(K)
        x2 = self.cont.repeat(K)
        self.ids = torch.cat([pr[:, None, :].expand(P, K * K, L), x1.expand(P, -1)[..., None],
                              x2.expand(P, -1)[..., None]], -1).reshape(P * K * K, L + 2)
        self.P, self.K, self.L = P, K, L

    @torch.no_grad()
    def __call__(self, model, chunk=8192):
        model.eval()
        lp = torch.cat([torch.log_softmax(model(input_ids=self.ids[i:i + chunk]).logits[:, self.L - 1:].double(), -1)
                        for i in range(0, len(self.ids), chunk)])  # [B, 3, V]
        p = lp.exp().view(self.P, self.K, self.K, 3, -1)
        p1 = p[:, 0, 0, 0]  # [P, V] first token
        p2 = p[:, :, 0, 1]  # [P, K, V] second | x1
        p3 = p[:, :, :, 2]  # [P, K, K, V] third | x1 x2
        c = self.cont
        q1 = p1[:, c]  # [P, K] P(x1)
        q12 = q1[:, :, None] * p2[:, :, c]  # [P, K, K] P(x1, x2)
        e = p1[:, self.t] + (q1 * p2[:, :, self.t]).sum(1) + (q12 * p3[..., self.t]).sum((1, 2))
        return (e / COMPLETION).float()


class AnswerScore:
    """Per-prompt expected reward of a sums task: sum over the 1- and 2-digit answers n of P(n, then <eos>) g(n),
    by one teacher-forced pass over every prompt + d1 + d2 + <eos>. ``sums``: g = 1 for the right answer (as
    ``task.ExpectedReward``); ``graded``: g = max(0, 1 - |n - truth| / 5) (a leading zero reads as the number)."""

    def __init__(self, tok, problems, graded: bool):
        self.eos = tok.eos_token_id
        digits = encode(tok, "0123456789")
        self.digits = torch.tensor(digits)
        pr = torch.tensor([encode(tok, p["prompt"]) for p in problems])
        P, L = pr.shape
        d1 = self.digits.repeat_interleave(10)
        d2 = self.digits.repeat(10)
        self.ids = torch.cat(
            [
                pr[:, None, :].expand(P, 100, L),
                d1.expand(P, -1)[..., None],
                d2.expand(P, -1)[..., None],
                torch.full((P, 100, 1), self.eos),
            ],
            -1,
        ).reshape(P * 100, L + 3)
        g1 = torch.zeros(P, 10, dtype=torch.float64)
        g2 = torch.zeros(P, 10, 10, dtype=torch.float64)
        for i, p in enumerate(problems):
            for a in range(10):
                g1[i, a] = graded_value(str(a), p["answer"]) if graded else float(str(a) == p["answer"])
                for b in range(10):
                    s = f"{a}{b}"
                    g2[i, a, b] = graded_value(s, p["answer"]) if graded else float(s == p["answer"])
        self.g1, self.g2, self.P, self.L = g1, g2, P, L

    @torch.no_grad()
    def __call__(self, model, chunk=8192):
        model.eval()
        lp = torch.cat(
            [
                torch.log_softmax(
                    model(input_ids=self.ids[i : i + chunk]).logits[:, self.L - 1 : self.L + 2].double(), -1
                )
                for i in range(0, len(self.ids), chunk)
            ]
        )  # [B, 3, V]: after prompt, after d1, after d2
        p = lp.exp().view(self.P, 10, 10, 3, -1)
        pd1 = p[:, 0, 0, 0][:, self.digits]  # [P, 10]
        pe1 = p[:, :, 0, 1, self.eos]  # [P, 10] eos after d1
        pd2 = p[:, :, 0, 1][:, :, self.digits]  # [P, 10, 10]
        pe2 = p[:, :, :, 2, self.eos]  # [P, 10, 10] eos after d1 d2
        e = (pd1 * pe1 * self.g1).sum(1) + (pd1[:, :, None] * pd2 * pe2 * self.g2).sum((1, 2))
        return e.float()


class RightAnswerScore:
    """Per-prompt P(the right answer, then <eos>) under sampling (prompts of one length): ``task.ExpectedReward``
    per prompt."""

    def __init__(self, tok, problems):
        seqs = [encode(tok, p["prompt"]) + encode(tok, p["answer"]) + [tok.eos_token_id] for p in problems]
        L = len(encode(tok, problems[0]["prompt"]))
        width = max(map(len, seqs))
        self.ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in seqs])
        self.mask = torch.tensor([[0] * L + [1] * (len(q) - L) + [0] * (width - len(q)) for q in seqs],
                                 dtype=torch.float64)
        self.attn = (self.mask > 0).long() | (torch.arange(width) < L).long()
        self.P = len(problems)

    @torch.no_grad()
    def __call__(self, model):
        model.eval()
        logits = model(input_ids=self.ids, attention_mask=self.attn).logits[:, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        return (logp * self.mask[:, 1:]).sum(-1).exp().float()


def sums2_problems(n, seed):
    g = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = g.randint(0, 99), g.randint(0, 99)
        out.append({"prompt": f"{a:02d}+{b:02d}=", "answer": str(a + b)})
    return out


SUMS2_EVAL_SEED = 12345  # the 100 fixed evaluation prompts of sums2 (the same for every run)


def warm_up2(model, tok, *, steps, seed, lr=3e-3, batch=64):
    """Supervised steps (:func:`task.supervised`) on two-digit sums ``ab+cd=`` + answer + <eos>."""
    draws = iter(range(steps))

    def draw():
        return [(p["prompt"], p["answer"]) for p in sums2_problems(batch, seed * 100003 + next(draws))]

    supervised(model, tok, draw, steps=steps, width=6 + 3 + 1, lr=lr)


def scorer(task, tok):
    if task == "sums2":
        return RightAnswerScore(tok, sums2_problems(100, SUMS2_EVAL_SEED))
    problems = all_problems(9)
    return CharScore(tok, problems) if task.startswith("char") else AnswerScore(tok, problems, graded=task == "graded")


# ---------------------------------------------------------------------------------------------- one run
def cell_key(task, lr, seed, control="constant"):
    return f"{task}_lr{lr:g}_s{seed}" if control == "constant" else f"{task}_{control}_lr{lr:g}_s{seed}"


def optimizer_lr(control, lr, task, sgd_scale=None):
    """The lr the optimizer gets: ``lr`` itself, or for SGD the calibrated multiple of the paired Adam lr
    (:data:`SGD_LR_PER_ADAM_LR`, or ``sgd_scale``)."""
    if control != "sgd":
        return lr
    return lr * (sgd_scale or SGD_LR_PER_ADAM_LR)


def train_run(cfg, task, lr, seed, control="constant", steps=None, sgd_scale=None):
    """(Warm-up +) GRPO for ``steps`` (default ``cfg.steps``) steps under ``control`` (:data:`CONTROLS`); returns
    (model, tok, named, theta [N+1, D], log_history, seconds, info) where ``info`` holds the optimizer as built and
    the lr each optimizer step ran with (read from the optimizer at each step's start) and the schedule's."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    random.seed(seed)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, layers=2, seed=seed)
    if task == "sums2":
        warm_up2(model, tok, steps=cfg.warmup2, seed=seed)
    elif task != "char" and cfg.warmup:
        warm_up(model, tok, steps=cfg.warmup, max_operand=9, seed=seed)
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    N = steps or cfg.steps
    theta = torch.empty(N + 1, sum(p.numel() for p in params))
    theta[0] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()

    ran_lrs = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            ran_lrs.append(float(optimizer.param_groups[0]["lr"]))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step <= N:
                theta[state.global_step] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()

    n_data = N * PROMPTS + 64
    ds = Dataset.from_list(
        sums2_problems(n_data, seed + 1) if task == "sums2" else sample_problems(n_data, 9, seed + 1)
    )
    opt = {"lr_scheduler_type": "constant", "warmup_steps": 0, **CONTROLS[control]}
    if control == "warmup":
        opt["warmup_steps"] = getattr(cfg, "control_warmup", WARMUP_STEPS)
    args = GRPOConfig(
        output_dir=os.path.join(cfg.out, "run", "grpo"), use_cpu=True, bf16=False,
        learning_rate=optimizer_lr(control, lr, task, sgd_scale), weight_decay=0.0, max_steps=N, **opt,
        per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
        max_completion_length=COMPLETION2 if task == "sums2" else COMPLETION, temperature=1.0, beta=0.0,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=train_reward(task), args=args,
                          train_dataset=ds, callbacks=[Record()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    built = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    group = built.param_groups[0]
    sched, why = schedule_lrs(trainer.lr_scheduler, N, N)
    info = {"control": control, "optimizer": type(built).__name__, "lr": optimizer_lr(control, lr, task, sgd_scale),
            "betas": list(group["betas"]) if "betas" in group else None, "momentum": group.get("momentum"),
            "max_grad_norm": args.max_grad_norm,
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps, "ran_lrs": ran_lrs[:N], "schedule_lrs": sched, "schedule_why": why}
    return model, tok, named, theta, trainer.state.log_history, seconds, info


def paired(a, b):
    """mean(a - b) and its standard error over the prompts, sd(a_i - b_i) / sqrt(P)."""
    d = (a - b).double()
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(d.numel())), float(d.std(unbiased=True))


def horizons(cfg, tc, steps=None):
    return [(m, m * tc) for m in cfg.mults if m * tc <= (steps or cfg.steps)]


def solve_on(named, theta, tc, clock):
    """RELEX's rank-1 line on the window 1..tc against ``clock`` (an lr clock, or ``None``: the step)."""
    if clock is None:
        return solve_window(named, theta, tc)
    store = make_store(named, theta, list(range(1, tc + 1)), "float32")
    return solve(store.rows(), store.steps, store.specs, SolveOptions(rank=1, method="gram", clock=clock))


def run_cell(cfg, task, lr, seed, control="constant"):
    """One run and its windows. ``constant`` is the default grid (``cfg.steps`` steps, the curve every
    ``cfg.eval_every``); a control runs ``cfg.control_steps`` steps and scores only the checkpoints the windows need.
    A scheduled control (:data:`SCHEDULED`) is solved on the lr clock (``rows``) and on the step clock
    (``rows_steps``)."""
    t_all = time.perf_counter()
    N = cfg.steps if control == "constant" else cfg.control_steps
    model, tok, named, theta, history, t_train, info = train_run(cfg, task, lr, seed, control, N)
    params = [p for _, p in named]
    score = scorer(task, tok)
    t_score = []

    def per_prompt(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(params[0].dtype), params)
        t0 = time.perf_counter()
        v = score(model)
        t_score.append(time.perf_counter() - t0)
        return v

    need = (set(range(0, N + 1, cfg.eval_every)) if control == "constant" else {0}) | {N}
    for tc in cfg.tcuts:
        need |= {tc} | {H for _, H in horizons(cfg, tc, N)}
    real = {t: per_prompt(theta[t]) for t in sorted(need)}
    theta0 = theta[0]
    out = {"task": task, "lr": lr, "seed": seed, "steps": N, "prompts": score.P,
           "seconds_train": round(t_train, 1), "seconds_per_step": t_train / N,
           "curve": {t: float(v.mean()) for t, v in real.items()},
           "train_reward": [(h["step"], h["reward"]) for h in history if "reward" in h], "tcuts": {}}
    if control != "constant":
        out["control"] = info

    def rows_for(sol, tc):
        rows = []
        for mult, H in horizons(cfg, tc, N):
            th = extrapolated(sol, theta0, H)
            rx = per_prompt(th)
            g, se, sd = paired(rx, real[tc])
            gr, se_r, _ = paired(real[H], real[tc])
            c, r = cos_ratio(th - theta0, theta[H] - theta0)
            rows.append({"x_tcut": mult, "H": H, "tcut": float(real[tc].mean()), "relex": float(rx.mean()),
                         "real_H": float(real[H].mean()), "gain": g, "gain_se": se, "gain_sd": sd,
                         "real_gain": gr, "real_gain_se": se_r, "cos": c, "norm_ratio": r,
                         "relex_per_prompt": [round(float(x), 6) for x in rx]})
        return rows

    for tc in cfg.tcuts:
        clock, why = (resolve(info["schedule_lrs"], tc, [H for _, H in horizons(cfg, tc, N)], "scheduler")
                      if control in SCHEDULED else (None, "constant lr"))
        if control in SCHEDULED and clock is None:
            raise RuntimeError(f"{control}: no lr clock for tcut {tc} ({why})")
        sol = solve_on(named, theta, tc, clock)
        G, specs = window_grams(named, theta, tc)
        steps = list(range(1, tc + 1))
        sig = noise.drift_share(G, steps, coeffs=sol.coeffs[:, 0, :], names=[s.name for s in specs])
        trend = reward_trend(history, "reward", last=tc)
        w = {"signal": sig.to_json(), "backtest": backtest(G, steps),
             "trend": {k: trend[k] for k in ("slope", "stderr", "rising", "points", "mean")},
             "window_gain": float((real[tc] - real[0]).mean()), "rows": rows_for(sol, tc),
             "tcut_per_prompt": [round(float(x), 6) for x in real[tc]]}
        if control != "constant":
            w["clock"] = "lr" if clock is not None else "steps"
            if clock is not None:
                w["horizons_on_clock"] = {str(H): clock.at(H) for _, H in horizons(cfg, tc, N)}
                w["rows_steps"] = rows_for(solve_on(named, theta, tc, None), tc)
        out["tcuts"][str(tc)] = w
    out["seconds_score_per_prompt"] = sum(t_score) / len(t_score) / score.P
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def grid(cfg):
    return [(task, lr, seed) for seed in cfg.seeds for task in cfg.tasks for lr in cfg.lrs]


def control_grid(cfg):
    return [(task, lr, seed, c) for seed in cfg.seeds for c in cfg.controls for task in cfg.control_tasks
            for lr in cfg.control_lrs if c != "constant"]


def run_grid(cfg):
    """The default grid (``cells/``), then the optimizer controls (``controls/``); finished runs are cached."""
    torch.set_num_threads(1)
    todo = [(t, lr, s, "constant") for t, lr, s in grid(cfg)] + control_grid(cfg)
    for task, lr, seed, control in todo:
        d = os.path.join(cfg.out, "cells" if control == "constant" else "controls")
        os.makedirs(d, exist_ok=True)
        key = cell_key(task, lr, seed, control)
        path = os.path.join(d, key + ".json")
        if os.path.isfile(path):
            continue
        if cfg.deadline and time.time() > cfg.deadline:
            print(f"deadline reached: {key} and the rest not run", flush=True)
            break
        res = run_cell(cfg, task, lr, seed, control)
        write_json(path, res, indent=1)
        summ = "; ".join(f"tcut {tc}: " + " ".join(f"{r['x_tcut']}x {r['gain']:+.3f}" for r in v["rows"])
                         for tc, v in res["tcuts"].items())
        print(f"{key}: {res['seconds']} s, curve 0 {res['curve'][0]:.3f} -> "
              f"{res['curve'][res['steps']]:.3f}; RELEX - tcut {summ}", flush=True)


def calibrate_sgd(cfg):
    """Short SGD runs (momentum :data:`SGD_MOMENTUM`) at ``cfg.sgd_lrs`` on ``cfg.control_tasks``, seed
    ``cfg.seeds[0]``: the exact reward at steps 0, 20 and ``cfg.calibrate_steps``, beside the constant-lr AdamW run of
    the default grid at the same task, lr ``cfg.control_lrs[0]`` and seed (its cached curve). Writes
    ``controls/sgd_calibration.json``; the ratio picked goes into :data:`SGD_LR_PER_ADAM_LR` by hand."""
    torch.set_num_threads(1)
    seed, adam_lr, N = cfg.seeds[0], cfg.control_lrs[0], cfg.calibrate_steps
    rows = []
    for task in cfg.control_tasks:
        base = os.path.join(cfg.out, "cells", cell_key(task, adam_lr, seed) + ".json")
        adam = json.load(open(base))["curve"] if os.path.isfile(base) else {}
        for sgd_lr in cfg.sgd_lrs:
            model, tok, named, theta, _, secs, info = train_run(cfg, task, adam_lr, seed, "sgd", N,
                                                                sgd_scale=sgd_lr / adam_lr)
            params = [p for _, p in named]
            score = scorer(task, tok)
            curve = {}
            for t in (0, 20, N):
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(theta[t].to(params[0].dtype), params)
                curve[str(t)] = float(score(model).mean())
            gain, adam_gain = curve[str(N)] - curve["0"], adam.get(str(N), math.nan) - adam.get("0", math.nan)
            rows.append({"task": task, "seed": seed, "steps": N, "sgd_lr": sgd_lr, "adam_lr": adam_lr, "curve": curve,
                         "gain": gain, "adam_curve": {k: adam.get(k) for k in curve}, "adam_gain": adam_gain,
                         "log_ratio": math.log(gain / adam_gain) if gain > 0 and adam_gain > 0 else None,
                         "seconds": round(secs, 1), "optimizer": info["optimizer"], "momentum": info["momentum"]})
            print(f"calibrate {task} sgd lr {sgd_lr:g}: reward {curve['0']:.3f} -> {curve[str(N)]:.3f} "
                  f"(gain {gain:+.4f}; adam lr {adam_lr:g}: {adam_gain:+.4f})", flush=True)
    picked = {}
    for task in cfg.control_tasks:
        ok = [r for r in rows if r["task"] == task and r["log_ratio"] is not None]
        if ok:
            r = min(ok, key=lambda r: abs(r["log_ratio"]))
            picked[task] = {"sgd_lr": r["sgd_lr"], "ratio": r["sgd_lr"] / adam_lr, "log_ratio": r["log_ratio"]}
    res = {"rows": rows, "picked": picked}
    os.makedirs(os.path.join(cfg.out, "controls"), exist_ok=True)
    write_json(os.path.join(cfg.out, "controls", "sgd_calibration.json"), res, indent=1)
    print(f"picked (closest gain in log ratio, per task): {picked}", flush=True)
    return res


def parse(argv=None):
    p = argparse.ArgumentParser(description="RELEX: paying vs harming tasks on the toy model (CPU)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tcuts", type=int, nargs="+", default=[20, 40])
    p.add_argument("--mults", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--steps", type=int, default=400, help="GRPO steps per run (horizons past it are not scored)")
    p.add_argument("--warmup", type=int, default=60, help="supervised warm-up steps (sums tasks; char starts raw)")
    p.add_argument("--warmup2", type=int, default=300, help="supervised warm-up steps of sums2")
    p.add_argument("--eval_every", type=int, default=40)
    p.add_argument("--deadline", type=float, default=0, help="unix time after which no new cell starts")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "replication", "boundary"))
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "replication.md"))
    p.add_argument("--marker", default="boundary")
    p.add_argument("--analyze", action="store_true", help="only tables and the doc block from the cached cells")
    p.add_argument("--controls", nargs="*", default=[c for c in CONTROLS if c != "constant"], choices=list(CONTROLS),
                   help="optimizer controls run beside the default grid (none: only the default grid)")
    p.add_argument("--control_tasks", nargs="+", default=["char", "sums"], choices=TASKS)
    p.add_argument("--control_lrs", type=float, nargs="+", default=[1e-4])
    p.add_argument("--control_steps", type=int, default=200, help="GRPO steps of a control run")
    p.add_argument("--control_warmup", type=int, default=WARMUP_STEPS, help="warmup steps of the warmup control")
    p.add_argument("--control_marker", default="boundary-controls")
    p.add_argument("--calibrate_sgd", action="store_true", help="only the SGD lr calibration runs")
    p.add_argument("--sgd_lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 1.5e-2, 2e-2, 3e-2])
    p.add_argument("--calibrate_steps", type=int, default=40)
    return p.parse_args(argv)


if __name__ == "__main__":
    cfg = parse()
    if cfg.calibrate_sgd:
        calibrate_sgd(cfg)
        sys.exit(0)
    if not cfg.analyze:
        run_grid(cfg)
    import boundary_report

    boundary_report.analyze(cfg)
    boundary_report.analyze_controls(cfg)
