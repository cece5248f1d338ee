"""A real full disk at the end of the window: a tmpfs of a few hundred KiB mounted by the test (root only; skipped
otherwise) holds the relex output directory. safetensors reports ENOSPC as its own SafetensorError, not OSError:
the test would not pass if only OSError were turned into RelexWriteError."""

import glob
import json
import os
import subprocess

from typing import Optional

import pytest

from relex_callback.config import RelexSettings
import torch
from transformers import TrainerCallback

from relex_callback import RelexCallback
from relex_callback.errors import RelexInputError, RelexWriteError
from relex_callback.offline.api import materialize
from relex_callback.files.checkpoints import ModelSource
from relex_callback.files.writers import FullModelWriter
from relex_callback.offline.cli import main
from relex_callback.params import plain_tracked
from relex_callback.pipeline.finalize import finalize
from relex_callback.trajectory.store import TrajectoryStore

from fault_child import build_trainer  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def _mount(path, kib: int):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _size(path) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    """Bytes of the state file and of one horizon of this run, measured on an ordinary directory."""
    d = tmp_path_factory.mktemp("sizes")
    cb = RelexCallback(tcut=4, horizons=[20], dtype="float32", output_dir=str(d / "relex"))
    trainer, _, _ = build_trainer(str(d / "run"), [cb], max_steps=8)
    trainer.train()
    return {"state": _size(d / "relex" / "relex_state.safetensors"), "horizon": _size(d / "relex" / "step-20")}


class FillDisk(TrainerCallback):
    """Another writer fills the disk during the window (after RELEX's own check at step 0 passed): at step 1 it
    writes a file that leaves ``leave`` bytes free."""

    def __init__(self, path, leave: int):
        self.path, self.leave = path, leave

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            st = os.statvfs(self.path)
            free = st.f_bavail * st.f_frsize
            with open(os.path.join(self.path, "filler"), "wb") as f:
                f.write(b"\0" * max(0, free - self.leave))


def _run(tmp_path, relex_dir, fill: Optional[int] = None, **kw):
    cb = RelexCallback(tcut=4, horizons=[20, 30], dtype="float32", output_dir=str(relex_dir), **kw)
    extra = [FillDisk(str(relex_dir), fill)] if fill is not None else []
    trainer, model, tok = build_trainer(str(tmp_path / "run"), [cb] + extra, max_steps=8)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return trainer


def test_outputs_that_do_not_fit_are_refused_before_step_1(tmp_path, sizes):
    relex = tmp_path / "small"
    _mount(relex, (sizes["state"] + sizes["horizon"] // 2) // 1024 + 8)
    try:
        trainer = _run(tmp_path, relex)
        with pytest.raises(RelexInputError, match="free"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        _umount(relex)


def test_horizon_does_not_fit(tmp_path, sizes):
    relex = tmp_path / "small"
    _mount(relex, 4096)
    try:
        trainer = _run(tmp_path, relex, fill=sizes["state"] + sizes["horizon"] // 2)
        with pytest.raises(RelexWriteError) as e:
            trainer.train()
        msg = str(e.value)
        assert "step-20" in msg and "No space left on device" in msg and "relex materialize" in msg, msg
        assert "--horizons 20,30" in msg  # both horizons remain to be written
        # every output named with its state; the report (trust signals) was written before the horizons
        assert "report.json is intact (written before the horizons)" in msg and "step-20, step-30 not written" in msg
        rep = json.loads((relex / "report.json").read_text())
        assert rep["horizons_pending"] == [20, 30] and rep["checkpoints"] == [] and "backtest" in rep
        assert not (relex / "step-20").exists() and not (relex / "step-30").exists()
        assert not [n for n in os.listdir(relex) if n.startswith(".")], os.listdir(relex)  # no temporaries
        # the state file is whole: with space freed, materialize finishes the job
        os.remove(relex / "filler")
        written = materialize(str(relex / "relex_state.safetensors"), str(tmp_path / "base"), [20, 30])
        for w in written:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(w)
            assert all(torch.isfinite(p).all() for p in m.parameters())
    finally:
        _umount(relex)


def test_state_file_does_not_fit(tmp_path, sizes):
    relex = tmp_path / "tiny"
    _mount(relex, 4096)
    try:
        trainer = _run(tmp_path, relex, fill=sizes["state"] // 2)
        with pytest.raises(RelexWriteError) as e:
            trainer.train()
        msg = str(e.value)
        assert "state file" in msg and "No space left on device" in msg, msg
        assert "report.json and every horizon were NOT written" in msg, msg
        assert not [n for n in os.listdir(relex) if n.startswith(".") or n.startswith("step-")], os.listdir(relex)
        assert not (relex / "relex_state.safetensors").exists()
    finally:
        _umount(relex)


def test_report_does_not_fit(tmp_path, sizes):
    """The disk fills right after the state file: the message must not call report.json intact (it is not), names
    every output's state, and the command that writes the horizons from the state."""
    relex = tmp_path / "rep"
    _mount(relex, 4096)
    try:
        page = 4096
        trainer = _run(tmp_path, relex, fill=-(-sizes["state"] // page) * page)
        with pytest.raises(RelexWriteError) as e:
            trainer.train()
        msg = str(e.value)
        assert "report.json" in msg and "No space left on device" in msg, msg
        if (relex / "report.json").exists():  # the page rounding left room for the report: a horizon failed
            assert "report.json is intact (written before the horizons)" in msg, msg
        else:
            assert "report.json is NOT written" in msg and "report.json is intact" not in msg, msg
            assert "the state file relex_state.safetensors is intact" in msg and "relex materialize" in msg, msg
        assert (relex / "relex_state.safetensors").exists()
        assert not [n for n in os.listdir(relex) if n.startswith(".") and n != ".relex-lock.json"], os.listdir(relex)
    finally:
        _umount(relex)


def test_output_dir_on_a_full_disk_for_the_cli(tmp_path, sizes, capsys):
    """`relex materialize` onto a full disk: refused before the first write (the plan's bytes against the free
    space), exit 2, one line, nothing written."""
    done = tmp_path / "done"
    trainer = _run(tmp_path, done)
    trainer.train()
    out = tmp_path / "full"
    _mount(out, max(8, sizes["horizon"] // 2 // 1024))
    capsys.readouterr()  # the training run's own output
    try:
        rc = main(["materialize", "--state", str(done / "relex_state.safetensors"), "--base", str(tmp_path / "base"),
                   "--horizons", "50", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("relex: error: ") and err.count("\n") == 1, err
        assert "free" in err and "nothing was written" in err and os.listdir(out) == [], (err, os.listdir(out))
    finally:
        _umount(out)


def test_horizons_that_overflow_the_dtype_are_refused_before_any_write(tmp_path):
    """Not a disk fault, but the same promise: a horizon whose values would overflow the parameters' dtype (here
    float16) is refused at the end of the window before the state file, not found while writing a horizon."""
    lin = torch.nn.Linear(10, 10, bias=False).half()
    tracked = plain_tracked([("weight", lin.weight)])
    store = TrajectoryStore([t.spec for t in tracked], 4, dtype="float32", storage="host")
    store.set_theta0([lin.weight.detach().reshape(-1)])
    d = torch.ones(100, dtype=torch.float16)
    for t in (1, 2, 3, 4):
        store.snapshot(t, [lin.weight.detach().reshape(-1) + t * d])
    with pytest.raises(RelexInputError, match="overflow"):
        finalize(
            store,
            FullModelWriter(ModelSource(lin)),
            RelexSettings(tcut=4, horizons=(40, 10**6)),
            out_dir=str(tmp_path / "o"),
        )
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
