"""The drift share reaches report.json in multi-process runs. Before, the report's solution was rebuilt from the
processes' rows without it, so `relex report` of every DDP / ZeRO / FSDP2 run printed "drift share: not computed
(not computed)". Replicated runs (DDP, ZeRO-1/2): each process solves its own tensors, and the report combines their
moments into the whole window's figure; sharded runs (ZeRO-3, FSDP2): the all-reduced Grams already give it.

The processes are simulated in one: process 1's report pass records what it sends, process 0's receives it."""

import dataclasses

import pytest
import torch

from relex_callback.core import noise
from relex_callback.core.solver import SolveOptions, solve
from relex_callback.files.report import format_noise
from relex_callback.params import TensorSpec
from relex_callback.trainer.topology import Topology

SIZES = {"a.weight": 3000, "b.weight": 500, "c.bias": 64}
STEPS = list(range(1, 13))


def _walk(seed=3, drift=0.5, sigma=0.6):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in SIZES.values():
        d = torch.randn(n, generator=g, dtype=torch.float64)
        rows.append(
            drift * d / d.norm() + torch.randn(len(STEPS), n, generator=g, dtype=torch.float64) * sigma / n**0.5
        )
    return torch.cat(rows, 1).cumsum(0).float()


def _specs(names):
    out, o = [], 0
    for n in names:
        out.append(TensorSpec(name=n, shape=(SIZES[n],), dtype=torch.float32, local_numel=SIZES[n], offset=o))
        o += SIZES[n]
    return out


def _columns(M, names):
    starts, o = {}, 0
    for n, k in SIZES.items():
        starts[n] = (o, o + k)
        o += k
    return torch.cat([M[:, starts[n][0]:starts[n][1]] for n in names], 1)


def _topology(mode, rank):
    topo = Topology.__new__(Topology)
    topo.mode, topo.process_rank, topo.world = mode, rank, 2
    topo.names, topo.owner, topo.ranges = list(SIZES), {}, {}
    return topo


def _two_processes_report(sols):
    """Process 0's report_solution of a replicated 2-process run, process 1's gathers played back to it in order."""
    sent = []
    p1 = _topology("replicated", 1)
    p1.gather_objects = lambda obj: (sent.append(obj), [obj, obj])[1]
    p1.report_solution(sols[1])
    p0 = _topology("replicated", 0)
    p0.gather_objects = lambda obj: [obj, sent.pop(0)]
    rep = p0.report_solution(sols[0])
    assert not sent  # process 0 made the same gathers, in the same order
    return rep


def test_replicated_report_carries_the_whole_windows_drift_share():
    M = _walk()
    whole = solve(M, STEPS, _specs(list(SIZES)), SolveOptions(method="gram")).noise
    mine = {0: ["a.weight"], 1: ["b.weight", "c.bias"]}
    sols = {r: solve(_columns(M, names), STEPS, _specs(names), SolveOptions(method="gram"))
            for r, names in mine.items()}
    rep = _two_processes_report(sols)
    assert rep.noise is not None and not isinstance(rep.noise, str)
    assert rep.noise.names == list(SIZES)
    assert rep.noise.drift_share == pytest.approx(whole.drift_share, abs=1e-9)
    assert rep.noise.global_share_se == pytest.approx(whole.global_share_se, abs=1e-9)
    assert rep.noise.coef_share == pytest.approx(whole.coef_share, abs=1e-9)
    entry = noise.report_entry(rep.noise)
    assert entry["drift_share"] == pytest.approx(whole.drift_share, abs=1e-6)  # rounded to 6 places
    assert format_noise(entry).startswith("drift share (line vs random walk")


def test_replicated_report_keeps_a_processs_reason():
    M = _walk()[:2]  # two recorded steps: too few for the figure
    names = {0: ["a.weight"], 1: ["b.weight", "c.bias"]}
    sols = {r: solve(_columns(M, n), STEPS[:2], _specs(n), SolveOptions(method="gram")) for r, n in names.items()}
    assert isinstance(sols[1].noise, str)
    rep = _two_processes_report(sols)
    line = format_noise(noise.report_entry(rep.noise))
    assert line == f"drift share: not computed ({sols[1].noise})"
    assert "(not computed)" not in line


def test_sharded_report_keeps_the_solutions_drift_share():
    M = _walk()
    sol = solve(M, STEPS, _specs(list(SIZES)), SolveOptions(method="gram"))
    rep = _topology("zero3", 0).report_solution(sol)
    assert rep.noise is sol.noise


def test_no_figures_never_reads_not_computed_twice():
    line = format_noise(noise.report_entry(None))
    assert "(not computed)" not in line and line.startswith("drift share: not computed (")


def test_gather_form_is_on_the_cpu_and_plain():
    sol = solve(_walk(), STEPS, _specs(list(SIZES)), SolveOptions(method="gram"))
    form = noise.gather_form(sol.noise)
    assert set(form) == {"mom", "c_mom", "steps", "names"}
    assert all(t.device.type == "cpu" for t in form["mom"])
    again = noise.from_gathered([form])
    assert dataclasses.asdict(again)["global_share"] == pytest.approx(sol.noise.global_share, abs=1e-12)
