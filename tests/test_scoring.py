"""Horizons scored by the trainer's own evaluation (``evaluate_horizons``, ``keep_best``, ``horizons="auto"``,
``relex_callback.evaluate_horizons``) on a real tiny GRPOTrainer with an eval set, on CPU.

GRPO's evaluation samples completions; every evaluation here is seeded the way the scoring seeds it
(``set_seed(args.seed, device_specific=True)``), so the scores of a model are reproducible exactly and the
comparisons below are exact equalities, not tolerances.
"""

import json
import logging
import os

import pytest
import torch
from datasets import Dataset

from relex_callback import RelexCallback, RelexInputError, evaluate_horizons
from relex_callback.compat import evaluate_with_logged_metrics
from relex_callback.trainer.evaluation import clean_metrics
from relex_callback.trainer.scoring import choose_metric, rank_steps
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from test_callback import grpo_trainer

TCUT = 4
HORIZONS = [8, 16, 32]
EVAL_KW = dict(per_device_eval_batch_size=4)


def eval_set():
    return Dataset.from_list(arithmetic_problems(8, seed=2))


def scored_trainer(out, callbacks, model=None, tok=None, eval_dataset=True, **kw):
    trainer = grpo_trainer(out, callbacks, model=model, tok=tok, **EVAL_KW, **kw)
    if eval_dataset:
        trainer.eval_dataset = eval_set()
    return trainer


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def seeded_eval(trainer) -> dict:
    from accelerate.utils import set_seed

    set_seed(trainer.args.seed, device_specific=True)
    # what evaluate() returns and logs (TRL < 1.5 logs GRPO's reward metrics without returning them)
    return clean_metrics(evaluate_with_logged_metrics(trainer))


def without_seconds(m: dict) -> dict:
    """The scores (what evaluate() gives), without the timing, the standard errors and the counts relex adds."""
    return {k: v for k, v in m.items() if k != "seconds" and not k.endswith("_stderr") and not k.startswith("scored_")}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """GRPO to tcut=4 with three horizons scored and the best two kept; theta_0 saved as ``base/``."""
    out = tmp_path_factory.mktemp("scored")
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    cb = RelexCallback(tcut=TCUT, horizons=HORIZONS, dtype="float32", evaluate_horizons=True, keep_best=2)
    trainer = scored_trainer(out, [cb], model=model, tok=tok)
    trainer.train()
    return out, trainer, cb, tok


