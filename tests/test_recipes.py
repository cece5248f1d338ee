"""The recipes run end to end: grpo_relex.py (real GRPOTrainer + RelexCallback) on a tiny local model and dataset,
then evaluate.py on what it wrote; the YAML configs parse into the paper's settings; the verifier is math-verify."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from relex_callback import RelexConfig
from relex_callback.examples.toy import build_model, build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
CONFIGS = os.path.join(RECIPES, "configs")

pytest.importorskip("math_verify")
pytest.importorskip("trl")
sys.path.insert(0, RECIPES)


def test_boxed_answers_checked_by_math_verify():
    from rewards import is_correct, last_boxed, make_accuracy_reward

    assert last_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box here") is None
    assert is_correct(r"the answer is \boxed{\frac{1}{2}}", r"it is \boxed{0.5}")
    assert is_correct(r"\boxed{\sqrt{4}}", "2")
    assert not is_correct(r"\boxed{3}", r"\boxed{4}")
    assert not is_correct("4", r"\boxed{4}")  # no \boxed{}: no reward by default
    assert is_correct("4", r"\boxed{4}", require_boxed=False)
    reward = make_accuracy_reward()
    msgs = [[{"role": "assistant", "content": r"\boxed{7}"}], r"\boxed{8}"]
    assert reward(msgs, [r"\boxed{7}", r"\boxed{7}"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "name,tcut,horizons",
    [("qwen2.5-math-1.5b", 75, [100, 200, 300, 400, 500]), ("qwen3-4b-base", 75, [500]), ("qwen3-8b-base", 100, [750])],
)
def test_configs_parse_to_the_papers_settings(name, tcut, horizons):
    from grpo_relex import RecipeArguments
    from trl import GRPOConfig, ModelConfig, TrlParser

    path = os.path.join(CONFIGS, f"{name}.yaml")
    header = open(path).read()
    assert "accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_relex.py" in header
    assert f"python recipes/grpo_relex.py --config recipes/configs/{name}.yaml" in header
    parser = TrlParser((RecipeArguments, GRPOConfig, ModelConfig, RelexConfig))
    recipe, args, model, relex = parser.parse_args_and_config(
        ["--config", path, "--bf16", "false", "--use_cpu", "true"]
    )
    assert relex.relex_tcut == tcut and list(relex.relex_horizons) == horizons
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "constant"
    assert args.max_steps == horizons[-1]
    assert model.model_name_or_path.startswith("Qwen/") and recipe.dataset_name and recipe.require_boxed


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    tok = build_tokenizer()
    build_model(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(32):
            a, b = rng.randint(0, 2), rng.randint(0, 2)
            f.write(json.dumps({"problem": f"{a}+{b}", "solution": f"The sum is \\boxed{{{a + b}}}."}) + "\n")
    return root


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def trained(local_assets):
    out = local_assets / "run"
    cmd = [
        sys.executable,
        os.path.join(RECIPES, "grpo_relex.py"),
        "--config",
        os.path.join(CONFIGS, "qwen2.5-math-1.5b.yaml"),
        "--model",
        str(local_assets / "model"),
        "--dataset",
        str(local_assets / "train.jsonl"),
        "--output_dir",
        str(out),
        "--relex_tcut",
        "4",
        "--relex_horizons",
        "8",
        "16",
        "--max_steps",
        "40",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--dtype",
        "float32",
        "--attn_implementation",
        "eager",
        "--gradient_checkpointing",
        "false",
        "--per_device_train_batch_size",
        "16",
        "--num_generations",
        "4",
        "--max_completion_length",
        "2",
        "--prompt_template",
        "{problem}=",
        "--require_boxed",
        "false",
        "--learning_rate",
        "1e-3",
        "--seed",
        "0",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_grpo_recipe_writes_loadable_horizons(trained, local_assets):
    out, proc = trained
    relex = out / "relex"
    report = json.loads((relex / "report.json").read_text())
    assert report["tcut"] == 4 and report["horizons"] == [8, 16]
    assert "'epoch'" in proc.stderr + proc.stdout
    # training stopped at tcut (4), not at max_steps (40): the log holds 4 optimizer steps
    assert (proc.stdout + proc.stderr).count("'rewards/accuracy_reward/mean'") == 4
    base = AutoModelForCausalLM.from_pretrained(local_assets / "model")
    moved = []
    for h in (8, 16):
        m = AutoModelForCausalLM.from_pretrained(relex / f"step-{h}")
        diff = sum((p - q).abs().sum().item() for p, q in zip(m.parameters(), base.parameters()))
        assert all(torch.isfinite(p).all() for p in m.parameters())
        moved.append(diff)
    assert moved[0] > 0 and moved[1] > moved[0]  # further along the line at the later horizon


def test_evaluate_builds_the_table(trained, local_assets, tmp_path):
    out, _ = trained
    prefix = tmp_path / "eval"
    cmd = [
        sys.executable, os.path.join(RECIPES, "evaluate.py"), "--checkpoints", f"base={local_assets / 'model'}",
        str(out / "relex" / "step-8"), str(out / "relex" / "step-16"), "--dataset", str(local_assets / "train.jsonl"),
        "--split", "train", "--prompt_template", "{problem}=", "--require_boxed", "false", "--max_new_tokens", "3",
        "--backend", "transformers", "--output", str(prefix),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "eval.json").read_text())
    assert [r["checkpoint"] for r in table["rows"]] == ["base", "relex/step-8", "relex/step-16"]
    for r in table["rows"]:
        assert r["n"] == 32 and 0 <= r["correct"] <= 32 and r["accuracy"] == pytest.approx(r["correct"] / 32)
    md = (tmp_path / "eval.md").read_text()
    assert "| relex/step-16 |" in md


def test_recipe_refuses_bad_relex_settings_before_loading(local_assets):
    cmd = [
        sys.executable, os.path.join(RECIPES, "grpo_relex.py"), "--config", os.path.join(CONFIGS, "qwen3-4b-base.yaml"),
        "--model", str(local_assets / "model"), "--dataset", str(local_assets / "train.jsonl"),
        "--relex_tcut", "75", "--relex_horizons", "50", "--bf16", "false", "--use_cpu", "true",
        "--output_dir", str(local_assets / "bad"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "horizons [50] are not beyond tcut=75" in proc.stderr
