"""What the non-finite check of theta_0 at ``on_train_begin`` costs (``trajectory.window.check_base_finite``): a sum
per tensor first (NaN/Inf iff the tensor holds one, or it overflows, then the exact chunked ``isfinite`` decides)
against ``isfinite().all()``, with a plain copy of the same tensor as the machine's floor, interleaved.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/base_check.py              # 64M float32 elements (256 MB)
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=float, default=64e6)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    x = torch.randn(int(a.numel))
    out = torch.empty_like(x)
    runs = {"copy (floor)": lambda: out.copy_(x), "sum (shipped)": lambda: bool(torch.isfinite(x.sum())),
            "isfinite().all()": lambda: all(bool(torch.isfinite(c).all()) for c in x.split(1 << 22))}
    times = {k: [] for k in runs}
    for _ in range(a.repeat):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    print(f"{x.numel():,} float32 elements, {torch.get_num_threads()} thread(s), {a.repeat} interleaved runs (median):")
    for k, v in times.items():
        print(f"  {k:18s} {statistics.median(v):.4f} s")


if __name__ == "__main__":
    main()
