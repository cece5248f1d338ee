"""Device memory at steady state, proven on CPU with a device's figures as inputs.

A plain Trainer (DDP, FSDP2 too) with torch AdamW has neither gradients nor optimizer states at ``on_train_begin``:
AdamW creates its two moments lazily at the first step. A ring sized from the free memory measured then is too large
by all of that. The plan claims it (``pending_training_bytes``) beside what it measured, and the solve's own device
scratch at ``tcut``; both parts are printed. Also: pinned host memory registers exactly the buffer's bytes and gives
them back at release (the caching host allocator would round a block up to the next power of two).
"""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from relex_callback.config import RelexSettings
from relex_callback.params import plain_tracked, trainable_named_parameters
from relex_callback.trainer.topology import Topology
from relex_callback.trajectory import tiers
from relex_callback.trajectory.plan import (
    DEFAULT_GPU_HEADROOM,
    NodeFigures,
    pending_training_bytes,
    plan_for_run,
    solve_scratch_bytes,
    torch_optimizer_bytes,
)
from relex_callback.offline.cli import main

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GB = 10**9
H100 = 85_520_809_984  # bytes torch.cuda.mem_get_info reports as total on an H100 80GB
CONTEXT = 530 * 2**20  # a CUDA context and the allocator's first blocks


@pytest.fixture(scope="module")
def qwen_1p5b():
    """Qwen2.5-Math-1.5B's architecture in float32 on the meta device (no memory), with torch AdamW over it."""
    cfg = json.load(open(os.path.join(FIX, "qwen2.5-math-1.5b", "config.json")))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.float()
    return model


def _plan(model, tmp_path, optimizer, storage="auto", dtype="bfloat16", host=64 * GB, disk=10 * GB):
    s = RelexSettings.validate(tcut=75, horizons=[500], storage=storage, dtype=dtype, output_dir=str(tmp_path))
    specs = [t.spec for t in plain_tracked(trainable_named_parameters(model))]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free = H100 - weights - CONTEXT  # what mem_get_info says at on_train_begin: the model and a context
    given = NodeFigures(local_world_size=1, device_memory=(free, H100), host_memory=host, disk_free=disk)
    return plan_for_run(s, specs, Topology("single"), None, device="cpu", optimizer=optimizer, given=given), weights


def test_plain_adamw_counts_16_bytes_per_float32_parameter(qwen_1p5b):
    opt = torch.optim.AdamW(qwen_1p5b.parameters(), lr=1e-6)
    n = sum(p.numel() for p in qwen_1p5b.parameters())
    assert 1.4e9 < n < 1.6e9
    pending, how = pending_training_bytes(opt)
    assert pending == 16 * n, (pending / n, how)  # gradient 4 + two moments 8 + the foreach update's temporary 4
    fused = torch.optim.AdamW(qwen_1p5b.parameters(), lr=1e-6, fused=True)
    assert pending_training_bytes(fused)[0] == 12 * n  # no foreach temporary
    sgd = torch.optim.SGD(qwen_1p5b.parameters(), lr=1e-3)
    assert pending_training_bytes(sgd)[0] == 4 * n  # gradients only
    # states that exist already (a resumed optimizer) are measured, not counted again
    p0 = next(qwen_1p5b.parameters())
    opt.state[p0]["exp_avg"] = torch.empty_like(p0)
    assert pending_training_bytes(opt)[0] == 16 * (n - p0.numel())


def test_the_ring_fits_the_device_after_the_first_step(qwen_1p5b, tmp_path):
    """Qwen2.5-1.5B in float32, AdamW, an 80 GB H100, tcut 75: every claim at steady state (the model measured, the
    gradients and moments of the first step, theta_0 and the snapshot scratch, the solve's scratch at tcut, the
    buffer) within the device less its activation headroom; without the optimizer's share the plan (as before) gave a
    ring that the first step overflows."""
    opt = torch.optim.AdamW(qwen_1p5b.parameters(), lr=1e-6)
    plan, weights = _plan(qwen_1p5b, tmp_path, opt)
    pending, _ = pending_training_bytes(opt)
    buffer = plan.buffer_bytes if plan.tier == "device" else 0
    solve = solve_scratch_bytes(plan.elements, max(s.numel for s in [t.spec for t in plain_tracked(
        trainable_named_parameters(qwen_1p5b))]), plan.window, 2, 4)
    steady = weights + CONTEXT + pending + plan.device_fixed_bytes + solve + buffer
    assert steady <= H100 * (1 - DEFAULT_GPU_HEADROOM) + 1, (steady / GB, plan.format())
    text = plan.format()
    assert "trainer at train begin" in text and "added by its first step" in text and "solve at tcut" in text
    # the plan without the optimizer's share: a larger device ring, which the first step's 16 B/param overflows
    blind, _ = _plan(qwen_1p5b, tmp_path, None)
    print(f"device budget {plan.tiers['device'].budget / GB:.1f} GB -> {plan.tier} ring of {plan.rows} rows "
          f"({plan.buffer_bytes / GB:.1f} GB); without the optimizer's share: {blind.tiers['device'].budget / GB:.1f} "
          f"GB -> {blind.tier} ring of {blind.rows} rows ({blind.buffer_bytes / GB:.1f} GB)")
    assert blind.tier == "device" and blind.buffer_bytes > buffer
    assert weights + CONTEXT + pending + blind.device_fixed_bytes + blind.buffer_bytes > H100 * (
        1 - DEFAULT_GPU_HEADROOM
    )


