"""RelexCallback on real trainers (TRL GRPOTrainer, transformers Trainer) on CPU with the tiny local model.

Every expected value is computed here, independently of the engine: a small recording callback keeps the
parameters at each optimizer step, and a float64 SVD + least-squares line gives the reference extrapolation.
"""

import json
import os
import shutil

import pytest

from relex_callback.config import RelexSettings
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from relex_callback import RelexCallback, RelexConfig, RelexInputError
from helpers import (U32, compare_weights, direction_tolerance, dot_error_bound, extrapolation_tolerance,
                     float64_reference, run_relex)

from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from grpo import grpo_trainer

TCUT = 6
HORIZONS = [12, 20]


# ------------------------------------------------------------------------------------------------ helpers
class Recorder(TrainerCallback):
    """Records every trainable parameter (float64 copy) at train begin (step 0) and at each step end."""

    def __init__(self):
        self.snaps = {}

    def _grab(self, model):
        return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.snaps.setdefault(state.global_step, self._grab(model))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.snaps[state.global_step] = self._grab(model)


class StopAt(TrainerCallback):
    """Interrupts training at ``step`` (after the checkpoint of that step is saved by the trainer)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def reference(snaps: dict, steps, horizon: int) -> dict:
    """theta_0 + (a H + b) v per tensor, in float64, from the recorded snapshots (helpers.float64_reference)."""
    return float64_reference(snaps, steps, horizon)


def assert_matches_reference(got: dict, snaps: dict, steps, horizon: int, names):
    """Each tensor of ``got`` (weights at ``horizon``) equals the float64 reference to the float32 solve's bound
    derived from that tensor's singular values (tests/helpers.py ``extrapolation_tolerance``), relative to the
    extrapolated move; a tensor that did not move is theta_0 exactly."""
    ref = reference(snaps, steps, horizon)
    for n in names:
        t0 = snaps[0][n]
        M = torch.stack([(snaps[t][n] - t0).reshape(-1) for t in steps])
        tol = extrapolation_tolerance(M, steps, horizon, theta0_norm=float(t0.norm()))
        err = float((got[n].detach().double().reshape(t0.shape) - ref[n]).norm())
        assert err <= tol * float((ref[n] - t0).norm()), (n, err, tol)


def read_weights(d: str) -> dict:
    out = {}
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, fn)))
    return out



# ------------------------------------------------------------------------------------- one shared GRPO run
@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """GRPO with tcut=6 (fp32 buffer), a full checkpoint at every step, and theta_0 saved as ``base/``."""
    out = tmp_path_factory.mktemp("grpo")
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    rec = Recorder()
    cb = RelexCallback(tcut=TCUT, horizons=HORIZONS, dtype="float32")
    trainer = grpo_trainer(out, [rec, cb], model=model, tok=tok, save_strategy="steps", save_steps=1)
    trainer.train()
    return {"out": out, "trainer": trainer, "rec": rec, "cb": cb, "relex": out / "relex"}


def test_stops_at_tcut_and_writes_everything(grpo_run):
    assert grpo_run["trainer"].state.global_step == TCUT
    assert sorted(grpo_run["rec"].snaps) == list(range(TCUT + 1))
    names = sorted(os.listdir(grpo_run["relex"]))
    for expected in ["step-12", "step-20", "relex_state.safetensors", "report.json"]:
        assert expected in names
    assert not [n for n in names if n.startswith(".")], f"temporaries left behind: {names}"
    report = json.load(open(grpo_run["relex"] / "report.json"))
    assert report["tcut"] == TCUT and report["steps"] == list(range(1, TCUT + 1))
    assert report["summary"]["tensors_moving"] == report["summary"]["tensors"] > 0


def test_weights_match_float64_reference(grpo_run):
    rec = grpo_run["rec"]
    steps = list(range(1, TCUT + 1))
    tracked = [s["name"] for s in json.load(open(grpo_run["relex"] / "report.json"))["tensors"]]
    assert sorted(tracked) == sorted(rec.snaps[0])
    for h in HORIZONS:
        ref = reference(rec.snaps, steps, h)
        got = read_weights(grpo_run["relex"] / f"step-{h}")
        for name in tracked:
            assert got[name].dtype == torch.float32
            # the extrapolated move itself, to the float32 solve's bound derived from this tensor's singular values
            # (tests/helpers.py extrapolation_tolerance), not to a figure one machine printed
            t0 = rec.snaps[0][name]
            M = torch.stack([(rec.snaps[t][name] - t0).reshape(-1) for t in steps])
            moved = ref[name] - t0
            tol = extrapolation_tolerance(M, steps, h, theta0_norm=float(t0.norm()))
            assert float((got[name].double() - ref[name]).norm()) <= tol * float(moved.norm()), (name, tol)


def test_horizons_load_and_generate(grpo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for h in HORIZONS:
        d = grpo_run["relex"] / f"step-{h}"
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        # tied weights stay tied, and the loaded embedding is the written one
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(model.model.embed_tokens.weight, read_weights(d)["model.embed_tokens.weight"])
        enc = tok(["3+4=", "1+1="], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert gen.shape[0] == 2 and gen.shape[1] > enc["input_ids"].shape[1]


def test_relex_metrics_in_log_history(grpo_run):
    logs = [e for e in grpo_run["trainer"].state.log_history if any(k.startswith("relex/") for k in e)]
    assert len(logs) == 1
    log = logs[0]
    assert log["step"] == TCUT
    for k in ["relex/explained_variance_mean", "relex/explained_variance_min", "relex/r2_mean",
              "relex/solve_seconds", "relex/buffer_bytes"]:
        assert k in log, k
    rep = json.load(open(grpo_run["relex"] / "report.json"))
    assert log["relex/explained_variance_mean"] == pytest.approx(rep["summary"]["explained_variance_mean"])
    assert 0 < log["relex/explained_variance_min"] <= log["relex/explained_variance_mean"] <= 1


def _compare_dirs(a, b, snaps_a, horizon, snaps_b=None, steps=None):
    """Two horizon checkpoints of the same run computed two ways (offline, the CLI, a resumed run): each within its
    float32 solve's bound of the float64 reference of its own recorded snapshots (helpers.compare_weights, which
    prints the margin); untracked tensors bitwise."""
    compare_weights(read_weights(a), read_weights(b), snaps_a, horizon, steps or list(range(1, TCUT + 1)),
                    snaps_b=snaps_b, label=os.path.basename(str(a)))


def test_equals_offline_finalize_over_checkpoints(grpo_run, tmp_path):
    """The callback's result equals the offline computation over the checkpoints saved at every step of the same
    run (pipeline.finalize over a store filled from the checkpoint directories); ``test_equals_cli_extrapolate``
    below checks the same through `relex extrapolate`."""
    from relex_callback.trajectory.store import TrajectoryStore
    from relex_callback.pipeline.finalize import finalize
    from relex_callback.files.writers import FullModelWriter
    from relex_callback.params import TensorSpec
    from relex_callback.files.checkpoints import DirectorySource

    out = grpo_run["out"]
    base = DirectorySource(str(out / "base"))
    tracked = [s["name"] for s in json.load(open(grpo_run["relex"] / "report.json"))["tensors"]]
    specs = [TensorSpec(n, base.meta[n][0], base.meta[n][1], base.get(n).numel()) for n in tracked]
    store = TrajectoryStore(specs, TCUT, dtype="float32", storage="host")
    store.set_theta0([base.get(n) for n in tracked])
    for t in range(1, TCUT + 1):
        src = DirectorySource(str(out / f"checkpoint-{t}"))
        store.snapshot(t, [src.get(n) for n in tracked])
    finalize(store, FullModelWriter(base), RelexSettings(tcut=TCUT, horizons=tuple(HORIZONS)),
             out_dir=str(tmp_path / "offline"))
    for h in HORIZONS:
        _compare_dirs(tmp_path / "offline" / f"step-{h}", grpo_run["relex"] / f"step-{h}", grpo_run["rec"].snaps, h)


def test_equals_cli_extrapolate(grpo_run, tmp_path, subprocess_env):
    """`relex extrapolate` over the per-step checkpoints writes the same weights as the callback."""
    out = grpo_run["out"]
    ckpts = [str(out / f"checkpoint-{t}") for t in range(1, TCUT + 1)]
    r = run_relex("extrapolate", "--base", out / "base", "--checkpoints", *ckpts, "--horizons",
                  ",".join(map(str, HORIZONS)), "--out", tmp_path / "cli", "--dtype", "float32", env=subprocess_env)
    assert r.returncode == 0, r.stderr[-3000:]
    for h in HORIZONS:
        _compare_dirs(tmp_path / "cli" / f"step-{h}", grpo_run["relex"] / f"step-{h}", grpo_run["rec"].snaps, h)


def test_checkpoints_carry_the_window(grpo_run):
    """Every checkpoint inside the window holds theta_0 and the rows recorded so far, for resume."""
    from relex_callback.trajectory.persist import META_FILE

    d = grpo_run["out"] / "checkpoint-3" / "relex_trajectory"
    meta = json.load(open(d / META_FILE))
    assert meta["steps"] == [1, 2, 3]
    theta0 = load_file(d / "theta0.safetensors")["theta0"]
    rec0 = grpo_run["rec"].snaps[0]
    first = meta["specs"][0]
    got = theta0[first["offset"] : first["offset"] + first["local_numel"]]
    assert torch.equal(got.double(), rec0[first["name"]].reshape(-1))


def test_resume_after_tcut_does_nothing_twice(grpo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(grpo_run["out"], run)
    before = {p: os.stat(run / "relex" / p).st_mtime_ns for p in os.listdir(run / "relex")}
    cb = RelexCallback(tcut=TCUT, horizons=HORIZONS, dtype="float32")  # overwrite=False: writing again would raise
    trainer = grpo_trainer(run, [cb], max_steps=TCUT + 2)
    trainer.train(resume_from_checkpoint=str(run / f"checkpoint-{TCUT}"))
    assert trainer.state.global_step == TCUT + 2
    assert {p: os.stat(run / "relex" / p).st_mtime_ns for p in os.listdir(run / "relex")} == before
    assert not any(k.startswith("relex/") for e in trainer.state.log_history[-3:] for k in e)


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_resume_in_window_equals_uninterrupted(tmp_path, storage):
    kw = dict(tcut=TCUT, horizons=[15], dtype="float32", storage=storage)
    rec_full, rec_first = Recorder(), Recorder()
    full = grpo_trainer(tmp_path / "full", [rec_full, RelexCallback(**kw)], save_strategy="steps", save_steps=3)
    full.train()
    rec = Recorder()
    first = grpo_trainer(tmp_path / "cut", [rec_first, RelexCallback(**kw), StopAt(4)], save_strategy="steps",
                         save_steps=3)
    first.train()
    assert first.state.global_step == 4 and not (tmp_path / "cut" / "relex" / "step-15").exists()
    cb = RelexCallback(**kw)
    again = grpo_trainer(tmp_path / "cut", [cb, rec], save_strategy="steps", save_steps=3)
    again.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert again.state.global_step == TCUT
    assert sorted(rec.snaps) == [3, 4, 5, 6]  # resumed at 3: steps 4..6 trained again
    rep = json.load(open(tmp_path / "cut" / "relex" / "report.json"))
    assert rep["steps"] == list(range(1, TCUT + 1)) and rep["storage"] == storage
    # after a successful window the run's trajectory files are removed (the state file holds the result); the trainer
    # checkpoint inside the window keeps its own links to them for a later resume
    assert not (tmp_path / "cut" / "relex" / "trajectory" / "trajectory.bin").exists()
    saved = tmp_path / "cut" / "checkpoint-3" / "relex_trajectory"
    files = json.load(open(saved / "trajectory.json"))["files"]
    assert sum(e["rows"] for e in files) == 3 and all((saved / e["file"]).is_file() for e in files)
    # the cut run's trajectory: steps 0..3 as the first part recorded them, 4..6 as the resumed part did
    cut = {t: (rec_first.snaps[t] if t <= 3 else rec.snaps[t]) for t in range(TCUT + 1)}
    same = all(torch.equal(cut[t][n], rec_full.snaps[t][n]) for t in cut for n in cut[t])
    print(f"resume ({storage}): trajectory bitwise equal to the uninterrupted one: {same}")
    _compare_dirs(tmp_path / "cut" / "relex" / "step-15", tmp_path / "full" / "relex" / "step-15", cut, 15,
                  snaps_b=rec_full.snaps)
    # the state's directions: each within direction_tolerance of its trajectory's float64 top direction
    a = load_file(tmp_path / "cut" / "relex" / "relex_state.safetensors")
    b = load_file(tmp_path / "full" / "relex" / "relex_state.safetensors")
    assert sorted(a) == sorted(b)
    steps = list(range(1, TCUT + 1))
    for k in b:
        if k not in cut[0]:
            assert torch.equal(a[k], b[k]), k
            continue
        bound, ref = 0.0, []
        for snaps in (cut, rec_full.snaps):
            M = torch.stack([(snaps[t][k] - snaps[0][k]).reshape(-1) for t in steps])
            bound += direction_tolerance(M)
            ref.append(torch.linalg.svd(M, full_matrices=False)[2][0])
        bound += min(float((ref[0] - ref[1]).norm()), float((ref[0] + ref[1]).norm()))
        va, vb = a[k].double().reshape(-1), b[k].double().reshape(-1)
        err = min(float((va - vb).norm()), float((va + vb).norm()))
        assert err <= bound, (k, err, bound)


def test_resume_without_trajectory_is_refused(tmp_path):
    first = grpo_trainer(tmp_path, [StopAt(3)], save_strategy="steps", save_steps=3)
    first.train()
    trainer = grpo_trainer(tmp_path, [RelexCallback(tcut=TCUT, horizons=[15])])
    with pytest.raises(RelexInputError, match="theta_0 is unknown"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


# ------------------------------------------------------------------------------------------- validation
def test_validation_mode(tmp_path):
    rec = Recorder()
    cb = RelexCallback(tcut=4, horizons=[6, 9], dtype="float32", stop_training=False)
    trainer = grpo_trainer(tmp_path, [rec, cb], max_steps=9)
    trainer.train()
    assert trainer.state.global_step == 9
    rep = json.load(open(tmp_path / "relex" / "report.json"))
    assert sorted(rep["validation"]) == ["6", "9"]
    worst = 0.0
    for h in (6, 9):
        written = read_weights(tmp_path / "relex" / f"step-{h}")
        by_name = {t["name"]: t for t in rep["validation"][str(h)]["tensors"]}
        assert sorted(by_name) == sorted(rec.snaps[0])
        for name, t0 in rec.snaps[0].items():
            real = (rec.snaps[h][name] - t0).flatten()
            pred = (written[name].double() - t0).flatten()
            cos = float(real @ pred / (real.norm() * pred.norm()))
            # the callback forms both deltas by a float32 subtraction (each entry within u of the exact one, so each
            # vector within u of its norm: each direction turns by <= ~u) and sums in float64 (n terms, ~n 2^-53
            # relative): |d cos| <= 2u (1 + u) + 3 n 2^-53 and the ratio within 2u + 3 n 2^-53 relative (was 1e-5)
            n = real.numel()
            tol = 2 * U32 * (1 + U32) + 3 * n * 2.0**-53
            assert abs(by_name[name]["cosine"] - cos) <= tol, (name, by_name[name]["cosine"] - cos, tol)
            ratio = float(pred.norm() / real.norm())
            assert abs(by_name[name]["norm_ratio"] - ratio) <= tol * ratio, (name, by_name[name]["norm_ratio"], ratio)
            worst = max(
                worst, abs(by_name[name]["cosine"] - cos) / tol, abs(by_name[name]["norm_ratio"] / ratio - 1) / tol
            )
        log = [e for e in trainer.state.log_history if f"relex/validation/{h}/cosine_mean" in e]
        assert len(log) == 1 and log[0]["step"] == h
        assert log[0][f"relex/validation/{h}/cosine_mean"] == pytest.approx(
            rep["validation"][str(h)]["summary"]["cosine_mean"]
        )
    print(f"validation figures: max error / bound {worst:.2e}")
    # the trajectory is close to linear over so few steps: the extrapolated move points the right way
    assert rep["validation"]["6"]["summary"]["cosine_global"] > 0.5


def test_validation_resumes_after_tcut(tmp_path):
    """Validation mode killed after tcut and resumed from a checkpoint: the remaining horizon is still compared,
    with the same figures as an uninterrupted run (theta_0 and the state travel in the checkpoint)."""
    kw = dict(tcut=4, horizons=[6, 9], dtype="float32", stop_training=False)
    rec_full, rec_last = Recorder(), Recorder()
    full = grpo_trainer(tmp_path / "full", [RelexCallback(**kw), rec_full], max_steps=9)
    full.train()
    # (a resumed trainer keeps the checkpoint's save_steps, so the first run sets the one the resumed run needs)
    first = grpo_trainer(tmp_path / "cut", [RelexCallback(**kw), StopAt(7)], max_steps=9, save_strategy="steps",
                         save_steps=1)
    first.train()
    assert first.state.global_step == 7
    rep = json.load(open(tmp_path / "cut" / "relex" / "report.json"))
    assert sorted(rep["validation"]) == ["6"]  # 9 not reached yet
    want = json.load(open(tmp_path / "full" / "relex" / "report.json"))["validation"]

    def check_9():
        got = json.load(open(tmp_path / "cut" / "relex" / "report.json"))["validation"]
        assert "9" in got
        a = {t["name"]: t for t in got["9"]["tensors"]}
        b = {t["name"]: t for t in want["9"]["tensors"]}
        assert sorted(a) == sorted(b)
        # equal, not approx (was abs / rel 1e-6): the weights at step 9 are the uninterrupted run's bit for bit (the
        # resumed trainer restores model, optimizer and RNG states; asserted), theta_0 travels in the checkpoint and
        # the resumed run predicts from the state it loaded, the same float32 directions and float64 line as the
        # in-memory result (exact round trip), through the same extrapolate_piece: the same arithmetic on the same bits
        for n, w in rec_full.snaps[9].items():
            assert torch.equal(w, rec_last.snaps[9][n]), n
        for name in b:
            assert a[name]["cosine"] == b[name]["cosine"], name
            assert a[name]["norm_ratio"] == b[name]["norm_ratio"], name

    # resumed run: also saves checkpoint-8, which carries the state it loaded (RelexState.save) on
    again = grpo_trainer(tmp_path / "cut", [RelexCallback(**kw), StopAt(8)], max_steps=9, save_strategy="steps",
                         save_steps=1)
    again.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-7"))
    assert again.state.global_step == 8
    # and a second resume, from that checkpoint, still validates step 9 like the uninterrupted run
    last = grpo_trainer(tmp_path / "cut", [RelexCallback(**kw), rec_last], max_steps=9, save_strategy="no")
    last.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    assert last.state.global_step == 9
    check_9()


# ------------------------------------------------------------------------------------------------- PEFT
def test_lora_adapter_horizons(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = peft.get_peft_model(
        build_model(tok),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    rec = Recorder()
    cb = RelexCallback(tcut=4, horizons=[10], dtype="float32", merge_lora=True)
    trainer = grpo_trainer(tmp_path, [rec, cb], model=model, tok=tok)
    trainer.train()
    assert trainer.state.global_step == 4
    rep = json.load(open(tmp_path / "relex" / "report.json"))
    tracked = [t["name"] for t in rep["tensors"]]
    assert tracked and all("lora_" in n for n in tracked) and rep["format"] == "peft_adapter"
    # the live adapter was restored exactly after writing
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach().double(), rec.snaps[4][n]), n
    d = tmp_path / "relex" / "step-10"
    assert (d / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(build_model(tok), str(d))
    assert_matches_reference(dict(loaded.named_parameters()), rec.snaps, [1, 2, 3, 4], 10, tracked)
    enc = tok(["2+2="], return_tensors="pt")
    assert loaded.generate(**enc, max_new_tokens=2, do_sample=False).shape[1] > enc["input_ids"].shape[1]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "relex" / "step-10-merged")
    # (was atol 1e-6) both merges compute fl(W + s fl(B A)) from the same float32 W, A, B (the callback on its live
    # adapter, here on the written one: the same values); s = alpha / r = 2 scales exactly, B A (r = 4 terms) may
    # round differently on another operand layout (dot_error_bound each), and each sum rounds once (u |result|).
    # Frozen, unmerged tensors: bitwise.
    bounds = {}
    for name, mod in loaded.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
            s = float(mod.scaling["default"])
            bounds[name.removeprefix("base_model.model.") + ".weight"] = 2 * s * dot_error_bound(B, A.T)
    assert bounds
    expect = loaded.merge_and_unload()
    worst = 0.0
    for (n, p), (n2, q) in zip(merged.named_parameters(), expect.named_parameters()):
        assert n == n2, (n, n2)
        if n not in bounds:
            assert torch.equal(p, q), n
            continue
        p64, q64 = p.detach().double(), q.detach().double()
        bound = bounds[n] + U32 * (1 + U32) * (p64.abs() + q64.abs())
        err = (p64 - q64).abs()
        assert bool((err <= bound).all()), (n, float(err.max()), float(bound.min()))
        worst = max(worst, float((err / bound).max()))
    print(f"merged vs merge_and_unload: max error / bound {worst:.2e} ({len(bounds)} merged tensors)")


# ------------------------------------------------------------------------------ plain Trainer, accumulation
def test_plain_trainer_sft_with_gradient_accumulation(tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = build_tokenizer()
    texts = [p["prompt"] + p["answer"] + tok.eos_token for p in arithmetic_problems(64, seed=2)]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3,
                             learning_rate=3e-3, lr_scheduler_type="constant", max_steps=40, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    rec = Recorder()
    micro = []

    class CountMicro(TrainerCallback):
        def on_substep_end(self, *a, **k):
            micro.append(1)

    tok.padding_side = "right"
    trainer = Trainer(model=build_model(tok), args=args, train_dataset=ds, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[rec, CountMicro(), RelexCallback(tcut=4, horizons=[8], dtype="float32")])
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(micro) == 4 * 2  # 3 micro-batches per optimizer step; on_substep_end fires for all but the last
    assert sorted(rec.snaps) == [0, 1, 2, 3, 4]
    assert_matches_reference(read_weights(tmp_path / "relex" / "step-8"), rec.snaps, [1, 2, 3, 4], 8, rec.snaps[0])


# ------------------------------------------------------------------------------------------------- bf16
def test_bf16_model_bf16_buffer(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = build_model(tok, dtype=torch.bfloat16)
    rec = Recorder()
    trainer = grpo_trainer(
        tmp_path, [rec, RelexCallback(tcut=4, horizons=[8])], model=model, tok=tok, learning_rate=2e-2
    )
    trainer.train()
    assert trainer.state.global_step == 4
    d = tmp_path / "relex" / "step-8"
    got = read_weights(d)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    ref = reference(rec.snaps, [1, 2, 3, 4], 8)
    moved = 0
    for n, t0 in rec.snaps[0].items():
        step = (ref[n] - t0).norm()
        if step > 0:
            moved += 1
            # bf16 buffer and bf16 output: a few bf16 ulps of the weights
            assert float((got[n].double() - ref[n]).norm()) < 0.02 * float(ref[n].norm()), n
    assert moved > 0
    m = AutoModelForCausalLM.from_pretrained(d, dtype="auto")  # the checkpoint's dtype (transformers 4.x: float32)
    assert m.dtype == torch.bfloat16
    enc = tok(["5+3="], return_tensors="pt")
    assert m.generate(**enc, max_new_tokens=2, do_sample=False).shape[1] > enc["input_ids"].shape[1]


# -------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tcut=None, horizons=[10]), "tcut is required"),
        (dict(tcut=10, horizons=[5]), "not beyond tcut"),
        (dict(tcut=10, horizons=[]), "horizons is empty"),
        (dict(tcut=10, horizons=[20, 20]), "repeat"),
        (dict(tcut=10, horizons="20,x"), "whole step numbers"),
        (dict(tcut=10, horizons=[20], stride=3), "not a multiple of stride"),
        (dict(tcut=10, horizons=[20], fit_start=10), "fit_start"),
        (dict(tcut=10, horizons=[20], rank=0), "rank must be >= 1"),
        (dict(tcut=10, horizons=[20], storage="gpu"), "storage='gpu'"),
        (dict(tcut=10, horizons=[20], dtype="int8"), "dtype"),
        (dict(tcut=10, horizons=[20], stop_training="yes"), "stop_training"),
        (dict(tcut=10, horizons=[20], merge_lora=1), "merge_lora"),
        (dict(tcut=10, horizons=[20], include=["("]), "not a valid regular expression"),
        (dict(tcut=10, horizons=[20], max_shard_size="lots"), "max_shard_size"),
        (dict(tcut=10, horizons=[20], solver="svd"), "solver='svd'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(RelexInputError, match=message):
        RelexCallback(**kwargs)


def test_bad_setup_fails_before_training(tmp_path):
    rec = Recorder()
    trainer = grpo_trainer(tmp_path, [RelexCallback(tcut=4, horizons=[8], include=["no_such_param"]), rec])
    with pytest.raises(RelexInputError, match="matches no trainable parameter"):
        trainer.train()
    assert not any(s > 0 for s in rec.snaps)
    os.makedirs(tmp_path / "relex" / "step-8")
    trainer = grpo_trainer(tmp_path, [RelexCallback(tcut=4, horizons=[8])])
    with pytest.raises(RelexInputError, match="already exist"):
        trainer.train()
    assert trainer.state.global_step == 0


# ----------------------------------------------------------------------------------------------- config
def test_config_from_yaml_and_cli_with_grpo_config(tmp_path):
    from transformers import HfArgumentParser
    from trl import GRPOConfig, TrlParser

    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        f"output_dir: {tmp_path}/out\nuse_cpu: true\nbf16: false\nlearning_rate: 1.0e-6\nrelex_tcut: "
        f"75\nrelex_horizons: [500, 1000]\n"
        "relex_stride: 5\nrelex_dtype: float32\nrelex_include: ['mlp']\nrelex_stop_training: false\n"
    )
    relex, grpo = HfArgumentParser((RelexConfig, GRPOConfig)).parse_yaml_file(str(yaml_path))
    assert isinstance(grpo, GRPOConfig) and grpo.learning_rate == 1e-6
    cb = RelexCallback.from_config(relex)
    assert cb.tcut == 75 and cb.horizons == (500, 1000) and cb.settings.stride == 5 and cb.stop_training is False
    assert cb.settings.dtype == "float32" and cb.settings.torch_dtype == torch.float32 and cb.include == ["mlp"]

    argv = [
        "--output_dir",
        str(tmp_path / "o2"),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--relex_tcut",
        "50",
        "--relex_horizons",
        "400",
        "800",
        "--relex_fit_start",
        "10",
        "--relex_merge_lora",
        "true",
    ]
    relex, grpo = TrlParser((RelexConfig, GRPOConfig)).parse_args_and_config(argv)
    cb = RelexCallback.from_config(relex)
    assert cb.tcut == 50 and cb.horizons == (400, 800) and cb.settings.fit_start == 10 and cb.merge_lora is True
    # the TrlParser reads the same YAML through --config, and CLI flags override it
    relex, grpo = TrlParser((RelexConfig, GRPOConfig)).parse_args_and_config(
        ["--config", str(yaml_path), "--relex_tcut", "60"]
    )
    assert RelexCallback.from_config(relex).tcut == 60 and relex.relex_stride == 5

    bad = RelexConfig(relex_tcut=75, relex_horizons=[50])
    with pytest.raises(RelexInputError, match="not beyond tcut"):
        RelexCallback.from_config(bad)


def test_lora_run_ending_before_tcut_prints_a_command_that_works(tmp_path, caplog):
    """A LoRA run that stops before tcut saves its trajectory and the adapter at theta_0; the command it prints
    writes adapter directories that PeftModel.from_pretrained loads, holding the extrapolation of that trajectory."""
    peft = pytest.importorskip("peft")
    import logging
    import re
    import shlex

    from relex_callback.offline.cli import main

    tok = build_tokenizer()
    model = peft.get_peft_model(
        build_model(tok),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    rec = Recorder()
    cb = RelexCallback(tcut=8, horizons=[20], dtype="float32")
    trainer = grpo_trainer(tmp_path, [rec, cb], model=model, tok=tok, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    line = next(r.getMessage() for r in caplog.records if "relex extrapolate --trajectory" in r.getMessage())
    cmd = re.search(r"`relex (extrapolate [^`]*)`", line).group(1).replace("--horizons H", "--horizons 12")
    cmd = cmd.replace("--out DIR", f"--out {tmp_path / 'x'}")
    assert main(shlex.split(cmd)) == 0
    loaded = peft.PeftModel.from_pretrained(build_model(tok), str(tmp_path / "x" / "step-12"))
    lp = dict(loaded.named_parameters())
    tracked = [n for n, p in model.named_parameters() if p.requires_grad]
    assert tracked
    assert_matches_reference(lp, rec.snaps, [1, 2, 3, 4], 12, tracked)
    for n in tracked:
        assert not torch.equal(lp[n].detach().double(), rec.snaps[0][n]), n  # it moved


# ------------------------------------------------------------------------------------------ the link to the Trainer
@pytest.mark.parametrize("how", ["callbacks", "trainer=", "attach", "attach+add_callback"])
def test_the_trainer_is_linked_or_found(tmp_path, monkeypatch, how):
    """``RelexCallback(..., trainer=trainer)`` links (TRL's pattern: then ``trainer.add_callback``); ``attach`` links
    and adds; attaching then adding again leaves one entry (events once per step). A linked trainer is used without
    the search through the garbage collector, which stays the fallback for ``callbacks=[...]``."""
    from relex_callback import compat
    from relex_callback.trainer import trainer_link

    def no_search(callback):
        raise AssertionError("a linked trainer needs no search")

    cb = RelexCallback(tcut=2, horizons=[4]) if how == "callbacks" else None
    trainer = grpo_trainer(tmp_path, [Recorder()] + ([cb] if cb is not None else []))
    if how != "callbacks":
        monkeypatch.setattr(trainer_link, "handler_holding", no_search)
    if how == "trainer=":
        cb = RelexCallback(tcut=2, horizons=[4], trainer=trainer)
        assert cb.trainer is trainer and not compat.holds(trainer.callback_handler, cb)  # linked, not added
        trainer.add_callback(cb)
    elif how.startswith("attach"):
        cb = RelexCallback(tcut=2, horizons=[4])
        assert cb.attach(trainer) is cb and trainer.callback_handler.callbacks[0] is cb
        if how == "attach+add_callback":
            trainer.add_callback(cb)
            assert sum(c is cb for c in trainer.callback_handler.callbacks) == 2
    trainer.train()
    handler = trainer.callback_handler.callbacks
    assert handler[0] is cb and sum(c is cb for c in handler) == 1  # first, so on_log adds relex/* before reporters
    assert cb.trainer is trainer and cb.window.trainer is trainer
    assert cb.done and cb.report["steps"] == [1, 2] and trainer.state.global_step == 2
    assert (tmp_path / "relex" / "step-4").is_dir()
    assert sum("relex/r2_mean" in entry for entry in trainer.state.log_history) == 1
