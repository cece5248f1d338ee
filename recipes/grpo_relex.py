"""GRPO on math with a verifiable reward, with RELEX: observe the first ``tcut`` steps, write step ``H``.

A torchtune-style recipe: this readable script plus a YAML config (``recipes/configs/*.yaml``); every field of the
YAML is also a command-line flag, and flags win. The reward is 1 when the last ``\\boxed{}`` of the completion
equals the reference answer under ``math-verify`` (``recipes/rewards.py``), 0 otherwise.

8 GPUs, ZeRO-3:

    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_relex.py \\
        --config recipes/configs/qwen2.5-math-1.5b.yaml

One GPU:

    python recipes/grpo_relex.py --config recipes/configs/qwen2.5-math-1.5b.yaml

A local model or dataset instead of the hub names in the config (what the tests do):

    python recipes/grpo_relex.py --config recipes/configs/qwen2.5-math-1.5b.yaml \\
        --model path/to/model --dataset path/to/train.jsonl --relex_tcut 4 --relex_horizons 8 16

Results: ``<output_dir>/relex/step-<H>/`` (Hugging Face checkpoints), ``relex_state.safetensors``, ``report.json``.
Evaluate them with ``recipes/evaluate.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rewards import make_accuracy_reward, require_math_verify  # noqa: E402
from trl import ScriptArguments  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
from relex_callback import RelexCallback, RelexConfig

logger = logging.getLogger("grpo_relex")

DEFAULT_TEMPLATE = (
    "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n"
)


@dataclass
class RecipeArguments(ScriptArguments):
    """What to train on, on top of TRL's ``ScriptArguments`` (``dataset_name``, ``dataset_config``,
    ``dataset_train_split``). ``dataset_name`` and ``model_name_or_path`` (``ModelConfig``) are the hub names;
    ``--dataset`` / ``--model`` override them with local paths."""

    dataset: Optional[str] = field(
        default=None, metadata={"help": "Local dataset override: a .jsonl/.json/.parquet file or a dataset directory."}
    )
    model: Optional[str] = field(default=None, metadata={"help": "Local model override: a checkpoint directory."})
    problem_column: str = field(default="problem", metadata={"help": "Column holding the question."})
    solution_column: str = field(
        default="solution", metadata={"help": "Column holding the reference (a \\boxed{} answer inside)."}
    )
    prompt_template: str = field(
        default=DEFAULT_TEMPLATE, metadata={"help": "Prompt text; {problem} is replaced by the question."}
    )
    use_chat_template: bool = field(
        default=False, metadata={"help": "Wrap the prompt as a user message (instruct models). Base models: False."}
    )
    require_boxed: bool = field(
        default=True,
        metadata={"help": "Reward only the last \\boxed{} answer (False: math-verify parses the whole completion)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N examples."})


def load_problems(path_or_name: str, config: Optional[str], split: str):
    """A ``datasets.Dataset`` from a hub name, a local file (.jsonl/.json/.csv/.parquet) or a saved dataset dir."""
    from datasets import load_dataset, load_from_disk

    if os.path.isfile(path_or_name):
        ext = os.path.splitext(path_or_name)[1].lstrip(".").lower()
        kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(
                f"--dataset {path_or_name}: use a .jsonl, .json, .csv or .parquet file, or a dataset directory"
            )
        return load_dataset(kind, data_files=path_or_name, split="train")
    if os.path.isdir(path_or_name) and os.path.isfile(os.path.join(path_or_name, "dataset_info.json")):
        ds = load_from_disk(path_or_name)
        return ds[split] if hasattr(ds, "keys") else ds
    return load_dataset(path_or_name, config, split=split)


def build_dataset(args: RecipeArguments):
    source = args.dataset or args.dataset_name
    if not source:
        raise SystemExit("no dataset: set dataset_name in the config or pass --dataset path/to/train.jsonl")
    ds = load_problems(source, args.dataset_config, args.dataset_train_split)
    for col in (args.problem_column, args.solution_column):
        if col not in ds.column_names:
            raise ValueError(
                f"the dataset has no column {col!r} (columns: {ds.column_names}); set "
                "--problem_column/--solution_column"
            )
    if args.max_train_samples:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))

    def to_prompt(ex):
        text = args.prompt_template.format(problem=ex[args.problem_column])
        prompt = [{"role": "user", "content": text}] if args.use_chat_template else text
        return {"prompt": prompt, "solution": ex[args.solution_column]}

    keep = {"prompt", "solution"}
    return ds.map(to_prompt, remove_columns=[c for c in ds.column_names if c not in keep])


def main(argv=None):
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

    parser = TrlParser((RecipeArguments, GRPOConfig, ModelConfig, RelexConfig))
    recipe, training_args, model_args, relex_args = parser.parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    require_math_verify()
    if relex_args.relex_tcut is None or relex_args.relex_horizons is None:
        raise SystemExit("set relex_tcut and relex_horizons (in the YAML or as --relex_tcut 75 --relex_horizons 500)")
    callback = RelexCallback.from_config(relex_args)  # validates the settings before the model is loaded
    if getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type) != "constant":
        logger.warning(
            "lr_scheduler_type=%s: RLVR runs (and the paper) use a constant learning rate; a decaying schedule "
            "bends the trajectory the linear fit assumes is straight", training_args.lr_scheduler_type,
        )

    model_path = recipe.model or model_args.model_name_or_path
    if not model_path:
        raise SystemExit("no model: set model_name_or_path in the config or pass --model path/to/checkpoint")
    remote = bool(getattr(model_args, "trust_remote_code", False))
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=model_args.model_revision, dtype=dtype,
        attn_implementation=model_args.attn_implementation, trust_remote_code=remote,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision, trust_remote_code=remote)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = build_dataset(recipe)

    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=make_accuracy_reward(recipe.require_boxed),
        args=training_args,
        train_dataset=train_dataset,
        callbacks=[callback],
    )
    trainer.train()
    if callback.report is not None and trainer.is_world_process_zero():
        out = callback.output_dir or os.path.join(training_args.output_dir, "relex")
        summ = callback.report["summary"]
        logger.info(
            "RELEX wrote %s (explained variance mean %.3f, R^2 mean %s)",
            out,
            summ["explained_variance_mean"],
            summ["r2_mean"],
        )
    return trainer, callback


if __name__ == "__main__":
    main()
