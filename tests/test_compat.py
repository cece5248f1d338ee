"""What differs between the supported transformers / TRL releases (relex_callback/compat.py), pinned on whatever
releases are installed: `make test` runs it on the pinned set, `make test-compat` on the oldest and the newest
supported ones (docs/install.md, "Compatibility").

* tied embeddings: the checkpoint's tensor names equal what save_pretrained writes and the tracked names, and the
  state file, the callback's output and an offline solve agree on them;
* GRPO's evaluation metrics reach the scores whether or not the trainer's ``evaluate()`` returns them (TRL < 1.5
  only logs them);
* the ``relex/*`` metrics reach the logged history at tcut;
* the version guard: older than supported is refused with the range, newer is warned about.
"""

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from relex_callback import RelexCallback, RelexInputError
from relex_callback import compat
from relex_callback.files.checkpoints import checkpoint_keys
from relex_callback.params import trainable_named_parameters
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from test_callback import grpo_trainer


def _keys(d):
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("tie", [True, False])
def test_tied_copies_found_by_sharing_on_this_release(tmp_path, tie):
    model = build_model(build_tokenizer(), tie=tie)
    sd = model.state_dict()
    assert "lm_head.weight" in sd  # both names in state_dict() on every release
    copies = compat.tied_copies(model, sd)
    assert copies == ({"lm_head.weight"} if tie else set())
    assert copies == compat.declared_tied_keys(model)  # what the model declares, read the release's own way
    # the same as the keep_vars state dict the topology and the scoring use
    assert compat.tied_copies(model, model.state_dict(keep_vars=True)) == copies
    model.save_pretrained(tmp_path / "m")
    keys = checkpoint_keys(model, sd)
    assert set(keys) == _keys(tmp_path / "m")  # exactly what save_pretrained writes
    assert {n for n, _ in trainable_named_parameters(model)} <= set(keys)  # every tracked name is a key


def test_tied_copies_by_storage_without_shared_object():
    """Two names on one storage but different tensor objects (a state dict built by hand) are found too; equal values
    in separate storage are not."""
    w = torch.randn(4, 3)
    sd = {"a.weight": w, "b.weight": w.view(4, 3), "c.weight": w.clone()}
    assert compat.tied_copies(None, sd) == {"b.weight"}


def test_tied_model_outputs_agree_on_the_tensor_set(tmp_path):
    """A GRPO run on a tied-embedding model: the written horizon holds exactly the keys save_pretrained writes (no
    lm_head.weight), the state file holds the tracked names, and the horizon loads tied."""
    from transformers import AutoModelForCausalLM

    from relex_callback.files.state import load_state

    tok = build_tokenizer()
    model = build_model(tok, tie=True)
    model.save_pretrained(tmp_path / "base")
    cb = RelexCallback(tcut=3, horizons=[9], dtype="float32")
    trainer = grpo_trainer(tmp_path, [cb], model=model, tok=tok)
    trainer.train()
    relex = tmp_path / "relex"
    assert _keys(relex / "step-9") == _keys(tmp_path / "base")
    assert "lm_head.weight" not in _keys(relex / "step-9")
    st = load_state(str(relex))
    assert {s.name for s in st.specs} == {n for n, _ in trainable_named_parameters(model)}
    loaded = AutoModelForCausalLM.from_pretrained(relex / "step-9")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # the relex/* metrics were handed to the log at tcut (the dict the reporting callbacks see)
    last = [e for e in trainer.state.log_history if "relex/explained_variance_mean" in e]
    assert last and last[0]["step"] == 3


def test_grpo_eval_metrics_reach_the_scores(tmp_path):
    """trainer.evaluate() of TRL < 1.5 does not return GRPO's own metrics (its log() logs a new dict); the scoring's
    evaluate takes them from the logged entry, so the reward is scored on every supported release."""
    from datasets import Dataset

    import trl

    trainer = grpo_trainer(tmp_path, [], per_device_eval_batch_size=4)
    trainer.eval_dataset = Dataset.from_list(arithmetic_problems(8, seed=2))
    start = len(trainer.state.log_history)
    got = compat.evaluate_with_logged_metrics(trainer)
    assert "eval_reward" in got and "eval_rewards/digit_reward/mean" in got
    logged = trainer.state.log_history[start:]
    # a metric both returned and logged keeps the returned value (the same number, when a release does both)
    assert any(e.get("eval_reward") == got["eval_reward"] for e in logged)
    returned = trainer.evaluate()
    # pin the releases' behaviour, so a change is seen: TRL >= 1.5 returns them, older only logs them
    if compat.parse_version(trl.__version__) >= (1, 5, 0):
        assert "eval_reward" in returned
    else:
        assert "eval_reward" not in returned


def test_version_guard():
    low = {p: lo for p, (lo, _) in compat.SUPPORTED.items()}
    compat.check_versions(("transformers", "trl", "accelerate"), versions=low)  # the lowest supported: fine
    with pytest.raises(RelexInputError, match=r"supports transformers 4\.57\.6 to .*installed: transformers 4\.56\.2"):
        compat.check_versions(("transformers",), versions={**low, "transformers": "4.56.2"})
    with pytest.raises(RelexInputError, match=r"trl 0\.23\.1 \(supported: 0\.29\.1 to"):
        compat.check_versions(("trl",), versions={**low, "trl": "0.23.1"})
    compat.check_versions(("transformers",), versions={**low, "trl": "0.23.1"})  # trl not in use: not checked
    assert compat.parse_version("5.0.0rc1") == (5, 0, 0) and compat.parse_version("1.16.0.dev0") == (1, 16, 0)
    assert compat.parse_version("4.57") == (4, 57, 0)


def test_version_guard_override_and_newer(monkeypatch, caplog):
    low = {p: lo for p, (lo, _) in compat.SUPPORTED.items()}
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="continuing untested"):
        compat.check_versions(("transformers",), versions={**low, "transformers": "4.40.0"})
    monkeypatch.delenv(compat.ALLOW_ENV)
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        compat.check_versions(("transformers",), versions={**low, "transformers": "99.0.0"})
    assert "untested newer release(s) transformers 99.0.0" in caplog.text


def test_installed_releases_are_supported():
    """The environment running the suite is within the supported range (so the guard lets RelexCallback start)."""
    old, _ = compat.version_problems()
    assert not old, old
    RelexCallback(tcut=2, horizons=[4])
