"""The classes of silent wrongs, each enumerated from the code's own table, at the level a user meets it.

1. Delete only what this run wrote: every name a run writes (``fs.output_names``), planted as a user's look-alike,
   is never replaced, with or without ``overwrite`` (a real GRPOTrainer, the CLI); ``keep_best``, temporaries and
   the trajectory files remove only this run's (its run id in the ``step-H/`` marker).
3. Read back only what belongs to this run: a ``step-H/`` of an earlier run is neither scored nor removed by
   ``evaluate_horizons``; a base of the same architecture with other weights is refused naming every tensor.
4. Every input is an input: ``config.BOUNDS`` (every whole-number argument of the callback and the CLI),
   every size field of a ``config.json`` read by ``relex plan``, every field of ``report.json`` a reader reads
   (``schema.REPORT_FIELDS``): one line, exit 2.
6. All outputs are checked free before step 1, derived names included (the same ``fs.output_names`` table).
7. The error names the input that is wrong: a NaN already in the base; a lock held by an unrelated live process.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

from relex_callback import RelexCallback, RelexInputError
from relex_callback.offline.cli import EXTRAPOLATE_NUMBERS, PLAN_NUMBERS, main
from relex_callback.config import BOUNDS
from relex_callback.files.fs import RELEX_MARKER, STATE_SHARD_PATTERN, output_names
from relex_callback.files.schema import REPORT_FIELDS
from relex_callback.files.state import load_state, state_shard_name
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from relex_callback.errors import RelexNonFiniteError
from relex_callback.trainer import scoring
from relex_callback.trainer.scoring import evaluate_horizons
from relex_callback.trajectory.plan import COUNT, POSITIVE_SIZE
from test_bad_input import _save_like, cli_fixture
from grpo import grpo_trainer
from test_callback import Recorder
from helpers import run_relex
from safetensors.torch import load_file
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

HORIZONS = [4, 8]
USER = "a user's file: relex must not touch it\n"


def plant(path: str, as_dir: bool):
    """A user's look-alike at ``path``: a directory holding a file, or a file."""
    if as_dir:
        os.makedirs(path)
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write(USER)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(USER)


def tree(path: str) -> dict:
    """Every file under ``path`` with its bytes (what a test checks was left as it was)."""
    out = {}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def every_output_name() -> list:
    """Every name a run with the most outputs writes (PEFT with merge_lora, scored horizons), from the package's own
    table, and one shard name of a distributed state."""
    names = output_names(HORIZONS, merged=True, plot=True) + [state_shard_name(0, 2)]
    assert STATE_SHARD_PATTERN.match(names[-1])
    return names


def lora_trainer(out, callbacks):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    model = peft.get_peft_model(
        build_model(tok),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    return grpo_trainer(out, callbacks, model=model, tok=tok, max_steps=4)


# ------------------------------------------------------------------------------- classes 1 and 6: the outputs
@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True], ids=["no-overwrite", "overwrite"])
@pytest.mark.parametrize("name", every_output_name())
def test_a_look_alike_of_every_output_is_refused_before_step_1_and_left_alone(tmp_path, name, overwrite):
    """A PEFT GRPO run with merge_lora and scored horizons (every derived name) on an output_dir holding a user's
    look-alike of one of its names: refused in on_train_begin, before step 1, with or without overwrite (which replaces
    only what relex wrote), and the look-alike is byte for byte as it was."""
    target = tmp_path / "relex" / name
    plant(str(target), as_dir=name.startswith("step-"))
    before = tree(str(target))
    rec = Recorder()
    cb = RelexCallback(tcut=2, horizons=HORIZONS, dtype="float32", merge_lora=True, evaluate_horizons=True,
                       overwrite=overwrite)
    trainer = lora_trainer(tmp_path, [cb, rec])
    with pytest.raises(RelexInputError) as e:
        trainer.train()
    assert trainer.state.global_step == 0 and 1 not in rec.snaps, "a step was trained before the refusal"
    assert str(target) in str(e.value)
    if overwrite:
        assert "overwrite replaces only what relex wrote" in str(e.value)
    assert tree(str(target)) == before


def _scored_trainer(out, cb):
    from datasets import Dataset

    trainer = grpo_trainer(out, [cb], per_device_eval_batch_size=4, max_steps=4)
    trainer.eval_dataset = Dataset.from_list(arithmetic_problems(8, seed=2))
    return trainer


