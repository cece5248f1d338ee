"""Small-scale replication of RELEX's findings on CPU: a tiny Qwen2-architecture model, a synthetic sum task with a
verifiable reward, a supervised warm-up, then a long GRPO run (real ``GRPOTrainer``, constant lr) with
``RelexCallback(stop_training=False)`` and every step's weights recorded, so every horizon has a real checkpoint.
All variants (tcut, rank, fit window, stride, buffer dtype, the naive full-delta line) are solved by the engine on
the recorded snapshots in memory, without re-training.

    PYTHONPATH=. python recipes/replicate/replicate.py --seed 0          # full run: tables + plots in docs/
    PYTHONPATH=. python recipes/replicate/replicate.py --quick --out /tmp/r  # a few dozen steps (the smoke test)

Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/*.png``; with ``--doc`` (default
``docs/replication.md``) the tables replace the block between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import argparse
import json
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

from task import ExpectedReward, Scorer, all_problems, sample_problems, warm_up  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from relex_callback import RelexCallback  # noqa: E402
from relex_callback.core.solver import SolveOptions, solve  # noqa: E402
from relex_callback.examples.toy import arithmetic_reward, build_model, build_tokenizer  # noqa: E402
from relex_callback.params import plain_tracked, trainable_named_parameters  # noqa: E402
from relex_callback.trajectory.store import TrajectoryStore  # noqa: E402


# ---------------------------------------------------------------------------------------------- training
def train(cfg, out_dir):
    """Warm up, then GRPO for ``cfg.steps`` steps; returns (model, tokenizer, names, theta [N+1, D] fp32, logs)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=cfg.hidden, layers=cfg.layers, seed=cfg.seed)
    t0 = time.perf_counter()
    sft = warm_up(model, tok, steps=cfg.warmup, max_operand=cfg.max_operand, seed=cfg.seed)
    t_sft = time.perf_counter() - t0
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    D = sum(p.numel() for p in params)
    theta = torch.empty(cfg.steps + 1, D)
    theta[0] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step <= cfg.steps:
                theta[state.global_step] = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()

    ds = Dataset.from_list(sample_problems(cfg.steps * cfg.prompts_per_step + 64, cfg.max_operand, cfg.seed + 1))
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "run", "grpo"), use_cpu=True, bf16=False, learning_rate=cfg.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=cfg.steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.generations, num_generations=cfg.generations,
        max_completion_length=3, temperature=1.0, beta=0.0, logging_steps=10, save_strategy="no", report_to=[],
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    relex = RelexCallback(tcut=cfg.tcuts[1], horizons=[h for h in cfg.horizons_for(cfg.tcuts[1])], stop_training=False,
                          dtype="float32", output_dir=os.path.join(out_dir, "run", "relex"), overwrite=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=arithmetic_reward, args=args,
                          train_dataset=ds, callbacks=[relex, Record()])
    t1 = time.perf_counter()
    trainer.train()
    t_rl = time.perf_counter() - t1
    logs = {
        "sft_loss_first_last": [sft[0], sft[-1]], "sft_seconds": round(t_sft, 1), "grpo_seconds": round(t_rl, 1),
        "train_reward": [(h["step"], h["reward"]) for h in trainer.state.log_history if "reward" in h],
        "callback_report_summary": relex.report["summary"] if relex.report else None,
        "callback_tcut": cfg.tcuts[1],
    }
    return model, tok, named, theta, logs


# ---------------------------------------------------------------------------------------------- engine helpers
def make_store(named, theta, steps, dtype):
    tracked = plain_tracked(named)
    specs = [t.spec for t in tracked]
    store = TrajectoryStore(specs, len(steps), dtype=dtype, storage="host", skip_unchanged=False)  # every step is a row
    store.set_theta0(split(theta[0], specs))
    for t in steps:
        store.snapshot(t, split(theta[t], specs))
    return store


