"""``report.json``: per-tensor explained variance, R^2, slope, intercept, ``||Delta_tcut||`` and the coefficient
trajectories; a readable summary of it; and, with the ``plot`` extra, ``report.png``."""

from __future__ import annotations

import math
import os
from typing import Optional

from .fs import atomic_file, read_json, write_json
from ..errors import RelexInputError

REPORT_NAME = "report.json"


def _q(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_stats(tensors: list[dict]) -> dict:
    moving = [t for t in tensors if t["delta_norm"] > 0]
    ev = [t["explained_variance"] for t in moving]
    r2 = [t["r2"][0] for t in moving]
    w = [t["numel"] for t in moving]
    wsum = sum(w) or 1
    return {
        "tensors": len(tensors),
        "tensors_moving": len(moving),
        "explained_variance_mean": sum(ev) / len(ev) if ev else None,
        "explained_variance_weighted": sum(e * n for e, n in zip(ev, w)) / wsum if ev else None,
        "explained_variance_min": min(ev) if ev else None,
        "explained_variance_median": _q(ev, 0.5) if ev else None,
        "r2_mean": sum(r2) / len(r2) if r2 else None,
        "r2_min": min(r2) if r2 else None,
        "r2_median": _q(r2, 0.5) if r2 else None,
    }


def build_report(solution, *, tcut: int, horizons, extra: Optional[dict] = None) -> dict:
    ev = solution.explained
    evr = solution.explained_rank
    curve = getattr(solution, "curve", None)
    tensors = []
    for i, spec in enumerate(solution.specs):
        tensors.append(
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "numel": spec.local_numel,
                "explained_variance": float(ev[i]),
                "explained_variance_rank": float(evr[i]),
                "r2": [float(x) for x in solution.r2[i]],
                "slope": [float(x) for x in solution.slope[i]],
                "intercept": [float(x) for x in solution.intercept[i]],
                "sigma": [float(x) for x in solution.sigma[i]],
                "delta_norm": float(solution.delta_norm[i]),
                "coeffs": [[float(x) for x in row] for row in solution.coeffs[i]],
            }
        )
        if curve is not None:
            c = curve[i].to_json()
            tensors[-1]["fit"] = {"family": c.get("families", c["family"]), "params": c["params"], "r2": c["r2"]}
    rep = {
        "tcut": int(tcut),
        "steps": list(solution.steps),
        "fit_start": solution.fit_start,
        "rank": solution.rank,
        "horizons": [int(h) for h in horizons],
        "solver": solution.method,
        "solver_fallbacks": solution.fallbacks,
        "seconds": {k: round(v, 6) for k, v in solution.seconds.items()},
        "summary": summary_stats(tensors),
        "fit": _fit_summary(solution, horizons),
        "tensors": tensors,
    }
    clock = getattr(solution, "clock", None)
    if clock is not None:  # absent: the step clock (also what files written before the lr clock mean)
        rep["clock"] = clock.summary(horizons)
    bt = getattr(solution, "backtest", None)
    if bt is not None:
        rep["backtest"] = bt.to_report()
    if hasattr(solution, "noise"):
        from ..core.noise import report_entry  # deferred: core.noise imports torch, this module does not

        rep["noise"] = report_entry(solution.noise)
    if extra:
        rep.update(extra)
    return rep


def _fit_summary(solution, horizons) -> dict:
    """The coefficient curve used for the horizons and, for fit="auto", every family's backtest score; with the
    ratio of the curve's total coefficient to the line's at each horizon (how far it departs from the paper's fit)."""
    curve = getattr(solution, "curve", None)
    out = {"family": curve.family if curve is not None else "linear"}
    if curve is not None and curve.fit_window:
        out["fit_window"] = curve.fit_window
    sel = getattr(solution, "selection", None)
    if sel is not None:
        out["selection"] = sel.to_json()
    if curve is not None:
        ratios = {}
        for h in horizons:
            x = solution.clock.at(h) if getattr(solution, "clock", None) is not None else float(h)
            line = (solution.slope * x + solution.intercept)[:, 0].abs().sum()
            chosen = solution.coef_at(h)[:, 0].abs().sum()
            ratios[str(int(h))] = float(chosen / line) if float(line) > 0 else None
        out["coefficient_vs_line"] = ratios
    return out


def write_report(path: str, report: dict):
    write_json(path, report, indent=1, allow_nan=False, default=_json_default)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_report(path: str) -> dict:
    """Read ``report.json`` (``path`` is the file or the directory holding it)."""
    path = report_path(path)
    try:
        return read_json(path)
    except FileNotFoundError:
        raise RelexInputError(
            f"{path} does not exist; pass the directory that `relex extrapolate` or the callback wrote"
        ) from None
    except ValueError as e:
        raise RelexInputError(f"{path} is not valid JSON: {e}") from None


