"""Distributed runs: which bytes each rank keeps, one collective for the solve, every rank writes its share.

Modes (detected from the model handed to the callback and from ``torch.distributed``):

- ``single``: one process (or a world of one): the plain path of :mod:`engine`.
- ``replicated``: DDP, DeepSpeed ZeRO-1/2: every rank holds every parameter. The tracked tensors are divided among
  ranks by size (greedy: largest first onto the least loaded rank); each rank records, solves and writes only its
  share, whole. No collective is needed to solve.
- ``zero3``: DeepSpeed ZeRO-3: each rank records its own flat partition ``param.ds_tensor`` (without DeepSpeed's
  padding): elements ``[rank * p, rank * p + local_numel)`` of the flattened tensor, ``p`` the partition size.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard``: each rank records ``DTensor.to_local()`` of a ``Shard(0)``
  parameter, flattened (a contiguous flat range too).

In the sharded modes, the ``[S, T, T]`` Gram matrices of all tensors are summed over ranks with ONE all-reduce; the
eigenpairs are then identical everywhere and each rank computes its own slice of every direction ``v``.

Writing (end of window): every checkpoint key gets a writing rank (tracked tensors of the replicated mode: the rank
that tracks them; everything else: greedy balanced by bytes). For a sharded tracked tensor, theta_0 and ``v`` pieces
are gathered to its writer one tensor at a time (``dist.gather``, never the whole model on one rank); the writer
then computes every horizon from them. Untracked ZeRO-3 parameters are gathered one at a time with
``GatheredParameters`` (end of window only; never during training).

Each horizon ``step-H`` is written by all ranks into one temporary directory (each rank its own
``model-0000i-of-0000N.safetensors`` files); after every rank reported success (an all-reduce of a flag, which is
also the barrier), rank 0 writes ``model.safetensors.index.json``, config and tokenizer and renames the directory
into place. The state is sharded the same way, by tensor: ``relex_state-0000i-of-0000N.safetensors`` (each a valid
state file for the whole tensors its rank wrote) plus ``relex_state.index.json``, written last by rank 0 (the commit
point); :func:`relex_callback.state.load_state` reads either form.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from typing import Optional, Sequence

import torch

from .errors import RelexInputError
from .params import TensorSpec, TrackedTensor, plain_tracked
from .writer import checkpoint_keys, tensor_bytes, write_model_extras

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


def detect_mode(model: torch.nn.Module) -> str:
    """``single``, ``replicated``, ``zero3`` or ``fsdp2`` (see the module docstring)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return "single"
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            return "zero3"
        if _is_dtensor(p):
            return "fsdp2"
    return "replicated"


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


