"""Tables, plot and doc section for ``noise_map.py``: reads the cached cells, writes
``noise_map.json``, ``noise_map.md``, ``noise_map.png`` and the ``<!-- noise-map:begin/end -->`` block of the doc."""

from __future__ import annotations

import glob
import json
import math
import os
import random
from replicate import splice as splice_block
import torch
from relex_callback.core import noise

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
COLLAPSED = 0.5  # a run whose real reward at tcut fell below this fraction of its start collapsed (lr too large)
# The signals at tcut that are ranked against RELEX's gain: (label, getter)
SIGNALS = [
    ("drift share", lambda c: c["signal"]["drift_share"]),
    ("drift share in c_t", lambda c: c["signal"]["coef_drift_share"]),
    ("drift share, 2nd half", lambda c: c["signal"]["late_drift_share"]),
    ("speed ratio (2nd/1st half)", lambda c: c["signal"]["speed_ratio"]),
    ("first/last step length^2", lambda c: transient(c)),
    ("backtest norm ratio", lambda c: c["backtest"]["norm_ratio_global"]),
    ("backtest cosine", lambda c: c["backtest"]["cosine_global"]),
]


# ---------------------------------------------------------------------------------------------- statistics
def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    if sa == 0 or sb == 0:
        return float("nan")
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb)


def spearman(a, b, perms=2000, seed=0):
    """Spearman's rho and a two-sided permutation p-value."""
    if len(a) < 3:
        return float("nan"), float("nan")
    ra, rb = ranks(a), ranks(b)
    rho = pearson(ra, rb)
    if rho != rho:
        return rho, float("nan")
    rng = random.Random(seed)
    hits = 0
    rb2 = list(rb)
    for _ in range(perms):
        rng.shuffle(rb2)
        if abs(pearson(ra, rb2)) >= abs(rho) - 1e-12:
            hits += 1
    return rho, (hits + 1) / (perms + 1)


def best_threshold(sig, gain):
    """The signal threshold that best separates gain > 0 (RELEX beat tcut) from the rest: (threshold, accuracy,
    cells above it that paid / cells above it), or None when no cell paid."""
    pos = [s for s, g in zip(sig, gain) if g > 0]
    if not pos:
        return None
    best = None
    for th in sorted(set(sig)):
        pred = [s >= th for s in sig]
        acc = sum(p == (g > 0) for p, g in zip(pred, gain)) / len(sig)
        above = [g for s, g in zip(sig, gain) if s >= th]
        key = (acc, th)
        if best is None or key > best[0]:
            best = (key, th, acc, sum(g > 0 for g in above), len(above))
    return {"threshold": best[1], "accuracy": best[2], "paid_above": best[3], "cells_above": best[4]}


