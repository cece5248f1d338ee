"""``report.json``: per-tensor explained variance, R^2, slope, intercept, ``||Delta_tcut||`` and the coefficient
trajectories; a readable summary of it; and, with the ``plot`` extra, ``report.png``."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

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
        "tensors": tensors,
    }
    if extra:
        rep.update(extra)
    return rep


def write_report(path: str, report: dict):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, allow_nan=False, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_report(path: str) -> dict:
    from .errors import RelexInputError

    if os.path.isdir(path):
        path = os.path.join(path, REPORT_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RelexInputError(f"{path} does not exist; pass the directory that `relex extrapolate` or the callback wrote") from None
    except ValueError as e:
        raise RelexInputError(f"{path} is not valid JSON: {e}") from None
