"""Benchmark: the memory a checkpoint shard and a state file take to write, relex's writers beside ``save_file``.

Each case runs in a fresh process (so that no freed memory of an earlier case is reused) and prints the peak RSS
above the RSS before the write (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux only) and the
seconds of the write with its ``fsync``:

* a shard of ``--tensors`` float32 tensors of ``--numel`` elements each, every tensor computed when asked (theta_0 + c
  v, as a horizon's are): ``save_file`` of the whole shard (every tensor computed first, as a writer that hands
  ``save_file`` a dict must) against :func:`relex_callback.files.checkpoints.write_shard` (one tensor at a time);
* a state file of bf16 directions that are views of one ``V`` (as a solution's are): ``save_file`` of their clones
  (it refuses views of one storage) against :func:`relex_callback.files.checkpoints.write_tensors`.

    python bench/write_memory.py [--tensors 100 --numel 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key):
                return int(ln.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def case(kind: str, n: int, k: int, path: str):
    import torch
    from safetensors.torch import save_file

    from relex_callback.files.checkpoints import write_shard, write_tensors

    g = torch.Generator().manual_seed(0)
    if kind.startswith("shard"):
        theta, v = torch.randn(n * k, generator=g), torch.randn(n * k, generator=g).to(torch.bfloat16)
        keys = [f"t{i:04d}" for i in range(n)]
        meta = {key: ((k,), torch.float32) for key in keys}

        def produce(key):
            i = int(key[1:])
            return torch.add(theta[i * k: (i + 1) * k], v[i * k: (i + 1) * k], alpha=0.5)
    else:
        V = torch.randn(1, n * k, generator=g).to(torch.bfloat16)
        tensors = {f"t{i:04d}": V[:, i * k: (i + 1) * k] for i in range(n)}
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    if kind == "shard-save_file":
        save_file({key: produce(key) for key in keys}, path, metadata={"format": "pt"})
    elif kind == "shard-relex":
        write_shard(path, keys, meta, produce)
    elif kind == "state-save_file":
        save_file({key: t.contiguous().clone() for key, t in tensors.items()}, path, metadata={"format": "pt"})
    else:
        write_tensors(path, tensors, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    print(f"{time.perf_counter() - t0:.2f} {(_status('VmHWM:') - base) / 1e9:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        case(args.case, args.tensors, args.numel, args.path)
        return
    n, k = args.tensors, args.numel
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"a shard of {n} float32 tensors ({n * k * 4 / 1e9:.2f} GB); a state file of {n} bf16 directions "
          f"({n * k * 2 / 1e9:.2f} GB)")
    print("| what | writer | seconds (with fsync) | peak RSS above before the write, GB |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeat):
            for kind in ("shard-save_file", "shard-relex", "state-save_file", "state-relex"):
                path = os.path.join(d, "probe.safetensors")
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", kind, "--path", path,
                                      "--tensors", str(n), "--numel", str(k)], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()
                os.remove(path)
                what, writer = kind.split("-")
                name = {"save_file": "save_file", "relex": "write_shard" if what == "shard" else "write_tensors"}
                print(f"| {what} | {name[writer]} | {out[0]} | {out[1]} |")


if __name__ == "__main__":
    main()
