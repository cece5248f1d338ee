"""The memory plan (relex_callback/trajectory/plan.py) and `relex plan`: parameter counts of the paper's three models
from their
published configs, the plan's arithmetic recomputed here from first principles, the `auto` choice under a node shared
by 8 processes vs 1, a colocated vLLM's share, folding when the exact window fits nowhere, and every CLI mistake ->
one `relex: error:` line, exit 2."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from relex_callback.offline.cli import main
from relex_callback.errors import RelexInputError
from relex_callback.trajectory.plan import (
    PlanMachine,
    PlanWindow,
    balance_loads,
    count_parameters,
    elements_per_process,
    plan_for_run,
    plan_memory,
    _local_world_size,
)
from relex_callback.config import RelexSettings
from relex_callback.core.fold import plan_slots
from relex_callback.params import TensorSpec
from relex_callback.trainer.topology import balance, Topology
from relex_callback.trajectory.tiers import available_host_bytes

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GB, TB = 10**9, 10**12
# Published totals, in billions, 3 significant digits (the model cards print 1.54B, 4.0B and
# 8.2B, see tests/fixtures/README.md for where the configs come from).
PUBLISHED = {"qwen2.5-math-1.5b": 1.54, "qwen3-4b-base": 4.02, "qwen3-8b-base": 8.19}
WINDOW_FIELDS = {f.name for f in dataclasses.fields(PlanWindow)}


def _plan(label="", **kw):
    """plan_memory with its inputs as keywords, each given to PlanWindow or PlanMachine by its name (an unknown name
    is a TypeError from PlanMachine)."""
    win = PlanWindow(**{k: v for k, v in kw.items() if k in WINDOW_FIELDS})
    return plan_memory(win, PlanMachine(**{k: v for k, v in kw.items() if k not in WINDOW_FIELDS}), label=label)


def closed_form(cfg: dict) -> int:
    """Parameters of a Qwen2 / Qwen3 decoder from its config, counted by hand (not by building the model)."""
    h, V, L, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    nh, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qwen2 = cfg["model_type"] == "qwen2"  # q/k/v biases; Qwen3 has none but normalises q and k per head
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    attn += (nh * hd + 2 * kv * hd) if qwen2 else 2 * hd
    layer = attn + 3 * h * inter + 2 * h
    lm_head = 0 if cfg["tie_word_embeddings"] else V * h
    return V * h + L * layer + h + lm_head


@pytest.fixture(scope="module")
def counted():
    return {m: count_parameters(os.path.join(FIX, m)) for m in PUBLISHED}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_totals(counted, model):
    """Tolerance: half a unit of the published figure's last digit (+-0.005B), i.e. only its rounding. Counting a tied
    lm_head twice would add V*h = 0.23B (1.5B) / 0.39B (4B) and fail; missing one would fail the 8B."""
    named, dtype = counted[model]
    total = sum(math.prod(s) for _, s in named)
    with open(os.path.join(FIX, model, "config.json")) as f:
        cfg = json.load(f)
    assert total == closed_form(cfg)
    assert abs(total - PUBLISHED[model] * 1e9) <= 0.005e9, (model, total)
    assert dtype == "bfloat16"
    names = [n for n, _ in named]
    assert ("lm_head.weight" in names) == (not cfg["tie_word_embeddings"])


def test_division_among_processes_matches_the_topology():
    """zero3: DeepSpeed's flat partitions (Topology._track_zero3's ranges); fsdp2: torch.chunk along dim 0 (what
    fully_shard's Shard(0) keeps); replicated: topology.balance's greedy assignment."""
    shapes = [(151936, 64), (64, 64), (7, 5), (3,), (1000, 3), (13, 11)]
    sizes = [math.prod(s) for s in shapes]
    for world in (1, 2, 3, 8):
        z = elements_per_process(shapes, "zero3", world)
        want = [0] * world
        for n in sizes:
            part = -(-n // world)
            for r in range(world):
                want[r] += len(range(n)[r * part:(r + 1) * part])
        assert z == want and sum(z) == sum(sizes)
        f = elements_per_process(shapes, "fsdp2", world)
        want = [0] * world
        for s in shapes:
            for r, c in enumerate(torch.chunk(torch.empty(s, device="meta"), world, dim=0)):
                want[r] += c.numel()
        assert f == want and sum(f) == sum(sizes)
        if world <= len(shapes):
            owner = balance(sizes, world)
            want = [sum(n for n, o in zip(sizes, owner) if o == r) for r in range(world)]
            assert elements_per_process(shapes, "replicated", world) == want == balance_loads(sizes, world)
        # zero12: ZeRO-1/2's fp32 master partitions, one flat range of all tensors together per process
        z12 = elements_per_process(shapes, "zero12", world)
        part = -(-sum(sizes) // world)
        assert z12 == [len(range(sum(sizes))[r * part:(r + 1) * part]) for r in range(world)]
    with pytest.raises(RelexInputError, match="every process needs at least one tensor"):
        elements_per_process(shapes, "replicated", 7)


def test_plan_arithmetic_of_the_8b_run(counted):
    """Every figure of the 8B plan recomputed here: zero3 over 8 processes on one node, 80 GB GPUs, 1 TB host,
    vLLM colocated at 0.3."""
    shapes = [s for _, s in counted["qwen3-8b-base"][0]]
    N = sum(math.prod(s) for s in shapes)
    D = sum(-(-math.prod(s) // 8) for s in shapes)
    p = _plan(window=100, shapes=shapes, mode="zero3", world_size=8, gpu_memory=80 * GB, host_memory=1 * TB,
                    use_vllm=True, vllm_gpu_memory_utilization=0.3)
    assert p.elements == D and p.elements_total == N
    assert p.row_bytes == 2 * D and p.exact_bytes == 100 * 2 * D
    assert p.node(p.exact_bytes) == 8 * 100 * 2 * D
    assert abs(p.node(p.exact_bytes) - 1.638 * TB) < 0.001 * TB  # the 8.19e9 x 100 x 2 B = 1.64 TB
    assert p.theta0_bytes == 2 * D
    scratch = 4 * (1 << 24)  # the store's float32 device scratch: 2^24 elements
    piece = max(-(-math.prod(s) // 8) for s in shapes)  # the largest shard: embed_tokens / lm_head
    # the solve at tcut: the bf16 direction arena, a horizon piece in float32 + bf16, the Gram's float32 chunk
    solve = 2 * D + piece * (4 + 2) + 100 * min(piece, 1 << 18) * 4
    device = 80 * GB - 16 * N // 8 - int(0.3 * 80 * GB) - int(0.25 * 80 * GB) - 2 * D - scratch - solve
    assert p.tiers["device"].budget == device
    host = TB // 2 // 8
    assert p.tiers["host"].budget == host
    assert p.tiers["device"].exact_fits is False and p.tiers["host"].exact_fits is False
    K = p.tiers["host"].fold_slots
    assert (8 + K) * p.row_bytes <= host < (9 + K) * p.row_bytes
    assert p.tiers["device"].fold_slots == 0  # 45 GB of 9 rows > 17.5 GB
    assert (p.tier, p.folded, p.slots, p.rows) == ("host", True, K, 8 + K)
    assert p.buffer_bytes == (8 + K) * 2 * D and p.node(p.buffer_bytes) == 8 * (8 + K) * 2 * D
    assert "fits no tier" in p.reason and "folded on host" in p.reason
    assert not any("distributed" in n for n in p.notes)  # the distributed fold is in: no caveat
    text = p.format()
    assert "1.64 TB per node" in text and f"K={K}" in text
    json.dumps(p.to_dict())


def test_auto_sees_the_node_shared_by_its_processes():
    """The same process on a node alone (local world 1) gets the whole host share; with 8 per node one eighth: the
    exact window fits the host in the first case only (today's choose_storage would pick host in both)."""
    kw = dict(window=100, elements=1_023_841_920, mode="zero3", world_size=8, gpu_memory=80 * GB, host_memory=1 * TB)
    alone = _plan(local_world_size=1, **kw)
    shared = _plan(local_world_size=8, **kw)
    assert alone.tiers["host"].budget == 8 * shared.tiers["host"].budget
    assert (alone.tier, alone.folded, alone.slots) == ("host", False, 100)
    assert shared.folded and shared.slots < 100
    assert alone.node(alone.buffer_bytes) == alone.buffer_bytes  # one process per node
    assert shared.node(shared.buffer_bytes) <= TB // 2  # the node's processes together stay within half the memory


def test_a_colocated_vllm_takes_its_share_unless_already_measured():
    kw = dict(window=75, elements=192_964_288, mode="zero3", world_size=8, gpu_memory=80 * GB)
    none = _plan(**kw)
    vllm = _plan(use_vllm=True, vllm_gpu_memory_utilization=0.3, **kw)
    server = _plan(use_vllm=True, vllm_mode="server", **kw)
    measured = _plan(use_vllm=True, vllm_gpu_memory_utilization=0.3, vllm_claimed=True, **kw)
    assert none.tiers["device"].budget - vllm.tiers["device"].budget == 24 * GB
    assert server.tiers["device"].budget == measured.tiers["device"].budget == none.tiers["device"].budget
    # 28.9 GB exact: fits beside the trainer alone (55 GB), and still with vLLM's 24 GB taken (32.5 GB)
    assert none.tier == vllm.tier == "device" and not vllm.folded
    tight = _plan(use_vllm=True, vllm_gpu_memory_utilization=0.5, **kw)
    assert tight.tiers["device"].exact_fits is False


def test_fits_nowhere_folds_or_says_what_is_missing():
    row = 10**6 * 2
    p = _plan(window=50, elements=10**6, host_memory=2 * 20 * row, cuda=False)  # host budget: 20 rows
    assert p.tiers["device"].budget is None and (p.tier, p.folded, p.slots) == ("host", True, 12)
    assert "fits no tier" in p.reason
    none = _plan(window=50, elements=10**6, host_memory=2 * 8 * row, cuda=False)  # 8 rows: no slot beside 8
    assert none.tier is None and none.slots == 0 and "no tier has" in none.reason
    asked = _plan(window=50, elements=10**6, host_memory=2 * 8 * row, storage="host", cuda=False)
    assert asked.tier is None and "choose another storage" in asked.reason
    unknown = _plan(window=50, elements=10**6, cuda=False)
    assert unknown.tier is None and "no tier's memory was given" in unknown.reason
    # the device wins over a larger host ring only when it affords at least fold_rank slots
    fixed = row + 4 * 10**6  # theta_0 (bf16, one row) + the float32 scratch of the 10^6-element tensor
    # + the solve at tcut: the bf16 direction row, the tensor in float32 + bf16, the Gram's float32 chunk
    fixed += row + 10**6 * (4 + 2) + 50 * (1 << 18) * 4
    few = _plan(window=50, elements=10**6, gpu_memory=10**12, trainer_gpu_bytes=10**12 - 30 * row - fixed,
                      gpu_headroom=0, host_memory=2 * 40 * row)
    assert few.tiers["device"].fold_slots == 22 and (few.tier, few.slots) == ("device", 22)
    fewer = _plan(window=50, elements=10**6, gpu_memory=10**12, trainer_gpu_bytes=10**12 - 12 * row - fixed,
                        gpu_headroom=0, host_memory=2 * 40 * row)
    assert fewer.tiers["device"].fold_slots == 4 and (fewer.tier, fewer.slots) == ("host", 32)


def test_max_buffer_bytes_folds_like_the_store():
    D, cap = 3_000_000, 20 * 3_000_000 * 2 + 12345
    p = _plan(window=40, elements=D, host_memory=10**12, max_buffer_bytes=cap, cuda=False)
    K, fr = plan_slots(40, D, 2, max_buffer_bytes=cap, buffer_slots=None, fold_rank=8)
    assert (p.tier, p.folded, p.slots, p.fold_rank) == ("host", True, K, fr)


def test_plan_for_run_on_this_machine(tmp_path, monkeypatch):
    s = RelexSettings.validate(tcut=12, horizons=[60], stride=2, output_dir=str(tmp_path))
    specs = [TensorSpec("a", (100, 10), torch.float32, 1000), TensorSpec("b", (10,), torch.float32, 10)]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    p = plan_for_run(s, specs, Topology("single"), None, device="cpu")
    assert (p.window, p.elements, p.param_dtype, p.theta0_bytes) == (6, 1010, "float32", 4040)
    assert p.tiers["device"].budget is None and p.tiers["disk"].budget is not None
    assert abs(p.tiers["host"].budget - available_host_bytes() // 2) < 2 * 10**9  # measured a moment apart
    assert (p.tier, p.folded, p.slots) == ("host", False, 6)
    # bf16 parameters whose fp32 master weights are recorded (DeepSpeed mixed precision): theta_0 is float32
    masters = [TensorSpec("a", (100, 10), torch.bfloat16, 1000, recorded_dtype=torch.float32),
               TensorSpec("b", (10,), torch.bfloat16, 10, recorded_dtype=torch.float32)]
    p = plan_for_run(s, masters, Topology("single"), None, device="cpu")
    assert (p.param_dtype, p.theta0_bytes) == ("float32", 4040)
    p = plan_for_run(s, [TensorSpec("a", (100, 10), torch.bfloat16, 1000)], Topology("single"), None, device="cpu")
    assert (p.param_dtype, p.theta0_bytes) == ("bfloat16", 2000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _local_world_size(8) == 4 and _local_world_size(2) == 2  # 4 does not divide 2: the whole world
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert _local_world_size(8) == 8


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_prints_the_plan(capsys, counted):
    rc = main(["plan", "--model", os.path.join(FIX, "qwen3-8b-base"), "--tcut", "100", "--world-size", "8",
               "--gpu-memory", "80GB", "--host-memory", "1TB", "--vllm-colocate", "0.3"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("relex memory plan: qwen3-8b-base, tcut 100")
    assert "1.64 TB per node" in out and "auto     -> host" in out
    rc = main(["plan", "--model", os.path.join(FIX, "qwen3-8b-base", "config.json"), "--tcut", "100", "--world-size",
               "8", "--gpu-memory", "80GB", "--host-memory", "1TB", "--vllm-colocate", "0.3", "--json"])
    d = json.loads(capsys.readouterr().out)
    want = _plan(window=100, shapes=[s for _, s in counted["qwen3-8b-base"][0]], mode="zero3", world_size=8,
                       gpu_memory=80 * GB, host_memory=TB, use_vllm=True, vllm_gpu_memory_utilization=0.3)
    assert rc == 0 and d["tier"] == want.tier and d["slots"] == want.slots and d["exact_bytes"] == want.exact_bytes
    assert d["tiers"]["host"]["budget"] == want.tiers["host"].budget


def _bad_configs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nomt").mkdir()
    (tmp_path / "nomt" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text('{"model_type": "no_such_architecture_xyz"}')


M8 = os.path.join(FIX, "qwen3-8b-base")
BAD = [
    (["--model", "<t>/missing", "--tcut", "100"], "does not exist"),
    (["--model", "<t>/empty", "--tcut", "100"], "has no config.json"),
    (["--model", "<t>/nomt", "--tcut", "100"], "has no 'model_type'"),
    (["--model", "<t>/broken.json", "--tcut", "100"], "not a readable JSON config"),
    (["--model", "<t>/alien", "--tcut", "100"], "cannot build a causal LM"),
    (["--model", M8, "--tcut", "1"], "--tcut must be >= 2, got 1"),
    (["--model", M8, "--tcut", "75.5"], "--tcut must be a whole number"),
    (["--model", M8, "--tcut", "100", "--stride", "60"], "fewer than 2 snapshots"),
    (["--model", M8, "--tcut", "100", "--world-size", "0"], "--world-size must be"),
    (["--model", M8, "--tcut", "100", "--world-size", "8", "--local-world-size", "3"], "must divide --world-size 8"),
    (["--model", M8, "--tcut", "100", "--world-size", "8", "--mode", "ddp"], "--mode 'ddp' is not one of"),
    (["--model", M8, "--tcut", "100", "--mode", "replicated"], "needs --world-size > 1"),
    (["--model", M8, "--tcut", "100", "--world-size", "2", "--mode", "single"], "--mode single with --world-size 2"),
    (["--model", M8, "--tcut", "100", "--dtype", "int8"], "--dtype 'int8' is not one of"),
    (["--model", M8, "--tcut", "100", "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a size"),
    (["--model", M8, "--tcut", "100", "--host-memory", "0TB"], "--host-memory '0TB' is not a size"),
    (
        ["--model", M8, "--tcut", "100", "--gpu-memory", "80GB", "--vllm-colocate", "1.5"],
        "--vllm-colocate must be a fraction",
    ),
    (["--model", M8, "--tcut", "100", "--vllm-colocate", "0.3"], "--vllm-colocate needs --gpu-memory"),
    (["--model", M8, "--tcut", "100", "--trainer-memory", "20GB"], "--trainer-memory needs --gpu-memory"),
    (["--model", M8, "--tcut", "100", "--gpu-headroom", "1"], "--gpu-headroom must be a fraction"),
    (["--model", M8, "--tcut", "100", "--storage", "ram"], "--storage 'ram' is not one of"),
    (["--model", M8, "--tcut", "100", "--fold-rank", "0"], "--fold-rank must be >= 1, got 0"),
    (["--tcut", "100"], "the following arguments are required: --model"),
]


@pytest.mark.parametrize("argv,msg", BAD, ids=[m for _, m in BAD])
def test_cli_mistakes_are_one_line(tmp_path, capsys, argv, msg):
    _bad_configs(tmp_path)
    rc = main(["plan"] + [a.replace("<t>", str(tmp_path)) for a in argv])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relex: error: ") and msg in lines[0], cap.err


def test_cli_mistakes_answer_before_torch_is_imported(tmp_path):
    code = ("import sys; from relex_callback.offline.cli import main; "
            f"rc = main(['plan', '--model', {M8!r}, '--tcut', '100', '--gpu-memory', 'lots']); "
            "print(rc, 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(FIX)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stderr
