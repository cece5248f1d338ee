"""Tables and doc block for ``boundary.py``: reads the cached cells, writes ``boundary.json``, ``boundary.md`` and the
``<!-- boundary:begin/end -->`` block of the doc."""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from relex_callback.files.fs import write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_ORDER = {"char": 0, "char_w": 1, "sums2": 2, "graded": 3, "sums": 4}
ROLLOUTS_PER_STEP = 64
# signals the callback reports at tcut, per (run, tcut): (label, getter)
SIGNALS = [
    ("backtest cosine", lambda w: w["backtest"]["cosine_global"]),
    ("backtest norm ratio", lambda w: w["backtest"]["norm_ratio_global"]),
    ("drift share", lambda w: w["signal"]["drift_share"]),
    ("reward trend slope", lambda w: w["trend"]["slope"]),
    (
        "reward trend t (slope/se)",
        lambda w: w["trend"]["slope"] / w["trend"]["stderr"] if w["trend"]["stderr"] else None,
    ),
]


def load(out):
    cells = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "cells", "*.json")))]
    cells.sort(key=lambda c: (TASK_ORDER.get(c["task"], 9), c["lr"], c["seed"]))
    return cells


def verdict(gain, se):
    """``pays`` / ``harms`` when RELEX's gain over the tcut checkpoint is beyond 2 standard errors of its per-prompt
    band, else ``tie``."""
    return "pays" if gain > 2 * se else "harms" if gain < -2 * se else "tie"


def sample_var(pp):
    """Upper bound of the variance of one sampled reward in [0, 1] on a prompt whose expected reward is p: p(1-p)
    (exact for the 0/1 sums reward)."""
    return [p * (1 - p) for p in pp]


def prompts_needed(row, tcut_pp):
    """Eval prompts needed to call pays/harms at 2 standard errors: exact per-prompt scores (prompt spread only), and
    one sampled completion per prompt and checkpoint (adds the sampling variance, bounded by p(1-p))."""
    g = abs(row["gain"])
    if g == 0:
        return math.inf, math.inf
    n_exact = (2 * row["gain_sd"] / g) ** 2
    extra = statistics.fmean(a + b for a, b in zip(sample_var(row["relex_per_prompt"]), sample_var(tcut_pp)))
    n_sampled = 4 * (row["gain_sd"] ** 2 + extra) / g ** 2
    return max(1, math.ceil(n_exact - 1e-9)), max(1, math.ceil(n_sampled - 1e-9))  # no round-off past an integer


def rows_of(cells):
    """One record per (run, tcut, horizon)."""
    out = []
    for c in cells:
        for tc, w in c["tcuts"].items():
            for r in w["rows"]:
                ne, ns = prompts_needed(r, w["tcut_per_prompt"])
                out.append({"task": c["task"], "lr": c["lr"], "seed": c["seed"], "tcut": int(tc), "mult": r["x_tcut"],
                            "H": r["H"], "row": r, "window": w, "verdict": verdict(r["gain"], r["gain_se"]),
                            "n_exact": ne, "n_sampled": ns, "seconds_per_step": c["seconds_per_step"]})
    return out


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def se_over(xs):
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def groups(recs, keys):
    out = {}
    for r in recs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def separation(recs, getter):
    """Ranges of a signal among the (run, tcut) windows whose RELEX paid and harmed at a horizon, and whether one
    threshold splits them without error."""
    pays = [getter(r["window"]) for r in recs if r["verdict"] == "pays"]
    harms = [getter(r["window"]) for r in recs if r["verdict"] == "harms"]
    pays, harms = [x for x in pays if x is not None], [x for x in harms if x is not None]
    if not pays or not harms:
        return pays, harms, None
    split = max(pays) < min(harms) or max(harms) < min(pays)
    return pays, harms, split


def best_threshold(pays, harms):
    """The single threshold (either direction) that classifies the most pays/harms windows right: (accuracy,
    threshold, ">=" when pays lie above it)."""
    best = (0.0, None, None)
    n = len(pays) + len(harms)
    for th in sorted(set(pays) | set(harms)):
        up = (sum(x >= th for x in pays) + sum(x < th for x in harms)) / n
        down = (sum(x <= th for x in pays) + sum(x > th for x in harms)) / n
        for acc, d in ((up, ">="), (down, "<=")):
            if acc > best[0]:
                best = (acc, th, d)
    return best


