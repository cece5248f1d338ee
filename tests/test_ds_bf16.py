"""DeepSpeed with bf16 mixed precision: the callback records the optimizer's fp32 master weights, not the bf16
parameters.

Under bf16 mixed precision DeepSpeed updates fp32 master weights and re-derives the bf16 parameters from them by
rounding after each step. At a small learning rate most bf16 elements do not move from one step to the next: their
trajectory is rounding noise, and a window recorded from them extrapolates something else than the run's movement.

The slow tests launch a tiny GRPO run with ZeRO-2 and ZeRO-3 (2 processes over gloo on CPU, ``mixed_precision: bf16``,
lr 1e-6, tcut 6, float32 trajectory buffer); the script also records the full fp32 master weights at every step
(``safe_get_full_fp32_param`` on every process) and the full bf16 parameters. The tests check that this is the
regime where the two differ (most bf16 elements unchanged per step, the masters moving), then that what the run
wrote is what the single-process engine makes of the masters' trajectory in float32: the extrapolated deltas of its
state file, and its bf16 checkpoints (the float32 replay's horizons cast to bf16). The replay of the bf16 parameters
is far from it (so the comparison would catch a run that recorded them). ``report.json`` says what was recorded.
ZeRO stage 0 with bf16 (no fp32 masters the callback reads) is refused on every process before step 1.

The fast tests check the pieces on one process with stand-ins for DeepSpeed's parameter attributes: what a
ZeRO-1/2 parameter's reader returns, the refusal of a DeepSpeed run whose fp32 masters cannot be found, theta_0
kept in float32 and the horizons written in the parameters' dtype.
"""

import json
import os
import types

import pytest
import torch

from relex_callback.errors import RelexInputError
from relex_callback.config import RelexSettings
from relex_callback.examples.toy import build_model, build_tokenizer
from relex_callback.files.checkpoints import ModelSource
from relex_callback.files.state import load_state
from relex_callback.files.writers import FullModelWriter
from relex_callback.params import trainable_named_parameters
from relex_callback.pipeline.finalize import finalize
from relex_callback.trainer.topology import Topology
from relex_callback.trajectory.store import TrajectoryStore

from test_distributed import launch, replay
from transformers import AutoModelForCausalLM

TCUT, HORIZONS, LR = 6, (200, 1000), "1e-6"
RECORDED = {"zero2_bf16": "fp32 master weights (DeepSpeed ZeRO-2 optimizer partitions)",
            "zero3_bf16": "fp32 master weights (DeepSpeed ZeRO-3 optimizer partitions)"}
MODE = {"zero2_bf16": "zero12", "zero3_bf16": "zero3"}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    cache = {}

    def get(mode):
        if mode not in cache:
            d = str(tmp_path_factory.mktemp(mode))
            launch(mode, d, "--bf16", "--record-masters", "--lr", LR, "--horizons", ",".join(map(str, HORIZONS)))
            ref = os.path.join(d, "replay-masters")
            replay(d, ref, horizons=HORIZONS, record="masters")
            bf16_ref = os.path.join(d, "replay-bf16")
            replay(d, bf16_ref, horizons=HORIZONS, record="snaps")
            cache[mode] = (d, ref, bf16_ref, torch.load(os.path.join(d, "trajectory.pt")))
        return cache[mode]

    return get


def extrapolated_delta(state, name, h):
    """The state's extrapolated move of tensor ``name`` at horizon ``h`` (rank 1), float64: ``c(h) v``."""
    i = [s.name for s in state.specs].index(name)
    return float(state.coef_at(h)[i, 0]) * state.tensors[name][0].double()