# ------------------------------------------------------------------------------------------ reading it
def report_path(path: str) -> str:
    """``path`` itself when it is a file, else ``path/report.json``."""
    return os.path.join(path, REPORT_NAME) if os.path.isdir(path) else path


def _dist(xs: list) -> dict:
    return {
        "mean": sum(xs) / len(xs),
        "min": min(xs),
        "q05": _q(xs, 0.05),
        "q25": _q(xs, 0.25),
        "median": _q(xs, 0.5),
        "q75": _q(xs, 0.75),
        "max": max(xs),
    }


def text_histogram(xs: list, lo: float = 0.0, hi: float = 1.0, bins: int = 10, width: int = 40) -> list[str]:
    """One line per bin, ``[lo, hi)`` split evenly (the last bin closed), bars scaled to ``width`` characters."""
    counts = [0] * bins
    for x in xs:
        b = int((min(max(x, lo), hi) - lo) / (hi - lo) * bins) if hi > lo else 0
        counts[min(b, bins - 1)] += 1
    top = max(counts) or 1
    lines = []
    for b, c in enumerate(counts):
        a, e = lo + (hi - lo) * b / bins, lo + (hi - lo) * (b + 1) / bins
        bar = "#" * (round(c / top * width) if c else 0)
        lines.append(f"  [{a:4.2f}, {e:4.2f}{']' if b == bins - 1 else ')'} {c:6d} {bar}")
    return lines


def format_summary(report: dict, worst: int = 10) -> str:
    """A readable summary of ``report.json``: the run, the explained variance and R^2 distributions over the tensors
    that moved (mean, quantiles, a text histogram) and the ``worst`` tensors by explained variance and by R^2."""
    ts = report.get("tensors", [])
    moving = [t for t in ts if t.get("delta_norm", 0) > 0]
    lines = [
        f"RELEX report: tcut={report.get('tcut')}, {len(report.get('steps', []))} snapshot steps "
        f"({_steps_text(report.get('steps', []))}), fit_start={report.get('fit_start')}, rank={report.get('rank')}, "
        f"horizons={report.get('horizons')}, solver={report.get('solver')}",
        f"tensors: {len(ts)} tracked, {len(moving)} moved, {len(ts) - len(moving)} unchanged (kept at theta_0)",
    ]
    trust = format_trust(report)
    if trust:
        lines += trust.split("\n")
    if not moving:
        return "\n".join(lines + ["no tensor moved: every written checkpoint equals the base"])
    ev = [float(t["explained_variance"]) for t in moving]
    r2 = [float(t["r2"][0]) if t["r2"][0] is not None else float("nan") for t in moving]
    r2 = [x for x in r2 if math.isfinite(x)]
    w = [t["numel"] for t in moving]
    wev = sum(e * n for e, n in zip(ev, w)) / (sum(w) or 1)
    hdr = f"{'':24s}{'mean':>8s}{'min':>8s}{'5%':>8s}{'25%':>8s}{'median':>8s}{'75%':>8s}{'max':>8s}"
    lines += ["", hdr]
    for label, xs in (("explained variance", ev), ("R^2 of the line fit", r2)):
        if xs:
            d = _dist(xs)
            lines.append(
                f"{label:24s}" + "".join(f"{d[k]:8.4f}" for k in ("mean", "min", "q05", "q25", "median", "q75", "max"))
            )
    lines.append(f"explained variance weighted by tensor size: {wev:.4f}")
    lines += ["", "explained variance (sigma1^2 / ||M||_F^2) over tensors:"] + text_histogram(ev)
    if r2:
        lines += ["R^2 of c_t = a t + b over tensors:"] + text_histogram(r2)
    k = max(0, int(worst))
    if k:
        lines += ["", f"worst {min(k, len(moving))} tensors by explained variance:"]
        for t in sorted(moving, key=lambda t: t["explained_variance"])[:k]:
            lines.append(
                f"  {t['explained_variance']:.4f}  R^2 {_fmt(t['r2'][0])}  ||delta|| {t['delta_norm']:.3g}  {t['name']}"
            )
        lines += [f"worst {min(k, len(moving))} tensors by R^2:"]
        for t in sorted(moving, key=lambda t: _key(t["r2"][0]))[:k]:
            lines.append(
                f"  {_fmt(t['r2'][0])}  explained {t['explained_variance']:.4f}  ||delta|| {t['delta_norm']:.3g}  "
                f"{t['name']}"
            )
    return "\n".join(lines)


