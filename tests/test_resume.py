"""Resume inside the window, as a user meets it: a real TRL GRPOTrainer / transformers Trainer on the tiny local model,
interrupted at a checkpoint and resumed with ``trainer.train(resume_from_checkpoint=...)``.

The trajectory is found where the Trainer found the checkpoint (another output_dir, after save_total_limit deleted
older checkpoints, after the run directory was deleted) and is verified against the live weights before one more
step is recorded: a foreign trajectory, other settings, a foreign run id are refused before step 1.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import logging
import re

import pytest
import torch
from transformers import TrainerCallback

from relex_callback import RelexCallback, RelexInputError
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.offline.cli import main
from relex_callback.files.lock import LOCK_FILE
from grpo import grpo_trainer
from test_callback import Recorder, StopAt, read_weights
from fault_child import build_trainer

TCUT = 6
H = 15


def _cb(**kw):
    base = dict(tcut=TCUT, horizons=[H], dtype="float32")
    base.update(kw)
    return RelexCallback(**base)


def _assert_same_horizon(a, b):
    wa, wb = read_weights(a), read_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, float((wa[k] - wb[k]).abs().max()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: one run through the window, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("full")
    grpo_trainer(out, [_cb()], save_strategy="steps", save_steps=2).train()
    return out


def _interrupted(out, stop=5, **kw):
    """A run stopped after step ``stop`` (checkpoints every 2 steps)."""
    t = grpo_trainer(out, [_cb(), StopAt(stop)], save_strategy="steps", save_steps=2, **kw)
    t.train()
    assert t.state.global_step == stop and not (out / "relex" / f"step-{H}").exists()
    return t


def test_resume_into_another_output_dir_equals_uninterrupted(tmp_path, uninterrupted):
    """`train(resume_from_checkpoint="A/checkpoint-4")` with output_dir B: the path never reaches ``args``; the
    trajectory is found where the Trainer loaded the checkpoint, and the result is bitwise the uninterrupted one."""
    _interrupted(tmp_path / "A")
    rec = Recorder()
    cb = _cb()
    again = grpo_trainer(tmp_path / "B", [cb, rec], save_strategy="steps", save_steps=2)
    again.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-4"))
    assert sorted(rec.snaps) == [4, 5, 6]
    assert cb.report["steps"] == list(range(1, TCUT + 1))
    _assert_same_horizon(tmp_path / "B" / "relex" / f"step-{H}", uninterrupted / "relex" / f"step-{H}")
    # the run directory B/relex/trajectory (files linked from A/checkpoint-4) is removed once the window is written;
    # A's checkpoint keeps its trajectory
    assert not (tmp_path / "B" / "relex" / "trajectory").exists()
    meta = json.load(open(tmp_path / "A" / "checkpoint-4" / "relex_trajectory" / "trajectory.json"))
    assert meta["steps"] == [1, 2, 3, 4] and meta["saved_step"] == 4


def test_foreign_checkpoint_in_output_dir_is_refused_by_the_live_weights(tmp_path):
    """Training resumes from A/checkpoint-4 (saved without the callback); the new output_dir B holds checkpoint-4 of
    ANOTHER run (other seed) with a trajectory. It used to be loaded silently; the live-weights check refuses it."""
    plain = grpo_trainer(tmp_path / "A", [StopAt(4)], save_strategy="steps", save_steps=2)
    plain.train()
    _interrupted(tmp_path / "B", stop=4, seed=7)
    rec = Recorder()
    again = grpo_trainer(tmp_path / "B", [_cb(), rec], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexInputError, match="does not belong to the weights training resumed with") as e:
        again.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-4"))
    msg = str(e.value)
    assert "checkpoint-4" in msg and "model." in msg, msg  # names the checkpoint and a tensor
    assert "elements differ from theta_0 + the delta" in msg or "weights differ" in msg, msg
    assert 5 not in rec.snaps  # refused before one more step
    assert not (tmp_path / "B" / "relex" / "trajectory").exists()  # what the failed load linked is cleaned up


def test_foreign_run_id_is_refused(tmp_path):
    """The resumed checkpoint's trainer_state.json names the RELEX run that wrote it; a trajectory of another run at
    the guessed path is refused even before the weights are compared."""
    _interrupted(tmp_path / "A", stop=4)
    _interrupted(tmp_path / "B", stop=4, seed=7)
    shutil.rmtree(tmp_path / "A" / "checkpoint-4" / "relex_trajectory")
    again = grpo_trainer(tmp_path / "B", [_cb()], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexInputError, match="saved by RELEX run .* while the checkpoint training resumed from was"):
        again.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-4"))


def test_save_total_limit_and_deleted_run_dir(tmp_path, uninterrupted):
    """save_total_limit=1 deletes older checkpoints (each linked the rows the others share) and the run directory is
    deleted too: the remaining checkpoint still resumes, bitwise equal to the uninterrupted run."""
    _interrupted(tmp_path / "run", save_total_limit=1)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4"]
    shutil.rmtree(tmp_path / "run" / "relex" / "trajectory")
    again = grpo_trainer(tmp_path / "run", [_cb()], save_strategy="steps", save_steps=2, save_total_limit=1)
    again.train(resume_from_checkpoint=True)
    _assert_same_horizon(tmp_path / "run" / "relex" / f"step-{H}", uninterrupted / "relex" / f"step-{H}")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-6"]


@pytest.mark.parametrize("change, message", [
    (dict(stride=2), "stride=1 saved vs stride=2 now"),
    (dict(tcut=8), "tcut=6 saved vs tcut=8 now"),
    (dict(dtype="bfloat16"), "is float32, this run asks for bfloat16"),
    (dict(exclude=["embed"]), "tracks other tensors than this run"),
])
def test_other_settings_are_refused_at_resume(tmp_path, change, message):
    _interrupted(tmp_path / "run", stop=4)
    rec = Recorder()
    again = grpo_trainer(tmp_path / "run", [_cb(**change), rec], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexInputError, match=message):
        again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert 5 not in rec.snaps


def test_restored_callback_state_keeps_the_users_instance(tmp_path, uninterrupted):
    """With restore_callback_states_from_checkpoint=True the Trainer rebuilds the callback from trainer_state.json;
    the instance the user passed is put back, so its ``report`` is filled."""
    _interrupted(tmp_path / "run", restore_callback_states_from_checkpoint=True)
    state = json.load(open(tmp_path / "run" / "checkpoint-4" / "trainer_state.json"))
    rec = state["stateful_callbacks"]["RelexCallback"]["attributes"]["relex_checkpoint"]
    assert rec["step"] == 4 and rec["checkpoint"] == str(tmp_path / "run" / "checkpoint-4")
    cb = _cb()
    again = grpo_trainer(tmp_path / "run", [cb], save_strategy="steps", save_steps=2,
                         restore_callback_states_from_checkpoint=True)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert cb in again.callback_handler.callbacks
    assert cb.report is not None and cb.report["steps"] == list(range(1, TCUT + 1))
    _assert_same_horizon(tmp_path / "run" / "relex" / f"step-{H}", uninterrupted / "relex" / f"step-{H}")


def test_resume_after_tcut_from_a_checkpoint_saved_without_the_callback(tmp_path):
    """The Trainer indexes ``stateful_callbacks[name]`` at its next save: a checkpoint saved without the callback
    lacks the key, which would be a KeyError at the first save after the resume."""
    sys.path.insert(0, os.path.dirname(__file__))

    t, _, _ = build_trainer(str(tmp_path), [StopAt(3)], max_steps=6, save_steps=3)
    t.train()
    cb = RelexCallback(tcut=2, horizons=[10], dtype="float32")
    t2, _, _ = build_trainer(str(tmp_path), [cb], max_steps=6, save_steps=3)
    t2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert t2.state.global_step == 6 and (tmp_path / "checkpoint-6").is_dir()


# ------------------------------------------------------------------------------------------- unchanged steps
class FreezeStep(TrainerCallback):
    """Undo the optimizer update of the given steps, as AMP's loss scaler does when it skips a step (global_step
    still advances)."""

    def __init__(self, steps):
        self.steps, self.saved = set(steps), None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 in self.steps:
            self.saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        if self.saved is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(self.saved[n])
            self.saved = None


def test_unchanged_steps_are_skipped_and_counted(tmp_path, caplog):
    cb = _cb(tcut=8)
    t = grpo_trainer(tmp_path, [cb, FreezeStep([1, 5])])
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        t.train()
    rep = json.load(open(tmp_path / "relex" / "report.json"))
    assert rep["steps"] == [2, 3, 4, 6, 7, 8]
    assert rep["skipped_unchanged_steps"] == [1, 5]
    assert any("did not change at step 5" in r.getMessage() for r in caplog.records)


def test_a_window_that_never_moved_says_why_instead_of_blaming_divergence(tmp_path):
    """GRPO batches whose groups all have one reward give a zero gradient: a window of only such steps has nothing
    to fit; the error names the unchanged steps and what to change (it used to say the run diverged)."""
    cb = _cb(tcut=2)
    t = grpo_trainer(tmp_path, [cb, FreezeStep([1, 2])])
    with pytest.raises(RelexInputError) as e:
        t.train()
    msg = str(e.value)
    assert "only 0 step(s) of the window were recorded" in msg
    assert "did not move at step(s) [1, 2]" in msg and "reward variance" in msg
    assert "diverged" not in msg
    assert not any(p.name.startswith("step-") for p in (tmp_path / "relex").glob("*"))


@pytest.mark.parametrize("fit,kw", [("power", {}), ("polynomial", {"degree": 2}), ("linear", {"fit_window": 3}),
                                    ("linear", {})])
def test_a_window_too_short_for_its_fit_at_tcut_is_kept_with_a_command_that_works(tmp_path, fit, kw):
    """Accepted at step 0 (tcut=3 gives 3 steps), but step 1 did not move (a GRPO batch without reward variance), so
    at tcut only 2 steps can be fitted: too few for power (3 parameters) or a quadratic. The error says so and why,
    nothing is extrapolated, and the recorded window is kept: the printed `relex extrapolate --trajectory` command,
    run with a 2-step fit, writes the horizon."""
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    one_left = fit == "linear" and not kw  # the plain line: two steps that did not move leave one
    freeze = [1, 2] if one_left else [1]
    cb = RelexCallback(tcut=3, horizons=[12], fit=fit, dtype="float32", **kw)
    t = grpo_trainer(tmp_path, [cb, FreezeStep(freeze)], model=model, tok=tok)
    with pytest.raises(RelexInputError) as e:
        t.train()
    msg = str(e.value)
    assert f"did not move at step(s) {freeze}" in msg
    if one_left:
        assert "only 1 step(s) of the window were recorded" in msg
    else:
        window = f" with fit_window={kw['fit_window']}" if "fit_window" in kw else ""
        assert f"fit={fit!r}{window} needs at least 3 fitted steps" in msg and "of which 2 can be fitted" in msg
    assert not (tmp_path / "relex" / "step-12").exists() and not (tmp_path / "relex" / "report.json").exists()
    cmd = re.search(r"`relex extrapolate (--trajectory .*?)`", msg).group(1)
    keep = re.search(r"--trajectory (\S+)", cmd).group(1)
    assert os.path.isfile(os.path.join(keep, "trajectory.json"))
    if one_left:
        return  # one recorded step: nothing can be fitted from it, but it was not thrown away
    args = cmd.replace("<the checkpoint training started from>", str(tmp_path / "base")).replace(
        "DIR", str(tmp_path / "out")
    )
    assert main(["extrapolate", *args.split(), "--no-progress"]) == 0
    assert (tmp_path / "out" / "step-12" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------- output dir owner
def test_two_callbacks_on_one_output_dir_are_refused_before_step_1(tmp_path):
    rec = Recorder()
    t = grpo_trainer(tmp_path, [_cb(), _cb(horizons=[20]), rec])
    with pytest.raises(RelexInputError, match="in use by another RelexCallback of this trainer"):
        t.train()
    assert sorted(rec.snaps) == []  # refused in on_train_begin, before the Recorder (after them) saw step 0


def test_output_dir_held_by_a_live_process_is_refused_and_a_dead_one_taken_over(tmp_path):
    relex = tmp_path / "relex"
    relex.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (relex / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "token": "x"}))
        t = grpo_trainer(tmp_path, [_cb()], max_steps=2)
        with pytest.raises(RelexInputError, match=f"process {other.pid} on"):
            t.train()
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its lock is stale and taken over; released when the window ends
    cb = _cb()
    grpo_trainer(tmp_path, [cb]).train()
    assert cb.report is not None and not (relex / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_dir_that_is_a_file_is_refused_at_train(tmp_path, where):
    f = tmp_path / "taken"
    f.write_text("x")
    out = f if where == "file" else f / "relex"
    rec = Recorder()
    t = grpo_trainer(tmp_path / "run", [_cb(output_dir=str(out)), rec])
    with pytest.raises(RelexInputError, match="output_dir .* (exists and is not a directory|is a file)"):
        t.train()
    assert 1 not in rec.snaps
