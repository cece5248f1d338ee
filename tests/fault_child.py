"""Child process for tests/test_faults.py: a tiny causal-LM Trainer run with RelexCallback, optionally killed.

    python tests/fault_child.py OUT --tcut 8 --horizons 40 [--storage disk] [--save-steps 3] [--kill-at-step 5]
        [--resume CKPT] [--stall-write-horizon 40] [--record DIR]

--record DIR: the trainable parameters at train begin (if that step is not recorded yet) and at the end of each step
up to tcut, exact float32 copies, one file per step (DIR/step-<t>.pt, written atomically): a resumed run overwrites
the steps it trains again, so DIR ends holding the trajectory the finishing run's buffer holds (test code only).
"""

import argparse
import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)


def lm_dataset(tok, n=64, seed=0):
    from relex_callback.examples.toy import arithmetic_problems

    rows = []
    for p in arithmetic_problems(n, seed=seed):
        ids = tok(p["prompt"] + p["answer"])["input_ids"][:8]
        ids = ids + [tok.pad_token_id] * (8 - len(ids))
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 8})
    return rows


def build_trainer(out, callbacks, *, max_steps, save_steps=None, seed=0, lr=5e-3, scheduler="constant"):
    from transformers import Trainer, TrainingArguments

    from relex_callback.examples.toy import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type=scheduler,
        max_steps=max_steps, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=100, report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        disable_tqdm=True, save_only_model=False,
    )
    return (
        Trainer(model=model, args=args, train_dataset=lm_dataset(tok), processing_class=tok, callbacks=callbacks),
        model,
        tok,
    )


def main():
    from transformers import TrainerCallback

    from relex_callback import RelexCallback

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tcut", type=int, default=8)
    ap.add_argument("--horizons", default="40")
    ap.add_argument("--storage", default="host")
    ap.add_argument("--save-steps", type=int, default=None)
    ap.add_argument("--kill-at-step", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--stall-write-horizon", type=int, default=None)
    ap.add_argument("--max-shard-size", default="50GB")
    ap.add_argument("--record", default=None, help="save the trainable parameters of each step <= tcut (see above)")
    ap.add_argument("--timeline", default=None, help="append 'event seconds-since-start' lines (train begin/end)")
    a = ap.parse_args()
    t_start = time.time()

    def mark(event):
        if a.timeline:
            with open(a.timeline, "a") as fh:
                fh.write(f"{event} {time.time() - t_start:.3f}\n")

    class Timeline(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mark("begin")

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if a.kill_at_step is not None and state.global_step == a.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    class Record(TrainerCallback):
        def _save(self, step, model, only_new=False):
            path = os.path.join(a.record, f"step-{step}.pt")
            if step > a.tcut or (only_new and os.path.exists(path)):
                return
            os.makedirs(a.record, exist_ok=True)
            tmp = path + f".tmp-{os.getpid()}"
            torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, tmp)
            os.replace(tmp, path)

        def on_train_begin(self, args, state, control, model=None, **kw):
            if a.record:
                self._save(state.global_step, model, only_new=True)

        def on_step_end(self, args, state, control, model=None, **kw):
            if a.record:
                self._save(state.global_step, model)

    if a.stall_write_horizon is not None:
        # fault timing (not a replacement): the real writer runs; after the first shard of the chosen horizon it
        # tells the parent and waits to be SIGKILLed mid-checkpoint
        from relex_callback.files import checkpoints as writer

        real = writer.write_tensor_file

        def stalling(path, *args, **kw):
            real(path, *args, **kw)
            if f".step-{a.stall_write_horizon}.tmp-" in path:
                open(os.path.join(a.out, "WRITING"), "w").close()
                time.sleep(120)

        writer.write_tensor_file = stalling

    cb = RelexCallback(tcut=a.tcut, horizons=a.horizons, storage=a.storage, dtype="float32",
                       max_shard_size=a.max_shard_size)
    trainer, model, tok = build_trainer(
        a.out, [cb, Record(), KillAt(), Timeline()], max_steps=4 * a.tcut, save_steps=a.save_steps
    )
    if a.resume is None:
        model.save_pretrained(os.path.join(a.out, "base"))
        tok.save_pretrained(os.path.join(a.out, "base"))
    trainer.train(resume_from_checkpoint=a.resume)
    mark("end")
    json.dump({"global_step": trainer.state.global_step}, open(os.path.join(a.out, "DONE.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())
