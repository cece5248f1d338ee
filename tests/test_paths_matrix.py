"""Every path to a horizon gives the same bytes (issue 20, class 2), one matrix over the options that change what is
written, each cell comparing the paths tensor by tensor with ``torch.equal``.

One real TRL GRPOTrainer run on the tiny local model (tied embeddings, one frozen parameter, a checkpoint saved at
every step) carries one ``RelexCallback`` per option cell, each with its own output directory. For each cell:

* the callback's ``step-H`` (the reference);
* ``relex materialize`` (the CLI as a subprocess) from the cell's state file and the base: bitwise;
* ``evaluate_horizons`` rebuilding a horizon that has no directory from the state and the base: the weights it puts
  into the trainer's model equal ``relex materialize``'s for that horizon, bitwise;
* ``relex extrapolate --no-streaming`` on the run's checkpoints with the CLI's spelling of the cell's options, where
  the CLI has them (the buffered CLI fills the same bf16 trajectory buffer from the checkpoints the trainer saved in
  float32: bitwise; with a float32 buffer within the float32 solve's derived bound, see the test);
* the streamed ``relex extrapolate`` (default on the CPU): its arithmetic differs by design (float64 sums over the
  exact deltas; README "Command line"), so it is compared with the float32-buffer callback within the derived
  bounds (tests/helpers.py extrapolation_tolerance, from snapshots recorded in float64) and with
  ``relex materialize`` of its own state bitwise;
* (slow) a resumed run: the same training interrupted inside the window, its checkpoint copied with ``cp -r`` and
  the run directory deleted, resumed from the copy: bitwise.

Beside the matrix: (slow) PEFT with and without ``merge_lora`` resumed from a copy, bitwise; (slow, distributed) DDP
and ZeRO-3 with ``exclude`` (2 processes over gloo): the distributed writers' horizon vs ``relex materialize`` of the
sharded state, bitwise. Not covered: ``relex materialize`` for a PEFT state (it needs an adapter base), FSDP2, and
``relex extrapolate --trajectory`` with include/exclude (it takes untracked tensors from ``--base``).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from relex_callback import RelexCallback
from test_callback import Recorder, StopAt, _compare_dirs, grpo_trainer, read_weights

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
    from relex_callback.examples.toy import build_model

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
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[0]} by {float((wa[bad[0]] - wb[bad[0]]).abs().max())}"


def _cli(env, *args):
    r = subprocess.run([sys.executable, "-m", "relex_callback.offline.cli", *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from relex_callback.examples.toy import build_tokenizer

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
    e = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e["PYTHONPATH"] = repo + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


@pytest.mark.parametrize("cell", list(CELLS))
def test_materialize_and_evaluate_rebuild_equal_the_callback(run, env, tmp_path, cell):
    """`relex materialize` from the cell's state writes the callback's bytes, and `evaluate_horizons` puts into the
    model exactly what `relex materialize` writes for a horizon the run did not write (untracked tensors included:
    trained ones at their tcut values, which the state file records; frozen ones from the base)."""
    from relex_callback import evaluate_horizons

    kw, _ = CELLS[cell]
    mat = tmp_path / "mat"
    _cli(env, "materialize", "--state", run / "relex" / cell / "relex_state.safetensors", "--base", run / "base",
         "--horizons", f"{H},{H_EVAL}", "--out", mat, *(["--max-shard-size", kw["max_shard_size"]]
                                                         if "max_shard_size" in kw else []))
    _assert_same(run / "relex" / cell / f"step-{H}", mat / f"step-{H}", f"{cell}: callback vs relex materialize")

    from datasets import Dataset
    from relex_callback.examples.toy import arithmetic_problems, build_tokenizer

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
            evaluate_horizons(trainer, str(run / "relex" / cell), base=str(run / "base"), horizons=[H_EVAL], write=False)
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
    if cell != "float32":
        _assert_same(run / "relex" / cell / f"step-{H}", tmp_path / "cli" / f"step-{H}",
                     f"{cell}: callback vs relex extrapolate --no-streaming")
        return
    # A float32 buffer is solved on a view of the arena, and the multi-threaded float32 Gram's last bit depends on
    # the arena's width: the CLI tracks every floating tensor of the base (the frozen one too), the callback the
    # trainable ones (measured: 5 of 21 tensors 1 ulp apart with 2 threads, equal with 1). A fixed-width copy made
    # it bitwise but the float32 Gram 2.4x slower. Each is within its float32 solve's bound of the float64 reference
    # of the recorded snapshots (tests/helpers.py extrapolation_tolerance), so within twice that of each other; the
    # frozen tensor (theta_0 both ways) bitwise.
    _compare_dirs(tmp_path / "cli" / f"step-{H}", run / "relex" / cell / f"step-{H}", SNAPS, H,
                  steps=list(range(1, TCUT + 1)))


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
    from relex_callback.examples.toy import build_tokenizer

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
    from relex_callback.examples.toy import build_model, build_tokenizer

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


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_distributed_run_and_materialize_of_its_sharded_state_give_the_same_bytes(tmp_path, env, mode):
    """2 processes over gloo with ``exclude=`` (trained tensors not tracked): the horizon the distributed writers
    wrote and ``relex materialize`` from the sharded state (``relex_state.index.json``) are bitwise equal. The
    untracked tensors' tcut values are recorded in the state shard of the process that writes them; before, the
    sharded state did not have them and materialize wrote theta_0 in their place."""
    from test_distributed import launch

    from relex_callback.examples.toy import build_model, build_tokenizer

    tok = build_tokenizer()
    base = tmp_path / "base"
    build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0).save_pretrained(base)  # the script's
    tok.save_pretrained(base)
    run_dir = tmp_path / "run"
    launch(mode, str(run_dir), "--exclude", r"mlp\.up_proj|norm", "--horizons", "12", "--record-until", "0")
    assert (run_dir / "relex" / "relex_state.index.json").is_file()
    _cli(env, "materialize", "--state", run_dir / "relex", "--base", base, "--horizons", "12", "--out", tmp_path / "mat")
    _assert_same(run_dir / "relex" / "step-12", tmp_path / "mat" / "step-12", f"{mode}: run vs relex materialize")


def test_materialize_refuses_a_base_whose_frozen_tensor_is_not_the_runs(run, env, tmp_path):
    """The state file keeps fingerprints of the untracked tensors that come from the base (frozen, buffers): a base
    whose frozen tensor differs from the one the run wrote is refused (exit 2, one line naming it) before anything
    is written, instead of writing a horizon that is not the run's."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(run / "base", base)
    w = load_file(base / "model.safetensors")
    w[FROZEN] = w[FROZEN] + 0.5
    save_file(w, base / "model.safetensors", metadata={"format": "pt"})
    r = subprocess.run([sys.executable, "-m", "relex_callback.offline.cli", "materialize", "--state",
                        str(run / "relex" / "default"), "--base", str(base), "--horizons", str(H), "--out",
                        str(tmp_path / "mat")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("relex: error:") and FROZEN in last and "untracked" in last, last
    assert not (tmp_path / "mat").exists() or not os.listdir(tmp_path / "mat")