def format_trust(report: dict) -> str:
    """The signals that say whether to trust a horizon, in a few lines: the in-window backtest (a line fitted on
    the first part of the window, scored on the rest), the reward trend, and the fit family chosen."""
    lines = []
    bt = report.get("backtest")
    if bt:
        if bt.get("reason"):
            lines.append(f"backtest: not computed ({bt['reason']})")
        else:
            fs = bt.get("fit_steps") or []
            lines.append(
                f"backtest (line fitted on steps {_steps_text(fs)}, predicting step {bt.get('predicted_step')}): "
                f"cosine {_fmt(bt.get('cosine_global')).strip()}, norm ratio "
                f"{_fmt(bt.get('norm_ratio_global')).strip()}, "
                f"relative error {_fmt(bt.get('relative_error_global')).strip()}, direction cosine "
                f"{_fmt(bt.get('direction_cosine')).strip()}"
            )
    nz = report.get("noise")
    if nz:
        lines.append(format_noise(nz))
    tr = report.get("reward_trend")
    if tr:
        if tr.get("slope") is None or tr.get("stderr") is None:
            lines.append(f"reward trend: not computed ({tr.get('reason')})")
        else:
            verdict = "rising" if tr.get("rising") else "NOT rising: extrapolating it is likely harmful"
            lines.append(
                f"reward trend ({tr.get('metric')}): slope {tr['slope']:.3g} +- {tr['stderr']:.3g} per step over "
                f"{tr.get('points')} logged steps: {verdict}"
            )
    fit = report.get("fit") or {}
    sel = fit.get("selection")
    if sel and sel.get("scores"):
        scores = ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} -" for k, v in sel["scores"].items())
        lines.append(f"fit: {fit.get('family')} (backtest relative error by family: {scores})")
        for fam, why in (sel.get("skipped") or {}).items():
            lines.append(f"  {fam} was not a candidate: it {why}")
    elif sel and sel.get("reason"):
        lines.append(f"fit: {fit.get('family')} ({sel['reason']})")
    elif fit.get("family", "linear") != "linear":
        lines.append(f"fit: {fit.get('family')}")
    if report.get("horizons_skipped"):
        lines.append(f"horizons NOT written: {report['horizons_skipped']}")
    clock = report.get("clock")
    if clock:
        on = ", ".join(f"{h} -> {x:.4g}" for h, x in (clock.get("horizons_on_clock") or {}).items())
        lines.append(f"clock: cumulative learning rate ({clock.get('source')}); each horizon on it, in steps at the "
                     f"window's mean rate {clock.get('window_mean_lr', 0):.3g}: {on}")
    lines += format_scores(report)
    lines += format_validation(report)
    return "\n".join(lines)


def format_scores(report: dict) -> list[str]:
    """The horizon scores with their standard errors and the verdict (``horizon_eval``), a few lines; none when the
    horizons were not scored."""
    scores, summ = report.get("horizon_eval"), report.get("horizon_eval_summary") or {}
    metric = summ.get("metric")
    if not scores or not metric:
        return []
    goal = "higher" if summ.get("goal") == "max" else "lower"
    tcut = str(summ.get("tcut", report.get("tcut")))

    def one(step):
        m = scores.get(step) or {}
        v, se = m.get(metric), m.get(metric + "_stderr")
        return "n/a" if v is None else f"{v:.4g}" + (f" +- {se:.2g}" if se is not None else "")

    steps = sorted(scores, key=lambda s: int(s))
    parts = [f"{'tcut ' if s == tcut else ''}{s}: {one(s)}" for s in steps]
    lines = [f"horizon scores (eval {metric}, {goal} is better, +- one standard error): " + "; ".join(parts)]
    d, sd = summ.get("difference"), summ.get("difference_stderr")
    band = f" (best {summ.get('ranking', [None])[0]} vs tcut: {d:+.3g} +- {sd:.2g})" if d is not None and sd else ""
    lines.append(f"pick: {summ.get('pick', report.get('best_horizon'))}: {summ.get('verdict', '')}{band}")
    lines += format_calls(report.get("horizon_calls") or {}, tcut)
    kb = report.get("keep_best") or {}
    if kb.get("skipped"):
        lines.append(f"keep_best: {kb['skipped']}")
    return lines


