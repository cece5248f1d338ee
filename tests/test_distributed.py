"""Distributed runs on CPU with real processes over gloo: DDP (torchrun), DeepSpeed ZeRO-2 and ZeRO-3 (accelerate
launch), FSDP2 (torch's ``fully_shard`` applied by the script under torchrun: accelerate has no FSDP2 on CPU, an
accelerate config with ``use_cpu`` silently drops FSDP).

Each launch trains a tiny model with GRPOTrainer + RelexCallback (fp32 buffer, tcut=6, horizons 12 and 20); the
script also records the full parameters at every snapshot step (test code only). The test replays those snapshots
through the single-process engine and requires every tensor of every horizon checkpoint to match (1e-5 relative).
One launch per mode (module-scoped) serves all assertions about it.

Validation mode (``--validate``: ``stop_training=False``, training past the horizons 8 and 11): the per-tensor
cosines and norm ratios each run reports are compared with those computed here from the recorded full parameters
and the single-process engine's extrapolation. The ZeRO-3 validation run is cut at step 9 (a checkpoint after tcut)
and resumed to 11, so it also covers validation resume; DDP runs straight to 11.
"""

import json
import math
import os
import subprocess
import sys
import time
import re
import socket

import pytest

from relex_callback.config import RelexSettings
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.files.checkpoints import ModelSource
from relex_callback.files.state import load_state
from relex_callback.files.writers import FullModelWriter
from relex_callback.params import plain_tracked
from relex_callback.pipeline.finalize import finalize
from relex_callback.trajectory.store import TrajectoryStore
import torch

from helpers import compare_weights, extrapolation_tolerance
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "train_grpo.py")
CONFIGS = os.path.join(HERE, "configs")
BIN = os.path.dirname(sys.executable)
TCUT, HORIZONS = 6, (12, 20)


_PORTS = {"next": 0}


def _port():
    """A port for a launcher's rendezvous that no other process holds now. The tests run in parallel (pytest-xdist):
    each worker takes its ports from a block of its own, below the range where the OS picks the local ports of
    connections (gloo's among them: an OS-assigned port could be one a rendezvous is about to bind), and skips any
    port that something holds."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    base = 20000 + 1000 * (int(worker) % 12 if worker.isdigit() else 0)
    for _ in range(1000):
        _PORTS["next"] += 1
        port = base + (_PORTS["next"] + os.getpid()) % 1000
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(port)
    raise RuntimeError(f"no free port in {base}..{base + 999}")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["WANDB_DISABLED"] = "true"
    # the libraries' deprecation warnings (one per rank per call) would fill the stderr tail a failure shows
    env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::DeprecationWarning"
    return env


def launch(mode: str, out: str, *extra: str, timeout: int = 600, expect_fail: bool = False):
    if mode in ("ddp", "fsdp2"):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, out]
        if mode == "fsdp2":
            cmd.append("--fsdp2")
    else:
        cfg = os.path.join(CONFIGS, f"{mode}_cpu.yaml")
        cmd = [
            os.path.join(BIN, "accelerate"),
            "launch",
            "--config_file",
            cfg,
            "--main_process_port",
            _port(),
            SCRIPT,
            out,
        ]
    cmd += list(extra)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if expect_fail:
        assert p.returncode != 0, f"{' '.join(cmd)} succeeded but was expected to fail:\n{p.stdout[-3000:]}"
        return p
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def replay(run_dir: str, out_dir: str, exclude=None, horizons=HORIZONS, tcut=TCUT, slots=None, fold_rank=None,
           record="snaps"):
    """The single-process engine over the exact trajectory the distributed run followed (``slots`` ring slots and
    ``fold_rank``: the same folded buffer). Excluded (untracked) tensors are written as they were at ``tcut``.
    ``record``: which record of ``trajectory.pt`` to replay (``snaps``: the parameters; ``masters``: DeepSpeed's fp32
    master weights), into a float32 model."""
    rec = torch.load(os.path.join(run_dir, "trajectory.pt"))
    names, snaps = rec["names"], rec[record]
    assert set(range(tcut + 1)) <= set(snaps)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0)
    params = dict(model.named_parameters())
    untracked = [n for n in names if exclude and re.search(exclude, n)]
    names = [n for n in names if n not in untracked]
    with torch.no_grad():
        for n in names:
            params[n].copy_(snaps[0][n])
        for n in untracked:
            params[n].copy_(snaps[tcut][n])
    tracked = plain_tracked([(n, params[n]) for n in names])
    store = TrajectoryStore(
        [t.spec for t in tracked], slots or tcut, dtype="float32", storage="host", fold_rank=fold_rank
    )
    store.set_theta0([snaps[0][n].reshape(-1).float() for n in names])
    for t in range(1, tcut + 1):
        store.snapshot(t, [snaps[t][n].reshape(-1).float() for n in names])
    finalize(
        store,
        FullModelWriter(ModelSource(model, tok)),
        RelexSettings(tcut=tcut, horizons=tuple(horizons)),
        out_dir=out_dir,
    )
    return snaps


def resume_and_splice(mode: str, d: str, stopped: int, *args: str) -> dict:
    """Relaunch a run stopped at step ``stopped`` with ``args`` (``--resume`` ...) and splice the first launch's
    recorded parameters of steps 0..stopped into the resumed launch's record (``trajectory.pt``), which starts at
    ``stopped``; returns the whole run's snapshots."""
    first = torch.load(os.path.join(d, "trajectory.pt"))
    os.remove(os.path.join(d, "trajectory.pt"))
    launch(mode, d, *args)
    rec = torch.load(os.path.join(d, "trajectory.pt"))
    snaps = dict(rec["snaps"])
    snaps.update({t: first["snaps"][t] for t in range(stopped + 1)})
    torch.save({"names": rec["names"], "snaps": snaps}, os.path.join(d, "trajectory.pt"))
    return snaps


