"""Faults: NaN in the weights, SIGKILL during a checkpoint write, disk full, a job killed inside the window and
resumed, a trainer that ends before tcut. Real Trainer runs on a tiny local model; child processes for the kills."""

import errno
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from relex_callback.config import RelexSettings
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from relex_callback import RelexCallback, RelexNonFiniteError
from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.offline.api import extrapolate_trajectory, materialize
from relex_callback.errors import RelexInputError, RelexWriteError
from relex_callback.core.solver import solve
from relex_callback.examples.toy import build_model
from relex_callback.files import checkpoints as writer
from relex_callback.files.checkpoints import ModelSource
from relex_callback.files.writers import FullModelWriter, write_full_checkpoint as write_horizon
from relex_callback.params import plain_tracked, trainable_named_parameters
from relex_callback.pipeline.finalize import finalize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fault_child import build_trainer  # noqa: E402
from helpers import load_recorded  # noqa: E402

CHILD = os.path.join(HERE, "fault_child.py")


class InjectNaN(TrainerCallback):
    """After the optimizer step of step ``k``, put a NaN into one weight; restore it before the next step."""

    def __init__(self, k, name="model.layers.0.mlp.up_proj.weight"):
        self.k, self.name, self.saved = k, name, None

    def _param(self, model):
        return dict(model.named_parameters())[self.name]

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.k:
            p = self._param(model)
            self.saved = p.detach().clone()
            with torch.no_grad():
                p.view(-1)[7] = float("nan")

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self.saved is not None:
            with torch.no_grad():
                self._param(model).copy_(self.saved)
            self.saved = None


