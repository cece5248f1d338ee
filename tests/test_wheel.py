"""The package installs like a package: ``python -m build`` gives a wheel and an sdist; the wheel installs into a
fresh virtual environment (torch first, pinned like the Makefile's TORCH_VERSION, then the wheel with its ``trl``
extra and the Makefile's PINS), and there the README's CPU quickstart runs and ``relex`` answers, from the installed
package, not from this checkout. The sdist installs too.

Slow (fresh venvs, a few minutes with pip's cache warm; pip's cache is reused across runs). Where the machine has a
local CPU torch wheel on pip's find-links, that is what ``torch==X`` takes; elsewhere pip picks torch as it would for
a user."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from test_readme import README, _blocks, _quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _make_var(name):
    with open(os.path.join(REPO, "Makefile")) as fh:
        m = re.search(rf"^{name} \?= (.*)$", fh.read(), re.M)
    return m.group(1).strip()


def _env():
    """No trace of this checkout: no PYTHONPATH, no virtual environment of the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(cmd, cwd, timeout=1200):
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _venv(path):
    _run([sys.executable, "-m", "venv", str(path)], cwd=REPO)
    return path / "bin" / "python"


def test_wheel_and_sdist_build_install_and_run_the_quickstart(tmp_path):
    # the tracked files of this checkout (and those not yet committed), without build outputs
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(REPO, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), src / f)

    builder = _venv(tmp_path / "build-venv")
    _run([builder, "-m", "pip", "install", "-q", "build"], cwd=tmp_path)
    _run([builder, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    wheels = sorted((tmp_path / "dist").glob("relex_callback-*-py3-none-any.whl"))
    sdists = sorted((tmp_path / "dist").glob("relex_callback-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(tmp_path / "dist")
    version = wheels[0].name.split("-")[1]
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        entry = z.read(f"relex_callback-{version}.dist-info/entry_points.txt").decode()
        meta = z.read(f"relex_callback-{version}.dist-info/METADATA").decode()
    assert "relex_callback/examples/toy.py" in names and "relex_callback/offline/hub.py" in names
    assert not any(n.startswith(("tests/", "recipes/", "bench/")) for n in names)
    assert "relex = relex_callback.offline.cli:main" in entry
    for extra in ("trl", "deepspeed", "plot", "real", "demo"):
        assert f"Provides-Extra: {extra}" in meta, extra
    with tarfile.open(sdists[0]) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"README.md", "setup.cfg", "pyproject.toml", "relex_callback/__init__.py"} <= members

    py = _venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", f"torch=={_make_var('TORCH_VERSION')}"], cwd=tmp_path)
    pins = [p for p in shlex.split(_make_var("PINS")) if p.split("==")[0] in ("transformers", "trl", "accelerate")]
    _run([py, "-m", "pip", "install", "-q", f"{wheels[0]}[trl]", *pins], cwd=tmp_path)

    where = _run([py, "-c", "import relex_callback, torch; print(relex_callback.__file__); "
                            "print(relex_callback.__version__); print(torch.__version__)"], cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(tmp_path / "venv")), where
    assert where[1] == version
    assert where[2].startswith(_make_var("TORCH_VERSION")), where  # the pinned torch, not one a dependency pulled

    relex = tmp_path / "venv" / "bin" / "relex"
    assert "extrapolate" in _run([relex, "--help"], cwd=tmp_path).stdout
    v = subprocess.run([relex, "--version"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    if v.returncode == 0:  # the flag is optional here; when present it must name the installed version
        assert version in v.stdout + v.stderr

    work = tmp_path / "run"
    work.mkdir()
    (work / "quickstart.py").write_text(_quickstart())
    _run([py, "quickstart.py"], cwd=work)
    for name in ("step-12", "step-24", "relex_state.safetensors", "report.json"):
        assert (work / "quickstart" / "relex" / name).exists(), name
    report = next(line for _, text in _blocks(README, {"bash"}) for line in text.splitlines()
                  if line.startswith("relex report quickstart"))
    out = _run([relex, *shlex.split(report)[1:]], cwd=work).stdout
    assert "tcut=6" in out and "drift share" in out

    # the sdist installs too (built again from its own files, in pip's isolated build environment)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(sdists[0])], cwd=tmp_path)
    assert (
        _run([py, "-c", "import relex_callback; print(relex_callback.__version__)"], cwd=tmp_path).stdout.strip()
        == version
    )
