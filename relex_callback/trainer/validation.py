"""Validation mode (``RelexCallback(stop_training=False)``): training goes on after tcut, and when the run reaches
each horizon H the real move ``theta_H - theta_0`` is compared, per tensor, with the extrapolated one.

Works on this process's pieces (one process: every tensor, whole; DDP / ZeRO-1/2: its share of the tensors, whole;
ZeRO-3 / FSDP2: its flat shard of every tensor). Per tensor, ``<real, extrapolated>`` and the squared norms are sums
over pieces: each process computes its partial sums, one all-reduce adds them up
(:meth:`~relex_callback.trainer.topology.Topology.validation_sums`), and every process derives the same cosines; only
process 0 writes ``report.json``. After tcut only theta_0 and the directions stay in memory.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
from safetensors.torch import load_file

from ..trajectory.persist import THETA0_FILE, link_or_copy, save_theta0
from ..trajectory.window import saved_trajectory
from ..files.fs import STATE_NAME, read_json, write_json
from ..files.report import REPORT_NAME, load_report, write_report
from ..files.schema import check_report
from ..files.state import RelexState, load_state, save_state
from ..params import TensorSpec

logger = logging.getLogger("relex_callback")

VALIDATION_FILE = "validation.json"  # beside theta_0 in a checkpoint saved after tcut in validation mode
SUMS = ("dot", "real_sq", "extrapolated_sq", "error_sq")


class Validation:
    """What the horizon comparisons need after the buffer is freed: this process's result (directions, lines),
    theta_0 (``D`` local elements) and the horizons still ahead.

    Args:
        result (`Solution` or `RelexState`): the window's result for this process's pieces.
        theta0 (`torch.Tensor`): flat theta_0 of those pieces, in arena order. specs: their specs.
        pending (`set[int]`): horizons not reached yet. tracked: live readers of the pieces. topology: collectives.
        tcut (`int`): the window's last step (for the saved state).
    """

    def __init__(self, result, theta0: torch.Tensor, specs, pending, tracked, topology, tcut: int):
        self.result, self.theta0, self.specs, self.pending = result, theta0, list(specs), set(pending)
        self.tracked, self.topo, self.tcut = tracked, topology, tcut
        self.theta0_file: Optional[str] = None  # written once there, hard-linked into each checkpoint (see save)

    @torch.no_grad()
    def partial_sums(self, horizon: int) -> dict:
        """For each tensor piece: ``<real, pred>``, ``||real||^2``, ``||pred||^2``, ``||pred-real||^2`` (float64) of the
        real delta ``theta_H - theta_0`` and the extrapolated one."""
        reads = {t.spec.name: t.read for t in self.tracked}
        out = {}
        for i, spec in enumerate(self.specs):
            th0 = self.theta0[spec.offset: spec.offset + spec.local_numel]
            real = (reads[spec.name]().to(device=th0.device, dtype=torch.float32) - th0.float()).double()
            pred = (self.result.extrapolate(i, horizon, th0.to(spec.dtype)).to(device=th0.device, dtype=torch.float32)
                    - th0.float()).double()
            out[spec.name] = torch.stack([real @ pred, real @ real, pred @ pred, (pred - real).square().sum()]).cpu()
        return out

    def compare(self, horizon: int) -> dict:
        """Per-tensor cosine and norm ratio of the extrapolated delta vs the real one at step ``horizon`` (every process
        calls it at the same step; the result is the same on every process)."""
        names = self.topo.names
        sums = self.topo.validation_sums(self.partial_sums(horizon), len(SUMS))
        tensors = []
        for n, (dot, rr, pp, ee) in zip(names, sums.tolist()):
            rn, pn = math.sqrt(max(rr, 0.0)), math.sqrt(max(pp, 0.0))
            tensors.append({"name": n, "cosine": dot / (rn * pn) if rn > 0 and pn > 0 else None,
                            "norm_ratio": pn / rn if rn > 0 else None, "real_norm": rn, "extrapolated_norm": pn})
        dot_all, real_all, pred_all, err_all = (float(x) for x in sums.sum(0).tolist()) if len(names) else (0.0,) * 4
        cos = [t["cosine"] for t in tensors if t["cosine"] is not None]
        ratio = [t["norm_ratio"] for t in tensors if t["norm_ratio"] is not None]
        denom = math.sqrt(real_all * pred_all)
        summary = {
            "cosine_mean": sum(cos) / len(cos) if cos else None,
            "cosine_min": min(cos) if cos else None,
            "cosine_global": dot_all / denom if denom > 0 else None,
            "norm_ratio_mean": sum(ratio) / len(ratio) if ratio else None,
            "norm_ratio_global": math.sqrt(pred_all / real_all) if real_all > 0 else None,
            "relative_error_global": math.sqrt(err_all / real_all) if real_all > 0 else None,
        }
        self.pending.discard(horizon)
        return {"step": int(horizon), "summary": summary, "tensors": tensors}

    def record(self, out_dir: str, horizon: int, res: dict, report: Optional[dict]) -> dict:
        """Add the comparison to ``report.json`` under ``"validation"`` (rewritten atomically by process 0; the
        others keep it in memory). Returns the report."""
        path = os.path.join(out_dir, REPORT_NAME)
        coordinator = self.topo.process_rank == 0
        if report is None:
            report = load_report(path) if coordinator and os.path.isfile(path) else {}
            if report:
                check_report(report, path)
        report.setdefault("validation", {})[str(horizon)] = res
        if coordinator:
            write_report(path, report)
        return report

    def save(self, directory: str):
        """At a checkpoint after tcut, this process's pieces: theta_0 and its result as a state file, so a resume can
        still compare at the horizons. ``validation.json`` is written last: its presence means the rest is whole."""
        os.makedirs(directory, exist_ok=True)
        state_path = os.path.join(directory, STATE_NAME)
        if isinstance(self.result, RelexState):  # resumed: the state loaded from the earlier checkpoint
            self.result.save(state_path)
        else:
            specs, theta0 = self.specs, self.theta0
            save_state(state_path, self.result,
                       lambda i: theta0[specs[i].offset: specs[i].offset + specs[i].local_numel], tcut=self.tcut)
        if self.theta0_file:  # theta_0 written once (the run directory), linked into every checkpoint
            if not os.path.exists(self.theta0_file):
                os.makedirs(os.path.dirname(self.theta0_file), exist_ok=True)
                save_theta0(os.path.dirname(self.theta0_file), self.theta0)
            link_or_copy(self.theta0_file, os.path.join(directory, THETA0_FILE))
        else:
            save_theta0(directory, self.theta0)
        write_json(os.path.join(directory, VALIDATION_FILE),
                   {"pending": sorted(self.pending), "specs": [s.to_json() for s in self.specs]})

    @classmethod
    def resume(cls, checkpoints, tracked, topology, global_step: int, tcut: int) -> Optional["Validation"]:
        """Resumed after tcut: reload this process's pieces from the checkpoint. In distributed runs every process must
        have its pieces (same world size, same tracked tensors) or none validates: the decision is collective, so no
        process waits in an all-reduce the others never reach. ``None`` (with a warning) when it cannot."""
        ckpt_dir, why, validation = saved_trajectory(checkpoints, topology, VALIDATION_FILE), None, None
        if ckpt_dir is None:
            why = "the checkpoint has no saved validation state for this process (saved with another world size?)"
        else:
            saved = read_json(os.path.join(ckpt_dir, VALIDATION_FILE))
            specs = [TensorSpec.from_json(d) for d in saved.get("specs", [])]
            mine = [t.spec for t in tracked]
            key = lambda s: (s.name, tuple(s.shape), s.local_numel, s.flat_start)  # noqa: E731
            if [key(s) for s in specs] != [key(s) for s in mine]:
                why = "the checkpoint's validation state holds other tensors (or other shards) than this process tracks"
            else:
                result = load_state(os.path.join(ckpt_dir, STATE_NAME))
                theta0 = load_file(os.path.join(ckpt_dir, THETA0_FILE))["theta0"].to(tracked[0].read().device)
                pending = {h for h in saved["pending"] if h > global_step}
                validation = cls(result, theta0, specs, pending, tracked, topology, tcut)
        everyone = topology.all_ok(validation is not None) if topology.is_distributed else validation is not None
        if not everyone:
            logger.warning("relex: resumed after tcut without the saved validation state%s; the horizons are not "
                           "validated", f" ({why})" if why else " on another process")
            return None
        return validation
