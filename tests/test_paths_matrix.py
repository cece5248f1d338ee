"""Every path to a horizon gives the same bytes, one matrix over the options that change what is
written, each cell comparing the paths tensor by tensor with ``torch.equal``.

One real TRL GRPOTrainer run on the tiny local model (tied embeddings, one frozen parameter, a checkpoint saved at
every step) carries one ``RelexCallback`` per option cell, each with its own output directory. For each cell:

* the callback's ``step-H`` (the reference);
* ``relex materialize`` (the CLI as a subprocess) from the cell's state file and the base: bitwise;
* ``evaluate_horizons`` rebuilding a horizon that has no directory from the state and the base: the weights it puts
  into the trainer's model equal ``relex materialize``'s for that horizon, bitwise;
* ``relex extrapolate --no-streaming`` on the run's checkpoints with the CLI's spelling of the cell's options, where
  the CLI has them (the buffered CLI fills the same bf16 trajectory buffer from the checkpoints the trainer saved in
  float32: bitwise, with a float32 buffer too);
* the streamed ``relex extrapolate`` (default on the CPU): its arithmetic differs by design (float64 sums over the
  exact deltas; docs/cli.md), so it is compared with the float32-buffer callback within the derived
  bounds (tests/helpers.py extrapolation_tolerance, from snapshots recorded in float64) and with
  ``relex materialize`` of its own state bitwise;
* (slow) a resumed run: the same training interrupted inside the window, its checkpoint copied with ``cp -r`` and
  the run directory deleted, resumed from the copy: bitwise.

Beside the matrix: (slow) PEFT with and without ``merge_lora`` resumed from a copy, bitwise; (slow, distributed) DDP
and ZeRO-3 with ``exclude`` (2 processes over gloo): the distributed writers' horizon vs ``relex materialize`` of the
sharded state, bitwise; (slow, distributed) FSDP2 the same; PEFT: ``relex materialize`` of a LoRA run's state with the
base model vs the callback's ``step-H/`` and ``step-H-merged/``, bitwise (also with an adapter parameter excluded).
``relex extrapolate --trajectory`` (a ``partial_trajectory/`` and a checkpoint's ``relex_trajectory/``) against a
callback whose window ends at the last saved step: bitwise, include / exclude / the frozen parameter.
Not covered: ``evaluate_horizons`` / ``relex extrapolate`` / a resume for the PEFT cells beyond the resume test below.
"""

import os
import shutil
import json

import pytest
import torch

from relex_callback import evaluate_horizons, RelexCallback
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from grpo import grpo_trainer
from test_callback import Recorder, StopAt, _compare_dirs, read_weights
from helpers import cli_env, run_relex
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_distributed import launch

TCUT = 6
H = 15
H_EVAL = 16  # written by no callback: evaluate_horizons rebuilds it from the state
SNAPS = {}  # the run's trainable parameters in float64 at every step (the float64 reference of the two float32 checks)

# cell -> (callback options, `relex extrapolate` options or None where the CLI cannot say it)
CELLS = {
    "default": ({}, []),
    "include": ({"include": [r"self_attn"]}, None),
    "exclude": ({"exclude": [r"layers\.1\.mlp", r"embed_tokens"]}, None),
    "rank2": ({"rank": 2}, ["--rank", "2"]),
    "power": ({"fit": "power"}, ["--fit", "power"]),
    "log": ({"fit": "log"}, ["--fit", "log"]),
    "polynomial": ({"fit": "polynomial", "degree": 2}, ["--fit", "polynomial", "--degree", "2"]),
    "auto": ({"fit": "auto"}, ["--fit", "auto"]),
    "fit_window": ({"fit_window": 4}, ["--fit-window", "4"]),
    "fit_start": ({"fit_start": 3}, ["--fit-start", "3"]),
    "stride": ({"stride": 2}, ["--stride", "2"]),
    "fold": ({"buffer_slots": 3, "fold_rank": 2}, None),
    "float32": ({"dtype": "float32"}, ["--dtype", "float32"]),
    "shards": ({"max_shard_size": "40KB"}, ["--max-shard-size", "40KB"]),
}
FROZEN = "model.norm.weight"


