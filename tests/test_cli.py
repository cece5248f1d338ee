"""The `relex` CLI end to end: checkpoints saved with transformers, `relex extrapolate` (in process and as a real
subprocess), the result loaded with `from_pretrained` and compared with a float64 SVD reference computed here;
`relex materialize` from the state; `relex report`; every bad input -> exit 2 with one line and nothing written."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from relex_callback.offline.cli import main
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.files.checkpoints import DirectorySource

from helpers import extrapolation_tolerance, run_relex
from transformers import AutoModelForCausalLM

STEPS = [2, 4, 6, 8, 10, 12]
HORIZONS = [40, 100]


def _save_trajectory(root, model, tok, steps, seed, layout="checkpoint-{}", base_shard=None):
    """Save ``model`` as the base and, for each step, weights moved along a nearly rank-1 path plus noise:
    theta_t = theta_0 + (a t + b + small jitter) v + tiny noise, with a random unit direction v per tensor."""
    g = torch.Generator().manual_seed(seed)
    base = os.path.join(root, "base")
    kw = {"max_shard_size": base_shard} if base_shard else {}
    model.save_pretrained(base, **kw)
    tok.save_pretrained(base)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = {}
    for n, p in model.named_parameters():
        v = torch.randn(p.numel(), generator=g)
        paths[n] = (
            v / v.norm(),
            0.01 + 0.01 * torch.rand((), generator=g).item(),
            0.02 * torch.rand((), generator=g).item(),
        )
    for t in steps:
        with torch.no_grad():
            for n, p in model.named_parameters():
                v, a, b = paths[n]
                c = a * t + b + 1e-3 * torch.randn((), generator=g).item()
                noise = 2e-5 * torch.randn(p.numel(), generator=g)
                p.copy_((theta0[n].reshape(-1) + c * v + noise).reshape(p.shape))
        d = os.path.join(root, "ckpts", layout.format(t))
        model.save_pretrained(d)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])
    return base, os.path.join(root, "ckpts")


def _reference(base_dir, ck_dirs, steps, horizon, fit_start=None, tolerances=None):
    """The math of docs/math.md in float64 with torch.linalg.svd: {name: theta_hat(H) - theta_0} (float64);
    ``tolerances`` (a dict) gets each tensor's float32-solve bound (tests/helpers.py extrapolation_tolerance)."""
    base = DirectorySource(base_dir)
    srcs = [DirectorySource(d) for d in ck_dirs]
    t = torch.tensor(steps, dtype=torch.float64)
    mask = t >= (fit_start if fit_start is not None else -1)
    out = {}
    for k in base.keys:
        th0 = base.get(k).double().reshape(-1)
        M = torch.stack([s.get(k).double().reshape(-1) - th0 for s in srcs])
        if tolerances is not None:
            tolerances[k] = extrapolation_tolerance(
                M, steps, horizon, theta0_norm=float(th0.norm()), fit_start=fit_start
            )
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        v = Vh[0]
        c = M @ v
        if c[-1] < 0:
            c, v = -c, -v
        X = torch.stack([t[mask], torch.ones_like(t[mask])], 1)
        a, b = torch.linalg.lstsq(X, c[mask].unsqueeze(1)).solution.flatten().tolist()
        out[k] = (a * horizon + b) * v
    return out


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("traj"))
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1, tie=True, seed=0)  # tied embeddings
    base, ckpts = _save_trajectory(root, model, tok, STEPS, seed=1, base_shard="20KB")  # sharded base
    return {"root": root, "base": base, "ckpts": ckpts, "tok": tok}


