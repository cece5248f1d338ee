"""Distributed runs on CPU with real processes over gloo: DDP (torchrun), DeepSpeed ZeRO-2 and ZeRO-3 (accelerate
launch), FSDP2 (torch's ``fully_shard`` applied by the script under torchrun: accelerate has no FSDP2 on CPU, an
accelerate config with ``use_cpu`` silently drops FSDP).

Each launch trains a tiny model with GRPOTrainer + RelexCallback (fp32 buffer, tcut=6, horizons 12 and 20); the
script also records the full parameters at every snapshot step (test code only). The test replays those snapshots
through the single-process engine and requires every tensor of every horizon checkpoint to match (1e-5 relative).
One launch per mode (module-scoped) serves all assertions about it.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "train_grpo.py")
CONFIGS = os.path.join(HERE, "configs")
BIN = os.path.dirname(sys.executable)
TCUT, HORIZONS = 6, (12, 20)
_PORT = [29600]


def _port():
    _PORT[0] += 1
    return str(_PORT[0] + os.getpid() % 200)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["WANDB_DISABLED"] = "true"
    return env


def launch(mode: str, out: str, *extra: str, timeout: int = 600):
    if mode in ("ddp", "fsdp2"):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, out]
        if mode == "fsdp2":
            cmd.append("--fsdp2")
    else:
        cfg = os.path.join(CONFIGS, f"{mode}_cpu.yaml")
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", cfg, "--main_process_port", _port(), SCRIPT, out]
    cmd += list(extra)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def replay(run_dir: str, out_dir: str, exclude=None):
    """The single-process engine over the exact trajectory the distributed run followed. Excluded (untracked)
    tensors are written as they were at ``tcut``."""
    import re

    from relex_callback.buffer import TrajectoryStore
    from relex_callback.engine import finalize
    from relex_callback.params import plain_tracked
    from relex_callback.toy import build_model, build_tokenizer
    from relex_callback.writer import ModelSource

    rec = torch.load(os.path.join(run_dir, "trajectory.pt"))
    names, snaps = rec["names"], rec["snaps"]
    assert sorted(snaps) == list(range(TCUT + 1))
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0)
    params = dict(model.named_parameters())
    untracked = [n for n in names if exclude and re.search(exclude, n)]
    names = [n for n in names if n not in untracked]
    with torch.no_grad():
        for n in names:
            params[n].copy_(snaps[0][n])
        for n in untracked:
            params[n].copy_(snaps[TCUT][n])
    tracked = plain_tracked([(n, params[n]) for n in names])
    store = TrajectoryStore([t.spec for t in tracked], TCUT, dtype="float32", storage="host")
    store.set_theta0([snaps[0][n].reshape(-1) for n in names])
    for t in range(1, TCUT + 1):
        store.snapshot(t, [snaps[t][n].reshape(-1) for n in names])
    finalize(store, tcut=TCUT, horizons=HORIZONS, out_dir=out_dir, source=ModelSource(model, tok))
    return snaps


def load_sd(path):
    from transformers import AutoModelForCausalLM

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


def check_matches_single(run_dir, ref_dir, snaps):
    for h in HORIZONS:
        got, model = load_sd(os.path.join(run_dir, "relex", f"step-{h}"))
        want, _ = load_sd(os.path.join(ref_dir, f"step-{h}"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step-{h} {k}: {m}")
        # the comparison is not vacuous: the weights moved well beyond the tolerance
        moved = max(float((got[n] - snaps[0][n]).abs().max()) for n in snaps[0] if n in got)
        assert moved > 1e-3
        # tied weights stay tied
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def check_state(run_dir, ref_dir):
    """The sharded state file reads back (load_state) as the single-process one does, and extrapolates the same."""
    from relex_callback.state import load_state

    run = os.path.join(run_dir, "relex")
    assert os.path.isfile(os.path.join(run, "relex_state.index.json"))
    got, want = load_state(run), load_state(ref_dir)
    assert [s.name for s in got.specs] == [s.name for s in want.specs]
    torch.testing.assert_close(got.slope, want.slope, rtol=1e-4, atol=1e-9)
    sd, _ = load_sd(os.path.join(ref_dir, "step-20"))
    rec = torch.load(os.path.join(run_dir, "trajectory.pt"))
    for i, s in enumerate(got.specs):
        theta0 = rec["snaps"][0][s.name].reshape(-1)
        torch.testing.assert_close(got.extrapolate(i, 20, theta0).reshape(s.shape), sd[s.name], rtol=1e-5, atol=1e-6)
    assert not [e for e in os.listdir(run) if e.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp2"])
def test_horizons_match_single_process(runs, mode):
    run_dir, ref_dir, snaps = runs(mode)
    check_matches_single(run_dir, ref_dir, snaps)
    check_state(run_dir, ref_dir)
    info = rank_info(run_dir)
    expected = {"ddp": "replicated", "zero2": "replicated", "zero3": "zero3", "fsdp2": "fsdp2"}[mode]
    assert [i["mode"] for i in info] == [expected, expected]


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_each_rank_keeps_its_share(runs, mode):
    """No rank holds the full trajectory: per-rank buffer bytes are about total / world_size."""
    import re

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


def test_resume_distributed(tmp_path):
    """DDP run stopped at step 4 (checkpoint at 4 with every rank's trajectory share), resumed to tcut: the result
    equals the replay of the whole trajectory."""
    d = str(tmp_path)
    launch("ddp", d, "--max-steps", "4", "--save-steps", "4")
    for r in range(2):
        assert os.path.isfile(os.path.join(d, "checkpoint-4", "relex_trajectory", f"rank-{r}", "trajectory.json"))
    first = torch.load(os.path.join(d, "trajectory.pt"))
    os.remove(os.path.join(d, "trajectory.pt"))
    launch("ddp", d, "--resume")
    rec = torch.load(os.path.join(d, "trajectory.pt"))
    # the resumed process recorded steps 4..6 (and its step-4 start); splice the first run's steps 0..4 in
    snaps = dict(rec["snaps"])
    for t in range(0, 5):
        snaps[t] = first["snaps"][t]
    torch.save({"names": rec["names"], "snaps": snaps}, os.path.join(d, "trajectory.pt"))
    ref = os.path.join(d, "single")
    replay(d, ref)
    check_matches_single(d, ref, snaps)