def fmt_range(xs):
    return f"{min(xs):.3g} .. {max(xs):.3g}" if xs else "-"


def analyze(cfg):
    cells = load(cfg.out)
    if not cells:
        print("no cells")
        return None
    recs = rows_of(cells)
    L = []
    tasks = sorted({c["task"] for c in cells}, key=lambda t: TASK_ORDER.get(t, 9))
    lrs = sorted({c["lr"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    per = {}
    for c in cells:
        per.setdefault((c["task"], c["lr"]), []).append(c["seed"])
    cpu = sum(c["seconds"] for c in cells)
    steps = cells[0]["steps"]
    tcuts = sorted({int(t) for c in cells for t in c["tcuts"]})
    incomplete = [f"{t} lr {lr:g}: seeds {', '.join(map(str, s))}" for (t, lr), s in per.items() if len(s) < len(seeds)]
    L.append(
        f"{len(cells)} GRPO runs of the toy model (tasks {', '.join(tasks)}; lr {', '.join(f'{x:g}' for x in lrs)}; "
        f"seeds {', '.join(map(str, seeds))}; {ROLLOUTS_PER_STEP} rollouts per step), {steps} steps each, "
        f"`tcut` {' and '.join(map(str, tcuts))} from the same runs, horizons "
        f"{', '.join(sorted({str(r['mult']) + 'x' for r in recs}, key=lambda s: int(s[:-1])))} where the run reached "
        f"them; {cpu / 60:.0f} min of one CPU core in all (mean {cpu / len(cells):.0f} s per run, of which training "
        f"{mean([c['seconds_train'] for c in cells]):.0f} s)."
        + (f" Fewer seeds where the budget ran out: {'; '.join(incomplete)}." if incomplete else "")
        + "\n"
    )
    L.append(
        "Scores are exact expected rewards per prompt on all 100 prompts `a+b=` (sums2: on 100 fixed prompts of its "
        "10,000); the band of RELEX - `tcut` is the paired standard error over the prompts, sd(d_i)/sqrt(100), per "
        "run. "
        "Verdict per run: *pays* / *harms* when "
        "the gain is beyond +-2 of its standard errors, else *tie*.\n"
    )

    # ------------------------------------------------------------------ main table
    L.append("#### RELEX against the `tcut` checkpoint and real training (mean over seeds)\n")
    L.append(
        "`tcut` / RELEX / real: rewards at the horizon (the `tcut` checkpoint does not move); RELEX - tcut: mean "
        "over seeds +- its standard error over seeds, and [the mean per-run 2-SE band from the prompts]; kept: "
        "RELEX's gain over real training's gain (ratio of the means; `-` where real training's mean gain is within its "
        "own 2-SE band); "
        "verdicts: runs that pay / tie / harm.\n"
    )
    L.append(
        "| task | lr | tcut | H | tcut / RELEX / real | RELEX - tcut | kept | pays / tie / harms | cos / norm ratio |"
    )
    L.append("|---|---:|---:|---:|---|---|---:|---|---|")
    table = []
    for (task, lr, tc, mult), g in sorted(groups(recs, ["task", "lr", "tcut", "mult"]).items(),
                                          key=lambda kv: (TASK_ORDER.get(kv[0][0], 9), *kv[0][1:])):
        gains = [r["row"]["gain"] for r in g]
        real_gain = mean([r["row"]["real_gain"] for r in g])
        real_band = mean([2 * r["row"]["real_gain_se"] for r in g])
        kept = mean(gains) / real_gain if real_gain > real_band else None  # no share of a gain inside its band
        v = [r["verdict"] for r in g]
        e = {"task": task, "lr": lr, "tcut": tc, "mult": mult, "H": g[0]["H"], "seeds": len(g),
             "tcut_reward": mean([r["row"]["tcut"] for r in g]), "relex": mean([r["row"]["relex"] for r in g]),
             "real": mean([r["row"]["real_H"] for r in g]), "gain": mean(gains), "gain_se_seeds": se_over(gains),
             "band2": mean([2 * r["row"]["gain_se"] for r in g]), "kept": kept,
             "pays": v.count("pays"), "ties": v.count("tie"), "harms": v.count("harms"),
             "cos": mean([r["row"]["cos"] for r in g]), "norm_ratio": mean([r["row"]["norm_ratio"] for r in g])}
        table.append(e)
        se = f" +- {e['gain_se_seeds']:.3f}" if e["seeds"] > 1 else ""
        L.append(
            f"| {task} | {lr:g} | {tc} | {mult}x ({e['H']}) | {e['tcut_reward']:.3f} / {e['relex']:.3f} / "
            f"{e['real']:.3f} | {e['gain']:+.3f}{se} [+-{e['band2']:.4f}] | "
            f"{'-' if kept is None else f'{kept:.2f}'} | {e['pays']} / {e['ties']} / {e['harms']} of {e['seeds']} | "
            f"{e['cos']:.2f} / {e['norm_ratio']:.2f} |"
        )

    # ------------------------------------------------------------------ signals at tcut
    L.append("\n#### Signals at `tcut` (mean over seeds)\n")
    L.append("reward 0 -> tcut: the exact reward of the start and the `tcut` checkpoint; trend: the callback's "
             "`reward_trend` on the logged training reward (one point per step, steps 1..tcut): slope per step, and "
             "runs called rising (slope > 2 se); backtest: the callback's in-window backtest (a line on the first half "
             "predicting step `tcut`); drift share: `report.json`'s `noise.drift_share`. Last column: the verdicts at "
             "2x / 5x / 10x, pays-tie-harms summed over seeds.\n")
    L.append("| task | lr | tcut | reward 0 -> tcut | trend slope (rising) | backtest cos / norm ratio | drift share | "
             "verdicts 2x / 5x / 10x |")
    L.append("|---|---:|---:|---|---|---|---:|---|")
    sig_rows = []
    for (task, lr, tc), g in sorted(groups(recs, ["task", "lr", "tcut"]).items(),
                                    key=lambda kv: (TASK_ORDER.get(kv[0][0], 9), *kv[0][1:])):
        runs = {r["seed"]: r for r in g}.values()
        w = [r["window"] for r in runs]
        c0 = mean(
            [
                next(c for c in cells if c["task"] == task and c["lr"] == lr and c["seed"] == r["seed"])["curve"]["0"]
                for r in runs
            ]
        )
        vs = []
        for m in sorted({r["mult"] for r in g}):
            vv = [r["verdict"] for r in g if r["mult"] == m]
            vs.append(f"{vv.count('pays')}-{vv.count('tie')}-{vv.count('harms')}")
        e = {"task": task, "lr": lr, "tcut": tc, "reward0": c0, "reward_tcut": mean([x["rows"][0]["tcut"] for x in w]),
             "slope": mean([x["trend"]["slope"] for x in w]), "rising": sum(bool(x["trend"]["rising"]) for x in w),
             "runs": len(w), "bt_cos": mean([x["backtest"]["cosine_global"] for x in w]),
             "bt_norm": mean([x["backtest"]["norm_ratio_global"] for x in w]),
             "drift": mean([x["signal"]["drift_share"] for x in w])}
        sig_rows.append(e)
        L.append(f"| {task} | {lr:g} | {tc} | {e['reward0']:.3f} -> {e['reward_tcut']:.3f} | {e['slope']:+.4f} "
                 f"({e['rising']} of {e['runs']}) | {e['bt_cos']:.3f} / {e['bt_norm']:.3f} | {e['drift']:.3f} | "
                 f"{' / '.join(vs)} |")

    # ------------------------------------------------------------------ does a signal separate pays from harms?
    L.append("\n#### Does a signal at `tcut` separate *pays* from *harms*?\n")
    L.append("Per horizon, the signal's range over the (run, `tcut`) windows whose RELEX paid and over those where it "
             "harmed (ties left out); *splits*: one threshold puts every paying window on one side and every harming "
             "one on the other. Windows of one run at `tcut` 20 and 40 share their first 20 steps; the horizons share "
             "the window.\n")
    mults = sorted({r["mult"] for r in recs})
    L.append("| signal | " + " | ".join(f"{m}x: pays / harms (splits?); best threshold" for m in mults) + " |")
    L.append("|---|" + "---|" * len(mults))
    sep = {}
    for label, get in SIGNALS:
        cols = []
        for m in mults:
            p, h, split = separation([r for r in recs if r["mult"] == m], get)
            acc, th, d = best_threshold(p, h) if p and h else (None, None, None)
            sep[f"{label}@{m}x"] = {"pays": p, "harms": h, "splits": split, "best_accuracy": acc, "threshold": th,
                                    "pays_side": d}
            cols.append(f"{fmt_range(p)} ({len(p)}) / {fmt_range(h)} ({len(h)}) "
                        f"({'-' if split is None else 'yes' if split else 'no'})"
                        + (f"; pays {d} {th:.3g}: {acc:.0%} right" if acc is not None else ""))
        L.append(f"| {label} | " + " | ".join(cols) + " |")
    cols = []
    for m in mults:
        rr = [r for r in recs if r["mult"] == m]
        rp = [bool(r["window"]["trend"]["rising"]) for r in rr if r["verdict"] == "pays"]
        rh = [bool(r["window"]["trend"]["rising"]) for r in rr if r["verdict"] == "harms"]
        sep[f"rising@{m}x"] = {"pays_rising": sum(rp), "pays": len(rp), "harms_rising": sum(rh), "harms": len(rh)}
        cols.append(f"rising in {sum(rp)} of {len(rp)} paying / {sum(rh)} of {len(rh)} harming windows")
    L.append("| the callback's `rising` flag (slope > 2 se) | " + " | ".join(cols) + " |")

    # ------------------------------------------------------------------ eval prompts at tcut
    L.append("\n#### Scoring the horizons at `tcut`: eval prompts needed\n")
    L.append(
        "To call pays / harms at 2 standard errors from a score of RELEX's checkpoint and the `tcut` checkpoint on "
        "n eval prompts: n = 4 var / gain^2, per run, from the spread measured on the 100 prompts. *exact*: each "
        "prompt scored exactly (prompt spread only, a lower bound); *sampled*: one sampled completion per prompt "
        "and checkpoint (adds the sampling variance, at most p(1-p) per prompt; exact for sums' 0/1 reward). "
        "Cost: 2n sampled completions, against one training step's 64 rollouts plus its backward pass. Median "
        "over seeds (max in brackets).\n"
    )
    L.append("| task | lr | tcut | " + " | ".join(f"{m}x: exact / sampled" for m in mults) + " |")
    L.append("|---|---:|---:|" + "---|" * len(mults))
    need = []
    for (task, lr, tc), g in sorted(groups(recs, ["task", "lr", "tcut"]).items(),
                                    key=lambda kv: (TASK_ORDER.get(kv[0][0], 9), *kv[0][1:])):
        cols = []
        for m in mults:
            gg = [r for r in g if r["mult"] == m]
            if not gg:
                cols.append("-")
                continue
            ne = [r["n_exact"] for r in gg]
            ns = [r["n_sampled"] for r in gg]
            need.append({"task": task, "lr": lr, "tcut": tc, "mult": m, "exact": ne, "sampled": ns})
            cols.append(f"{statistics.median(ne):.0f} ({max(ne)}) / {statistics.median(ns):.0f} ({max(ns)})")
        L.append(f"| {task} | {lr:g} | {tc} | " + " | ".join(cols) + " |")
    sps = mean([c["seconds_per_step"] for c in cells])
    spp = {t: mean([c["seconds_score_per_prompt"] for c in cells if c["task"] == t]) for t in tasks}
    L.append(
        f"\nOne training step took {sps:.3f} s here (64 rollouts, forward and backward, mean over the runs); exact "
        "scoring took " + ", ".join(f"{spp[t] * 1000:.1f} ms ({t})" for t in tasks) + " per prompt and checkpoint "
        "(one teacher-forced pass over every continuation it sums over). Median n over the windows (sampled, one "
        "completion per prompt and checkpoint), and its cost 2n / 64 in training steps' rollouts:\n"
    )
    L.append("| verdict | " + " | ".join(f"{m}x: n (steps' rollouts)" for m in mults) + " |")
    L.append("|---|" + "---:|" * len(mults))
    summary = {}
    for v in ("pays", "harms"):
        cols = []
        for m in mults:
            ns = [
                r["n_sampled"] for r in recs if r["mult"] == m and r["verdict"] == v and math.isfinite(r["n_sampled"])
            ]
            med = statistics.median(ns) if ns else None
            summary[f"{v}@{m}x"] = med
            cols.append("-" if med is None else f"{med:.0f} ({2 * med / ROLLOUTS_PER_STEP:.1f})")
        L.append(f"| {v} | " + " | ".join(cols) + " |")
    L.append("")

    # ------------------------------------------------------------------ every run
    L.append("<details><summary>Every run</summary>\n")
    L.append(
        "| task | lr | seed | tcut | reward 0 / tcut / end | trend slope +- se | backtest cos / norm | drift share | "
        "RELEX - tcut (2 se) per horizon | seconds |"
    )
    L.append("|---|---:|---:|---:|---|---|---|---:|---|---:|")
    for c in cells:
        for tc, w in c["tcuts"].items():
            tr = w["trend"]
            hs = ", ".join(f"{r['x_tcut']}x {r['gain']:+.3f} ({2 * r['gain_se']:.4f})" for r in w["rows"])
            L.append(f"| {c['task']} | {c['lr']:g} | {c['seed']} | {tc} | {c['curve']['0']:.3f} / "
                     f"{w['rows'][0]['tcut']:.3f} / {c['curve'][str(c['steps'])]:.3f} | {tr['slope']:+.4f} +- "
                     f"{tr['stderr']:.4f} | {w['backtest']['cosine_global']:.3f} / "
                     f"{w['backtest']['norm_ratio_global']:.3f} | {w['signal']['drift_share']:.3f} | {hs} | "
                     f"{c['seconds']:.0f} |")
    L.append("\n</details>\n")
    md = "\n".join(L) + "\n"
    R = {"cells": len(cells), "cpu_seconds": cpu, "table": table, "signals": sig_rows, "separation": sep,
         "prompts_needed": need, "prompts_needed_median": summary}

    return publish(cfg, "boundary", R, md, cfg.marker)


def publish(cfg, name: str, figures: dict, md: str, marker: str) -> dict:
    """``<out>/<name>.json`` (the figures) and ``<out>/<name>.md`` (the tables), each written whole or not at all,
    the tables spliced into ``cfg.doc`` between ``marker``'s comments and printed; returns ``figures``."""
    write_json(os.path.join(cfg.out, f"{name}.json"), figures, indent=1)
    write_text(os.path.join(cfg.out, f"{name}.md"), md)
    if cfg.doc:
        from replicate import splice

        splice(cfg.doc, md, marker=marker)
    print(md)
    return figures


# ---------------------------------------------------------------------------------------------- optimizer controls
CONTROL_ORDER = {"constant": 0, "warmup": 1, "linear": 2, "beta2_0.99": 3, "sgd": 4}
CONTROL_WHAT = {
    "constant": "AdamW (beta2 0.999), constant lr, no warmup: the default grid's runs",
    "warmup": "the same with a linear warmup over the first {warmup} steps, then constant",
    "linear": "the same with the lr decaying linearly to 0 at the run's last step (`GRPOConfig`'s default)",
    "beta2_0.99": "AdamW with beta2 0.99, constant lr",
    "sgd": "SGD with momentum {momentum}, constant lr (chosen by the calibration below)",
}


def load_controls(out):
    cells = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "controls", "*.json")))
             if not p.endswith("sgd_calibration.json")]
    cells.sort(key=lambda c: (TASK_ORDER.get(c["task"], 9), c["lr"], CONTROL_ORDER.get(c["control"]["control"], 9),
                              c["seed"]))
    return cells


