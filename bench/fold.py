"""Streaming fold benchmark: buffer bytes and end-of-window time at a fixed number of slots K as tcut grows.

    PYTHONPATH=. python bench/fold.py [--elements 2000000] [--slots 8] [--fold-rank 8] [--dtype bfloat16]

(the figures of docs/distributed.md, "Memory": ``--elements 1000000``, the other options at their defaults)

For each tcut it records a rank-1-plus-noise trajectory of ``tcut`` steps into (a) a folded store with K slots and
(b) the exact store holding the whole window, then prints the buffer bytes of each, the total time spent folding
during the window, the end-of-window solve time, and the agreement of the extrapolated move (cosine, relative
error) at H = 10 tcut. Figures only; nothing is asserted.
"""

import argparse
import time

import torch

from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.params import TensorSpec
from relex_callback.core.solver import SolveOptions, solve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=2_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--fold-rank", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tcuts", default="25,50,100,200")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.elements // args.tensors
    specs = lambda: [TensorSpec(f"t{i}", (n,), torch.float32, n) for i in range(args.tensors)]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    theta0 = [torch.randn(n, generator=g) for _ in range(args.tensors)]
    v = [torch.randn(n, generator=g) for _ in range(args.tensors)]
    print(f"D={args.elements:,} elements in {args.tensors} tensors, K={args.slots} slots, fold_rank={args.fold_rank}, "
          f"{args.dtype}, {args.threads} threads")
    print(f"{'tcut':>5} {'folded bytes':>14} {'exact bytes':>14} {'folds':>5} {'fold s (window)':>16} "
          f"{'solve s folded':>15} {'solve s exact':>14} {'min cos':>10} {'max rel':>9}")
    for tcut in [int(x) for x in args.tcuts.split(",")]:
        folded = TrajectoryStore(specs(), args.slots, dtype=args.dtype, storage="host", fold_rank=args.fold_rank)
        exact = TrajectoryStore(specs(), tcut, dtype=args.dtype, storage="host")
        folded.set_theta0(theta0)
        exact.set_theta0(theta0)
        fold_s = 0.0
        for t in range(1, tcut + 1):
            row = [
                theta0[i] + (0.001 * t + 0.003) * v[i] + 1e-4 * torch.randn(n, generator=g) for i in range(args.tensors)
            ]
            t0 = time.perf_counter()
            folded.snapshot(t, row)
            fold_s += time.perf_counter() - t0
            exact.snapshot(t, row)
        t0 = time.perf_counter()
        sf = solve(specs=folded.specs, **folded.solve_inputs(), options=SolveOptions(method="gram"))
        t_f = time.perf_counter() - t0
        t0 = time.perf_counter()
        se = solve(specs=exact.specs, **exact.solve_inputs(), options=SolveOptions(method="gram"))
        t_e = time.perf_counter() - t0
        cos, rel = 1.0, 0.0
        H = 10 * tcut
        for i in range(args.tensors):
            a = se.extrapolate(i, H, theta0[i]) - theta0[i]
            b = sf.extrapolate(i, H, theta0[i]) - theta0[i]
            cos = min(cos, float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            rel = max(rel, float((a - b).norm() / a.norm()))
        print(f"{tcut:>5} {folded.buffer_bytes:>14,} {exact.buffer_bytes:>14,} {folded.folds:>5} {fold_s:>16.3f} "
              f"{t_f:>15.3f} {t_e:>14.3f} {cos:>10.6f} {rel:>9.2e}")
        del folded, exact


if __name__ == "__main__":
    main()
