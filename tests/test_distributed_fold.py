"""The streaming fold in distributed runs (2 real processes over gloo): DDP folds each process's whole tensors, ZeRO-3
and FSDP2 fold each process's slices through the all-reduced Grams. A run whose ring holds 3 of the window's 8 snapshots
(fold_rank 2: two folds) must write the horizons a single-process folded replay of the same trajectory writes (1e-5);
the buffer bytes per process do not grow with tcut; a folded window resumes (ZeRO-3, stopped after its first fold).

Every process must record the same steps (a fold and the final solve are collectives over them): a slice that did not
move on one ZeRO-3 process, or a NaN there, gets one verdict on every process; and a failure while opening the
window on one process (a full disk) stops every process before step 1, and so does a base (theta_0) that holds a
NaN on one process, with the same message everywhere.
"""

import os

import pytest

from test_distributed import check_matches_single, EXCLUDE, launch, load_sd, rank_info, replay, resume_and_splice
from test_full_disk import _mount, _umount
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.trainer.topology import balance

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SLOTS, FOLD_RANK = 3, 2


def fold_args(tcut, horizons, exclude):
    return ["--tcut", str(tcut), "--horizons", ",".join(map(str, horizons)), "--buffer-slots", str(SLOTS),
            "--fold-rank", str(FOLD_RANK), *(["--exclude", exclude] if exclude else [])]


def check_folded_ranks(run_dir, tcut):
    info = rank_info(run_dir)
    folds = (tcut - 1) // SLOTS  # a fold whenever a new step finds the ring full
    for i in info:
        assert i["fold_rank"] == FOLD_RANK and i["folds"] == folds, i
        assert i["steps"] == list(range(1, tcut + 1)), i  # the same steps on every process
        assert i["buffer_bytes"] == (SLOTS + FOLD_RANK) * i["tracked_elements_this_rank"] * 4, i
    return info


@pytest.fixture(scope="module")
def folded_runs(tmp_path_factory):
    cache = {}

    def get(mode, tcut=8, horizons=(16, 24)):
        key = (mode, tcut)
        if key not in cache:
            d = str(tmp_path_factory.mktemp(f"fold-{mode}-{tcut}"))
            ex = EXCLUDE.get(mode)
            launch(mode, d, *fold_args(tcut, horizons, ex))
            ref = os.path.join(d, "single")
            snaps = replay(d, ref, exclude=ex, horizons=horizons, tcut=tcut, slots=SLOTS, fold_rank=FOLD_RANK)
            cache[key] = (d, ref, snaps)
        return cache[key]

    return get


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_folded_run_equals_single_process_folded_replay(folded_runs, mode, tmp_path):
    run_dir, ref_dir, snaps = folded_runs(mode)
    check_folded_ranks(run_dir, 8)
    check_matches_single(run_dir, ref_dir, snaps, horizons=(16, 24), folded=True)
    # the fold is not the exact path in disguise: the exact replay of the same trajectory differs
    exact = str(tmp_path / "exact")
    replay(run_dir, exact, exclude=EXCLUDE.get(mode), horizons=(16,), tcut=8)

    got, _ = load_sd(os.path.join(run_dir, "relex", "step-16"))
    want, _ = load_sd(os.path.join(exact, "step-16"))
    assert max(float((got[k] - want[k]).abs().max()) for k in want) > 1e-5


def test_zero3_folded_resume_and_flat_buffer(folded_runs, tmp_path):
    """ZeRO-3, tcut 12 with the same 3 slots: stopped at step 5 (one fold done, two steps in the ring, checkpoint-5
    holds each process's basis and ring), resumed to tcut. Equals the folded replay of the whole trajectory, and each
    process's buffer is the same size as at tcut 8."""
    d = str(tmp_path)
    ex = EXCLUDE["zero3"]
    args = fold_args(12, (24,), ex)
    launch("zero3", d, *args, "--max-steps", "5", "--save-steps", "5")
    for r in range(2):
        assert os.path.isfile(os.path.join(d, "checkpoint-5", "relex_trajectory", f"rank-{r}", "fold.safetensors"))
    snaps = resume_and_splice("zero3", d, 5, *args, "--resume")
    ref = os.path.join(d, "single")
    replay(d, ref, exclude=ex, horizons=(24,), tcut=12, slots=SLOTS, fold_rank=FOLD_RANK)
    check_matches_single(d, ref, snaps, horizons=(24,), folded=True)
    info12 = check_folded_ranks(d, 12)
    info8 = rank_info(folded_runs("zero3")[0])
    assert [i["buffer_bytes"] for i in info12] == [i["buffer_bytes"] for i in info8]


# ------------------------------------------------------------------------ one verdict per step for every process
def test_zero3_a_slice_that_did_not_move_is_still_recorded_on_every_process(tmp_path):
    """Process 1's slice of every parameter is put back after step 2's update (it did not move) while process 0's
    moved: alone, process 1 would skip step 2 as unchanged and the processes' Grams would no longer line up. Every
    process records the same steps, and the horizons equal the replay of the trajectory the weights really took."""
    d = str(tmp_path)
    ex = EXCLUDE["zero3"]
    launch("zero3", d, "--exclude", ex, "--corrupt", "1:2:freeze", "--record-partitions")
    info = rank_info(d)
    assert [i["steps"] for i in info] == [list(range(1, 7))] * 2
    assert [i["skipped_unchanged_steps"] for i in info] == [[], []]
    ref = os.path.join(d, "single")
    snaps = replay(d, ref, exclude=ex)
    check_matches_single(d, ref, snaps, exclude=ex)


