"""Bad input: every argument of the callback / settings / fold / Python entry points and of the `relex` CLI with its
invalid
values and the exact message. The same table generates docs/bad_input.md, and a test checks the doc is current:

    PYTHONPATH=. python tests/test_bad_input.py --write   # regenerate docs/bad_input.md
"""

import os
import re
import sys
import tempfile
import contextlib
import io
import json
import shutil

import pytest

from relex_callback.config import RelexSettings
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from relex_callback import RelexCallback  # noqa: E402
from relex_callback.errors import RelexInputError  # noqa: E402
from relex_callback.core.fold import plan_slots  # noqa: E402
from relex_callback.examples.toy import build_model, build_tokenizer  # noqa: E402
from relex_callback.files.checkpoints import DirectorySource  # noqa: E402
from relex_callback.files.fs import check_outputs_free  # noqa: E402
from relex_callback.files.writers import FullModelWriter  # noqa: E402
from relex_callback.offline.api import extrapolate_trajectory, materialize as m  # noqa: E402
from relex_callback.offline.cli import main  # noqa: E402
from relex_callback.params import plain_tracked, TensorSpec, trainable_named_parameters  # noqa: E402
from relex_callback.pipeline.finalize import finalize  # noqa: E402
from relex_callback.trajectory.store import TrajectoryStore  # noqa: E402
from helpers import run_relex  # noqa: E402

DOC = os.path.join(REPO, "docs", "bad_input.md")
OK = dict(tcut=75, horizons=[500])


def cb(**kw):
    args = dict(OK)
    args.update(kw)
    return lambda d: RelexCallback(**args)


def _model():
    return build_model(build_tokenizer(), hidden_size=16, layers=1)


def select(**kw):
    def run(d):
        c = RelexCallback(tcut=4, horizons=[20], **kw)
        c._select(_model())

    return run


def plan(**kw):
    return lambda d: plan_slots(100, 1000, 2, **kw)


def _base(d, seed=0):
    p = os.path.join(d, f"base{seed}")
    if not os.path.isdir(p):
        tok = build_tokenizer()
        build_model(tok, hidden_size=16, layers=1, seed=seed).save_pretrained(p)
        tok.save_pretrained(p)
    return p


def _state(d):
    """A real state file from a 4-step window on base0."""
    out = os.path.join(d, "out")
    if os.path.isfile(os.path.join(out, "relex_state.safetensors")):
        return out
    base = _base(d)
    m = AutoModelForCausalLM.from_pretrained(base)
    tracked = plain_tracked(trainable_named_parameters(m))
    st = TrajectoryStore([t.spec for t in tracked], 4, dtype="float32", storage="host")
    st.set_theta0([t.read() for t in tracked])
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(t.spec.local_numel, generator=g) for t in tracked]
    for s in range(1, 5):
        st.snapshot(s, [t.read().float() + 1e-3 * s * v for t, v in zip(tracked, dirs)])
    finalize(st, FullModelWriter(DirectorySource(base)), RelexSettings(tcut=4, horizons=(20,)), out_dir=out)
    return out


def materialize(base="base0", horizons=(40,), state=None):
    def run(d):
        out = _state(d)
        sp = state(d) if state else os.path.join(out, "relex_state.safetensors")
        b = base(d) if callable(base) else _base(d, int(base[-1]))
        m(sp, b, list(horizons), out_dir=os.path.join(d, "mat"))

    return run


