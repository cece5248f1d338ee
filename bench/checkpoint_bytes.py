"""Bytes each trainer checkpoint inside the RELEX window adds for the trajectory (light checkpoints).

    python bench/checkpoint_bytes.py [--storage host|disk] [--out /tmp/relex_ckpt_bytes]

A tiny GRPO run (the locally built toy model, 75,520 fp32 parameters) with RelexCallback(tcut=6, dtype bfloat16) and
a trainer checkpoint at every step; prints, per checkpoint, the bytes of its relex_trajectory/ counted the way one
`du` over all of them counts (a hard-linked file once, at its first checkpoint), and the per-row size for scale.
Runs against any version of the package (the same script measured the figures before the light checkpoints).
"""

import argparse
import os
import shutil
from relex_callback import RelexCallback
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default="host")
    ap.add_argument("--out", default="/tmp/relex_ckpt_bytes")
    a = ap.parse_args()
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    shutil.rmtree(a.out, ignore_errors=True)
    tok = build_tokenizer()
    model = build_model(tok)

    def digits(completions, **kw):
        return [sum(ch.isdigit() for ch in str(c)) / max(1, len(str(c))) for c in completions]

    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      learning_rate=1e-3, lr_scheduler_type="constant", max_steps=6, logging_steps=100,
                      save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                      disable_tqdm=True)
    cb = RelexCallback(tcut=6, horizons=[15], dtype="bfloat16", storage=a.storage)
    GRPOTrainer(model=model, reward_funcs=digits, args=args, train_dataset=Dataset.from_list(arithmetic_problems(64)),
                processing_class=tok, callbacks=[cb]).train()
    seen = set()
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"storage={a.storage}; one bf16 row = {2 * D:,} bytes ({D:,} tracked elements)")
    total = 0
    for step in range(1, 6):
        d = os.path.join(a.out, f"checkpoint-{step}", "relex_trajectory")
        added = 0
        for root, _, files in os.walk(d):
            for f in files:
                st = os.stat(os.path.join(root, f))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    added += st.st_size
        total += added
        print(f"checkpoint-{step}: +{added:,} bytes")
    print(f"total {total:,} bytes")


if __name__ == "__main__":
    main()
