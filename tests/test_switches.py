"""Messages that ask for overwrite name the switch of the entry point in use: the callback's argument
``overwrite=True``, the ``TrlParser`` flag ``--relex_overwrite`` for a callback built from a ``RelexConfig``, and the
CLI's ``--overwrite`` (real trainers and the real ``relex`` command)."""

import os
import pytest

from relex_callback import RelexCallback, RelexInputError
from relex_callback.config import RelexConfig
from test_callback import grpo_trainer


def _refused(tmp_path, cb) -> str:
    os.makedirs(tmp_path / "relex" / "step-8")  # a name the window would write
    trainer = grpo_trainer(tmp_path, [cb])
    with pytest.raises(RelexInputError, match="already exist") as err:
        trainer.train()
    assert trainer.state.global_step == 0  # refused before step 1
    return str(err.value)


def test_callback_names_its_argument(tmp_path):
    msg = _refused(tmp_path, RelexCallback(tcut=4, horizons=[8], dtype="float32"))
    assert "pass overwrite=True to RelexCallback" in msg and "--relex_overwrite" not in msg


def test_trl_parser_callback_names_the_flag(tmp_path):
    cb = RelexCallback.from_config(RelexConfig(relex_tcut=4, relex_horizons=["8"], relex_dtype="float32"))
    msg = _refused(tmp_path, cb)
    assert "pass --relex_overwrite" in msg and "overwrite=True" not in msg

# the CLI's --overwrite: tests/test_clock.py::test_linear_schedule_recorded_and_rewritten_bit_for_bit