def _corrupt_state(d):
    p = os.path.join(d, "corrupt_state.safetensors")
    with open(p, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return p


def _corrupt_base(d):
    p = os.path.join(d, "corrupt_base")
    if not os.path.isdir(p):
        shutil.copytree(_base(d), p)
        with open(os.path.join(p, "model.safetensors"), "r+b") as f:
            f.truncate(100)
    return p


def _no_weights(d):
    p = os.path.join(d, "empty_base")
    os.makedirs(p, exist_ok=True)
    return p


def _outputs_free(d, name, overwrite=False, merged=False):
    """The check RelexCallback.on_train_begin runs, on an output_dir holding a user's ``name``."""
    out = os.path.join(d, f"userout-{name}")
    path = os.path.join(out, name)
    if not os.path.exists(path):
        if name.startswith("step-"):
            os.makedirs(path)
        else:
            os.makedirs(out, exist_ok=True)
            open(path, "w").write("notes\n")
    check_outputs_free(out, [500], overwrite, merged=merged)


def extrapolate(traj):
    return lambda d: extrapolate_trajectory(traj(d), _base(d), [40], os.path.join(d, "x"))


# (where, argument, invalid value, call)
CASES = [
    ("RelexCallback / RelexSettings", "tcut", "None", cb(tcut=None)),
    ("RelexCallback / RelexSettings", "tcut", "1", cb(tcut=1)),
    ("RelexCallback / RelexSettings", "tcut", "'many'", cb(tcut="many")),
    ("RelexCallback / RelexSettings", "tcut", "7.5", cb(tcut=7.5)),
    ("RelexCallback / RelexSettings", "tcut", "10**30", cb(tcut=10**30)),
    ("RelexCallback / RelexSettings", "horizons", "None", cb(horizons=None)),
    ("RelexCallback / RelexSettings", "horizons", "[]", cb(horizons=[])),
    ("RelexCallback / RelexSettings", "horizons", "'500,x'", cb(horizons="500,x")),
    ("RelexCallback / RelexSettings", "horizons", "[50] (tcut=75)", cb(horizons=[50])),
    ("RelexCallback / RelexSettings", "horizons", "[75, 500] (tcut=75)", cb(horizons=[75, 500])),
    ("RelexCallback / RelexSettings", "horizons", "[1000, 500, 1000]", cb(horizons=[1000, 500, 1000])),
    ("RelexCallback / RelexSettings", "stride", "0", cb(stride=0)),
    ("RelexCallback / RelexSettings", "stride", "7 (tcut=75)", cb(stride=7)),
    ("RelexCallback / RelexSettings", "stride", "100 (tcut=75)", cb(stride=100)),
    ("RelexCallback / RelexSettings", "stride", "75 (tcut=75)", cb(stride=75)),
    ("RelexCallback / RelexSettings", "fit_start", "75 (tcut=75)", cb(fit_start=75)),
    ("RelexCallback / RelexSettings", "fit_start", "200 (tcut=75)", cb(fit_start=200)),
    ("RelexCallback / RelexSettings", "fit_start", "-1", cb(fit_start=-1)),
    ("RelexCallback / RelexSettings", "rank", "0", cb(rank=0)),
    ("RelexCallback / RelexSettings", "rank", "80 (75 snapshots)", cb(rank=80)),
    ("RelexCallback / RelexSettings", "rank + solver", "rank=2, solver='power'", cb(rank=2, solver="power")),
    ("RelexCallback / RelexSettings", "storage", "'ssd'", cb(storage="ssd")),
    ("RelexCallback / RelexSettings", "dtype", "'int8'", cb(dtype="int8")),
    ("RelexCallback / RelexSettings", "dtype", "torch.float64", cb(dtype=torch.float64)),
    ("RelexCallback / RelexSettings", "solver", "'svd'", cb(solver="svd")),
    ("RelexCallback / RelexSettings", "max_buffer_bytes", "0", cb(max_buffer_bytes=0)),
    ("RelexCallback", "stop_training", "'yes'", cb(stop_training="yes")),
    ("RelexCallback", "include", "['[']", cb(include=["["])),
    ("RelexCallback", "exclude", "['(']", cb(exclude=["("])),
    ("RelexCallback", "max_shard_size", "'lots'", cb(max_shard_size="lots")),
    ("RelexCallback", "fold_rank", "0", cb(fold_rank=0)),
    ("RelexCallback", "fold_rank", "1 (rank=2)", cb(rank=2, fold_rank=1)),
    ("RelexCallback", "fold_rank", "10**30", cb(fold_rank=10**30)),
    ("RelexCallback", "buffer_slots", "0", cb(buffer_slots=0)),
    ("RelexCallback", "buffer_slots", "'8'", cb(buffer_slots="8")),
    ("RelexCallback", "on_nonfinite", "'ignore'", cb(on_nonfinite="ignore")),
    ("RelexCallback / RelexSettings", "fit", "'cubic'", cb(fit="cubic")),
    ("RelexCallback / RelexSettings", "fit", "'power' with tcut=2", cb(tcut=2, horizons=[8], fit="power")),
    ("RelexCallback / RelexSettings", "fit", "'power' with fit_window=2", cb(fit="power", fit_window=2)),
    (
        "RelexCallback / RelexSettings",
        "degree",
        "3 with tcut=3 (polynomial)",
        cb(tcut=3, horizons=[8], fit="polynomial", degree=3),
    ),
    ("RelexCallback / RelexSettings", "fit_window", "1", cb(fit_window=1)),
    (
        "RelexCallback (on_train_begin)",
        "overwrite",
        "True, output_dir holding a user's step-500/ (no relex marker)",
        lambda d: _outputs_free(d, "step-500", overwrite=True),
    ),
    (
        "RelexCallback (on_train_begin)",
        "output_dir",
        "holding a user's report.json",
        lambda d: _outputs_free(d, "report.json"),
    ),
    (
        "RelexCallback (on_train_begin)",
        "merge_lora",
        "True (PEFT), output_dir holding a user's step-500-merged/",
        lambda d: _outputs_free(d, "step-500-merged", merged=True),
    ),
    ("RelexCallback (on_train_begin)", "include", "['nomatch']", select(include=["nomatch"])),
    ("RelexCallback (on_train_begin)", "exclude", "['nomatch']", select(exclude=["nomatch"])),
    ("RelexCallback (on_train_begin)", "exclude", "['.*'] (everything)", select(exclude=[".*"])),
    (
        "RelexCallback (on_train_begin)",
        "max_buffer_bytes",
        "5 rows (window 100 > rows, fold_rank=8)",
        plan(max_buffer_bytes=5 * 2000, buffer_slots=None, fold_rank=8),
    ),
    (
        "RelexCallback (on_train_begin)",
        "buffer_slots + max_buffer_bytes",
        "buffer_slots=10, fold_rank=8, 12 rows",
        plan(max_buffer_bytes=12 * 2000, buffer_slots=10, fold_rank=8),
    ),
    ("offline.materialize (relex materialize)", "base", "another model (seed 1)", materialize(base="base1")),
    ("offline.materialize (relex materialize)", "base", "directory without weights", materialize(base=_no_weights)),
    ("offline.materialize (relex materialize)", "base", "truncated model.safetensors", materialize(base=_corrupt_base)),
    ("offline.materialize (relex materialize)", "state", "corrupt safetensors", materialize(state=_corrupt_state)),
    (
        "offline.materialize (relex materialize)",
        "state",
        "missing file",
        materialize(state=lambda d: os.path.join(d, "nope.safetensors")),
    ),
    (
        "offline.materialize (relex materialize)",
        "state",
        "a model checkpoint, not a state file",
        materialize(state=lambda d: os.path.join(_base(d), "model.safetensors")),
    ),
    ("offline.materialize (relex materialize)", "horizons", "[3] (state tcut=4)", materialize(horizons=(3,))),
    (
        "offline.extrapolate_trajectory",
        "trajectory",
        "a directory that is not a saved trajectory",
        extrapolate(lambda d: _base(d)),
    ),
]


# ------------------------------------------------------------------------------------------------ the CLI
# Every option of `relex extrapolate / materialize / report` with its invalid values, run in process through
# relex_callback.offline.cli.main(argv). Command lines use placeholders for the fixture's paths: <base> (a tiny saved
# model),
# <base1> (another model of the same shape), <ckpts> (its checkpoint-2,4,6,8), <done> (a finished `relex extrapolate`
# output: state, step-40/, report.json), <traj> (a trajectory saved by the store), <out> (a fresh output directory
# that must still not exist afterwards) and <dir> (the scratch directory).
CLI_STEPS = (2, 4, 6, 8)
_CLI_PATHS = ("base", "base1", "ckpts", "done", "traj", "small", "nan", "trunc", "nostep", "empty", "notes", "badjson",
              "notreport", "file", "badmeta", "trunc_theta0", "short_rows", "trunc_state", "userdir", "nanbase",
              "badtrust", "deepreport", "deeptraj", "deepindex", "deepconfig", "deepstate", "deepmarker", "liar",
              "liehdr", "lieindex", "dangling", "base16", "ckpts16", "done16")
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep: Python's parser recurses once per level


def _save_like(src_dir, dst_dir, tensors):
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        if f != "model.safetensors":
            shutil.copy(os.path.join(src_dir, f), dst_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst_dir, "model.safetensors"),
              metadata={"format": "pt"})