def _assert_finite_checkpoint(d):
    sd = load_file(os.path.join(d, "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in sd.values())


def test_nan_at_step_k_stops_training_with_named_error(tmp_path):
    cb = RelexCallback(tcut=6, horizons=[30], dtype="float32")
    trainer, _, _ = build_trainer(str(tmp_path), [cb, InjectNaN(3)], max_steps=12, save_steps=3)
    with pytest.raises(RelexNonFiniteError) as e:
        trainer.train()
    msg = str(e.value)
    assert "step 3" in msg and "model.layers.0.mlp.up_proj.weight" in msg and "on_nonfinite='skip'" in msg
    relex = tmp_path / "relex"
    assert not (relex / "step-30").exists() and not (relex / "relex_state.safetensors").exists()
    assert not (tmp_path / "checkpoint-3").exists()  # the trainer did not get to save the poisoned step either


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_a_nan_in_the_base_is_named_as_the_bases_before_step_1(tmp_path, storage):
    """A NaN already in the weights training starts from (theta_0) is the base's fault, said at on_train_begin:
    no training step is spent, nothing is written (the disk tier allocates nothing), and the
    message names the tensor, not a diverged step. A NaN appearing at step 3 is still a divergence at step 3 (the
    test above)."""
    name = "model.layers.0.mlp.up_proj.weight"
    cb = RelexCallback(tcut=6, horizons=[30], dtype="float32", storage=storage)
    trainer, model, _ = build_trainer(str(tmp_path), [cb], max_steps=12)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[5] = float("inf")
    with pytest.raises(RelexNonFiniteError) as e:
        trainer.train()
    msg = str(e.value)
    assert name in msg and "base model" in msg and "before step 1" in msg and "1 tensor(s)" in msg, msg
    assert "diverged" not in msg and "process" not in msg, msg  # one process: no process named
    assert trainer.state.global_step == 0
    relex = tmp_path / "relex"
    assert not relex.exists() or os.listdir(relex) == [], os.listdir(relex)


def test_nan_at_step_k_is_skipped_and_counted(tmp_path, caplog):
    cb = RelexCallback(tcut=6, horizons=[30], dtype="float32", on_nonfinite="skip")
    trainer, _, _ = build_trainer(str(tmp_path), [cb, InjectNaN(3)], max_steps=12)
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert any("step 3" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    rep = json.load(open(tmp_path / "relex" / "report.json"))
    assert rep["skipped_nonfinite_steps"] == [3] and rep["steps"] == [1, 2, 4, 5, 6]
    _assert_finite_checkpoint(tmp_path / "relex" / "step-30")


def _run_child(out, *extra, env, check=True):
    return subprocess.run([sys.executable, CHILD, str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_materialize_finishes(tmp_path, subprocess_env):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, CHILD, str(out), "--tcut", "6", "--horizons", "20,40",
                             "--stall-write-horizon", "40", "--max-shard-size", "20KB"],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "WRITING").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    relex = out / "relex"
    assert not (relex / "step-40").exists()  # nothing under the final name
    stale = glob.glob(str(relex / ".step-40.tmp-*"))
    assert stale and os.listdir(stale[0])  # the half-written temporary is there ...
    assert (relex / "step-20" / "model.safetensors.index.json").exists()  # ... the horizon before it is whole
    assert (relex / "relex_state.safetensors").exists()
    # rerun: relex materialize from the state and the base
    written = materialize(str(relex / "relex_state.safetensors"), str(out / "base"), [40], max_shard_size="20KB")
    assert written == [os.path.abspath(relex / "step-40")] or written == [str(relex / "step-40")]
    assert not glob.glob(str(relex / ".step-40.*"))  # stale temporaries cleaned

    m = AutoModelForCausalLM.from_pretrained(str(relex / "step-40"))
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    # materialize reproduces exactly what the callback wrote (checked on the horizon it finished)
    again = materialize(str(relex / "relex_state.safetensors"), str(out / "base"), [20], out_dir=str(tmp_path / "m"),
                        max_shard_size="20KB")[0]
    a, b = _all_tensors(relex / "step-20"), _all_tensors(again)  # shard boundaries follow each source's key order
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_tensors(d):
    out = {}
    for f in glob.glob(os.path.join(str(d), "*.safetensors")):
        out.update(load_file(f))
    return out


def test_disk_full_during_write_is_clear_and_recoverable(tmp_path, monkeypatch):
    """Fault injection: the horizon's second shard file raises ENOSPC after its first tensor
    (``checkpoints._write_tensor``, the lowest-level write, which the state file also goes through: it is written
    whole first), as a disk filling mid-file would; everything above it is real."""
    real = writer._write_tensor
    files = []

    def full_disk(f, t):
        if os.path.basename(f.name).startswith("model"):  # the horizon's shards
            if f.name not in files:
                files.append(f.name)
            elif len(files) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        return real(f, t)

    monkeypatch.setattr(writer, "_write_tensor", full_disk)
    cb = RelexCallback(tcut=5, horizons=[25], dtype="float32", storage="disk", max_shard_size="20KB")
    trainer, model, tok = build_trainer(str(tmp_path), [cb], max_steps=10)
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    with pytest.raises(RelexWriteError) as e:
        trainer.train()
    msg = str(e.value)
    assert "No space left on device" in msg and "relex materialize" in msg and "step-25" in msg
    relex = tmp_path / "relex"
    assert not (relex / "step-25").exists() and not glob.glob(str(relex / ".step-25.*"))
    assert (relex / "relex_state.safetensors").exists()
    traj = TrajectoryStore.open(str(relex / "trajectory"))  # the disk-tier buffer is intact
    assert traj.steps == [1, 2, 3, 4, 5]
    assert len(files) == 2  # the fault struck the second shard
    monkeypatch.setattr(writer, "_write_tensor", real)  # space freed
    materialize(str(relex / "relex_state.safetensors"), str(base), [25], max_shard_size="20KB")
    _assert_finite_checkpoint_sharded(relex / "step-25")


def _assert_finite_checkpoint_sharded(d):
    files = glob.glob(os.path.join(d, "*.safetensors"))
    assert len(files) > 1
    for f in files:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(f).values())


@pytest.mark.slow
def test_killed_inside_window_and_resumed_gives_same_checkpoints(tmp_path, subprocess_env):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["--tcut", "8", "--horizons", "40", "--storage", "disk", "--save-steps", "3"]
    r = _run_child(ref, *common, "--record", str(ref / "record"), env=subprocess_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run_child(run, *common, "--record", str(run / "record"), "--kill-at-step", "5", env=subprocess_env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run / "checkpoint-3" / "relex_trajectory" / "trajectory.json").exists()
    assert not (run / "relex" / "step-40").exists()
    r = _run_child(run, *common, "--record", str(run / "record"), "--resume", str(run / "checkpoint-3"),
                   env=subprocess_env)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(ref / "relex" / "step-40" / "model.safetensors"))
    b = load_file(str(run / "relex" / "step-40" / "model.safetensors"))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"kill+resume vs uninterrupted: max abs difference {worst:.3e}")
    # bitwise by construction (was rtol 1e-5): the resumed training replays the uninterrupted one bit for bit (the
    # trainer restores model, optimizer and RNG states; single-threaded CPU float32), asserted on the trajectories
    # both children recorded; the resumed buffer holds the same float32 rows (steps 1-3 from checkpoint-3's files,
    # 4-8 recorded again) and the solve runs the same code on them (every float32 pass copies each chunk into a
    # fixed-width scratch, so the buffer's place in memory does not change a bit): the same checkpoint
    ta, tb = load_recorded(str(ref / "record")), load_recorded(str(run / "record"))
    assert sorted(ta) == sorted(tb) == list(range(9))
    assert all(torch.equal(ta[t][k], tb[t][k]) for t in ta for k in ta[t])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), worst
    ra = json.load(open(ref / "relex" / "report.json"))
    rb = json.load(open(run / "relex" / "report.json"))
    assert ra["steps"] == rb["steps"] == list(range(1, 9))


