"""Hub ids for ``relex plan --model`` and ``relex extrapolate/materialize --base``, read from the Hugging Face cache
and never from the network: a fake cache in the hub's own layout (models--org--name/{refs,blobs,snapshots}), which
the real ``huggingface_hub`` API must recognise, under ``HF_HUB_CACHE``, with ``HF_HUB_OFFLINE=1``."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from relex_callback.offline.hub import looks_like_hub_id
from helpers import run_relex

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "qwen2.5-math-1.5b")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache, repo_id, files):
    """Put ``files`` ({name: path}) into ``cache`` as the hub stores a download: content-addressed blobs, a snapshot
    of symlinks named by the commit, and ``refs/main`` naming it."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    snap = os.path.join(root, "snapshots", COMMIT)
    os.makedirs(snap, exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as fh:
        fh.write(COMMIT)
    for name, src in files.items():
        with open(src, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        shutil.copyfile(src, os.path.join(root, "blobs", digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snap, name))
    return snap


def _env(subprocess_env, cache):
    env = dict(subprocess_env)
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(cache) + "-home")
    return env


PLAN = ("--tcut", "75", "--world-size", "8", "--gpu-memory", "80GB", "--host-memory", "1TB", "--vllm-colocate", "0.3")


def test_plan_reads_a_cached_hub_id_like_its_directory(tmp_path, subprocess_env):
    cache = tmp_path / "hub"
    snap = _cache_model(str(cache), "Qwen/Qwen2.5-Math-1.5B", {"config.json": os.path.join(FIXTURE, "config.json")})
    env = _env(subprocess_env, cache)
    # the layout is the hub's: its own cache scanner sees the repository and the revision
    seen = subprocess.run(
        [
            sys.executable,
            "-c",
            "from huggingface_hub import scan_cache_dir; "
            "print([(r.repo_id, [v.commit_hash for v in r.revisions]) for r in scan_cache_dir().repos])",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert seen.stdout.strip() == f"[('Qwen/Qwen2.5-Math-1.5B', ['{COMMIT}'])]", seen.stderr
    local = tmp_path / "Qwen2.5-Math-1.5B"
    local.mkdir()
    shutil.copyfile(os.path.join(FIXTURE, "config.json"), local / "config.json")
    by_id = run_relex("plan", "--model", "Qwen/Qwen2.5-Math-1.5B", *PLAN, env=env)
    by_dir = run_relex("plan", "--model", str(local), *PLAN, env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert by_dir.returncode == 0, by_dir.stderr
    assert by_id.stdout == by_dir.stdout
    assert "1,543,714,304" in by_id.stdout or "1543714304" in by_id.stdout.replace(",", "")
    assert os.path.isdir(snap)


def test_an_uncached_hub_id_says_how_to_get_it(tmp_path, subprocess_env):
    env = _env(subprocess_env, tmp_path / "empty-hub")
    r = run_relex("plan", "--model", "Qwen/Qwen3-8B-Base", *PLAN, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "is neither a local path nor a model in the Hugging Face cache" in lines[0]
    assert lines[0].endswith("hf download Qwen/Qwen3-8B-Base config.json")
    r = run_relex("materialize", "--state", str(tmp_path / "s.safetensors"), "--base", "org/not-here", "--horizons",
                  "10", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith("hf download org/not-here"), r.stderr
    # a path that does not exist is still reported as a path
    r = run_relex("plan", "--model", str(tmp_path / "nowhere" / "model"), *PLAN, env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr


def test_extrapolate_reads_a_cached_base_like_its_directory(tmp_path, subprocess_env):
    g = torch.Generator().manual_seed(0)
    th0 = {"w": torch.randn(40, 8, generator=g), "b": torch.randn(8, generator=g)}
    d = {k: torch.randn(v.shape, generator=g) for k, v in th0.items()}
    base = tmp_path / "base"
    base.mkdir()
    save_file(th0, str(base / "model.safetensors"), metadata={"format": "pt"})
    for t in (1, 2, 3, 4):
        c = tmp_path / "ckpts" / f"checkpoint-{t}"
        c.mkdir(parents=True)
        save_file({k: th0[k] + 0.01 * t * d[k] + 1e-4 * torch.randn(v.shape, generator=g) for k, v in th0.items()},
                  str(c / "model.safetensors"), metadata={"format": "pt"})
    cache = tmp_path / "hub"
    _cache_model(str(cache), "me/tiny-base", {"model.safetensors": str(base / "model.safetensors")})
    env = _env(subprocess_env, cache)
    outs = {}
    for name, b in (("id", "me/tiny-base"), ("dir", str(base))):
        out = tmp_path / f"out-{name}"
        r = run_relex("extrapolate", "--base", b, "--checkpoints", str(tmp_path / "ckpts"), "--horizons", "8", "--out",
                      str(out), "--no-run-check", env=env)
        assert r.returncode == 0, r.stderr
        with open(out / "step-8" / "model.safetensors", "rb") as fh:
            outs[name] = fh.read()
    assert outs["id"] == outs["dir"]


@pytest.mark.parametrize("value,hub", [("Qwen/Qwen3-8B-Base", True), ("gpt2", True), ("./x", False),
                                       ("/abs/path", False), ("a/b/c", False), ("cfg/config.json", False),
                                       ("../up", False)])
def test_what_counts_as_a_hub_id(value, hub):
    assert looks_like_hub_id(value) is hub
