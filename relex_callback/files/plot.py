"""``horizons.png``: the scores of the horizons against the step (``evaluate_horizons``, ``horizons="auto"``).

Written atomically with a ``Source`` text entry (:data:`PLOT_SOURCE`) that tells relex's plot from a user's picture of
the same name (what ``overwrite`` may replace: :func:`relex_callback.files.fs.foreign_output`).
"""

from __future__ import annotations

import logging
from typing import Optional

from .fs import PLOT_FILE, atomic_file

logger = logging.getLogger("relex_callback")

PLOT_NAME = PLOT_FILE
PLOT_SOURCE = "relex_callback"  # a tEXt entry of horizons.png: fs.foreign_output tells it from a user's picture


def plot_horizons(scores: dict, summary: dict, tcut: int, path: str, *, noise_se: float,
                  stderr_suffix: str = "_stderr") -> Optional[str]:
    """``horizons.png``: the ranking metric against the step, the tcut model marked, error bars of ``noise_se``
    standard errors (the score ``<metric><stderr_suffix>``: the band a winner must clear). ``None`` (and a log line)
    without matplotlib."""
    metric = summary.get("horizon_eval_summary", {}).get("metric")
    if metric is None:
        return None
    try:  # matplotlib is optional (relex_callback[plot]): imported only when a plot is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("relex: matplotlib is not installed: no %s (pip install 'relex_callback[plot]')", PLOT_NAME)
        return None
    pts = sorted((int(s), m.get(metric)) for s, m in scores.items() if m.get(metric) is not None)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    se = [scores[str(s)].get(metric + stderr_suffix) for s, _ in pts]
    if any(e is not None for e in se):  # error bars: +- noise_se standard errors (the band a winner must clear)
        ax.errorbar([s for s, _ in pts], [v for _, v in pts], yerr=[noise_se * (e or 0.0) for e in se], fmt="o-",
                    capsize=3, label=f"eval {metric} +- {noise_se:g} s.e.")
    else:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=f"eval {metric} (no standard error)")
    at_tcut = scores.get(str(tcut), {}).get(metric)
    if at_tcut is not None:
        ax.plot([tcut], [at_tcut], "s", color="black", ms=8, label=f"tcut model (step {tcut})")
        se_t = scores[str(tcut)].get(metric + stderr_suffix)
        if se_t:
            ax.axhspan(at_tcut - noise_se * se_t, at_tcut + noise_se * se_t, color="grey", alpha=0.15,
                       label=f"tcut +- {noise_se:g} s.e.")
    ax.axvline(tcut, color="grey", ls=":", lw=1)
    best = summary.get("best_horizon")
    hs = summary.get("horizon_eval_summary", {})
    if best is not None and hs.get("best_beats_tcut"):
        ax.plot([best], [scores[str(best)][metric]], "*", color="red", ms=12, label=f"best horizon {best}")
    elif best is not None:
        ax.plot([best], [scores[str(best)][metric]], "*", mfc="none", mec="grey", ms=12,
                label=f"best-scored {best}: {hs.get('verdict', '').split(':')[0]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([s for s, _ in pts], [str(s) for s, _ in pts])
    ax.minorticks_off()
    ax.set_xlabel("step (extrapolated beyond tcut)")
    ax.set_ylabel(f"eval {metric}")
    ax.set_title("RELEX horizons scored by the trainer's evaluation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Source": PLOT_SOURCE})  # what overwrite may replace
    plt.close(fig)
    return path