@pytest.mark.parametrize("how", ["max_steps", "dataset_exhausted"])
def test_trainer_ending_before_tcut_keeps_the_trajectory(tmp_path, caplog, how):
    cb = RelexCallback(tcut=12, horizons=[60], dtype="float32")
    trainer, model, tok = build_trainer(str(tmp_path), [cb], max_steps=5 if how == "max_steps" else -1)
    if how == "dataset_exhausted":
        trainer.args.num_train_epochs = 1  # 64 rows / batch 8 = 8 steps < tcut
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    n = trainer.state.global_step
    assert n < 12
    msgs = [r.getMessage() for r in caplog.records]
    assert any("before tcut=12" in m and "will stop" in m for m in msgs), msgs  # said at on_train_begin
    assert any("ended at step" in m and "partial_trajectory" in m for m in msgs), msgs  # and at on_train_end
    relex = tmp_path / "relex"
    assert not (relex / "step-60").exists() and not (relex / "relex_state.safetensors").exists()
    part = relex / "partial_trajectory"
    assert TrajectoryStore.open(str(part)).steps == list(range(1, n + 1))
    with pytest.raises(RelexInputError, match="not beyond tcut"):
        extrapolate_trajectory(str(part), str(base), [n], str(tmp_path / "x"))
    sol, rep = extrapolate_trajectory(str(part), str(base), [60], str(tmp_path / "late"))
    assert rep["tcut"] == n and rep["partial"] is True
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "late" / "step-60"))
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    # a different base is refused
    other = tmp_path / "other"

    build_model(tok, hidden_size=32, layers=1, seed=5).save_pretrained(str(other))
    with pytest.raises(RelexInputError, match="does not match the trajectory's theta_0"):
        extrapolate_trajectory(str(part), str(other), [60], str(tmp_path / "y"))
    if how == "max_steps":
        # the command the warning names: same result as the Python call
        from relex_callback.offline.cli import main

        assert main(["extrapolate", "--trajectory", str(part), "--base", str(base), "--horizons", "60",
                     "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
        a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli" / "step-60")).state_dict()
        b = m.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert main(["extrapolate", "--trajectory", str(part), "--base", str(other), "--horizons", "60",
                     "--out", str(tmp_path / "cli2"), "--no-progress"]) == 2
        assert not (tmp_path / "cli2" / "step-60").exists()


def _small_store(tmp_path, model):
    tracked = plain_tracked(trainable_named_parameters(model))
    store = TrajectoryStore([t.spec for t in tracked], 3, dtype="float32", storage="host")
    store.set_theta0([t.read() for t in tracked])
    for step in (1, 2, 3):
        with torch.no_grad():
            for t in tracked:
                t.param.add_(1e-3 * step)
        store.snapshot(step, [t.read() for t in tracked])
    return store


def test_damaged_saved_trajectory_is_an_input_error_from_python(tmp_path, tiny_model):
    store = _small_store(tmp_path, tiny_model)
    saved = tmp_path / "traj"
    store.save(str(saved))
    assert TrajectoryStore.open(str(saved)).steps == [1, 2, 3]
    theta0 = saved / "theta0.safetensors"
    theta0.write_bytes(theta0.read_bytes()[:100])  # truncated
    with pytest.raises(RelexInputError, match="trajectory is damaged"):
        TrajectoryStore.open(str(saved))


def test_bad_shard_size_fails_before_the_state_file(tmp_path, tiny_model, tokenizer):
    store = _small_store(tmp_path, tiny_model)
    out = tmp_path / "out"
    with pytest.raises(RelexInputError, match="max_shard_size"):
        finalize(
            store,
            FullModelWriter(ModelSource(tiny_model, tokenizer), max_shard_size="lots"),
            RelexSettings(tcut=3, horizons=(9,)),
            out_dir=str(out),
        )
    assert not out.exists() or not any(out.iterdir())


def test_window_with_fewer_than_two_recorded_steps_is_a_clear_error(tmp_path, tiny_model, tokenizer):
    tracked = plain_tracked(trainable_named_parameters(tiny_model))
    store = TrajectoryStore([t.spec for t in tracked], 4, dtype="float32", storage="host")
    store.set_theta0([t.read() for t in tracked])
    store.snapshot(4, [t.read() + 1e-3 for t in tracked])  # steps 1-3 were skipped as non-finite
    with pytest.raises(RelexInputError, match="only 1 step"):
        finalize(
            store,
            FullModelWriter(ModelSource(tiny_model, tokenizer)),
            RelexSettings(tcut=4, horizons=(8,)),
            out_dir=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()


def test_no_checkpoint_is_written_with_nan(tmp_path, tiny_model, tokenizer):
    # the check sits in writer.write_shard, which the single-process and the distributed writers both use

    store = _small_store(tmp_path, tiny_model)
    sol = solve(store.rows(), store.steps, store.specs)
    store.theta0[0] = float("nan")  # one extrapolated tensor inherits it
    with pytest.raises(RelexNonFiniteError, match="NaN/Inf"):
        write_horizon(str(tmp_path / "out"), 9, 3, sol, lambda i: store.theta0_of(store.specs[i]),
                      ModelSource(tiny_model, tokenizer))
    assert not (tmp_path / "out" / "step-9").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".step-9")]


def test_materialize_checks_every_output_before_writing_one(tmp_path, tiny_model, tokenizer):
    base = tmp_path / "base"
    tiny_model.save_pretrained(str(base))  # theta_0, before _small_store moves the weights
    tokenizer.save_pretrained(str(base))
    store = _small_store(tmp_path, tiny_model)
    out = tmp_path / "out"
    finalize(
        store,
        FullModelWriter(ModelSource(tiny_model, tokenizer)),
        RelexSettings(tcut=3, horizons=(9,)),
        out_dir=str(out),
    )
    # step-9 exists: asking for 6 and 9 must fail before step-6 is written
    with pytest.raises(RelexInputError, match="step-9"):
        materialize(str(out / "relex_state.safetensors"), str(base), [6, 9], str(out))
    assert not (out / "step-6").exists()
    assert materialize(str(out / "relex_state.safetensors"), str(base), [6], str(out)) == [str(out / "step-6")]