def split(flat, specs):
    """Per-tensor pieces of a flat parameter vector (the order of ``trainable_named_parameters``)."""
    out, o = [], 0
    for s in specs:
        out.append(flat[o : o + s.local_numel])
        o += s.local_numel
    return out


def solve_window(named, theta, tcut, *, stride=1, rank=1, fit_start=None, dtype="float32"):
    steps = list(range(stride, tcut + 1, stride))
    store = make_store(named, theta, steps, dtype)
    sol = solve(store.rows(), store.steps, store.specs, SolveOptions(rank=rank, fit_start=fit_start, method="gram"))
    return sol


def extrapolated(sol, theta0, H):
    return torch.cat(
        [sol.extrapolate(i, H, theta0[s.offset : s.offset + s.local_numel]).float() for i, s in enumerate(sol.specs)]
    )


def reconstructed(sol, theta0, j):
    """Rank-r reconstruction of recorded row j: theta_0 + sum_k c_k[j] v_k (the real coefficient, no line)."""
    out = theta0.clone()
    for i, s in enumerate(sol.specs):
        seg = slice(s.offset, s.offset + s.local_numel)
        for k in range(sol.rank):
            out[seg] += float(sol.coeffs[i, k, j]) * sol.V[k, seg].float()
    return out


def cos_ratio(pred_delta, real_delta):
    n_p, n_r = pred_delta.norm(), real_delta.norm()
    cos = float(pred_delta @ real_delta / (n_p * n_r).clamp_min(1e-30))
    return cos, float(n_p / n_r.clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- the study
def run(cfg):
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    model, tok, named, theta, logs = train(cfg, out)
    params = [p for _, p in named]
    greedy = Scorer(tok, all_problems(cfg.max_operand))
    expected = ExpectedReward(tok, all_problems(cfg.max_operand))

    def load(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(params[0].dtype), params)

    def reward(flat):
        load(flat)
        return expected(model)

    def greedy_acc(flat):
        load(flat)
        return greedy(model)

    N = cfg.steps
    theta0 = theta[0]
    R = {"config": vars(cfg) | {"tcuts": cfg.tcuts}, "logs": logs}
    curve_steps = sorted(set(list(range(0, N + 1, cfg.eval_every)) + [N] + cfg.tcuts))
    real = {t: reward(theta[t]) for t in curve_steps}
    R["real_reward"] = real
    R["real_greedy_accuracy"] = {t: greedy_acc(theta[t]) for t in curve_steps}

    # Finding 1: rank-1 over the whole run
    full = solve_window(named, theta, N)
    ev = full.explained.tolist()
    names = [s.name for s in full.specs]
    recon_steps = [t for t in curve_steps if t > 0]
    R["finding1"] = {
        "explained_per_tensor": dict(zip(names, ev)),
        "explained_min": min(ev),
        "explained_median": float(torch.tensor(ev).median()),
        "explained_mean": sum(ev) / len(ev),
        "explained_weighted": float((torch.tensor(ev, dtype=torch.float64) * full.total).sum() / full.total.sum()),
        "reconstruction": {
            t: {"real": real[t], "rank1": reward(reconstructed(full, theta0, t - 1))} for t in recon_steps
        },
    }

    # Finding 2: coefficient trajectories over the whole run, line fits
    big = sorted(range(len(names)), key=lambda i: -full.total[i])
    pick = []
    for key in ("embed", "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "norm"):
        cand = [i for i in big if key in names[i]]
        if cand:
            pick.append(cand[0])
    R["finding2"] = {}
    for i in pick:
        c = full.coeffs[i, 0]
        R["finding2"][names[i]] = {"slope": float(full.slope[i, 0]), "intercept": float(full.intercept[i, 0]),
                                   "r2_whole_run": float(full.r2[i, 0]), "explained": ev[i]}
    R["finding2_r2_all"] = {"min": float(full.r2[:, 0].min()), "median": float(full.r2[:, 0].median()),
                            "mean": float(full.r2[:, 0].mean())}

    # Extrapolation (Figure 6): several tcut, horizons up to 10x+
    R["extrapolation"] = {}
    sols = {}
    for tc in cfg.tcuts:
        sol = solve_window(named, theta, tc)
        sols[tc] = sol
        rows = []
        for H in cfg.horizons_for(tc):
            th = extrapolated(sol, theta0, H)
            naive = theta0 + (H / tc) * (theta[tc] - theta0)
            c, r = cos_ratio(th - theta0, theta[H] - theta0)
            cn, rn = cos_ratio(naive - theta0, theta[H] - theta0)
            rows.append({"H": H, "x_tcut": H / tc, "real_H": real.get(H, reward(theta[H])), "real_tcut": real[tc],
                         "relex": reward(th), "naive": reward(naive), "cos": c, "norm_ratio": r,
                         "cos_naive": cn, "norm_ratio_naive": rn})
        R["extrapolation"][tc] = {"r2_mean": float(sol.r2[:, 0].mean()), "explained_mean": float(sol.explained.mean()),
                                  "rows": rows}

    # Ablations at the middle tcut, horizon = the largest one
    tc = cfg.tcuts[1]
    H = cfg.horizons_for(tc)[-1]
    real_delta = theta[H] - theta0

    def entry(label, th):
        c, r = cos_ratio(th - theta0, real_delta)
        return {"variant": label, "reward": reward(th), "cos": c, "norm_ratio": r}

    ab = [{"variant": f"real step {H}", "reward": real.get(H, reward(theta[H])), "cos": 1.0, "norm_ratio": 1.0},
          {"variant": f"real step {tc} (tcut)", **dict(zip(("reward", "cos", "norm_ratio"),
                                                            (real[tc], *cos_ratio(theta[tc] - theta0, real_delta))))}]
    for rank in range(1, 6):
        ab.append(entry(f"rank {rank}", extrapolated(solve_window(named, theta, tc, rank=rank), theta0, H)))
    for fs in (tc // 4, tc // 2):
        ab.append(
            entry(f"rank 1, fit_start {fs}", extrapolated(solve_window(named, theta, tc, fit_start=fs), theta0, H))
        )
    for st in (2, 4, 5):
        if tc % st == 0 and tc // st >= 2:
            ab.append(entry(f"rank 1, stride {st}", extrapolated(solve_window(named, theta, tc, stride=st), theta0, H)))
    ab.append(entry("rank 1, bf16 buffer", extrapolated(solve_window(named, theta, tc, dtype="bfloat16"), theta0, H)))
    ab.append(entry("naive full delta (H/tcut)(theta_tcut - theta_0)", theta0 + (H / tc) * (theta[tc] - theta0)))
    R["ablations"] = {"tcut": tc, "H": H, "rows": ab}
    R["seconds_total"] = round(time.perf_counter() - t_start, 1)

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    md = tables(R, cfg)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    if not cfg.no_plots:
        plots(R, cfg, out, full, pick, names, sols)
    if cfg.doc:
        splice(cfg.doc, md)
    print(md)
    print(f"total {R['seconds_total']} s")
    return R


# ---------------------------------------------------------------------------------------------- output
def tables(R, cfg) -> str:
    L = []
    lg = R["logs"]
    L.append(f"Run: seed {cfg.seed}, model hidden {cfg.hidden} x {cfg.layers} layers, sums 0..{cfg.max_operand}, "
             f"warm-up {cfg.warmup} SFT steps, GRPO {cfg.steps} steps at constant lr {cfg.lr}, "
             f"{cfg.prompts_per_step} prompts x {cfg.generations} generations per step. "
             f"Wall time: warm-up {lg['sft_seconds']} s, GRPO {lg['grpo_seconds']} s, total {R['seconds_total']} s.\n")
    L.append("Reward = the GRPO reward's expectation under sampling at temperature 1, exact: the mean over all "
             f"{(cfg.max_operand + 1) ** 2} problems a+b of P(correct answer, then <eos>). Greedy accuracy of the real "
             "run (it saturates early): " + ", ".join(f"step {t}: {v:.2f}" for t, v in R["real_greedy_accuracy"].items()
                                                        if int(t) % (5 * cfg.eval_every) == 0) + ".\n")
    f1 = R["finding1"]
    L.append("### Finding 1: rank-1 over the whole run\n")
    L.append(
        f"Explained variance sigma1^2/||M||^2 per tensor over steps 1..{cfg.steps}: min {f1['explained_min']:.3f}, "
        f"median {f1['explained_median']:.3f}, mean {f1['explained_mean']:.3f}, "
        f"weighted by ||M||^2 {f1['explained_weighted']:.3f} ({len(f1['explained_per_tensor'])} tensors).\n"
    )
    L.append("| step | real reward | rank-1 reconstruction |\n|---:|---:|---:|")
    for t, v in f1["reconstruction"].items():
        L.append(f"| {t} | {v['real']:.3f} | {v['rank1']:.3f} |")
    L.append("\n### Finding 2: coefficient trajectories, linear fit over the whole run\n")
    L.append("| tensor | explained | R^2 | slope a | intercept b |\n|---|---:|---:|---:|---:|")
    for n, v in R["finding2"].items():
        L.append(f"| {n} | {v['explained']:.3f} | {v['r2_whole_run']:.3f} | {v['slope']:.3g} | {v['intercept']:.3g} |")
    r2 = R["finding2_r2_all"]
    L.append(f"\nR^2 over all tensors: min {r2['min']:.3f}, median {r2['median']:.3f}, mean {r2['mean']:.3f}.\n")
    L.append("### Extrapolation (cf. the paper's Figure 6)\n")
    L.append("cos / norm ratio: of theta_hat(H) - theta_0 against the real theta_H - theta_0 (all tensors together). "
             "naive: theta_0 + (H/tcut)(theta_tcut - theta_0).\n")
    L.append(
        "| tcut | H | H/tcut | real tcut | real H | RELEX H | naive H | cos | norm ratio | cos naive | norm ratio "
        "naive "
        "|"
    )
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tc, e in R["extrapolation"].items():
        for r in e["rows"]:
            L.append(f"| {tc} | {r['H']} | {r['x_tcut']:.1f} | {r['real_tcut']:.3f} | {r['real_H']:.3f} | "
                     f"{r['relex']:.3f} | {r['naive']:.3f} | {r['cos']:.3f} | {r['norm_ratio']:.3f} | "
                     f"{r['cos_naive']:.3f} | {r['norm_ratio_naive']:.3f} |")
    ab = R["ablations"]
    L.append(f"\n### Ablations (tcut {ab['tcut']}, H {ab['H']})\n")
    L.append("| variant | reward at H | cos | norm ratio |\n|---|---:|---:|---:|")
    for r in ab["rows"]:
        L.append(f"| {r['variant']} | {r['reward']:.3f} | {r['cos']:.3f} | {r['norm_ratio']:.3f} |")
    return "\n".join(L) + "\n"


def plots(R, cfg, out, full, pick, names, sols):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = R["real_reward"]
    # 1. explained variance per tensor + reconstruction
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    ev = list(R["finding1"]["explained_per_tensor"].values())
    ax[0].bar(range(len(ev)), ev)
    ax[0].set_ylim(0, 1)
    ax[0].set_xlabel("tensor index")
    ax[0].set_ylabel("explained variance (rank 1)")
    ax[0].set_title(f"rank-1 share over steps 1..{cfg.steps}")
    rec = R["finding1"]["reconstruction"]
    ks = list(rec)
    ax[1].plot(ks, [rec[k]["real"] for k in ks], "o-", label="real")
    ax[1].plot(ks, [rec[k]["rank1"] for k in ks], "s--", label="rank-1 reconstruction")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("reward")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finding1.png"), dpi=90)
    plt.close(fig)
    # 2. coefficient trajectories
    fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.2))
    t = torch.arange(1, cfg.steps + 1, dtype=torch.float64)
    for ax, i in zip(axes if len(pick) > 1 else [axes], pick):
        c = full.coeffs[i, 0]
        ax.plot(t, c, lw=1, label="c_t")
        ax.plot(t, full.slope[i, 0] * t + full.intercept[i, 0], "--", label="fit")
        ax.set_title(f"{names[i].replace('model.', '')[:28]}\nR^2={float(full.r2[i, 0]):.3f}", fontsize=8)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7) if len(pick) > 1 else None
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finding2.png"), dpi=90)
    plt.close(fig)
    # 3. extrapolation
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    xs = sorted(int(k) for k in real)
    ax[0].plot(xs, [real[k] for k in xs], "k-", label="real run")
    for tc, e in R["extrapolation"].items():
        Hs = [r["H"] for r in e["rows"]]
        ax[0].plot(Hs, [r["relex"] for r in e["rows"]], "o--", label=f"RELEX tcut {tc}")
        ax[0].plot(Hs, [r["naive"] for r in e["rows"]], "x:", label=f"naive tcut {tc}")
        ax[1].plot([r["x_tcut"] for r in e["rows"]], [r["cos"] for r in e["rows"]], "o-", label=f"tcut {tc}")
        ax[2].plot([r["x_tcut"] for r in e["rows"]], [r["norm_ratio"] for r in e["rows"]], "o-", label=f"tcut {tc}")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("reward")
    ax[0].legend(fontsize=7)
    ax[1].set_xlabel("H / tcut")
    ax[1].set_ylabel("cos(extrapolated delta, real delta)")
    ax[2].set_xlabel("H / tcut")
    ax[2].set_ylabel("||extrapolated delta|| / ||real delta||")
    ax[2].axhline(1, color="gray", lw=0.5)
    for a in ax[1:]:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "extrapolation.png"), dpi=90)
    plt.close(fig)
    # 4. ablations
    ab = R["ablations"]["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ab) + 1))
    ax.barh([r["variant"] for r in ab][::-1], [r["reward"] for r in ab][::-1])
    ax.set_xlabel(f"reward at step {R['ablations']['H']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ablations.png"), dpi=90)
    plt.close(fig)