@pytest.mark.slow
def test_keep_best_temporaries_and_trajectory_files_remove_only_this_runs(tmp_path, monkeypatch):
    """keep_best on a plain (non-PEFT) run whose output_dir holds step-H-merged/ look-alikes (a name the run never
    writes), a user's .step-8.tmp-notes/, a killed writer's real temporary, and an earlier run's files in trajectory/:
    only this run's losing step-H/ and the stale temporary go; everything else is left, and report.json says why.
    The toy's scores are within noise of each other, where keep_best removes nothing (tests/test_scoring.py): the
    noise rule is switched off here so that the removals this test is about happen."""
    monkeypatch.setattr(scoring, "NOISE_SE", -math.inf)  # every best horizon "beats" the tcut model
    relex = tmp_path / "relex"
    horizons = [4, 8, 16]
    user = [relex / f"step-{h}-merged" for h in horizons] + [relex / ".step-8.tmp-notes", relex / "step-6"]
    for d in user:
        plant(str(d), as_dir=True)
    stale = relex / ".step-8.tmp-999999-abcdef12"  # what a killed writer of this package leaves
    plant(str(stale), as_dir=True)
    earlier = relex / "trajectory"  # an earlier window's run directory (its checkpoints link these files)
    plant(str(earlier / "theta0.safetensors"), as_dir=False)
    plant(str(earlier / "rows-000001-000002-aaaaaaaa.bin"), as_dir=False)
    with open(earlier / "trajectory.json", "w") as f:
        json.dump({"run_id": "an-earlier-run"}, f)
    kept_as_is = {str(p): tree(str(p)) for p in user + [earlier]}
    cb = RelexCallback(tcut=2, horizons=horizons, dtype="float32", storage="host", evaluate_horizons=True, keep_best=1)
    trainer = _scored_trainer(tmp_path, cb)
    trainer.train()
    kb = cb.report["keep_best"]
    assert kb["kept"] == [cb.report["best_horizon"]] and len(kb["removed"]) == 2
    for h in horizons:
        assert (relex / f"step-{h}").is_dir() == (h in kb["kept"]), h
    assert {p: tree(p) for p in kept_as_is} == kept_as_is, "keep_best or the end of the window removed a user's file"
    losers = [h for h in horizons if h not in kb["kept"]]
    assert sorted(kb["left"]) == sorted(f"step-{h}-merged" for h in losers)
    assert all("relex did not write it" in why for why in kb["left"].values())
    assert not stale.exists(), "the killed writer's temporary was not cleaned"

    # class 3: an earlier run's step-H/ in the same directory is neither scored nor removed as this run's

    best = kb["kept"][0]
    other = relex / "step-32"
    shutil.copytree(relex / f"step-{best}", other)
    marker = json.loads((other / RELEX_MARKER).read_text())
    marker.update(run_id="an-earlier-run", horizon=32)
    (other / RELEX_MARKER).write_text(json.dumps(marker))
    before = tree(str(other))
    res = evaluate_horizons(trainer, str(relex), keep_best=1, write=False)
    assert sorted(res["horizon_eval"]) == [str(best)], "a directory of another run was scored as this run's"
    with pytest.raises(RelexInputError, match="another RELEX run"):
        evaluate_horizons(trainer, str(relex), horizons=[32], write=False)
    res = evaluate_horizons(trainer, str(relex), keep_best=1)
    assert tree(str(other)) == before and (relex / f"step-{best}").is_dir()


# -------------------------------------------------------------------- the CLI: overwrite, a base of other weights
@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("own"))
    return d, cli_fixture(d)


