"""The noise axis on the toy model: where, in rollouts per step x learning rate, does
RELEX's checkpoint beat the ``tcut`` checkpoint, and does the window's drift share (``relex_callback.noise``) say so
at ``tcut``?

Every cell is one real GRPO run (``GRPOTrainer``, constant lr) of the replication's 75k-parameter model on the sum
task (``replicate.py``), with every step's weights kept in memory for ``10 x tcut`` steps. From the window (steps
1..tcut) the engine solves RELEX (rank 1, the line), and the naive full-delta line and the ``tcut`` checkpoint are the
baselines; each is scored against the real checkpoint at 2x/5x/10x ``tcut`` (the exact expected reward on all 100
sums, cosine and norm ratio of the move). The drift share is computed from the window's Grams, as the callback does.

    PYTHONPATH=. python recipes/replicate/noise_map.py              # the grid (resumes: finished cells are cached)
    PYTHONPATH=. python recipes/replicate/noise_map.py --analyze    # tables, plot, doc part 3 from the cached cells

Writes ``<out>/cells/*.json`` (one per run), ``<out>/noise_map.json``, ``<out>/noise_map.md``,
``<out>/noise_map.png``, and the block between ``<!-- noise-map:begin -->`` / ``<!-- noise-map:end -->`` of ``--doc``.
"""

from __future__ import annotations

import argparse
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

from task import ExpectedReward, all_problems, sample_problems, warm_up  # noqa: E402
from replicate import cos_ratio, extrapolated, solve_window  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from relex_callback.files.fs import write_json  # noqa: E402
from relex_callback.core import noise  # noqa: E402
from relex_callback.core.backtest import backtest_from_gram  # noqa: E402
from relex_callback.examples.toy import arithmetic_reward, build_model, build_tokenizer  # noqa: E402
from relex_callback.params import plain_tracked, trainable_named_parameters  # noqa: E402

GENERATIONS = 8  # completions per prompt; rollouts per step = prompts x GENERATIONS


def cell_key(rollouts, lr, seed):
    return f"r{rollouts}_lr{lr:g}_s{seed}"


# ---------------------------------------------------------------------------------------------- one cell
def train_cell(cfg, rollouts, lr, seed, jump=None):
    """Warm-up + GRPO for ``cfg.steps`` steps; returns (model, tok, named, theta [N+1, D] fp32, seconds).

    ``jump``: ``(M, mult, reset_adam)`` - at the end of step ``M`` the weights are replaced by RELEX's
    extrapolation of this run's own window (steps 1..M) to step ``mult x M`` (``mult`` None: no jump), and, if
    ``reset_adam``, Adam's moments are cleared (extrapolate-and-continue)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    random.seed(seed)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, layers=2, seed=seed)
    warm_up(model, tok, steps=cfg.warmup, max_operand=9, seed=seed)
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    D = sum(p.numel() for p in params)
    N = cfg.steps
    theta = torch.empty(N + 1, D)
    theta[0] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()
    trainer_box = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            t = state.global_step
            if jump is not None and t == jump[0]:
                if jump[1] is not None:
                    from replicate import extrapolated, solve_window

                    theta[t] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()
                    target = extrapolated(solve_window(named, theta, t), theta[0], jump[1] * t)
                    with torch.no_grad():
                        o = 0
                        for p in params:
                            p.copy_(target[o:o + p.numel()].view_as(p).to(p.dtype))
                            o += p.numel()
                if jump[2]:
                    opt = trainer_box["t"].optimizer
                    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
                    opt.state.clear()  # AdamW re-creates zero moments and step 0 on its next step
            if t <= N:
                theta[t] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()

    prompts = rollouts // GENERATIONS
    ds = Dataset.from_list(sample_problems(N * prompts + 64, 9, seed + 1))
    args = GRPOConfig(
        output_dir=os.path.join(cfg.out, "run", "grpo"), use_cpu=True, bf16=False, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=N,
        per_device_train_batch_size=rollouts, num_generations=GENERATIONS,
        max_completion_length=3, temperature=1.0, beta=0.0, logging_steps=10, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=arithmetic_reward, args=args,
                          train_dataset=ds, callbacks=[Record()])
    trainer_box["t"] = trainer
    t0 = time.perf_counter()
    trainer.train()
    return model, tok, named, theta, time.perf_counter() - t0


def window_grams(named, theta, tcut):
    """Per-tensor Grams ``[S, T, T]`` float64 of the window's deltas Delta_t = theta_t - theta_0, t = 1..tcut."""
    specs = [t.spec for t in plain_tracked(named)]
    M = (theta[1 : tcut + 1] - theta[0]).double()
    out, o = [], 0  # the flat vector is the tensors one after another (spec offsets are the arena's, aligned)
    for sp in specs:
        out.append(M[:, o : o + sp.local_numel] @ M[:, o : o + sp.local_numel].T)
        o += sp.local_numel
    return torch.stack(out), specs