def _model(tok):
    model = build_model(tok)  # tied embeddings (the toy default)
    model.get_parameter(FROZEN).requires_grad_(False)
    return model


def _callback(cell, out):
    kw, _ = CELLS[cell]
    return RelexCallback(**{"tcut": TCUT, "horizons": [H], "output_dir": str(out), **kw})  # the default bf16 buffer


def _assert_same(a, b, what):
    wa, wb = (read_weights(x) if not isinstance(x, dict) else x for x in (a, b))
    assert sorted(wa) == sorted(wb), (what, sorted(set(wa) ^ set(wb)))
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, (
        f"{what}: {len(bad)} tensors differ, e.g. {bad[0]} by {float((wa[bad[0]] - wb[bad[0]]).abs().max())}"
    )


def _cli(env, *args):
    r = run_relex(*args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths")
    tok = build_tokenizer()
    model = _model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    cbs = {c: _callback(c, out / "relex" / c) for c in CELLS}
    rec = Recorder()
    trainer = grpo_trainer(out, [rec, *cbs.values()], model=model, tok=tok, save_strategy="steps", save_steps=1)
    trainer.train()
    SNAPS.update(rec.snaps)
    assert trainer.state.global_step == TCUT
    for c, cb in cbs.items():  # every step moved: the callback and the checkpoints see the same observations
        assert cb.report["skipped_unchanged_steps"] == [], c
    return out


@pytest.fixture(scope="module")
def env():
    return cli_env()


@pytest.mark.parametrize("cell", list(CELLS))
def test_materialize_and_evaluate_rebuild_equal_the_callback(run, env, tmp_path, cell):
    """`relex materialize` from the cell's state writes the callback's bytes, and `evaluate_horizons` puts into the
    model exactly what `relex materialize` writes for a horizon the run did not write (untracked tensors included:
    trained ones at their tcut values, which the state file records; frozen ones from the base)."""
    kw, _ = CELLS[cell]
    mat = tmp_path / "mat"
    _cli(env, "materialize", "--state", run / "relex" / cell / "relex_state.safetensors", "--base", run / "base",
         "--horizons", f"{H},{H_EVAL}", "--out", mat, *(["--max-shard-size", kw["max_shard_size"]]
                                                         if "max_shard_size" in kw else []))
    _assert_same(run / "relex" / cell / f"step-{H}", mat / f"step-{H}", f"{cell}: callback vs relex materialize")

    from datasets import Dataset

    tok = build_tokenizer()
    trainer = grpo_trainer(tmp_path / "eval", [], model=_model(tok), tok=tok)
    trainer.eval_dataset = Dataset.from_list(arithmetic_problems(4, seed=5))
    seen = {}

    class Seen(Exception):
        pass

    def grab(module, args):  # the weights evaluate_horizons put into the model, at its first forward
        seen.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        raise Seen

    hook = trainer.model.register_forward_pre_hook(grab)
    try:
        with pytest.raises(Seen):
            evaluate_horizons(
                trainer, str(run / "relex" / cell), base=str(run / "base"), horizons=[H_EVAL], write=False
            )
    finally:
        hook.remove()
    want = read_weights(mat / f"step-{H_EVAL}")
    _assert_same({k: seen[k] for k in want}, want, f"{cell}: evaluate_horizons rebuild vs relex materialize")


@pytest.mark.parametrize("cell", [c for c, (_, cli) in CELLS.items() if cli is not None])
def test_cli_extrapolate_buffered_equals_the_callback(run, env, tmp_path, cell):
    """`relex extrapolate --no-streaming` over the checkpoints the trainer saved at every step, with the CLI's
    spelling of the cell's options, writes the callback's bytes."""
    kw, cli = CELLS[cell]
    _cli(env, "extrapolate", "--base", run / "base", "--checkpoints",
         *[run / f"checkpoint-{t}" for t in range(1, TCUT + 1)], "--horizons", H, "--out", tmp_path / "cli",
         "--no-streaming", "--no-progress", *cli)
    # (float32 included: a float32 buffer used to be solved on views of the arena, whose multi-threaded Gram's last
    # bit depended on the arena's width; every float32 CPU pass now copies into a fixed-width scratch)
    _assert_same(run / "relex" / cell / f"step-{H}", tmp_path / "cli" / f"step-{H}",
                 f"{cell}: callback vs relex extrapolate --no-streaming")


def test_cli_extrapolate_streamed_is_its_own_materialize_and_close_to_the_callback(run, env, tmp_path):
    """The streamed CLI (float64 sums over the exact deltas, by design not the buffer's arithmetic) writes what
    `relex materialize` writes from its state, bitwise, and the callback's horizon within the derived bounds."""
    _cli(env, "extrapolate", "--base", run / "base", "--checkpoints", run, "--horizons", H, "--out", tmp_path / "cli",
         "--no-progress", "--dtype", "float32")  # the dtype of the stored directions
    _cli(env, "materialize", "--state", tmp_path / "cli", "--base", run / "base", "--horizons", H, "--out",
         tmp_path / "mat")
    _assert_same(tmp_path / "cli" / f"step-{H}", tmp_path / "mat" / f"step-{H}", "streamed CLI vs its materialize")
    # the streamed CLI's float64 sums are within the float32 bound of the reference too (its directions and
    # theta_0 + delta are rounded to float32, the bound's last term): the two within the sum of their bounds
    _compare_dirs(tmp_path / "cli" / f"step-{H}", run / "relex" / "float32" / f"step-{H}", SNAPS, H,
                  steps=list(range(1, TCUT + 1)))


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(CELLS))
def test_resumed_from_a_copied_checkpoint_equals_the_callback(run, tmp_path, cell):
    """The same training interrupted at step 3, `cp -r` of checkpoint-3, the run directory deleted, resumed from the
    copy: the cell's horizon is the uninterrupted callback's, bitwise."""
    tok = build_tokenizer()
    first = tmp_path / "run"
    grpo_trainer(first, [_callback(cell, first / "relex"), StopAt(3)], model=_model(tok), tok=tok,
                 save_strategy="steps", save_steps=3).train()
    shutil.copytree(first / "checkpoint-3", tmp_path / "copy")
    shutil.rmtree(first)
    again = grpo_trainer(tmp_path / "again", [_callback(cell, tmp_path / "again" / "relex")], model=_model(tok),
                         tok=tok, save_strategy="steps", save_steps=3)
    again.train(resume_from_checkpoint=str(tmp_path / "copy"))
    assert again.state.global_step == TCUT
    _assert_same(run / "relex" / cell / f"step-{H}", tmp_path / "again" / "relex" / f"step-{H}",
                 f"{cell}: callback vs resumed from a copy")


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merge_lora"])
def test_peft_resumed_from_a_copied_checkpoint_equals_the_uninterrupted_run(tmp_path, merge):
    """PEFT: the adapter directory (and with merge_lora the merged model) of a run resumed from a `cp -r` copy equal
    the uninterrupted run's, bitwise."""
    peft = pytest.importorskip("peft")

    def model(tok):
        return peft.get_peft_model(build_model(tok), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))

    def cb(out):
        return RelexCallback(tcut=TCUT, horizons=[H], dtype="float32", merge_lora=merge, output_dir=str(out))

    tok = build_tokenizer()
    grpo_trainer(tmp_path / "full", [cb(tmp_path / "full" / "relex")], model=model(tok), tok=tok).train()
    grpo_trainer(tmp_path / "cut", [cb(tmp_path / "cut" / "relex"), StopAt(3)], model=model(tok), tok=tok,
                 save_strategy="steps", save_steps=3).train()
    shutil.copytree(tmp_path / "cut" / "checkpoint-3", tmp_path / "copy")
    shutil.rmtree(tmp_path / "cut")
    again = grpo_trainer(tmp_path / "again", [cb(tmp_path / "again" / "relex")], model=model(tok), tok=tok)
    again.train(resume_from_checkpoint=str(tmp_path / "copy"))
    for d in [f"step-{H}"] + ([f"step-{H}-merged"] if merge else []):
        _assert_same(tmp_path / "full" / "relex" / d, tmp_path / "again" / "relex" / d, f"PEFT {d}: resumed vs full")