@pytest.mark.parametrize("name", output_names([40]) + [state_shard_name(1, 2)])
def test_extrapolate_overwrite_replaces_only_relex_outputs(cli_paths, name, capsys):
    """`relex extrapolate --overwrite` into a directory holding a user's look-alike of one of its output names: exit 2,
    one line, nothing touched; the same over relex's own finished output succeeds (exit 0)."""
    d, p = cli_paths
    out = os.path.join(d, f"ow-{name}")
    plant(os.path.join(out, name), as_dir=name.startswith("step-"))
    before = tree(out)
    rc = main(["extrapolate", "--base", p["base"], "--checkpoints", p["ckpts"], "--horizons", "40", "--out", out,
               "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "overwrite replaces only what relex wrote" in err, err
    assert tree(out) == before


def test_overwrite_of_relex_output_and_materialize_over_a_users_dir(cli_paths, subprocess_env):
    d, p = cli_paths
    again = os.path.join(d, "again")
    shutil.copytree(p["done"], again)
    r = run_relex("extrapolate", "--base", p["base"], "--checkpoints", p["ckpts"], "--horizons", "40", "--out", again,
                  "--overwrite", "--no-progress", env=subprocess_env)
    assert r.returncode == 0, r.stderr
    marker = json.load(open(os.path.join(again, "step-40", RELEX_MARKER)))

    assert marker["run_id"] and marker["run_id"] == load_state(again).run_id
    # materialize --overwrite next to the state: a user's step-100/ is not replaced
    plant(os.path.join(again, "step-100"), as_dir=True)
    before = tree(os.path.join(again, "step-100"))
    r = run_relex("materialize", "--state", again, "--base", p["base"], "--horizons", "100", "--out", again,
                  "--overwrite", env=subprocess_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "step-100" in r.stderr and tree(os.path.join(again, "step-100")) == before
    # the horizon materialize writes carries the state's run id (evaluate_horizons reads it as that run's)
    r = run_relex("materialize", "--state", again, "--base", p["base"], "--horizons", "60", "--out", again,
                  env=subprocess_env)
    assert r.returncode == 0, r.stderr
    assert json.load(open(os.path.join(again, "step-60", RELEX_MARKER)))["run_id"] == marker["run_id"]


def test_a_base_with_other_weights_is_refused_naming_every_tensor(cli_paths, subprocess_env):
    """`relex materialize` with a base of the same architecture and other weights: refused, the count of the tensors
    that differ and (up to five) their names in the one line."""
    d, p = cli_paths
    a = load_file(os.path.join(p["base"], "model.safetensors"))
    b = load_file(os.path.join(p["base1"], "model.safetensors"))
    floats = [k for k in a if a[k].is_floating_point()]
    differ = [k for k in floats if not torch.equal(a[k], b[k])]
    assert len(differ) > 5
    r = run_relex("materialize", "--state", p["done"], "--base", p["base1"], "--horizons", "100", "--out",
                  os.path.join(d, "m1"), env=subprocess_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"for {len(differ)} of {len(floats)} tensor(s)" in r.stderr and f"and {len(differ) - 5} more" in r.stderr
    assert sum(f"{k} (" in r.stderr for k in differ) == 5, r.stderr
    assert not os.path.exists(os.path.join(d, "m1"))


# ------------------------------------------------------------------------------------ class 4: every input
CALLBACK_BOUNDED = ["tcut", "horizons", "stride", "fit_start", "rank", "fold_rank", "buffer_slots", "fit_window",
                    "degree", "keep_best", "max_buffer_bytes", "max_shard_size"]


def test_the_bounds_table_is_the_callbacks():
    """Every BOUNDS entry is a callback argument or a CLI-only number (listed here): a new bound is tested below."""
    cli_only = {"steps", "worst", "world_size", "local_world_size"}
    assert set(BOUNDS) == set(CALLBACK_BOUNDED) | cli_only


@pytest.mark.parametrize("name", CALLBACK_BOUNDED)
@pytest.mark.parametrize("how", ["max+1", "10**30"])
def test_callback_refuses_every_number_beyond_its_bound(name, how):
    hi = BOUNDS[name][1]
    value = hi + 1 if how == "max+1" else 10**30
    kw = dict(tcut=4, horizons=[8])
    kw["horizons" if name == "horizons" else name] = [value] if name == "horizons" else value
    if name == "tcut":
        kw["horizons"] = [10**30 + 1]
    if name == "keep_best":
        kw["evaluate_horizons"] = True
    with pytest.raises(RelexInputError) as e:
        RelexCallback(**kw)
    msg = str(e.value)
    assert "\n" not in msg and (name in msg or "horizons" in msg), msg


def _cli_number_cases():
    """(command, option, bounds name) of every whole-number option of the CLI."""
    cases = [("extrapolate", o, n) for o, n in EXTRAPOLATE_NUMBERS.items()]
    cases += [("plan", o, n) for o, n in PLAN_NUMBERS.items()]
    cases += [("report", "--worst", "worst"), ("extrapolate", "--horizons", "horizons"),
              ("extrapolate", "--steps", "steps"), ("materialize", "--horizons", "horizons")]
    return cases


@pytest.mark.parametrize("how", ["max+1", "10**30"])
@pytest.mark.parametrize("cmd,option,name", _cli_number_cases(), ids=[f"{c}{o}" for c, o, _ in _cli_number_cases()])
def test_cli_refuses_every_number_beyond_the_callbacks_bound(cli_paths, cmd, option, name, how, capsys):
    d, p = cli_paths
    value = str(BOUNDS[name][1] + 1 if how == "max+1" else 10**30)
    out = os.path.join(d, f"n-{cmd}{option}{how}")
    argv = {
        "extrapolate": [
            "extrapolate",
            "--base",
            p["base"],
            "--checkpoints",
            p["ckpts"],
            "--horizons",
            "40",
            "--out",
            out,
        ],
        "materialize": ["materialize", "--state", p["done"], "--base", p["base"], "--horizons", "100", "--out", out],
        "plan": ["plan", "--model", p["base"], "--tcut", "100", "--world-size", "8"],
        "report": ["report", p["done"]],
    }[cmd]
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.startswith("relex: error: ") and cap.err.count("\n") == 1, cap.err
    assert option in cap.err and "Traceback" not in cap.err
    assert not os.path.exists(out)


def test_world_size_10_21_in_a_real_process(cli_paths, subprocess_env):
    d, p = cli_paths
    r = run_relex("plan", "--model", p["base"], "--tcut", "100", "--world-size", str(10**21), env=subprocess_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--world-size" in r.stderr, r.stderr
    assert r.stdout == ""


def _size_fields(cfg: dict, where=""):
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _size_fields(v, f"{where}{k}.")
        elif v is not None and (POSITIVE_SIZE.search(k) or COUNT.search(k)):
            out.append(f"{where}{k}")
    return out


FIXTURE_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "qwen3-8b-base", "config.json")
with open(FIXTURE_CONFIG) as _f:
    SIZE_FIELDS = _size_fields(json.load(_f))


def test_plan_reads_the_size_fields_it_checks():
    assert {"hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim"} <= set(SIZE_FIELDS)


@pytest.mark.parametrize("bad", [-1, 0, "4096", 4096.5, True], ids=["negative", "zero", "string", "float", "bool"])
@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_plan_refuses_every_bad_size_in_config_json(tmp_path, field, bad, capsys):
    """Every size field of a real config.json (hidden_size, num_hidden_layers, ...) set to a negative, zero (where a
    size must be positive), non-numeric, fractional or boolean value: `relex plan` exits 2 with one line naming it."""
    with open(FIXTURE_CONFIG) as f:
        cfg = json.load(f)
    obj = cfg
    *parents, key = field.split(".")
    for k in parents:
        obj = obj[k]
    obj[key] = bad
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc = main(["plan", "--model", str(path), "--tcut", "100"])
    cap = capsys.readouterr()
    if bad == 0 and not isinstance(bad, bool) and not POSITIVE_SIZE.search(key):
        assert rc == 0, cap.err  # a count that may be zero (e.g. max_window_layers)
        return
    assert rc == 2 and cap.err.count("\n") == 1 and field in cap.err and "Traceback" not in cap.err, cap.err
    assert cap.out == ""


def _wrong(kind):
    """A value of another type than ``kind``."""
    if isinstance(kind, tuple):  # a list / object whose one item is wrong
        return [_wrong(kind[1])] if kind[0] == "list" else {"a": _wrong(kind[1])}
    return {"a whole number": "x", "a finite number": "x", "a string": 5, "a list": {}, "an object": [],
            "true/false": "yes"}[kind]


@pytest.fixture(scope="module")
def real_report(cli_paths):
    d, p = cli_paths
    with open(os.path.join(p["done"], "report.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("plot", [False, True], ids=["report", "report--plot"])
@pytest.mark.parametrize("field,kind,required", REPORT_FIELDS, ids=[f for f, _, _ in REPORT_FIELDS])
def test_relex_report_refuses_every_broken_field(tmp_path, real_report, field, kind, required, plot, capsys):
    """Each field any reader of report.json reads, given a value of the wrong type (on the first tensor for
    tensors[].*; a missing parent object is created): `relex report` exits 2 with one line naming the field."""
    rep = json.loads(json.dumps(real_report))
    obj = rep
    *parents, key = field.split(".")
    for k in parents:
        obj = obj["tensors"][0] if k == "tensors[]" else obj.setdefault(k, {})
    obj[key] = _wrong(kind)
    (tmp_path / "report.json").write_text(json.dumps(rep))
    rc = main(["report", str(tmp_path)] + (["--plot"] if plot else []))
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.count("\n") == 1 and "Traceback" not in cap.err, cap.err
    assert field.replace("tensors[]", "tensors[0]") in cap.err, cap.err
    assert not (tmp_path / "report.png").exists()


def test_report_fields_in_a_real_process(tmp_path, real_report, subprocess_env):
    rep = json.loads(json.dumps(real_report))
    rep["backtest"] = {"cosine_global": "0.9"}  # a trust signal, not only the fields the schema knew
    (tmp_path / "report.json").write_text(json.dumps(rep))
    r = run_relex("report", str(tmp_path), env=subprocess_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "backtest.cosine_global" in r.stderr, r.stderr


# ------------------------------------------------------------------------ class 7: the error names the input
@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_a_nan_in_the_base_is_the_bases(cli_paths, streaming, subprocess_env):
    d, p = cli_paths
    nanbase = os.path.join(d, "nanbase")
    if not os.path.isdir(nanbase):
        t = load_file(os.path.join(p["base"], "model.safetensors"))
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k].reshape(-1)[3] = float("nan")
        _save_like(p["base"], nanbase, t)
    out = os.path.join(d, f"nan-out{streaming}")
    r = run_relex("extrapolate", "--base", nanbase, "--checkpoints", p["ckpts"], "--horizons", "40", "--out", out,
                  streaming, "--no-progress", env=subprocess_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"the base {nanbase} (theta_0) holds NaN/Inf" in r.stderr and "checkpoint-" not in r.stderr, r.stderr
    r = run_relex("materialize", "--state", p["done"], "--base", nanbase, "--horizons", "100", "--out", out + "m",
                  env=subprocess_env)
    assert r.returncode == 2 and f"the base {nanbase} (theta_0) holds NaN/Inf" in r.stderr, r.stderr


def test_a_nan_in_the_models_starting_weights_is_named_theta0(tmp_path):
    """A plain Trainer whose model starts with a NaN: the error says theta_0 (the base), not that step 1 diverged."""
    from datasets import Dataset

    tok = build_tokenizer()
    tok.padding_side = "right"
    model = build_model(tok)
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    texts = [q["prompt"] + q["answer"] + tok.eos_token for q in arithmetic_problems(16, seed=1)]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_strategy="no",
                             report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True, logging_steps=1)
    cb = RelexCallback(tcut=2, horizons=[4], dtype="float32", on_nonfinite="skip")
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))

    with pytest.raises(RelexNonFiniteError) as e:
        trainer.train()
    msg = str(e.value)
    assert "theta_0" in msg and name in msg and "diverged" not in msg, msg


@pytest.fixture
def unrelated_process():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _lock(path, pid, started):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "token": "x", "since": time.time(), "started": started}, f)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process start times are read from /proc")
def test_a_lock_whose_pid_now_names_an_unrelated_process_is_taken_over(tmp_path, unrelated_process):
    """The lock names a pid that is alive but started at another time than the holder (the pid was reused): the
    holder is gone, the lock is taken over and the window runs; without a recorded start time the refusal names the
    running process, never calls it another RelexCallback."""
    lock = str(tmp_path / "relex" / ".relex-lock.json")
    _lock(lock, unrelated_process.pid, started="1")  # the holder started at tick 1; this pid started later
    cb = RelexCallback(tcut=2, horizons=[4], dtype="float32")
    grpo_trainer(tmp_path, [cb], max_steps=4).train()
    assert cb.done and (tmp_path / "relex" / "step-4").is_dir()

    other = tmp_path / "second"
    _lock(str(other / "relex" / ".relex-lock.json"), unrelated_process.pid, started=None)
    with pytest.raises(RelexInputError) as e:
        grpo_trainer(other, [RelexCallback(tcut=2, horizons=[4])], max_steps=4).train()
    assert "another RelexCallback" not in str(e.value) and "sleep 60" in str(e.value), str(e.value)


def test_report_plot_replaces_only_its_own_picture(tmp_path, real_report, capsys):
    """`relex report --plot` writes report.png; a second --plot replaces relex's picture, a user's report.png is left
    (exit 2, one line, nothing printed)."""
    pytest.importorskip("matplotlib")
    (tmp_path / "report.json").write_text(json.dumps(real_report))
    assert main(["report", str(tmp_path), "--plot"]) == 0
    assert main(["report", str(tmp_path), "--plot"]) == 0  # its own picture: replaced
    capsys.readouterr()
    (tmp_path / "report.png").write_bytes(b"\x89PNG a user's picture")
    rc = main(["report", str(tmp_path), "--plot"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.count("\n") == 1 and "report.png" in cap.err and cap.out == "", cap.err
    assert (tmp_path / "report.png").read_bytes() == b"\x89PNG a user's picture"
