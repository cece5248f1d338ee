"""``keep_best``: the ``step-H/`` directories of every horizon after the best few removed, this run's only."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional, Sequence

from .fs import MERGED_SUFFIX, horizon_dir, not_ours

logger = logging.getLogger("relex_callback")


def remove_all_but_best(out_dir: str, ranking: Sequence[int], k: int, run_id: Optional[str] = None,
                        tcut: Optional[int] = None) -> dict:
    """Delete the ``step-H/`` (and ``step-H-merged/``) directories of every horizon after the best ``k`` of
    ``ranking``: only those whose relex marker names this run (``run_id``), this horizon and ``tcut``; any other
    directory of that name (a user's, another run's) is left and said why. Returns ``{"k", "kept", "removed",
    "failed", "left"}``."""
    kept, removed, failed, left = list(ranking[:k]), [], {}, {}
    for h in ranking[k:]:
        for d in (horizon_dir(out_dir, h), horizon_dir(out_dir, h) + MERGED_SUFFIX):
            if not os.path.lexists(d):
                continue
            why = not_ours(d, run_id, h, tcut)
            if why:
                left[os.path.basename(d)] = why
                logger.warning("relex: keep_best left %s: it %s", d, why)
                continue
            try:
                shutil.rmtree(d)
                removed.append(os.path.basename(d))
            except OSError as e:
                failed[os.path.basename(d)] = str(e)
                logger.warning("relex: keep_best could not remove %s: %s", d, e)
    return {"k": int(k), "kept": [int(h) for h in kept], "removed": removed, "failed": failed, "left": left}