def control_records(cells, baseline, max_steps):
    """One record per (run, tcut, horizon) for the controls and for their constant-lr baseline runs (the default
    grid's, horizons up to ``max_steps``); ``steps_row``: the same window solved on the step clock (scheduled
    controls only)."""
    out = []
    for c in baseline:
        for tc, w in c["tcuts"].items():
            for r in w["rows"]:
                if r["H"] <= max_steps:
                    out.append({"task": c["task"], "lr": c["lr"], "seed": c["seed"], "control": "constant",
                                "tcut": int(tc), "mult": r["x_tcut"], "H": r["H"], "row": r, "steps_row": None,
                                "clock": "steps", "verdict": verdict(r["gain"], r["gain_se"])})
    for c in cells:
        for tc, w in c["tcuts"].items():
            steps_rows = {r["H"]: r for r in w.get("rows_steps", [])}
            for r in w["rows"]:
                out.append({"task": c["task"], "lr": c["lr"], "seed": c["seed"], "control": c["control"]["control"],
                            "tcut": int(tc), "mult": r["x_tcut"], "H": r["H"], "row": r,
                            "steps_row": steps_rows.get(r["H"]), "clock": w.get("clock", "steps"),
                            "verdict": verdict(r["gain"], r["gain_se"])})
    return out