def relative_error(got, want, names, h):
    num = sum(float((extrapolated_delta(got, n, h) - extrapolated_delta(want, n, h)).square().sum()) for n in names)
    den = sum(float(extrapolated_delta(want, n, h).square().sum()) for n in names)
    return (num / den) ** 0.5


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero2_bf16", "zero3_bf16"])
def test_bf16_deepspeed_records_the_fp32_master_weights(bf16_runs, mode):
    run_dir, ref, bf16_ref, rec = bf16_runs(mode)
    names, snaps, masters = rec["names"], rec["snaps"], rec["masters"]
    total = sum(snaps[0][n].numel() for n in names)
    assert snaps[0][names[0]].dtype == torch.bfloat16 and masters[0][names[0]].dtype == torch.float32
    # the regime: most bf16 elements stay put from one step to the next while the masters move
    unchanged = [sum(int((snaps[t][n] == snaps[t - 1][n]).sum()) for n in names) / total for t in range(1, TCUT + 1)]
    moved = sum(int((masters[TCUT][n] != masters[0][n]).sum()) for n in names) / total
    print(f"{mode}: bf16 elements unchanged per step {min(unchanged):.3f}..{max(unchanged):.3f}; fp32 masters moved "
          f"over the window {moved:.4f}")
    assert min(unchanged) > 0.9 and moved > 0.99
    # the masters start at the bf16 weights (DeepSpeed builds them from those): the base a checkpoint holds
    assert all(torch.equal(masters[0][n], snaps[0][n].float()) for n in names)

    run = os.path.join(run_dir, "relex")
    got, want, old = load_state(run), load_state(ref), load_state(bf16_ref)
    for h in HORIZONS:
        # the extrapolated move is the float32 replay's of the masters (float32 buffer, two solves: ~1e-7 measured)
        err = relative_error(got, want, names, h)
        # recording the bf16 parameters would have given another move altogether (~0.98 measured)
        err_bf16 = relative_error(old, want, names, h)
        print(f"{mode} step-{h}: extrapolated delta vs the masters' replay: {err:.2e} (bf16 parameters' replay: "
              f"{err_bf16:.2f})")
        assert err < 1e-5 and err_bf16 > 0.5
        # the checkpoint is written in the model's dtype: the replay's float32 horizon cast to bf16 (a rounding
        # boundary between two float32 values 1e-7 apart may change the last bit)
        sd = AutoModelForCausalLM.from_pretrained(os.path.join(run, f"step-{h}"), torch_dtype="auto").state_dict()
        ref_sd = AutoModelForCausalLM.from_pretrained(os.path.join(ref, f"step-{h}")).state_dict()
        same = n_moved = 0
        for n in names:
            a, b = sd[n], ref_sd[n].to(torch.bfloat16)
            assert a.dtype == torch.bfloat16
            ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
            assert bool(((a.float() - b.float()).abs() <= ulp).all()), n
            same += int((a == b).sum())
            n_moved += int((a != snaps[0][n]).sum())
        assert same >= 0.999 * total and n_moved > 0.5 * total  # not vacuous: most written elements moved

    # what was recorded, said in report.json and by each process; each process recorded its own fp32 partition
    infos = [json.load(open(os.path.join(run_dir, f"rank-{r}.json"))) for r in range(2)]
    assert [i["mode"] for i in infos] == [MODE[mode]] * 2
    assert [i["recorded"] for i in infos] == [RECORDED[mode]] * 2
    assert sum(i["tracked_elements_this_rank"] for i in infos) == total
    report = json.load(open(os.path.join(run, "report.json")))
    assert report["recorded"] == RECORDED[mode] and report["steps"] == list(range(1, TCUT + 1))


# ------------------------------------------------------------------------------- one process, stand-ins
def _bf16_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)


def _link_masters(model):
    """What DeepSpeed's ZeRO-1/2 optimizer leaves on each 16-bit parameter in a world of one: ``_hp_mapping`` with
    the fp32 master fragment (here the whole parameter), made from the bf16 values."""
    masters = {}
    for n, p in model.named_parameters():
        hp = p.detach().float().reshape(-1).clone()
        masters[n] = hp
        p._hp_mapping = types.SimpleNamespace(hp_fragment=hp, lp_fragment_address=types.SimpleNamespace(
            start=0, numel=p.numel()))
    return masters


def test_zero12_masters_are_read_in_one_process():
    model = _bf16_model()
    masters = _link_masters(model)
    named = list(model.named_parameters())
    topo = Topology("single")
    tracked = topo.track(named)
    assert topo.recorded == "fp32 master weights (DeepSpeed ZeRO-1/2 optimizer partitions)"
    for t in tracked:
        assert t.spec.dtype == torch.bfloat16 and t.spec.recorded_dtype == torch.float32
        masters[t.spec.name].add_(1e-5)  # an optimizer step of the master (the bf16 parameter does not see it)
        assert t.read().dtype == torch.float32 and t.read().data_ptr() == masters[t.spec.name].data_ptr()
        assert t.live_view().dtype == torch.bfloat16 and t.live_view().data_ptr() == t.param.data_ptr()
    # without DeepSpeed, bf16 parameters are what the optimizer updates: recorded as they are
    plain = Topology("single")
    tracked = plain.track(list(_bf16_model().named_parameters()))
    assert plain.recorded == "parameters (bfloat16)" and tracked[0].spec.recorded_dtype is None


