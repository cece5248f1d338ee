"""The graded sums setting of docs/replication.md part 4 without the real model: the graded reward on hand-made
completions, the greedy per-prompt scorer on the toy model (against prompt-by-prompt generation), and the doc block
of recipes/replicate/real_graded.py from a made-up results dict. The real model's run is the recipe's own."""

import math
import os
import sys

import pytest
import torch

from relex_callback.examples import real_model as rm
from relex_callback.examples.toy import arithmetic_problems, supervised_warmup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "recipes", "replicate"))

import real_graded as rg  # noqa: E402


def test_graded_reward_on_hand_made_completions():
    got = rm.graded_reward(["40 + 60 = 100", "90", "The sum is 150.", "about 250", "To add", "-3", "1,000"],
                           ["100"] * 7)
    assert got == pytest.approx([1.0, 0.9, 0.5, 0.0, 0.0, 0.0, 0.0])  # 250 and -3: clipped at 0; no number: 0
    assert rm.graded_reward([[{"role": "assistant", "content": "Answer: 21"}]], ["20"]) == pytest.approx([0.95])
    # the exact reward agrees on the right answers only
    assert rm.sum_reward(["40 + 60 = 100", "90"], ["100", "100"]) == [1.0, 0.0]


def test_greedy_scores_match_prompt_by_prompt_generation(tokenizer, tiny_model):
    torch.manual_seed(0)
    train = arithmetic_problems(64, seed=1)
    supervised_warmup(tiny_model, tokenizer, train, steps=40)  # so that some answers are right and some near
    probs = arithmetic_problems(24, seed=2)
    got = rm.greedy_scores(tiny_model, tokenizer, probs, max_new_tokens=3, batch_size=7)  # ragged batches
    assert len(got["graded"]) == len(got["exact"]) == len(probs)
    want_g, want_e = [], []
    with torch.no_grad():
        for p in probs:  # one prompt at a time: no padding
            enc = tokenizer([p["prompt"]], return_tensors="pt", add_special_tokens=False)
            out = tiny_model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            want_g.append(rm.graded_score(text, p["answer"]))
            want_e.append(1.0 if rm.parse_answer(text) == p["answer"] else 0.0)
    assert got["graded"] == pytest.approx(want_g) and got["exact"] == want_e
    assert all(g >= e for g, e in zip(got["graded"], got["exact"]))  # a right answer scores 1 both ways
    assert rm.greedy_accuracy(tiny_model, tokenizer, probs, max_new_tokens=3) == pytest.approx(sum(want_e) / len(probs))
    with pytest.raises(Exception, match="at least one problem"):
        rm.greedy_scores(tiny_model, tokenizer, [])


def test_paired_band_and_verdict():
    m, band = rg.paired([1.0, 0.5, 0.75, 1.0], [0.5, 0.5, 0.25, 0.5])
    d = [0.5, 0.0, 0.5, 0.5]
    sd = math.sqrt(sum((x - 0.375) ** 2 for x in d) / 3)
    assert m == pytest.approx(0.375) and band == pytest.approx(2 * sd / 2)
    assert rg.verdict(0.375, 0.25) == "pays" and rg.verdict(-0.3, 0.25) == "harms" and rg.verdict(0.1, 0.25) == "tie"
    with pytest.raises(ValueError):
        rg.paired([1.0, 0.0], [1.0])


def _fake_result(seed):
    n = 4
    t = {"graded": [0.5, 0.5, 0.5, 0.5], "exact": [0.0] * n}
    up = {"graded": [0.8, 0.7, 0.9, 0.8], "exact": [1.0, 0.0, 1.0, 0.0]}
    down = {"graded": [0.1, 0.3, 0.2, 0.2], "exact": [0.0] * n}
    s = rg.SETTINGS[f"graded-2e-6-s{seed}"]
    return {"setting": {"tcuts": [8], "steps": s.steps, "lr": s.lr, "seed": seed}, "n_eval": n,
            "scores": {"tcut": t, "relex@16": up, "real@16": up, "relex@24": down, "real@24": t},
            "seconds": {"train": 600.0, "per_eval": 30.0}}


def test_doc_block(tmp_path):
    doc = tmp_path / "replication.md"
    doc.write_text(f"intro\n{rg.BEGIN}\nold\n{rg.END}\nafter\n")
    res = tmp_path / "res.json"
    rg.write_doc({}, str(doc), str(res))
    text = doc.read_text()
    assert "Not run yet" in text and "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert rg.COMMAND in text and "| verdict |" not in text
    rg.write_doc({"graded-2e-6-s0": _fake_result(0)}, str(doc), str(res))
    text = doc.read_text()
    assert "Not run yet" not in text and text.count(rg.BEGIN) == 1 and text.endswith("after\n")
    rows = [line for line in text.splitlines() if line.startswith("| graded-2e-6-s0")]
    assert len(rows) == 2  # 2x and 3x; no 4x in 24 steps
    assert "| 16 (2x) | 0.500 / 0.000 | 0.800 / 0.500 | 0.800 / 0.500 | +0.300 +- " in rows[0] and "| pays |" in rows[0]
    assert "| 24 (3x) |" in rows[1] and "| -0.300 +- " in rows[1] and "| harms |" in rows[1]
    assert "| 600 / 30 |" in rows[0]
    bare = tmp_path / "bare.md"
    bare.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no <!-- graded:begin -->"):
        rg.write_doc({}, str(bare), str(res))


def test_settings_are_the_graded_setting():
    for seed in range(3):
        s = rg.SETTINGS[f"graded-2e-6-s{seed}"]
        assert (s.reward, s.lr, s.seed, s.prompts, s.generations, s.temperature, s.max_operand, s.tcuts, s.n_eval) == (
            "graded", 2e-6, seed, 8, 4, 0.7, 99, (8,), 256)
        assert s.horizons(8) == [16, 24]
        assert set(rg.checkpoints(s, "r")) == {"tcut", "relex@16", "real@16", "relex@24", "real@24"}


def _store_many(path, prefix, n, start):
    import real_model

    start.wait(60)  # both imported: the writes overlap
    for i in range(n):
        real_model.store_result(path, f"{prefix}{i}", {"i": i})


def test_results_of_sittings_run_side_by_side_are_all_kept(tmp_path):
    """Two recipe processes on other settings write the same results file (one per seed, as the 3-seed run was
    made): each stores what it has merged with what the file holds then, so neither loses the other's settings."""
    import json
    import multiprocessing

    path = str(tmp_path / "results" / "r.json")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_store_many, args=(path, p, 60, start)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = json.load(open(path))
    assert sorted(got) == sorted([f"a{i}" for i in range(60)] + [f"b{i}" for i in range(60)])
    assert os.listdir(tmp_path / "results") == ["r.json"]  # no lock file or temporary left beside it


def test_unknown_settings_are_refused_before_any_work(tmp_path):
    import real_model

    assert real_model.chosen_settings("smoke,,base", real_model.SETTINGS) == ["smoke", "base"]
    with pytest.raises(SystemExit, match=r"unknown setting\(s\) 'nope', 'graded-2e-6-s9'; choose from"):
        rg.main(["--settings", "graded-2e-6-s0,nope,graded-2e-6-s9", "--results", str(tmp_path / "r.json"),
                 "--doc", ""])
    assert not os.listdir(tmp_path)  # refused before the model, the results file or anything else
