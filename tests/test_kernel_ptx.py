"""The Triton kernels as a GPU would run them, read from their compiled form on a machine without one.

``bench/compile_kernels.py --quick`` compiles the variants a paper-sized window launches (T = 75 rows, bf16 and float32
buffers, 1 and 3 directions) for sm_80 (A100) and sm_90 (H100) through Triton's own LLVM and ptxas; these tests read
its TTIR, PTX and ``ptxas -v`` figures:

* offsets into the arena and the output are 64-bit (a process's arena passes 2^31 elements on a 8B model, and
  ``k * stride_o`` passes it from rank 3 at 2^30 elements): every use of a row stride is a widening to i64 first;
* the aligned body of each column range is read with 16-byte vector loads (``ld.global.v4.b32``, or the 16-byte
  ``cp.async`` of a pipelined ``tl.dot`` operand), not 2 bytes at a time;
* no variant spills registers at the block sizes the launchers choose.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=REPO,
               TRITON_CACHE_DIR=str(out / "cache"))
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "compile_kernels.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    manifest = json.load(open(out / "manifest.json")) if (out / "manifest.json").exists() else {}
    assert manifest, r.stdout[-2000:] + r.stderr[-2000:]
    return out, manifest, r


def _read(out, entry, ext):
    return open(os.path.join(out, entry[ext])).read()


def test_every_variant_compiles_for_sm80_and_sm90_without_spills(compiled):
    out, manifest, r = compiled
    errors = {k: v["error"] for k, v in manifest.items() if "error" in v}
    assert not errors, errors
    for arch in ARCHS:
        kernels = {v["kernel"] for v in manifest.values() if v["arch"] == arch}
        assert kernels == {"gram", "project"}, (arch, kernels)
    spills = {k: (v["spill_store_bytes"], v["spill_load_bytes"]) for k, v in manifest.items()
              if v["spill_store_bytes"] or v["spill_load_bytes"]}
    assert not spills, spills
    assert all(0 < v["registers"] <= 255 for v in manifest.values())
    assert r.returncode == 0, r.stdout[-1000:]


def test_arena_and_output_offsets_are_64_bit(compiled):
    """Every use of ``stride_t`` (the arena's row stride) and ``stride_o`` (the output's) widens it to i64 before any
    multiply, so neither ``row * stride_t`` nor ``k * stride_o`` can wrap at 2^31; the pointer offsets into the arena
    (the only pointer of its element type in a Gram kernel) are i64 tensors."""
    out, manifest, _ = compiled
    for name, v in manifest.items():
        ttir = _read(out, v, "ttir")
        uses = [ln for ln in ttir.splitlines() if re.search(r"%stride_[to]\b", ln) and "tt.func" not in ln]
        assert uses, name
        for ln in uses:
            assert "arith.extsi" in ln and "to i64" in ln, (name, ln.strip()[:200])
        if v["kernel"] == "gram":
            elem = re.search(r"%M_ptr: !tt.ptr<(\w+)>", ttir).group(1)
            arena = [ln for ln in ttir.splitlines() if "tt.addptr" in ln and f"!tt.ptr<{elem}>>" in ln]
            assert arena, name
            for ln in arena:
                assert re.search(r"tensor<[0-9x]+xi64>", ln), (name, ln.strip()[:200])


def test_aligned_body_reads_16_byte_vectors(compiled):
    out, manifest, _ = compiled
    for name, v in manifest.items():
        ptx = _read(out, v, "ptx")
        vector = len(re.findall(r"ld\.global(?:\.[a-z]+)*\.v4\.b32", ptx)) + len(
            re.findall(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", ptx))
        assert vector > 0, (name, v["loads"])


def test_the_checks_catch_narrow_loads_and_32_bit_strides():
    """The readers above on hand-written fragments: a 2-byte load and an i32 multiply of the stride are caught."""
    narrow = "\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];"
    assert not re.findall(r"ld\.global(?:\.[a-z]+)*\.v4\.b32", narrow)
    wraps = "    %2 = arith.muli %stride_o, %c2_i32 : i32 loc(#loc1)"
    assert not ("arith.extsi" in wraps and "to i64" in wraps)
