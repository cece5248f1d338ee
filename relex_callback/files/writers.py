"""The output forms of an end of window, behind one small interface.

:func:`relex_callback.pipeline.finalize.finalize` runs the same steps for every form (checks, solve, state file, each
horizon, report); a :class:`CheckpointWriter` says how the state and each horizon are written:

* :class:`FullModelWriter`: one process writes a full Hugging Face checkpoint per horizon; untracked tensors,
  config and tokenizer come from a source (:class:`~relex_callback.files.checkpoints.ModelSource`, the live model, or
  :class:`~relex_callback.files.checkpoints.DirectorySource`, a checkpoint on disk).
* :class:`PeftAdapterWriter`: a PEFT adapter directory per horizon, written by PEFT's own ``save_pretrained`` (and
  with ``merge_lora`` a merged full model beside it).
* :class:`ShardedWriter`: every process of a distributed run writes its share of each checkpoint (its own
  safetensors shards) into one temporary directory; process 0 adds the index, config and tokenizer and commits.

Every writer gives the same guarantees: the state file is written first; each horizon is assembled in a temporary
directory and renamed whole (or removed); a failed write (full disk, permissions; any library's error for it) raises
:class:`WriteFailed` on every process, which the pipeline turns into one
:class:`~relex_callback.errors.RelexWriteError` saying what is intact and how to finish.
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Callable, Optional
import json

import torch

from .checkpoints import (
    ADAPTER_KEYS,
    ModelSource,
    plan_shards,
    shard_names,
    tensor_bytes,
    WEIGHTS_NAME,
    write_index,
    write_model_extras,
    write_relex_marker,
    write_shard,
    write_weights,
)
from ..config import DEFAULTS, parse_size
from ..errors import RelexInputError
from .fs import (
    atomic_directory,
    clean_stale_temporaries,
    commit_directory,
    describe_failure,
    horizon_dir,
    new_temporary_dir,
    not_ours,
    STATE_INDEX_NAME,
    STATE_NAME,
    write_failure,
    write_json,
)
from .state import fingerprint, PEFT_THETA0, PEFT_VALUE, save_state, save_state_index, state_shard_name
from ..params import is_peft_model
from .untracked import record_untracked, record_values


class WriteFailed(Exception):
    """A write failed on one or more processes (the message says which and why); raised on every process."""


def guarded(fn):
    """Run one write; a failed write (:func:`~relex_callback.files.fs.write_failure`) becomes :class:`WriteFailed`,
    anything else stays what it is."""
    try:
        return fn()
    except Exception as e:
        if write_failure(e):
            raise WriteFailed(describe_failure(e)) from e
        raise


class CheckpointWriter:
    """How the results of a window are written. The pipeline calls, on every process: :meth:`bind` once after the
    solve, :meth:`write_state` once, :meth:`write_horizon` per horizon; :meth:`report_solution` gives the solution
    over every tensor for ``report.json``, which the process with :attr:`is_coordinator` writes."""

    is_coordinator = True
    run_id: Optional[str] = None  # the window's id, recorded in the state file and in every step-H/ marker

    def bind(self, solution, store):
        """Keep what the writes need (the solution, theta_0)."""
        self.solution = solution
        self.theta0_of: Callable[[int], torch.Tensor] = lambda i: store.theta0_of(solution.specs[i])  # noqa: E731

    def write_state(self, out_dir: str, tcut: int) -> str:
        path = os.path.join(out_dir, STATE_NAME)
        untracked = self.untracked_record()
        guarded(lambda: save_state(path, self.solution, self.theta0_of, tcut=tcut, extra={"run_id": self.run_id},
                                   untracked=untracked))
        return path

    def untracked_record(self):
        """``(tensors, meta)`` of the untracked tensors this writer copies into every horizon, for the state file
        (:mod:`relex_callback.files.untracked`), or None when they come from the base the state is used with."""
        return None

    def write_horizon(self, out_dir: str, horizon: int, tcut: int, overwrite: bool) -> str:
        raise NotImplementedError

    def report_solution(self, solution):
        return solution

    def barrier(self):
        """Wait for every process (nothing to wait for in one process)."""

    def agree(self, error: Optional[BaseException]):
        """Raise on every process when ``error`` (this process's, or ``None``) or another process's is not None: a
        failed write as :class:`WriteFailed`, anything else as itself."""
        if error is None:
            return
        if write_failure(error):
            raise WriteFailed(describe_failure(error)) from error
        raise error


class FullModelWriter(CheckpointWriter):
    """Full checkpoints from one process: tracked tensors extrapolated, every other key of ``source`` copied.

    Args:
        source: where the untracked tensors, config and tokenizer come from (``ModelSource`` or ``DirectorySource``).
        theta0_of (`Callable[[int], torch.Tensor]`, *optional*): tensor ``i``'s flat theta_0; default the store's
            copy (the CLI reads it back from the base checkpoint instead, so the store can be freed first).
        max_shard_size (`int` or `str`, *optional*): shard size, as in ``save_pretrained`` (default: the setting's).
    """

    def __init__(self, source, *, theta0_of: Optional[Callable[[int], torch.Tensor]] = None,
                 max_shard_size=DEFAULTS["max_shard_size"]):
        self.source = source
        self._theta0_of = theta0_of
        self.max_shard_size = parse_size(max_shard_size)

    def bind(self, solution, store):
        super().bind(solution, store)
        if self._theta0_of is not None:
            self.theta0_of = self._theta0_of
        missing = [s.name for s in solution.specs if s.name not in self.source.meta]
        if missing:
            raise RelexInputError(f"tracked tensors {missing[:3]} are not in the base model's checkpoint keys")

    def untracked_record(self):
        """From a live model: the untracked tensors the horizons copy from it, so that ``relex materialize`` writes
        the same bytes (a checkpoint on disk is the base itself: nothing to record)."""
        recorded = getattr(self.source, "state_record", None)  # an UntrackedSource that keeps its record
        if recorded is not None:
            return recorded
        if not isinstance(self.source, ModelSource):
            return None
        return record_untracked(self.source, [s.name for s in self.solution.specs])

    def write_horizon(self, out_dir, horizon, tcut, overwrite):
        return write_full_checkpoint(out_dir, horizon, tcut, self.solution, self.theta0_of, self.source,
                                     overwrite=overwrite, max_shard_size=self.max_shard_size, run_id=self.run_id)


def write_full_checkpoint(out_dir: str, horizon: int, tcut: int, result, theta0_of, source, *, overwrite=False,
                          max_shard_size=DEFAULTS["max_shard_size"], run_id: Optional[str] = None) -> str:
    """Write ``out_dir/step-<horizon>`` atomically from ``result`` (a ``Solution`` or a loaded ``RelexState``) and
    ``source``: what :class:`FullModelWriter` and ``relex materialize`` do for each horizon."""
    final = horizon_dir(out_dir, horizon)
    clean_stale_temporaries(out_dir, os.path.basename(final))
    index = {s.name: i for i, s in enumerate(result.specs)}

    def produce(key):  # write_shard refuses NaN/Inf
        i = index.get(key)
        if i is None:
            return source.get(key)
        spec = result.specs[i]
        return result.extrapolate(i, horizon, theta0_of(i)).reshape(spec.shape).to("cpu")

    meta = dict(source.meta)
    for n, i in index.items():
        meta[n] = (tuple(result.specs[i].shape), result.specs[i].dtype)

    def write():
        with atomic_directory(final, overwrite=overwrite) as tmp:
            write_weights(tmp, list(source.keys), meta, produce, max_shard_size=max_shard_size,
                          weights_name=getattr(source, "weights_name", WEIGHTS_NAME))
            source.write_extras(tmp)
            write_relex_marker(tmp, horizon, tcut, run_id)

    guarded(write)
    return final


class PeftAdapterWriter(CheckpointWriter):
    """PEFT adapter directories, written by PEFT's own ``save_pretrained``: the adapter parameters temporarily hold
    the extrapolated values and are restored bit for bit afterwards (also when writing fails).

    Args:
        model: the ``PeftModel``; params (`dict[str, torch.nn.Parameter]`): the tracked adapter parameters by name.
        tokenizer: saved beside each adapter when it has ``save_pretrained``.
        merge_lora (`bool`, *optional*, defaults to `False`): also write ``step-H-merged/``, a full model from
            ``merge_and_unload()`` on a copy of the model.
    """

    def __init__(self, model, params: dict, tokenizer=None, *, merge_lora: bool = False):
        self.model, self.params, self.tokenizer, self.merge_lora = model, params, tokenizer, merge_lora

    def write_state(self, out_dir: str, tcut: int) -> str:
        """The state file, with what ``relex materialize`` needs to write this run's adapters (and merged models)
        again from the base model alone (:meth:`peft_record`)."""
        path = os.path.join(out_dir, STATE_NAME)
        peft = self.peft_record()
        guarded(lambda: save_state(path, self.solution, self.theta0_of, tcut=tcut, extra={"run_id": self.run_id},
                                   peft=peft))
        return path

    def peft_record(self) -> tuple[dict, dict]:
        """``(tensors, meta)`` for the state file: the tracked adapter parameters' theta_0 (a LoRA init is random:
        the base model does not hold it), the trainable adapter parameters left untracked at their tcut values (as
        every adapter directory holds them), the adapter's PEFT config, ``merge_lora``, and a fingerprint (with
        dtype) of every frozen parameter (the base weights a merged model is made of)."""
        tensors = {PEFT_THETA0 + sp.name: self.theta0_of(i).detach().to("cpu").reshape(-1).contiguous().clone()
                   for i, sp in enumerate(self.solution.specs)}
        values, frozen = [], {}
        for n, p in self.model.named_parameters():
            if n in self.params:
                continue
            if p.requires_grad:
                tensors[PEFT_VALUE + n] = p.detach().to("cpu").contiguous().clone()
                values.append(n)
            elif p.is_floating_point():
                frozen[n] = {**fingerprint(p.detach()), "dtype": str(p.dtype).replace("torch.", "")}
        adapter = self.model.active_adapter
        adapter = adapter if isinstance(adapter, str) else adapter[0]
        cfg = self.model.peft_config[adapter].to_dict()
        cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))
        return tensors, {"adapter": adapter, "config": cfg, "merge_lora": bool(self.merge_lora), "values": values,
                         "frozen": frozen}

    def write_horizon(self, out_dir, horizon, tcut, overwrite):
        final = horizon_dir(out_dir, horizon)
        clean_stale_temporaries(out_dir, os.path.basename(final))
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for i, spec in enumerate(self.solution.specs):
                    p = self.params[spec.name]
                    p.copy_(self.solution.extrapolate(i, horizon, self.theta0_of(i)).reshape(p.shape).to(p.device))
            guarded(lambda: self._save(self.model, final, horizon, tcut, overwrite))
            if self.merge_lora:
                merged = copy.deepcopy(self.model).merge_and_unload()
                try:
                    guarded(lambda: self._save(merged, final + "-merged", horizon, tcut, overwrite))
                finally:
                    del merged
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
        return final

    def _save(self, model, final, horizon, tcut, overwrite):
        with atomic_directory(final, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            write_relex_marker(tmp, horizon, tcut, self.run_id)


def adapter_file_keys(model, names) -> dict:
    """Trainable parameter name -> key in the adapter file PEFT's ``save_pretrained`` writes (PEFT drops the adapter
    name, e.g. ``...lora_A.default.weight`` -> ``...lora_A.weight``): asked of PEFT itself, with marker values."""
    from peft.utils import get_peft_model_state_dict

    marked = {n: torch.tensor([float(i)]) for i, n in enumerate(names)}
    out = get_peft_model_state_dict(model, state_dict=marked)
    back = {int(v.item()): k for k, v in out.items()}
    return {n: back[i] for i, n in enumerate(names) if i in back}


def save_adapter_at(model, params: dict, values: dict, directory: str, tokenizer=None):
    """``directory``: the PEFT adapter with the tracked ``params`` set to ``values`` (name -> tensor; the live values
    are restored bit for bit afterwards), plus ``relex_keys.json`` (parameter name -> adapter file key), so
    ``relex extrapolate --trajectory ... --base directory`` can write adapter directories. Atomic."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(values[n].reshape(p.shape).to(device=p.device, dtype=p.dtype))
        with atomic_directory(directory, overwrite=True, marked_only=False) as tmp:  # inside partial_trajectory/
            model.save_pretrained(tmp)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            write_json(os.path.join(tmp, ADAPTER_KEYS), adapter_file_keys(model, list(params)), indent=1)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


