"""Every file relex reads back is checked field by field: an edited or damaged relex_state / report.json /
state index gives one `relex: error: ...` line naming the field (exit 2), never a traceback, and nothing is written."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from relex_callback.offline.cli import main
from relex_callback.examples.toy import build_model, build_tokenizer


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A base checkpoint, three training checkpoints and a finished `relex extrapolate`."""
    d = tmp_path_factory.mktemp("readback")
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1)
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    g = torch.Generator().manual_seed(0)
    dirs = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in (2, 4, 6):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + s * dirs[n])
        model.save_pretrained(d / "ckpts" / f"checkpoint-{s}")
    assert main(["extrapolate", "--base", str(d / "base"), "--checkpoints", str(d / "ckpts"), "--horizons", "20",
                 "--out", str(d / "out"), "--no-progress", "--dtype", "float32"]) == 0
    return d


def _state(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["relex"])


def _write_state(path, tensors, meta):
    save_file(tensors, str(path), metadata={"format": "pt", "relex": json.dumps(meta)})


def _first(meta):
    return meta["order"][0]


STATE_EDITS = {
    "tcut a string": lambda m: m.update(tcut="six"),
    "steps missing": lambda m: m.pop("steps"),
    "steps not increasing": lambda m: m.update(steps=[6, 4, 2]),
    "rank zero": lambda m: m.update(rank=0),
    "dtype unknown": lambda m: m.update(dtype="int8"),
    "order names a missing tensor": lambda m: m["order"].append("no.such.tensor"),
    "slope too short": lambda m: m["tensors"][_first(m)].update(slope=[]),
    "intercept NaN": lambda m: m["tensors"][_first(m)].update(intercept=[float("nan")]),
    "spec shape negative": lambda m: m["tensors"][_first(m)]["spec"].update(shape=[-1, 4]),
    "spec beyond the tensor": lambda m: m["tensors"][_first(m)]["spec"].update(local_numel=10**9),
    "fingerprint missing": lambda m: m["tensors"][_first(m)].pop("theta0"),
    "tensors not an object": lambda m: m.update(tensors=[1, 2]),
}


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_edited_state_is_one_clear_line(done, tmp_path, capsys, edit):
    tensors, meta = _state(done / "out" / "relex_state.safetensors")
    meta = copy.deepcopy(meta)
    STATE_EDITS[edit](meta)
    bad = tmp_path / "relex_state.safetensors"
    _write_state(bad, tensors, meta)
    rc = main(["materialize", "--state", str(bad), "--base", str(done / "base"), "--horizons", "30",
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("relex: error: ") and err.count("\n") == 1, err
    assert str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "m" / "step-30").exists()


def test_state_direction_of_the_wrong_shape_is_refused(done, tmp_path, capsys):
    tensors, meta = _state(done / "out" / "relex_state.safetensors")
    name = _first(meta)
    tensors[name] = tensors[name][:, :1].contiguous()
    bad = tmp_path / "relex_state.safetensors"
    _write_state(bad, tensors, meta)
    rc = main(
        [
            "materialize",
            "--state",
            str(bad),
            "--base",
            str(done / "base"),
            "--horizons",
            "30",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"the direction of {name}" in err


REPORT_EDITS = {
    "tensors[0].explained_variance a string": lambda r: r["tensors"][0].update(explained_variance="high"),
    "tensors[0].r2 empty": lambda r: r["tensors"][0].update(r2=[]),
    "tensors[0].name missing": lambda r: r["tensors"][0].pop("name"),
    "tensors[0].delta_norm negative": lambda r: r["tensors"][0].update(delta_norm=-1.0),
    "steps of strings": lambda r: r.update(steps=["a", "b"]),
    "tensors[1] not an object": lambda r: r["tensors"].__setitem__(1, 7),
    "coeffs row with a string": lambda r: r["tensors"][0].update(coeffs=[["x"]]),
}


@pytest.mark.parametrize("edit", sorted(REPORT_EDITS))
def test_edited_report_is_one_clear_line(done, tmp_path, capsys, edit):
    rep = json.load(open(done / "out" / "report.json"))
    REPORT_EDITS[edit](rep)
    (tmp_path / "report.json").write_text(json.dumps(rep))
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("relex: error: ") and err.count("\n") == 1, err
    assert "report.json" in err and "Traceback" not in err


def test_the_unedited_files_still_read(done, tmp_path, capsys):
    assert main(["report", str(done / "out")]) == 0
    assert main(["materialize", "--state", str(done / "out" / "relex_state.safetensors"), "--base", str(done / "base"),
                 "--horizons", "30", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "step-30" / "model.safetensors").exists()


def test_relex_outputs_are_never_read_as_training_checkpoints(done, tmp_path, capsys):
    """step-H/ directories relex wrote carry a marker: given among --checkpoints they are refused, and in a parent
    directory they are skipped (the training checkpoints beside them are used)."""
    rc = main(["extrapolate", "--base", str(done / "base"), "--checkpoints", str(done / "ckpts" / "checkpoint-2"),
               str(done / "out" / "step-20"), "--horizons", "40", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "written by relex" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for s in (2, 4):
        os.symlink(done / "ckpts" / f"checkpoint-{s}", mixed / f"checkpoint-{s}")
    os.symlink(done / "out" / "step-20", mixed / "step-20")
    assert main(["extrapolate", "--base", str(done / "base"), "--checkpoints", str(mixed), "--horizons", "40",
                 "--out", str(tmp_path / "y"), "--no-progress"]) == 0
    rep = json.load(open(tmp_path / "y" / "report.json"))
    assert rep["steps"] == [2, 4] and rep["tcut"] == 4