def test_report_scores_every_step_and_keeps_the_best(scored):
    out, trainer, cb, _ = scored
    relex = out / "relex"
    with open(relex / "report.json") as f:
        rep = json.load(f)
    assert set(rep["horizon_eval"]) == {str(s) for s in [TCUT] + HORIZONS}
    for m in rep["horizon_eval"].values():
        assert {"reward", "loss", "rewards/digit_reward/mean", "seconds"} <= set(m)
        assert not any(k.startswith("eval_") or k in ("runtime", "epoch", "num_tokens") for k in m)
    reward = {h: rep["horizon_eval"][str(h)]["reward"] for h in HORIZONS}
    best = max(HORIZONS, key=lambda h: (reward[h], -h))
    assert rep["best_horizon"] == best
    assert rep["horizon_eval_summary"]["metric"] == "reward"
    # every score carries its standard error (per-prompt spread); a win counts beyond two of them only
    se = {h: rep["horizon_eval"][str(h)]["reward_stderr"] for h in [TCUT] + HORIZONS}
    assert all(v > 0 for v in se.values())
    summ = rep["horizon_eval_summary"]
    diff = reward[best] - rep["horizon_eval"][str(TCUT)]["reward"]
    assert summ["difference"] == pytest.approx(diff)
    assert summ["difference_stderr"] == pytest.approx((se[TCUT] ** 2 + se[best] ** 2) ** 0.5)
    assert summ["best_beats_tcut"] == (diff > 2 * summ["difference_stderr"])
    assert summ["pick"] == (best if summ["best_beats_tcut"] else "tcut")
    # keep_best=2: the two best step-H/ stay when a horizon beats the tcut model; within noise nothing is removed
    ranking = sorted(HORIZONS, key=lambda h: (-reward[h], h))
    left = sorted(d for d in os.listdir(relex) if d.startswith("step-"))
    if summ["best_beats_tcut"]:
        assert left == sorted(f"step-{h}" for h in ranking[:2])
        assert rep["keep_best"]["removed"] == [f"step-{ranking[2]}"] and rep["keep_best"]["kept"] == ranking[:2]
    else:
        assert "within noise" in summ["verdict"] or "worse" in summ["verdict"]
        assert left == sorted(f"step-{h}" for h in HORIZONS)
        assert rep["keep_best"]["removed"] == [] and "nothing removed" in rep["keep_best"]["skipped"]
    assert (relex / "relex_state.safetensors").is_file() and (relex / "horizons.png").is_file()
    assert cb.report["horizon_eval"] == rep["horizon_eval"]
    # the evaluations of extrapolated models are not in log_history as evaluations; their scores are relex/eval/*
    assert not any(any(k.startswith("eval_") for k in e) for e in trainer.state.log_history)
    at_tcut = [e for e in trainer.state.log_history if e.get("step") == TCUT and "loss" in e]
    assert len(at_tcut) == 1
    for h in [TCUT] + HORIZONS:
        assert at_tcut[0][f"relex/eval/{h}/reward"] == rep["horizon_eval"][str(h)]["reward"]
    assert at_tcut[0]["relex/best_horizon"] == best


def test_scores_equal_evaluate_on_the_written_checkpoints(scored):
    """Each kept step-H loaded with from_pretrained into a fresh trainer scores exactly what the run recorded; the
    tcut entry is the live model's own (the run stopped at tcut)."""
    from transformers import AutoModelForCausalLM

    out, trainer, _, tok = scored
    with open(out / "relex" / "report.json") as f:
        rep = json.load(f)
    assert seeded_eval(trainer) == without_seconds(rep["horizon_eval"][str(TCUT)])
    for h in rep["keep_best"]["kept"]:
        model = AutoModelForCausalLM.from_pretrained(out / "relex" / f"step-{h}")
        fresh = scored_trainer(out / f"fresh-{h}", [], model=model, tok=tok)
        assert seeded_eval(fresh) == without_seconds(rep["horizon_eval"][str(h)]), h


def test_evaluate_horizons_after_training(scored, tmp_path):
    """The same scores from the state file after training: kept horizons from their directories, the removed one
    from the state + base; the live model is bitwise unchanged; a horizon without directory needs the base."""
    out, trainer, _, _ = scored
    relex = str(out / "relex")
    with open(os.path.join(relex, "report.json")) as f:
        rep = json.load(f)
    if rep["keep_best"]["removed"]:
        removed = int(rep["keep_best"]["removed"][0][len("step-"):])
    else:  # within noise keep_best removed nothing: a copy with one horizon's directory taken away
        import shutil

        shutil.copytree(relex, tmp_path / "relex")
        relex, removed = str(tmp_path / "relex"), HORIZONS[-1]
        shutil.rmtree(os.path.join(relex, f"step-{removed}"))
    tcut_dir = tmp_path / "tcut"
    trainer.save_model(str(tcut_dir))
    before = params(trainer.model)
    history = list(trainer.state.log_history)
    res = evaluate_horizons(trainer, relex, base=str(out / "base"), horizons=HORIZONS, tcut_model=str(tcut_dir),
                            write=False)
    assert_bitwise(before, params(trainer.model))
    assert trainer.state.log_history == history
    for s in [TCUT] + HORIZONS:
        assert without_seconds(res["horizon_eval"][str(s)]) == without_seconds(rep["horizon_eval"][str(s)]), s
    assert res["best_horizon"] == rep["best_horizon"]
    with pytest.raises(RelexInputError, match=rf"\[{removed}\] have no step-H/ directory.*base="):
        evaluate_horizons(trainer, relex, horizons=[removed], write=False)
    with pytest.raises(RelexInputError, match="not beyond"):
        evaluate_horizons(trainer, relex, horizons=[TCUT], write=False)


