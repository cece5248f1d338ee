"""Compile every Triton kernel variant the package launches, ahead of time, for NVIDIA GPUs this machine need not have.

Triton compiles for an explicit ``GPUTarget`` without a driver or a device: its own LLVM makes the PTX and its
bundled ``ptxas`` the cubin. This script enumerates the variants (the constexprs and launch options chosen by
``triton_ops.gram_config`` / ``project_config`` for every row count class and buffer dtype, the directions' dtype
for the projection), compiles each for each architecture, writes its TTIR and PTX, and runs ``ptxas -v`` on the PTX
for its registers and spills. ``tests/test_kernel_ptx.py`` reads what it writes: 64-bit pointer arithmetic, 16-byte
vector loads in the aligned body of a range, no register spill.

    python bench/compile_kernels.py --out kernels_ptx [--arch 80,90] [--quick]

Prints one line per variant and writes ``manifest.json`` (variant -> files, registers, spill bytes, global load
widths) into ``--out``. Exit 1 if a variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
import contextlib
import torch
from relex_callback.core.kernels import triton_ops
from relex_callback.core.kernels.triton_ops import gram_config, project_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Row counts that reach every compiled class: gram BT 16 / 32 / 64 / 128 and the tiled 64 x 64 blocks (T > 128);
# project TP = next power of two of T. A window of 75 snapshots is T = 75 (BT 128, TP 128).
ROWS = (16, 32, 64, 75, 200)
DTYPES = ("bfloat16", "float16", "float32")
RANKS = (1, 3)
TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def variants(quick: bool = False):
    """``(kernel, name, signature, constexprs, num_warps)`` of every variant the package launches (``quick``: the
    paper-sized window T = 75 in bf16 and float32 only)."""
    rows = (75,) if quick else ROWS
    dtypes = ("bfloat16", "float32") if quick else DTYPES
    seen = set()
    for dt in dtypes:
        for T in rows:
            cfg = gram_config(T, getattr(torch, dt))
            warps = cfg.pop("num_warps")
            key = ("gram", dt, tuple(sorted(cfg.items())))
            if key not in seen:
                seen.add(key)
                sig = {"M_ptr": f"*{TRITON_TYPE[dt]}", "G_ptr": "*fp32", "table_ptr": "*i64", "T": "i32",
                       "stride_t": "i32", "pairs_ptr": "*i64"}
                yield (
                    "gram",
                    f"gram_{dt}_BT{cfg['BT']}_N{cfg['BLOCK_N']}"
                    + ("_single" if cfg["SINGLE"] else f"_pairs{cfg['NPAIRS']}"),
                    sig,
                    cfg,
                    warps,
                )
    for dt in dtypes:
        for out in sorted({dt, "float32"}):
            for T in rows:
                for r in RANKS:
                    cfg = project_config(T, r)
                    key = ("project", dt, out, tuple(sorted(cfg.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    sig = {"M_ptr": f"*{TRITON_TYPE[dt]}", "U_ptr": "*fp32", "O_ptr": f"*{TRITON_TYPE[out]}",
                           "table_ptr": "*i64", "T": "i32", "stride_t": "i32", "stride_o": "i32"}
                    yield "project", f"project_{dt}_to_{out}_TP{cfg['TP']}_R{r}", sig, cfg, 4


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles ``sm_<arch>`` with (it picks a newer one for sm_90 and above)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_usage(ptx: str, arch: int, workdir: str) -> dict:
    """Registers and spill bytes of ``ptx`` as ``ptxas -v`` reports them for ``sm_<arch>`` (``sm_90a`` for 90, as
    Triton compiles it)."""
    path = os.path.join(workdir, "probe.ptx")
    with open(path, "w") as fh:
        fh.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    r = subprocess.run(
        [_ptxas(arch), "-v", f"--gpu-name={gpu}", path, "-o", os.devnull], capture_output=True, text=True
    )
    text = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-500:]}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    return {"registers": max(regs or [0]), "spill_store_bytes": sum(stores), "spill_load_bytes": sum(loads)}


def load_widths(ptx: str) -> dict:
    """How many ``ld.global`` instructions of each width the PTX holds (``v4.b32`` is a 16-byte vector load)."""
    return dict(Counter(m.group(1) for m in re.finditer(r"ld\.global(?:\.[a-z]+)*((?:\.v\d)?\.b\d+)", ptx)))


def compile_variant(kernel: str, sig: dict, constexprs: dict, num_warps: int, arch: int):
    """The compiled kernel for ``sm_<arch>``, specialized like a launch on the package's arenas: every pointer 16-byte
    aligned and the row strides multiples of 16 elements (Triton's ``tt.divisibility`` 16, which its launcher gives
    any such argument)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"gram": triton_ops._gram_kernel, "project": triton_ops._project_kernel}[kernel]
    names = list(fn.arg_names)
    aligned = [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    full = dict(sig)
    full.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the TTIR, PTX and manifest.json")
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--quick", action="store_true", help="only the T = 75 variants in bf16 and float32")
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",") if x.strip()]
    os.makedirs(a.out, exist_ok=True)
    manifest, failed = {}, []
    t_all = time.perf_counter()
    for arch in archs:
        d = os.path.join(a.out, f"sm{arch}")
        os.makedirs(d, exist_ok=True)
        for kernel, name, sig, cfg, warps in variants(a.quick):
            t0 = time.perf_counter()
            try:
                k = compile_variant(kernel, sig, cfg, warps, arch)
                for ext in ("ttir", "ptx"):
                    with open(os.path.join(d, f"{name}.{ext}"), "w") as fh:
                        fh.write(k.asm[ext])
                usage = ptxas_usage(k.asm["ptx"], arch, d)
                entry = {"kernel": kernel, "arch": arch, "constexprs": cfg, "num_warps": warps,
                         "ttir": os.path.join(f"sm{arch}", f"{name}.ttir"),
                         "ptx": os.path.join(f"sm{arch}", f"{name}.ptx"), "loads": load_widths(k.asm["ptx"]),
                         "seconds": round(time.perf_counter() - t0, 2), **usage}
                if usage["spill_store_bytes"] or usage["spill_load_bytes"]:
                    failed.append(f"sm{arch}/{name}: spills")
            except Exception as e:  # noqa: BLE001 - reported per variant, the run goes on
                entry = {"kernel": kernel, "arch": arch, "error": f"{type(e).__name__}: {e}"[:500]}
                failed.append(f"sm{arch}/{name}: {entry['error']}")
            manifest[f"sm{arch}/{name}"] = entry
            print(f"sm{arch} {name:<40} " + (f"regs {entry['registers']:>3} spills {entry['spill_store_bytes']}/"
                  f"{entry['spill_load_bytes']} B loads {entry['loads']} ({entry['seconds']} s)"
                  if "error" not in entry else entry["error"]), flush=True)
        with contextlib_suppress():
            os.remove(os.path.join(d, "probe.ptx"))
    with open(os.path.join(a.out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    print(f"{len(manifest)} variants in {time.perf_counter() - t_all:.1f} s; "
          + ("all compiled, no spill" if not failed else f"{len(failed)} failed: {failed[:5]}"))
    return 1 if failed else 0


def contextlib_suppress():
    return contextlib.suppress(OSError)


if __name__ == "__main__":
    sys.exit(main())
