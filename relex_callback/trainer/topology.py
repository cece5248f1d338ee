"""Topology of a run: which process holds which bytes, and the few collectives. No file is written here.

Modes (detected from the model handed to the callback and from ``torch.distributed``):

- ``single``: one process (or a world of one).
- ``replicated``: DDP, DeepSpeed ZeRO-1/2 in fp32: every process holds every parameter. The tracked tensors are
  divided among processes by size (greedy: largest first onto the least loaded one); each records, solves and
  writes only its share, whole. No collective is needed to solve.
- ``zero12``: DeepSpeed ZeRO-1/2 with bf16 / fp16 mixed precision: the optimizer's fp32 master weights are
  partitioned, each process holding a contiguous flat range of the parameters (``param._hp_mapping``); each process
  records its own fragment of every tensor (a contiguous flat range, as in ``zero3``; the ranges are exchanged once,
  when tracking starts).
- ``zero3``: DeepSpeed ZeRO-3: each process records its own flat partition (without DeepSpeed's padding): elements
  ``[r * p, r * p + local_numel)`` of the flattened tensor, ``r`` its process rank, ``p`` the partition size.

What is recorded: the values the optimizer updates. Under DeepSpeed mixed precision those are the fp32 master
weights (ZeRO-3: ``deepspeed.utils.safe_get_local_fp32_param``, this process's fp32 partition; ZeRO-1/2: the fp32
fragment ``param._hp_mapping.hp_fragment``), not the 16-bit parameters, which are re-derived from them by rounding
after each step: at a small learning rate most 16-bit elements do not move from one step to the next, and their
trajectory would be rounding noise. Where no fp32 master exists (fp32 training; bf16 training without DeepSpeed)
the parameters themselves are recorded. A DeepSpeed run with 16-bit parameters whose fp32 masters cannot be found is
refused before step 1. :attr:`Topology.recorded` says which (``report.json["recorded"]``). The checkpoints are
written in the parameters' dtype (``TensorSpec.dtype``); theta_0 is kept in the recorded dtype.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard``: each process records ``DTensor.to_local()`` of a ``Shard(0)``
  parameter, flattened (a contiguous flat range too).

In the sharded modes the ``[S, T, T]`` Gram matrices of all tensors are summed over processes with ONE all-reduce
(:meth:`Topology.reduce_grams`); the eigenpairs are then identical everywhere and each process computes its own
slice of every direction ``v``. For writing, every checkpoint key gets a writing process (:meth:`Topology.write_plan`:
tracked tensors of the replicated mode stay where they are tracked, everything else is balanced by bytes), and
:meth:`Topology.gather_owned` brings the pieces of each sharded tensor to its writer one tensor at a time
(``dist.gather``; never the whole model on one process). The files are written by
:class:`relex_callback.files.writers.ShardedWriter`.

Names: ``process_rank`` / ``world`` are the process's place in the job; the SVD rank (directions per tensor) is
``Solution.rank`` and never appears here under that name alone.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import torch

from ..core import noise as _noise
from ..core.backtest import combine
from ..core.fit import Fit
from ..core.solver import Solution
from ..errors import RelexInputError
from ..params import TensorSpec, TrackedTensor, plain_tracked
from ..files.checkpoints import checkpoint_keys, tensor_bytes

logger = logging.getLogger("relex_callback")


def _dist():
    import torch.distributed as dist

    return dist


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def is_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` is (or holds, or is held by) PyTorch's first FSDP (``FullyShardedDataParallel``, accelerate's
    ``fsdp_version: 1``): a wrapper in the tree, or parameters FSDP1 has flattened (``use_orig_params=True`` leaves
    views of its flat shards in the original modules)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    # torch marks every tensor FSDP1 flattened (the flat parameter and the original parameters' views) with this
    return any(getattr(p, "_fsdp_flattened", False) and not _is_dtensor(p) for p in model.parameters())


FSDP1_REFUSAL = (
    "RelexCallback does not support FSDP1 (torch's FullyShardedDataParallel; accelerate's fsdp_version: 1): its "
    "parameters are flattened shards whose layout changes with the wrapping policy. Use FSDP2 (fsdp_version: 2 in the "
    "accelerate config, or torch.distributed.fsdp.fully_shard), DeepSpeed ZeRO-3, or DDP"
)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _has_zero12_master(p) -> bool:
    """A 16-bit parameter DeepSpeed's ZeRO-1/2 (or BF16) optimizer linked to its fp32 master partition."""
    return p.requires_grad and p.dtype in LOW_PRECISION and hasattr(p, "_hp_mapping")


