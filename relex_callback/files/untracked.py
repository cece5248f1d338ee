"""What a horizon holds for the tensors RELEX does not extrapolate, recorded in the state file so that every path to a
horizon (the callback, ``relex materialize``, ``evaluate_horizons``) writes the same bytes.

The callback writes every checkpoint key it does not track from the live model at ``tcut``:

* a trainable parameter left out by ``include`` / ``exclude`` was trained up to ``tcut``: its value at ``tcut`` is
  not in the base checkpoint, so the state file keeps it (tensor ``untracked/<key>``, source ``"state"``);
* a frozen parameter or a buffer equals the base checkpoint's (the model training started from): the state file
  keeps its fingerprint (source ``"base"``), and a later path refuses a base whose value differs.

Metadata ``relex["untracked"]``: ``{key: {"source": "state" | "base", "fingerprint": {...}}}``. A state without it
(older files, ``relex extrapolate --checkpoints``, which tracks every floating-point tensor) takes every untracked key
from the base.

A saved trajectory (``relex extrapolate --trajectory``) holds the tracked tensors only. ``partial_trajectory/`` also
gets ``untracked.safetensors`` (:func:`save_untracked`: the same record, at the last recorded step) when the run ended
there; a checkpoint's ``relex_trajectory/`` sits beside the checkpoint's weights, which are the model at that step.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import RelexInputError
from .fs import atomic_file, loads_json

from .state import PREFIX  # noqa: F401  (the state file's key prefix of an untracked tensor's value)
from .state import fingerprint, fingerprint_mismatch


def record_untracked(source, tracked_names) -> tuple[dict, dict]:
    """For a live model (``checkpoints.ModelSource``): ``(tensors, meta)`` to add to the state file for every key the
    horizons copy from the model instead of extrapolating. Reads each untracked tensor once (end of window only)."""
    tracked = set(tracked_names)
    model = getattr(source, "model", None)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if model is not None else set()
    return record_values([k for k in source.keys if k not in tracked], source.get, frozen)


def record_values(keys, get, frozen) -> tuple[dict, dict]:
    """``(tensors, meta)`` for the untracked ``keys`` (values from ``get(key)``, as written into every horizon):
    trained ones (not in ``frozen``, floating point) by value, the others by fingerprint."""
    tensors, meta = {}, {}
    for key in keys:
        value = get(key)
        if key in frozen or not value.is_floating_point():
            meta[key] = {"source": "base", "fingerprint": fingerprint(value) if value.is_floating_point() else None}
        else:  # trained (a parameter the trainer updates) or a floating buffer the forward pass may update
            tensors[PREFIX + key] = value.detach().to("cpu").contiguous().clone()
            meta[key] = {"source": "state", "fingerprint": fingerprint(value)}
    return tensors, meta


class UntrackedSource:
    """A checkpoint source (``get``, ``keys``, ``meta``, ``write_extras``) for writing a horizon from a state file:
    the base checkpoint ``src``, with the untracked keys the state recorded taken from the state. :meth:`check`
    refuses, before anything is written, a base whose untracked tensors are not the ones the run wrote."""

    def __init__(self, src, state, *, keep: bool = False):
        self.src, self.state = src, state
        self.record = getattr(state, "untracked", None) or {}
        # keep: a new state file written from this source records the same untracked tensors (FullModelWriter)
        self.state_record = (({k: v for k, v in state.tensors.items() if k.startswith(PREFIX)}, dict(self.record))
                             if keep and self.record else None)
        self.keys = list(src.keys)
        self.meta = dict(src.meta)
        if hasattr(src, "weights_name"):
            self.weights_name = src.weights_name

    def check(self, base: str):
        for key, e in self.record.items():
            if key not in self.src.meta:
                raise RelexInputError(f"the base {base} has no tensor {key} (the run wrote it into every horizon): "
                                      "pass the checkpoint training started from")
            if e["source"] == "state":
                t = self.state.tensors[PREFIX + key]
                shape, dtype = self.src.meta[key]
                if tuple(shape) != tuple(t.shape) or dtype != t.dtype:
                    raise RelexInputError(
                        f"{key}: {list(shape)} {dtype} in {base} but {list(t.shape)} {t.dtype} in the "
                        "state; pass the base the state was computed from"
                    )
            elif e.get("fingerprint") is not None:
                why = fingerprint_mismatch(fingerprint(self.src.get(key)), e["fingerprint"])
                if why:
                    raise RelexInputError(
                        f"the base {base} does not match the run for the untracked tensor {key} ({why}): the run wrote "
                        "it unchanged from the model training started from; pass that checkpoint as the base")

    def get(self, key: str) -> torch.Tensor:
        e: Optional[dict] = self.record.get(key)
        if e is not None and e["source"] == "state":
            return self.state.tensors[PREFIX + key]
        return self.src.get(key)

    def write_extras(self, out_dir: str):
        self.src.write_extras(out_dir)


UNTRACKED_FILE = "untracked.safetensors"  # in a partial_trajectory/: the untracked tensors at the last recorded step


def save_untracked(directory: str, tensors: dict, meta: dict, *, step: int, run_id: Optional[str]):
    """Write :func:`record_values`' ``(tensors, meta)`` as ``directory/untracked.safetensors``, for the model at
    ``step`` (the trajectory's last recorded step) of the window ``run_id``."""
    header = {"relex_untracked": json.dumps({"step": int(step), "run_id": run_id, "untracked": meta})}
    with atomic_file(os.path.join(directory, UNTRACKED_FILE)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)


def is_relex_untracked(path: str) -> bool:
    """Whether ``path`` is an ``untracked.safetensors`` relex wrote (its header names the record): the only kind a
    new window replaces."""
    try:
        with safe_open(path, "pt") as f:
            return "relex_untracked" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def load_untracked(directory: str):
    """``(tensors, meta, step, run_id)`` from ``directory/untracked.safetensors``, or ``None`` without one."""
    path = os.path.join(directory, UNTRACKED_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            head = loads_json((f.metadata() or {})["relex_untracked"], f"the relex metadata of {path}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta, step, run_id = head["untracked"], int(head["step"]), head.get("run_id")
        ok = isinstance(meta, dict) and all(
            isinstance(e, dict) and e.get("source") in ("state", "base")
            and (e["source"] != "state" or PREFIX + k in tensors) for k, e in meta.items())
    except Exception as e:  # safetensors raises its own error types; a missing or edited header
        raise RelexInputError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and pass --untracked-from a "
                              "checkpoint saved at the trajectory's last step") from None
    if not ok:
        raise RelexInputError(f"{path} does not record the untracked tensors as relex writes them; delete it and pass "
                              "--untracked-from a checkpoint saved at the trajectory's last step")
    return tensors, meta, step, run_id
