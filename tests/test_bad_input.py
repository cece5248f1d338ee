"""Bad input: every argument of the callback / settings / fold / Python entry points of the CLI with its invalid
values and the exact message. The same table generates docs/bad_input.md, and a test checks the doc is current:

    PYTHONPATH=. python tests/test_bad_input.py --write   # regenerate docs/bad_input.md
"""

import os
import re
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from relex_callback import RelexCallback  # noqa: E402
from relex_callback.errors import RelexInputError  # noqa: E402

DOC = os.path.join(REPO, "docs", "bad_input.md")
OK = dict(tcut=75, horizons=[500])


def cb(**kw):
    args = dict(OK)
    args.update(kw)
    return lambda d: RelexCallback(**args)


def _model():
    from relex_callback.toy import build_model, build_tokenizer

    return build_model(build_tokenizer(), hidden_size=16, layers=1)


def select(**kw):
    def run(d):
        c = RelexCallback(tcut=4, horizons=[20], **kw)
        c._select(_model())

    return run


def plan(**kw):
    from relex_callback.fold import plan_slots

    return lambda d: plan_slots(100, 1000, 2, **kw)


def _base(d, seed=0):
    from relex_callback.toy import build_model, build_tokenizer

    p = os.path.join(d, f"base{seed}")
    if not os.path.isdir(p):
        tok = build_tokenizer()
        build_model(tok, hidden_size=16, layers=1, seed=seed).save_pretrained(p)
        tok.save_pretrained(p)
    return p


def _state(d):
    """A real state file from a 4-step window on base0."""
    from transformers import AutoModelForCausalLM

    from relex_callback.buffer import TrajectoryStore
    from relex_callback.engine import finalize
    from relex_callback.params import plain_tracked, trainable_named_parameters
    from relex_callback.writer import DirectorySource

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
    finalize(st, tcut=4, horizons=[20], out_dir=out, source=DirectorySource(base))
    return out


def materialize(base="base0", horizons=(40,), state=None):
    from relex_callback.engine import materialize as m

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
    import shutil

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


def extrapolate(traj):
    from relex_callback.engine import extrapolate_trajectory

    return lambda d: extrapolate_trajectory(traj(d), _base(d), [40], os.path.join(d, "x"))


# (where, argument, invalid value, call)
CASES = [
    ("RelexCallback / RelexSettings", "tcut", "None", cb(tcut=None)),
    ("RelexCallback / RelexSettings", "tcut", "1", cb(tcut=1)),
    ("RelexCallback / RelexSettings", "tcut", "'many'", cb(tcut="many")),
    ("RelexCallback / RelexSettings", "tcut", "7.5", cb(tcut=7.5)),
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
    ("RelexCallback", "buffer_slots", "0", cb(buffer_slots=0)),
    ("RelexCallback", "buffer_slots", "'8'", cb(buffer_slots="8")),
    ("RelexCallback", "on_nonfinite", "'ignore'", cb(on_nonfinite="ignore")),
    ("RelexCallback (on_train_begin)", "include", "['nomatch']", select(include=["nomatch"])),
    ("RelexCallback (on_train_begin)", "exclude", "['nomatch']", select(exclude=["nomatch"])),
    ("RelexCallback (on_train_begin)", "exclude", "['.*'] (everything)", select(exclude=[".*"])),
    ("RelexCallback (on_train_begin)", "max_buffer_bytes", "5 rows (window 100 > rows, fold_rank=8)",
     plan(max_buffer_bytes=5 * 2000, buffer_slots=None, fold_rank=8)),
    ("RelexCallback (on_train_begin)", "buffer_slots + max_buffer_bytes", "buffer_slots=10, fold_rank=8, 12 rows",
     plan(max_buffer_bytes=12 * 2000, buffer_slots=10, fold_rank=8)),
    ("engine.materialize (relex materialize)", "base", "another model (seed 1)", materialize(base="base1")),
    ("engine.materialize (relex materialize)", "base", "directory without weights", materialize(base=_no_weights)),
    ("engine.materialize (relex materialize)", "base", "truncated model.safetensors", materialize(base=_corrupt_base)),
    ("engine.materialize (relex materialize)", "state", "corrupt safetensors", materialize(state=_corrupt_state)),
    ("engine.materialize (relex materialize)", "state", "missing file",
     materialize(state=lambda d: os.path.join(d, "nope.safetensors"))),
    ("engine.materialize (relex materialize)", "state", "a model checkpoint, not a state file",
     materialize(state=lambda d: os.path.join(_base(d), "model.safetensors"))),
    ("engine.materialize (relex materialize)", "horizons", "[3] (state tcut=4)", materialize(horizons=(3,))),
    ("engine.extrapolate_trajectory", "trajectory", "a directory that is not a saved trajectory",
     extrapolate(lambda d: _base(d))),
]


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


def render(rows) -> str:
    def cell(s):
        return s.replace("|", "\\|").replace("\n", " ")

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
    return "\n".join(out) + "\n"


_ROWS = None


def rows():
    global _ROWS
    if _ROWS is None:
        _ROWS = collect()
    return _ROWS


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_each_bad_input_raises_a_clear_input_error(i):
    where, arg, value, err, msg = rows()[i]
    assert err != "(no error)", f"{where} {arg}={value} was accepted"
    assert len(msg) > 15 and "Traceback" not in msg
    # the message names the argument (or the file) it is about
    key = re.split(r"[ +]", arg)[0]
    assert key in msg or "<dir>" in msg or arg in ("state", "base", "trajectory"), msg


def test_doc_is_generated_from_the_real_messages():
    assert os.path.isfile(DOC), "run: PYTHONPATH=. python tests/test_bad_input.py --write"
    with open(DOC) as f:
        assert f.read() == render(rows()), "docs/bad_input.md is stale: PYTHONPATH=. python tests/test_bad_input.py --write"


if __name__ == "__main__":
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(DOC), exist_ok=True)
        with open(DOC, "w") as f:
            f.write(render(rows()))
        print(f"wrote {DOC}")
    else:
        print(render(rows()))