def _lora(tok):
    peft = pytest.importorskip("peft")

    return peft.get_peft_model(build_model(tok), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))


PEFT_CELLS = {"merge_lora": {"merge_lora": True}, "exclude": {"exclude": [r"v_proj\.lora_B"]}}


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """One GRPO run of a LoRA adapter on the tiny model, one callback per PEFT cell (the default bf16 buffer); the
    base model saved as ``base/``."""
    pytest.importorskip("peft")

    out = tmp_path_factory.mktemp("peft")
    tok = build_tokenizer()
    build_model(tok).save_pretrained(out / "base")  # the weights the adapter is applied to (_lora builds the same)
    tok.save_pretrained(out / "base")
    cbs = {c: RelexCallback(tcut=TCUT, horizons=[H], output_dir=str(out / "relex" / c), **kw)
           for c, kw in PEFT_CELLS.items()}
    trainer = grpo_trainer(out, list(cbs.values()), model=_lora(tok), tok=tok)
    trainer.train()
    assert trainer.state.global_step == TCUT
    return out


@pytest.mark.parametrize("cell", list(PEFT_CELLS))
def test_peft_materialize_equals_the_callbacks_adapter_and_merged_model(peft_run, env, tmp_path, cell):
    """`relex materialize` of a LoRA run's state, with the base model, writes the callback's ``step-H/`` (the
    adapter) and, with ``merge_lora``, ``step-H-merged/``, bitwise; an adapter parameter left out by ``exclude`` is
    written at its tcut value, as the callback wrote it. Before, materialize refused every PEFT state ("the base has
    no tensor ...lora_A.default.weight"): the state held neither the adapter's theta_0 (a random init) nor its
    config."""
    relex = peft_run / "relex" / cell
    merged = PEFT_CELLS[cell].get("merge_lora", False)
    assert (relex / f"step-{H}-merged").is_dir() == merged
    _cli(env, "materialize", "--state", relex, "--base", peft_run / "base", "--horizons", f"{H},{H_EVAL}", "--out",
         tmp_path / "mat")
    for d in [f"step-{H}"] + ([f"step-{H}-merged"] if merged else []):
        _assert_same(relex / d, tmp_path / "mat" / d, f"PEFT {cell} {d}: callback vs relex materialize")
    assert sorted(os.listdir(tmp_path / "mat")) == sorted(
        [f"step-{h}" for h in (H, H_EVAL)] + ([f"step-{h}-merged" for h in (H, H_EVAL)] if merged else []))
    if cell == "exclude":  # the untracked adapter parameter: the run's tcut value, not its init
        w = read_weights(relex / f"step-{H}")
        from safetensors.torch import load_file

        st = load_file(relex / "relex_state.safetensors")
        key = next(k for k in st if k.startswith("peft/value/"))
        assert "v_proj.lora_B" in key and float(st[key].abs().sum()) > 0
        assert any(torch.equal(v, st[key]) for k, v in w.items() if "v_proj.lora_B" in k)


