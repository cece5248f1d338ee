"""Benchmark: `relex extrapolate` end to end (a subprocess: imports included) over synthetic fp32 checkpoints of a
76.6M-parameter Qwen2-shaped model (hidden 1024, 8 layers), 20 checkpoints, 2 horizons, beside its floors measured
in the same run.

    python bench/extrapolate.py [--dir /tmp/relex_bench] [--repeat 2] [--modes streaming,buffered] [--dtype bfloat16]

Each repeat measures, in this order and on the same (shared) machine:

* read floor: `cat` of the 21 checkpoint files to /dev/null (page cache warm: the files were just read);
* import floor: `python -c "import torch, safetensors"`;
* write floor: a plain safetensors `save_file` of tensors of the size relex writes (each horizon: the model in its
  dtype; the state file: the directions in --dtype), in a fresh process, imports excluded, then `fsync` of the files
  (relex's outputs are durable: every file is flushed before its rename); both are printed, the sum uses the second;
* `relex extrapolate` with `--streaming` and with `--no-streaming`: wall, peak RSS, user/sys time, and the ratio of
  the wall to the sum of the three floors; for the streamed run, its seconds by phase (import, check, read,
  subtract, Gram, solve, directions, state, write_early: the horizons' tensors written during the solve, write: the
  horizons after the state file) beside the read and import floors of the same repeat (where the
  blocks are read ahead on a thread, read and subtract are that thread's seconds and read_wait the wall's part);
* the streamed command reads the next block on a thread where it may use two CPUs (the default); with `--modes
  ...,inturn` it also runs with `RELEX_READ_AHEAD=0` (each block read when the solve asks for it), and with
  `readahead` with `RELEX_READ_AHEAD=1`;
* with `--baseline REPO`, the same streamed command of another checkout (before and after, same floors).

The checkpoints are built once and kept in --dir (never in the repository); the weights move along a nearly rank-1
path plus a small noise. Goals: peak RSS <= 1 GB, wall <= 1.5x the floors' sum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from safetensors.torch import save_file
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen2-shaped: hidden 1024, 8 layers, 16 heads (8 KV heads), MLP 1536, vocab 13312, tied embeddings: 76.6M params.
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1024,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 13312,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def shapes(cfg) -> dict:
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = {"model.embed_tokens.weight": (v, h)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    out["model.norm.weight"] = (h,)
    return out


def build(root: str, n_ckpt: int, every: int):
    marker = os.path.join(root, "done.json")
    want = {"config": CONFIG, "n": n_ckpt, "every": every, "version": 1}
    if os.path.isfile(marker) and json.load(open(marker)) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    g = torch.Generator().manual_seed(0)
    shp = shapes(CONFIG)
    print(
        f"building {n_ckpt} checkpoints of {sum(math.prod(s) for s in shp.values()) / 1e6:.1f}M parameters in {root} "
        "...",
        flush=True,
    )
    theta0 = {k: (0.02 * torch.randn(s, generator=g)) for k, s in shp.items()}
    direction = {}
    noise = {}
    for k, s in shp.items():
        v = torch.randn(s, generator=g)
        direction[k] = v / v.norm()
        noise[k] = 1e-5 * torch.randn(s, generator=g)

    def save(d, tensors):
        os.makedirs(d)
        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            os.path.join(d, "model.safetensors"),
            metadata={"format": "pt"},
        )
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CONFIG, f, indent=1)

    save(os.path.join(root, "base"), theta0)
    for j in range(1, n_ckpt + 1):
        t = j * every
        c = 0.01 * t + 0.05 + 0.002 * ((-1) ** j)
        # a nearly rank-1 path: c_t along v, plus a noise whose sign and size vary by step
        save(os.path.join(root, "ckpts", f"checkpoint-{t}"),
             {k: theta0[k] + c * direction[k] + ((j % 3) - 1) * noise[k] for k in shp})
    json.dump(want, open(marker, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/relex_bench")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the CLI (default: unset)")
    ap.add_argument("--modes", default="streaming,buffered",
                    help="comma separated: streaming (the default read ahead: on with two CPUs), buffered, inturn "
                         "(streaming with RELEX_READ_AHEAD=0: each block read when the solve asks for it), readahead "
                         "(RELEX_READ_AHEAD=1: the next block read on a thread while the solve uses the current one)")
    ap.add_argument("--baseline", default=None, metavar="REPO",
                    help="also run `relex extrapolate --streaming` of another checkout (e.g. a worktree of an older "
                         "commit) in each repeat, beside this one's: before and after under the same floors")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.dir, args.checkpoints, args.every)
        return
    # built in a child process: a process started by this one begins with this one's peak RSS (Linux keeps the
    # high-water mark across fork and exec), so building here (GBs of tensors) would be counted as relex's peak
    subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", "--dir", args.dir, "--checkpoints",
                    str(args.checkpoints), "--every", str(args.every)], check=True)
    files = [os.path.join(args.dir, "base", "model.safetensors")] + [
        os.path.join(args.dir, "ckpts", f"checkpoint-{j * args.every}", "model.safetensors")
        for j in range(1, args.checkpoints + 1)
    ]
    total = sum(os.path.getsize(f) for f in files)
    tcut = args.checkpoints * args.every
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["RELEX_TIMING"] = "1"
    env.pop("RELEX_READ_AHEAD", None)  # the inturn and readahead modes set it
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    n_params = sum(math.prod(x) for x in shapes(CONFIG).values())
    dir_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    write_bytes = 2 * 4 * n_params + dir_bytes * n_params
    modes = [m for m in args.modes.split(",") if m] + (["baseline"] if args.baseline else [])
    base_env = dict(env)
    if args.baseline:
        base_env["PYTHONPATH"] = os.path.abspath(args.baseline) + os.pathsep + os.environ.get("PYTHONPATH", "")
    print(f"{len(files)} files, {total / 1e9:.2f} GB; horizons {5 * tcut},{10 * tcut}; --dtype {args.dtype}; solver "
          f"{args.solver}; relex writes {write_bytes / 1e9:.2f} GB; {os.cpu_count()} CPUs")
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    rows = []
    for r in range(args.repeat):
        cpu = {}
        floors = {}
        floors["read"], cpu["read"] = _timed(["cat", *files])
        floors["import"], cpu["import"] = _timed([sys.executable, "-c", "import torch, safetensors"])
        plain, floors["write"], cpu["write"] = _write_floor(args.dir, n_params, args.dtype, env)
        fsum = sum(floors.values())
        csum = sum(cpu.values())
        print(
            f"run {r + 1}: floors: read (cat) {floors['read']:.2f} s ({total / 1e9 / floors['read']:.1f} GB/s), import "
            f"{floors['import']:.2f} s, write (save_file of {write_bytes / 1e9:.2f} GB) {plain:.2f} s, + fsync "
            "(relex's "
            f"outputs are durable) {floors['write']:.2f} s; sum "
            f"{fsum:.2f} s (CPU time of the floors: {csum:.2f} s) | load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        for mode in modes:
            out = os.path.join(args.dir, "out")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "relex_callback.offline.cli", "extrapolate", "--base",
                   os.path.join(args.dir, "base"), "--checkpoints", os.path.join(args.dir, "ckpts"), "--horizons",
                   f"{5 * tcut},{10 * tcut}", "--out", out, "--dtype", args.dtype, "--solver", args.solver,
                   "--no-progress", "--no-streaming" if mode == "buffered" else "--streaming"]
            # `python -m` puts the working directory first on sys.path: each checkout runs from its own root
            run_env = {"baseline": base_env, "readahead": dict(env, RELEX_READ_AHEAD="1"),
                       "inturn": dict(env, RELEX_READ_AHEAD="0")}.get(mode, env)
            wall, rss, ru, se = _run(cmd, run_env, os.path.abspath(args.baseline) if mode == "baseline" else REPO)
            rep = json.load(open(os.path.join(out, "report.json")))
            secs = rep.get("seconds", {})
            rows.append((r + 1, mode, wall, rss, fsum, ru.ru_utime + ru.ru_stime, csum))
            print(
                f"    {mode:9s}: wall {wall:.2f} s = {wall / fsum:.2f}x the floors (CPU "
                f"{ru.ru_utime + ru.ru_stime:.2f} "
                f"s = {(ru.ru_utime + ru.ru_stime) / csum:.2f}x theirs), peak RSS {rss / 1e9:.2f} GB, user "
                f"{ru.ru_utime:.2f} s, sys {ru.ru_stime:.2f} s | solve {rep.get('solve_seconds', 0):.2f} s "
                f"({', '.join(f'{k} {v:.2f}' for k, v in secs.items())}), write {rep.get('write_seconds', 0):.2f} s"
            )
            for ln in se.splitlines():
                if ln.startswith("relex: timing"):
                    print("       ", ln)
                    if mode != "buffered":
                        print("        breakdown:", _breakdown(ln, wall), f"| floors of this run: read (cat) "
                              f"{floors['read']:.2f} s, import {floors['import']:.2f} s; wall / (read + import) = "
                              f"{wall / (floors['read'] + floors['import']):.2f}x")
        shutil.rmtree(os.path.join(args.dir, "out"), ignore_errors=True)
    print("\n| run | mode | wall s | peak RSS GB | floors' sum s | wall / floors | CPU s | CPU / floors' CPU |\n"
          "|---|---|---|---|---|---|---|---|")
    for r, mode, wall, rss, fsum, c, cs in rows:
        print(
            f"| {r} | {mode} | {wall:.2f} | {rss / 1e9:.2f} | {fsum:.2f} | {wall / fsum:.2f} | {c:.2f} | {c / cs:.2f} |"
        )
    print("goals: peak RSS <= 1 GB, wall <= 1.5x the floors' sum (2-core machine, warm page cache)")


def _breakdown(line: str, wall: float) -> str:
    """The streamed run's seconds by phase, from its ``RELEX_TIMING`` line: import (and interpreter start: the wall
    minus the timed phases), check (discovery, headers, the belongs check), read, subtract, Gram, solve (eigenpairs,
    fits, backtest), directions, state (parts + join), write_early (the horizons' tensors written during the solve,
    as each group is solved), write (the horizons after the state file: their commit, fsync included, or all of
    them where none was begun early), other."""
    head = re.search(r"header checks ([\d.]+) s, streaming ([\d.]+) s \((.*)\)", line)
    if head is None:
        return "(no timing line)"
    check, streaming = float(head.group(1)), float(head.group(2))
    ph = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.e+-]+)", head.group(3))}
    total = ph.get("total", 0.0)
    # with the reads on a prefetch thread (a `read_wait` phase), the wall sees only the wait for them: read and
    # subtract are that thread's seconds, overlapped with the Gram, solve, directions and state of the block before
    overlapped = "read_wait" in ph
    waited = ("read_wait",) if overlapped else ("read", "subtract")
    parts = {
        "import": wall - check - streaming, "check": check, "read": ph.get("read", 0.0),
        "subtract": ph.get("subtract", 0.0), "read_wait": ph.get("read_wait", 0.0), "gram": ph.get("gram", 0.0),
        "solve": total - sum(ph.get(k, 0.0) for k in (*waited, "gram", "direction", "state_parts", "early")),
        "direction": ph.get("direction", 0.0), "state": ph.get("state_parts", 0.0) + ph.get("state", 0.0),
        "write_early": ph.get("early", 0.0), "write": ph.get("horizons", 0.0),
    }
    parts["other"] = streaming - total - ph.get("state", 0.0) - ph.get("horizons", 0.0)
    if not overlapped:
        del parts["read_wait"]
    return ", ".join(f"{k} {v:.2f}" + (" (prefetch thread)" if overlapped and k in ("read", "subtract") else "")
                     for k, v in parts.items())


def _timed(cmd):
    """Wall and CPU (user + sys) seconds of a command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[0]} failed")
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime


