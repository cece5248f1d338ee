"""What RelexCallback costs a training run: wall time per step with and without the snapshot, and the
end-of-window work (solve + writing two horizons) in training steps.

One run, interleaved: a plain transformers ``Trainer`` (causal-LM loss, a Qwen2-architecture model built locally)
with ``RelexCallback(stride=2)``, so even steps take a snapshot and odd steps do not; both kinds of step share the
same process, data and machine load. The window ends at ``tcut`` with two horizons written; that time is compared
with the median training step.

    python bench/overhead.py                       # ~45M-parameter model, fp32, bf16 buffer
    python bench/overhead.py --hidden 512 --layers 4 --batch 4

Targets (docs/callback.md, "Overhead"): snapshot overhead <= 3% of a step; end of window <= 2 steps. No assertion:
figures are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging
from relex_callback import RelexCallback
from relex_callback.examples.toy import build_model, build_tokenizer


class StepTimer(TrainerCallback):
    """Wall time from ``on_step_begin`` to the end of ``on_step_end`` (it is the last callback in the list, after
    RelexCallback's snapshot)."""

    def __init__(self):
        self.t0 = self.c0 = None
        self.times = {}
        self.cpu = {}

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.times[state.global_step] = time.perf_counter() - self.t0
        self.cpu[state.global_step] = time.process_time() - self.c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--tcut", type=int, default=24, help="even; steps 1..tcut-1 are timed")
    p.add_argument("--dtype", default="bfloat16", help="buffer dtype")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from datasets import Dataset

    hf_logging.set_verbosity_error()
    tok = build_tokenizer()
    model = build_model(
        tok,
        hidden_size=a.hidden,
        layers=a.layers,
        heads=max(1, a.hidden // 64),
        kv_heads=max(1, a.hidden // 128),
        intermediate_size=int(a.hidden * 8 / 3) // 64 * 64,
    )
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (a.batch * (a.tcut + 4), a.seq), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    timer = StepTimer()
    snap_times = []
    snap_cpu = []

    class TimedRelex(RelexCallback):
        """Also times the callback's own work per step directly (less sensitive to machine load than a difference
        of two noisy step times)."""

        def on_step_end(self, args, state, control, **kw):
            t, c = time.perf_counter(), time.process_time()
            super().on_step_end(args, state, control, **kw)
            if state.global_step % 2 == 0 and state.global_step < a.tcut:
                snap_times.append(time.perf_counter() - t)
                snap_cpu.append(time.process_time() - c)

    with tempfile.TemporaryDirectory() as out:
        cb = TimedRelex(tcut=a.tcut, horizons=[10 * a.tcut, 20 * a.tcut], stride=2, dtype=a.dtype, storage="host")
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=a.batch,
            learning_rate=1e-4,
            max_steps=a.tcut + 2,
            lr_scheduler_type="constant",
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb, timer])
        trainer.train()
        assert trainer.state.global_step == a.tcut
        eow = [
            e["relex/end_of_window_seconds"] for e in trainer.state.log_history if "relex/end_of_window_seconds" in e
        ][0]
        solve = cb.report["solve_seconds"]
        write = cb.report["write_seconds"]
    steps = sorted(timer.times)[1:-1]  # step 1 warms up; the last one holds the end of the window
    with_snap = [timer.times[s] for s in steps if s % 2 == 0]
    without = [timer.times[s] for s in steps if s % 2 == 1]
    m_with, m_without = statistics.median(with_snap), statistics.median(without)
    print(
        f"model: Qwen2 hidden={a.hidden} layers={a.layers}, {n_params / 1e6:.1f}M parameters (fp32), batch "
        f"{a.batch}x{a.seq}, "
        f"{a.threads} threads, buffer {a.dtype}"
    )
    print(f"step without snapshot: median {m_without:.3f}s (n={len(without)}, min {min(without):.3f}s)")
    print(f"step with snapshot:    median {m_with:.3f}s (n={len(with_snap)}, min {min(with_snap):.3f}s)")
    print(f"snapshot overhead: {100 * (m_with / m_without - 1):+.1f}% of a step (median), "
          f"{100 * (min(with_snap) / min(without) - 1):+.1f}% (min)   target <= 3%")
    snap = statistics.median(snap_times)
    print(
        f"snapshot itself (timed inside the callback): median {snap:.4f}s = {100 * snap / m_without:.2f}% of the "
        "median "
        f"step, {100 * snap / min(without):.2f}% of the fastest step"
    )
    # CPU time (user + system, all threads of this process) does not count the time other processes hold the cores:
    # on a shared machine it is the steadier measure of what the snapshot costs relative to a step
    cpu_step = statistics.median([timer.cpu[s] for s in steps if s % 2 == 1])
    cpu_snap = statistics.median(snap_cpu)
    print(f"CPU time: step without snapshot median {cpu_step:.3f}s, snapshot median {cpu_snap:.4f}s = "
          f"{100 * cpu_snap / cpu_step:.2f}% of a step's CPU time")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"end of window (solve {solve:.3f}s + write 2 horizons {write:.3f}s): {eow:.3f}s = {eow / m_without:.2f} steps "
        " "
        " target <= 2"
    )


if __name__ == "__main__":
    main()
