"""Benchmark: `relex extrapolate` end to end (a subprocess: imports included) over synthetic fp32 checkpoints of a
76.6M-parameter Qwen2-shaped model (hidden 1024, 8 layers), 20 checkpoints, 2 horizons.

    python bench/extrapolate.py [--dir /tmp/relex_bench] [--repeat 2] [--solver auto] [--dtype bfloat16]

Prints the wall time and peak RSS of the CLI process, and, for scale on a shared machine, the time of a plain
`cat` of the same checkpoint files (page cache warm) measured in the same run. The checkpoints are built once
and kept in --dir (never in the repository); the weights move along a nearly rank-1 path plus a small noise.
Targets (issue 2): <= 6 s wall and <= 3.8 GB peak RSS on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

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
    for l in range(L):
        p = f"model.layers.{l}."
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
    import torch
    from safetensors.torch import save_file

    marker = os.path.join(root, "done.json")
    want = {"config": CONFIG, "n": n_ckpt, "every": every, "version": 1}
    if os.path.isfile(marker) and json.load(open(marker)) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    g = torch.Generator().manual_seed(0)
    shp = shapes(CONFIG)
    print(f"building {n_ckpt} checkpoints of {sum(math.prod(s) for s in shp.values()) / 1e6:.1f}M parameters in {root} ...", flush=True)
    theta0 = {k: (0.02 * torch.randn(s, generator=g)) for k, s in shp.items()}
    direction = {}
    noise = {}
    for k, s in shp.items():
        v = torch.randn(s, generator=g)
        direction[k] = v / v.norm()
        noise[k] = 1e-5 * torch.randn(s, generator=g)

    def save(d, tensors):
        os.makedirs(d)
        save_file({k: t.contiguous() for k, t in tensors.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
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
    args = ap.parse_args()
    build(args.dir, args.checkpoints, args.every)
    files = [os.path.join(args.dir, "base", "model.safetensors")] + [
        os.path.join(args.dir, "ckpts", f"checkpoint-{j * args.every}", "model.safetensors") for j in range(1, args.checkpoints + 1)]
    total = sum(os.path.getsize(f) for f in files)
    tcut = args.checkpoints * args.every
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["RELEX_TIMING"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"{len(files)} files, {total / 1e9:.2f} GB; horizons {5 * tcut},{10 * tcut}; buffer dtype {args.dtype}; solver {args.solver}")
    for r in range(args.repeat):
        t0 = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        t_cat = time.perf_counter() - t0
        out = os.path.join(args.dir, "out")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "relex_callback.cli", "extrapolate", "--base", os.path.join(args.dir, "base"),
               "--checkpoints", os.path.join(args.dir, "ckpts"), "--horizons", f"{5 * tcut},{10 * tcut}", "--out", out,
               "--dtype", args.dtype, "--solver", args.solver]
        # the output goes to files, not pipes: nothing reads a pipe while wait4 waits, so a full one would hang the child
        with tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            err.seek(0)
            se = err.read().decode()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(se[-3000:])
            raise SystemExit(f"relex extrapolate failed with exit code {code}")
        rep = json.load(open(os.path.join(out, "report.json")))
        secs = rep.get("seconds", {})
        print(f"run {r + 1}: relex extrapolate wall {wall:.2f} s, peak RSS {ru.ru_maxrss * 1024 / 1e9:.2f} GB, "
              f"user {ru.ru_utime:.2f} s, sys {ru.ru_stime:.2f} s | solve {rep.get('solve_seconds', 0):.2f} s "
              f"({rep.get('solver')}: {', '.join(f'{k} {v:.2f}' for k, v in secs.items())}), write {rep.get('write_seconds', 0):.2f} s "
              f"| cat of the {len(files)} files {t_cat:.2f} s ({total / 1e9 / t_cat:.1f} GB/s) | load average "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        timing = [ln for ln in se.splitlines() if ln.startswith("relex: timing")]
        for ln in timing:
            print("   ", ln)
    print("targets: wall <= 6 s, peak RSS <= 3.8 GB (2-core machine, warm page cache)")


if __name__ == "__main__":
    main()
