"""Other weights in the live model, and the model's own weights back bit for bit.

:class:`LiveWeights` puts a window's horizon into the model a running Trainer trains (every process its own pieces:
one process every tensor; DDP / ZeRO-1/2 the owner of each tensor computes it and broadcasts it to the other
replicas, ZeRO-1/2 with mixed precision each process its flat fragment; ZeRO-3 each process its flat partition, the
parameters DeepSpeed keeps gathered gathered again from the partitions). The weights go into the parameters a forward
pass uses (16-bit under mixed precision, cast as the written checkpoints are), never into the optimizer's fp32 master
weights. FSDP2 is not supported (its unsharded parameter cache). :class:`ExactCopy` does the same for named tensors of
a model after training (a checkpoint's weights, a PEFT adapter).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..errors import RelexInputError


class LiveWeights:
    """This process's pieces of the tracked parameters of the live model: put other values in, restore the exact
    originals.

    Args:
        tracked (`list[TrackedTensor]`): what this process records (``t.read()`` is a flat view of its live piece).
        topology (`Topology`): the run's layout; in the replicated mode (DDP, ZeRO-1/2) every replica must hold every
            tensor, so ``model`` is needed to reach the tensors other processes own.
        model (`torch.nn.Module`, *optional*): the model (replicated mode).
    """

    def __init__(self, tracked, topology, model=None):
        self.tracked, self.topo = list(tracked), topology
        self.mode = topology.mode if topology is not None else "single"
        if self.mode == "fsdp2":
            raise RelexInputError("scoring horizons during an FSDP2 run is not supported; score them after training "
                                  "on one process with relex_callback.evaluate_horizons")
        if self.mode in ("replicated", "zero12"):  # every replica holds (and must get) every tensor, whole
            params = dict(model.named_parameters())
            self.replica = {n: params[n] for n in topology.names}
        self.saved = None

    def _readers(self):
        if self.mode in ("replicated", "zero12"):
            return {n: (lambda p=p: p.data.reshape(-1)) for n, p in self.replica.items()}
        return {t.spec.name: t.live_view for t in self.tracked}  # the live parameter's piece, not an fp32 master

    def _views(self):
        return {n: read() for n, read in self._readers().items()}

    @torch.no_grad()
    def save(self):
        """An exact copy of every piece this process will change."""
        self.saved = {n: v.clone() for n, v in self._views().items()}

    @torch.no_grad()
    def put(self, value_of: Callable[[int], torch.Tensor], specs):
        """Write ``value_of(i)`` (the flat piece of ``specs[i]``, this process's) into the live model."""
        readers = self._readers()

        def piece(name, spec):  # ZeRO-1/2 fragments: this process's flat range of the whole replica
            v = readers[name]()
            return v[spec.flat_start : spec.flat_start + spec.local_numel] if self.mode == "zero12" else v

        for i, spec in enumerate(specs):
            v = piece(spec.name, spec)
            if v.numel() and piece(spec.name, spec).data_ptr() != v.data_ptr():  # pragma: no cover (a copying reader)
                raise RuntimeError(f"relex: the reader of {spec.name} does not return a view of the live parameter")
            v.copy_(value_of(i).to(device=v.device, dtype=v.dtype).reshape(-1))
        self._sync()

    @torch.no_grad()
    def restore(self):
        views = self._views()
        for n, v in self.saved.items():
            views[n].copy_(v)
        self._sync(restoring=True)

    def _sync(self, restoring: bool = False):
        if self.mode == "replicated" and not restoring:  # every replica gets every tensor from its owner
            for n in self.topo.names:
                p = self.replica[n]
                buf = p.data if p.device == self.topo.comm_device() else p.data.to(self.topo.comm_device())
                dist.broadcast(buf, src=self.topo.owner[n])
                if buf is not p.data:
                    p.data.copy_(buf)
        elif self.mode == "zero12" and not restoring:  # every replica gets every fragment from the process holding it
            dev = self.topo.comm_device()
            for n in self.topo.names:
                flat = self.replica[n].data.reshape(-1)
                for r, (start, k) in enumerate(self.topo.ranges[n]):
                    if not k:
                        continue
                    view = flat[start : start + k]
                    buf = view if view.device == dev else view.to(dev)
                    dist.broadcast(buf, src=r)
                    if buf is not view:
                        view.copy_(buf)
        elif self.mode == "zero3":
            self._regather_zero3()

    def _regather_zero3(self):
        """DeepSpeed keeps small ("persistent") parameters gathered between steps and gathers them again from the
        partitions after each optimizer step; do the same after changing the partitions."""
        dev = self.topo.comm_device()
        for t in self.tracked:
            p = t.param
            if p is None or not hasattr(p, "ds_tensor") or p.data.numel() != p.ds_numel:
                continue  # partitioned only: ZeRO-3 gathers it from the partitions at each forward
            part = p.ds_tensor.data.reshape(-1).to(dev)
            parts = [torch.empty_like(part) for _ in range(self.topo.world)]
            dist.all_gather(parts, part)
            p.data.copy_(torch.cat(parts)[: p.ds_numel].view(p.data.shape).to(p.data.device))


class ExactCopy:
    """An exact copy of some tensors of a model (``{name: tensor}``, e.g. its ``state_dict(keep_vars=True)``
    entries), taken at construction: :meth:`put` writes other values into them, :meth:`restore` the copy back."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.saved = {k: t.detach().clone() for k, t in tensors.items()}

    @torch.no_grad()
    def put(self, value_of: Callable[[str], torch.Tensor]):
        """Write ``value_of(name)`` (cast to each tensor's device, dtype and shape) into every tensor."""
        for k, t in self.tensors.items():
            t.data.copy_(value_of(k).to(device=t.device, dtype=t.dtype).reshape(t.shape))

    @torch.no_grad()
    def restore(self):
        for k, t in self.tensors.items():
            t.data.copy_(self.saved[k])