def load_sd(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, m


def rank_info(run_dir):
    return [json.load(open(os.path.join(run_dir, f"rank-{r}.json"))) for r in range(2)]


# the sharded runs leave the norms untracked: those are gathered at write time (GatheredParameters / full_tensor)
EXCLUDE = {"zero3": "norm", "fsdp2": "norm"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(mode):
        if mode not in cache:
            d = str(tmp_path_factory.mktemp(mode))
            ex = EXCLUDE.get(mode)
            launch(mode, d, *(["--exclude", ex] if ex else []))
            ref = os.path.join(d, "single")
            snaps = replay(d, ref, exclude=ex)
            cache[mode] = (d, ref, snaps)
        return cache[mode]

    return get


def check_matches_single(run_dir, ref_dir, snaps, horizons=HORIZONS, exclude=None, folded=False):
    """Each horizon checkpoint of the distributed run vs the single-process replay of the same recorded trajectory:
    both within their float32 solve's bound of its float64 reference (helpers.compare_weights: the all-reduced Gram
    sums per-process float32 Grams in float64, sum_p sqrt(n_p) u |m_pi||m_pj| <= sqrt(n) u |m_i||m_j|, the
    single-process bound; was rtol 1e-5). Untracked tensors (``exclude``: the weights at tcut) bitwise. Returns the
    per-horizon bounds (name -> absolute bound) for the validation checks. ``folded``: a folded run against the folded
    replay (tests/test_distributed_fold.py): both differ from the exact reference by what the folds discarded, and
    the folds' own rounding (per-process vs all-reduced fold Grams) is not derived: rtol 1e-5 (docs/tolerances.md)."""
    out = {}
    for h in horizons:
        got, model = load_sd(os.path.join(run_dir, "relex", f"step-{h}"))
        want, _ = load_sd(os.path.join(ref_dir, f"step-{h}"))
        assert got.keys() == want.keys()
        if folded:
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step-{h} {k}: {m}")
        else:
            tied = [k for k in got if k not in snaps[0]]  # lm_head.weight: tied to the embedding (checked below)
            untracked = [k for k in snaps[0] if exclude and re.search(exclude, k)]
            _, out[h] = compare_weights({k: v for k, v in got.items() if k not in tied},
                                        {k: v for k, v in want.items() if k not in tied}, snaps, h,
                                        list(range(1, TCUT + 1)), label=f"{os.path.basename(run_dir)} step-{h}",
                                        exact=untracked)
        # the comparison is not vacuous: the weights moved well beyond the tolerance
        moved = max(float((got[n] - snaps[0][n]).abs().max()) for n in snaps[0] if n in got)
        assert moved > 1e-3
        # tied weights stay tied
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return out


def check_state(run_dir, ref_dir):
    """The sharded state file reads back (load_state) as the single-process one does, and extrapolates the same."""
    run = os.path.join(run_dir, "relex")
    assert os.path.isfile(os.path.join(run, "relex_state.index.json"))
    got, want = load_state(run), load_state(ref_dir)
    assert [s.name for s in got.specs] == [s.name for s in want.specs]
    sd, _ = load_sd(os.path.join(ref_dir, "step-20"))
    rec = torch.load(os.path.join(run_dir, "trajectory.pt"))
    snaps, steps = rec["snaps"], list(range(1, TCUT + 1))
    # the state extrapolates what the single-process file holds: each within its float32 bound of the float64
    # reference of the recorded trajectory (was rtol 1e-5)
    mine = {
        s.name: got.extrapolate(i, 20, snaps[0][s.name].reshape(-1)).reshape(s.shape) for i, s in enumerate(got.specs)
    }
    compare_weights(mine, {n: sd[n] for n in mine}, snaps, 20, steps, label=f"{os.path.basename(run_dir)} state")
    # the slopes (was rtol 1e-4): the slope a of the coefficient line on the unit direction is the extrapolation per
    # unit of H as H -> infinity, and |da| <= ||d(a v)||: extrapolation_tolerance at H = 1e12 bounds |da| / |a| for
    # each solve (run and single), so the two differ by at most the sum
    assert got.slope.shape == want.slope.shape and got.slope.shape[1] == 1
    X = torch.tensor([[float(t), 1.0] for t in steps], dtype=torch.float64)
    worst = 0.0
    for i, s in enumerate(got.specs):
        t0 = snaps[0][s.name].double()
        M = torch.stack([(snaps[t][s.name].double() - t0).reshape(-1) for t in steps])
        _, _, Vh = torch.linalg.svd(M, full_matrices=False)
        a = float(torch.linalg.lstsq(X, (M @ Vh[0]).unsqueeze(1)).solution[0, 0])
        bound = 2 * extrapolation_tolerance(M, steps, 1e12) * abs(a)
        err = abs(float(got.slope[i, 0]) - float(want.slope[i, 0]))
        assert err <= bound, (s.name, err, bound)
        worst = max(worst, err / bound)
    print(f"{os.path.basename(run_dir)} slopes: max error / bound {worst:.2e}")
    assert not [e for e in os.listdir(run) if e.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp2"])
def test_horizons_match_single_process(runs, mode):
    run_dir, ref_dir, snaps = runs(mode)
    check_matches_single(run_dir, ref_dir, snaps, exclude=EXCLUDE.get(mode))
    check_state(run_dir, ref_dir)
    info = rank_info(run_dir)
    expected = {"ddp": "replicated", "zero2": "replicated", "zero3": "zero3", "fsdp2": "fsdp2"}[mode]
    assert [i["mode"] for i in info] == [expected, expected]
    # the report carries the whole window's drift share (it used to read "not computed (not computed)" here)
    with open(os.path.join(run_dir, "relex", "report.json")) as fh:
        noise = json.load(fh)["noise"]
    assert isinstance(noise.get("drift_share"), float) and 0.0 <= noise["drift_share"] <= 1.0, noise


@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_sharding_in_one_process_records_the_shards(tmp_path, mode):
    """DeepSpeed ZeRO-3 or FSDP2 launched as one process (a single GPU with offload, say) still shards: ZeRO-3's
    module parameters are empty placeholders, FSDP2's are DTensors. Taken for a plain single process, the callback
    recorded ZeRO-3's placeholders (the window failed at tcut as 'the weights did not move at steps 1-6') and raised
    on FSDP2's DTensors at on_train_begin; now each records its shards and the horizons equal the single-process
    replay of the trajectory."""
    d = str(tmp_path)
    if mode == "zero3":
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(CONFIGS, "zero3_cpu.yaml"),
               "--num_processes", "1", "--main_process_port", _port(), SCRIPT, d]
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "1", "--master_port", _port(), SCRIPT, d, "--fsdp2"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    info = json.load(open(os.path.join(d, "rank-0.json")))
    assert info["mode"] == mode and info["world_size"] == 1, info
    ref = os.path.join(d, "single")
    snaps = replay(d, ref)
    check_matches_single(d, ref, snaps)


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_each_rank_keeps_its_share(runs, mode):
    """No rank holds the full trajectory: per-rank buffer bytes are about total / world_size."""
    run_dir, _, snaps = runs(mode)
    info = rank_info(run_dir)
    ex = EXCLUDE.get(mode)
    total_elements = sum(t.numel() for n, t in snaps[0].items() if not (ex and re.search(ex, n)))
    total_bytes = TCUT * total_elements * 4  # fp32 buffer, one row per step
    per_rank = [i["buffer_bytes"] for i in info]
    assert info[0]["buffer_bytes_per_rank"] == per_rank
    assert sum(i["tracked_elements_this_rank"] for i in info) == total_elements  # a partition, nothing twice
    for b in per_rank:
        assert abs(b - total_bytes / 2) <= 0.1 * total_bytes, (per_rank, total_bytes)


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_resume_distributed(tmp_path, storage):
    """DDP run stopped at step 4 (checkpoint at 4 with every rank's trajectory share), resumed to tcut: the result
    equals the replay of the whole trajectory. With the disk tier each process's memory-mapped file lives in its own
    run directory (relex/trajectory/rank-r) and the checkpoint links it."""
    d = str(tmp_path)
    launch("ddp", d, "--max-steps", "4", "--save-steps", "4", "--storage", storage)
    for r in range(2):
        assert os.path.isfile(os.path.join(d, "checkpoint-4", "relex_trajectory", f"rank-{r}", "trajectory.json"))
        if storage == "disk":
            assert os.path.isfile(os.path.join(d, "relex", "trajectory", f"rank-{r}", "trajectory.bin"))
    snaps = resume_and_splice("ddp", d, 4, "--resume", "--storage", storage)
    ref = os.path.join(d, "single")
    replay(d, ref)
    check_matches_single(d, ref, snaps)


# ------------------------------------------------------------------------------------------- validation mode
VHORIZONS = (8, 11)


@pytest.fixture(scope="module")
def validation_runs(tmp_path_factory):
    """``mode -> (run_dir, single_dir, snaps, first_rank_infos)``. ZeRO-3: launched to step 9 (checkpoint at 9,
    horizon 8 validated), then resumed from checkpoint-9 to 11 (horizon 11 validated after the resume)."""
    cache = {}

    def get(mode):
        if mode in cache:
            return cache[mode]
        d = str(tmp_path_factory.mktemp(f"validate-{mode}"))
        ex = EXCLUDE.get(mode)
        common = ["--validate", "--horizons", ",".join(map(str, VHORIZONS))] + (["--exclude", ex] if ex else [])
        resume = mode == "zero3"
        launch(mode, d, *common, "--max-steps", "9" if resume else "11", *(["--save-steps", "9"] if resume else []))
        first = rank_info(d)
        if resume:
            for r in range(2):
                assert os.path.isfile(
                    os.path.join(d, "checkpoint-9", "relex_trajectory", f"rank-{r}", "validation.json")
                )
            rec1 = torch.load(os.path.join(d, "trajectory.pt"))
            os.remove(os.path.join(d, "trajectory.pt"))
            launch(mode, d, *common, "--max-steps", "11", "--resume")
            rec2 = torch.load(os.path.join(d, "trajectory.pt"))
            snaps = dict(rec2["snaps"])  # steps 9 (where it resumed), 10, 11
            snaps.update(rec1["snaps"])  # steps 0..9 of the first launch
            torch.save({"names": rec1["names"], "snaps": snaps}, os.path.join(d, "trajectory.pt"))
        ref = os.path.join(d, "single")
        snaps = replay(d, ref, exclude=ex, horizons=VHORIZONS)
        assert set(snaps) >= set(range(12))
        cache[mode] = (d, ref, snaps, first)
        return cache[mode]

    return get


def expected_validation(ref_dir, snaps, h, names):
    """Cosine and norm ratio per tensor from the full recorded parameters and the single-process checkpoint."""
    sd, _ = load_sd(os.path.join(ref_dir, f"step-{h}"))
    out = {}
    for n in names:
        real = (snaps[h][n].double() - snaps[0][n].double()).flatten()
        pred = (sd[n].double() - snaps[0][n].double()).flatten()
        out[n] = (
            float(real @ pred / (real.norm() * pred.norm())),
            float(pred.norm() / real.norm()),
            float(pred.norm()),
            real.numel(),
        )
    return out


@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_validation_mode(validation_runs, mode):
    run_dir, ref_dir, snaps, first = validation_runs(mode)
    ex = EXCLUDE.get(mode)
    bounds = check_matches_single(run_dir, ref_dir, snaps, horizons=VHORIZONS, exclude=ex)
    run = os.path.join(run_dir, "relex")
    rep = json.load(open(os.path.join(run, "report.json")))
    assert sorted(rep["validation"], key=int) == [str(h) for h in VHORIZONS]
    tracked = [n for n in snaps[0] if not (ex and re.search(ex, n))]
    u = 2.0 ** -24
    worst = 0.0
    for h in VHORIZONS:
        got = rep["validation"][str(h)]
        assert [t["name"] for t in got["tensors"]] == tracked  # every tensor once, in the model's order
        want = expected_validation(ref_dir, snaps, h, tracked)
        cos_bounds = []
        for t in got["tensors"]:
            cos, ratio, pred_norm, n = want[t["name"]]
            # (was abs 1e-6 / rel 1e-6) the run's prediction is within bounds[h][name] of the single-process file
            # (check_matches_single), so its direction within asin(e), e = that / ||pred||, and its norm within e
            # relative; the callback's own figures add 2u(1 + u) (cosine) / 2u (ratio) for its float32 subtraction
            # of each delta and 3 n 2^-53 for the float64 sums (as in test_callback's validation test)
            e = bounds[h][t["name"]] / pred_norm
            bc = math.asin(min(1.0, e)) + 2 * u * (1 + u) + 3 * n * 2.0 ** -53
            br = e + 2 * u + 3 * n * 2.0 ** -53
            assert abs(t["cosine"] - cos) <= bc, (h, t["name"], t["cosine"], cos, bc)
            assert abs(t["norm_ratio"] - ratio) <= br * ratio, (h, t["name"], t["norm_ratio"], ratio, br)
            worst = max(worst, abs(t["cosine"] - cos) / bc, abs(t["norm_ratio"] - ratio) / (br * ratio))
            cos_bounds.append(bc)
        cos = [want[n][0] for n in tracked]
        mean_bound = sum(cos_bounds) / len(cos_bounds) + 2 * len(cos) * 2.0 ** -53
        assert abs(got["summary"]["cosine_mean"] - sum(cos) / len(cos)) <= mean_bound
        # not vacuous: the extrapolation is informative but not exact at these horizons
        assert 0.3 < got["summary"]["cosine_global"] < 1 - 1e-4
    # every rank derived the same numbers (one all-reduce of the partial sums); rank 0 alone wrote report.json
    print(f"{mode} validation figures: max error / bound {worst:.2e}")
    assert first[0]["validation"] == first[1]["validation"]
    assert first[0]["validation"]["8"] == rep["validation"]["8"]
    assert not [e for e in os.listdir(run) if ".tmp" in e]
    if mode == "zero3":
        # resumed at 9: horizon 11 was validated by the resumed processes, the same on both ranks; rank 0 read the
        # report (with 8) back before adding 11, rank 1 never touched the file
        again = rank_info(run_dir)
        assert sorted(first[0]["validation"]) == ["8"]
        assert again[0]["validation"]["11"] == again[1]["validation"]["11"] == rep["validation"]["11"]
        assert sorted(again[0]["validation"]) == ["11", "8"] and sorted(again[1]["validation"]) == ["11"]


def test_peft_refused_in_distributed_runs(tmp_path):
    """A PEFT model under 2 processes is refused at on_train_begin on every rank, with a RelexInputError."""
    pytest.importorskip("peft")
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", _port(),
           os.path.join(HERE, "dist_scripts", "peft_refusal.py"), str(tmp_path)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(2):
        msg = open(tmp_path / f"rank-{r}.txt").read()
        assert msg.startswith("RelexInputError:") and "PEFT" in msg and "distributed" in msg, msg


@pytest.mark.parametrize("mode,failing", [("ddp", 1), ("zero3", 1)])
def test_a_solve_failing_on_one_process_stops_every_process_and_keeps_the_window(tmp_path, mode, failing):
    """One process's Gram pass raises at tcut (a CUDA error, an OOM): every process stops at once with an error
    (none waits for the failed one in a collective: the ZeRO-3 Gram all-reduce, the DDP agreement after the solve),
    and each keeps its share of the window in partial_trajectory/."""
    out = str(tmp_path / mode)
    if mode in ("ddp", "fsdp2"):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, out]
    else:
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(CONFIGS, f"{mode}_cpu.yaml"),
               "--main_process_port", _port(), SCRIPT, out]
    t0 = time.time()
    p = subprocess.run(cmd + ["--fail-solve-rank", str(failing)], env=_env(), capture_output=True, text=True,
                       timeout=400)
    assert p.returncode != 0, "the run should fail"
    infos = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(2)]
    mine, other = infos[failing], infos[1 - failing]
    assert mine["error"] == "RelexEndOfWindowError" and "illegal memory access" in mine["message"], mine
    assert other["error"] == "RelexEndOfWindowError" and "another process failed" in other["message"], other
    for info in infos:
        assert "partial_trajectory" in info["message"] and "relex extrapolate --trajectory" in info["message"]
    kept = os.path.join(out, "relex", "partial_trajectory")
    assert os.path.isdir(kept) and os.listdir(kept), "the window was not kept"
    assert time.time() - t0 < 300  # no collective timeout was waited for


