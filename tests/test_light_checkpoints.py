"""Light trainer checkpoints and the disk tier on a real, small file system.

The trajectory's bytes are written once, in the run directory, and hard-linked into each checkpoint's
``relex_trajectory/``: a checkpoint adds the rows recorded since the previous one plus metadata. Old checkpoints stay
valid through folds (new basis files; the disk tier moves to a fresh mapped file when a checkpoint links the old one)
and resumes. The disk tier's mapped file is allocated in full up front, so a disk that fills during training is never
a SIGBUS (checked on a tmpfs of a few MB mounted here, as root).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import shutil

import pytest
import torch

from relex_callback import RelexCallback
from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.trajectory.tiers import allocate_file
from relex_callback.errors import RelexMemoryError
from relex_callback.params import TensorSpec
from grpo import grpo_trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def _specs():
    return [TensorSpec("a", (40, 30), torch.float32, 1200), TensorSpec("b", (50,), torch.float32, 50)]


def _snaps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = [torch.randn(s.shape, generator=g) for s in _specs()]
    dirs = [torch.randn(s.shape, generator=g) for s in _specs()]
    noise = [[torch.randn(s.shape, generator=g) for s in _specs()] for _ in range(n)]
    return theta0, [[t0 + 1e-2 * (k + 1) * d + 1e-4 * e for t0, d, e in zip(theta0, dirs, noise[k])] for k in range(n)]


def _unique_bytes(paths, seen):
    """Bytes of the files under ``paths`` whose inode is not in ``seen`` (what ``du`` counts for a directory listed
    after the others: hard links once)."""
    n = 0
    for p in paths:
        for root, _, files in os.walk(p):
            for f in files:
                st = os.stat(os.path.join(root, f))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    n += st.st_size
    return n


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_each_checkpoint_adds_only_its_new_rows(tmp_path, storage):
    theta0, snaps = _snaps(6)
    st = TrajectoryStore(_specs(), 6, dtype="float32", storage=storage, directory=str(tmp_path / "run"))
    st.set_theta0(theta0)
    seen, added = set(), []
    for k, row in enumerate(snaps, 1):
        st.snapshot(k, row)
        if k % 2 == 0:
            d = tmp_path / f"checkpoint-{k}" / "relex_trajectory"
            st.save(str(d), live=row, step=k)
            added.append(_unique_bytes([d], seen))
    row_bytes, meta_max = st.D * 4, 16 << 10
    if storage == "host":  # theta_0 once, then 2 new rows per checkpoint
        assert added[0] <= st.theta0_bytes + 2 * row_bytes + meta_max, added
        assert all(2 * row_bytes <= a <= 2 * row_bytes + meta_max for a in added[1:]), added
    else:  # the mapped file (allocated once, all slots) is linked: later checkpoints add metadata only
        assert added[0] <= st.theta0_bytes + st.buffer_bytes + meta_max, added
        assert all(a <= meta_max for a in added[1:]), added
    # every checkpoint still reads back its own window, after the run directory is gone

    shutil.rmtree(tmp_path / "run")
    for k in (2, 4, 6):
        back = TrajectoryStore.open(str(tmp_path / f"checkpoint-{k}" / "relex_trajectory"))
        assert back.steps == list(range(1, k + 1))
        assert torch.equal(back.rows(), st.rows()[:k])
        assert torch.equal(back.theta0, st.theta0)


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_old_checkpoints_stay_valid_through_folds_and_resumes(tmp_path, storage):
    """Ring of 3 slots + 2 fold rows: checkpoints before and after folds keep the window they saved, bytes and all,
    while the live store folds (disk tier: into a fresh file, since a checkpoint links the mapped one) and a resumed
    store replays steps (writing new files, never into linked ones)."""
    theta0, snaps = _snaps(11)
    st = TrajectoryStore(_specs(), 3, dtype="float32", storage=storage, directory=str(tmp_path / "run"), fold_rank=2)
    st.set_theta0(theta0)
    expect = {}
    for k, row in enumerate(snaps, 1):
        st.snapshot(k, row)
        if k in (2, 4, 5, 8):
            d = tmp_path / f"checkpoint-{k}" / "relex_trajectory"
            st.save(str(d), live=row, step=k)
            expect[k] = {key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in st.solve_inputs().items()}
    assert st.folds >= 2
    # resume from checkpoint-5 into the same run directory, replay 6..11 with other weights
    specs = _specs()
    again = TrajectoryStore.load(str(tmp_path / "checkpoint-5" / "relex_trajectory"), specs, 3, dtype="float32",
                                 storage=storage, run_directory=str(tmp_path / "run"), fold_rank=2)
    assert again.verify_live(snaps[4], 5) == []
    assert again.verify_live(snaps[5], 5)  # the weights of another step are refused
    _, other = _snaps(11, seed=3)
    for k in range(6, 12):
        again.snapshot(k, other[k - 1])
    again.save(str(tmp_path / "checkpoint-11" / "relex_trajectory"), step=11)
    for k, want in expect.items():
        back = TrajectoryStore.open(str(tmp_path / f"checkpoint-{k}" / "relex_trajectory"))
        got = back.solve_inputs()
        assert got["steps"] == want["steps"]
        assert torch.equal(got["M"], want["M"]), k
        if "left" in want:
            assert torch.equal(got["left"], want["left"]) and got["folded_steps"] == want["folded_steps"]


def test_grpo_checkpoint_bytes(tmp_path):
    """A real GRPOTrainer saving every step inside the window: theta_0 is stored once for all checkpoints, and each
    checkpoint's relex_trajectory adds its one new row plus metadata."""
    cb = RelexCallback(tcut=6, horizons=[15], dtype="float32", storage="host")
    grpo_trainer(tmp_path, [cb], save_strategy="steps", save_steps=1).train()
    D = sum(
        s["local_numel"]
        for s in json.load(open(tmp_path / "checkpoint-1" / "relex_trajectory" / "trajectory.json"))["specs"]
    )
    seen, added = set(), []
    for k in range(1, 6):
        added.append(_unique_bytes([tmp_path / f"checkpoint-{k}" / "relex_trajectory"], seen))
    print("bytes added per checkpoint:", added, "row:", D * 4, "theta_0:", D * 4)
    assert added[0] <= 2 * D * 4 + (32 << 10)
    assert all(D * 4 <= a <= D * 4 + (32 << 10) for a in added[1:]), added