class DistContext:
    """This rank's view of a run: mode, rank, world size, what it tracks, and the distributed end of window.

    Args:
        mode (`str`): ``single``, ``replicated``, ``zero3`` or ``fsdp2``.
    """

    def __init__(self, mode: str):
        self.mode = mode
        dist = _dist()
        if mode == "single":
            self.rank, self.world = 0, 1
        else:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.names: list[str] = []  # every tracked name, in model order (all ranks)
        self.owner: dict[str, int] = {}  # replicated: the rank that tracks each name
        self.ranges: dict[str, list[tuple[int, int]]] = {}  # sharded: (flat_start, numel) of every rank

    @classmethod
    def from_model(cls, model) -> "DistContext":
        return cls(detect_mode(model))

    @property
    def is_distributed(self) -> bool:
        return self.mode != "single"

    @property
    def sharded(self) -> bool:
        return self.mode in ("zero3", "fsdp2")

    def describe(self) -> str:
        return f"{self.mode} (rank {self.rank} of {self.world})"

    # ------------------------------------------------------------------------------------- tracking
    def track(self, named: Sequence[tuple[str, torch.nn.Parameter]]) -> list[TrackedTensor]:
        """The tensors this rank records, with readers that return the live local piece as a flat view."""
        self.names = [n for n, _ in named]
        if self.mode == "single":
            return plain_tracked(named)
        if self.mode == "replicated":
            if len(named) < self.world:
                raise RelexInputError(
                    f"{len(named)} tracked tensor(s) for {self.world} ranks: with replicated parameters (DDP, ZeRO-1/2) "
                    "every rank needs at least one tensor; track more tensors (include/exclude) or use fewer ranks"
                )
            owners = balance([p.numel() for _, p in named], self.world)
            self.owner = {n: r for (n, _), r in zip(named, owners)}
            return plain_tracked([(n, p) for (n, p), r in zip(named, owners) if r == self.rank])
        if self.mode == "zero3":
            return [self._track_zero3(n, p) for n, p in named]
        return [self._track_fsdp2(n, p) for n, p in named]

    def _track_zero3(self, name, p) -> TrackedTensor:
        shape = tuple(p.ds_shape)
        numel = int(p.ds_numel)
        part = int(p.ds_tensor.ds_numel)  # partition size, the same on every rank (the last one is padded)
        self.ranges[name] = [(min(r * part, numel), max(0, min(part, numel - r * part))) for r in range(self.world)]
        start, n = self.ranges[name][self.rank]

        def read():
            return p.ds_tensor.data.reshape(-1)[:n]

        spec = TensorSpec(name=name, shape=shape, dtype=p.ds_tensor.dtype, local_numel=n, flat_start=start)
        return TrackedTensor(spec=spec, read=read, param=p)

    def _track_fsdp2(self, name, p) -> TrackedTensor:
        from torch.distributed.tensor import Shard

        dt = p.data if not hasattr(p, "to_local") else p
        placements = tuple(dt.placements)
        if dt.device_mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise RelexInputError(
                f"{name}: FSDP2 parameter with placements {placements} on a {dt.device_mesh.ndim}-D mesh; RelexCallback "
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
        start, n = ranges[self.rank]
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

    def reduce_grams(self, G: torch.Tensor) -> torch.Tensor:
        """Sum the stacked ``[S, T, T]`` Grams over ranks: one all-reduce for every tensor (float64)."""
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
        return os.path.join(directory, f"rank-{self.rank}") if self.is_distributed else directory

    # ------------------------------------------------------------------------------------- end of window
    def finalize(
        self,
        store,
        *,
        tcut: int,
        horizons: Sequence[int],
        out_dir: str,
        model,
        tokenizer=None,
        rank: int = 1,
        fit_start: Optional[int] = None,
        method: str = "auto",
        overwrite: bool = False,
        max_shard_size="50GB",
        report_extra: Optional[dict] = None,
    ):
        """Distributed counterpart of :func:`relex_callback.engine.finalize` (all ranks call it). Returns
        ``(solution, report)``: the solution covers this rank's pieces; the report covers every tensor."""
        from .engine import check_before_window, horizon_dir, solve_store, window_extra
        from .report import REPORT_NAME, build_report, write_report

        # every rank records the same steps and gets the same arguments, so every rank raises alike
        check_before_window(store, out_dir, horizons, overwrite, max_shard_size)
        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        self.barrier()
        sol, t_solve = solve_store(store, rank=rank, fit_start=fit_start, method=method,
                                   reduce=self.reduce_grams if self.sharded else None)
        t1 = time.perf_counter()
        plan = self._plan(model)
        owned, extra_tensors = self._collect(store, sol, plan)
        t_collect = time.perf_counter() - t1
        t2 = time.perf_counter()
        self._write_state(out_dir, owned, tcut)
        written = []
        for h in horizons:
            written.append(self._write_horizon(horizon_dir(out_dir, h), h, owned, extra_tensors, plan, model, tokenizer,
                                               overwrite=overwrite, max_shard_size=max_shard_size))
        t_write = time.perf_counter() - t2
        per_rank = self._gather_objects({"buffer_bytes": store.buffer_bytes, "elements": store.D})
        extra = window_extra(
            store, store.buffer_bytes, store.storage, t_solve, t_write, written, report_extra,
            buffer_bytes_per_rank=[d["buffer_bytes"] for d in per_rank],
            distributed={"mode": self.mode, "world_size": self.world}, gather_seconds=round(t_collect, 6),
        )
        report = build_report(self._report_solution(sol), tcut=tcut, horizons=horizons, extra=extra)
        if self.rank == 0:
            write_report(os.path.join(out_dir, REPORT_NAME), report)
        self.barrier()
        logger.info("relex[%s]: solved in %.2fs, gathered in %.2fs, wrote %d checkpoint(s) in %.2fs",
                    self.describe(), t_solve, t_collect, len(written), t_write)
        return sol, report

    def _gather_objects(self, obj) -> list:
        dist = _dist()
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _report_solution(self, sol):
        """A :class:`Solution` over every tracked tensor (whole specs, no directions) for the report: the local one
        in the sharded modes (its statistics are global after the all-reduce), gathered rows otherwise."""
        from .solver import Solution

        fields = ("sigma", "coeffs", "slope", "intercept", "r2", "total", "last_sq")
        if self.sharded:
            whole = [TensorSpec(s.name, s.shape, s.dtype, s.numel) for s in sol.specs]
            return Solution(specs=whole, steps=sol.steps, fit_start=sol.fit_start, rank=sol.rank,
                            **{f: getattr(sol, f) for f in fields}, V=None, method=sol.method, seconds=sol.seconds,
                            fallbacks=sol.fallbacks)
        mine = {s.name: (s, {f: getattr(sol, f)[i].cpu() for f in fields}) for i, s in enumerate(sol.specs)}
        allr = self._gather_objects(mine)
        merged = {}
        for d in allr:
            merged.update(d)
        order = [n for n in self.names if n in merged]
        specs = [TensorSpec(merged[n][0].name, merged[n][0].shape, merged[n][0].dtype, merged[n][0].numel) for n in order]
        stacked = {f: torch.stack([merged[n][1][f] for n in order]) for f in fields}
        secs = self._gather_objects(sol.seconds)
        return Solution(specs=specs, steps=sol.steps, fit_start=sol.fit_start, rank=sol.rank, **stacked, V=None,
                        method=sol.method, seconds={k: max(s.get(k, 0.0) for s in secs) for k in sol.seconds},
                        fallbacks=sum(self._gather_objects(sol.fallbacks)))

    # -- which rank writes which key
    def _plan(self, model) -> dict:
        sd = model.state_dict(keep_vars=True)
        keys = checkpoint_keys(model, sd)
        meta = {}
        for k in keys:
            t = sd[k]
            shape = tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)
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

    # -- bring every key this rank writes onto it, one tensor at a time
    @torch.no_grad()
    def _collect(self, store, sol, plan):
        from .solver import Solution

        dist = _dist()
        owner, meta, sd = plan["owner"], plan["meta"], plan["sd"]
        local = {s.name: i for i, s in enumerate(sol.specs)}
        r_ = sol.rank
        mine_names = [n for n in self.names if owner[n] == self.rank]
        theta0_full: dict[str, torch.Tensor] = {}
        v_full: dict[str, torch.Tensor] = {}
        dev = self.comm_device()
        for n in self.names:  # the same order on every rank: the gathers pair up
            if not self.sharded:
                if owner[n] == self.rank:
                    i = local[n]
                    theta0_full[n] = store.theta0_of(sol.specs[i]).reshape(-1).cpu()
                    v_full[n] = sol.direction(i).cpu()
                continue
            i = local[n]
            spec = sol.specs[i]
            pad = max(k for _, k in self.ranges[n])
            pack_dtype = torch.promote_types(torch.promote_types(spec.dtype, sol.V.dtype), torch.float32)
            buf = torch.zeros(1 + r_, pad, dtype=pack_dtype, device=dev)
            if spec.local_numel:
                buf[0, : spec.local_numel] = store.theta0_of(spec).reshape(-1).to(device=dev, dtype=pack_dtype)
                buf[1:, : spec.local_numel] = sol.direction(i).to(device=dev, dtype=pack_dtype)
            dst = owner[n]
            if self.rank == dst:
                parts = [torch.empty_like(buf) for _ in range(self.world)]
                dist.gather(buf, parts, dst=dst)
                pieces = [p[:, :k].cpu() for p, (_, k) in zip(parts, self.ranges[n])]
                full = torch.cat(pieces, dim=1)
                theta0_full[n] = full[0].to(spec.dtype)
                v_full[n] = full[1:].to(sol.V.dtype)
                del parts, pieces, full
            else:
                dist.gather(buf, None, dst=dst)
        # untracked keys: ZeRO-3 / FSDP2 parameters are gathered (collectives: every rank, one at a time)
        extra: dict[str, torch.Tensor] = {}
        tracked = set(self.names)
        for k in plan["keys"]:
            if k in tracked:
                continue
            t = sd[k]
            if hasattr(t, "ds_tensor"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    if owner[k] == self.rank:
                        extra[k] = t.detach().to("cpu").clone()
            elif _is_dtensor(t):
                full = (t.data if not hasattr(t, "full_tensor") else t).full_tensor()
                if owner[k] == self.rank:
                    extra[k] = full.detach().to("cpu").clone()
                del full
        # this rank's tracked tensors, whole, as a Solution over a small local arena (state file + extrapolation)
        specs, off = [], 0
        for n in mine_names:
            shape, dtype = meta[n]
            s = TensorSpec(n, shape, dtype, math.prod(shape), 0, off)
            off += s.local_numel
            specs.append(s)
        V = torch.zeros(r_, off, dtype=sol.V.dtype)
        for s in specs:
            V[:, s.offset : s.offset + s.local_numel] = v_full.pop(s.name)
        rows = torch.tensor([local[n] for n in mine_names], dtype=torch.long)
        pick = lambda x: x.index_select(0, rows) if len(mine_names) else x[:0]  # noqa: E731
        owned = Solution(
            specs=specs, steps=sol.steps, fit_start=sol.fit_start, rank=r_, sigma=pick(sol.sigma),
            coeffs=pick(sol.coeffs), slope=pick(sol.slope), intercept=pick(sol.intercept), r2=pick(sol.r2),
            total=pick(sol.total), last_sq=pick(sol.last_sq), V=V, method=sol.method,
        )
        owned.theta0 = [theta0_full.pop(s.name) for s in specs]
        return owned, extra

    # -- state file, sharded by tensor
    def _write_state(self, out_dir: str, owned, tcut: int):
        from .state import save_state, save_state_index, state_shard_name

        counts = self._gather_objects(len(owned.specs))
        files = [r for r in range(self.world) if counts[r] > 0]
        names = {r: state_shard_name(j, len(files)) for j, r in enumerate(files)}
        token = self.broadcast_object(uuid.uuid4().hex[:8])
        tmp = os.path.join(out_dir, f".relex_state.tmp-{token}")
        if self.rank == 0:
            os.makedirs(tmp, exist_ok=True)
        self.barrier()
        ok = True
        err = None
        try:
            if owned.specs:
                save_state(os.path.join(tmp, names[self.rank]), owned, lambda i: owned.theta0[i], tcut=tcut,
                           extra={"distributed": {"mode": self.mode, "world_size": self.world}})
        except Exception as e:  # reported to every rank below, raised here
            ok, err = False, e
        maps = self._gather_objects({s.name: names.get(self.rank) for s in owned.specs})
        all_ok = self.all_ok(ok)
        if self.rank == 0:
            if all_ok:
                weight_map = {}
                for m in maps:
                    weight_map.update(m)
                for r in files:
                    os.replace(os.path.join(tmp, names[r]), os.path.join(out_dir, names[r]))
                save_state_index(out_dir, weight_map, [n for n in self.names if n in weight_map],
                                 world_size=self.world, mode=self.mode)
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        if err is not None:
            raise err
        if not all_ok:
            raise RuntimeError("relex: another rank failed to write its state shard; see its log")

    # -- one horizon checkpoint
    def _write_horizon(self, final, horizon, owned, extra, plan, model, tokenizer, *, overwrite, max_shard_size):
        from .writer import clean_stale_temporaries, commit_directory, plan_shards, shard_names, \
            write_index, write_shard

        final = os.path.abspath(final)
        parent = os.path.dirname(final)
        keys, meta, owner, sd = plan["keys"], plan["meta"], plan["owner"], plan["sd"]
        nbytes = {k: tensor_bytes(*meta[k]) for k in keys}
        shards = []  # (rank, keys) in rank order: the same list on every rank
        for r in range(self.world):
            for s in plan_shards([(k, nbytes[k]) for k in keys if owner[k] == r], max_shard_size):
                shards.append((r, s))
        names = shard_names(len(shards))
        token = self.broadcast_object(uuid.uuid4().hex[:8])
        tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-dist-{token}")
        if self.rank == 0:
            clean_stale_temporaries(parent, os.path.basename(final))
            os.makedirs(tmp)
        self.barrier()
        index = {s.name: i for i, s in enumerate(owned.specs)}

        def produce(k):
            if k in index:
                i = index[k]
                return owned.extrapolate(i, horizon, owned.theta0[i]).reshape(meta[k][0])
            return extra[k] if k in extra else sd[k].detach()

        ok, err = True, None
        try:
            for name, (r, skeys) in zip(names, shards):
                if r == self.rank:
                    write_shard(os.path.join(tmp, name), skeys, meta, produce)
        except Exception as e:
            ok, err = False, e
        all_ok = self.all_ok(ok)
        if self.rank == 0:
            try:
                if all_ok:
                    if len(names) > 1:
                        write_index(tmp, {k: n for n, (_, skeys) in zip(names, shards) for k in skeys},
                                    sum(nbytes.values()))
                    write_model_extras(model, tokenizer, tmp)
                    if os.path.exists(final) and not overwrite:
                        raise RelexInputError(f"{final} already exists; pass overwrite")
                    commit_directory(tmp, final)
            except Exception as e:
                ok, err = False, e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        done = self.all_ok(ok)
        if err is not None:
            raise err
        if not (all_ok and done):
            raise RuntimeError(f"relex: another rank failed while writing {final}; see its log")
        return final