def test_weights_restored_when_evaluation_raises(scored):
    out, trainer, _, _ = scored
    before, history, callbacks = (
        params(trainer.model),
        list(trainer.state.log_history),
        list(trainer.callback_handler.callbacks),
    )
    rng = torch.get_rng_state()
    metrics = {k: dict(v) for k, v in trainer._metrics.items()}
    real, calls = trainer.evaluate, []

    def boom(*a, **kw):  # the second evaluation fails inside the loop, after completions were generated and logged
        raise RuntimeError("evaluation failed (injected)")

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            trainer.compute_loss = boom
        return real(*a, **kw)

    trainer.evaluate = failing
    try:
        with pytest.raises(RuntimeError, match="injected"):
            evaluate_horizons(trainer, str(out / "relex"), base=str(out / "base"), horizons=HORIZONS, write=False)
    finally:
        del trainer.evaluate
        trainer.__dict__.pop("compute_loss", None)
    assert len(calls) == 2
    assert {k: dict(v) for k, v in trainer._metrics.items()} == metrics  # no half evaluation left to average in
    assert_bitwise(before, params(trainer.model))
    assert trainer.state.log_history == history and trainer.callback_handler.callbacks == callbacks
    assert torch.equal(torch.get_rng_state(), rng)


def test_validation_mode_continues_exactly_as_without_scoring(tmp_path):
    """Scoring at tcut changes nothing for the rest of the run: with stop_training=False, the weights and the
    logged training rewards after tcut are identical to those of the same run without scoring."""
    runs = {}
    for scoring in (False, True):
        cb = RelexCallback(tcut=TCUT, horizons=[8, 16], dtype="float32", stop_training=False,
                           evaluate_horizons=scoring, output_dir=str(tmp_path / f"relex-{scoring}"))
        trainer = scored_trainer(tmp_path / f"run-{scoring}", [cb], max_steps=7)
        trainer.train()
        rewards = [(e["step"], e["reward"]) for e in trainer.state.log_history if "reward" in e]
        runs[scoring] = (params(trainer.model), rewards, cb.report)
    assert_bitwise(runs[False][0], runs[True][0])
    assert runs[False][1] == runs[True][1] and len(runs[True][1]) == 7
    assert "horizon_eval" in runs[True][2] and "horizon_eval" not in runs[False][2]


def test_auto_ladder_without_eval_set_is_written_unscored(tmp_path, caplog):
    cb = RelexCallback(tcut=2, horizons="auto", dtype="float32", keep_best=1)
    trainer = scored_trainer(tmp_path, [cb], eval_dataset=False)
    with caplog.at_level(logging.WARNING, logger="relex_callback"):
        trainer.train()
    assert list(cb.horizons) == [4, 8, 16, 32]
    assert sorted(d for d in os.listdir(tmp_path / "relex") if d.startswith("step-")) == [
        "step-16",
        "step-32",
        "step-4",
        "step-8",
    ]
    assert "horizon_eval" not in cb.report and "keep_best" not in cb.report
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "eval_dataset" in msg and "unscored" in msg and "keep_best removes nothing" in msg


