"""The callback's life cycle as users meet it, with a real TRL GRPOTrainer on the tiny local model.

One ``RelexCallback`` instance used for a second ``trainer.train()`` or a second trainer (a sweep loop, a notebook cell
run again, a run interrupted and started again) either records a new window, bitwise what a new instance records,
or is refused at step 0 saying what to do; it never trains on past ``tcut`` writing nothing. A resume finds the window
in the checkpoint given to ``trainer.train(resume_from_checkpoint=PATH)``, wherever PATH is: a ``cp -r`` copy whose
run directory is gone, with the same or another ``output_dir``.
"""

import os
import shutil

import pytest
import torch

from relex_callback import RelexCallback, RelexInputError
from grpo import grpo_trainer
from test_callback import Recorder, StopAt, read_weights

TCUT = 4
H = 9


def _cb(**kw):
    return RelexCallback(**{"tcut": TCUT, "horizons": [H], "dtype": "float32", **kw})


def _same(a, b):
    wa, wb = read_weights(a), read_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, float((wa[k] - wb[k]).abs().max()))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The reference: a new instance, one run, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("fresh")
    t = grpo_trainer(out, [_cb()], save_strategy="steps", save_steps=2)
    t.train()
    assert t.state.global_step == TCUT
    return out


@pytest.mark.parametrize("first_stops_at", [TCUT, 2], ids=["after-a-window", "interrupted-inside-the-window"])
def test_one_instance_in_a_sweep_loop_records_each_window(tmp_path, fresh, first_stops_at):
    """The sweep loop: the same instance on a second trainer (another output_dir). It used to do nothing at all on the
    second trainer (the first window had set it done) and let it train to max_steps; now each trainer stops at tcut
    with its own window, bitwise what a new instance writes."""
    cb = _cb()
    first = grpo_trainer(tmp_path / "a", [cb, StopAt(first_stops_at)], save_strategy="steps", save_steps=2)
    first.train()
    assert first.state.global_step == first_stops_at
    rec = Recorder()
    second = grpo_trainer(tmp_path / "b", [cb, rec], save_strategy="steps", save_steps=2)
    second.train()
    assert second.state.global_step == TCUT, "trained past tcut without recording a window"
    assert cb.report is not None and cb.report["steps"] == list(range(1, TCUT + 1))
    _same(tmp_path / "b" / "relex" / f"step-{H}", fresh / "relex" / f"step-{H}")
    if first_stops_at == TCUT:
        _same(tmp_path / "a" / "relex" / f"step-{H}", fresh / "relex" / f"step-{H}")


def test_notebook_cell_run_again_is_refused_at_step_0_or_overwrites(tmp_path):
    """``trainer.train()`` run again on the same trainer and callback: the outputs of the first window are there, so
    the second is refused before one step, saying what to do; with overwrite=True it records a new window from the
    weights the trainer now has (theta_0 = the first window's tcut weights)."""
    cb = _cb()
    t = grpo_trainer(tmp_path / "nb", [cb], save_strategy="no")
    t.train()
    first = read_weights(tmp_path / "nb" / "relex" / f"step-{H}")
    rec = Recorder()
    t.add_callback(rec)
    with pytest.raises(RelexInputError, match="already exist.*(another output directory|overwrite)"):
        t.train()
    assert [s for s in rec.snaps if s > 0] == [], "a step was trained before the refusal"
    assert read_weights(tmp_path / "nb" / "relex" / f"step-{H}").keys() == first.keys()

    cb2 = _cb(overwrite=True)
    t2 = grpo_trainer(tmp_path / "nb2", [cb2], save_strategy="no")
    t2.train()
    t2.train()  # the same cell again, overwrite=True
    assert t2.state.global_step == TCUT and cb2.report["steps"] == list(range(1, TCUT + 1))
    assert cb2.report["tensors"], "no window recorded by the second train()"


@pytest.mark.parametrize("output_dir", ["same", "other"])
def test_resume_from_a_copied_checkpoint_whose_run_is_gone(tmp_path, fresh, output_dir):
    """``cp -r run/checkpoint-2 elsewhere/`` then ``rm -r run``: ``train(resume_from_checkpoint="elsewhere/...")``
    finds the window in the copy (it used to look only where the checkpoint was first written, and refused the resume
    as a checkpoint saved without the callback). The result is bitwise the uninterrupted run's."""
    run = tmp_path / "run"
    t = grpo_trainer(run, [_cb(), StopAt(3)], save_strategy="steps", save_steps=2)
    t.train()
    copy = tmp_path / "kept" / "ckpt"
    shutil.copytree(run / "checkpoint-2", copy)  # cp -r: the hard links become plain copies
    shutil.rmtree(run)
    out = run if output_dir == "same" else tmp_path / "other"
    rec = Recorder()
    again = grpo_trainer(out, [_cb(), rec], save_strategy="steps", save_steps=2)
    again.train(resume_from_checkpoint=str(copy))
    assert sorted(rec.snaps) == [2, 3, 4] and again.state.global_step == TCUT  # resumed at 2, trained 3 and 4
    _same(out / "relex" / f"step-{H}", fresh / "relex" / f"step-{H}")
    assert os.path.isdir(copy / "relex_trajectory"), "the user's copy was modified"