def splice(doc, md, marker="results"):
    """Replace the block between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in ``doc`` with ``md``."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if not os.path.isfile(doc):
        return
    text = open(doc).read()
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w") as f:
        f.write(head + begin + "\n" + md + end + tail)


# ---------------------------------------------------------------------------------------------- settings
class Settings(argparse.Namespace):
    def horizons_for(self, tc):
        hs = [h for h in (2 * tc, 5 * tc, 10 * tc, 15 * tc, 20 * tc) if h <= self.steps]
        return hs or [self.steps]


def parse(argv=None) -> Settings:
    p = argparse.ArgumentParser(description="RELEX small-scale replication (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="GRPO steps (the real run every horizon is compared with)")
    p.add_argument("--tcuts", type=int, nargs=3, default=[20, 40, 60])
    p.add_argument("--lr", type=float, default=3e-4, help="constant GRPO learning rate")
    p.add_argument("--warmup", type=int, default=60, help="supervised warm-up steps before RL")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max_operand", type=int, default=9)
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(REPO, "docs", "replication"))
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "replication.md"))
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--quick", action="store_true", help="a few dozen steps: the smoke test")
    cfg = p.parse_args(argv, namespace=Settings())
    if cfg.quick:
        cfg.steps, cfg.tcuts, cfg.warmup, cfg.eval_every = 40, [4, 8, 12], 20, 10
        cfg.prompts_per_step, cfg.doc = 4, None
    if not (cfg.tcuts[0] < cfg.tcuts[1] < cfg.tcuts[2] < cfg.steps):
        raise SystemExit(f"--tcuts must be increasing and below --steps={cfg.steps}, got {cfg.tcuts}")
    return cfg


if __name__ == "__main__":
    run(parse())