# ----------------------------------------------------------------------------------------- a small real disk
@pytest.fixture
def small_fs():
    """A tmpfs of a few MB mounted for the test (needs root; always unmounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def mount(size):
        d = tempfile.mkdtemp(prefix="relex-fs-")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True, text=True)
        if r.returncode:
            os.rmdir(d)
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(d)
        return d

    try:
        yield mount
    finally:
        for d in mounts:
            subprocess.run(["umount", d], check=False)
            os.rmdir(d)


def _fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_allocation_on_a_full_disk_is_an_error_not_a_sparse_file(small_fs):
    d = small_fs("4m")
    _fill(os.path.join(d, "filler"))
    with pytest.raises(RelexMemoryError, match="refused to allocate it"):
        allocate_file(os.path.join(d, "trajectory.bin"), 1 << 20)
    assert sorted(os.listdir(d)) == ["filler"]  # no sparse file, no temporary left


def test_outputs_that_do_not_fit_are_refused_before_step_1(small_fs):
    """Host tier on a 4 MB disk: theta_0, the linked rows, the state file and 20 horizon checkpoints of ~300 KB each
    do not fit: refused at on_train_begin, naming the items."""
    d = small_fs("4m")
    cb = RelexCallback(tcut=6, horizons=list(range(10, 30)), dtype="float32", storage="host")
    t = grpo_trainer(d, [cb], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexMemoryError, match=r"need .* \(.*20 horizon checkpoint\(s\).*free"):
        t.train()
    assert t.state.global_step == 0
    # the disk tier's buffer is allocated first: a window that does not fit is refused the same way
    cb = RelexCallback(tcut=16, horizons=[40], dtype="float32", storage="disk")
    t = grpo_trainer(d, [cb])
    with pytest.raises(RelexMemoryError):
        t.train()
    assert not os.path.exists(os.path.join(d, "relex", "trajectory", "trajectory.bin"))


CHILD = r'''
import os, sys
sys.path.insert(0, sys.argv[2])
from transformers import TrainerCallback
from fault_child import build_trainer
from relex_callback import RelexCallback

out = sys.argv[1]

class FillDisk(TrainerCallback):
    """At step 2 another writer fills the file system."""
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            with open(os.path.join(out, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16)); f.flush()
                except OSError:
                    pass

cb = RelexCallback(tcut=6, horizons=[20], storage="disk", dtype="float32")
trainer, _, _ = build_trainer(out, [cb, FillDisk()], max_steps=8)
try:
    trainer.train()
except Exception as e:
    print("RECORDED", cb.store.steps if cb.store is not None else None)
    print("ERROR", type(e).__name__, e)
    sys.exit(3)
print("DONE")
'''


def test_disk_filling_during_training_is_not_a_sigbus(small_fs, subprocess_env):
    """The disk tier's file is allocated at on_train_begin; when another writer fills the disk mid-window the
    snapshots still land in the allocated pages (a sparse file died here with SIGBUS, exit 135), and the end of the
    window reports the full disk as a write error."""
    d = small_fs("1m")
    r = subprocess.run([sys.executable, "-c", CHILD, d, HERE], capture_output=True, text=True, env=subprocess_env,
                       timeout=600)
    assert r.returncode != -signal.SIGBUS and r.returncode != 128 + signal.SIGBUS, r.stderr[-2000:]
    assert r.returncode == 3, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "RECORDED [1, 2, 3, 4, 5, 6]" in r.stdout, r.stdout
    assert "RelexWriteError" in r.stdout and "No space left" in r.stdout, r.stdout


def test_validation_checkpoints_link_theta0(tmp_path):
    """Validation mode saves theta_0 with every checkpoint after tcut: written once, hard-linked into each."""
    cb = RelexCallback(tcut=4, horizons=[7], dtype="float32", stop_training=False)
    grpo_trainer(tmp_path, [cb], save_strategy="steps", save_steps=1, max_steps=7).train()
    stats = [os.stat(tmp_path / f"checkpoint-{k}" / "relex_trajectory" / "theta0.safetensors") for k in (5, 6, 7)]
    assert len({(s.st_dev, s.st_ino) for s in stats}) == 1
    assert "7" in cb.report["validation"]
    assert not (tmp_path / "relex" / "trajectory").exists()  # the run directory's name is gone at the end