@pytest.fixture(scope="module")
def extrapolated(traj):
    out = os.path.join(traj["root"], "out")
    rc = main(
        [
            "extrapolate",
            "--base",
            traj["base"],
            "--checkpoints",
            traj["ckpts"],
            "--horizons",
            ",".join(map(str, HORIZONS)),
            "--out",
            out,
            "--dtype",
            "float32",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def _rel_delta_error(out_dir, base_dir, ref, tol=None):
    """The worst relative error of the extrapolated deltas; with ``tol`` ({name: bound}), the worst error / bound."""
    got = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    sd, sd0 = got.state_dict(), base.state_dict()
    worst = 0.0
    for k, d_ref in ref.items():
        d = (sd[k].double() - sd0[k].double()).reshape(-1)
        err = float((d - d_ref).norm() / d_ref.norm())
        worst = max(worst, err / tol[k] if tol is not None else err)
    return worst, got


def test_base_is_sharded_and_tied(traj):
    assert os.path.isfile(os.path.join(traj["base"], "model.safetensors.index.json"))
    cfg = json.load(open(os.path.join(traj["base"], "config.json")))
    assert cfg.get("tie_word_embeddings", True)


def test_extrapolate_matches_float64_reference(traj, extrapolated):
    ck_dirs = [os.path.join(traj["ckpts"], f"checkpoint-{t}") for t in STEPS]
    for h in HORIZONS:
        tol = {}
        ref = _reference(traj["base"], ck_dirs, STEPS, h, tolerances=tol)
        err, model = _rel_delta_error(os.path.join(extrapolated, f"step-{h}"), traj["base"], ref, tol)
        assert err <= 1.0, f"horizon {h}: relative error of the extrapolated delta is {err:.2g}x its float32 bound"
        # tied weights stay tied, and the model generates
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        ids = traj["tok"]("1+2=", return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == ids.shape[1] + 3
    files = set(os.listdir(extrapolated))
    assert {"relex_state.safetensors", "report.json", "step-40", "step-100"} <= files
    assert not [f for f in files if f.startswith(".")], files  # no temporaries or scratch left
    assert os.path.isfile(os.path.join(extrapolated, "step-40", "tokenizer.json"))
    rep = json.load(open(os.path.join(extrapolated, "report.json")))
    assert rep["steps"] == STEPS and rep["tcut"] == 12 and rep["horizons"] == HORIZONS
    assert rep["summary"]["explained_variance_min"] > 0.99  # the path is nearly rank-1 by construction


def test_fit_start_stride_and_disk_storage(traj, tmp_path):
    out = str(tmp_path / "o")
    # stride 4 keeps steps 4, 8, 12; fit_start 8 fits the line through 8 and 12 only
    rc = main(["extrapolate", "--base", traj["base"], "--checkpoints", traj["ckpts"], "--horizons", "60", "--out", out,
               "--dtype", "float32", "--stride", "4", "--fit-start", "8", "--no-progress", "--solver", "gram",
               "--storage", "disk"])
    assert rc == 0
    assert os.listdir(tmp_path) == ["o"]  # the memory-mapped trajectory file beside --out is gone
    steps = [4, 8, 12]
    tol = {}
    ref = _reference(
        traj["base"],
        [os.path.join(traj["ckpts"], f"checkpoint-{t}") for t in steps],
        steps,
        60,
        fit_start=8,
        tolerances=tol,
    )
    err, _ = _rel_delta_error(os.path.join(out, "step-60"), traj["base"], ref, tol)
    assert err <= 1.0  # error / its float32 bound
    assert json.load(open(os.path.join(out, "report.json")))["steps"] == steps


def test_subprocess_and_verl_layout(traj, tmp_path, subprocess_env):
    """A real `python -m relex_callback.offline.cli` over verl's global_step_N/actor/huggingface layout, explicit
    dirs."""
    for t in STEPS:
        d = tmp_path / "verl" / f"global_step_{t}" / "actor"
        d.mkdir(parents=True)
        os.symlink(os.path.join(traj["ckpts"], f"checkpoint-{t}"), d / "huggingface")
    dirs = [str(tmp_path / "verl" / f"global_step_{t}") for t in reversed(STEPS)]  # any order: sorted by step
    out = str(tmp_path / "o")
    p = run_relex("extrapolate", "--base", traj["base"], "--checkpoints", *dirs, "--horizons", "40", "--out", out,
                  "--dtype", "float32", env=subprocess_env)
    assert p.returncode == 0, p.stderr
    assert "step-40" in p.stdout
    tol = {}
    ref = _reference(
        traj["base"], [os.path.join(traj["ckpts"], f"checkpoint-{t}") for t in STEPS], STEPS, 40, tolerances=tol
    )
    err, _ = _rel_delta_error(os.path.join(out, "step-40"), traj["base"], ref, tol)
    assert err <= 1.0  # error / its float32 bound
    # and an input mistake in a real process: one line, exit 2, no traceback
    p = run_relex("extrapolate", "--base", traj["base"], "--checkpoints", *dirs, "--horizons", "12", "--out",
                  str(tmp_path / "o2"), env=subprocess_env)
    assert p.returncode == 2
    assert p.stderr.startswith("relex: error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o2").exists()


def test_materialize_equals_extrapolate(traj, extrapolated, tmp_path):
    out = str(tmp_path / "m")
    rc = main(["materialize", "--state", os.path.join(extrapolated, "relex_state.safetensors"), "--base", traj["base"],
               "--horizons", "100,250", "--out", out])
    assert rc == 0
    a = load_file(os.path.join(extrapolated, "step-100", "model.safetensors"))
    b = load_file(os.path.join(out, "step-100", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert os.path.isfile(os.path.join(out, "step-250", "config.json"))


def test_materialize_refuses_other_base(traj, extrapolated, tmp_path, capsys):
    other = str(tmp_path / "other")
    build_model(traj["tok"], hidden_size=32, layers=1, seed=7).save_pretrained(other)
    out = str(tmp_path / "m")
    capsys.readouterr()
    rc = main(["materialize", "--state", extrapolated, "--base", other, "--horizons", "100", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not match the state's theta_0" in err and err.count("\n") == 1
    assert not os.path.exists(out)
    # a base of another shape is refused too
    small = str(tmp_path / "small")
    build_model(traj["tok"], hidden_size=16, layers=1, seed=0).save_pretrained(small)
    assert main(["materialize", "--state", extrapolated, "--base", small, "--horizons", "100", "--out", out]) == 2
    assert not os.path.exists(out)


def test_report_command(extrapolated, capsys):
    pytest.importorskip("matplotlib")
    png = os.path.join(extrapolated, "report.png")
    if os.path.exists(png):
        os.remove(png)
    assert main(["report", extrapolated, "--plot", "--worst", "3"]) == 0
    text = capsys.readouterr().out
    assert "explained variance" in text and "R^2" in text and "worst 3 tensors" in text
    assert "median" in text and "#" in text  # the distribution table and the text histogram
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- bad inputs
def _links(tmp, traj, names):
    d = tmp / "cks"
    d.mkdir()
    for src, name in names:
        os.symlink(os.path.join(traj["ckpts"], src), d / name)
    return str(d)


def _bad_cases(traj, tmp):
    ok = lambda *extra: ["extrapolate", "--base", traj["base"], "--checkpoints", traj["ckpts"], "--no-progress", *extra]  # noqa: E731
    cases = {}
    empty = tmp / "empty"
    empty.mkdir()
    cases["no checkpoints"] = ["extrapolate", "--base", traj["base"], "--checkpoints", str(empty), "--horizons", "40"]
    cases["missing checkpoint dir"] = [
        "extrapolate",
        "--base",
        traj["base"],
        "--checkpoints",
        str(tmp / "nope"),
        "--horizons",
        "40",
    ]
    cases["one checkpoint"] = [
        "extrapolate",
        "--base",
        traj["base"],
        "--checkpoints",
        os.path.join(traj["ckpts"], "checkpoint-2"),
        "--horizons",
        "40",
    ]
    rep = tmp / "rep"
    rep.mkdir()
    os.symlink(os.path.join(traj["ckpts"], "checkpoint-2"), rep / "checkpoint-4")
    os.symlink(os.path.join(traj["ckpts"], "checkpoint-4"), rep / "step_4")
    cases["repeated steps (names)"] = [
        "extrapolate",
        "--base",
        traj["base"],
        "--checkpoints",
        str(rep),
        "--horizons",
        "40",
    ]
    cases["repeated steps (--steps)"] = [
        "extrapolate",
        "--base",
        traj["base"],
        "--checkpoints",
        os.path.join(traj["ckpts"], "checkpoint-2"),
        os.path.join(traj["ckpts"], "checkpoint-4"),
        "--steps",
        "3,3",
        "--horizons",
        "40",
    ]
    cases["--steps count"] = ok("--steps", "1,2", "--horizons", "40")
    cases["horizon <= last step"] = ok("--horizons", "40,12")
    cases["horizon not a number"] = ok("--horizons", "forty")
    cases["repeated horizons"] = ok("--horizons", "40,40")
    cases["unknown dtype"] = ok("--horizons", "40", "--dtype", "float8")
    cases["unknown storage"] = ok("--horizons", "40", "--storage", "tape")
    cases["unknown solver"] = ok("--horizons", "40", "--solver", "magic")
    cases["bad device"] = ok("--horizons", "40", "--device", "tpu")
    cases["rank too large"] = ok("--horizons", "40", "--rank", "99")
    cases["fit-start too late"] = ok("--horizons", "40", "--fit-start", "12")
    cases["stride keeps one"] = ok("--horizons", "40", "--stride", "7")
    cases["unknown option"] = ok("--horizons", "40", "--frobnicate")
    cases["missing --horizons"] = ok()
    cases["missing base"] = [
        "extrapolate",
        "--base",
        str(tmp / "nobase"),
        "--checkpoints",
        traj["ckpts"],
        "--horizons",
        "40",
    ]
    # shapes that differ between checkpoints
    mixed = tmp / "mixed"
    mixed.mkdir()
    for t in STEPS[:-1]:
        os.symlink(os.path.join(traj["ckpts"], f"checkpoint-{t}"), mixed / f"checkpoint-{t}")
    build_model(traj["tok"], hidden_size=16, layers=1).save_pretrained(str(mixed / "checkpoint-12"))
    cases["shapes differ"] = ["extrapolate", "--base", traj["base"], "--checkpoints", str(mixed), "--horizons", "40"]
    # a truncated (corrupt) safetensors file in the last checkpoint: refused before the first one is read
    trunc = tmp / "trunc"
    trunc.mkdir()
    for t in STEPS[:-1]:
        os.symlink(os.path.join(traj["ckpts"], f"checkpoint-{t}"), trunc / f"checkpoint-{t}")
    shutil.copytree(os.path.join(traj["ckpts"], "checkpoint-12"), trunc / "checkpoint-12")
    f = trunc / "checkpoint-12" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    cases["truncated file"] = ["extrapolate", "--base", traj["base"], "--checkpoints", str(trunc), "--horizons", "40"]
    garbage = tmp / "garbage"
    garbage.mkdir()
    for t in STEPS[:-1]:
        os.symlink(os.path.join(traj["ckpts"], f"checkpoint-{t}"), garbage / f"checkpoint-{t}")
    (garbage / "checkpoint-12").mkdir()
    (garbage / "checkpoint-12" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    cases["garbage file"] = ["extrapolate", "--base", traj["base"], "--checkpoints", str(garbage), "--horizons", "40"]
    nostep = tmp / "nostep"
    nostep.mkdir()
    os.symlink(os.path.join(traj["ckpts"], "checkpoint-2"), nostep / "final")
    os.symlink(os.path.join(traj["ckpts"], "checkpoint-4"), nostep / "best")
    cases["no step in names"] = [
        "extrapolate",
        "--base",
        traj["base"],
        "--checkpoints",
        str(nostep / "final"),
        str(nostep / "best"),
        "--horizons",
        "40",
    ]
    cases["materialize missing state"] = [
        "materialize",
        "--state",
        str(tmp / "none.safetensors"),
        "--base",
        traj["base"],
        "--horizons",
        "40",
    ]
    cases["report missing"] = ["report", str(tmp / "none")]
    return cases


def test_bad_inputs_exit_2_and_write_nothing(traj, tmp_path, capsys):
    cases = _bad_cases(traj, tmp_path)
    capsys.readouterr()
    for name, argv in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_').replace('/', '_')}"
        if argv[0] != "report":
            argv = argv + ["--out", str(out)]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, f"{name}: exit {rc}, stderr {err!r}"
        assert err.startswith("relex: error: ") and err.count("\n") == 1, f"{name}: {err!r}"
        assert not out.exists(), f"{name}: wrote {out}"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], f"{name}: left scratch files"


def test_existing_output_is_refused(traj, extrapolated, capsys):
    before = sorted(os.listdir(extrapolated))
    mtime = os.path.getmtime(os.path.join(extrapolated, "relex_state.safetensors"))
    rc = main(
        [
            "extrapolate",
            "--base",
            traj["base"],
            "--checkpoints",
            traj["ckpts"],
            "--horizons",
            "40",
            "--out",
            extrapolated,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err
    assert sorted(os.listdir(extrapolated)) == before
    assert os.path.getmtime(os.path.join(extrapolated, "relex_state.safetensors")) == mtime
    rc = main(
        ["materialize", "--state", extrapolated, "--base", traj["base"], "--horizons", "100", "--out", extrapolated]
    )
    assert rc == 2 and "step-100" in capsys.readouterr().err