def detect_mode(model: torch.nn.Module) -> str:
    """``single``, ``replicated``, ``zero12``, ``zero3`` or ``fsdp2`` (see the module docstring); FSDP1 is refused."""
    if is_fsdp1(model):
        raise RelexInputError(FSDP1_REFUSAL)
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return "single"
    if dist.get_world_size() == 1:
        # ZeRO-3 and FSDP2 keep their form in a world of one: ZeRO-3's module parameters are empty placeholders (the
        # values live in ds_tensor; recorded as whole tensors, nothing was recorded and the window failed at tcut as
        # "the weights did not move"), FSDP2's are DTensors (recorded as plain tensors, the first copy raised)
        for p in model.parameters():
            if hasattr(p, "ds_tensor"):
                return "zero3"
            if _is_dtensor(p):
                return "fsdp2"
        return "single"
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            return "zero3"
        if _is_dtensor(p):
            return "fsdp2"
    if any(_has_zero12_master(p) for p in model.parameters()):
        return "zero12"
    return "replicated"


def deepspeed_engine(trainer):
    """The ``DeepSpeedEngine`` a Trainer trains through, or ``None`` (no trainer, or not a DeepSpeed run)."""
    import sys

    if trainer is None or "deepspeed" not in sys.modules:
        return None
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - a broken install: not a DeepSpeed run this callback can see
        return None
    for m in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None)):
        if isinstance(m, DeepSpeedEngine):
            return m
    return None


def _zero12_stage(params, engine=None) -> str:
    """``ZeRO-1`` / ``ZeRO-2`` from the engine's configuration or the optimizer DeepSpeed linked to the parameters
    (``ZeRO-1/2`` if unknown)."""
    try:
        stage = int(engine.zero_optimization_stage()) if engine is not None else None
    except (AttributeError, TypeError, ValueError):
        stage = None
    if stage in (1, 2):
        return f"ZeRO-{stage}"
    for p in params:
        opt = getattr(p, "_zero_optimizer", None)
        if opt is not None and hasattr(opt, "partition_gradients"):
            return "ZeRO-2" if opt.partition_gradients else "ZeRO-1"
    return "ZeRO-1/2"


def no_master_refusal(name: str, p, engine=None) -> RelexInputError:
    what = (
        f" (its optimizer: {type(engine.optimizer).__name__})"
        if engine is not None and getattr(engine, "optimizer", None) is not None
        else ""
    )
    return RelexInputError(
        f"{name}: DeepSpeed trains this parameter in {_dtype_name(p.dtype)} but RelexCallback finds no fp32 master "
        f"weights for it{what}. Recording the {_dtype_name(p.dtype)} parameters would record their rounding, not "
        "the movement the optimizer makes (at a small learning rate most 16-bit elements do not change within the "
        "window). Use DeepSpeed ZeRO stage 1, 2 or 3 with fp32 master weights (zero_optimization.stage; no "
        "bf16.bf16_master_weights_and_grads), or train in fp32 (no bf16/fp16 mixed precision)"
    )


