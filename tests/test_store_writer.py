"""Trajectory store (idempotent snapshots, truncate, tiers, memory estimate/errors), checkpoint writer (shards, index,
tied weights, atomicity) and the state file."""

import json
import os

import pytest

from relex_callback.files.checkpoints import write_relex_marker
import torch

from relex_callback.trajectory.store import TrajectoryStore
from relex_callback.errors import RelexInputError, RelexMemoryError
from relex_callback.params import TensorSpec, plain_tracked
from relex_callback.core.solver import SolveOptions, solve
from relex_callback.files.state import fingerprint, fingerprint_mismatch, load_state, save_state
from relex_callback.files.checkpoints import ModelSource, plan_shards
from relex_callback.files.fs import atomic_directory
from relex_callback.files import state as st
from relex_callback.files.writers import write_full_checkpoint as write_horizon

from helpers import U32, extrapolation_tolerance
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def _specs(shapes, dtype=torch.float32):
    return [
        TensorSpec(name=f"w{i}", shape=s, dtype=dtype, local_numel=int(torch.Size(s).numel()))
        for i, s in enumerate(shapes)
    ]


def _fill(store, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = [torch.randn(s.shape, generator=g) for s in store.specs]
    store.set_theta0(theta0)
    dirs = [torch.randn(s.shape, generator=g) for s in store.specs]
    for t in steps:
        store.snapshot(t, [th + 1e-2 * t * d for th, d in zip(theta0, dirs)])
    return theta0, dirs


def _delta_rounding(theta0, x):
    """Entrywise bound on ``|fl32(fl32(theta0 + x) - theta0) - x|`` (a snapshot ``theta0 + x`` formed in float32, its
    delta taken in float32): ``u |theta0 + x| (1 + u) + u |x|`` (one rounding for each operation)."""
    theta0, x = theta0.double(), x.double()
    return U32 * ((theta0 + x).abs() * (1 + U32) + x.abs())


def test_snapshot_is_delta_and_idempotent():
    store = TrajectoryStore(_specs([(3, 4), (5,)]), capacity=4, dtype="float32", storage="host")
    theta0, dirs = _fill(store, [1, 3])
    store.snapshot(3, [th + 2e-2 * d for th, d in zip(theta0, dirs)])  # the same step again: still one row
    assert store.steps == [1, 3]
    rows = store.rows()
    assert rows.shape == (2, 17)
    x = (2e-2 * dirs[0]).reshape(-1)  # the same float32 product as in the snapshot
    bound = _delta_rounding(theta0[0].reshape(-1), x)
    err = (rows[1, :12].double() - x.double()).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(bound.max()) < 1e-3 * float(x.abs().min())  # a 1e-3 relative error of any entry would fail
    # theta_0 is kept exactly
    assert torch.equal(store.theta0_of(store.specs[1]), theta0[1].reshape(-1))
    with pytest.raises(RelexInputError, match="steps must increase"):
        store.snapshot(2, theta0)


def test_truncate_then_replay():
    store = TrajectoryStore(_specs([(6,)]), capacity=3, dtype="bfloat16", storage="host")
    theta0, dirs = _fill(store, [1, 2, 3])
    with pytest.raises(RelexMemoryError, match="full"):
        store.snapshot(4, theta0)
    store.truncate(1)
    assert store.steps == [1]
    store.snapshot(2, [th + 5 * d for th, d in zip(theta0, dirs)])
    assert store.steps == [1, 2]
    # a bfloat16 store: the float32 delta rounded to nearest bfloat16, |y - bf16(y)| <= 2^-8 |y| (u of bfloat16)
    x = (5 * dirs[0]).reshape(-1)
    e32 = _delta_rounding(theta0[0].reshape(-1), x)
    bound = 2.0**-8 * (x.double().abs() + e32) + e32
    err = (store.rows()[1].double() - x.double()).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


def test_disk_tier_memmap_and_save_load_round_trip(tmp_path):
    specs = _specs([(4, 4), (7,)])
    store = TrajectoryStore(specs, capacity=5, dtype="bfloat16", storage="disk", directory=str(tmp_path / "run"))
    assert store.storage == "disk"
    _fill(store, [2, 4, 6])
    assert os.path.getsize(next(p for p in (tmp_path / "run").iterdir() if p.stat().st_size == 5 * 23 * 2)) == 230
    rows = store.rows().clone()
    # a second store on the same directory (a resumed run) sees the same rows without copying
    again = TrajectoryStore.load(str(tmp_path / "run"), _specs([(4, 4), (7,)]), 5, dtype="bfloat16", storage="disk")
    assert again.steps == [2, 4, 6] and torch.equal(again.rows(), rows)
    # save to another directory, load into a host store
    store.save(str(tmp_path / "ckpt"))
    host = TrajectoryStore.load(str(tmp_path / "ckpt"), _specs([(4, 4), (7,)]), 5, dtype="bfloat16", storage="host")
    assert host.storage == "host" and host.steps == [2, 4, 6]
    assert torch.equal(host.rows(), rows) and torch.equal(host.theta0, store.theta0)
    with pytest.raises(RelexInputError, match="other tensors"):
        TrajectoryStore.load(str(tmp_path / "ckpt"), _specs([(4, 4)]), 5, dtype="bfloat16", storage="host")
    with pytest.raises(RelexInputError, match="dtype"):
        TrajectoryStore.load(str(tmp_path / "ckpt"), _specs([(4, 4), (7,)]), 5, dtype="float32", storage="host")


def test_memory_estimate_and_clear_error():
    specs = _specs([(1000, 100), (50,)])
    est = TrajectoryStore.estimate(specs, 75, dtype="bfloat16")
    assert est["buffer"] == 75 * 100050 * 2 and est["theta0"] == 100050 * 4 and est["elements"] == 100050
    with pytest.raises(RelexMemoryError) as e:
        TrajectoryStore(specs, capacity=75, dtype="bfloat16", storage="host", max_bytes=1_000_000)
    msg = str(e.value)
    for word in ("needs", "max_buffer_bytes", "stride", "disk", "host"):
        assert word in msg, msg
    assert "15.0" in msg or "15,007,500" in msg or "14.3" in msg, msg  # the bytes needed are named
    with pytest.raises(RelexInputError, match="directory"):
        TrajectoryStore(specs, capacity=2, storage="disk")
    with pytest.raises(RelexInputError, match="storage"):
        TrajectoryStore(specs, capacity=2, storage="gpu-ish")


def test_plan_shards():
    entries = [("a", 40), ("b", 70), ("c", 20), ("d", 200), ("e", 10)]
    assert plan_shards(entries, 100) == [["a"], ["b", "c"], ["d"], ["e"]]
    assert plan_shards(entries, "1KB") == [["a", "b", "c", "d", "e"]]
    with pytest.raises(RelexInputError, match="max_shard_size"):
        plan_shards(entries, "lots")


def _solved(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tracked = plain_tracked(named)
    specs = [t.spec for t in tracked]
    store = TrajectoryStore(specs, capacity=3, dtype="float32", storage="host")
    store.set_theta0([t.read() for t in tracked])
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(s.shape, generator=g) * 1e-3 for s in specs]
    for t in (1, 2, 3):
        store.snapshot(t, [t_.read().reshape(s.shape) + t * d for t_, s, d in zip(tracked, specs, dirs)])
    sol = solve(store.rows(), store.steps, store.specs, SolveOptions(method="gram"))
    return store, sol, dirs


def test_sharded_write_loads_with_from_pretrained_and_ties(tmp_path, tiny_model, tokenizer):
    tiny_model.config.tie_word_embeddings = True
    tiny_model.tie_weights()
    store, sol, dirs = _solved(tiny_model)
    src = ModelSource(tiny_model, tokenizer)
    out = write_horizon(
        str(tmp_path), 30, 10, sol, lambda i: store.theta0_of(store.specs[i]), src, max_shard_size="20KB"
    )
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(idx["weight_map"]) == set(src.keys)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    sd = dict(loaded.named_parameters())
    worst = 0.0
    for i, spec in enumerate(store.specs):
        # the true trajectory t d is an exact line: its extrapolation to 30 is 30 d; the solve read the recorded
        # float32 deltas (moved_to) with a float32 Gram, and the file holds theta_0 + delta rounded to float32
        d = dirs[i].reshape(-1).double()
        true = torch.stack([t * d for t in (1, 2, 3)])
        th0 = store.theta0_of(spec).double()
        tol = extrapolation_tolerance(true, store.steps, 30, theta0_norm=float(th0.norm()),
                                      moved_to=store.rows()[:, spec.offset : spec.offset + spec.local_numel])
        err = float((sd[spec.name].detach().reshape(-1).double() - th0 - 30 * d).norm() / (30 * d).norm())
        assert err <= tol, (spec.name, err, tol)
        assert tol < 1e-3, (spec.name, tol)
        worst = max(worst, err / tol)
    print(f"writer: max error / bound {worst:.2e}")
    emb = loaded.get_input_embeddings().weight
    head = loaded.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # tied weights stay tied
    with pytest.raises(RelexInputError, match="already exists"):
        write_horizon(str(tmp_path), 30, 10, sol, lambda i: store.theta0_of(store.specs[i]), src)
    write_horizon(str(tmp_path), 30, 10, sol, lambda i: store.theta0_of(store.specs[i]), src, overwrite=True)


def test_atomic_directory_leaves_nothing_on_exception(tmp_path):
    final = tmp_path / "step-9"
    with pytest.raises(ZeroDivisionError):
        with atomic_directory(str(final)) as tmp:
            open(os.path.join(tmp, "half.safetensors"), "w").write("x")
            1 / 0
    assert os.listdir(tmp_path) == []
    with atomic_directory(str(final)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    assert os.listdir(final) == ["a"]
    with pytest.raises(RelexInputError, match="already exists"):
        with atomic_directory(str(final)):
            pass
    with pytest.raises(RelexInputError, match="relex did not write it"):  # overwrite replaces only relex's output
        with atomic_directory(str(final), overwrite=True) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(final) == ["a"] and sorted(os.listdir(tmp_path)) == ["step-9"]
    write_relex_marker(str(final), 9, 3)
    with atomic_directory(str(final), overwrite=True) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(final) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["step-9"]


def test_state_round_trip_and_fingerprint_mismatch(tmp_path, tiny_model):
    store, sol, _ = _solved(tiny_model)
    path = str(tmp_path / "relex_state.safetensors")
    save_state(path, sol, lambda i: store.theta0_of(store.specs[i]), tcut=3)
    st = load_state(path)
    assert st.steps == [1, 2, 3] and st.tcut == 3 and [s.name for s in st.specs] == [s.name for s in store.specs]
    assert torch.equal(st.slope, sol.slope) and torch.equal(st.intercept, sol.intercept)
    for i, spec in enumerate(store.specs):
        th = store.theta0_of(spec)
        assert torch.equal(st.extrapolate(i, 77, th), sol.extrapolate(i, 77, th))
        fp = st.info[spec.name]["theta0"]
        assert fingerprint_mismatch(fingerprint(th), fp) is None
        changed = th.clone()
        changed.view(-1)[0] += 1.0
        assert fingerprint_mismatch(fingerprint(changed), fp) is not None
    assert fingerprint_mismatch(fingerprint(torch.zeros(3)), fingerprint(torch.zeros(4))) is not None
    with pytest.raises(RelexInputError, match="does not exist"):
        load_state(str(tmp_path / "nope.safetensors"))

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RelexInputError, match="not a RELEX state"):
        load_state(str(tmp_path / "other.safetensors"))


def test_fingerprint_chunks_are_large_off_the_cpu_and_do_not_change_the_fingerprint(monkeypatch):
    """On a GPU the fingerprint's cost is its launches: chunks of 2^24 elements there (a 233M-element embedding in
    14 chunks instead of ~900), cache-sized ones on the CPU; the chunk size must not move the fingerprint beyond
    what fingerprint_mismatch tolerates (a state written on a GPU is checked against a base read on the CPU)."""
    assert st.fingerprint_chunk("cpu") == st.FINGERPRINT_CHUNK <= 1 << 18
    for dev in ("cuda", "cuda:1", "meta"):
        assert st.fingerprint_chunk(dev) >= 1 << 24
    x = torch.randn(3 * (1 << 18) + 12345, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    small = st.fingerprint(x)
    monkeypatch.setattr(st, "FINGERPRINT_CHUNK", 1 << 24)  # the device's chunk, on this CPU tensor
    big = st.fingerprint(x)
    assert big["samples"] == small["samples"] and big["n"] == small["n"]
    assert st.fingerprint_mismatch(big, small) is None and st.fingerprint_mismatch(small, big) is None
    y = (x.float() * 1.01).to(torch.bfloat16)  # another tensor of the same size: still told apart
    assert st.fingerprint_mismatch(st.fingerprint(y), small) is not None