def test_zero3_a_nan_on_one_process_stops_every_process(tmp_path):
    """A NaN in process 1's slice at step 3: both processes raise RelexNonFiniteError at step 3 (process 0 says it
    was found on another process) instead of process 0 going on into a collective process 1 never joins."""
    d = str(tmp_path)
    p = launch("zero3", d, "--exclude", EXCLUDE["zero3"], "--corrupt", "1:3:nan:q_proj", expect_fail=True)
    errs = rank_info(d)
    assert [e["error"] for e in errs] == ["RelexNonFiniteError"] * 2, (errs, p.stderr[-3000:])
    assert "at step 3 on another process" in errs[0]["message"]
    assert "at step 3 in 1 tensor(s)" in errs[1]["message"] and "q_proj" in errs[1]["message"]
    assert not os.path.exists(os.path.join(d, "relex", "step-12"))


@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_a_nan_in_the_base_is_the_bases_on_every_process_before_step_1(tmp_path, mode):
    """A NaN already in theta_0. DDP: both replicas hold it, in a tensor process 1 tracks (its
    share); ZeRO-3: element 600 of q_proj (32x32), in process 1's partition [512, 1024); FSDP2: only process 1's
    shard of q_proj holds it. Before, only the process that tracks the NaN said
    "the base"; process 0 said the run diverged at step 1 (DDP) or "on another process" (FSDP2), after a training
    step. Now: the same message on both processes, naming the tensor and process 1, at step 0, nothing written in
    the relex output_dir and the user's file there untouched."""
    if mode == "ddp":
        model = build_model(build_tokenizer(), hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        owner = balance([p.numel() for _, p in named], 2)
        name = next(n for (n, p), r in zip(named, owner) if r == 1 and p.dim() == 2)
        arg = name  # every replica (DDP broadcasts process 0's weights anyway)
    elif mode == "zero3":
        name = "model.layers.0.self_attn.q_proj.weight"
        arg = name + "@600"  # on every process before partitioning; after it, only in process 1's partition
    else:
        name = "model.layers.0.self_attn.q_proj.weight"
        arg = name + ":1"  # rows 16..31: process 1's shard only
    relex = tmp_path / "relex"
    relex.mkdir()
    (relex / "notes.txt").write_text("the user's\n")
    p = launch(mode, str(tmp_path), "--nan-base", arg, "--exclude", "norm", expect_fail=True, timeout=300)
    errs = rank_info(str(tmp_path))
    assert [e["error"] for e in errs] == ["RelexNonFiniteError"] * 2, (errs, p.stderr[-3000:])
    msgs = [e["message"] for e in errs]
    assert msgs[0] == msgs[1], msgs  # one verdict
    assert f"{name} (on process 1)" in msgs[0] and "base model" in msgs[0] and "before step 1" in msgs[0], msgs[0]
    assert "1 tensor(s)" in msgs[0] and "diverged" not in msgs[0] and "another process" not in msgs[0], msgs[0]
    assert [e["global_step"] for e in errs] == [0, 0]  # no training step was spent on it
    assert sorted(os.listdir(relex)) == ["notes.txt"] and (relex / "notes.txt").read_text() == "the user's\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")]


# ------------------------------------------------------------------------ the disk tier on a full disk
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_ddp_disk_tier_that_fits_only_one_process_stops_both_before_step_1(tmp_path):
    """storage="disk" with the relex output_dir on a real tmpfs that holds one process's trajectory file but not
    both: the process whose allocation fails raises RelexMemoryError naming the disk, the other raises too (instead
    of waiting in the next collective for 30 minutes), neither trains a step, and no trajectory file is left."""
    model = build_model(build_tokenizer(), hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    owner = balance(sizes, 2)
    need = sorted((6 + 1) * 4 * sum(n for n, o in zip(sizes, owner) if o == r) for r in range(2))  # rows + theta_0
    relex = tmp_path / "relex"
    _mount(relex, (need[1] + need[0] // 2) // 1024)
    try:
        p = launch("ddp", str(tmp_path), "--storage", "disk", "--catch", expect_fail=True, timeout=300)
        errs = rank_info(str(tmp_path))
        assert [e["error"] for e in errs] == ["RelexMemoryError"] * 2, (errs, p.stderr[-3000:])
        msgs = [e["message"] for e in errs]
        print(msgs)
        # which process's allocation fails first is a race: one fails and the other (whose allocation succeeded)
        # says another process failed, or both fail while the other's file still holds its space; each message
        # names the disk or the other process, at least one names the disk
        disk = ["free disk space" in m or "file system has" in m or "the disk has" in m for m in msgs]
        other = ["another process failed" in m for m in msgs]
        assert all(d or o for d, o in zip(disk, other)) and any(disk) and sum(other) <= 1, msgs
        left = [os.path.join(d, f) for d, _, fs in os.walk(relex) for f in fs if f.endswith(".bin")]
        assert not left, left
        assert [e["global_step"] for e in errs] == [0, 0]  # refused before the first step
    finally:
        _umount(relex)