def balance(sizes: Sequence[int], world: int, loads: Optional[list] = None) -> list[int]:
    """Greedy balanced assignment: items by decreasing size (ties: original order) onto the least loaded rank (ties:
    the lower rank). Deterministic, so every rank computes the same plan. ``loads`` is updated in place."""
    loads = loads if loads is not None else [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += sizes[i]
    return owner


class Topology:
    """This process's view of a run: mode, process rank, world size, what it tracks, and the collectives.

    Args:
        mode (`str`): ``single``, ``replicated``, ``zero3`` or ``fsdp2``.
    """

    def __init__(self, mode: str):
        self.mode = mode
        dist = _dist()
        if mode == "single":
            self.process_rank, self.world = 0, 1
        else:
            self.process_rank, self.world = dist.get_rank(), dist.get_world_size()
        self.names: list[str] = []  # every tracked name, in model order (all ranks)
        self.owner: dict[str, int] = {}  # replicated: the rank that tracks each name
        self.ranges: dict[str, list[tuple[int, int]]] = {}  # sharded: (flat_start, numel) of every rank
        self.recorded: str = ""  # what is recorded, in words (report.json "recorded"); set by track()

    @classmethod
    def from_model(cls, model) -> "Topology":
        return cls(detect_mode(model))

    @property
    def is_distributed(self) -> bool:
        return self.mode != "single"

    @property
    def sharded(self) -> bool:
        return self.mode in ("zero12", "zero3", "fsdp2")

    def describe(self) -> str:
        return f"{self.mode} (process {self.process_rank} of {self.world})"

    # ------------------------------------------------------------------------------------- tracking
    def track(self, named: Sequence[tuple[str, torch.nn.Parameter]], engine=None) -> list[TrackedTensor]:
        """The tensors this rank records, with readers that return the local piece as a flat tensor: a view of the
        parameter, or of its fp32 master weights where DeepSpeed keeps them (see the module docstring). ``engine``:
        the ``DeepSpeedEngine`` of the run, if any (:func:`deepspeed_engine`): a DeepSpeed run with 16-bit
        parameters and no fp32 masters found is refused."""
        self.names = [n for n, _ in named]
        if self.mode == "zero3":
            return self._track_all_zero3(named)
        if self.mode == "zero12":
            return self._track_zero12(named, engine)
        if self.mode == "fsdp2":
            self.recorded = f"parameters ({', '.join(sorted({_dtype_name(p.dtype) for _, p in named}))})"
            return [self._track_fsdp2(n, p) for n, p in named]
        # single, replicated: whole tensors
        masters = {n: self._whole_master(n, p, engine) for n, p in named}
        if any(m is not None for m in masters.values()):
            stage = ("ZeRO-3" if any(hasattr(p, "ds_tensor") for _, p in named)
                     else _zero12_stage([p for _, p in named], engine))
            self.recorded = f"fp32 master weights (DeepSpeed {stage} optimizer partitions)"
        else:
            self.recorded = f"parameters ({', '.join(sorted({_dtype_name(p.dtype) for _, p in named}))})"
        if self.mode == "replicated":
            if len(named) < self.world:
                raise RelexInputError(
                    f"{len(named)} tracked tensor(s) for {self.world} ranks: with replicated parameters (DDP, "
                    "ZeRO-1/2) "
                    "every rank needs at least one tensor; track more tensors (include/exclude) or use fewer ranks"
                )
            owners = balance([p.numel() for _, p in named], self.world)
            self.owner = {n: r for (n, _), r in zip(named, owners)}
            named = [(n, p) for (n, p), r in zip(named, owners) if r == self.process_rank]
        out = plain_tracked(named)
        for t in out:
            m = masters[t.spec.name]
            if m is not None:  # one process holding every fp32 master (ZeRO-1/2 in a world of one)
                t.read, t.live, t.spec.recorded_dtype = m, t.read, torch.float32
        return out

    @staticmethod
    def _whole_master(name, p, engine):
        """A reader of the whole fp32 master of ``p`` when this process holds all of it (DeepSpeed ZeRO-1/2 in one
        process), else ``None`` for a parameter that is its own master; refuses a DeepSpeed 16-bit parameter whose
        master is elsewhere or nowhere."""
        if p.dtype not in LOW_PRECISION:
            return None
        if hasattr(p, "ds_tensor") and getattr(p, "_z3_optimizer", None) is not None:  # ZeRO-3 in one process
            from deepspeed.utils import safe_get_local_fp32_param

            n = int(p.ds_numel)
            m = safe_get_local_fp32_param(p)
            if m is None or m.dtype != torch.float32 or m.numel() < n:
                raise no_master_refusal(name, p, engine)
            return lambda: safe_get_local_fp32_param(p).reshape(-1)[:n]
        if hasattr(p, "_hp_mapping"):
            m = p._hp_mapping
            if m is None or m.lp_fragment_address.numel != p.numel() or m.hp_fragment.dtype != torch.float32:
                raise no_master_refusal(name, p, engine)
            n = p.numel()

            def read():
                frag = p._hp_mapping.hp_fragment.reshape(-1)
                if frag.numel() != n:
                    raise RuntimeError(f"relex: the fp32 master of {name} now has {frag.numel()} elements, not {n}")
                return frag

            return read
        if engine is not None:
            raise no_master_refusal(name, p, engine)
        return None  # 16-bit training without DeepSpeed: the parameters are what the optimizer updates

    def _track_all_zero3(self, named) -> list[TrackedTensor]:
        out = [self._track_zero3(n, p) for n, p in named]
        if any(t.live is not None for t in out):
            self.recorded = "fp32 master weights (DeepSpeed ZeRO-3 optimizer partitions)"
        else:
            self.recorded = f"parameters ({', '.join(sorted({_dtype_name(t.spec.dtype) for t in out}))})"
        return out

    def _track_zero3(self, name, p) -> TrackedTensor:
        shape = tuple(p.ds_shape)
        numel = int(p.ds_numel)
        part = int(p.ds_tensor.ds_numel)  # partition size, the same on every rank (the last one is padded)
        self.ranges[name] = [(min(r * part, numel), max(0, min(part, numel - r * part))) for r in range(self.world)]
        start, n = self.ranges[name][self.process_rank]

        def live():  # the 16-bit (or fp32) partition the parameter is gathered from
            return p.ds_tensor.data.reshape(-1)[:n]

        spec = TensorSpec(name=name, shape=shape, dtype=p.ds_tensor.dtype, local_numel=n, flat_start=start)
        if p.ds_tensor.dtype not in LOW_PRECISION:
            return TrackedTensor(spec=spec, read=live, param=p)
        # mixed precision: this process's fp32 partition of the optimizer's master weights (the same flat range)
        if getattr(p, "_z3_optimizer", None) is None:
            raise no_master_refusal(name, p.ds_tensor)
        from deepspeed.utils import safe_get_local_fp32_param

        m = safe_get_local_fp32_param(p)
        if m is None or m.dtype != torch.float32 or m.numel() < n:
            raise no_master_refusal(name, p.ds_tensor)

        def read():
            return safe_get_local_fp32_param(p).reshape(-1)[:n]

        spec.recorded_dtype = torch.float32
        return TrackedTensor(spec=spec, read=read, param=p, live=live)

    def _track_zero12(self, named, engine=None) -> list[TrackedTensor]:
        """ZeRO-1/2 with 16-bit parameters: each process records its fragment of every tensor's fp32 master
        (``param._hp_mapping``: a contiguous flat range of the parameter, possibly empty). The ranges of every
        process are exchanged once (one ``all_gather_object``) and must tile each tensor in process order."""
        mine, err, device = {}, None, None
        for n, p in named:
            m = getattr(p, "_hp_mapping", "absent")
            if isinstance(m, str):  # not linked to the optimizer's partitions
                err = err or str(no_master_refusal(n, p))
                mine[n] = (0, 0)
            elif m is None:
                mine[n] = (0, 0)  # no fragment of it in this process's partition
            elif m.hp_fragment.dtype != torch.float32:
                err = err or str(no_master_refusal(n, p))
                mine[n] = (0, 0)
            else:
                mine[n] = (int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))
                device = device or m.hp_fragment.device
        allr = self.gather_objects({"ranges": mine, "error": err})
        errors = [(r, a["error"]) for r, a in enumerate(allr) if a["error"]]
        if errors:  # the same refusal on every process (one of them alone could not say it)
            raise RelexInputError(err or f"{errors[0][1]} (found on process {errors[0][0]})")
        out = []
        for n, p in named:
            pos, ranges = 0, []
            for r in range(self.world):
                st, k = allr[r]["ranges"][n]
                if k and st != pos:
                    raise RelexInputError(
                        f"{n}: DeepSpeed's fp32 master partitions of this parameter do not tile it in process order "
                        f"({[a['ranges'][n] for a in allr]}); this layout (expert or model parallel groups) is not "
                        "supported")
                ranges.append((pos, k))
                pos += k
            if pos != p.numel():
                raise RelexInputError(f"{n}: DeepSpeed's fp32 master partitions of this parameter hold {pos} of its "
                                      f"{p.numel()} elements; this layout is not supported")
            self.ranges[n] = ranges
            start, k = ranges[self.process_rank]
            out.append(self._zero12_piece(n, p, start, k, device))
        self.recorded = (f"fp32 master weights (DeepSpeed {_zero12_stage([p for _, p in named], engine)} optimizer "
                         "partitions)")
        return out

    @staticmethod
    def _zero12_piece(name, p, start, k, device) -> TrackedTensor:
        if k:
            def read():
                frag = p._hp_mapping.hp_fragment.reshape(-1)
                if frag.numel() != k:
                    raise RuntimeError(f"relex: the fp32 master fragment of {name} now has {frag.numel()} elements, "
                                       f"not {k}")
                return frag
        else:
            empty = torch.empty(0, dtype=torch.float32, device=device or p.device)

            def read():
                return empty

        def live():
            return p.data.reshape(-1)[start : start + k]

        spec = TensorSpec(name=name, shape=tuple(p.shape), dtype=p.dtype, local_numel=k, flat_start=start,
                          recorded_dtype=torch.float32)
        return TrackedTensor(spec=spec, read=read, param=p, live=live)

    def _track_fsdp2(self, name, p) -> TrackedTensor:
        from torch.distributed.tensor import Shard

        dt = p.data if not hasattr(p, "to_local") else p
        placements = tuple(dt.placements)
        if (
            dt.device_mesh.ndim != 1
            or len(placements) != 1
            or not (isinstance(placements[0], Shard) and placements[0].dim == 0)
        ):
            raise RelexInputError(
                f"{name}: FSDP2 parameter with placements {placements} on a {dt.device_mesh.ndim}-D mesh; "
                "RelexCallback "
                "supports fully_shard's default Shard(0) over one mesh dimension (no HSDP / tensor parallel)"
            )
        shape = tuple(dt.shape)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        chunk = -(-shape[0] // self.world) if shape else 0
        ranges = []
        for r in range(self.world):
            r0 = min(r * chunk, shape[0])
            r1 = min((r + 1) * chunk, shape[0])
            ranges.append((r0 * row, (r1 - r0) * row))
        self.ranges[name] = ranges
        start, n = ranges[self.process_rank]
        if dt.to_local().numel() != n:
            raise RelexInputError(
                f"{name}: local shard has {dt.to_local().numel()} elements, expected {n} from torch.chunk over "
                f"{self.world} ranks; this sharding layout is not supported"
            )

        def read():
            return dt.to_local().detach().reshape(-1)

        spec = TensorSpec(name=name, shape=shape, dtype=dt.dtype, local_numel=n, flat_start=start)
        return TrackedTensor(spec=spec, read=read, param=p)

    # ------------------------------------------------------------------------------------ collectives
    def comm_device(self) -> torch.device:
        dist = _dist()
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks in float64 with one all-reduce; every rank gets the same result (on ``x``'s device).
        In a single process: ``x`` in float64, unchanged."""
        if not self.is_distributed:
            return x.to(torch.float64)
        dist = _dist()
        buf = x.to(device=self.comm_device(), dtype=torch.float64).contiguous()
        dist.all_reduce(buf)
        return buf.to(x.device)

    def reduce_grams(self, G: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Sum the stacked ``[S, T, T]`` Grams over ranks: one all-reduce for every tensor (float64). ``G=None``: this
        process failed to compute its Grams; every process learns it first (one flag), the failed one gets ``None``
        back and the others raise, so none waits in an all-reduce the failed one never joins."""
        if not self.all_ok(G is not None):
            if G is None:
                return None
            raise RuntimeError("relex: another process failed computing its Grams at the end of the window (its "
                               "error says why); this process stops too")
        dist = _dist()
        buf = G.to(device=self.comm_device(), dtype=torch.float64).contiguous()
        dist.all_reduce(buf)
        return buf

    def validation_sums(self, partial: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        """Validation mode across ranks: ``partial`` maps each tensor this rank holds a piece of to its ``width``
        partial sums (e.g. ``<real, extrap>``, ``||real||^2``, ``||extrap||^2``). A sum over a tensor's pieces is a
        sum over ranks, so the rows are stacked in :attr:`names` order (the model's order, the same on every rank;
        zeros for tensors held elsewhere) and summed with ONE all-reduce. Returns ``[len(names), width]`` float64 on
        CPU, identical on every rank."""
        rows = {n: j for j, n in enumerate(self.names)}
        unknown = [n for n in partial if n not in rows]
        if unknown:
            raise RuntimeError(f"relex: validation sums for untracked tensors {unknown[:3]}")
        out = torch.zeros(len(self.names), width, dtype=torch.float64)
        for n, v in partial.items():
            out[rows[n]] += v.to(device="cpu", dtype=torch.float64).reshape(-1)
        return self.reduce_sum(out).cpu()

    def sum_ints(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a small int64 tensor over processes (one all-reduce; the store's per-step verdicts). CPU result."""
        if not self.is_distributed:
            return x
        dist = _dist()
        buf = x.to(device=self.comm_device(), dtype=torch.int64).contiguous()
        dist.all_reduce(buf)
        return buf.cpu()

    def first_holders(self, flags: dict) -> dict:
        """``flags``: tracked name -> True where this process's piece of it fails a check (e.g. holds NaN/Inf).
        Returns name -> the lowest process rank that flagged it, for every name any process flagged; identical on
        every process (ONE all-reduce, MIN, over a vector in :attr:`names` order)."""
        if not self.is_distributed:
            return {n: 0 for n, bad in flags.items() if bad}
        dist = _dist()
        rows = {n: j for j, n in enumerate(self.names)}
        buf = torch.full((len(self.names),), self.world, dtype=torch.int64)
        for n, bad in flags.items():
            if bad:
                buf[rows[n]] = self.process_rank
        buf = buf.to(self.comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        return {self.names[j]: int(r) for j, r in enumerate(buf.cpu().tolist()) if r < self.world}

    def max_int(self, x: int) -> int:
        """The largest ``x`` over processes (sizes that every process must plan alike)."""
        if not self.is_distributed:
            return int(x)
        dist = _dist()
        buf = torch.tensor([int(x)], dtype=torch.int64, device=self.comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return int(buf.item())

    def all_ok(self, ok: bool) -> bool:
        """Barrier that also tells every rank whether every rank succeeded."""
        dist = _dist()
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.comm_device())
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    def broadcast_object(self, obj):
        dist = _dist()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.is_distributed:
            self.all_ok(True)

    def trajectory_dir(self, directory: str) -> str:
        """Per-rank subdirectory for saved trajectories (resume) and the disk tier."""
        return os.path.join(directory, f"rank-{self.process_rank}") if self.is_distributed else directory

    def gather_objects(self, obj) -> list:
        dist = _dist()
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ---------------------------------------------------------------------------- who writes what, and gathers
    def report_solution(self, sol):
        """A :class:`Solution` over every tracked tensor (whole specs, no directions) for the report: the local one
        in the sharded modes (its statistics are global after the all-reduce), gathered rows otherwise."""
        fields = ("sigma", "coeffs", "slope", "intercept", "r2", "total", "last_sq")
        if self.sharded:
            whole = [TensorSpec(s.name, s.shape, s.dtype, s.numel) for s in sol.specs]
            return Solution(specs=whole, steps=sol.steps, fit_start=sol.fit_start, rank=sol.rank,
                            **{f: getattr(sol, f) for f in fields}, V=None, method=sol.method, seconds=sol.seconds,
                            fallbacks=sol.fallbacks, backtest=sol.backtest, curve=sol.curve, selection=sol.selection,
                            noise=sol.noise,  # from the all-reduced Grams: the whole window's already
                            clock=sol.clock)
        curve = sol.curve
        mine = {s.name: (s, {f: getattr(sol, f)[i].cpu() for f in fields},
                         curve[i].to_json() if curve is not None else None) for i, s in enumerate(sol.specs)}
        allr = self.gather_objects(mine)
        merged = {}
        for d in allr:
            merged.update(d)
        order = [n for n in self.names if n in merged]
        specs = [
            TensorSpec(merged[n][0].name, merged[n][0].shape, merged[n][0].dtype, merged[n][0].numel) for n in order
        ]
        stacked = {f: torch.stack([merged[n][1][f] for n in order]) for f in fields}
        secs = self.gather_objects(sol.seconds)
        curves = [merged[n][2] for n in order]
        bts = self.gather_objects(sol.backtest)  # each process's tensors: additive sums, combined (the same everywhere)
        return Solution(specs=specs, steps=sol.steps, fit_start=sol.fit_start, rank=sol.rank, **stacked, V=None,
                        method=sol.method, seconds={k: max(s.get(k, 0.0) for s in secs) for k in sol.seconds},
                        fallbacks=sum(self.gather_objects(sol.fallbacks)),
                        backtest=combine(bts) if all(b is not None for b in bts) else None,
                        curve=Fit.stack([Fit.from_json(c) for c in curves]) if all(curves) else None,
                        selection=sol.selection, clock=sol.clock,
                        noise=_noise.from_gathered(self.gather_objects(_noise.gather_form(sol.noise))))

    def write_plan(self, model) -> dict:
        """Which process writes each checkpoint key: ``{"keys", "meta": key -> (shape, dtype), "owner": key ->
        process rank, "sd": the model's state_dict}``. Deterministic, so every process computes the same plan."""
        sd = model.state_dict(keep_vars=True)
        keys = checkpoint_keys(model, sd)
        meta = {}
        for k in keys:
            t = sd[k]
            shape = tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)
            # the checkpoints' dtype: the parameter's (ZeRO-3: its 16-bit partition's), whatever is recorded (an fp32
            # master is cast to it when a horizon is written)
            dtype = t.ds_tensor.dtype if hasattr(t, "ds_tensor") else t.dtype
            meta[k] = (shape, dtype)
        tracked = set(self.names)
        missing = [n for n in self.names if n not in meta]
        if missing:
            raise RelexInputError(f"tracked tensors {missing[:3]} are not in the model's state_dict keys")
        owner: dict[str, int] = {}
        loads = [0] * self.world
        if self.mode == "replicated":
            for k in keys:
                if k in tracked:
                    owner[k] = self.owner[k]
                    loads[owner[k]] += tensor_bytes(*meta[k])
        rest = [k for k in keys if k not in owner]
        for k, r in zip(rest, balance([tensor_bytes(*meta[k]) for k in rest], self.world, loads)):
            owner[k] = r
        return {"keys": keys, "meta": meta, "owner": owner, "sd": sd}

    @torch.no_grad()
    def gather_owned(self, store, sol, plan):
        """Every tracked tensor this process writes (``plan["owner"]``), whole: returns ``(owned, theta0, extra)`` with
        ``owned`` a :class:`Solution` over a small local arena of those tensors, ``theta0`` their flat theta_0 (in
        ``owned.specs`` order) and ``extra`` the untracked sharded keys this process writes, gathered. A collective:
        every process calls it."""
        dist = _dist()
        owner, meta, sd = plan["owner"], plan["meta"], plan["sd"]
        local = {s.name: i for i, s in enumerate(sol.specs)}
        svd_rank = sol.rank
        mine_names = [n for n in self.names if owner[n] == self.process_rank]
        theta0_full: dict[str, torch.Tensor] = {}
        v_full: dict[str, torch.Tensor] = {}
        dev = self.comm_device()
        for n in self.names:  # the same order on every rank: the gathers pair up
            if not self.sharded:
                if owner[n] == self.process_rank:
                    i = local[n]
                    theta0_full[n] = store.theta0_of(sol.specs[i]).reshape(-1).cpu()
                    v_full[n] = sol.direction(i).cpu()
                continue
            i = local[n]
            spec = sol.specs[i]
            pad = max(k for _, k in self.ranges[n])
            # theta_0 travels in the recorded dtype (fp32 master weights stay float32 up to the horizon's float32 sum)
            pack_dtype = torch.promote_types(torch.promote_types(spec.record_dtype, sol.V.dtype), torch.float32)
            buf = torch.zeros(1 + svd_rank, pad, dtype=pack_dtype, device=dev)
            if spec.local_numel:
                buf[0, : spec.local_numel] = store.theta0_of(spec).reshape(-1).to(device=dev, dtype=pack_dtype)
                buf[1:, : spec.local_numel] = sol.direction(i).to(device=dev, dtype=pack_dtype)
            dst = owner[n]
            if self.process_rank == dst:
                parts = [torch.empty_like(buf) for _ in range(self.world)]
                dist.gather(buf, parts, dst=dst)
                pieces = [p[:, :k].cpu() for p, (_, k) in zip(parts, self.ranges[n])]
                full = torch.cat(pieces, dim=1)
                theta0_full[n] = full[0].to(spec.record_dtype)
                v_full[n] = full[1:].to(sol.V.dtype)
                del parts, pieces, full
            else:
                dist.gather(buf, None, dst=dst)
        # untracked keys: ZeRO-3 / FSDP2 parameters are gathered (collectives: every rank, one at a time), as the
        # model holds them (16-bit under mixed precision: what a checkpoint of the model at tcut holds)
        extra: dict[str, torch.Tensor] = {}
        tracked = set(self.names)
        for k in plan["keys"]:
            if k in tracked:
                continue
            t = sd[k]
            if hasattr(t, "ds_tensor"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    if owner[k] == self.process_rank:
                        extra[k] = t.detach().to("cpu").clone()
            elif _is_dtensor(t):
                full = (t.data if not hasattr(t, "full_tensor") else t).full_tensor()
                if owner[k] == self.process_rank:
                    extra[k] = full.detach().to("cpu").clone()
                del full
        # this rank's tracked tensors, whole, as a Solution over a small local arena (state file + extrapolation)
        specs, off = [], 0
        for n in mine_names:
            shape, dtype = meta[n]
            s = TensorSpec(n, shape, dtype, math.prod(shape), 0, off, recorded_dtype=sol.specs[local[n]].recorded_dtype)
            off += s.local_numel
            specs.append(s)
        V = torch.zeros(svd_rank, off, dtype=sol.V.dtype)
        for s in specs:
            V[:, s.offset : s.offset + s.local_numel] = v_full.pop(s.name)
        rows = torch.tensor([local[n] for n in mine_names], dtype=torch.long)
        pick = lambda x: x.index_select(0, rows) if len(mine_names) else x[:0]  # noqa: E731
        owned = Solution(
            specs=specs, steps=sol.steps, fit_start=sol.fit_start, rank=svd_rank, sigma=pick(sol.sigma),
            coeffs=pick(sol.coeffs), slope=pick(sol.slope), intercept=pick(sol.intercept), r2=pick(sol.r2),
            total=pick(sol.total), last_sq=pick(sol.last_sq), V=V, method=sol.method,
            curve=sol.curve[rows] if sol.curve is not None and len(mine_names) else None, clock=sol.clock,
        )
        theta0 = [theta0_full.pop(s.name) for s in specs]
        return owned, theta0, extra