def test_a_window_the_device_cannot_hold_at_steady_state_goes_to_the_host(qwen_1p5b, tmp_path):
    """tcut 75 of 1.54B float32 elements (231 GB exact in bfloat16... per process) cannot stay on the device: the
    plan folds or moves to the host, and never gives the device more than what is left after the first step."""
    opt = torch.optim.AdamW(qwen_1p5b.parameters(), lr=1e-6)
    plan, weights = _plan(qwen_1p5b, tmp_path, opt, dtype="float32")
    pending, _ = pending_training_bytes(opt)
    device_budget = plan.tiers["device"].budget
    assert device_budget <= H100 * (1 - DEFAULT_GPU_HEADROOM) - weights - CONTEXT - pending
    if plan.tier == "device":
        assert plan.buffer_bytes <= device_budget


# ------------------------------------------------------------------------------------------ pinned host memory
@pytest.fixture
def registrar(monkeypatch):
    calls = {"register": [], "unregister": [], "fail": False}

    def register(ptr, n):
        calls["register"].append((ptr, n))
        return 2 if calls["fail"] else 0  # cudaErrorMemoryAllocation

    monkeypatch.setattr(tiers, "HOST_REGISTER", register)
    monkeypatch.setattr(tiers, "HOST_UNREGISTER", lambda ptr: calls["unregister"].append(ptr) or 0)
    return calls


@pytest.mark.parametrize("shape", [(3, 1_000_003), (75, 4096 + 7), (1, 1)])
def test_pinned_host_registers_exactly_the_buffer_and_gives_it_back(registrar, shape):
    p = tiers.PinnedHost(shape, torch.bfloat16)
    want = shape[0] * shape[1] * 2
    assert registrar["register"] == [(p.tensor.data_ptr(), want)]  # not rounded up to a power of two
    assert p.pinned and p.nbytes == want
    ptr = p.ptr
    p.release()
    assert registrar["unregister"] == [ptr] and p.tensor is None
    p.release()  # twice is harmless
    assert registrar["unregister"] == [ptr]


def test_pinning_refused_leaves_pageable_memory_with_one_warning(registrar, caplog):
    registrar["fail"] = True
    with caplog.at_level("WARNING", logger="relex_callback"):
        p = tiers.PinnedHost((4, 1000), torch.float32)
    assert not p.pinned and p.tensor.shape == (4, 1000)
    assert any("could not pin" in r.getMessage() and "ulimit -l" in r.getMessage() for r in caplog.records)
    p.release()
    assert registrar["unregister"] == []


@pytest.mark.parametrize("name,make", [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-6)),
    ("adamw-fused", lambda ps: torch.optim.AdamW(ps, lr=1e-6, fused=True)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3)),
])
def test_relex_plan_counts_a_torch_optimizer_as_the_callback_does(qwen_1p5b, tmp_path, capsys, name, make):
    """`relex plan --optimizer adamw` (no model weights, only the config) claims what the callback claims for the live
    model with that optimizer before its first step: the weights at train begin and what the first step adds (the
    same pending_training_bytes over a real torch optimizer), in the config's dtype."""
    shapes = [tuple(p.shape) for _, p in trainable_named_parameters(qwen_1p5b)]
    weights, pending = torch_optimizer_bytes(shapes, "float32", name)
    assert weights == sum(p.numel() * p.element_size() for p in qwen_1p5b.parameters())
    assert pending == pending_training_bytes(make(list(qwen_1p5b.parameters())))[0]
    assert main(["plan", "--model", os.path.join(FIX, "qwen2.5-math-1.5b"), "--tcut", "75", "--gpu-memory",
                 str(H100), "--optimizer", name, "--json"]) == 0
    claims = json.loads(capsys.readouterr().out)["gpu_claims"]
    assert json.load(open(os.path.join(FIX, "qwen2.5-math-1.5b", "config.json")))["torch_dtype"] == "bfloat16"
    # the config's dtype is bfloat16, the live model above float32: every figure exactly half
    assert 2 * claims["trainer at train begin"] == weights
    assert 2 * claims["trainer, added by its first step (gradients, optimizer states)"] == pending


def test_relex_plan_refuses_a_torch_optimizer_for_deepspeed_and_two_answers(capsys):
    model = os.path.join(FIX, "qwen2.5-math-1.5b")
    for extra, want in ((["--world-size", "8", "--optimizer", "adamw"], "DeepSpeed"),
                        (["--optimizer", "adamw", "--trainer-memory", "20GB"], "give one"),
                        (["--optimizer", "adam"], "not one of")):
        assert main(["plan", "--model", model, "--tcut", "75", "--gpu-memory", "80GB", *extra]) == 2
        assert want in capsys.readouterr().err
