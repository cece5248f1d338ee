"""The memory plan of a RELEX window: what each process and each node holds on each tier, exact and folded.

A window of ``T = tcut / stride`` snapshots of ``D`` tracked elements per process needs ``T x D`` buffer elements
per process (one row per snapshot), plus theta_0 (``D`` elements in the recorded dtype: the parameters', or float32
for the fp32 master weights DeepSpeed mixed precision keeps; kept on the parameters' device). Exactly: Qwen3-8B-Base
(8.19e9 elements) with ``tcut=100`` in bf16 is 1.64 TB per node whatever the
sharding, 205 GB per process on 8 processes. The streaming fold (:mod:`relex_callback.core.fold`) bounds the buffer at
``fold_rank + K`` rows. This module says, before anything is allocated, which tier can hold what:

* **device** (accelerator memory): the device's memory minus what the trainer holds (model states: weights,
  gradients, optimizer), what a colocated vLLM engine will claim (``vllm_gpu_memory_utilization`` of the device,
  TRL's ``use_vllm=True, vllm_mode="colocate"``; an engine in sleep mode has not claimed it yet when training
  starts), a headroom for activations, and RELEX's own fixed device bytes (theta_0, the snapshot scratch);
* **host** (CPU memory): ``host_fraction`` of the node's memory, shared by the ``local_world_size`` processes of the
  node (pinned pages cannot be swapped; the other half is left to data loaders, checkpoint saving and the OS);
* **disk** (a memory-mapped file): the free space of the output directory's file system, shared the same way.

:func:`plan_memory` is pure arithmetic (no torch, no measurement): the ``relex plan`` command and the tests call it
with numbers. :func:`plan_for_run` measures a live run (free device and host memory, ``LOCAL_WORLD_SIZE``, the
trainer's vLLM settings) and calls it; :func:`count_parameters` builds a model from its ``config.json`` on the meta
device to count its tensors without loading weights.

Choice of ``storage="auto"``: the exact window on the fastest tier that holds it (device, host, disk); when none
does, the fold, on the fastest tier that holds ``fold_rank`` basis rows and at least ``fold_rank`` ring slots (a fold
then costs at most two passes over ``2 fold_rank`` rows per ``fold_rank`` snapshots), else on the tier with the most
slots; with fewer than one slot anywhere, no tier (the plan says what is missing).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from ..config import DEFAULT_FOLD_RANK, STORAGES, parse_dtype
from ..errors import RelexInputError
from ..files.fs import read_json

TIERS = ("device", "host", "disk")
MODES = ("single", "replicated", "zero12", "zero3", "fsdp2")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
# Bytes of model states per trainable parameter under mixed-precision Adam (the ZeRO paper's accounting, Rajbhandari
# et al. 2020, sec. 3.1): 2 (16-bit weights) + 2 (16-bit gradients) + 4 (fp32 master weights) + 4 + 4 (Adam moments).
# Replicated runs (DDP) hold all of it on every device (ZeRO-1/2 shard the last 12 or 14 bytes: 16 is their bound);
# ZeRO-3 / FSDP2 divide it by the world size.
MODEL_STATE_BYTES = 16
SNAPSHOT_CHUNK_DEVICE = 1 << 24  # float32 elements of the store's device scratch (tiers.SNAPSHOT_CHUNK_DEVICE)
DEFAULT_GPU_HEADROOM = 0.25
DEFAULT_HOST_FRACTION = 0.5


def format_bytes(n: Optional[float]) -> str:
    """Decimal units, three significant digits (GB = 1e9 bytes, like the sizes ``relex`` accepts)."""
    if n is None:
        return "-"
    for unit, m in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= m:
            return f"{n / m:.3g} {unit}"
    return f"{int(n)} B"


def balance_loads(sizes: Sequence[int], world: int) -> list[int]:
    """Each process's element count under the replicated mode's assignment: tensors by decreasing size (ties: original
    order) onto the least loaded process (ties: the lower one). The same rule as
    :func:`relex_callback.trainer.topology.balance`, without importing torch."""
    loads = [0] * world
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += sizes[i]
    return loads


def elements_per_process(shapes: Sequence[Sequence[int]], mode: str, world: int) -> list[int]:
    """Tracked elements of every process for the full tensors ``shapes``, as
    :class:`~relex_callback.trainer.topology.Topology`
    divides them: ``single`` all; ``replicated`` whole tensors balanced by size; ``zero3`` a flat partition of
    ``ceil(n / world)`` elements of every tensor (the last processes get what is left); ``fsdp2`` ``ceil(rows / world)``
    rows of every tensor (``torch.chunk`` along dim 0); ``zero12`` a flat partition of ``ceil(total / world)``
    elements of all tensors together (DeepSpeed ZeRO-1/2's fp32 master partitions, without its alignment padding)."""
    sizes = [math.prod(s) for s in shapes]
    if mode == "single" or world == 1:
        return [sum(sizes)]
    if mode == "zero12":
        total = sum(sizes)
        part = -(-total // world)
        return [max(0, min(part, total - r * part)) for r in range(world)]
    if mode == "replicated":
        if len(sizes) < world:
            raise RelexInputError(f"{len(sizes)} tracked tensor(s) for {world} processes: with replicated parameters "
                                  "every process needs at least one tensor; use fewer processes or a sharded mode")
        return balance_loads(sizes, world)
    loads = [0] * world
    for shape, n in zip(shapes, sizes):
        if mode == "zero3":
            part = -(-n // world)
            for r in range(world):
                loads[r] += max(0, min(part, n - r * part))
        elif mode == "fsdp2":
            rows = shape[0] if len(shape) else 1
            row = n // rows if rows else 0
            chunk = -(-rows // world)
            for r in range(world):
                loads[r] += (min((r + 1) * chunk, rows) - min(r * chunk, rows)) * row
        else:
            raise RelexInputError(f"mode={mode!r} is not one of {list(MODES)}")
    return loads


def solve_scratch_bytes(D: int, piece: int, window: int, item: int, param_item: int, rank: int = 1) -> int:
    """Device bytes the end of a window allocates beside a device-tier buffer: the ``[rank, D]`` direction arena in
    the buffer dtype, one horizon piece in float32 plus its cast to the parameters' dtype (the largest tensor), and
    the reference Gram's float32 chunk of ``window x 2^18`` columns. A host or disk buffer solved through the GPU
    (:mod:`relex_callback.core.kernels.staged`) keeps its directions on the host and takes one staged block of
    64 MiB plus its output rows on the device instead of the direction arena: less, for any model this plans."""
    return rank * D * item + piece * (4 + param_item) + window * min(piece, 1 << 18) * 4


def _local_numel(p) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this process's shard
    return int(local.numel())


def _state_tensors(opt_name: str, group: dict) -> tuple[int, bool]:
    """(full-size state tensors per parameter, whether the update makes one full-size temporary) for a torch
    optimizer by class name; an unknown optimizer is taken as Adam-like (two states), which the plan notes."""
    n = opt_name.lower()
    multi = not group.get("fused") and group.get("foreach") is not False  # foreach (CUDA's default): temporaries
    if "adafactor" in n:
        return 0, False  # factored second moments: rows + columns, negligible
    if "adam" in n or "lamb" in n:
        return (3 if group.get("amsgrad") else 2), multi
    if n == "sgd":
        return (1 if group.get("momentum", 0) else 0), False
    if "lion" in n or "adagrad" in n:
        return 1, multi
    if "rmsprop" in n:
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered")), multi
    return 2, multi


def pending_training_bytes(optimizer, device=None) -> tuple[int, str]:
    """Bytes a run still allocates on ``device`` at its first optimizer step that it has not at ``on_train_begin``:
    a torch optimizer creates its states lazily (AdamW: two tensors the size of each parameter, in its dtype), and
    gradients exist only after the first backward. Per parameter this process holds (its shard under FSDP2) with no
    state yet: its gradient (unless allocated), its optimizer states, and for a foreach update one full-size
    temporary. For plain AdamW on float32 parameters that is 16 bytes per parameter. DeepSpeed allocates its
    optimizer states before training starts (measured with the trainer's memory), as do optimizers whose states
    exist already (a resumed run): 0. Returns ``(bytes, how they were counted)``."""
    opt = optimizer
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:  # accelerate's wrapper, a LR wrapper, ...
        opt = opt.optimizer
    if opt is None:
        return 0, "no optimizer"
    if type(opt).__module__.startswith("deepspeed"):
        return 0, "DeepSpeed allocates its optimizer states before training starts"
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return 0, f"{type(opt).__name__} has no param groups"
    state = getattr(opt, "state", {}) or {}
    total = 0
    for g in groups:
        k, temp = _state_tensors(type(opt).__name__, g)
        for p in g.get("params", ()):
            if device is not None and str(p.device) != str(device) and p.device.type != "meta":
                continue
            if state.get(p):
                continue
            n, item = _local_numel(p), p.element_size()
            total += n * item * (k + int(temp) + int(getattr(p, "grad", None) is None))
    return total, f"{type(opt).__name__}: gradients + optimizer states created at the first step"


TORCH_OPTIMIZERS = {"adamw": ("AdamW", {}), "adamw-fused": ("AdamW", {"fused": True}), "sgd": ("SGD", {})}


def torch_optimizer_bytes(shapes: Sequence[tuple[int, ...]], param_dtype: str, optimizer: str, shards: int = 1
                          ) -> tuple[int, int]:
    """What a run with a plain torch optimizer holds on each device, counted as the callback counts it: ``(weights
    at train begin, what the first step adds)``. The weights in ``param_dtype`` (each tensor divided into ``shards``
    flat pieces: FSDP2), and :func:`pending_training_bytes` of a real ``torch.optim`` optimizer (``optimizer``: a
    key of :data:`TORCH_OPTIMIZERS`) over the same tensors on the meta device."""
    import torch

    name, kw = TORCH_OPTIMIZERS[optimizer]
    dt = getattr(torch, param_dtype)
    params = [torch.nn.Parameter(torch.empty(-(-math.prod(s) // shards), device="meta", dtype=dt)) for s in shapes]
    weights = sum(p.numel() * p.element_size() for p in params)
    opt = getattr(torch.optim, name)(params, lr=1e-6, **kw)
    return weights, pending_training_bytes(opt)[0]


@dataclass(frozen=True)
class TierPlan:
    """One tier of a :class:`MemoryPlan`, per process (multiply by ``local_world_size`` for a node).

    Args:
        tier (`str`): ``device``, ``host`` or ``disk``.
        budget (`int` or `None`): bytes this process may give the buffer on this tier; None when unknown (not given).
        note (`str`): how ``budget`` was computed.
        exact_fits (`bool` or `None`): whether the whole window (``window`` rows) fits ``budget`` (None: unknown).
        fold_slots (`int` or `None`): the most ring slots K with ``fold_rank + K`` rows in ``budget``, at most
            ``window - 1`` (None: unknown, 0: not even one slot).
    """

    tier: str
    budget: Optional[int]
    note: str
    exact_fits: Optional[bool]
    fold_slots: Optional[int]


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of one window; built by :func:`plan_memory`. Sizes are bytes per process unless named
    ``*_node`` (a node holds ``local_world_size`` processes, each planned at the largest process's share)."""

    label: str
    mode: str
    world_size: int
    local_world_size: int
    window: int
    dtype: str
    param_dtype: str
    fold_rank: int
    elements_total: int
    elements: int  # tracked elements of the largest process's share (what every process is planned for)
    row_bytes: int
    exact_bytes: int
    theta0_bytes: int
    device_fixed_bytes: int  # theta_0 + the snapshot scratch, on the parameters' device whatever the tier
    staging_bytes: int  # host tier with CUDA: one row staged on the device before its copy to pinned memory
    gpu_memory: Optional[int]
    gpu_claims: dict
    host_memory: Optional[int]
    disk_free: Optional[int]
    max_buffer_bytes: Optional[int]
    tiers: dict
    storage: str  # what was asked: auto or a tier
    tier: Optional[str]  # what the plan chose (None: nothing fits)
    slots: int  # ring slots K of the chosen plan (the window when exact)
    folded: bool
    reason: str
    notes: tuple = field(default_factory=tuple)

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def rows(self) -> int:
        """Buffer rows of the chosen plan: the window, or ``fold_rank + K`` when folded."""
        return self.slots + (self.fold_rank if self.folded else 0)

    @property
    def buffer_bytes(self) -> int:
        return self.rows * self.row_bytes if self.tier else 0

    def node(self, nbytes: Optional[int]) -> Optional[int]:
        """Bytes on one node for ``nbytes`` per process."""
        return None if nbytes is None else nbytes * self.local_world_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tiers"] = {k: asdict(v) if isinstance(v, TierPlan) else v for k, v in self.tiers.items()}
        d.update(rows=self.rows, buffer_bytes=self.buffer_bytes, buffer_bytes_node=self.node(self.buffer_bytes),
                 exact_bytes_node=self.node(self.exact_bytes), nodes=self.nodes)
        return d

    def format(self) -> str:
        """The plan as one log block (what ``relex plan`` prints and the callback logs at ``on_train_begin``)."""
        f = format_bytes
        lpn = self.local_world_size
        head = f"relex memory plan{': ' + self.label if self.label else ''}"
        lines = [
            head,
            f"  run      {self.mode}, {self.world_size} process(es), {lpn} per node ({self.nodes} node(s)); "
            f"window {self.window} rows, buffer {self.dtype}, fold_rank {self.fold_rank}",
            f"  tracked  {self.elements_total:,} elements; {self.elements:,} per process -> one row "
            f"{f(self.row_bytes)}",
            f"  theta_0  {f(self.theta0_bytes)} per process ({self.param_dtype}) on the parameters' device, + "
            f"{f(self.device_fixed_bytes - self.theta0_bytes)} snapshot scratch",
        ]
        if self.gpu_memory is not None:
            claims = "; ".join(f"{k}: {f(v)}" for k, v in self.gpu_claims.items())
            lines.append(f"  device   {f(self.gpu_memory)} per device - {claims}")
        lines.append(f"  exact    {f(self.exact_bytes)} per process, {f(self.node(self.exact_bytes))} per node "
                     f"({self.window} rows)")
        lines.append(f"  {'tier':<8} {'budget/process':>15}  {'exact window':<14} folded: largest ring K, bytes per "
                     f"process / node")
        for name in TIERS:
            t = self.tiers[name]
            if t.budget is None:
                lines.append(f"  {name:<8} {'not given':>15}  {'?':<14} ?   ({t.note})")
                continue
            ex = "fits" if t.exact_fits else "no"
            if t.fold_slots:
                b = (self.fold_rank + t.fold_slots) * self.row_bytes
                fo = f"K={t.fold_slots}: {self.fold_rank}+{t.fold_slots} rows, {f(b)} / {f(self.node(b))}"
            else:
                fo = f"no ({self.fold_rank}+1 rows need {f((self.fold_rank + 1) * self.row_bytes)})"
            lines.append(f"  {name:<8} {f(t.budget):>15}  {ex:<14} {fo}   ({t.note})")
        choice = self.tier or "none"
        lines.append(f"  {self.storage:<8} -> {choice}: {self.reason}")
        lines += [f"  note     {n}" for n in self.notes]
        return "\n".join(lines)


def _fold_slots(budget: Optional[int], row: int, fold_rank: int, window: int, cap: Optional[int]) -> Optional[int]:
    if budget is None:
        return None
    b = budget if cap is None else min(budget, cap)
    k = b // row - fold_rank if row else window - 1
    return int(max(0, min(k, window - 1)))


@dataclass(frozen=True)
class PlanWindow:
    """The window a memory plan is for: its rows, how the tracked tensors divide among processes, the buffer's form.

    Args:
        window (`int`): snapshot rows of the window, ``tcut // stride``.
        elements (`int`, *optional*): tracked elements of the largest process (give this or ``shapes``).
        shapes (`list[tuple[int, ...]]`, *optional*): full shapes of every tracked tensor; divided among processes
            as ``mode`` does (:func:`elements_per_process`).
        largest_piece (`int`, *optional*): elements of the largest tracked piece of a process (from ``shapes`` when
            given; else ``elements``, an upper bound).
        mode (`str`, *optional*, defaults to `"single"`): ``single``, ``replicated`` (DDP, ZeRO-1/2 in fp32),
            ``zero12`` (ZeRO-1/2 with bf16/fp16 mixed precision), ``zero3`` or ``fsdp2``.
        world_size (`int`, *optional*, defaults to 1): processes in the job.
        local_world_size (`int`, *optional*): processes per node (defaults to ``world_size``: one node).
        dtype (`str`, *optional*, defaults to `"bfloat16"`): buffer dtype.
        param_dtype (`str`, *optional*, defaults to `"bfloat16"`): theta_0's dtype: the recorded values' (the
            parameters', or float32 for DeepSpeed's fp32 master weights).
        fold_rank (`int`, *optional*, defaults to 8): basis rows of a folded buffer.
        storage (`str`, *optional*, defaults to `"auto"`): ``auto`` or a tier to plan for.
        max_buffer_bytes (`int`, *optional*): the callback's ``max_buffer_bytes``: a cap on every tier.
        rank (`int`, *optional*, defaults to 1): directions per tensor (the solve's direction arena at ``tcut``).
    """

    window: int
    elements: Optional[int] = None
    shapes: Optional[Sequence[Sequence[int]]] = None
    largest_piece: Optional[int] = None
    mode: str = "single"
    world_size: int = 1
    local_world_size: Optional[int] = None
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    fold_rank: int = DEFAULT_FOLD_RANK
    storage: str = "auto"
    max_buffer_bytes: Optional[int] = None
    rank: int = 1


@dataclass(frozen=True)
class PlanMachine:
    """What a node offers a window, and what else claims it.

    Args:
        gpu_memory (`int`, *optional*): bytes of one device (None: the device tier is not planned).
        trainer_gpu_bytes (`int`, *optional*): bytes the trainer holds on each device; defaults to the model
            states (16 bytes per parameter, divided by ``world_size`` in the sharded modes).
        trainer_pending_bytes (`int`, *optional*, defaults to 0): bytes training will still allocate on each device
            after ``trainer_gpu_bytes`` was measured: gradients and optimizer states that a torch optimizer creates at
            its first step (:func:`pending_training_bytes`).
        use_vllm / vllm_mode / vllm_gpu_memory_utilization (*optional*): TRL's ``GRPOConfig`` fields; a colocated
            engine claims ``vllm_gpu_memory_utilization x gpu_memory`` of every training device.
        vllm_claimed (`bool`, *optional*, defaults to `False`): the engine's memory is already part of
            ``trainer_gpu_bytes`` (measured while it is awake).
        gpu_headroom (`float`, *optional*, defaults to 0.25): fraction of the device kept for activations and
            allocator fragmentation.
        host_memory (`int`, *optional*): bytes of host memory of one node (None: the host tier is not planned).
        host_fraction (`float`, *optional*, defaults to 0.5): the part of ``host_memory`` the buffers of a node may
            use together.
        disk_free (`int`, *optional*): free bytes of the output file system, shared by a node's processes.
        cuda (`bool`, *optional*, defaults to `True`): parameters on a CUDA device (the host tier then stages one
            row on the device).
    """

    gpu_memory: Optional[int] = None
    trainer_gpu_bytes: Optional[int] = None
    trainer_pending_bytes: int = 0
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_claimed: bool = False
    gpu_headroom: float = DEFAULT_GPU_HEADROOM
    host_memory: Optional[int] = None
    host_fraction: float = DEFAULT_HOST_FRACTION
    disk_free: Optional[int] = None
    cuda: bool = True


@dataclass(frozen=True)
class _Figures:
    """A plan's derived sizes: the mode after the checks, processes per node, bytes per process."""

    mode: str
    local: int
    total: int  # tracked elements of the whole job
    row: int  # one buffer row
    exact: int  # the exact window
    device_fixed: int  # theta_0 + the snapshot's scratch on the device
    staging: int  # the host tier's one-row device staging buffer
    solve_bytes: int  # the solve's device scratch at tcut


def plan_memory(win: PlanWindow, machine: PlanMachine = PlanMachine(), label: str = "") -> MemoryPlan:
    """Compute the memory plan of a window (pure arithmetic: nothing is measured or allocated).

    Args:
        win (`PlanWindow`): the window: rows, tracked elements and how processes share them, buffer dtype and tier.
        machine (`PlanMachine`, *optional*): what a node offers and what else claims it (default: nothing known,
            so no tier is sized).
        label (`str`, *optional*): a name for the first line of the text block.

    Returns:
        :class:`MemoryPlan`.
    """
    mode, local, dt, pdt, D, total, piece = _plan_inputs(win, machine)
    if win.largest_piece is not None:
        piece = min(int(win.largest_piece), D)
    cuda = machine.cuda
    item = ITEMSIZE[dt]
    row = D * item
    exact = win.window * row
    theta0 = D * ITEMSIZE[pdt]
    scratch = min(SNAPSHOT_CHUNK_DEVICE, piece) * 4 if cuda else 0
    device_fixed = theta0 + scratch
    solve_bytes = solve_scratch_bytes(D, piece, win.window, item, ITEMSIZE[pdt], win.rank) if cuda else 0
    staging = row if cuda else 0
    notes = []
    fig = _Figures(mode=mode, local=local, total=total, row=row, exact=exact, device_fixed=device_fixed,
                   staging=staging, solve_bytes=solve_bytes)
    claims, tiers = _plan_budgets(notes, win, machine, fig)
    tier, slots, folded, reason = _choose_storage(
        tiers, storage=win.storage, window=win.window, local=local, row=row, exact=exact, fold_rank=win.fold_rank)
    return MemoryPlan(
        label=label, mode=mode, world_size=win.world_size, local_world_size=local, window=win.window, dtype=dt,
        param_dtype=pdt, fold_rank=win.fold_rank, elements_total=total, elements=D, row_bytes=row, exact_bytes=exact,
        theta0_bytes=theta0, device_fixed_bytes=device_fixed, staging_bytes=staging, gpu_memory=machine.gpu_memory,
        gpu_claims=claims, host_memory=machine.host_memory, disk_free=machine.disk_free,
        max_buffer_bytes=win.max_buffer_bytes, tiers=tiers, storage=win.storage, tier=tier, slots=slots,
        folded=folded, reason=reason, notes=tuple(notes),
    )


def _plan_inputs(win: PlanWindow, machine: PlanMachine):
    """Check plan_memory's inputs; return (mode, local, dtype, param dtype, elements D, total, largest piece)."""
    mode, world_size, storage, elements, shapes = win.mode, win.world_size, win.storage, win.elements, win.shapes
    if mode not in MODES:
        raise RelexInputError(f"mode={mode!r} is not one of {list(MODES)}")
    if storage not in STORAGES:
        raise RelexInputError(f"storage={storage!r} is not one of {list(STORAGES)}")
    for name, v, lo in (("window", win.window, 1), ("world_size", world_size, 1), ("fold_rank", win.fold_rank, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise RelexInputError(f"{name} must be a whole number >= {lo}, got {v!r}")
    local = world_size if win.local_world_size is None else win.local_world_size
    if isinstance(local, bool) or not isinstance(local, int) or not 1 <= local <= world_size or world_size % local:
        raise RelexInputError(f"local_world_size={local!r} must divide world_size={world_size} (processes per node)")
    if mode == "single" and world_size > 1:
        raise RelexInputError(f"mode='single' with world_size={world_size}; use replicated, zero3 or fsdp2")
    if mode != "single" and world_size == 1:
        mode = "single"
    if not 0 <= machine.gpu_headroom < 1:
        raise RelexInputError(f"gpu_headroom={machine.gpu_headroom!r} must be a fraction in [0, 1)")
    if not 0 < machine.host_fraction <= 1:
        raise RelexInputError(f"host_fraction={machine.host_fraction!r} must be a fraction in (0, 1]")
    util = machine.vllm_gpu_memory_utilization
    if machine.use_vllm and machine.vllm_mode == "colocate" and not 0 < util <= 1:
        raise RelexInputError(f"vllm_gpu_memory_utilization={util!r} must be in (0, 1]")
    dt = parse_dtype(win.dtype)
    pdt = str(win.param_dtype).replace("torch.", "")
    if pdt not in ITEMSIZE:
        raise RelexInputError(f"param_dtype={win.param_dtype!r} is not one of {sorted(ITEMSIZE)}")
    if (elements is None) == (shapes is None):
        raise RelexInputError("give the tracked elements per process or the tensors' shapes (one of the two)")
    if shapes is not None:
        D = max(elements_per_process(shapes, mode, world_size))
        total = sum(math.prod(s) for s in shapes)
        piece = max(math.prod(s) for s in shapes)
        if mode in ("zero3", "fsdp2"):
            piece = -(-piece // world_size)
    else:
        if isinstance(elements, bool) or not isinstance(elements, int) or elements < 1:
            raise RelexInputError(f"elements must be a whole number >= 1, got {elements!r}")
        D, total, piece = elements, elements * world_size, elements  # total: an upper bound from the largest share
    return mode, local, dt, pdt, D, total, piece


def _plan_budgets(notes, win: PlanWindow, m: PlanMachine, fig: _Figures):
    """Budget each tier (device claims, host share, disk share) and what fits in it; return (claims, tiers)."""
    gpu_memory, cuda, trainer_gpu_bytes, trainer_pending_bytes = (m.gpu_memory, m.cuda, m.trainer_gpu_bytes,
                                                                  m.trainer_pending_bytes)
    use_vllm, vllm_mode, vllm_claimed, util = m.use_vllm, m.vllm_mode, m.vllm_claimed, m.vllm_gpu_memory_utilization
    gpu_headroom, host_memory, host_fraction, disk_free = m.gpu_headroom, m.host_memory, m.host_fraction, m.disk_free
    mode, local, total, row, exact = fig.mode, fig.local, fig.total, fig.row, fig.exact
    world_size, window, fold_rank, max_buffer_bytes = win.world_size, win.window, win.fold_rank, win.max_buffer_bytes
    claims = {}
    tiers = {}
    if gpu_memory is not None and cuda:
        if trainer_gpu_bytes is None:
            share = world_size if mode in ("zero3", "fsdp2") else 1
            trainer_gpu_bytes = MODEL_STATE_BYTES * total // share
            name = f"trainer ({MODEL_STATE_BYTES} B/param{' / ' + str(share) if share > 1 else ''})"
            claims[name] = trainer_gpu_bytes
        else:
            claims["trainer at train begin"] = int(trainer_gpu_bytes)
            if trainer_pending_bytes:
                claims["trainer, added by its first step (gradients, optimizer states)"] = int(trainer_pending_bytes)
        if use_vllm and vllm_mode == "colocate" and not vllm_claimed:
            claims[f"vLLM colocate ({util:g})"] = int(util * gpu_memory)
        claims[f"headroom ({gpu_headroom:.0%})"] = int(gpu_headroom * gpu_memory)
        claims["theta_0 + scratch"] = fig.device_fixed
        if fig.solve_bytes:
            claims["solve at tcut (directions, a horizon's float32 copy, Gram chunk)"] = fig.solve_bytes
        free = gpu_memory - sum(claims.values())
        if free < 0:
            notes.append(f"the device is over-committed by {format_bytes(-free)} before any buffer: the trainer, vLLM "
                         "and headroom alone exceed it")
        if free < fig.staging:
            notes.append("the host tier's one-row device staging buffer does not fit either")
        tiers["device"] = TierPlan("device", max(0, free), "device - claims", None, None)
    else:
        tiers["device"] = TierPlan("device", None, "no --gpu-memory" if cuda else "no accelerator", None, None)
    if host_memory is not None:
        b = int(host_memory * host_fraction) // local
        tiers["host"] = TierPlan("host", b, f"{host_fraction:.0%} of {format_bytes(host_memory)} / {local}", None, None)
    else:
        tiers["host"] = TierPlan("host", None, "no --host-memory", None, None)
    if disk_free is not None:
        tiers["disk"] = TierPlan("disk", int(disk_free) // local, f"{format_bytes(disk_free)} free / {local}", None,
                                 None)
    else:
        tiers["disk"] = TierPlan("disk", None, "no --disk-free", None, None)
    capped = max_buffer_bytes is not None and exact > max_buffer_bytes
    for k, t in tiers.items():
        fits = None if t.budget is None else (exact <= t.budget and not capped)
        slots = _fold_slots(t.budget, row, fold_rank, window, max_buffer_bytes)
        tiers[k] = TierPlan(t.tier, t.budget, t.note, fits, slots)
    if capped:
        notes.append(f"max_buffer_bytes={format_bytes(max_buffer_bytes)} is below the exact window: the run folds")
    return claims, tiers


def _choose_storage(tiers, *, storage, window, local, row, exact, fold_rank):
    """Choose the tier and ring (exact or folded) the window uses; return (tier, slots, folded, reason)."""
    f = format_bytes
    exact_txt = f"the exact window ({window} rows, {f(exact)} per process, {f(local * exact)} per node)"

    def folded_txt(name, K):
        b = (fold_rank + K) * row
        return f"{fold_rank} basis + {K} ring rows, {f(b)} per process, {f(local * b)} per node"

    tier, slots, folded = None, window, False
    if storage == "auto":
        fit = [k for k in TIERS if tiers[k].exact_fits]
        if fit:
            tier = fit[0]
            reason = f"{exact_txt} fits the {tier} budget ({f(tiers[tier].budget)} per process)"
        else:
            known = [k for k in TIERS if tiers[k].budget is not None]
            good = [k for k in known if (tiers[k].fold_slots or 0) >= min(fold_rank, window - 1)]
            some = sorted((k for k in known if tiers[k].fold_slots), key=lambda k: -tiers[k].fold_slots)
            pick = good[0] if good else (some[0] if some else None)
            if not known:
                reason = "no tier's memory was given (give the device, host or disk memory)"
                tier, slots = None, window
            elif pick is None:
                reason = (f"{exact_txt} fits no tier, and folding needs {fold_rank}+1 rows "
                          f"({f((fold_rank + 1) * row)} per process) which no tier has; track fewer tensors, use more "
                          "processes, or give more memory")
                slots = 0
            else:
                tier, slots, folded = pick, tiers[pick].fold_slots, True
                reason = (f"{exact_txt} fits no tier; folded on {pick}: {folded_txt(pick, slots)} (the largest ring "
                          f"its budget of {f(tiers[pick].budget)} affords)")
    else:
        t = tiers[storage]
        tier = storage
        if t.budget is None:
            reason = f"{exact_txt} on {storage} as asked (its size was not given: not checked)"
        elif t.exact_fits:
            reason = f"{exact_txt} fits {storage} as asked ({f(t.budget)} per process)"
        elif t.fold_slots:
            slots, folded = t.fold_slots, True
            reason = (
                f"{exact_txt} does not fit {storage} ({f(t.budget)} per process); folded: {folded_txt(storage, slots)}"
            )
        else:
            tier, slots = None, 0
            reason = (f"{storage} ({f(t.budget)} per process) holds neither {exact_txt} nor {fold_rank}+1 folded rows "
                      f"({f((fold_rank + 1) * row)}); choose another storage")
    return tier, slots, folded, reason


# ------------------------------------------------------------------------------------------ model configs
def read_model_config(path: str) -> dict:
    """The ``config.json`` of ``path`` (a model directory or the file itself) as a dict, checked to name a model
    type. Raises :class:`RelexInputError` saying what to pass."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(path):
        raise RelexInputError(f"--model {path} does not exist; pass a model directory or its config.json")
    if not os.path.isfile(file):
        raise RelexInputError(f"--model {path} has no config.json; pass a model directory saved with save_pretrained "
                              "or its config.json")
    try:
        cfg = read_json(file)
    except (OSError, ValueError) as e:
        raise RelexInputError(
            f"--model {file} is not a readable JSON config ({e}); pass a model's config.json"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise RelexInputError(f"--model {file} has no 'model_type'; pass a transformers model config (config.json of "
                              "a model saved with save_pretrained)")
    check_config_sizes(cfg, file)
    return cfg


# The sizes a model's shapes are built from: a field named like these must be a whole number (>= 1 for the first
# group, >= 0 for other counts), or the plan would be computed from a negative, zero or non-numeric size.
POSITIVE_SIZE = re.compile(r"(_size|_dim|^num_hidden_layers|^num_attention_heads|^num_key_value_heads|^n_layer|^n_head"
                           r"|^n_embd|^n_positions|^max_position_embeddings)$")
COUNT = re.compile(r"^(num_|n_)|_layers$|_heads$|_experts$")
MAX_CONFIG_SIZE = 1 << 40


def check_config_sizes(cfg: dict, file: str, where: str = ""):
    """Every size-like field of a model config (and of its nested configs, e.g. ``text_config``) is a whole number
    in range: one :class:`RelexInputError` naming the file and the field otherwise."""
    for key, value in cfg.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            check_config_sizes(value, file, name + ".")
            continue
        positive = bool(POSITIVE_SIZE.search(key))
        if value is None or not (positive or COUNT.search(key)):
            continue
        lo = 1 if positive else 0
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_CONFIG_SIZE:
            raise RelexInputError(f"--model {file}: {name} is {value!r:.40}, expected a whole number between {lo} and "
                                  f"{MAX_CONFIG_SIZE:,}; fix the config (a model's sizes are positive whole numbers)")


def count_parameters(path: str) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """Build the causal LM of ``path``'s ``config.json`` on the meta device (no weights, no memory) and list its
    trainable floating-point parameters as the callback tracks them: ``named_parameters`` (tied weights once, e.g.
    ``lm_head`` tied to ``embed_tokens``). Returns ``([(name, shape), ...], dtype name)``."""
    cfg = dict(read_model_config(path))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError, RuntimeError, AttributeError, ZeroDivisionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RelexInputError(
            f"--model {path}: transformers cannot build a causal LM from this config ({msg})"
        ) from None
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).replace("torch.", "")
    return named, dtype


# ------------------------------------------------------------------------------------------- a live run
def _local_world_size(world: int) -> int:
    """Processes on this node: ``LOCAL_WORLD_SIZE`` (set by torchrun and accelerate launch), else the whole world."""
    v = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        n = int(v) if v else world
    except ValueError:
        n = world
    return n if 1 <= n <= world and world % n == 0 else world


@dataclass(frozen=True)
class NodeFigures:
    """A node's figures given to :func:`plan_for_run` instead of measured (a plan fed with another machine's figures,
    e.g. a device's on a machine without one).

    Args:
        local_world_size (`int`, *optional*): processes per node (default ``LOCAL_WORLD_SIZE``).
        device_memory (`tuple[int, int]`, *optional*): ``(free, total)`` bytes of the device instead of
            ``torch.cuda.mem_get_info``.
        host_memory / disk_free (`int`, *optional*): the node's available host memory and the output file system's
            free bytes instead of measuring them.
    """

    local_world_size: Optional[int] = None
    device_memory: Optional[tuple[int, int]] = None
    host_memory: Optional[int] = None
    disk_free: Optional[int] = None


def plan_for_run(settings, specs, topology, trainer_args=None, *, elements: Optional[int] = None, device=None,
                 label: str = "", out_dir: Optional[str] = None, optimizer=None,
                 given: NodeFigures = NodeFigures()) -> MemoryPlan:
    """The plan of a live run at ``on_train_begin``, before the store is allocated: what ``storage="auto"`` should
    pick, and how many ring slots.

    Measured here: the device's total and free memory (everything already on it - model, optimizer states, an awake
    colocated vLLM engine - counts as the trainer's claim; an engine in sleep mode, which TRL puts to sleep right after
    creating it, is added as ``vllm_gpu_memory_utilization`` of the device), the node's available host memory (shared
    by ``LOCAL_WORLD_SIZE`` processes), the output directory's free disk.

    Args:
        settings (`RelexSettings`): the window (``steps``, ``dtype``, ``storage``, ``fold_rank``, ``max_buffer_bytes``,
            ``output_dir``).
        specs (`list[TensorSpec]`): this process's tracked pieces.
        topology (`Topology`): mode and world size.
        trainer_args (`TrainingArguments`, *optional*): read for TRL's ``use_vllm``, ``vllm_mode``,
            ``vllm_gpu_memory_utilization``, ``vllm_enable_sleep_mode`` (absent fields: no vLLM).
        elements (`int`, *optional*): the largest process's tracked elements. In a distributed run pass the maximum
            over processes (one all-reduce of a scalar) so every process plans the same tier and slots; defaults to
            this process's.
        device (`torch.device`, *optional*): the parameters' device (default: CUDA's current device when CUDA is
            available, else the CPU).
        out_dir (`str`, *optional*): where the disk tier would live (default ``settings.output_dir``).
        optimizer (*optional*): the trainer's optimizer; what its first step will still allocate on the device
            (gradients, lazily created states: :func:`pending_training_bytes`) is claimed with the measured memory,
            so the ring holds at steady state, not only at ``on_train_begin``.
        given (`NodeFigures`, *optional*): the node's figures to use instead of measuring them (processes per node,
            device, host and disk memory).

    Returns:
        :class:`MemoryPlan` (``.tier``, ``.slots``, ``.folded``, ``.format()`` for the log).
    """
    import torch

    from .tiers import available_disk_bytes, available_host_bytes

    D = int(elements) if elements is not None else sum(s.local_numel for s in specs)
    world = int(getattr(topology, "world", 1))
    mode = getattr(topology, "mode", "single")
    device_memory, host_memory, disk_free = given.device_memory, given.host_memory, given.disk_free
    local = given.local_world_size or _local_world_size(world)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda" or device_memory is not None
    gpu_memory = trainer = None
    pending = 0
    if cuda:
        free, total = device_memory if device_memory is not None else torch.cuda.mem_get_info(device)
        gpu_memory, trainer = int(total), int(total - free)
        if optimizer is not None:
            pending, _ = pending_training_bytes(optimizer, device if device.type == "cuda" else None)
    a = trainer_args
    use_vllm = bool(getattr(a, "use_vllm", False))
    vllm_mode = getattr(a, "vllm_mode", "colocate")
    util = float(getattr(a, "vllm_gpu_memory_utilization", 0.3) or 0.3)
    asleep = bool(getattr(a, "vllm_enable_sleep_mode", False))
    # theta_0's dtype: the recorded values' (float32 for the fp32 master weights of 16-bit parameters)
    dtypes = {s.record_dtype for s in specs}
    pdt = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).replace("torch.", "")
    out = out_dir or getattr(settings, "output_dir", None)
    disk = disk_free if disk_free is not None else (available_disk_bytes(out) if out else None)
    # host: what is available now on the node, as if the node's processes had not allocated yet (each process plans
    # before allocating); pinned memory is not swappable, so only a fraction of it is offered
    host = host_memory if host_memory is not None else available_host_bytes()
    win = PlanWindow(
        window=len(settings.steps), elements=D, mode=mode if world > 1 else "single", world_size=world,
        local_world_size=local, dtype=settings.dtype, param_dtype=pdt, fold_rank=settings.fold_rank,
        storage=settings.storage, max_buffer_bytes=settings.max_buffer_bytes,
        rank=int(getattr(settings, "rank", 1) or 1), largest_piece=max((s.local_numel for s in specs), default=None))
    machine = PlanMachine(gpu_memory=gpu_memory, trainer_gpu_bytes=trainer, trainer_pending_bytes=pending,
                          use_vllm=use_vllm, vllm_mode=vllm_mode, vllm_gpu_memory_utilization=util,
                          vllm_claimed=not asleep, host_memory=host, disk_free=disk, cuda=cuda)
    return plan_memory(win, machine, label=label)
