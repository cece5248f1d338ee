"""A tiny GRPO run for the tests: the toy model and tokenizer, 64 two-number sums, the dense digit reward and a
``GRPOConfig`` for a few CPU steps (``grpo_args``); ``grpo_trainer`` puts them together. Keyword arguments override
the config's fields."""

from helpers import digit_reward

from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer

GRPO_DEFAULTS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=4,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_steps=30,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,
    seed=0,
    disable_tqdm=True,
)


def grpo_args(out_dir, **kw):
    """``GRPOConfig`` writing to ``out_dir``: ``GRPO_DEFAULTS`` updated with ``kw``."""
    from trl import GRPOConfig  # trl and datasets: the trl extra, deferred like the tests that skip without it

    return GRPOConfig(**{**GRPO_DEFAULTS, "output_dir": str(out_dir), **kw})


def grpo_dataset(n: int = 64, seed: int = 1):
    """The training prompts: ``n`` sums of ``arithmetic_problems`` as a ``datasets.Dataset``."""
    from datasets import Dataset

    return Dataset.from_list(arithmetic_problems(n, seed=seed))


def grpo_trainer(out_dir, callbacks=None, model=None, tok=None, reward=digit_reward, optimizers=(None, None), **kw):
    """A ``GRPOTrainer`` over ``grpo_dataset()`` with ``reward``; the toy tokenizer and model unless given."""
    from trl import GRPOTrainer

    tok = tok or build_tokenizer()
    model = model if model is not None else build_model(tok)
    ds = grpo_dataset()
    return GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args(out_dir, **kw), train_dataset=ds,
                       processing_class=tok, callbacks=callbacks, optimizers=optimizers)