def cli_fixture(d):
    """Build the paths the CLI cases refer to, once per directory (cheap: a 16-wide one-layer model)."""
    p = {k: os.path.join(d, k) for k in _CLI_PATHS}
    p["base"], p["base1"] = _base(d, 0), _base(d, 1)
    if os.path.isdir(p["done"]):
        return p
    theta0 = load_file(os.path.join(p["base"], "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    dirs = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    for s in CLI_STEPS:
        _save_like(p["base"], os.path.join(p["ckpts"], f"checkpoint-{s}"),
                   {k: v + 1e-3 * s * dirs[k].to(v.dtype) for k, v in theta0.items()})
    # checkpoints whose last step has another shape / a NaN / a truncated file; names without a step
    for name in ("small", "nan", "trunc"):
        for s in CLI_STEPS[:-1]:
            os.makedirs(p[name], exist_ok=True)
            os.symlink(os.path.join(p["ckpts"], f"checkpoint-{s}"), os.path.join(p[name], f"checkpoint-{s}"))
    last = os.path.join(p["ckpts"], f"checkpoint-{CLI_STEPS[-1]}")
    small = {
        k: v[..., :-1] if v.dim() == 2 else v for k, v in load_file(os.path.join(last, "model.safetensors")).items()
    }
    _save_like(last, os.path.join(p["small"], f"checkpoint-{CLI_STEPS[-1]}"), small)
    nan = load_file(os.path.join(last, "model.safetensors"))
    k0 = sorted(nan)[-1]
    nan[k0] = nan[k0].clone()
    nan[k0].reshape(-1)[0] = float("nan")
    _save_like(last, os.path.join(p["nan"], f"checkpoint-{CLI_STEPS[-1]}"), nan)
    shutil.copytree(last, os.path.join(p["trunc"], f"checkpoint-{CLI_STEPS[-1]}"))
    f = os.path.join(p["trunc"], f"checkpoint-{CLI_STEPS[-1]}", "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    os.makedirs(p["nostep"])
    for s, name in ((2, "first"), (4, "second")):
        os.symlink(os.path.join(p["ckpts"], f"checkpoint-{s}"), os.path.join(p["nostep"], name))
    os.makedirs(p["empty"])
    os.makedirs(p["notes"])
    with open(os.path.join(p["notes"], "notes.txt"), "w") as fh:
        fh.write("not a report\n")
    os.makedirs(p["badjson"])
    with open(os.path.join(p["badjson"], "report.json"), "w") as fh:
        fh.write('{"summary": ')
    with open(p["file"], "w") as fh:
        fh.write("a file, not a directory\n")
    # a real trajectory saved by the store (what the callback leaves in partial_trajectory/)

    specs = [TensorSpec(name=k, shape=tuple(v.shape), dtype=v.dtype, local_numel=v.numel()) for k, v in theta0.items()]
    st = TrajectoryStore(specs, len(CLI_STEPS), dtype="float32", storage="host")
    st.set_theta0([theta0[s.name] for s in specs])
    for s in CLI_STEPS:
        st.snapshot(s, [theta0[x.name] + 1e-3 * s * dirs[x.name] for x in specs])
    st.save(p["traj"])
    st.release()
    for name in ("badmeta", "trunc_theta0", "short_rows"):
        shutil.copytree(p["traj"], p[name])
    with open(os.path.join(p["badmeta"], "trajectory.json"), "w") as fh:
        json.dump({"version": 1}, fh)
    for name, fn in (("trunc_theta0", "theta0.safetensors"), ("short_rows", "trajectory.bin")):
        f = os.path.join(p[name], fn)
        os.truncate(f, os.path.getsize(f) // 2)
    os.makedirs(p["notreport"])
    with open(os.path.join(p["notreport"], "report.json"), "w") as fh:
        json.dump([1, 2, 3], fh)
    # a finished run: state, step-40/ and report.json

    with _quiet():
        rc = main(["extrapolate", "--base", p["base"], "--checkpoints", p["ckpts"], "--horizons", "40", "--out",
                   p["done"], "--dtype", "float32", "--no-progress"])
    assert rc == 0, "the fixture's own `relex extrapolate` failed"
    json.load(open(os.path.join(p["done"], "report.json")))
    os.makedirs(p["trunc_state"])
    shutil.copy(os.path.join(p["done"], "relex_state.safetensors"), p["trunc_state"])
    f = os.path.join(p["trunc_state"], "relex_state.safetensors")
    os.truncate(f, os.path.getsize(f) - 50)
    os.makedirs(os.path.join(p["userdir"], "step-40"))  # a user's directory with a look-alike name
    with open(os.path.join(p["userdir"], "step-40", "notes.txt"), "w") as fh:
        fh.write("mine\n")
    nan = load_file(os.path.join(p["base"], "model.safetensors"))
    k0 = sorted(nan)[0]
    nan[k0] = nan[k0].clone()
    nan[k0].reshape(-1)[3] = float("nan")
    _save_like(p["base"], p["nanbase"], nan)
    os.makedirs(p["badtrust"])
    with open(os.path.join(p["done"], "report.json")) as fh:
        rep = json.load(fh)
    rep["backtest"] = {**(rep.get("backtest") or {}), "cosine_global": "0.99"}
    with open(os.path.join(p["badtrust"], "report.json"), "w") as fh:
        json.dump(rep, fh)
    _lying_files(p, theta0, dirs)
    return p


def _lying_files(p, theta0, dirs):
    """Every file relex reads, once nested 100,000 deep and once claiming more bytes than it holds; a dangling
    symlink as --out; a float16 run whose far horizon overflows."""
    def write(path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)

    write(os.path.join(p["deepreport"], "report.json"), DEEP)
    shutil.copytree(p["traj"], p["deeptraj"])
    write(os.path.join(p["deeptraj"], "trajectory.json"), DEEP)
    shutil.copytree(p["base"], p["deepindex"])
    os.remove(os.path.join(p["deepindex"], "model.safetensors"))
    write(os.path.join(p["deepindex"], "model.safetensors.index.json"), DEEP)
    shutil.copytree(p["base"], p["deepconfig"])
    write(os.path.join(p["deepconfig"], "config.json"), DEEP)
    write(os.path.join(p["deepstate"], "relex_state.index.json"), DEEP)
    shutil.copytree(p["done"], p["deepmarker"])
    write(os.path.join(p["deepmarker"], "step-40", "relex_horizon.json"), DEEP)
    # trajectory.json claiming one 2^27-element tensor (the files hold a few thousand): 1 GB of buffer if believed
    shutil.copytree(p["traj"], p["liar"])
    meta = json.load(open(os.path.join(p["liar"], "trajectory.json")))
    meta["specs"] = [{**meta["specs"][0], "shape": [1 << 27], "local_numel": 1 << 27, "flat_start": 0}]
    meta["specs"][0]["offset"] = 0
    with open(os.path.join(p["liar"], "trajectory.json"), "w") as fh:
        json.dump(meta, fh)
    # a checkpoint whose safetensors header claims 2^40 bytes; an index that maps a tensor to a shard without it
    for s in CLI_STEPS:
        os.makedirs(p["liehdr"], exist_ok=True)
        if s != CLI_STEPS[-1]:
            os.symlink(os.path.join(p["ckpts"], f"checkpoint-{s}"), os.path.join(p["liehdr"], f"checkpoint-{s}"))
    last = os.path.join(p["liehdr"], f"checkpoint-{CLI_STEPS[-1]}")
    shutil.copytree(os.path.join(p["ckpts"], f"checkpoint-{CLI_STEPS[-1]}"), last)
    with open(os.path.join(last, "model.safetensors"), "r+b") as fh:
        fh.write((1 << 40).to_bytes(8, "little"))
    shutil.copytree(p["base"], p["lieindex"])
    keys = sorted(theta0)
    os.rename(os.path.join(p["lieindex"], "model.safetensors"), os.path.join(p["lieindex"], "a.safetensors"))
    with open(os.path.join(p["lieindex"], "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": {**{k: "a.safetensors" for k in keys[1:]}, keys[0]: "b.safetensors"}},
                  fh)

    save_file({"other": torch.zeros(2)}, os.path.join(p["lieindex"], "b.safetensors"), metadata={"format": "pt"})
    os.symlink(os.path.join(os.path.dirname(p["dangling"]), "nowhere"), p["dangling"])
    # a float16 run: horizon 200 is finite, 10^9 overflows float16
    _save_like(p["base"], p["base16"], {k: v.half() for k, v in theta0.items()})
    for s in CLI_STEPS:
        _save_like(p["base"], os.path.join(p["ckpts16"], f"checkpoint-{s}"),
                   {k: (v + 1e-2 * s * dirs[k]).half() for k, v in theta0.items()})

    with _quiet():
        rc = main(["extrapolate", "--base", p["base16"], "--checkpoints", p["ckpts16"], "--horizons", "40", "--out",
                   p["done16"], "--no-progress"])
    assert rc == 0, "the fixture's float16 `relex extrapolate` failed"


class _quiet:
    def __enter__(self):
        self._cm = contextlib.ExitStack()
        self._cm.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._cm.enter_context(contextlib.redirect_stderr(io.StringIO()))
        return self

    def __exit__(self, *a):
        self._cm.close()


X = "extrapolate --base <base> --checkpoints <ckpts> --horizons 40 --out <out> --no-progress"  # a valid run
XT = X.replace("--checkpoints <ckpts>", "--trajectory <traj>")  # the same from a saved trajectory
M = "materialize --state <done> --base <base> --horizons 100 --out <out>"
XN = X.replace("<ckpts>", "<nostep>/first <nostep>/second")  # two checkpoints whose names give no step
# (subcommand, what is wrong, command line after `relex` with placeholders; whitespace-split)
CLI_CASES = [
    ("(none)", "no subcommand", ""),
    ("(none)", "unknown subcommand", "fit --base <base>"),
    ("extrapolate", "--base missing", "extrapolate --checkpoints <ckpts> --horizons 40 --out <out>"),
    (
        "extrapolate",
        "--checkpoints and --trajectory both missing",
        "extrapolate --base <base> --horizons 40 --out <out>",
    ),
    ("extrapolate", "--checkpoints and --trajectory both given", X + " --trajectory <traj>"),
    ("extrapolate", "--horizons missing", "extrapolate --base <base> --checkpoints <ckpts> --out <out>"),
    ("extrapolate", "--out missing", "extrapolate --base <base> --checkpoints <ckpts> --horizons 40"),
    ("extrapolate", "unknown option", X + " --frobnicate"),
    ("extrapolate", "--horizons not integers", X.replace("40", "forty")),
    ("extrapolate", "--horizons a fraction", X.replace("40", "40.5")),
    ("extrapolate", "--horizons empty", X.replace("40", ",")),
    ("extrapolate", "--horizons <= last step (8)", X.replace("40", "40,8")),
    ("extrapolate", "--horizons repeated", X.replace("40", "40,100,40")),
    ("extrapolate", "--horizons negative", X.replace("40", "-40")),
    ("extrapolate", "--steps with a parent directory (listing order is no step order)", X + " --steps 2,4,6,8"),
    ("extrapolate", "--steps count mismatch (2 checkpoints)", XN + " --steps 1,2,3"),
    ("extrapolate", "--steps repeated", XN + " --steps 4,4"),
    ("extrapolate", "--steps not integers", XN + " --steps 2,six"),
    ("extrapolate", "--steps includes 0", XN + " --steps 0,4"),
    ("extrapolate", "--stride 0", X + " --stride 0"),
    ("extrapolate", "--stride not an integer", X + " --stride two"),
    ("extrapolate", "--stride matching fewer than 2 checkpoints", X + " --stride 5"),
    ("extrapolate", "--fit-start beyond the steps", X + " --fit-start 8"),
    ("extrapolate", "--fit-start negative", X + " --fit-start -1"),
    ("extrapolate", "--fit-start not an integer", X + " --fit-start early"),
    ("extrapolate", "--fit-start beyond 10^9", X + " --fit-start 10000000000"),
    ("extrapolate", "--rank 0", X + " --rank 0"),
    ("extrapolate", "--rank > checkpoints", X + " --rank 5"),
    ("extrapolate", "--rank 2 with --solver power", X + " --rank 2 --solver power"),
    ("extrapolate", "--dtype unknown", X + " --dtype float8"),
    ("extrapolate", "--device unknown", X + " --device tpu"),
    ("extrapolate", "--device cuda without a GPU", X + " --device cuda"),
    ("extrapolate", "--storage unknown", X + " --storage tape"),
    ("extrapolate", "--solver unknown", X + " --solver svd"),
    ("extrapolate", "--max-shard-size garbage", X + " --max-shard-size lots"),
    ("extrapolate", "--base nonexistent", X.replace("<base>", "<dir>/nobase")),
    ("extrapolate", "--base without weights", X.replace("<base>", "<empty>")),
    ("extrapolate", "--base a file", X.replace("<base>", "<file>")),
    ("extrapolate", "--checkpoints nonexistent", X.replace("<ckpts>", "<dir>/nockpts")),
    ("extrapolate", "--checkpoints a file", X.replace("<ckpts>", "<file>")),
    ("extrapolate", "--checkpoints an empty directory", X.replace("<ckpts>", "<empty>")),
    ("extrapolate", "--checkpoints a single checkpoint", X.replace("<ckpts>", "<ckpts>/checkpoint-2")),
    (
        "extrapolate",
        "--checkpoints names without a step, no --steps",
        X.replace("<ckpts>", "<nostep>/first <nostep>/second"),
    ),
    (
        "extrapolate",
        "--checkpoints the same directory twice (under two --steps)",
        X.replace("<ckpts>", "<ckpts>/checkpoint-2 <ckpts>/checkpoint-4 <ckpts>/checkpoint-2") + " --steps 2,4,6",
    ),
    ("extrapolate", "--untracked-from with --checkpoints", X + " --untracked-from <base>"),
    (
        "extrapolate",
        "--untracked-from and --untracked-frozen",
        XT + " --untracked-from <base> --untracked-frozen",
    ),
    (
        "extrapolate",
        "--no-run-check with --trajectory",
        XT + " --no-run-check",
    ),
    ("extrapolate", "--checkpoints of another model (shapes differ)", X.replace("<ckpts>", "<small>")),
    ("extrapolate", "--checkpoints with a truncated safetensors", X.replace("<ckpts>", "<trunc>")),
    ("extrapolate", "--checkpoints with a NaN in a checkpoint", X.replace("<ckpts>", "<nan>")),
    ("extrapolate", "--base with a NaN (theta_0 itself)", X.replace("<base>", "<nanbase>")),
    ("extrapolate", "--trajectory not a directory", X.replace("--checkpoints <ckpts>", "--trajectory <file>")),
    ("extrapolate", "--trajectory nonexistent", X.replace("--checkpoints <ckpts>", "--trajectory <dir>/notraj")),
    ("extrapolate", "--trajectory not a saved trajectory", X.replace("--checkpoints <ckpts>", "--trajectory <ckpts>")),
    (
        "extrapolate",
        "--trajectory with a damaged trajectory.json",
        X.replace("--checkpoints <ckpts>", "--trajectory <badmeta>"),
    ),
    (
        "extrapolate",
        "--trajectory with a truncated theta0.safetensors",
        X.replace("--checkpoints <ckpts>", "--trajectory <trunc_theta0>"),
    ),
    (
        "extrapolate",
        "--trajectory with a truncated trajectory.bin",
        X.replace("--checkpoints <ckpts>", "--trajectory <short_rows>"),
    ),
    (
        "extrapolate",
        "--trajectory with a mismatched --base",
        XT.replace("<base>", "<base1>"),
    ),
    (
        "extrapolate",
        "--trajectory with --steps",
        XT + " --steps 2,4,6,8",
    ),
    (
        "extrapolate",
        "--trajectory with --horizons <= its last step",
        XT.replace("40", "8"),
    ),
    (
        "extrapolate",
        "--trajectory with --rank > recorded steps",
        XT + " --rank 5",
    ),
    (
        "extrapolate",
        "--trajectory with --max-shard-size garbage",
        XT + " --max-shard-size lots",
    ),
    ("extrapolate", "--out an existing non-empty directory", X.replace("<out>", "<done>")),
    ("extrapolate", "--out an existing file", X.replace("<out>", "<file>")),
    (
        "extrapolate",
        "--overwrite over a user's step-40/ (no relex marker)",
        X.replace("<out>", "<userdir>") + " --overwrite",
    ),
    ("extrapolate", "--out inside a file", X.replace("<out>", "<file>/out")),
    ("materialize", "--state missing", "materialize --base <base> --horizons 100 --out <out>"),
    ("materialize", "--state nonexistent", M.replace("<done>", "<dir>/nostate")),
    ("materialize", "--state not a state file (a model checkpoint)", M.replace("<done>", "<base>/model.safetensors")),
    ("materialize", "--state a directory without a state file", M.replace("<done>", "<empty>")),
    ("materialize", "--state a truncated state file", M.replace("<done>", "<trunc_state>")),
    ("materialize", "--base of another model (mismatched)", M.replace("<base>", "<base1>")),
    ("materialize", "--base without weights", M.replace("<base>", "<empty>")),
    ("materialize", "--base with a NaN (theta_0 itself)", M.replace("<base>", "<nanbase>")),
    ("materialize", "--horizons <= the state's tcut (8)", M.replace("100", "8")),
    ("materialize", "--horizons repeated", M.replace("100", "100,100")),
    ("materialize", "--horizons not integers", M.replace("100", "1e3")),
    ("materialize", "--max-shard-size garbage", M + " --max-shard-size lots"),
    ("materialize", "--out holding step-H already", M.replace("100", "40").replace("<out>", "<done>")),
    ("materialize", "--out an existing file", M.replace("<out>", "<file>")),
    ("materialize", "--out inside a file", M.replace("<out>", "<file>/out")),
    ("report", "directory missing", "report"),
    ("report", "directory nonexistent", "report <dir>/norun"),
    ("report", "directory without report.json", "report <notes>"),
    ("report", "report.json not valid JSON", "report <badjson>"),
    ("report", "report.json valid JSON but not a report", "report <notreport>"),
    ("report", "--worst not an integer", "report <done> --worst many"),
    ("report", "--worst negative", "report <done> --worst -1"),
    ("report", "--worst beyond 10^9", "report <done> --worst 10000000000"),
    ("report", "report.json with a trust signal of the wrong type", "report <badtrust>"),
    ("report", "--plot without matplotlib installed", "report <done> --plot"),
    # files that lie: nested 100,000 deep, or claiming more bytes than they hold (refused before any allocation)
    ("report", "report.json nested 100,000 deep", "report <deepreport>"),
    (
        "extrapolate",
        "--trajectory with trajectory.json nested 100,000 deep",
        X.replace("--checkpoints <ckpts>", "--trajectory <deeptraj>"),
    ),
    (
        "extrapolate",
        "--trajectory whose trajectory.json claims a 2^27-element tensor",
        X.replace("--checkpoints <ckpts>", "--trajectory <liar>"),
    ),
    ("extrapolate", "--base with model.safetensors.index.json nested 100,000 deep", X.replace("<base>", "<deepindex>")),
    ("extrapolate", "--base whose index maps a tensor to a shard without it", X.replace("<base>", "<lieindex>")),
    ("extrapolate", "--checkpoints with a safetensors header claiming 2^40 bytes", X.replace("<ckpts>", "<liehdr>")),
    (
        "extrapolate",
        "--overwrite over a step-40/ whose relex_horizon.json is nested 100,000 deep",
        X.replace("<out>", "<deepmarker>") + " --overwrite",
    ),
    (
        "materialize",
        "--state relex_state.index.json nested 100,000 deep",
        M.replace("<done>", "<deepstate>/relex_state.index.json"),
    ),
    ("plan", "--model config.json nested 100,000 deep", "plan --model <deepconfig> --tcut 100"),
    # everything checkable before the first write is checked before it
    ("extrapolate", "--out a dangling symlink", X.replace("<out>", "<dangling>")),
    ("materialize", "--out a dangling symlink", M.replace("<out>", "<dangling>")),
    (
        "materialize",
        "--horizons 200,1000000000 on a float16 run (10^9 overflows)",
        "materialize --state <done16> --base <base16> --horizons 200,1000000000 --out <out>",
    ),
]


def cli_argv(cmd: str, p: dict, d: str, out: str) -> list[str]:
    """The argv of a case: placeholders <name> replaced by the fixture's paths, <out> by ``out``, <dir> by ``d``."""
    paths = dict(p, out=out, dir=d)
    return [re.sub(r"<(\w+)>", lambda m: paths[m.group(1)], a) for a in cmd.split()]


class _simulate:
    """What a case needs of the machine that is not true here: no GPU for ``--device cuda``, no matplotlib for
    ``--plot`` (the import fails exactly as on a machine without it)."""

    def __init__(self, cmd):
        self.cmd = cmd
        self.undo = []

    def __enter__(self):
        if "--device cuda" in self.cmd and torch.cuda.is_available():
            self.undo.append((torch.cuda, "is_available", torch.cuda.is_available))
            torch.cuda.is_available = lambda: False
        if "--plot" in self.cmd:
            for m in ("matplotlib", "matplotlib.pyplot"):
                self.undo.append((sys.modules, m, sys.modules.get(m)))
                sys.modules[m] = None  # `import matplotlib` raises ImportError
        return self

    def __exit__(self, *a):
        for obj, name, old in reversed(self.undo):
            if obj is sys.modules:
                if old is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old
            else:
                setattr(obj, name, old)


def _tree(path):
    return sorted((r, tuple(sorted(f))) for r, _, f in os.walk(path))


def run_cli_case(i: int, d: str, p: dict, capture) -> dict:
    """Run CLI case ``i`` in process; ``capture()`` returns the stderr written since the last call."""
    _, _, cmd = CLI_CASES[i]
    out = os.path.join(d, f"out{i}")
    argv = cli_argv(cmd, p, d, out)
    before = _tree(p["done"]), sorted(os.listdir(d))
    capture()
    with _simulate(cmd):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's --help and friends (none of the cases)
            rc = e.code
    err = capture()
    return {"rc": rc, "err": err, "out_exists": os.path.exists(out),
            "changed": (_tree(p["done"]), sorted(os.listdir(d))) != before}


def normalise_cli(msg: str, p: dict, d: str) -> str:
    for k in sorted(p, key=lambda k: -len(p[k])):
        msg = msg.replace(os.path.realpath(p[k]), f"<{k}>").replace(p[k], f"<{k}>")
    msg = re.sub(re.escape(d) + r"/out\d+", "<out>", msg)
    return normalise(msg, d)


def collect_cli():
    rows = []
    with tempfile.TemporaryDirectory() as d:
        p = cli_fixture(d)
        buf = io.StringIO()

        def capture():
            v = buf.getvalue()
            buf.seek(0)
            buf.truncate()
            return v

        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            for i in range(len(CLI_CASES)):
                r = run_cli_case(i, d, p, capture)
                rows.append((CLI_CASES[i][0], CLI_CASES[i][1], ("relex " + CLI_CASES[i][2]).strip(), r["rc"],
                             normalise_cli(r["err"].rstrip("\n"), p, d)))
    return rows

def normalise(msg: str, d: str) -> str:
    return msg.replace(os.path.realpath(d), "<dir>").replace(d, "<dir>")


def collect():
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for where, arg, value, call in CASES:
            try:
                call(d)
            except RelexInputError as e:
                rows.append((where, arg, value, type(e).__name__, normalise(str(e), d)))
            else:
                rows.append((where, arg, value, "(no error)", ""))
    return rows


def render(rows, cli_rows=()) -> str:
    def cell(s):
        return s.replace("|", "\\|").replace("\n", " ")

    def code(s):  # a code span; doubled backticks when the text has one
        return f"`` {cell(s)} ``" if "`" in s else f"`{cell(s)}`"

    out = [
        "# Bad input: what each invalid argument says",
        "",
        "Generated from `tests/test_bad_input.py` (`PYTHONPATH=. python tests/test_bad_input.py --write`); a test "
        "fails when the code's messages and this table differ. Every row is a `RelexInputError` (or its subclass "
        "`RelexMemoryError`): the callback raises it when it is constructed or at `on_train_begin`, before any "
        "training step; the CLI prints the message on one line and exits with code 2. Paths are shown as `<dir>`.",
        "",
        "| where | argument | invalid value | error | message |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append("| " + " | ".join(cell(x) for x in r[:3]) + f" | `{r[3]}` | {cell(r[4])} |")
    if cli_rows:
        out += [
            "",
            "## The `relex` CLI",
            "",
            "Each command line is run in process (`relex_callback.offline.cli.main(argv)`); every one prints exactly "
            "the one "
            "line shown on stderr, exits with code 2, writes nothing to `--out` and leaves the other directories as "
            "they were (tests/test_bad_input.py checks all of it; a few also run as a real `python -m "
            "relex_callback.offline.cli` subprocess to show no traceback reaches stderr). Placeholders: `<base>` a "
            "saved "
            "model (step 0), `<base1>` another model of the same shape, `<ckpts>` its checkpoint-2, -4, -6, -8, "
            "`<done>` a finished `relex extrapolate --horizons 40` output (state, step-40/, report.json), `<traj>` a "
            "saved trajectory, `<nan>` / `<trunc>` / `<small>` checkpoint-2..8 whose checkpoint-8 has a NaN / a "
            "truncated model.safetensors / other shapes, `<nostep>` checkpoints named first/ and second/, `<empty>` "
            "an empty directory, `<notes>` a directory without report.json, `<badjson>` / `<notreport>` one with a "
            "broken report.json / a JSON list, `<badmeta>` / `<trunc_theta0>` / `<short_rows>` copies of `<traj>` with "
            "trajectory.json missing keys / theta0.safetensors or trajectory.bin cut in half, `<trunc_state>` the "
            "state file without its last 50 bytes, `<userdir>` a directory holding a user's step-40/ (no relex "
            "marker), "
            "`<nanbase>` `<base>` with a NaN in one tensor, `<badtrust>` `<done>`'s report.json with "
            "backtest.cosine_global a string, `<file>` a plain file, `<out>` a fresh output directory, `<dir>` the "
            "scratch directory. "
            "`--device cuda without a GPU` and `--plot without matplotlib` are simulated when the machine has them.",
            "",
            "| command | what is wrong | command line | exit | message (stderr) |",
            "|---|---|---|---|---|",
        ]
        for r in cli_rows:
            out.append(f"| {r[0]} | {cell(r[1])} | {code(r[2])} | {r[3]} | {code(r[4])} |")
    return "\n".join(out) + "\n"


_ROWS = None
_CLI_ROWS = None


def rows():
    global _ROWS
    if _ROWS is None:
        _ROWS = collect()
    return _ROWS


def cli_rows():
    global _CLI_ROWS
    if _CLI_ROWS is None:
        _CLI_ROWS = collect_cli()
    return _CLI_ROWS


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_each_bad_input_raises_a_clear_input_error(i):
    where, arg, value, err, msg = rows()[i]
    assert err != "(no error)", f"{where} {arg}={value} was accepted"
    assert len(msg) > 15 and "Traceback" not in msg
    # the message names the argument (or the file) it is about
    key = re.split(r"[ +]", arg)[0]
    assert key in msg or "<dir>" in msg or arg in ("state", "base", "trajectory"), msg


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli"))
    return d, cli_fixture(d)


@pytest.mark.parametrize("i", range(len(CLI_CASES)), ids=[c[1] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(i, cli_env, capsys):
    d, p = cli_env
    r = run_cli_case(i, d, p, lambda: capsys.readouterr().err)
    cmd = "relex " + CLI_CASES[i][2]
    assert r["rc"] == 2, f"{cmd}: exit {r['rc']}, stderr {r['err']!r}"
    assert r["err"].startswith("relex: error: ") and r["err"].count("\n") == 1, f"{cmd}: {r['err']!r}"
    assert "Traceback" not in r["err"]
    assert not r["out_exists"], f"{cmd}: wrote --out"
    assert not r["changed"], f"{cmd}: changed the finished output or left files in the scratch directory"
    # the same message as in docs/bad_input.md (the doc test checks the doc against cli_rows())
    assert normalise_cli(r["err"].rstrip("\n"), p, d) == cli_rows()[i][4]


# a few as a real process: the console entry point prints one line and no traceback
SUBPROCESS_CASES = ["--checkpoints with a NaN in a checkpoint", "--state not a state file (a model checkpoint)",
                    "report.json not valid JSON"]


@pytest.mark.parametrize("what", SUBPROCESS_CASES)
def test_cli_bad_input_in_a_real_process(what, cli_env, subprocess_env):
    d, p = cli_env
    i = [c[1] for c in CLI_CASES].index(what)
    out = os.path.join(d, "sub-out")
    argv = cli_argv(CLI_CASES[i][2], p, d, out)
    r = run_relex(*argv, env=subprocess_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("relex: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert normalise_cli(r.stderr.rstrip("\n"), p, d).replace("<out>", "<dir>/sub-out") == cli_rows()[i][4]
    assert not os.path.exists(out)


def test_doc_is_generated_from_the_real_messages():
    assert os.path.isfile(DOC), "run: PYTHONPATH=. python tests/test_bad_input.py --write"
    with open(DOC) as f:
        assert f.read() == render(rows(), cli_rows()), (
            "docs/bad_input.md is stale: PYTHONPATH=. python tests/test_bad_input.py --write"
        )


if __name__ == "__main__":
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(DOC), exist_ok=True)
        with open(DOC, "w") as f:
            f.write(render(rows(), cli_rows()))
        print(f"wrote {DOC}")
    else:
        print(render(rows(), cli_rows()))
