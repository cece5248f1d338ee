"""PEFT (LoRA) model in a 2-process run: RelexCallback must refuse it at on_train_begin, on every rank, with a
RelexInputError (launched by tests/test_distributed.py under torchrun; no training, so it costs only the imports).

Writes ``<out>/rank-<r>.txt`` with the error message (or ``NO ERROR``).

Usage: torchrun --nproc_per_node 2 peft_refusal.py OUT
"""

import os
import sys
import types

import torch

torch.set_num_threads(1)

import peft  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerControl, TrainerState  # noqa: E402

from relex_callback import RelexCallback  # noqa: E402
from relex_callback.errors import RelexInputError  # noqa: E402
from relex_callback.examples.toy import build_model, build_tokenizer  # noqa: E402


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    tok = build_tokenizer()
    model = peft.get_peft_model(build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    cb = RelexCallback(tcut=4, horizons=[8])
    args = types.SimpleNamespace(output_dir=out, resume_from_checkpoint=None)
    try:
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
        msg = "NO ERROR"
    except RelexInputError as e:
        msg = f"RelexInputError: {e}"
    with open(os.path.join(out, f"rank-{dist.get_rank()}.txt"), "w") as f:
        f.write(msg)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from _exit import exit_without_finalization

    exit_without_finalization(main())