@pytest.mark.parametrize("mode,failing", [("ddp", 1), ("zero3", 0)])
def test_write_failure_is_a_relex_write_error_on_every_rank(tmp_path, mode, failing):
    """One process's checkpoint shard write fails (ENOSPC, injected where a shard file is written): every process raises
    RelexWriteError (no process waits in a collective the other never reaches), nothing exists under step-H, no
    temporary is left, and the state written before the horizons is whole (relex materialize can finish)."""
    out = str(tmp_path / mode)
    cmd_extra = ("--fail-write-rank", str(failing))
    if mode in ("ddp", "fsdp2"):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, out]
    else:
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(CONFIGS, f"{mode}_cpu.yaml"),
               "--main_process_port", _port(), SCRIPT, out]
    p = subprocess.run(cmd + list(cmd_extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, "the run should fail"
    infos = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(2)]
    for info in infos:
        assert info["error"] == "RelexWriteError", info
        assert "step-12" in info["message"] and "relex materialize" in info["message"]
        assert f"process {failing}" in info["message"] and "No space left on device" in info["message"]
    relex = os.path.join(out, "relex")
    left = sorted(os.listdir(relex))
    assert "step-12" not in left and "step-20" not in left
    assert not [n for n in left if n.startswith(".")], left  # no temporaries
    assert "relex_state.index.json" in left

    assert load_state(relex).tcut == TCUT
