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
from grpo import grpo_trainer


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


# ----------------------------------------------------------------------------- the seam to the Trainer's internals
# Each function of compat.py that reads or writes a private part of transformers / TRL, run on the installed release's
# real objects: a release that renames or removes what one of them reads fails here.
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import CallbackHandler  # noqa: E402


class _Seen(TrainerCallback):
    """Counts the events it is called with; on_train_begin reads the checkpoint being resumed through compat."""

    def __init__(self, trainer=None):
        self.events, self.trainer, self.resumed = [], trainer, "unset"

    def on_train_begin(self, args, state, control, **kw):
        self.events.append("on_train_begin")
        if self.trainer is not None:
            self.resumed = compat.resume_argument(self.trainer)

    def on_log(self, args, state, control, **kw):
        self.events.append("on_log")


def _plain_trainer(out, callbacks):
    tok = build_tokenizer()
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=1, disable_tqdm=True)
    return Trainer(model=build_model(tok), args=args, callbacks=callbacks)


@pytest.mark.parametrize("kind", ["trainer", "grpo"])
def test_handler_and_trainer_found_through_the_referrers(tmp_path, kind):
    cb = RelexCallback(tcut=2, horizons=[4])
    trainer = grpo_trainer(tmp_path, [cb]) if kind == "grpo" else _plain_trainer(tmp_path, [cb])
    handler = compat.callback_handler(trainer)
    assert isinstance(handler, CallbackHandler) and compat._is_callback_handler(handler)
    assert compat.handler_holding(cb) is handler
    assert compat.trainer_of(handler) is trainer
    assert compat.holds(handler, cb) and not compat.holds(handler, RelexCallback(tcut=2, horizons=[4]))
    assert compat.handler_holding(RelexCallback(tcut=2, horizons=[4])) is None  # held by no handler


def test_put_first_keeps_one_entry_and_replace_swaps_in_place(tmp_path):
    cb, other = RelexCallback(tcut=2, horizons=[4]), _Seen()
    trainer = _plain_trainer(tmp_path, [other])
    handler = trainer.callback_handler
    trainer.add_callback(cb)
    trainer.add_callback(cb)  # added twice (attach, then add_callback): one entry remains, first
    compat.put_first(handler, cb)
    assert handler.callbacks[0] is cb and sum(c is cb for c in handler.callbacks) == 1 and other in handler.callbacks
    new = RelexCallback(tcut=2, horizons=[4])
    compat.replace_callback(handler, cb, new)
    assert handler.callbacks[0] is new and not compat.holds(handler, cb)


def test_callbacks_detached_sees_no_event_and_puts_them_back(tmp_path):
    seen = _Seen()
    trainer = _plain_trainer(tmp_path, [seen])
    before = list(trainer.callback_handler.callbacks)
    with pytest.raises(RuntimeError):
        with compat.callbacks_detached(trainer):
            trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs={})
            raise RuntimeError("an evaluation failed")
    assert seen.events == [] and trainer.callback_handler.callbacks == before
    trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs={})
    assert seen.events == ["on_log"]  # the handler calls the callbacks in that list