def test_evaluate_horizons_writes_the_report_and_keeps_the_best(scored, tmp_path):
    """write=True merges the scores into report.json, redraws horizons.png and, with keep_best, removes directories."""
    import shutil

    out, trainer, _, _ = scored
    relex = str(tmp_path / "relex")
    shutil.copytree(out / "relex", relex)
    with open(os.path.join(relex, "report.json")) as f:
        before = json.load(f)
    kept = before["keep_best"]["kept"]
    os.remove(os.path.join(relex, "horizons.png"))
    res = evaluate_horizons(trainer, relex, keep_best=1)  # the step-H/ present
    with open(os.path.join(relex, "report.json")) as f:
        rep = json.load(f)
    assert res["best_horizon"] == rep["best_horizon"] == kept[0]
    if rep["horizon_eval_summary"]["best_beats_tcut"]:
        assert rep["keep_best"]["removed"] == [f"step-{kept[1]}"]
        assert sorted(d for d in os.listdir(relex) if d.startswith("step-")) == [f"step-{kept[0]}"]
    else:  # within noise: the tcut model stays the pick and nothing is removed
        assert rep["keep_best"]["removed"] == []
        assert sorted(d for d in os.listdir(relex) if d.startswith("step-")) == sorted(f"step-{h}" for h in kept)
    assert os.path.isfile(os.path.join(relex, "horizons.png"))
    assert rep["tensors"] == before["tensors"]  # the rest of the report is kept
    for h in kept:
        assert without_seconds(rep["horizon_eval"][str(h)]) == without_seconds(before["horizon_eval"][str(h)])


def test_plain_trainer_scored_by_eval_loss(tmp_path):
    """A transformers Trainer (causal-LM loss): horizons ranked by eval_loss, lowest best; the live model unchanged."""
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = build_tokenizer()
    tok.padding_side = "right"

    def lm_set(n, seed):
        texts = [p["prompt"] + p["answer"] + tok.eos_token for p in arithmetic_problems(n, seed=seed)]
        return Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", max_steps=40, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    cb = RelexCallback(tcut=4, horizons=[8, 16], dtype="float32", evaluate_horizons=True)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model=build_model(tok), args=args, train_dataset=lm_set(64, 2), eval_dataset=lm_set(16, 3),
                      processing_class=tok, data_collator=collator, callbacks=[cb])
    trainer.train()
    rep = cb.report
    assert rep["horizon_eval_summary"]["metric"] == "loss" and rep["horizon_eval_summary"]["goal"] == "min"
    losses = {h: rep["horizon_eval"][str(h)]["loss"] for h in (8, 16)}
    assert rep["best_horizon"] == min(losses, key=lambda h: (losses[h], h))
    assert trainer.evaluate()["eval_loss"] == rep["horizon_eval"]["4"]["loss"]  # the live model is the tcut model
    fresh = Trainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "relex" / "step-16"), args=args,
                    eval_dataset=lm_set(16, 3), processing_class=tok, data_collator=collator)
    assert fresh.evaluate()["eval_loss"] == losses[16]


def test_lora_adapter_scored(tmp_path):
    """A PEFT model: the adapter parameters hold each horizon while it is evaluated; the scores equal those of the
    adapter directory loaded with PeftModel.from_pretrained into a fresh trainer."""
    peft = pytest.importorskip("peft")

    tok = build_tokenizer()
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    model = peft.get_peft_model(build_model(tok), peft.LoraConfig(**lora))
    cb = RelexCallback(tcut=TCUT, horizons=[8, 16], dtype="float32", evaluate_horizons=True)
    trainer = scored_trainer(tmp_path / "run", [cb], model=model, tok=tok)
    trainer.train()
    rep = cb.report
    assert set(rep["horizon_eval"]) == {"4", "8", "16"} and rep["format"] == "peft_adapter"
    assert seeded_eval(trainer) == without_seconds(rep["horizon_eval"]["4"])
    loaded = peft.PeftModel.from_pretrained(build_model(tok), str(tmp_path / "run" / "relex" / "step-16"))
    fresh = scored_trainer(tmp_path / "fresh", [], model=loaded, tok=tok)
    assert seeded_eval(fresh) == without_seconds(rep["horizon_eval"]["16"])
    # after training: the adapter directories scored into the live PeftModel, which is left bitwise unchanged
    before = params(trainer.model)
    res = evaluate_horizons(trainer, str(tmp_path / "run" / "relex"), write=False)
    assert_bitwise(before, params(trainer.model))
    for h in ("8", "16"):
        assert without_seconds(res["horizon_eval"][h]) == without_seconds(rep["horizon_eval"][h])


