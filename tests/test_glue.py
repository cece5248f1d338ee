"""The callback as glue: its metrics reach the reporting integrations however it was attached, and every argument
of RelexCallback is reachable from a YAML recipe through RelexConfig (one source of truth for settings)."""

import dataclasses
import inspect
import os
import dataclasses as dc
import subprocess
import sys

import pytest
import yaml

from relex_callback import RelexCallback, RelexConfig
from relex_callback.config import RelexSettings

from grpo import grpo_trainer
from test_callback import TCUT


def _tensorboard_scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                tags[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return tags


@pytest.mark.parametrize("attach", ["callbacks", "add_callback"])
def test_tensorboard_receives_relex_scalars(tmp_path, attach, monkeypatch):
    pytest.importorskip("tensorboard")
    cb = RelexCallback(tcut=TCUT, horizons=[12], dtype="float32")
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))  # transformers 5: TensorBoardCallback's log dir
    from transformers import TrainingArguments

    # transformers 4.x: TrainingArguments.logging_dir (the field is gone in 5.x)
    kw = {"logging_dir": str(logdir)} if "logging_dir" in {f.name for f in dc.fields(TrainingArguments)} else {}
    trainer = grpo_trainer(tmp_path, [cb] if attach == "callbacks" else [], report_to=["tensorboard"], **kw)
    if attach == "add_callback":
        trainer.add_callback(cb)  # after the TensorBoard callback: on its own it would see the logs first
    trainer.train()
    scalars = _tensorboard_scalars(logdir)
    relex = {k: v for k, v in scalars.items() if "relex/" in k}
    for name in ("explained_variance_mean", "r2_mean", "solve_seconds", "end_of_window_seconds", "buffer_bytes"):
        tag = next((k for k in relex if k.endswith("relex/" + name)), None)
        assert tag is not None, f"relex/{name} missing from TensorBoard ({sorted(scalars)})"
        (step, value), = relex[tag]
        assert step == TCUT
    ev = next(v for k, v in relex.items() if k.endswith("explained_variance_mean"))[0][1]
    assert abs(ev - cb.report["summary"]["explained_variance_mean"]) < 1e-5
    assert any(k.endswith("loss") for k in scalars)  # the trainer's own scalars still arrive


# a value for every RelexCallback argument, different from its default, and the YAML spelling of it
YAML_VALUES = {
    "tcut": (40, 40),
    "horizons": ("100,200", (100, 200)),  # a comma string in YAML
    "stride": (2, 2),
    "fit_start": (4, 4),
    "rank": (2, 2),
    "storage": ("disk", "disk"),
    "dtype": ("float32", "float32"),
    "max_buffer_bytes": ("8GB", 8 * 10**9),
    "stop_training": (False, False),
    "output_dir": ("/tmp/relex-out", "/tmp/relex-out"),
    "include": (["mlp", "attn"], ("mlp", "attn")),
    "exclude": (["bias"], ("bias",)),
    "solver": ("gram", "gram"),
    "overwrite": (True, True),
    "max_shard_size": ("5GB", 5 * 10**9),
    "fold_rank": (4, 4),
    "buffer_slots": (10, 10),
    "on_nonfinite": ("skip", "skip"),
    "merge_lora": (True, True),
    "fit": ("power", "power"),
    "fit_window": (6, 6),
    "degree": (3, 3),
    "on_flat_reward": ("error", "error"),
    "reward_metric": ("rewards/accuracy", "rewards/accuracy"),
    "evaluate_horizons": (True, True),
    "keep_best": (2, 2),
    "fit_clock": ("steps", "steps"),
}


def test_every_callback_argument_is_a_relex_config_field():
    params = list(inspect.signature(RelexCallback.__init__).parameters)
    assert params[-1] == "trainer"  # the link to the Trainer (docs/callback.md), the one argument that is no setting
    args = [p for p in params if p not in ("self", "trainer")]
    fields = [f.name[len("relex_"):] for f in dataclasses.fields(RelexConfig)]
    assert sorted(args) == sorted(fields)
    assert sorted(args) == sorted(YAML_VALUES)
    derived = {"auto_horizons"}  # set by horizons="auto"
    settings = [f.name for f in dataclasses.fields(RelexSettings) if f.name not in derived]
    assert sorted(settings) == sorted(args)


@pytest.mark.parametrize("horizons_yaml", ["100,200", [100, 200], "100 200"])
def test_every_argument_round_trips_through_trl_parser_yaml(tmp_path, horizons_yaml):
    from trl import GRPOConfig, TrlParser

    cfg = {"output_dir": str(tmp_path / "run"), "use_cpu": True, "bf16": False}
    for name, (value, _) in YAML_VALUES.items():
        cfg[f"relex_{name}"] = value
    cfg["relex_horizons"] = horizons_yaml
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    relex, grpo = TrlParser((RelexConfig, GRPOConfig)).parse_args_and_config(["--config", str(path)])
    assert isinstance(grpo, GRPOConfig)
    cb = RelexCallback.from_config(relex)
    for name, (_, expected) in YAML_VALUES.items():
        assert getattr(cb.settings, name) == expected, name
    # and on the command line, overriding the YAML
    relex, _ = TrlParser((RelexConfig, GRPOConfig)).parse_args_and_config(
        ["--config", str(path), "--relex_horizons", "300,400", "--relex_overwrite", "false", "--relex_fold_rank", "6"])
    cb = RelexCallback.from_config(relex)
    assert cb.settings.horizons == (300, 400) and cb.settings.overwrite is False and cb.settings.fold_rank == 6


def test_auto_horizons_are_a_scored_ladder():
    s = RelexSettings.validate(tcut=75, horizons="auto", keep_best=2)
    assert s.horizons == (150, 300, 600, 1200) and s.auto_horizons and s.evaluate_horizons and s.keep_best == 2


def test_config_module_imports_no_torch():
    code = ("import sys; import relex_callback.config, relex_callback.offline.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 0, r.stderr
