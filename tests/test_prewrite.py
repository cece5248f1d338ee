"""Everything checkable before the first write is checked before it, for `relex extrapolate` and `relex
materialize` alike: the output path (a file, inside a file, a dangling symlink, a read-only file system), the free
space the plan needs, every horizon's finiteness in the parameters' dtype, and a second writer's lock. After each
refusal the directory holding --out is listed: "nothing was written" must be true. The bytes files claim are checked
against the bytes present before anything is allocated: the peak memory of such a refusal is the baseline's."""

import json
import os
import resource  # noqa: F401  (the measuring wrapper below uses it in the child)
import subprocess
import sys
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cli_env, run_relex
from relex_callback.params import TensorSpec
from relex_callback.trajectory.store import TrajectoryStore

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 256 KiB base (float32 and float16 copies), 4 checkpoints, and each one's finished extrapolation."""
    root = tmp_path_factory.mktemp("pre")
    g = torch.Generator().manual_seed(0)
    t0 = {"a.weight": torch.randn(256, 256, generator=g), "b.bias": torch.randn(256, generator=g)}
    v = {k: torch.randn(x.shape, generator=g) for k, x in t0.items()}
    for tag, dt in (("", torch.float32), ("16", torch.float16)):
        os.makedirs(root / f"base{tag}")
        save_file({k: x.to(dt) for k, x in t0.items()}, str(root / f"base{tag}" / "model.safetensors"),
                  metadata={"format": "pt"})
        for s in (2, 4, 6, 8):
            d = root / f"ckpts{tag}" / f"checkpoint-{s}"
            os.makedirs(d)
            save_file({k: (t0[k] + 0.01 * s * v[k]).to(dt) for k in t0}, str(d / "model.safetensors"),
                      metadata={"format": "pt"})
        r = run_relex("extrapolate", "--base", str(root / f"base{tag}"), "--checkpoints", str(root / f"ckpts{tag}"),
                      "--horizons", "40", "--out", str(root / f"done{tag}"), "--no-progress")
        assert r.returncode == 0, r.stderr
    return root


def _cmd(which, root, out, horizons="40,80", tag=""):
    if which == "extrapolate":
        return ["extrapolate", "--base", str(root / f"base{tag}"), "--checkpoints", str(root / f"ckpts{tag}"),
                "--horizons", horizons, "--out", str(out), "--no-progress"]
    return ["materialize", "--state", str(root / f"done{tag}" / "relex_state.safetensors"), "--base",
            str(root / f"base{tag}"), "--horizons", horizons, "--out", str(out)]


def _listing(d):
    return sorted(os.path.relpath(os.path.join(a, n), d) for a, ds, fs in os.walk(d) for n in ds + fs)


def _refused(argv, watch, *words):
    before = _listing(watch)
    r = run_relex(*argv)
    assert r.returncode == 2 and r.stderr.startswith("relex: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), (words, r.stderr)
    assert _listing(watch) == before, f"something was written: {sorted(set(_listing(watch)) - set(before))}"
    return r.stderr


def _mount(path, *opts):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


CMDS = ("extrapolate", "materialize")


@pytest.mark.parametrize("which", CMDS)
def test_out_a_file_inside_a_file_or_a_dangling_symlink(inputs, tmp_path, which):
    (tmp_path / "f").write_text("a file")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    _refused(_cmd(which, inputs, tmp_path / "f"), tmp_path, "exists and is not a directory")
    _refused(_cmd(which, inputs, tmp_path / "f" / "out"), tmp_path, "is a file, not a directory")
    _refused(_cmd(which, inputs, tmp_path / "link"), tmp_path, "is a symlink to", "which does not exist")
    _refused(_cmd(which, inputs, tmp_path / "link" / "out"), tmp_path, "which does not exist")


@root_only
@pytest.mark.parametrize("which", CMDS)
def test_out_on_a_read_only_file_system(inputs, tmp_path, which):
    ro = tmp_path / "ro"
    _mount(ro, "size=1m", "ro")
    try:
        _refused(_cmd(which, inputs, ro / "out"), tmp_path, "cannot be written", "Read-only file system")
    finally:
        _umount(ro)


@root_only
@pytest.mark.parametrize("which", CMDS)
def test_outputs_that_do_not_fit_the_free_space(inputs, tmp_path, which):
    """Two horizons of a 256 KiB model onto 128 KiB: refused before the solve's first byte, naming the sizes."""
    small = tmp_path / "small"
    _mount(small, "size=128k")
    try:
        msg = _refused(_cmd(which, inputs, small / "out"), tmp_path, "free", "nothing was written", "2 horizon(s)")
        assert os.listdir(small) == [], msg
    finally:
        _umount(small)


@pytest.mark.parametrize("which", CMDS)
def test_a_horizon_that_overflows_float16_is_refused_before_the_first_horizon(inputs, tmp_path, which):
    """--horizons 200,1000000000 on a float16 run: 200 is finite, 10^9 is not; neither is written, and the message
    says nothing was written because nothing was."""
    msg = _refused(_cmd(which, inputs, tmp_path / "out", horizons="200,1000000000", tag="16"), tmp_path,
                   "overflow", "nothing was written", "1000000000")
    assert not (tmp_path / "out").exists(), msg


# ------------------------------------------------------------------------------------ sizes a file claims
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode); "
           "print(r.stderr, file=sys.stderr)")