def test_metric_choice_and_ranking():
    grpo = {"4": {"loss": 0.1, "reward": 0.5, "reward_std": 0.9}, "8": {"loss": 0.3, "reward": 0.7, "reward_std": 0.1}}
    assert choose_metric(grpo) == ("reward", "max")
    assert choose_metric(grpo, "eval_loss") == ("loss", "min")
    assert choose_metric({"8": {"rewards/acc/std": 1.0, "rewards/acc/mean": 0.2}}) == ("rewards/acc/mean", "max")
    sft = {"8": {"loss": 2.0}, "16": {"loss": 1.5}, "32": {"loss": None}}
    assert choose_metric(sft) == ("loss", "min")
    assert rank_steps(sft, "loss", "min", [8, 16, 32]) == [16, 8, 32]
    assert rank_steps({"8": {"r": 1.0}, "16": {"r": 1.0}}, "r", "max", [16, 8]) == [8, 16]  # ties: earlier first


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero3", "zero2_bf16", "zero3_bf16"])
def test_scoring_in_distributed_runs(tmp_path, mode):
    """2 processes (DDP: each tensor computed by its owner and broadcast to the other replica; ZeRO-3: each process
    its partition; ZeRO-2 with bf16: each process its fragment of every tensor, broadcast to the other replica):
    what every process's model holds at each trainer.evaluate() call is exactly the written step-H (and the tcut
    weights for the tcut entry), the live weights after scoring are the tcut weights, and every process reports the
    same scores. Under bf16 the fp32 master weights are recorded and the bf16 parameters are what is evaluated and
    written."""
    from safetensors.torch import load_file
    from test_distributed import HORIZONS as DIST_HORIZONS, TCUT as DIST_TCUT, launch

    out = str(tmp_path / mode)
    launch(mode, out, "--eval", *(["--bf16"] if mode.endswith("_bf16") else []))
    infos = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in (0, 1)]
    with open(os.path.join(out, "relex", "report.json")) as f:
        rep = json.load(f)
    scores = [{s: without_seconds(m) for s, m in e.items()} for e in (infos[0]["horizon_eval"],
                                                                      infos[1]["horizon_eval"], rep["horizon_eval"])]
    assert scores[0] == scores[1] == scores[2]  # the seconds are each process's own
    assert set(rep["horizon_eval"]) == {str(s) for s in (DIST_TCUT, *DIST_HORIZONS)}
    assert infos[0]["best_horizon"] == rep["best_horizon"] in DIST_HORIZONS
    snaps = torch.load(os.path.join(out, "trajectory.pt"))["snaps"]  # at tcut: recorded after the scoring
    for r in (0, 1):
        evaluated = torch.load(os.path.join(out, f"evaluated-rank-{r}.pt"))
        assert len(evaluated) == 1 + len(DIST_HORIZONS)
        assert_bitwise(evaluated[0], {n: snaps[DIST_TCUT][n] for n in evaluated[0]})
        for held, h in zip(evaluated[1:], DIST_HORIZONS):
            d = os.path.join(out, "relex", f"step-{h}")
            written = {}
            for fn in os.listdir(d):
                if fn.endswith(".safetensors"):
                    written.update(load_file(os.path.join(d, fn)))
            assert_bitwise(held, {n: written[n] for n in held})


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    import sys

    from relex_callback.files.plot import plot_horizons
    from relex_callback.trainer.scoring import NOISE_SE, summarize

    scores = {"4": {"reward": 0.2, "reward_stderr": 0.01}, "8": {"reward": 0.3, "reward_stderr": 0.02},
              "16": {"reward": 0.25, "reward_stderr": 0.02}}
    summary = summarize(scores, 4, [8, 16])
    assert summary["best_horizon"] == 8 and summary["horizon_eval_summary"]["best_beats_tcut"] is True
    assert plot_horizons(scores, summary, 4, str(tmp_path / "a.png"), noise_se=NOISE_SE) == str(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with caplog.at_level(logging.INFO, logger="relex_callback"):
        assert plot_horizons(scores, summary, 4, str(tmp_path / "b.png"), noise_se=NOISE_SE) is None
    assert not (tmp_path / "b.png").exists() and any("matplotlib" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ scores with their noise
def test_standard_errors_by_hand():
    import math

    from relex_callback.trainer.evaluation import standard_errors

    prompts = ["a", "a", "b", "b", "c", "c"]
    f = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # per-prompt means 0.5, 1, 0: sd 0.5 over 3 prompts
    g = [0.0, 0.0, 0.5, 0.5, 1.0, 0.0]  # per-prompt means 0, 0.5, 0.5
    metrics = {"reward": 0.0, "rewards/f/mean": 0.5, "rewards/g/mean": 1 / 3, "loss": 1.0, "accuracy": 0.25}
    se = standard_errors(metrics, {"prompt": prompts, "rewards": {"f": f, "g": g}, "weights": {"f": 1.0, "g": 2.0}},
                         n_eval=12)
    assert se["rewards/f/mean_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    sd_g = math.sqrt(((0 - 1 / 3) ** 2 + 2 * (0.5 - 1 / 3) ** 2) / 2)
    assert se["rewards/g/mean_stderr"] == pytest.approx(sd_g / math.sqrt(3))
    tot = [0.5 + 0, 1 + 1, 0 + 1]  # f + 2 g per prompt
    m = sum(tot) / 3
    assert se["reward_stderr"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in tot) / 2 / 3))
    assert se["accuracy_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 12))  # binomial
    assert "loss_stderr" not in se


def test_a_noisy_score_never_beats_tcut(tmp_path):
    """Synthetic scores: a horizon better by less than two standard errors of the difference is "within noise",
    the tcut model stays the pick and keep_best removes nothing; one clearly better wins. Then real noise: the same
    GRPO model evaluated under four seeds (the "horizons" differ from the "tcut model" only by sampling noise)."""
    from relex_callback.trainer.evaluation import seeded_evaluate
    from relex_callback.trainer.scoring import apply_scores, summarize

    noisy = {"4": {"reward": 0.1823, "reward_stderr": 0.02}, "8": {"reward": 0.1927, "reward_stderr": 0.02},
             "16": {"reward": 0.185, "reward_stderr": 0.02}}
    s = summarize(noisy, 4, [8, 16])["horizon_eval_summary"]
    assert s["best_beats_tcut"] is False and s["pick"] == "tcut" and s["verdict"].startswith("within noise")
    rep = apply_scores({}, {"horizon_eval": noisy}, tcut=4, horizons=[8, 16], out_dir=str(tmp_path), keep_best=1,
                       reward_metric=None, coordinator=True)
    assert rep["keep_best"]["removed"] == [] and rep["keep_best"]["kept"] == [8, 16]
    clear = {**noisy, "8": {"reward": 0.30, "reward_stderr": 0.02}}
    s = summarize(clear, 4, [8, 16])["horizon_eval_summary"]
    assert s["best_beats_tcut"] is True and s["pick"] == 8
    unknown = {"4": {"loss": 2.0}, "8": {"loss": 1.0}}
    s = summarize(unknown, 4, [8])["horizon_eval_summary"]
    assert s["best_beats_tcut"] is None and s["pick"] == "tcut" and "noise unknown" in s["verdict"]
    trainer = scored_trainer(tmp_path / "noise", [])
    scores = {str(step): seeded_evaluate(trainer, seed) for step, seed in ((4, 0), (8, 1), (16, 2), (32, 3))}
    assert all(m["reward_stderr"] > 0 for m in scores.values())
    s = summarize(scores, 4, [8, 16, 32])["horizon_eval_summary"]
    assert s["best_beats_tcut"] is False and s["pick"] == "tcut", s
