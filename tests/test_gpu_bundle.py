"""bench/gpu_bundle.py without network: files split into parts under the limit, staged part by part and joined back
byte for byte; a missing part or a damaged chunk is an error naming it; a wheel whose module is missing is installed
into the target directory with this interpreter and imports from there."""

import json
import os
import random
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_bundle  # noqa: E402

LIMIT = 96 * 1024  # 64 KiB of data per part besides the 32 KiB kept for the manifest


def _files(tmp_path, sizes):
    rng = random.Random(0)
    d = tmp_path / "src"
    d.mkdir()
    paths = []
    for i, n in enumerate(sizes):
        p = d / f"pkg{i}-1.0-py3-none-any.whl"
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        paths.append(str(p))
    return paths


def _cli(*args, root):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_bundle.py"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


def test_split_stage_assemble_round_trip_is_byte_identical(tmp_path):
    # one file larger than two parts, one that has to continue in the next part, small ones, an empty one
    sizes = [150 * 1024, 40 * 1024, 3000, 1, 0]
    src = _files(tmp_path, sizes)
    root = tmp_path / "bundle"
    m = gpu_bundle.pack(src, str(root), LIMIT)
    assert len(m["parts"]) == 4  # 194 KiB of data at 64 KiB per part
    for p in m["parts"]:
        d = root / p
        total = sum(f.stat().st_size for f in d.iterdir())
        assert total <= LIMIT, (p, total)
        assert json.loads((d / "manifest.json").read_text()) == m
    big = next(e for e in m["files"] if e["size"] == 150 * 1024)
    assert len(big["chunks"]) == 3 and len({c["part"] for c in big["chunks"]}) == 3

    # the GPU machine sees one part per command: stage each, in any order, then assemble
    there = tmp_path / "there"
    for i, p in enumerate(reversed(m["parts"])):
        r = _cli("stage", str(root / p), root=there)
        assert r.returncode == 0, r.stderr
        assert ("every part is staged" in r.stdout) == (i == len(m["parts"]) - 1), r.stdout
    r = _cli("assemble", root=there)
    assert r.returncode == 0, r.stderr
    for s in src:
        out = there / "wheels" / os.path.basename(s)
        assert out.read_bytes() == open(s, "rb").read()


def test_missing_part_and_damaged_chunk_are_named(tmp_path):
    src = _files(tmp_path, [100 * 1024, 10])
    root = tmp_path / "bundle"
    m = gpu_bundle.pack(src, str(root), LIMIT)
    there = tmp_path / "there"
    assert _cli("stage", str(root / "part1"), root=there).returncode == 0
    r = _cli("assemble", root=there)
    assert r.returncode == 2 and "part2 not staged yet" in r.stderr, r.stderr
    chunk = next(c for e in m["files"] for c in e["chunks"] if c["part"] == "part2")
    with open(root / "part2" / chunk["name"], "r+b") as f:
        f.seek(0)
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    r = _cli("stage", str(root / "part2"), root=there)
    assert r.returncode == 2 and chunk["name"] in r.stderr and "missing or damaged" in r.stderr, r.stderr
    r = _cli("stage", str(tmp_path / "src"), root=there)
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr


def test_install_brings_only_the_missing_module(tmp_path):
    # a real (tiny) wheel of a module this interpreter lacks, and one of a module it has (json)
    src = tmp_path / "src"
    src.mkdir()

    def wheel(dist, module, body):
        p = src / f"{dist}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr(f"{module}/__init__.py", body)
            z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
            z.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{dist}-1.0.dist-info/RECORD", "")
        return str(p)

    paths = [wheel("relex_fake_pkg", "relex_fake_pkg", "__version__ = '1.0'\nANSWER = 42\n"),
             wheel("json", "json", "raise ImportError('the bundled copy must not be installed')\n")]
    root = tmp_path / "bundle"
    gpu_bundle.pack(paths, str(root), LIMIT)
    there = tmp_path / "there"
    assert _cli("stage", str(root / "part1"), root=there).returncode == 0
    assert _cli("assemble", root=there).returncode == 0
    target = there / "site"
    r = _cli("install", "--target", str(target), root=there)
    assert r.returncode == 0, r.stderr
    assert "relex_fake_pkg: bundle" in r.stdout and "json: present" in r.stdout, r.stdout
    assert not (target / "json").exists()
    r = subprocess.run([sys.executable, "-c", "import relex_fake_pkg; print(relex_fake_pkg.ANSWER)"],
                       env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True)
    assert r.stdout.strip() == "42", r.stderr


def test_check_fails_loudly_on_a_missing_assumed_module(monkeypatch):
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    monkeypatch.setattr(gpu_bundle, "ASSUMED", ["json", "relex_no_such_module"])
    with pytest.raises(gpu_bundle.BundleError, match="relex_no_such_module: ModuleNotFoundError"):
        gpu_bundle.check(python=here)
    monkeypatch.setattr(gpu_bundle, "ASSUMED", ["json"])
    assert any(ln.startswith("json ") for ln in gpu_bundle.check(python=here))
    with pytest.raises(gpu_bundle.BundleError, match="the bundle's wheels are for CPython 2.7"):
        gpu_bundle.check(python="2.7")


def test_every_bundled_requirement_maps_to_its_module():
    # the wheel file names pip writes (underscores) map back to the import names the install step probes
    for req, mod, _ in gpu_bundle.WHEELS:
        dist = req.split("==")[0].replace("-", "_")
        assert gpu_bundle.module_of(f"{dist}-1.0-py3-none-any.whl") == mod, req