def _peak(argv):
    """Peak RSS (bytes) and exit code of the real CLI run with ``argv``, measured by a wrapper whose only child it
    is."""
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "relex_callback.offline.cli", *argv],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    peak, rc = r.stdout.split()
    return int(peak), int(rc), r.stderr


@pytest.fixture(scope="module")
def lying(inputs, tmp_path_factory):
    """A saved trajectory (the store's own files) and copies of it whose trajectory.json or row file lie."""
    d = tmp_path_factory.mktemp("lying")
    theta0 = load_file(str(inputs / "base" / "model.safetensors"))
    specs = [TensorSpec(name=k, shape=tuple(v.shape), dtype=v.dtype, local_numel=v.numel()) for k, v in theta0.items()]
    st = TrajectoryStore(specs, 4, dtype="float32", storage="host")
    st.set_theta0([theta0[s.name] for s in specs])
    for s in (2, 4, 6, 8):
        ck = load_file(str(inputs / "ckpts" / f"checkpoint-{s}" / "model.safetensors"))
        st.snapshot(s, [ck[x.name] for x in specs])
    st.save(str(d / "traj"))
    st.release()

    out = {"traj": d / "traj"}
    for name, numel in (("claims-2^27", 1 << 27), ("claims-2^28", 1 << 28)):
        shutil.copytree(d / "traj", d / name)
        meta = json.loads((d / name / "trajectory.json").read_text())
        meta["specs"] = [{**meta["specs"][0], "shape": [numel], "local_numel": numel, "flat_start": 0, "offset": 0}]
        (d / name / "trajectory.json").write_text(json.dumps(meta))
        out[name] = d / name
    shutil.copytree(d / "traj", d / "rows-claimed")  # 4 rows claimed, the row file holds half of one
    rows = [f for f in os.listdir(d / "rows-claimed") if f.endswith(".bin")]
    for f in rows:
        os.truncate(d / "rows-claimed" / f, os.path.getsize(d / "rows-claimed" / f) // 8)
    out["rows-claimed"] = d / "rows-claimed"
    shutil.copytree(inputs / "ckpts", d / "header-claims-2^40")  # a checkpoint's header claims 1 TiB
    with open(d / "header-claims-2^40" / "checkpoint-8" / "model.safetensors", "r+b") as fh:
        fh.write((1 << 40).to_bytes(8, "little"))
    out["header-claims-2^40"] = d / "header-claims-2^40"
    return out


def test_sizes_a_file_claims_are_checked_before_anything_is_allocated(inputs, lying, tmp_path):
    """Each lying file is refused with exit 2 and one line, at the peak memory of a refusal of an honest input (the
    same trajectory with a horizon not beyond its last step): believing trajectory.json's 2^28 elements allocated and
    prefaulted 2 GB before the row file was found too small."""
    def traj(t):
        return ["extrapolate", "--base", str(inputs / "base"), "--trajectory", str(t), "--horizons", "40", "--out",
                str(tmp_path / "out"), "--no-progress"]

    base_peak, rc, err = _peak(traj(lying["traj"])[:-4] + ["8", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "not beyond" in err, err
    figures = {}
    for name in ("claims-2^27", "claims-2^28", "rows-claimed", "header-claims-2^40"):
        argv = traj(lying[name]) if name != "header-claims-2^40" else [
            "extrapolate", "--base", str(inputs / "base"), "--checkpoints", str(lying[name]), "--horizons", "40",
            "--out", str(tmp_path / "out"), "--no-progress"]
        peak, rc, err = _peak(argv)
        figures[name] = peak
        assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, (name, err)
        assert peak < base_peak + (64 << 20), (name, f"peak RSS {peak / 2**20:.0f} MiB vs the baseline's "
                                                     f"{base_peak / 2**20:.0f} MiB", err)
        assert not (tmp_path / "out").exists()
    print("peak RSS (MiB): baseline", base_peak >> 20, {k: v >> 20 for k, v in figures.items()})