# ---------------------------------------------------------------------------------------------- model check
def predicted_norm_ratio(sig, tcut, H):
    """The naive line's norm ratio that a constant drift plus noise would give:
    |(H/tcut) Delta_tcut| / |Delta_H| with |Delta_t|^2 = t^2 |g|^2 + t sigma^2."""
    g2, s2 = max(sig["drift_sq_per_step"], 0.0), max(sig["noise_sq_per_step"], 0.0)
    num = (H / tcut) ** 2 * (tcut ** 2 * g2 + tcut * s2)
    den = H ** 2 * g2 + H * s2
    return math.sqrt(num / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- analysis
def load_cells(out):
    cells = []
    for p in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
        with open(p) as f:
            cells.append(json.load(f))
    cells.sort(key=lambda c: (c["rollouts"], c["lr"], c["seed"]))
    return cells


def collapsed(c):
    return c["rows"][0]["tcut"] < COLLAPSED * c["curve"]["0"]


def exclusion(cells) -> str:
    """The exclusion rule as applied to these runs: which lrs it dropped, and the kept run whose reward fell most."""
    out = [c for c in cells if collapsed(c)]
    by_lr = {}
    for c in out:
        by_lr[c["lr"]] = by_lr.get(c["lr"], 0) + 1
    total = {}
    for c in cells:
        total[c["lr"]] = total.get(c["lr"], 0) + 1
    text = (f"The exclusion rule is data-driven: a run whose real reward at `tcut` is below {COLLAPSED:.0%} of its "
            f"start's is left out of the counts and rankings. It drops {len(out)} run(s)")
    if by_lr:
        text += (
            " ("
            + ", ".join(f"{n} of the {total[lr]} at lr {lr:g}" for lr, n in sorted(by_lr.items(), reverse=True))
            + ")"
        )
    kept = [c for c in cells if not collapsed(c)]
    if kept:
        w = min(kept, key=lambda c: c["rows"][0]["tcut"] / c["curve"]["0"])
        r = w["rows"][0]["tcut"] / w["curve"]["0"]
        if r < 1:
            text += (
                f"; the kept run whose reward fell most by `tcut` is {w['rollouts']} rollouts, lr {w['lr']:g}, seed "
                f"{w['seed']} ({w['curve']['0']:.3f} -> {w['rows'][0]['tcut']:.3f}, {r:.0%} of its start)"
            )
    return text + "."


def transient(c):
    """Squared length of the first three optimizer steps over the last five of the window (mean of each)."""
    s = c.get("step_sq")
    return None if not s else (sum(s[:3]) / 3) / (sum(s[-5:]) / 5)


def backfill_steps(out, cache):
    """Each cell's squared step lengths |s_t|^2 (summed over tensors) from its cached window Grams, kept in the
    cell's JSON (the Grams themselves are not committed)."""
    for p in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
        with open(p) as f:
            c = json.load(f)
        g = os.path.join(cache, os.path.basename(p)[:-5] + ".pt")
        if "step_sq" in c or not os.path.isfile(g):
            continue
        d = torch.load(g)
        G = d["G"]
        diag = torch.diagonal(G, dim1=1, dim2=2)
        s_sq, _ = noise._moments(diag, torch.diagonal(G, offset=-1, dim1=1, dim2=2), G[:, :, -1])
        c["step_sq"] = [float(x) for x in s_sq.sum(0)]
        from relex_callback.files.fs import write_json

        write_json(p, c, indent=1)


def analyze(cfg):
    out = cfg.out
    backfill_steps(out, cfg.cache)
    cells = load_cells(out)
    if not cells:
        raise SystemExit(f"no cells in {out}/cells: run the grid first")
    mults = sorted({r["x_tcut"] for c in cells for r in c["rows"]})
    live = [c for c in cells if not collapsed(c)]
    R = {"cells": len(cells), "collapsed": [k(c) for c in cells if collapsed(c)], "mults": mults, "ranking": {},
         "threshold": {}, "map": {}}
    for m in mults:
        rows = [(c, next(r for r in c["rows"] if r["x_tcut"] == m)) for c in live]
        gain = [r["relex"] - r["tcut"] for _, r in rows]
        for name, get in SIGNALS:
            have = [(get(c), g) for (c, _), g in zip(rows, gain) if get(c) is not None]
            sig, gn = [x for x, _ in have], [g for _, g in have]
            rho, p = spearman(sig, gn)
            R["ranking"][f"{name}@{m}x"] = {"spearman": rho, "p": p, "n": len(have)}
            R["threshold"][f"{name}@{m}x"] = (
                best_threshold(sig if rho >= 0 else [-x for x in sig], gn) if have else None
            )
        # the naive line's norm ratio: predicted from the signal vs measured
        pr = [predicted_norm_ratio(c["signal"], c["tcut"], r["H"]) for c, r in rows]
        me = [r["norm_ratio_naive"] for _, r in rows]
        R["ranking"][f"norm_ratio_model@{m}x"] = {
            "pearson_log": pearson([math.log(x) for x in pr], [math.log(x) for x in me]),
            "mean_predicted": sum(pr) / len(pr),
            "mean_measured": sum(me) / len(me),
        }
    # the map: mean over seeds per (rollouts, lr)
    keys = sorted({(c["rollouts"], c["lr"]) for c in cells})
    for ro, lr in keys:
        cs = [c for c in cells if c["rollouts"] == ro and c["lr"] == lr]
        e = {"seeds": len(cs), "collapsed": sum(collapsed(c) for c in cs),
             "drift_share": mean([c["signal"]["drift_share"] for c in cs]),
             "late_drift_share": mean([c["signal"]["late_drift_share"] for c in cs]),
             "speed_ratio": mean([c["signal"]["speed_ratio"] for c in cs]),
             "coef_drift_share": mean([c["signal"]["coef_drift_share"] for c in cs]),
             "growth_exponent": mean([c["growth_exponent_tcut_to_end"] for c in cs])}
        for m in mults:
            rs = [next(r for r in c["rows"] if r["x_tcut"] == m) for c in cs]
            e[f"{m}x"] = {k2: mean([r[k2] for r in rs]) for k2 in
                          ("tcut", "real_H", "relex", "naive", "cos", "norm_ratio", "cos_naive", "norm_ratio_naive",
                           "relex_late", "cos_late", "norm_ratio_late")}
            e[f"{m}x"]["relex_beats_tcut"] = sum(r["relex"] > r["tcut"] for r in rs)
            e[f"{m}x"]["late_beats_tcut"] = sum(r["relex_late"] > r["tcut"] for r in rs)
        R["map"][f"{ro}|{lr:g}"] = e
    R["seconds_total"] = round(sum(c["seconds"] for c in cells), 1)
    R["continue"] = continue_summary(out)
    rr = real_runs()
    R["real_runs"] = {"rows": rr, "ranking": {}}
    if len(rr) >= 3:
        for key in ("drift_share", "late_drift_share", "speed_ratio"):
            have = [x for x in rr if x[key] is not None]
            rho, p = spearman([x[key] for x in have], [x["gain"] for x in have])
            R["real_runs"]["ranking"][key] = {"spearman": rho, "p": p, "n": len(have)}
            for src in sorted({x.get("source", "proxy") for x in have}):
                part = [x for x in have if x.get("source", "proxy") == src]
                if len(part) >= 3:
                    r_src, _ = spearman([x[key] for x in part], [x["gain"] for x in part], perms=0)
                    R["real_runs"]["ranking"][key].setdefault("by_source", {})[src] = {
                        "spearman": r_src,
                        "n": len(part),
                    }
    with open(os.path.join(out, "noise_map.json"), "w") as f:
        json.dump(R, f, indent=1)
    md = tables(R, cells, cfg)
    with open(os.path.join(out, "noise_map.md"), "w") as f:
        f.write(md)
    plot(R, cells, live, os.path.join(out, "noise_map.png"))
    if getattr(cfg, "doc", None):
        splice(cfg.doc, md, cfg.marker)
    print(md)
    return R


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def k(c):
    return f"{c['rollouts']} rollouts, lr {c['lr']:g}, seed {c['seed']}"


def continue_summary(out):
    """Item 6: mean reward over seeds per cell and arm at a few real steps."""
    runs = []
    for p in sorted(glob.glob(os.path.join(out, "continue", "*.json"))):
        with open(p) as f:
            runs.append(json.load(f))
    res = {}
    for ro, lr in sorted({(r["rollouts"], r["lr"]) for r in runs}):
        rs = [r for r in runs if r["rollouts"] == ro and r["lr"] == lr]
        tc, N = rs[0]["tcut"], rs[0]["steps"]
        at = sorted({tc, 2 * tc, N // 2, N})
        res[f"{ro}|{lr:g}"] = {"seeds": len(rs), "tcut": tc, "steps": at, "arms": {
            arm: [mean([r["arms"][arm]["curve"][str(t)] for r in rs]) for t in at] for arm in rs[0]["arms"]},
            "wins_at_end": {arm: sum(r["arms"][arm]["curve"][str(N)] > r["arms"]["plain"]["curve"][str(N)] for r in rs)
                            for arm in rs[0]["arms"]},
            "seconds": round(sum(a["seconds"] for r in rs for a in r["arms"].values()), 1)}
    return res


def real_runs(path=os.path.join(REPO, "docs", "replication", "real_results.json")):
    """Part 2's real-model runs: their saved artefacts hold no window Grams (report.json was not kept), only the
    whole run's rank-1 coefficients as mean |c_t| over tensors (normalised to 1 at the end). The same estimators
    on that scalar series over steps 1..tcut are a proxy (the whole run's direction, not the window's), reported as
    such. Rows: (run, tcut, H, gain of RELEX over the tcut checkpoint, proxy signals)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        runs = json.load(f)
    rows = []
    for name, r in runs.items():
        acc = r["accuracy"]
        c = r["whole_run"]["coeffs_mean_abs"]
        steps = r["whole_run"]["steps"]
        for tc in r["setting"]["tcuts"]:
            own = ((r.get("windows") or {}).get(f"tcut{tc}") or {}).get("noise") or {}
            if own.get("drift_share") is not None:  # the window's own signal (runs that kept report.json's noise)
                sig = {"drift_share": own["drift_share"], "late_drift_share": own.get("late_drift_share"),
                       "speed_ratio": own.get("speed_ratio"), "source": "window"}
            else:
                cc = torch.tensor(c[:tc], dtype=torch.float64)
                s = noise.safe(noise.drift_share, (cc[:, None] * cc[None, :])[None], steps[:tc])
                if isinstance(s, str):
                    continue
                sig = {"drift_share": s.drift_share, "late_drift_share": s.late_share, "speed_ratio": s.speed_ratio,
                       "source": "proxy"}
            for key, v in acc.items():
                if key.startswith(f"relex:tcut{tc}@"):
                    H = int(key.split("@")[1])
                    rows.append({"run": name, "tcut": tc, "H": H, "x_tcut": H / tc, "gain": v - acc[f"real@{tc}"],
                                 "real_gain": acc.get(f"real@{H}", float("nan")) - acc[f"real@{tc}"],
                                 "rollouts": r["setting"]["prompts"] * r["setting"]["generations"], **sig})
    return rows


def best_gain(cells, m):
    return max(
        next(r for r in c["rows"] if r["x_tcut"] == m)["relex"] - next(r for r in c["rows"] if r["x_tcut"] == m)["tcut"]
        for c in cells
        if not collapsed(c)
    )


def _f3(x):
    return "-" if x is None else f"{x:.3f}"


def _gain_count(cells, m, key):
    rows = [next(r for r in c["rows"] if r["x_tcut"] == m) for c in cells if not collapsed(c)]
    return sum(r[key] > r["tcut"] for r in rows)


def tables(R, cells, cfg) -> str:
    L = []
    mults = R["mults"]
    tc = cells[0]["tcut"]
    live = len(cells) - len(R["collapsed"])
    by_ro = {}
    for c in cells:
        by_ro.setdefault(c["rollouts"], set()).add((c["lr"], c["seed"]))
    grid = "; ".join(f"{ro} rollouts: {len({lr for lr, _ in v})} lrs x {len({s for _, s in v})} seeds"
                     for ro, v in sorted(by_ro.items()))
    L.append(f"{len(cells)} GRPO runs of the toy model ({grid}; 8 completions per prompt), `tcut` {tc}, horizons "
             + ", ".join(f"{m}x" for m in mults) + f" (steps {', '.join(str(m * tc) for m in mults)}), each "
             f"against real training to step {max(mults) * tc}; {R['seconds_total'] / 60:.0f} min of one CPU core in "
             "all. Reward: the exact expected reward on all 100 sums (the training distribution; the model is far from "
             f"memorising it). {exclusion(cells)}\n")
    L.append("**RELEX beat the `tcut` checkpoint in " + ", ".join(
        f"{_gain_count(cells, m, 'relex')} of {live} runs at {m}x" for m in mults) + "**; with the line fitted on the "
        "window's second half only (`fit_start` = tcut/2 + 1): " + ", ".join(
        f"{_gain_count(cells, m, 'relex_late')} of {live}" for m in mults) + ".\n")
    L.append("#### Signals at `tcut` (mean over seeds)\n")
    L.append("drift share: `report.json`'s `noise.drift_share` (1 = the window moves like a line, 0 = like a random "
             "walk); in c_t: the same inside the rank-1 coefficients; 2nd half: the drift share of steps "
             f"{tc // 2 + 1}..{tc} alone; speed ratio: net speed of the window's second half over its first (1 = a "
             "line); backtest: the callback's existing signal (a line on the first half predicting step `tcut`: norm "
             "ratio); growth exponent: of |theta_t - theta_0| from `tcut` to the end of the real run (1 = a line, "
             "0.5 = a random walk; not known at `tcut`).\n")
    L.append("| rollouts | lr | drift share | in c_t | 2nd half | speed ratio | backtest norm ratio | growth exp. |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, e in R["map"].items():
        ro, lr = key.split("|")
        bt = mean(
            [c["backtest"]["norm_ratio_global"] for c in cells if str(c["rollouts"]) == ro and f"{c['lr']:g}" == lr]
        )
        L.append(
            f"| {ro} | {lr} | {e['drift_share']:.3f} | {e['coef_drift_share']:.3f} | {e['late_drift_share']:.3f} | "
            f"{e['speed_ratio']:.3f} | {bt:.3f} | {e['growth_exponent']:.2f} |"
        )
    L.append("\n#### Outcomes (mean over seeds)\n")
    L.append("Reward of the `tcut` checkpoint / RELEX / RELEX fitted on the 2nd half / the naive line theta_0 + "
             "(H/tcut)(theta_tcut - theta_0) / real training at H; RELEX's cosine and norm ratio against the real "
             "move; `beat`: runs where RELEX (and the 2nd-half fit) scored above the `tcut` checkpoint.\n")
    L.append("| rollouts | lr | H | tcut / RELEX / 2nd-half / naive / real | cos / norm ratio | beat |")
    L.append("|---:|---:|---:|---|---|---:|")
    for key, e in R["map"].items():
        ro, lr = key.split("|")
        for m in mults:
            x = e[f"{m}x"]
            L.append(f"| {ro} | {lr} | {m}x | {x['tcut']:.3f} / {x['relex']:.3f} / {x['relex_late']:.3f} / "
                     f"{x['naive']:.3f} / {x['real_H']:.3f} | {x['cos']:.2f} / {x['norm_ratio']:.2f} | "
                     f"{x['relex_beats_tcut']}, {x['late_beats_tcut']} of {e['seeds']} |")
    L.append("\n#### Does any signal rank RELEX's gain over `tcut`?\n")
    L.append("Spearman's rho across the non-collapsed runs between the signal at `tcut` and RELEX's reward minus the "
             "`tcut` checkpoint's, per horizon (p: two-sided permutation test, 2,000 shuffles).\n")
    L.append("| signal | " + " | ".join(f"{m}x: rho (p)" for m in mults) + " |")
    L.append("|---|" + "---:|" * len(mults))
    for name, _ in SIGNALS:
        L.append(f"| {name} | " + " | ".join(
            f"{R['ranking'][f'{name}@{m}x']['spearman']:+.2f} ({R['ranking'][f'{name}@{m}x']['p']:.3f})" for m in mults)
            + " |")
    L.append("")
    for m in mults:
        pos = _gain_count(cells, m, "relex")
        if pos == 0:
            L.append(f"* {m}x: RELEX beat `tcut` in no run, so no threshold can be derived: every signal's ranking "
                     "orders degrees of harm, not gains.")
            continue
        for name, _ in SIGNALS:
            th, rk = R["threshold"][f"{name}@{m}x"], R["ranking"][f"{name}@{m}x"]
            if th and rk["p"] < 0.05 and th["paid_above"] >= 2:
                sign = ">=" if rk["spearman"] >= 0 else "<="
                L.append(f"* {m}x, {name} {sign} {abs(th['threshold']):.3f}: {th['paid_above']} of "
                         f"{th['cells_above']} runs past it paid ({th['accuracy']:.0%} of runs classified right).")
        L.append(f"* {m}x: RELEX paid in {pos} of {live} runs (best gain {best_gain(cells, m):+.3f}); a threshold is "
                 "printed above only where a signal ranks the gains (p < 0.05) and at least two paying runs lie past "
                 "it; otherwise there are too few paying runs to place one.")
    L.append("\nThe drift-plus-noise model behind the drift share predicts the naive line's overshoot "
             "|(H/tcut) Delta_tcut| / |Delta_H| = sqrt((H/tcut)^2 (tcut^2 g^2 + tcut s^2) / (H^2 g^2 + H s^2)) from "
             "the window's g^2 and s^2:\n")
    L.append("| horizon | predicted norm ratio (mean) | measured (mean) | correlation of logs |\n|---|---:|---:|---:|")
    for m in mults:
        x = R["ranking"][f"norm_ratio_model@{m}x"]
        L.append(f"| {m}x | {x['mean_predicted']:.2f} | {x['mean_measured']:.2f} | {x['pearson_log']:+.2f} |")
    cont = R.get("continue") or {}
    if cont:
        L.append("\n#### Extrapolate-and-continue\n")
        L.append(f"Train `tcut` = {tc} steps, jump the weights to RELEX's step 2 x `tcut` (this run's own window), "
                 "keep training with Adam's moments kept or reset; controls: plain training, and an Adam reset at "
                 "`tcut` without a jump. Reward (mean over seeds) at the same number of real optimizer steps; "
                 "`wins`: seeds where the arm ended above plain training.\n")
        for key, e in cont.items():
            ro, lr = key.split("|")
            L.append(f"{ro} rollouts, lr {lr}, {e['seeds']} seeds ({e['seconds'] / 60:.1f} min):\n")
            L.append("| arm | " + " | ".join(f"step {t}" for t in e["steps"]) + " | wins at the end |")
            L.append("|---|" + "---:|" * len(e["steps"]) + "---:|")
            for arm, vals in e["arms"].items():
                L.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {e['wins_at_end'][arm]} |")
            L.append("")
    rr = R.get("real_runs") or {}
    if rr.get("rows") and getattr(cfg, "marker", "noise-map") == "noise-map":  # once, in the main map
        L.append(
            "#### The real-model runs (part 2's six: a proxy; the 128/256-rollout runs: the window's own signal)\n"
        )
        L.append("The six runs of part 2 kept no window Grams (report.json was not saved), so the drift share itself "
                 "cannot be computed for them without re-running them. What they do hold is the whole run's rank-1 "
                 "coefficient, as mean |c_t| over tensors; the same estimators on its steps 1..`tcut` are a proxy (the "
                 "whole run's direction, scalar, normalised; `proxy` below). The runs at 128 and 256 rollouts per step "
                 "(`rise-r128`, `rise-r256`) kept `report.json[\"noise\"]` of their window (`window` below). Gain: "
                 "held-out greedy accuracy of RELEX minus the `tcut` checkpoint's (40 sums; 32 for `easy`, 64 for the "
                 "128/256-rollout runs).\n")
        L.append(
            "| run | rollouts | tcut | H | RELEX - tcut | real - tcut | drift share | signal | 2nd half | speed ratio |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for x in rr["rows"]:
            L.append(f"| {x['run']} | {x.get('rollouts', '-')} | {x['tcut']} | {x['H']} | {x['gain']:+.3f} | "
                     f"{x['real_gain']:+.3f} | {x['drift_share']:.3f} | {x.get('source', 'proxy')} | "
                     f"{_f3(x['late_drift_share'])} | {_f3(x['speed_ratio'])} |")
        L.append(
            "\nSpearman's rho of the signal with RELEX's gain over the " + str(len(rr["rows"])) + " (run, tcut, H) "
            "rows (not independent: horizons of one run share the signal"
            + (
                "; proxy and window signals ranked together"
                if any(x.get("source") == "window" for x in rr["rows"])
                else ""
            )
            + "): "
            + ", ".join(
                f"{k.replace('_', ' ')} {v['spearman']:+.2f} (p {v['p']:.3f}, {v['n']} rows"
                + "".join(
                    f"; {src} rows alone {b['spearman']:+.2f}, {b['n']} rows"
                    for src, b in sorted((v.get("by_source") or {}).items())
                )
                + ")"
                for k, v in rr["ranking"].items()
            )
            + ". A rho over pooled proxy and window rows mixes two kinds of signal: read the parts, not the pool; "
            "the p-values are nominal (no correction for the signals and horizons tried).\n"
        )
    L.append("\n<details><summary>Every run</summary>\n")
    L.append("| rollouts | lr | seed | drift share +- se | c_t share +- se | 2nd half | speed ratio | " +
             " | ".join(f"{m}x: RELEX - tcut" for m in mults) + " | seconds |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(mults) + "---:|")
    for c in cells:
        s = c["signal"]
        gains = " | ".join(f"{r['relex'] - r['tcut']:+.3f}" for r in c["rows"])
        L.append(
            f"| {c['rollouts']} | {c['lr']:g} | {c['seed']} | {s['drift_share']:.3f} +- {s['drift_share_se']:.3f} | "
            f"{s['coef_drift_share']:.3f} +- {s['coef_drift_share_se']:.3f} | {s['late_drift_share']:.3f} | "
            f"{s['speed_ratio']:.3f} | {gains} | {c['seconds']:.0f} |"
        )
    L.append("\n</details>\n")
    return "\n".join(L) + "\n"


def plot(R, cells, live, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mults = R["mults"]
    lrs = sorted({c["lr"] for c in live})
    colors = {lr: f"C{i}" for i, lr in enumerate(lrs)}
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.6))

    def gain(c, m):
        r = next(r for r in c["rows"] if r["x_tcut"] == m)
        return r["relex"] - r["tcut"]

    for lr in lrs:
        ros = sorted({c["rollouts"] for c in live if c["lr"] == lr})
        by = {ro: [c for c in live if c["lr"] == lr and c["rollouts"] == ro] for ro in ros}
        for m, style in ((mults[0], "o-"), (mults[-1], "x:")):
            ax[0].plot(ros, [mean([gain(c, m) for c in by[ro]]) for ro in ros], style, color=colors[lr],
                       label=f"lr {lr:g}, {m}x")
        ax[1].plot(ros, [mean([c["signal"]["drift_share"] for c in by[ro]]) for ro in ros], "o-", color=colors[lr],
                   label=f"lr {lr:g}")
    for a in ax[:2]:
        a.set_xscale("log", base=2)
        a.set_xlabel("rollouts per step")
    ax[0].axhline(0, color="gray", lw=0.5)
    ax[0].set_ylabel("reward: RELEX - tcut checkpoint (mean over seeds)")
    ax[0].legend(fontsize=6)
    ax[1].set_ylabel("drift share at tcut (mean over seeds)")
    ax[1].legend(fontsize=7)
    for m, mk in zip(mults, "os^"):
        ax[2].scatter([c["signal"]["drift_share"] for c in live], [gain(c, m) for c in live], marker=mk, s=18,
                      label=f"{m}x")
    ax[2].axhline(0, color="gray", lw=0.5)
    ax[2].set_xlabel("drift share at tcut")
    ax[2].set_ylabel("reward: RELEX - tcut checkpoint")
    ax[2].legend(fontsize=7)
    # the step lengths inside the window (Adam's early steps are the long ones)
    for i, ro in enumerate(sorted({c["rollouts"] for c in live})):
        cs = [c for c in live if c["rollouts"] == ro and c.get("step_sq")]
        if not cs:
            continue
        T = len(cs[0]["step_sq"])
        curve = [mean([c["step_sq"][t] / (sum(c["step_sq"][-5:]) / 5) for c in cs]) for t in range(T)]
        ax[3].plot(range(1, T + 1), curve, "o-", ms=3, label=f"{ro} rollouts ({len(cs)} runs)")
    ax[3].set_yscale("log")
    ax[3].axhline(1, color="gray", lw=0.5)
    ax[3].set_xlabel("optimizer step in the window")
    ax[3].set_ylabel("|theta_t - theta_(t-1)|^2 / mean of the last 5")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def splice(doc, md, marker="noise-map"):
    """The noise map's block of ``docs/replication.md`` (between ``<!-- marker:begin/end -->``)."""
    splice_block(doc, md, marker)