def test_peft_materialize_refuses_a_base_that_is_not_the_adapters(peft_run, env, tmp_path):
    """A base model whose frozen weight differs from the one the adapter was trained on is refused (exit 2, one line
    naming the weight) before anything is written: the merged model would not be the run's."""
    base = _perturbed_base(peft_run / "base", tmp_path / "base", "model.layers.0.mlp.down_proj.weight")
    last = _refused(env, "materialize", "--state", peft_run / "relex" / "merge_lora", "--base", base, "--horizons", H,
                    "--out", tmp_path / "mat")
    assert "down_proj" in last and "base" in last, last
    assert not (tmp_path / "mat").exists() or not os.listdir(tmp_path / "mat")


@pytest.mark.parametrize("edit", ["config", "theta0", "frozen_dtype", "values"])
def test_peft_materialize_refuses_an_edited_peft_record(peft_run, env, tmp_path, edit):
    """Every field of a PEFT state's record that materialize reads is checked: an edited or damaged one is refused
    with exit 2 and one line naming the field, before anything is written."""
    src = peft_run / "relex" / "exclude" / "relex_state.safetensors"
    with safe_open(str(src), "pt") as f:
        meta, tensors = json.loads(f.metadata()["relex"]), {k: f.get_tensor(k) for k in f.keys()}
    if edit == "config":
        meta["peft"]["config"] = "lora"
    elif edit == "theta0":
        del tensors[next(k for k in tensors if k.startswith("peft/theta0/"))]
    elif edit == "frozen_dtype":
        next(iter(meta["peft"]["frozen"].values()))["dtype"] = "load"
    else:
        del tensors[next(k for k in tensors if k.startswith("peft/value/"))]
    (tmp_path / "st").mkdir()
    save_file(
        tensors, tmp_path / "st" / "relex_state.safetensors", metadata={"format": "pt", "relex": json.dumps(meta)}
    )
    last = _refused(env, "materialize", "--state", tmp_path / "st", "--base", peft_run / "base", "--horizons", H,
                    "--out", tmp_path / "mat")
    assert "edited or is damaged" in last, last
    assert {"config": "peft.config", "theta0": "theta_0 of the adapter", "frozen_dtype": "peft.frozen",
            "values": "untracked adapter parameter"}[edit] in last, last
    assert not (tmp_path / "mat").exists() or not os.listdir(tmp_path / "mat")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero3", "fsdp2"])