def test_resume_argument_read_from_the_training_loop(tmp_path):
    trainer = grpo_trainer(tmp_path, [], max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    seen = _Seen(trainer)
    trainer.add_callback(seen)
    trainer.train()  # not resuming: no path
    assert seen.resumed is None
    ckpt = str(tmp_path / "checkpoint-1")
    trainer.args.max_steps = 2
    trainer.train(resume_from_checkpoint=ckpt)
    assert seen.resumed == ckpt
    trainer.train(resume_from_checkpoint=True)  # True: the Trainer resolves the last checkpoint
    assert seen.resumed == str(tmp_path / "checkpoint-2")


def test_grpo_buffers_copied_and_put_back(tmp_path):
    trainer = grpo_trainer(tmp_path, [], max_steps=1)
    trainer.train()
    log = compat.completion_log(trainer)  # GRPO's completion log of the last generation, with prompts and rewards
    assert log is not None and len(log["prompt"]) > 0 and set(log["rewards"]) == {"digit_reward"}
    assert "train" in trainer._metrics  # the accumulators a GRPO evaluation writes into
    saved = compat.trainer_buffers(trainer)
    assert set(saved) == {"control", "_logs", "_metrics"}
    prompts = list(log["prompt"])
    log["prompt"].append("changed meanwhile")
    trainer._metrics["eval"]["reward"].append(1.0)
    trainer.control.should_training_stop = not saved["control"]["should_training_stop"]
    compat.restore_trainer_buffers(trainer, saved)
    assert list(compat.completion_log(trainer)["prompt"]) == prompts and "reward" not in trainer._metrics["eval"]
    assert trainer.control.should_training_stop == saved["control"]["should_training_stop"]
    compat.set_completion_log(trainer, {"prompt": [], "rewards": {}})
    assert compat.completion_log(trainer) == {"prompt": [], "rewards": {}}
    plain = _plain_trainer(tmp_path / "plain", [])
    assert compat.completion_log(plain) is None and set(compat.trainer_buffers(plain)) == {"control"}


def test_resync_generation_resets_the_vllm_step_grpo_reads():
    import inspect

    from trl import GRPOTrainer

    src = inspect.getsource(GRPOTrainer)
    assert "self._last_loaded_step = -1" in src and "!= self._last_loaded_step" in src  # vLLM: load when it differs

    class Loaded:
        _last_loaded_step = 7

    t = Loaded()
    compat.resync_generation(t)
    assert t._last_loaded_step == -1
    other = object.__new__(Trainer)  # a trainer without vLLM: nothing set
    compat.resync_generation(other)
    assert not hasattr(other, "_last_loaded_step")


def test_model_source_path_is_where_from_pretrained_read(tmp_path):
    from transformers import AutoModelForCausalLM

    build_model(build_tokenizer()).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert compat.model_source_path(model) == str(tmp_path / "m")
    assert compat.model_source_path(object()) is None


_OBJECTS = {"trainer", "handler", "callback_handler", "model", "args", "state", "control", "config", "lr_scheduler",
            "scheduler", "sched", "optimizer", "processing_class", "tokenizer", "accelerator"}


def private_accesses(source: str) -> list:
    """``["line: what"]`` for each private access in ``source`` (read with ast): ``._name`` on a trainer / handler /
    model / args / state / control / config / scheduler / optimizer object (as a name or an attribute:
    ``self.trainer._logs``), ``getattr(trainer, "_name")`` and friends, ``sys._getframe``, ``gc.get_referrers``."""
    import ast

    def name_of(node):
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None

    def private(name):
        return isinstance(name, str) and name.startswith("_") and not name.startswith("__")

    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Attribute) and private(n.attr) and name_of(n.value) in _OBJECTS:
            found.append(f"{n.lineno}: {name_of(n.value)}.{n.attr}")
        elif isinstance(n, ast.Attribute) and (name_of(n.value), n.attr) in (("sys", "_getframe"),
                                                                            ("gc", "get_referrers")):
            found.append(f"{n.lineno}: {name_of(n.value)}.{n.attr}")
        elif (isinstance(n, ast.Call) and name_of(n.func) in ("getattr", "hasattr", "setattr", "delattr")
              and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and private(n.args[1].value)
              and name_of(n.args[0]) in _OBJECTS):
            found.append(f"{n.lineno}: {name_of(n.func)}({name_of(n.args[0])}, {n.args[1].value!r})")
    return found


def test_the_private_access_scan_sees_each_kind():
    snippet = ("import sys, gc\n"
               "a = self.trainer._logs\n"
               "b = getattr(model, '_tied_weights_keys', None)\n"
               "c = sys._getframe(1)\n"
               "d = gc.get_referrers(x)\n"
               "trainer.state._private = 1\n"
               "e = self._own, trainer.model, cb.__dict__, p._hp_mapping\n")  # not a transformers / TRL private
    assert sorted(f.split(":")[0] for f in private_accesses(snippet)) == ["2", "3", "4", "5", "6"]


def test_no_private_name_of_transformers_or_trl_outside_compat():
    """Every module of the package but compat.py: no private access of :func:`private_accesses`' kinds (the seam to
    the Trainer is compat.py's functions, each tested above on the installed releases)."""
    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "relex_callback")
    found, scanned = [], 0
    for d, _, files in os.walk(pkg):
        for f in files:
            path = os.path.join(d, f)
            if not f.endswith(".py") or os.path.relpath(path, pkg) == "compat.py":
                continue
            scanned += 1
            found += [f"{os.path.relpath(path, pkg)}:{x}" for x in private_accesses(open(path).read())]
    assert scanned > 40 and not found, f"private parts of transformers / TRL objects outside compat.py: {found}"
    assert private_accesses(open(os.path.join(pkg, "compat.py")).read())  # where they all are