def test_deepspeed_without_fp32_masters_is_refused_before_step_1():
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace())  # e.g. an optimizer that keeps no masters
    with pytest.raises(RelexInputError, match=r"0.weight: DeepSpeed trains this parameter in bfloat16 but "
                                              r"RelexCallback finds no fp32 master weights.*ZeRO stage 1, 2 or 3"):
        Topology("single").track(list(_bf16_model().named_parameters()), engine=engine)
    model = _bf16_model()
    for p in model.parameters():  # bf16 master weights (bf16_master_weights_and_grads): no fp32 ones either
        p._hp_mapping = types.SimpleNamespace(hp_fragment=p.detach().reshape(-1).clone(),
                                              lp_fragment_address=types.SimpleNamespace(start=0, numel=p.numel()))
    with pytest.raises(RelexInputError, match="no fp32 master weights"):
        Topology("single").track(list(model.named_parameters()), engine=engine)
    # fp32 parameters under DeepSpeed are their own masters: recorded as they are
    fp32 = Topology("single")
    fp32.track(list(torch.nn.Linear(2, 2).named_parameters()), engine=engine)
    assert fp32.recorded == "parameters (float32)"


def test_masters_keep_theta0_in_float32_and_horizons_in_the_parameters_dtype(tmp_path):
    """theta_0 of fp32 masters is kept in float32 (the memory plan counts 4 bytes); the horizon is theta_0 + c v in
    float32, cast to bf16 when written."""
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1, heads=2, kv_heads=1, seed=0).to(torch.bfloat16)
    masters = _link_masters(model)
    named = trainable_named_parameters(model)
    tracked = Topology("single").track(named)
    store = TrajectoryStore([t.spec for t in tracked], TCUT, dtype="float32", storage="host")
    store.set_theta0([t.read() for t in tracked])
    assert store.theta0.dtype == torch.float32 and store.theta0_bytes == 4 * store.D
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(m.shape, generator=g) for n, m in masters.items()}
    start = {n: m.clone() for n, m in masters.items()}
    for t in range(1, TCUT + 1):  # steps of 1e-6 x direction: mostly below a bf16 step of these weights
        for n, m in masters.items():
            m.copy_(start[n] + 1e-6 * t * direction[n])
        store.snapshot(t, [x.read() for x in tracked])
    assert store.num_rows == TCUT
    finalize(store, FullModelWriter(ModelSource(model, tok)), RelexSettings(tcut=TCUT, horizons=(1000,)),
             out_dir=str(tmp_path))

    sd = AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "step-1000"), torch_dtype="auto").state_dict()
    moved = total = 0
    for n, _ in named:
        want = (start[n].double() + 1e-6 * 1000 * direction[n].double()).float()  # theta_0 + c(H) v
        got = sd[n].reshape(-1)
        assert got.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool(((got.float() - want).abs() <= ulp).all()), n  # one rounding to bf16 (at most a last bit off)
        moved += int((got != start[n].to(torch.bfloat16)).sum())
        total += got.numel()
    assert moved > 0.5 * total  # recorded from the bf16 parameters, nothing would have moved


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_deepspeed_without_fp32_masters_is_refused_on_every_process(tmp_path):
    """ZeRO stage 0 with bf16: DeepSpeed's FP16 optimizer wrapper keeps its fp32 masters where the callback does not
    read them; the run is refused at on_train_begin on every process (before step 1), saying what to change."""
    out = str(tmp_path)
    p = launch("zero0_bf16", out, "--bf16", "--lr", LR, "--catch", expect_fail=True)
    for r in range(2):
        path = os.path.join(out, f"rank-{r}.json")  # written by the script where it caught the refusal
        assert os.path.isfile(path), f"rank {r} failed before the refusal:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        info = json.load(open(path))
        assert info["error"] == "RelexInputError" and info["global_step"] == 0, info
        assert "finds no fp32 master weights" in info["message"] and "ZeRO stage 1, 2 or 3" in info["message"]
    relex = os.path.join(out, "relex")
    assert not (os.path.isdir(relex) and [n for n in os.listdir(relex) if n.startswith("step-")])
