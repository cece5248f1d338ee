"""What the fixed-width copy of the float32 CPU Gram costs, and what it buys (docs/callback.md, "Every path gives the
same bytes").

The float32 CPU Gram used to multiply views of the arena; with several threads its last bit depended on the arena's
width and the tensor's offset in it, so the callback and ``relex extrapolate`` (which tracks the frozen tensors too)
differed by one ulp. The package (``core.kernels.reference.gram_reference``) now copies each chunk into a scratch of
fixed width. This times the old view version (kept here as ``gram_view``) against the shipped one on the same float32
arena, interleaved (the machine's speed varies), and checks both for layout independence.

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/gram_copy_ab.py            # 1.2 GB: T=75 x 4M elements
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from relex_callback.core.kernels.reference import CHUNK, _chunks, gram_reference  # noqa: E402


@torch.no_grad()
def gram_view(M, offsets, numels, chunk=CHUNK):
    """The old float32 CPU Gram: products of views of the arena (wider chunks), summed in float64."""
    T = M.shape[0]
    G = torch.zeros(len(offsets), T, T, dtype=torch.float64)
    for i, (o, n) in enumerate(zip(offsets, numels)):
        for s, e in _chunks(o, n, chunk * 8):
            c = M[:, s:e]
            G[i] += (c @ c.T).double()
    return G


gram_copied = gram_reference  # what ships


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=75)
    ap.add_argument("--numel", type=float, default=4e6)
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    n = int(a.numel) // a.tensors
    sizes, offs = [n] * a.tensors, [i * n for i in range(a.tensors)]
    M = torch.randn(a.T, n * a.tensors)
    ta, tb = [], []
    for _ in range(a.repeat):
        t = time.perf_counter()
        gram_view(M, offs, sizes)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        gram_copied(M, offs, sizes)
        tb.append(time.perf_counter() - t)
    print(
        f"T={a.T} elements={n * a.tensors:,} float32 ({M.numel() * 4 / 1e9:.2f} GB), threads "
        f"{torch.get_num_threads()}, "
        f"{a.repeat} interleaved runs: view (the old code) median {statistics.median(ta):.3f} s (min {min(ta):.3f}), "
        f"copied (shipped) median {statistics.median(tb):.3f} s (min {min(tb):.3f})"
    )
    # layout dependence: one 6 x 8192 tensor placed in arenas of several widths and offsets (the first is the
    # tensor alone, contiguous)
    x = torch.randn(6, 8192)
    layouts = [(0, 0), (0, 64), (0, 333), (100, 64), (4096, 4160)]
    arenas = []
    for off, extra in layouts:
        w = torch.zeros(6, off + 8192 + extra)
        w[:, off:off + 8192] = x
        arenas.append((w, off))
    for name, fn in (("view", gram_view), ("copied", gram_copied)):
        g = [fn(w, [off], [8192]) for w, off in arenas]
        same = [torch.equal(g[0], gi) for gi in g[1:]]
        print(f"{name}: Gram of one 6 x 8192 tensor in {len(layouts)} arena layouts (offset, extra width) {layouts}: "
              f"equal to the first: {same}")

if __name__ == "__main__":
    main()