def test_distributed_run_and_materialize_of_its_sharded_state_give_the_same_bytes(tmp_path, env, mode):
    """2 processes over gloo with ``exclude=`` (trained tensors not tracked): the horizon the distributed writers
    wrote and ``relex materialize`` from the sharded state (``relex_state.index.json``) are bitwise equal. The
    untracked tensors' tcut values are recorded in the state shard of the process that writes them; before, the
    sharded state did not have them and materialize wrote theta_0 in their place."""
    tok = build_tokenizer()
    base = tmp_path / "base"
    build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0).save_pretrained(base)  # the script's
    tok.save_pretrained(base)
    run_dir = tmp_path / "run"
    launch(mode, str(run_dir), "--exclude", r"mlp\.up_proj|norm", "--horizons", "12")
    assert (run_dir / "relex" / "relex_state.index.json").is_file()
    _cli(
        env, "materialize", "--state", run_dir / "relex", "--base", base, "--horizons", "12", "--out", tmp_path / "mat"
    )
    _assert_same(run_dir / "relex" / "step-12", tmp_path / "mat" / "step-12", f"{mode}: run vs relex materialize")
    # and the untracked trained tensors are the run's real values at tcut (the script records the full parameters;
    # under ZeRO-3 / FSDP2 they are gathered from every process's shard at write time), not theta_0
    snaps = torch.load(run_dir / "trajectory.pt")["snaps"]
    written = read_weights(run_dir / "relex" / "step-12")
    untracked = [n for n in snaps[6] if "mlp.up_proj" in n or "norm" in n]
    assert untracked and all(torch.equal(written[n], snaps[6][n]) for n in untracked), mode
    assert not torch.equal(snaps[6]["model.layers.0.mlp.up_proj.weight"], snaps[0]["model.layers.0.mlp.up_proj.weight"])


def test_materialize_refuses_a_base_whose_frozen_tensor_is_not_the_runs(run, env, tmp_path):
    """The state file keeps fingerprints of the untracked tensors that come from the base (frozen, buffers): a base
    whose frozen tensor differs from the one the run wrote is refused (exit 2, one line naming it) before anything
    is written, instead of writing a horizon that is not the run's."""
    base = _perturbed_base(run / "base", tmp_path / "base", FROZEN)
    last = _refused(env, "materialize", "--state", run / "relex" / "default", "--base", base, "--horizons", H, "--out",
                    tmp_path / "mat")
    assert FROZEN in last and "untracked" in last, last
    assert not (tmp_path / "mat").exists() or not os.listdir(tmp_path / "mat")


