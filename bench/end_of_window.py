"""Benchmark: the callback's end of window at a real model size, beside its floors measured in the same run.

A Qwen2-architecture model built locally (default ~101M parameters: hidden 768, 12 layers, vocab 32768, tied
embeddings; nothing downloaded), a bf16 trajectory buffer filled with ``--steps`` synthetic snapshots (theta_0 +
c_t v + noise), then ``pipeline.finalize`` with the writer the callback uses (``FullModelWriter(ModelSource)``),
two horizons. Printed side by side:

* solve time (Gram + direction passes) vs two reads of the buffer at this machine's copy bandwidth, measured here
  (a 1 GB ``copy_``);
* writing time (state file, report and two horizons; then the two horizons alone, by the same writer) vs
  ``model.save_pretrained`` of the same two checkpoints (plain, and with ``fsync`` as relex's writes are durable),
  and vs the tensor-by-tensor writer of ``relex_callback.files.streaming`` writing the same horizons from the same
  solution;
* a profile (CPU time) of the writes' top functions.

    python bench/end_of_window.py [--hidden 768 --layers 12 --vocab 32768 --steps 16]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM
from relex_callback.config import RelexSettings
from relex_callback.files.checkpoints import ModelSource
from relex_callback.files.writers import FullModelWriter
from relex_callback.params import TensorSpec
from relex_callback.pipeline.finalize import finalize
from relex_callback.files.streaming import write_horizon_streaming
from relex_callback.trajectory.store import TrajectoryStore


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of ``dst.copy_(src)`` over ``nbytes`` (best of 3; each byte read once and written once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def fsync_tree(d: str):
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=16, help="recorded steps (tcut)")
    ap.add_argument("--dtype", default="bfloat16", help="buffer dtype")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    specs = [TensorSpec(name=k, shape=tuple(p.shape), dtype=p.dtype, local_numel=p.numel()) for k, p in params.items()]
    T = args.steps
    horizons = [5 * T, 10 * T]
    root = args.dir or tempfile.mkdtemp(prefix="relex_eow_")
    os.makedirs(root, exist_ok=True)
    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n / 1e6:.1f}M parameters "
          f"(fp32); {T} steps in a {args.dtype} buffer; horizons {horizons}; {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    store = TrajectoryStore(specs, T, dtype=args.dtype, storage="host")
    store.set_theta0([p.detach().reshape(-1) for p in params.values()])
    g = torch.Generator().manual_seed(1)
    dirs = {k: torch.randn(p.numel(), generator=g) / p.numel() ** 0.5 for k, p in params.items()}
    t0 = time.perf_counter()
    for t in range(1, T + 1):
        c = 0.01 * t + 0.002 * (-1) ** t
        store.snapshot(t, [p.detach().reshape(-1) + c * dirs[k] for k, p in params.items()])
    t_fill = time.perf_counter() - t0
    bb = store.buffer_bytes
    del dirs

    bw = copy_bandwidth()
    two_reads = 2 * bb / bw

    out = os.path.join(root, "relex")
    writer = FullModelWriter(ModelSource(model), max_shard_size="5GB")
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    sol, rep = finalize(store, writer, RelexSettings(tcut=T, horizons=tuple(horizons)), out_dir=out)
    prof.disable()
    solve_s, write_s = rep["solve_seconds"], rep["write_seconds"]

    # the same horizons from the same solution, written tensor by tensor (relex_callback.files.streaming)
    src = writer.source
    t_stream = float("inf")
    for rep_i in range(2):  # best of 2 (the machine is shared)
        out2 = os.path.join(root, f"streamed-{rep_i}")
        os.makedirs(out2)
        t0 = time.perf_counter()
        for h in horizons:
            write_horizon_streaming(out2, h, T, sol, writer.theta0_of, src, max_shard_size="5GB")
        t_stream = min(t_stream, time.perf_counter() - t0)
    # the horizons alone, by the writer finalize used (its write time also holds the state file and report.json)
    t_full = float("inf")
    for rep_i in range(2):  # best of 2
        out4 = os.path.join(root, f"full-{rep_i}")
        os.makedirs(out4)
        t0 = time.perf_counter()
        for h in horizons:
            writer.write_horizon(out4, h, T, False)
        t_full = min(t_full, time.perf_counter() - t0)
    # the state file alone (part of finalize's write time)
    out3 = os.path.join(root, "state-only")
    os.makedirs(out3)
    t0 = time.perf_counter()
    writer.write_state(out3, T)
    t_state_file = time.perf_counter() - t0

    for h in horizons:
        a = load_file(os.path.join(out, f"step-{h}", "model.safetensors"))
        b = load_file(os.path.join(out2, f"step-{h}", "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the two writers disagree"

    # save_pretrained of the same two checkpoints
    sp = [float("inf"), float("inf")]
    for rep_i in range(2):  # best of 2, plain and durable interleaved
        for durable in (False, True):
            t0 = time.perf_counter()
            for h in horizons:
                d = os.path.join(root, f"sp-{h}-{int(durable)}-{rep_i}")
                model.save_pretrained(d, max_shard_size="5GB")
                if durable:
                    fsync_tree(d)
            sp[durable] = min(sp[durable], time.perf_counter() - t0)
    t_state = rep.get("seconds", {})
    print(f"buffer {bb / 1e9:.2f} GB filled in {t_fill:.1f} s; copy bandwidth {bw / 1e9:.2f} GB/s (1 GB copy_)")
    print("| what | seconds | floor | seconds | ratio |\n|---|---|---|---|---|")
    print(f"| solve ({rep['solver']}: {', '.join(f'{k} {v:.2f}' for k, v in t_state.items())}) | {solve_s:.2f} | "
          f"two reads of the {bb / 1e9:.2f} GB buffer at {bw / 1e9:.2f} GB/s | {two_reads:.2f} | "
          f"{solve_s / two_reads:.2f} |")
    print(f"| write: the state file alone (state.save_state, {sum(s.local_numel for s in specs) * 2 / 1e9:.2f} GB of "
          f"bf16 directions) | {t_state_file:.2f} | | | |")
    print(f"| write: state + {len(horizons)} horizons (writers.FullModelWriter) | {write_s:.2f} | save_pretrained x"
          f"{len(horizons)} (+ fsync) | {sp[0]:.2f} ({sp[1]:.2f}) | {write_s / sp[1]:.2f} vs durable |")
    print(f"| write: {len(horizons)} horizons alone (writers.FullModelWriter.write_horizon) | {t_full:.2f} | "
          f"save_pretrained x{len(horizons)} + fsync | {sp[1]:.2f} | {t_full / sp[1]:.2f} |")
    print(f"| write: {len(horizons)} horizons tensor by tensor (streaming.write_horizon_streaming) | {t_stream:.2f} | "
          f"save_pretrained x{len(horizons)} + fsync | {sp[1]:.2f} | {t_stream / sp[1]:.2f} |")
    print("top CPU time inside finalize:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