class ShardedWriter(CheckpointWriter):
    """Every process writes its share of each checkpoint (see :mod:`relex_callback.trainer.topology` for who writes
    what).

    The state is sharded by tensor: ``relex_state-0000i-of-0000N.safetensors`` (each a valid state file for the whole
    tensors its process wrote) plus ``relex_state.index.json``, written last by process 0 (the commit point). Each
    horizon is written by every process into one temporary directory (its own ``model-0000i-of-0000N.safetensors``);
    once every process succeeded (one all-reduce of a flag, also the barrier) process 0 writes the index, config and
    tokenizer and renames the directory into place.

    Args:
        topology (`Topology`): this process's view of the run. model: the trainer's model. tokenizer: saved by
            process 0. max_shard_size (`int` or `str`): shard size per process.
    """

    def __init__(self, topology, model, tokenizer=None, *, max_shard_size=DEFAULTS["max_shard_size"]):
        self.topo, self.model, self.tokenizer = topology, model, tokenizer
        self.max_shard_size = parse_size(max_shard_size)

    @property
    def is_coordinator(self):
        return self.topo.process_rank == 0

    def barrier(self):
        self.topo.barrier()

    def bind(self, solution, store):
        self.plan = self.topo.write_plan(self.model)
        self.solution, theta0, self.extra = self.topo.gather_owned(store, solution, self.plan)
        self.theta0_of = lambda i: theta0[i]  # noqa: E731

    def report_solution(self, solution):
        return self.topo.report_solution(solution)

    def agree(self, error: Optional[BaseException]):
        """Every process learns whether every process succeeded; a failure anywhere raises on every process: the
        local error as itself; another process's failed write as :class:`WriteFailed`, its input error as
        :class:`RelexInputError`, anything else as ``RuntimeError``, each naming the process and why."""
        def kind(e):
            return "write" if write_failure(e) else "input" if isinstance(e, RelexInputError) else "other"

        mine = None if error is None else (kind(error), describe_failure(error) if write_failure(error) else str(error))
        failures = [(r, f) for r, f in enumerate(self.topo.gather_objects(mine)) if f is not None]
        if not failures:
            return
        if error is not None and not write_failure(error):
            raise error
        text = "; ".join(f"process {r}: {why}" for r, (_, why) in failures)
        kinds = {k for _, (k, _) in failures}
        if kinds == {"write"}:
            raise WriteFailed(text) from error
        if "input" in kinds:
            raise RelexInputError(text) from error
        raise RuntimeError(f"relex: another process failed ({text}); see its log") from error

    def _step(self, fn, coordinator_only: bool = False):
        """Run one write (``fn``) on every process, or on the coordinator only, then :meth:`agree`: a failure on any
        process raises on every process (each process calls this the same number of times: the collectives pair)."""
        error = None
        if self.is_coordinator or not coordinator_only:
            try:
                fn()
            except Exception as e:
                error = e
        self.agree(error)

    def write_state(self, out_dir, tcut):
        topo, owned = self.topo, self.solution
        untracked = self._untracked_mine()
        counts = topo.gather_objects(len(owned.specs) + len(untracked[1]))
        files = [r for r in range(topo.world) if counts[r] > 0]
        names = {r: state_shard_name(j, len(files)) for j, r in enumerate(files)}
        token = topo.broadcast_object(f"{os.getpid()}-{os.urandom(4).hex()}")
        tmp = os.path.join(out_dir, f".relex_state.tmp-{token}")
        self._step(lambda: os.makedirs(tmp, exist_ok=True), coordinator_only=True)

        def save_mine():  # this process's tracked tensors and the untracked ones it writes into every horizon
            if owned.specs or untracked[1]:
                save_state(os.path.join(tmp, names[topo.process_rank]), owned, self.theta0_of, tcut=tcut,
                           extra={"distributed": {"mode": topo.mode, "world_size": topo.world}, "run_id": self.run_id},
                           untracked=untracked)

        def commit():  # the index, written last, is the commit point
            weight_map = {}
            for m in maps:
                weight_map.update(m)
            for r in files:
                os.replace(os.path.join(tmp, names[r]), os.path.join(out_dir, names[r]))
            save_state_index(
                out_dir,
                weight_map,
                [n for n in topo.names if n in weight_map],
                world_size=topo.world,
                mode=topo.mode,
                run_id=self.run_id,
                shards=[names[r] for r in files],
            )

        try:
            self._step(save_mine)
            maps = topo.gather_objects({s.name: names.get(topo.process_rank) for s in owned.specs})
            self._step(commit, coordinator_only=True)
        finally:
            if self.is_coordinator:
                shutil.rmtree(tmp, ignore_errors=True)
        return os.path.join(out_dir, STATE_INDEX_NAME)

    def _untracked_mine(self) -> tuple[dict, dict]:
        """The untracked keys this process writes into every horizon, recorded for the state file
        (:mod:`relex_callback.files.untracked`): the values :meth:`write_horizon` writes."""
        plan, tracked = self.plan, set(self.topo.names)
        mine = [k for k in plan["keys"] if plan["owner"][k] == self.topo.process_rank and k not in tracked]
        sd = plan["sd"]
        frozen = {k for k in mine if isinstance(sd[k], torch.nn.Parameter) and not sd[k].requires_grad}
        return record_values(mine, lambda k: self.extra[k] if k in self.extra else sd[k].detach(), frozen)

    def write_horizon(self, out_dir, horizon, tcut, overwrite):
        topo, plan = self.topo, self.plan
        final = os.path.abspath(horizon_dir(out_dir, horizon))
        keys, meta, owner, sd = plan["keys"], plan["meta"], plan["owner"], plan["sd"]
        nbytes = {k: tensor_bytes(*meta[k]) for k in keys}
        shards = []  # (process rank, keys) in rank order: the same list on every process
        for r in range(topo.world):
            for s in plan_shards([(k, nbytes[k]) for k in keys if owner[k] == r], self.max_shard_size):
                shards.append((r, s))
        names = shard_names(len(shards))
        token = topo.broadcast_object(f"dist-{os.getpid()}-{os.urandom(4).hex()}")
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{token}")
        index = {s.name: i for i, s in enumerate(self.solution.specs)}

        def produce(k):
            if k in index:
                i = index[k]
                return self.solution.extrapolate(i, horizon, self.theta0_of(i)).reshape(meta[k][0])
            return self.extra[k] if k in self.extra else sd[k].detach()

        def start():
            clean_stale_temporaries(out_dir, os.path.basename(final))
            if os.path.lexists(final) and not overwrite:
                raise RelexInputError(f"{final} already exists; pass overwrite")
            if os.path.lexists(final) and not_ours(final):
                raise RelexInputError(f"{final} {not_ours(final)}; overwrite replaces only what relex wrote, so it was "
                                      "left as it is: move it away or choose another output directory")
            new_temporary_dir(final, token)

        def write_mine():
            for name, (r, skeys) in zip(names, shards):
                if r == topo.process_rank:
                    write_shard(os.path.join(tmp, name), skeys, meta, produce)

        def commit():
            if len(names) > 1:
                write_index(tmp, {k: n for n, (_, skeys) in zip(names, shards) for k in skeys}, sum(nbytes.values()))
            write_model_extras(self.model, self.tokenizer, tmp)
            write_relex_marker(tmp, horizon, tcut, self.run_id)
            commit_directory(tmp, final)

        self._step(start, coordinator_only=True)
        try:
            self._step(write_mine)
            self._step(commit, coordinator_only=True)
        finally:
            if self.is_coordinator:
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def model_writer(model, tokenizer, topology, tracked, *, max_shard_size, merge_lora: bool) -> CheckpointWriter:
    """The writer for a live model: PEFT adapters, a distributed run's shards, or a full checkpoint."""
    if is_peft_model(model):
        return PeftAdapterWriter(model, {t.spec.name: t.param for t in tracked}, tokenizer, merge_lora=merge_lora)
    if topology.is_distributed:
        return ShardedWriter(topology, model, tokenizer, max_shard_size=max_shard_size)
    return FullModelWriter(ModelSource(model, tokenizer), max_shard_size=max_shard_size)


__all__ = ["CheckpointWriter", "FullModelWriter", "PeftAdapterWriter", "ShardedWriter", "WriteFailed", "model_writer",
           "write_full_checkpoint"]