# ------------------------------------------------------------------- relex extrapolate --trajectory ---------------
# A window the callback saved instead of extrapolating: ``partial_trajectory/`` of a run that ended before tcut, and a
# checkpoint's ``relex_trajectory/``. The same window solved by a callback whose tcut is the last saved step is the
# reference. Cells: the frozen parameter is the only untracked tensor ("default"), and trained tensors left untracked
# by include / exclude.
T_PART = TCUT - 1
TRAJ_CELLS = ["default", "include", "exclude"]


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """One GRPO run stopped at step T_PART: per cell, a callback with tcut=T_PART (the reference) and one with
    tcut=TCUT that keeps its recorded steps in ``partial_trajectory/``. ``checkpoint-T_PART/relex_trajectory/`` is
    the exclude cell's: the first callback to save there (a later one does not write into another window's)."""
    out = tmp_path_factory.mktemp("partial")
    tok = build_tokenizer()
    model = _model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    cbs = []
    for c in sorted(TRAJ_CELLS, key=lambda c: c != "exclude"):
        kw = CELLS[c][0]
        cbs.append(RelexCallback(tcut=T_PART, horizons=[H], output_dir=str(out / "ref" / c), **kw))
        cbs.append(RelexCallback(tcut=TCUT, horizons=[H], output_dir=str(out / "cut" / c), **kw))
    trainer = grpo_trainer(out, cbs + [StopAt(T_PART)], model=model, tok=tok, save_strategy="steps",
                           save_steps=T_PART)
    trainer.train()
    assert trainer.state.global_step == T_PART
    for c in TRAJ_CELLS:
        assert (out / "ref" / c / f"step-{H}").is_dir() and (out / "cut" / c / "partial_trajectory").is_dir(), c
    return out


def _tracked(traj):
    with open(os.path.join(traj, "trajectory.json")) as f:
        return sorted(d["name"] for d in json.load(f)["specs"])


@pytest.mark.parametrize("cell", TRAJ_CELLS)
def test_cli_extrapolate_partial_trajectory_equals_the_callback(partial, env, tmp_path, cell):
    """`relex extrapolate --trajectory <out>/partial_trajectory` writes the bytes a callback with that window writes,
    untracked tensors included (trained ones at their values at the last recorded step, not the base's), and
    `relex materialize` of its state writes them again."""
    _cli(env, "extrapolate", "--trajectory", partial / "cut" / cell / "partial_trajectory", "--base",
         partial / "base", "--horizons", H, "--out", tmp_path / "cli")
    _assert_same(partial / "ref" / cell / f"step-{H}", tmp_path / "cli" / f"step-{H}",
                 f"{cell}: callback vs relex extrapolate --trajectory partial_trajectory")
    _cli(env, "materialize", "--state", tmp_path / "cli", "--base", partial / "base", "--horizons", H, "--out",
         tmp_path / "mat")
    _assert_same(partial / "ref" / cell / f"step-{H}", tmp_path / "mat" / f"step-{H}",
                 f"{cell}: callback vs relex materialize of the --trajectory state")


def test_cli_extrapolate_checkpoint_trajectory_equals_the_callback(partial, env, tmp_path):
    """`relex extrapolate --trajectory checkpoint-N/relex_trajectory` takes the untracked tensors from the
    checkpoint's weights beside it (the model at step N): the callback's bytes."""
    traj = partial / f"checkpoint-{T_PART}" / "relex_trajectory"
    assert _tracked(traj) == _tracked(partial / "cut" / "exclude" / "partial_trajectory")  # the exclude cell's
    _cli(env, "extrapolate", "--trajectory", traj, "--base", partial / "base", "--horizons", H, "--out",
         tmp_path / "cli")
    _assert_same(partial / "ref" / "exclude" / f"step-{H}", tmp_path / "cli" / f"step-{H}",
                 "exclude: callback vs relex extrapolate --trajectory checkpoint's relex_trajectory")