def _counts(vs):
    return f"{vs.count('pays')} / {vs.count('tie')} / {vs.count('harms')}"


def analyze_controls(cfg):
    """The ``<!-- boundary-controls:begin/end -->`` block: every control against the constant-lr baseline of the same
    task, lr and seeds; writes ``controls.json`` and ``controls.md`` beside ``boundary.json``."""
    cells = load_controls(cfg.out)
    if not cells:
        print("no control runs")
        return None
    steps = max(c["steps"] for c in cells)
    keys = {(c["task"], c["lr"], c["seed"]) for c in cells}
    baseline = [c for c in load(cfg.out) if (c["task"], c["lr"], c["seed"]) in keys]
    recs = control_records(cells, baseline, steps)
    info = {}
    for c in cells:
        info.setdefault((c["task"], c["control"]["control"]), c["control"])
    tasks = sorted({c["task"] for c in cells}, key=lambda t: TASK_ORDER.get(t, 9))
    lrs = sorted({c["lr"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    controls = sorted({c["control"]["control"] for c in cells}, key=lambda k: CONTROL_ORDER.get(k, 9))
    cpu = sum(c["seconds"] for c in cells)
    cpu_all = cpu + sum(c["seconds"] for c in load(cfg.out))
    any_info = next(iter(info.values()))
    L = []
    L.append(
        f"{len(cells)} control runs (tasks {', '.join(tasks)}; Adam lr {', '.join(f'{x:g}' for x in lrs)}; seeds "
        f"{', '.join(map(str, seeds))}; controls {', '.join(controls)}), {steps} steps each, `tcut` "
        f"{' and '.join(sorted({str(r['tcut']) for r in recs}, key=int))}, horizons up to step {steps}; "
        f"{cpu / 60:.1f} min on one core by the wall clock of each run (mean {cpu / len(cells):.0f} s per run). With "
        f"the default grid: {cpu_all / 60:.0f} min for the whole of part 6, measured the same way. Baseline "
        "(`constant`): the default grid's 400-step runs of the same task, lr and seeds, at the same horizons.\n"
    )
    L.append("| control | optimizer (as built by the Trainer) | lr | schedule |")
    L.append("|---|---|---|---|")
    for k in controls:  # the optimizer, lr and schedule do not depend on the task: one row per control
        i = next(v for (_, kk), v in info.items() if kk == k)
        opt = i["optimizer"] + (f", betas {tuple(i['betas'])}" if i["betas"] else "") + (
            f", momentum {i['momentum']:g}" if i.get("momentum") else "")
        sched = i["lr_scheduler_type"] + (f", {i['warmup_steps']} warmup steps" if i["warmup_steps"] else "")
        L.append(f"| {k} | {opt}; grad-norm clip {i['max_grad_norm']:g} | {i['lr']:g} | {sched} |")
    L.append(
        "\nWhat changes: " + "; ".join(
            f"`{k}`: " + CONTROL_WHAT[k].format(warmup=any_info.get("warmup_steps") or 10, momentum=0.9)
            for k in ["constant"] + controls) + ". The scheduled controls (`warmup`, `linear`) are solved on the lr "
        "clock (the coefficient a line in the cumulative learning rate, the package's default `fit_clock=\"lr\"`, "
        "with the learning rates read from the run's own scheduler); the step-clock fit of the same window is in the "
        "last column. The others have a constant lr, where both clocks are the same fit.\n"
    )

    # ------------------------------------------------------------------ SGD calibration
    cal_path = os.path.join(cfg.out, "controls", "sgd_calibration.json")
    calibration = json.load(open(cal_path)) if os.path.isfile(cal_path) else None
    if calibration:
        rows = calibration["rows"]
        n = rows[0]["steps"]
        L.append(f"SGD's lr, per task: short runs (seed {rows[0]['seed']}, {n} steps) at each SGD lr below, the exact "
                 f"reward gain over the {n} steps against constant-lr AdamW's at lr {rows[0]['adam_lr']:g} (the "
                 "baseline run of the same seed); the pick is the closest gain in log ratio:\n")
        sgd_lrs = sorted({r["sgd_lr"] for r in rows})
        L.append("| task | AdamW gain | " + " | ".join(f"SGD {x:g}" for x in sgd_lrs) + " | picked |")
        L.append("|---|---:|" + "---:|" * len(sgd_lrs) + "---|")
        for t in tasks:
            tr = {r["sgd_lr"]: r for r in rows if r["task"] == t}
            if not tr:
                continue
            p = calibration["picked"].get(t)
            L.append(f"| {t} | {next(iter(tr.values()))['adam_gain']:+.3f} | "
                     + " | ".join(f"{tr[x]['gain']:+.3f}" if x in tr else "-" for x in sgd_lrs)
                     + (f" | {p['sgd_lr']:g} |" if p else " | - |"))
        L.append("")

    # ------------------------------------------------------------------ real training under each control
    order = ["constant"] + [k for k in controls if k != "constant"]
    L.append("#### Real training under each control (exact reward, mean over seeds)\n")
    pts = [0, 20, 40, 100, steps]
    L.append("| task | lr | control | " + " | ".join(f"step {t}" for t in pts) + " |")
    L.append("|---|---:|---|" + "---:|" * len(pts))
    for t, lr in ((t, lr) for t in tasks for lr in lrs):
        for k in order:
            cs = baseline if k == "constant" else [c for c in cells if c["control"]["control"] == k]
            cs = [c for c in cs if c["task"] == t and c["lr"] == lr]
            if cs:
                L.append(f"| {t} | {lr:g} | {k} | " + " | ".join(f"{mean([c['curve'].get(str(p)) for c in cs]):.3f}"
                                                         for p in pts) + " |")
    L.append("")

    # ------------------------------------------------------------------ the table
    L.append("#### RELEX under each control against the `tcut` checkpoint and real training (mean over seeds)\n")
    L.append(
        "Columns as in the table above: `tcut` / RELEX / real at the horizon; RELEX - tcut: mean over seeds +- its "
        "standard error over seeds, [the mean per-run 2-SE band from the prompts]; kept: RELEX's gain over real "
        "training's gain (`-` where real training's mean gain is within its own 2-SE band); verdicts per run; cos / "
        "norm ratio of the extrapolated delta against the real one (1 / 1 is exact). Last column, scheduled "
        "controls only: the same window on the step clock (RELEX - tcut; verdicts; cos / norm ratio).\n"
    )
    L.append("| task | lr | tcut | H | control | tcut / RELEX / real | RELEX - tcut | kept | pays / tie / harms | "
             "cos / norm ratio | step clock |")
    L.append("|---|---:|---:|---:|---|---|---|---:|---|---|---|")
    table = []
    for (task, lr, tc, mult, k), g in sorted(
        groups(recs, ["task", "lr", "tcut", "mult", "control"]).items(),
        key=lambda kv: (TASK_ORDER.get(kv[0][0], 9), kv[0][1], kv[0][2], kv[0][3], order.index(kv[0][4])),
    ):
        gains = [r["row"]["gain"] for r in g]
        real_gain = mean([r["row"]["real_gain"] for r in g])
        real_band = mean([2 * r["row"]["real_gain_se"] for r in g])
        kept = mean(gains) / real_gain if real_gain > real_band else None
        v = [r["verdict"] for r in g]
        e = {"task": task, "lr": lr, "tcut": tc, "mult": mult, "H": g[0]["H"], "control": k, "seeds": len(g),
             "clock": g[0]["clock"], "tcut_reward": mean([r["row"]["tcut"] for r in g]),
             "relex": mean([r["row"]["relex"] for r in g]), "real": mean([r["row"]["real_H"] for r in g]),
             "gain": mean(gains), "gain_se_seeds": se_over(gains), "band2": mean([2 * r["row"]["gain_se"] for r in g]),
             "kept": kept, "pays": v.count("pays"), "ties": v.count("tie"), "harms": v.count("harms"),
             "cos": mean([r["row"]["cos"] for r in g]), "norm_ratio": mean([r["row"]["norm_ratio"] for r in g])}
        sr = [r["steps_row"] for r in g if r["steps_row"]]
        step_col = "-"
        if sr:
            sv = [verdict(x["gain"], x["gain_se"]) for x in sr]
            e["steps"] = {"gain": mean([x["gain"] for x in sr]), "pays": sv.count("pays"), "ties": sv.count("tie"),
                          "harms": sv.count("harms"), "cos": mean([x["cos"] for x in sr]),
                          "norm_ratio": mean([x["norm_ratio"] for x in sr])}
            s = e["steps"]
            step_col = f"{s['gain']:+.3f}; {_counts(sv)}; {s['cos']:.2f} / {s['norm_ratio']:.2f}"
        table.append(e)
        se = f" +- {e['gain_se_seeds']:.3f}" if e["seeds"] > 1 else ""
        L.append(
            f"| {task} | {lr:g} | {tc} | {mult}x ({e['H']}) | {k}{' (lr clock)' if e['clock'] == 'lr' else ''} | "
            f"{e['tcut_reward']:.3f} / {e['relex']:.3f} / {e['real']:.3f} | {e['gain']:+.3f}{se} [+-{e['band2']:.4f}] "
            f"| {'-' if kept is None else f'{kept:.2f}'} | {_counts(v)} of {e['seeds']} | "
            f"{e['cos']:.2f} / {e['norm_ratio']:.2f} | {step_col} |"
        )

    # ------------------------------------------------------------------ pooled per task and control
    L.append("\n#### Pooled per task and control\n")
    L.append("Over every seed, window and horizon above (runs x `tcut` x horizon; the windows of one run share steps, "
             "so these are not independent): verdicts, and the range of the per-row cos and norm ratio.\n")
    L.append("| task | control | pays / tie / harms | cos: median (range) | norm ratio: median (range) | "
             "step clock: pays / tie / harms; norm ratio median |")
    L.append("|---|---|---|---|---|---|")
    pooled = []
    for (task, k), g in sorted(groups(recs, ["task", "control"]).items(),
                               key=lambda kv: (TASK_ORDER.get(kv[0][0], 9), order.index(kv[0][1]))):
        v = [r["verdict"] for r in g]
        cs = [r["row"]["cos"] for r in g]
        ns = [r["row"]["norm_ratio"] for r in g]
        sr = [r["steps_row"] for r in g if r["steps_row"]]
        e = {"task": task, "control": k, "rows": len(g), "pays": v.count("pays"), "ties": v.count("tie"),
             "harms": v.count("harms"), "cos_median": statistics.median(cs), "cos": [min(cs), max(cs)],
             "norm_median": statistics.median(ns), "norm": [min(ns), max(ns)]}
        col = "-"
        if sr:
            sv = [verdict(x["gain"], x["gain_se"]) for x in sr]
            e["steps"] = {"pays": sv.count("pays"), "ties": sv.count("tie"), "harms": sv.count("harms"),
                          "norm_median": statistics.median([x["norm_ratio"] for x in sr])}
            col = f"{_counts(sv)}; {e['steps']['norm_median']:.2f}"
        pooled.append(e)
        L.append(f"| {task} | {k} | {_counts(v)} of {len(g)} | {e['cos_median']:.2f} ({min(cs):.2f} .. "
                 f"{max(cs):.2f}) | {e['norm_median']:.2f} ({min(ns):.2f} .. {max(ns):.2f}) | {col} |")
    L.append("")
    md = "\n".join(L) + "\n"
    R = {"cells": len(cells), "cpu_seconds": cpu, "cpu_seconds_with_default_grid": cpu_all, "table": table,
         "pooled": pooled, "sgd_calibration": calibration}
    return publish(cfg, "controls", R, md, cfg.control_marker)
