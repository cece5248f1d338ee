"""What a user sees: one end-of-window summary and every warning once, from the main process, in a 2-process
(DDP over gloo, torchrun) GRPO run; and the summary of a single-process run at the default log level."""

import os
import re

import pytest

from test_distributed import launch
from grpo import grpo_trainer
from relex_callback import RelexCallback


@pytest.mark.slow
def test_one_summary_and_no_duplicate_warning_in_a_two_process_run(tmp_path):
    p = launch("ddp", str(tmp_path / "run"))
    out = p.stdout + p.stderr
    assert out.count("relex: window done at step 6 (tcut)") == 1, out[-4000:]
    assert out.count("relex: next: `relex report") == 1
    relex_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("relex: ")]
    assert relex_lines, "the run printed no relex warning at all: the test would prove nothing"
    dup = sorted({ln for ln in relex_lines if relex_lines.count(ln) > 1})
    assert not dup, dup


def test_summary_at_the_default_log_level(tmp_path, capsys):
    cb = RelexCallback(tcut=4, horizons=[8, 12], dtype="float32")
    grpo_trainer(tmp_path, [cb]).train()
    out = capsys.readouterr().out
    assert out.count("relex: window done at step 4 (tcut): training stops here") == 1
    relex = os.path.join(str(tmp_path), "relex")
    assert f"relex: files in {relex}: step-8, step-12, relex_state.safetensors" in out
    assert re.search(r"relex: (backtest|drift share)", out)
    assert "relex: pick: not scored" in out and f"`relex report {relex}`" in out
