"""What a user of the callback sees, and how often: one summary at the end of the window, every warning once.

* :func:`summary`: at ``tcut`` the main process prints (``print``: seen at any log level, as the Trainer's own
  progress is) where the files are, what the signals say (``files.report.format_trust``: backtest, drift share,
  reward trend, clock, the scores with their standard errors and the pick, each horizon against the tcut model with
  the eval prompts a call on it needs, validation figures), and the next command. The package's INFO lines stay for
  those who turn them on.
* :class:`OncePerRun`: a filter on the package logger. A DDP / ZeRO / FSDP2 run has one callback per process and
  each would print the same warning: only the main process's warnings pass (errors always do), and while a run is
  open (:func:`start_run` .. :func:`end_run`) each message once.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..files.fs import STATE_INDEX_NAME, STATE_NAME
from ..files.report import REPORT_NAME, format_trust

LOGGER = "relex_callback"
# The median eval prompts a pays/harms call at 2 standard errors needed on the toy grid (docs/replication.md part 6,
# one sampled completion per prompt and checkpoint): said in the summary of a window whose horizons were not scored.
UNSCORED_PROMPTS = "28-100"


class OncePerRun(logging.Filter):
    """Drops the package's warnings on processes other than the main one, and repeats of a message within a run."""

    def __init__(self):
        super().__init__()
        self.main = os.environ.get("RANK", "0") in ("0", "")  # refined at start_run from the trainer state
        self.active = False
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.levelno < logging.WARNING:
            return True
        if not self.main:
            return False
        if not self.active:
            return True
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


FILTER = OncePerRun()


def install():
    logger = logging.getLogger(LOGGER)
    if FILTER not in logger.filters:
        logger.addFilter(FILTER)


def start_run(state):
    """A ``train()`` begins: this process is the main one or not (``state.is_world_process_zero``); no message seen."""
    install()
    FILTER.main = bool(getattr(state, "is_world_process_zero", FILTER.main))
    FILTER.active, FILTER.seen = True, set()


def end_run():
    FILTER.active, FILTER.seen = False, set()


def is_main(cb) -> bool:
    topo = getattr(cb, "topology", None)
    return FILTER.main if topo is None else topo.process_rank == 0


def summary(cb, out_dir: str, state, model=None) -> Optional[str]:
    """The end-of-window summary (printed by the main process; returned on every process for tests)."""
    rep, s = cb.report or {}, cb.settings
    written = [w for w in rep.get("checkpoints") or [] if os.path.isdir(w)]  # keep_best may have removed some
    state_file = STATE_INDEX_NAME if os.path.isfile(os.path.join(out_dir, STATE_INDEX_NAME)) else STATE_NAME
    base = getattr(model, "name_or_path", None) or "<the model training started from>"
    lines = [f"relex: window done at step {s.tcut} (tcut): "
             + ("training stops here (stop_training=True)" if s.stop_training else
                f"training goes on; the extrapolated weights are compared with the real ones at steps "
                f"{', '.join(str(h) for h in s.horizons if h > s.tcut)} (validation, added to report.json)"),
             f"relex: files in {out_dir}: " + (", ".join(os.path.basename(w) for w in written) or "no horizon")
             + f", {state_file} (any other horizon), {REPORT_NAME}"
             + (", horizons.png" if rep.get("horizon_plot") else "")]
    if rep.get("recorded"):
        lines.append(f"relex: recorded: {rep['recorded']}")
    trust = format_trust(rep)
    lines += ["relex: " + t for t in trust.split("\n") if t]
    summ = rep.get("horizon_eval_summary")
    if not summ or not summ.get("metric"):
        lines.append("relex: pick: not scored. Scoring at tcut (evaluate_horizons=True with an eval_dataset) is the "
                     f"check that told paying from harming runs in the project's measurements: ~{UNSCORED_PROMPTS} "
                     "eval prompts per call at 5x-10x tcut, hundreds at 2x (docs/trust.md); or evaluate the step-H/ "
                     "checkpoints on your task before using one")
    lines.append(f"relex: next: `relex report {out_dir}` (every figure); more horizons: `relex materialize --state "
                 f"{os.path.join(out_dir, state_file)} --base {base} --horizons H --out DIR`")
    text = "\n".join(lines)
    if is_main(cb):
        print(text, flush=True)
    return text
