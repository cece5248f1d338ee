"""Where a callback meets the Trainer that runs it, which hands callbacks no reference to itself: its
``CallbackHandler`` and the Trainer are found through the referrers of the handler's ``callbacks`` list (no walk over
the call stack), and the bytes one written horizon takes."""

from __future__ import annotations

import gc
import itertools
import os
from typing import Optional


def _handler(callback):
    """The ``CallbackHandler`` that holds ``callback`` (found through the referrers of its ``callbacks`` list: the
    Trainer hands callbacks no reference to it or to itself), or None."""
    from transformers.trainer_callback import CallbackHandler

    for lst in gc.get_referrers(callback):
        if not isinstance(lst, list):
            continue
        for owner in gc.get_referrers(lst):
            if isinstance(owner, CallbackHandler) and owner.callbacks is lst:
                return owner
    return None


def _owner_of(handler):
    """The object whose ``callback_handler`` is ``handler``. Its referrer is usually the Trainer's ``__dict__``,
    not the Trainer itself (instance attributes live in a dict), so the dict's own referrers are searched too."""
    for r in gc.get_referrers(handler):
        if getattr(r, "callback_handler", None) is handler:
            return r
        if isinstance(r, dict) and r.get("callback_handler") is handler:
            for t in gc.get_referrers(r):
                if getattr(t, "__dict__", None) is r:
                    return t
    return None


def _handler_list(callback) -> Optional[list]:
    handler = _handler(callback)
    return handler.callbacks if handler is not None else None


def _attach(callback):
    """Put ``callback`` first in the ``CallbackHandler`` that holds it, so that its ``on_log`` adds the ``relex/*``
    metrics to ``logs`` before TensorBoard, W&B and the console see them, whether it was passed in
    ``callbacks=[...]`` or attached with ``trainer.add_callback``; return the ``Trainer`` that owns that handler (for
    scoring horizons with its own evaluation), or ``None``."""
    handler = _handler(callback)
    if handler is None:
        return None
    handler.callbacks.remove(callback)
    handler.callbacks.insert(0, callback)
    return _owner_of(handler)


def _resumed_from(trainer) -> Optional[str]:
    """The checkpoint directory ``trainer.train(resume_from_checkpoint=...)`` is resuming from, as the Trainer resolved
    it (``True`` -> the last checkpoint), or None. The Trainer keeps it only as an argument of its training loop, which
    is on the call stack while ``on_train_begin`` runs: read from the frame of a method of ``trainer`` that has it."""
    import sys

    if trainer is None:
        return None
    frame = sys._getframe(1)
    for _ in range(64):  # on_train_begin is a few frames below Trainer._inner_training_loop
        if frame is None:
            break
        if "resume_from_checkpoint" in frame.f_code.co_varnames and frame.f_locals.get("self") is trainer:
            value = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
        frame = frame.f_back
    return None


def _horizon_bytes(model, tracked, merge_lora: bool) -> int:
    """Bytes of one written horizon: every parameter (tied ones once; the full size of a ZeRO-3 or FSDP2 shard) and
    buffer of the model, or the adapter for PEFT models (plus the merged model with ``merge_lora``)."""
    from ..params import is_peft_model

    full = 0
    for _, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        full += int(getattr(p, "ds_numel", 0) or p.numel()) * p.element_size()
    if is_peft_model(model):
        adapter = sum(x.spec.numel * x.spec.dtype.itemsize for x in tracked)
        return adapter + (full if merge_lora else 0)
    return full


def take_back_original(callback, instances):
    """With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces the callback the user passed by a new
    one built from its ``state()``. Put the user's instance back in its place (the one the user holds, with the same
    settings, attached to no trainer: the newest of ``instances``), so that ``callback.report`` and friends stay on
    the object the user has. Returns it, or None when ``callback`` is the user's."""
    if "relex_checkpoint" not in callback.__dict__:
        return None
    lst = _handler_list(callback)
    cands = [c for c in list(instances) if c is not callback and "relex_checkpoint" not in c.__dict__
             and c.settings == callback.settings and _handler_list(c) is None]
    if lst is None or not cands:
        return None
    orig = max(cands, key=lambda c: c._created)
    lst[lst.index(callback)] = orig
    return orig
