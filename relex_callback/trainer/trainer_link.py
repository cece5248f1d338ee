"""Where a callback meets the Trainer that runs it.

The link is explicit when the user gives it (``RelexCallback(..., trainer=trainer)`` or ``callback.attach(trainer)``);
for a callback passed in ``callbacks=[...]`` at the Trainer's construction (the Trainer hands callbacks no reference to
itself) the Trainer is found once, at ``on_train_begin``, through the handler that holds the callback
(:func:`relex_callback.compat.handler_holding`). Every private read or write of the Trainer's objects this needs is in
:mod:`relex_callback.compat`. Also here: the bytes one written horizon takes (the memory plan needs the model)."""

from __future__ import annotations

import itertools
from typing import Optional

from ..compat import (callback_handler, handler_holding, holds, put_first, replace_callback, resume_argument,
                      trainer_of)
from ..params import is_peft_model


def running_trainer(callback, linked=None):
    """The Trainer that runs ``callback``, with ``callback`` made the first of its callbacks (so that its ``on_log``
    adds the ``relex/*`` metrics to ``logs`` before TensorBoard, W&B and the console see them; a second entry of the
    same instance is dropped). ``linked``: the Trainer given by the user, used when its handler holds the callback;
    else the handler holding it is searched for (the fallback). ``None`` when no Trainer is found (a callback driven
    by hand)."""
    handler = callback_handler(linked) if linked is not None else None
    if holds(handler, callback):
        put_first(handler, callback)
        return linked
    handler = handler_holding(callback)
    if handler is None:
        return linked
    put_first(handler, callback)
    return trainer_of(handler)


def take_back_original(callback, instances: dict):
    """With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces the callback the user passed by a new
    one built from its ``state()``. Put the user's instance back in its place (the one the user holds, with the same
    settings, held by no trainer's handler: the newest of ``instances``, ``{creation number: instance}``), so that
    ``callback.report`` and friends stay on the object the user has. Returns it, or None when ``callback`` is the
    user's."""
    if "relex_checkpoint" not in callback.__dict__:  # set by the Trainer's restore only
        return None
    handler = handler_holding(callback)
    cands = [(n, c) for n, c in list(instances.items()) if c is not callback and "relex_checkpoint" not in c.__dict__
             and c.settings == callback.settings and handler_holding(c) is None]
    if handler is None or not cands:
        return None
    orig = max(cands, key=lambda nc: nc[0])[1]
    replace_callback(handler, callback, orig)
    return orig


def horizon_bytes(model, tracked, merge_lora: bool) -> int:
    """Bytes of one written horizon: every parameter (tied ones once; the full size of a ZeRO-3 or FSDP2 shard) and
    buffer of the model, or the adapter for PEFT models (plus the merged model with ``merge_lora``)."""
    full = 0
    for _, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        full += int(getattr(p, "ds_numel", 0) or p.numel()) * p.element_size()
    if is_peft_model(model):
        adapter = sum(x.spec.numel * x.spec.dtype.itemsize for x in tracked)
        return adapter + (full if merge_lora else 0)
    return full


def resumed_from(trainer) -> Optional[str]:
    """The checkpoint ``trainer.train(resume_from_checkpoint=...)`` is resuming from (read by
    :func:`relex_callback.compat.resume_argument` from the training loop's frame), or ``None``."""
    return resume_argument(trainer)