def _perturbed_base(src, dst, key):
    """A copy of the base ``src`` at ``dst`` whose tensor ``key`` is moved by 0.5: a base the run did not start from."""
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    w[key] = w[key] + 0.5
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _refused(env, *args) -> str:
    r = run_relex(*args, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("relex: error:"), r.stderr[-3000:]
    assert not any(ln.startswith("Traceback") for ln in lines), r.stderr[-3000:]
    return lines[-1]


def test_cli_extrapolate_trajectory_refuses_what_would_not_be_the_runs(partial, env, tmp_path):
    """Never theta_0 for a trained tensor, never a frozen tensor the run did not have: a trajectory without the
    untracked values (copied away from its checkpoint), a checkpoint of another step given for them, and a base whose
    frozen tensor differs are each refused, exit 2, one line naming the tensors and what to pass, nothing written."""
    lone = tmp_path / "lone"  # a checkpoint's relex_trajectory/ copied away from its weights
    shutil.copytree(partial / f"checkpoint-{T_PART}" / "relex_trajectory", lone)
    last = _refused(env, "extrapolate", "--trajectory", lone, "--base", partial / "base", "--horizons", H,
                    "--out", tmp_path / "o1")
    assert "embed_tokens" in last and "--untracked-from" in last, last
    # the checkpoint beside it is the one to pass: then the callback's bytes
    _cli(env, "extrapolate", "--trajectory", lone, "--base", partial / "base", "--horizons", H, "--out",
         tmp_path / "ok", "--untracked-from", partial / f"checkpoint-{T_PART}")
    _assert_same(partial / "ref" / "exclude" / f"step-{H}", tmp_path / "ok" / f"step-{H}", "--untracked-from")
    # the base (theta_0) is not the model at the last recorded step
    last = _refused(env, "extrapolate", "--trajectory", lone, "--base", partial / "base", "--horizons", H,
                    "--out", tmp_path / "o2", "--untracked-from", partial / "base")
    assert f"step {T_PART}" in last and "--untracked-from" in last, last
    # a base whose frozen tensor is not the run's
    base = _perturbed_base(partial / "base", tmp_path / "base", FROZEN)
    for cell in ("default", "exclude"):
        last = _refused(env, "extrapolate", "--trajectory", partial / "cut" / cell / "partial_trajectory", "--base",
                        base, "--horizons", H, "--out", tmp_path / f"o3{cell}")
        assert FROZEN in last, last
    # only the frozen parameter untracked, its value not kept (an older partial_trajectory/): refused, and with
    # --untracked-frozen (the user's word that none was trained) the callback's bytes
    old = tmp_path / "old"
    shutil.copytree(partial / "cut" / "default" / "partial_trajectory", old)
    os.remove(old / "untracked.safetensors")
    last = _refused(env, "extrapolate", "--trajectory", old, "--base", partial / "base", "--horizons", H, "--out",
                    tmp_path / "o5")
    assert FROZEN in last and "--untracked-frozen" in last, last
    _cli(env, "extrapolate", "--trajectory", old, "--base", partial / "base", "--horizons", H, "--out",
         tmp_path / "frozen", "--untracked-frozen")
    _assert_same(partial / "ref" / "default" / f"step-{H}", tmp_path / "frozen" / f"step-{H}", "--untracked-frozen")
    # another window's untracked.safetensors beside this trajectory (the include cell's, same step, other run id)
    mixed = tmp_path / "mixed"
    shutil.copytree(partial / "cut" / "exclude" / "partial_trajectory", mixed)
    shutil.copy(partial / "cut" / "include" / "partial_trajectory" / "untracked.safetensors", mixed)
    last = _refused(env, "extrapolate", "--trajectory", mixed, "--base", partial / "base", "--horizons", H, "--out",
                    tmp_path / "o4")
    assert "untracked.safetensors" in last and "run" in last, last
    for o in ("o1", "o2", "o3default", "o3exclude", "o4", "o5"):
        assert not (tmp_path / o).exists() or not os.listdir(tmp_path / o), o