def _write_floor(root: str, n_params: int, dtype: str, env) -> float:
    """save_file of what relex writes (two fp32 models and one state of directions), in a fresh process; the time of
    the save_file calls only (imports and tensor creation excluded)."""
    code = (
        "import sys, time, torch\n"
        "from safetensors.torch import save_file\n"
        f"n = {n_params}; d = sys.argv[1]\n"
        "parts = [(torch.float32, 'h1'), (torch.float32, 'h2'), (getattr(torch, sys.argv[2]), 'state')]\n"
        "ts = {name: {f't{i}': torch.ones(n // 8 + (n % 8 if i == 0 else 0), dtype=dt) for i in range(8)} for dt, name "
        "in parts}\n"
        "t0 = time.perf_counter(); c0 = time.process_time()\n"
        "for name, tensors in ts.items():\n"
        "    save_file(tensors, f'{d}/{name}.safetensors', metadata={'format': 'pt'})\n"
        "t1 = time.perf_counter()\n"
        "import os\n"
        "for name in ts:\n"
        "    fd = os.open(f'{d}/{name}.safetensors', os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
        "print(t1 - t0, time.perf_counter() - t0, time.process_time() - c0)\n"
    )
    d = os.path.join(root, "write_floor")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, d, dtype], env=env, check=True, capture_output=True, text=True
        )
        plain, durable, cpu = map(float, out.stdout.strip().splitlines()[-1].split())
        return plain, durable, cpu
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(cmd, env, cwd):
    # the output goes to files, not pipes: nothing reads a pipe while wait4 waits, so a full one would hang the child
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        se = err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(se[-3000:])
        raise SystemExit(f"relex extrapolate failed with exit code {code}")
    return wall, ru.ru_maxrss * 1024, ru, se


if __name__ == "__main__":
    main()