def test_a_copy_of_another_runs_checkpoint_is_still_refused(tmp_path):
    """The path the user gives is checked like any other: a copy of a checkpoint from a run with other settings is
    refused at resume with what differs, not loaded."""
    run = tmp_path / "run"
    grpo_trainer(run, [_cb(), StopAt(2)], save_strategy="steps", save_steps=2).train()
    copy = tmp_path / "kept"
    shutil.copytree(run / "checkpoint-2", copy)
    shutil.rmtree(run)
    again = grpo_trainer(tmp_path / "b", [RelexCallback(tcut=TCUT + 2, horizons=[H], dtype="float32")],
                         save_strategy="no")
    with pytest.raises(RelexInputError, match="tcut"):
        again.train(resume_from_checkpoint=str(copy))


# ------------------------------------------------------------------ a resume from before tcut, after tcut was passed
def _run_id(d):
    from relex_callback.files.fs import output_run_id

    return output_run_id(str(d))


def _stopped_after_tcut(tmp_path):
    """A run that passed tcut (its outputs written, checkpoints 2 and 4 saved), as if the machine then died: the
    newest checkpoint a user may still have is one from inside the window."""
    out = tmp_path / "run"
    first = grpo_trainer(out, [_cb()], save_strategy="steps", save_steps=2)
    first.train()
    assert first.state.global_step == TCUT and (out / "relex" / f"step-{H}").is_dir()
    return out, _run_id(out / "relex" / f"step-{H}")


def test_resume_before_tcut_replaces_its_own_outputs(tmp_path, fresh):
    """Resumed from checkpoint-2 after the same run had written its outputs at tcut: it used to be refused at step 0
    (its own step-H/, state and report 'already exist'); every output there carries this run's id, so the resumed
    window records steps 3..4 again and replaces them at tcut, with the same run id."""
    out, rid = _stopped_after_tcut(tmp_path)
    assert rid and _run_id(out / "relex" / "relex_state.safetensors") == rid
    before = os.stat(out / "relex" / f"step-{H}").st_ino
    rec = Recorder()
    again = grpo_trainer(out, [_cb(), rec], save_strategy="steps", save_steps=2)
    again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert again.state.global_step == TCUT and sorted(rec.snaps) == [2, 3, 4]  # theta at the resume, then 3..4
    assert os.stat(out / "relex" / f"step-{H}").st_ino != before, "the outputs were not written again"
    assert _run_id(out / "relex" / f"step-{H}") == rid == _run_id(out / "relex" / "relex_state.safetensors")
    # a resumed run against an uninterrupted one: bitwise (was relative 1e-5). The resumed trainer replays the same
    # float32 training (model, optimizer and RNG states restored), the window's rows 1..2 come back from checkpoint-2
    # as they were recorded and 3..4 are recorded again, and the solve runs the same code on the same bits (every
    # float32 pass copies each chunk into a fixed-width scratch: the buffer's place in memory changes nothing)
    _same(out / "relex" / f"step-{H}", fresh / "relex" / f"step-{H}")


@pytest.mark.parametrize("intruder", ["a-user-directory", "another-runs-output"])
def test_resume_before_tcut_still_refuses_what_is_not_its_own(tmp_path, fresh, intruder):
    """The same resume, but one output name is held by something this run did not write (a user's directory, another
    RELEX run's step-H/): refused at step 0, before any step is trained again, and nothing there is touched."""
    out, rid = _stopped_after_tcut(tmp_path)
    target = out / "relex" / f"step-{H}"
    shutil.rmtree(target)
    if intruder == "a-user-directory":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        shutil.copytree(fresh / "relex" / f"step-{H}", target)
        assert _run_id(target) not in (None, rid)
    listing = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")
                     if "checkpoint-" not in str(p))
    rec = Recorder()
    again = grpo_trainer(out, [_cb(), rec], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexInputError, match=f"step-{H}.*already exist.*window being resumed is RELEX run {rid}"):
        again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert rec.snaps == {}
    assert listing == sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")
                             if "checkpoint-" not in str(p))


@pytest.mark.parametrize("intruder", ["a-user-directory", "another-runs-output"])
def test_resume_before_tcut_refuses_at_tcut_what_appeared_since(tmp_path, intruder):
    """The resumed window's own outputs were checked at step 0; something put under one of their names while the
    window runs (a user's directory, another RELEX run's output) is not replaced at tcut either: refused there, its
    bytes left. (Another run's output is relex's, so `overwrite` alone would have replaced it.)"""
    import json

    from transformers import TrainerCallback

    from relex_callback.files.fs import RELEX_MARKER

    out, rid = _stopped_after_tcut(tmp_path)
    target = out / "relex" / f"step-{H}"

    class Intrude(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step != 3:
                return
            if intruder == "a-user-directory":
                shutil.rmtree(target)
                target.mkdir()
                (target / "notes.txt").write_text("mine")
            else:
                m = json.loads((target / RELEX_MARKER).read_text())
                (target / RELEX_MARKER).write_text(json.dumps({**m, "run_id": "another-run"}))

    again = grpo_trainer(out, [_cb(), Intrude()], save_strategy="steps", save_steps=2)
    with pytest.raises(RelexInputError, match=f"step-{H}.*not all of these are its own"):
        again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    if intruder == "a-user-directory":
        assert (target / "notes.txt").read_text() == "mine" and os.listdir(target) == ["notes.txt"]
    else:
        assert _run_id(target) == "another-run", "another run's output was replaced"