def format_calls(calls: dict, tcut) -> list[str]:
    """One line per scored horizon (``report.json["horizon_calls"]``): its difference from the tcut model against
    the noise band (two standard errors), and the eval prompts a call on that difference needs with what they cost."""
    lines = []

    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    for h in sorted(calls, key=lambda s: int(s) if s.isdigit() else 0):
        c = calls[h]
        d, se = c.get("difference"), c.get("difference_stderr")
        if not num(d):
            continue
        se = se if num(se) else None
        if se is None:
            lines.append(f"step {h} vs tcut {tcut}: {d:+.3g}, noise unknown (no standard error for this metric)")
            continue
        where = {"better": "better, beyond", "worse": "worse, beyond"}.get(c.get("call"), "within")
        line = f"step {h} vs tcut {tcut}: {d:+.4g} +- {se:.2g}: {where} its noise band (+-{2 * se:.4g})"
        n = c.get("prompts_needed")
        if num(n):
            line += f"; a 2-SE call on this difference needs ~{n} eval prompt{'s' if n != 1 else ''}"
            if num(c.get("completions_needed")):
                line += f" ({c['completions_needed']:.0f} completions for the tcut model and this horizon"
                if num(c.get("rollouts_steps")):
                    steps = c["rollouts_steps"]
                    line += f" = {steps:.2g}" if steps < 100 else f" = {steps:.0f}"
                    line += " training steps' rollouts, no backward pass"
                line += ")"
        lines.append(line)
    return lines


def format_validation(report: dict) -> list[str]:
    """Validation mode's figures (the extrapolated deltas against the real ones at each horizon reached)."""
    val = report.get("validation") or {}
    lines = []
    for h in sorted(val, key=lambda s: int(s)):
        s = (val[h] or {}).get("summary") or {}
        lines.append(f"validation at step {h} (extrapolated vs real delta): cosine "
                     f"{_fmt(s.get('cosine_global')).strip()}, norm ratio {_fmt(s.get('norm_ratio_global')).strip()}, "
                     f"relative error {_fmt(s.get('relative_error_global')).strip()}")
    return lines


def format_noise(nz: dict) -> str:
    """One line for report.json's ``noise`` field (:mod:`relex_callback.noise`)."""
    if nz.get("drift_share") is None:
        return f"drift share: not computed ({nz.get('reason', 'no figures')})"
    c = nz.get("coef_drift_share")
    cs = "" if c is None else f"; inside the rank-1 coefficients {c:.3f} +- {nz.get('coef_drift_share_se') or 0:.3f}"
    return (f"drift share (line vs random walk, steps {nz['steps'][0]}..{nz['steps'][1]}): "
            f"{nz['drift_share']:.3f} +- {nz.get('drift_share_se') or 0:.3f} (1 = moves like a line, 0 = like a "
            f"random walk){cs}")


def _key(x):
    return -math.inf if x is None or not math.isfinite(x) else x


def _fmt(x) -> str:
    return "  n/a " if x is None or not math.isfinite(x) else f"{x:.4f}"


def _steps_text(steps: list) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def representative_tensors(report: dict, k: int = 4) -> list[dict]:
    """Up to ``k`` moving tensors spread over the explained-variance range: the worst, the quantiles, the best."""
    moving = sorted(
        (t for t in report.get("tensors", []) if t.get("delta_norm", 0) > 0), key=lambda t: t["explained_variance"]
    )
    if len(moving) <= k:
        return moving
    idx = sorted({round(j * (len(moving) - 1) / (k - 1)) for j in range(k)})
    return [moving[i] for i in idx]


def plot_report(report: dict, path: str, k: int = 4) -> str:
    """Write ``report.png``: the coefficients c_t of ``k`` representative tensors with their fitted lines
    (extended to the first horizon), and the histogram of explained variance. Needs the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RelexInputError("--plot needs matplotlib: pip install 'relex_callback[plot]'") from None
    steps = report.get("steps", [])
    reps = representative_tensors(report, k)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    hz = (report.get("horizons") or [max(steps or [1])])[0]
    for t in reps:
        c = t["coeffs"][0]
        (line,) = ax.plot(
            steps, c, "o", ms=3, label=f"{t['name']} (EV {t['explained_variance']:.3f}, R^2 {_fmt(t['r2'][0]).strip()})"
        )
        a, b = t["slope"][0], t["intercept"][0]
        xs = [min(steps), hz]
        ax.plot(xs, [a * x + b for x in xs], "-", color=line.get_color(), lw=1)
    ax.axvline(report.get("tcut", steps[-1] if steps else 0), color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("c_t = <Delta_t, v1>")
    ax.set_title("coefficients and fitted lines (representative tensors)")
    ax.legend(fontsize=6)
    ax = axes[1]
    ev = [t["explained_variance"] for t in report.get("tensors", []) if t.get("delta_norm", 0) > 0]
    ax.hist(ev, bins=20, range=(0, 1))
    ax.set_xlabel("explained variance sigma1^2 / ||M||_F^2")
    ax.set_ylabel("tensors")
    ax.set_title(f"{len(ev)} moving tensors")
    fig.tight_layout()

    with atomic_file(path) as tmp:  # "Source: relex_callback": what a later --plot may replace (fs.foreign_output)
        fig.savefig(tmp, dpi=100, format="png", metadata={"Source": "relex_callback"})
    plt.close(fig)
    return path