def backtest(G, steps):
    """The callback's in-window backtest (a line on the first half predicting the last step), the existing signal."""
    r = backtest_from_gram(G, steps, True).to_report()
    return {k: r.get(k) for k in ("cosine_global", "norm_ratio_global", "relative_error_global", "direction_cosine")}


def reward_of(model, tok, named):
    """``reward(flat)``: the expected reward over every problem of the model with its weights set to ``flat``."""
    params = [p for _, p in named]
    expected = ExpectedReward(tok, all_problems(9))

    def reward(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(params[0].dtype), params)
        return expected(model)

    return reward


def run_cell(cfg, rollouts, lr, seed):
    t_all = time.perf_counter()
    model, tok, named, theta, t_train = train_cell(cfg, rollouts, lr, seed)
    reward = reward_of(model, tok, named)
    tc, N = cfg.tcut, cfg.steps
    theta0 = theta[0]
    curve = {t: reward(theta[t]) for t in sorted(set(range(0, N + 1, cfg.eval_every)) | {tc, N})}
    sol = solve_window(named, theta, tc)
    sol_late = solve_window(named, theta, tc, fit_start=tc // 2 + 1)  # the line on the window's second half
    G, specs = window_grams(named, theta, tc)
    steps = list(range(1, tc + 1))
    sig = noise.drift_share(G, steps, coeffs=sol.coeffs[:, 0, :], names=[s.name for s in specs])
    if abs(sol.noise.drift_share - sig.drift_share) > 1e-4:  # the engine's own figure (float32 Gram) must agree
        raise RuntimeError(f"engine drift share {sol.noise.drift_share} != {sig.drift_share}")
    bt = backtest(G, steps)
    os.makedirs(os.path.join(cfg.cache), exist_ok=True)  # the window's Grams, to recompute any signal later
    torch.save({"G": G, "steps": steps, "coeffs": sol.coeffs[:, 0, :], "names": [s.name for s in specs]},
               os.path.join(cfg.cache, cell_key(rollouts, lr, seed) + ".pt"))
    rows = []
    for mult in cfg.mults:
        H = mult * tc
        real_delta = theta[H] - theta0
        th = extrapolated(sol, theta0, H)
        th_late = extrapolated(sol_late, theta0, H)
        naive = theta0 + (H / tc) * (theta[tc] - theta0)
        c, r = cos_ratio(th - theta0, real_delta)
        cl, rl = cos_ratio(th_late - theta0, real_delta)
        cn, rn = cos_ratio(naive - theta0, real_delta)
        ct, rt = cos_ratio(theta[tc] - theta0, real_delta)
        rows.append({"H": H, "x_tcut": mult, "real_H": curve.get(H, reward(theta[H])), "tcut": curve[tc],
                     "relex": reward(th), "naive": reward(naive), "cos": c, "norm_ratio": r, "cos_naive": cn,
                     "norm_ratio_naive": rn, "cos_tcut": ct, "norm_ratio_tcut": rt,
                     "relex_late": reward(th_late), "cos_late": cl, "norm_ratio_late": rl})
    # the growth exponent of |Delta_t| over the whole run: 1 for a line, 0.5 for a random walk
    tt = torch.arange(tc, N + 1, dtype=torch.float64)
    nrm = (theta[tc:] - theta0).double().norm(dim=1)
    slope = float(
        torch.linalg.lstsq(torch.stack([tt.log(), torch.ones_like(tt)], 1), nrm.log()[:, None]).solution[0, 0]
    )
    return {"rollouts": rollouts, "prompts": rollouts // GENERATIONS, "lr": lr, "seed": seed, "tcut": tc,
            "steps": N, "seconds_train": round(t_train, 1), "seconds": round(time.perf_counter() - t_all, 1),
            "curve": curve, "rows": rows, "signal": sig.to_json(), "backtest": bt,
            "growth_exponent_tcut_to_end": slope,
            "fit_start_late": tc // 2 + 1,
            "explained_mean": float(sol.explained.mean()), "r2_mean": float(sol.r2[:, 0].mean())}


# ---------------------------------------------------------------------------------------------- extrapolate-and-
# continue
ARMS = {"plain": None, "jump, Adam kept": (2, False), "jump, Adam reset": (2, True), "Adam reset only": (None, True)}


def run_continue(cfg, rollouts, lr, seed):
    """Extrapolate-and-continue: train ``tcut`` steps, jump to RELEX's step ``2 tcut``, keep training to
    ``cfg.steps`` real steps; against plain training and an Adam reset without a jump, at the same real steps."""
    out = {"rollouts": rollouts, "lr": lr, "seed": seed, "tcut": cfg.tcut, "steps": cfg.steps, "arms": {}}
    for arm, spec in ARMS.items():
        t0 = time.perf_counter()
        jump = None if spec is None else (cfg.tcut, spec[0], spec[1])
        model, tok, named, theta, _ = train_cell(cfg, rollouts, lr, seed, jump=jump)
        reward = reward_of(model, tok, named)
        at = set(range(0, cfg.steps + 1, cfg.eval_every)) | {cfg.tcut, 2 * cfg.tcut, cfg.steps // 2, cfg.steps}
        out["arms"][arm] = {"curve": {t: reward(theta[t]) for t in sorted(at)},
                            "seconds": round(time.perf_counter() - t0, 1)}
    return out


def run_continue_grid(cfg):
    torch.set_num_threads(1)
    d = os.path.join(cfg.out, "continue")
    os.makedirs(d, exist_ok=True)
    for pair in cfg.continue_cells:
        rollouts, lr = int(pair.split(",")[0]), float(pair.split(",")[1])
        for seed in cfg.seeds[:2]:
            path = os.path.join(d, cell_key(rollouts, lr, seed) + ".json")
            if os.path.isfile(path):
                continue
            res = run_continue(cfg, rollouts, lr, seed)
            write_json(path, res, indent=1)
            print(f"continue {cell_key(rollouts, lr, seed)}: " + ", ".join(
                f"{a} {v['curve'][cfg.steps]:.3f}" for a, v in res["arms"].items()), flush=True)


# ---------------------------------------------------------------------------------------------- the grid
def grid(cfg):
    cells = []
    for rollouts in cfg.rollouts:
        seeds = cfg.seeds if rollouts <= cfg.max_rollouts_all_seeds else cfg.seeds[:1]
        for lr in cfg.lrs:
            for seed in seeds:
                cells.append((rollouts, lr, seed))
    return cells


def run_grid(cfg):
    torch.set_num_threads(1)
    d = os.path.join(cfg.out, "cells")
    os.makedirs(d, exist_ok=True)
    for rollouts, lr, seed in grid(cfg):
        path = os.path.join(d, cell_key(rollouts, lr, seed) + ".json")
        if os.path.isfile(path):
            continue
        res = run_cell(cfg, rollouts, lr, seed)
        write_json(path, res, indent=1)
        best = max(res["rows"], key=lambda r: r["relex"] - r["tcut"])
        print(f"{cell_key(rollouts, lr, seed)}: {res['seconds']} s, drift share {res['signal']['drift_share']:.3f}, "
              f"best gain {best['relex'] - best['tcut']:+.3f} at {best['x_tcut']}x", flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description="RELEX noise map on the toy model (CPU)")
    p.add_argument("--tcut", type=int, default=20)
    p.add_argument("--mults", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--rollouts", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 5.5e-4, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_rollouts_all_seeds", type=int, default=1024,
                   help="above this many rollouts per step only the first seed runs (the CPU budget)")
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "docs", "replication", "noise_map"))
    p.add_argument("--cache", default="/tmp/relex_noise_map_grams", help="where each cell's window Grams go (.pt)")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "replication.md"))
    p.add_argument("--marker", default="noise-map", help="the doc block <!-- MARKER:begin/end --> that is replaced")
    p.add_argument("--analyze", action="store_true", help="only tables/plot/doc from the cached cells")
    p.add_argument("--continue_cells", nargs="+", metavar="ROLLOUTS,LR",
                   help="instead of the grid: extrapolate-and-continue on these cells (first two seeds)")
    p.add_argument("--time", action="store_true", help="time a few steps per rollout setting and exit")
    cfg = p.parse_args(argv)
    cfg.steps = max(cfg.mults) * cfg.tcut
    bad = [r for r in cfg.rollouts if r % GENERATIONS or r < 2 * GENERATIONS]
    if bad:
        raise SystemExit(f"--rollouts must be multiples of {GENERATIONS} and at least {2 * GENERATIONS}, got {bad}")
    return cfg


def time_settings(cfg):
    torch.set_num_threads(1)
    cfg.steps = 10
    for r in cfg.rollouts:
        t0 = time.perf_counter()
        *_, t = train_cell(cfg, r, cfg.lrs[0], 0)
        print(
            f"rollouts {r}: {t / 10:.3f} s/step (cell total incl. warm-up {time.perf_counter() - t0:.1f} s)", flush=True
        )


if __name__ == "__main__":
    cfg = parse()
    if cfg.time:
        time_settings(cfg)
    else:
        if cfg.continue_cells:
            run_continue_grid(cfg)
        elif not cfg.analyze:
            run_grid(cfg)
        import noise_map_report

        noise_map_report.analyze(cfg)
