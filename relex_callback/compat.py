"""What differs between the transformers / TRL releases this package supports, found by feature, in one place.

The supported (tested) range is :data:`SUPPORTED`; docs/install.md ("Compatibility") lists the matrix that CI runs
(``make test`` on the pinned set, ``make test-compat`` on the lowest declared set and the newest releases).

Behaviour that depends on the library version is detected here from what the objects do, never from a version
number, so a release in between (or a backport) gets the behaviour it actually has:

* Tied weights (:func:`tied_copies`). transformers 4.x declares them in ``_tied_weights_keys`` as a list of the
  names that *may* be tied (listed even when ``tie_word_embeddings=False``); 5.x has ``all_tied_weights_keys``, a
  ``{copy: source}`` dict. Both tie by making the two modules hold the same ``Parameter``, and ``state_dict()``
  returns both names. The copies to leave out of a checkpoint are found from that sharing itself
  (``named_parameters(remove_duplicate=False)``: the same object under several names; else the same storage), so
  the checkpoint's tensor names equal the tracked names (``named_parameters()``, first name of each parameter) on
  every release.
* Evaluation metrics (:func:`evaluate_with_logged_metrics`). TRL < 1.5's ``GRPOTrainer.log`` builds a new dict with
  its own metrics (``eval_reward``, ``eval_rewards/<f>/mean``) and logs that, so ``trainer.evaluate()`` returns the
  metrics without them; the logged entry in ``state.log_history`` has them on every release. The entries an
  evaluation appends are merged into what it returns (a metric present in both keeps the returned value).
* The seam to the Trainer (the functions under "the Trainer's internals" below). A ``TrainerCallback`` is handed no
  reference to the Trainer, and the Trainer keeps some of what the callback needs in private attributes or only on
  its call stack. Every such read or write of this package is one small function here, each tested against the
  installed releases (tests/test_compat.py fails when a release renames or removes what it reads); no other module
  reads a private name of a transformers / TRL object (tests/test_compat.py greps the package for it).
* Version guard (:func:`check_versions`): a release older than the lowest supported one is refused with the
  supported range (its known failures include a wrong set of tensors in the written checkpoints); a newer one than
  the newest tested is used with one warning.

Ground floor: imports only the standard library and :mod:`relex_callback.errors` (it reads torch and transformers
objects it is handed, and package versions from their metadata, without importing either).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Iterable, Optional

from .errors import RelexInputError

logger = logging.getLogger("relex_callback")

# (lowest supported = the lowest tested, newest tested). Keep in step with setup.cfg, the Makefile and docs/install.md.
SUPPORTED = {
    "transformers": ("4.57.6", "5.25.0"),
    "trl": ("0.29.1", "1.16.0"),
    "accelerate": ("1.10.0", "1.16.0"),
}
# Set to 1 to turn the refusal of an older release into a warning (at your own risk: results are untested there).
ALLOW_ENV = "RELEX_ALLOW_UNSUPPORTED"


# ------------------------------------------------------------------------------------------------------- versions
def parse_version(v: str) -> tuple:
    """``"4.57.6"`` -> ``(4, 57, 6)``; ``"5.0.0rc1"`` / ``"1.16.0.dev0"`` -> their numeric release part (a
    pre-release compares equal to its release, which is what a range check of tested releases needs)."""
    out = []
    for part in str(v).split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out) + (0,) * (3 - len(out))


def installed_version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_problems(versions: Optional[dict] = None) -> tuple[list[str], list[str]]:
    """``(too_old, untested_newer)`` sentences for the installed (or given ``{package: version}``) releases."""
    old, new = [], []
    for pkg, (low, high) in SUPPORTED.items():
        v = (versions or {}).get(pkg) if versions is not None else installed_version(pkg)
        if v is None:
            continue
        if parse_version(v) < parse_version(low):
            old.append(f"{pkg} {v} (supported: {low} to {high})")
        elif parse_version(v) > parse_version(high):
            new.append(f"{pkg} {v} (newest tested: {high})")
    return old, new


_WARNED_NEWER: set = set()


def check_versions(packages: Iterable[str] = ("transformers", "accelerate"), versions: Optional[dict] = None):
    """Refuse releases older than :data:`SUPPORTED` (``RelexInputError`` naming the range; ``RELEX_ALLOW_UNSUPPORTED=1``
    makes it a warning), warn once about releases newer than the newest tested. ``packages``: those in use (``trl``
    only when a TRL trainer runs)."""
    old, new = version_problems(versions)
    pkgs = tuple(packages)
    old = [s for s in old if s.split()[0] in pkgs]
    new = [s for s in new if s.split()[0] in pkgs and s not in _WARNED_NEWER]
    if old:
        msg = ("relex_callback supports " + ", ".join(f"{p} {SUPPORTED[p][0]} to {SUPPORTED[p][1]}" for p in pkgs)
               + f"; installed: {', '.join(old)}. Upgrade, e.g. pip install -U "
               + " ".join(f"'{s.split()[0]}>={SUPPORTED[s.split()[0]][0]}'" for s in old)
               + " (older releases give a different set of tensors or metrics; see docs/install.md, Compatibility)")
        if os.environ.get(ALLOW_ENV) == "1":
            warnings.warn(msg + f" [{ALLOW_ENV}=1: continuing untested]", stacklevel=3)
            logger.warning("relex: %s [%s=1: continuing untested]", msg, ALLOW_ENV)
        else:
            raise RelexInputError(msg + f"; or set {ALLOW_ENV}=1 to run untested")
    if new:
        _WARNED_NEWER.update(new)
        logger.warning("relex: untested newer release(s) %s; relex_callback was tested up to these (docs/install.md, "
                       "Compatibility). Report a failure with the versions.", ", ".join(new))


def trl_in_use(trainer=None) -> bool:
    """Whether TRL takes part: the trainer is a TRL class, or (no trainer known) trl has been imported."""
    if trainer is not None:
        return any(c.__module__.split(".")[0] == "trl" for c in type(trainer).__mro__)
    return "trl" in sys.modules


# --------------------------------------------------------------------------------------------------- tied weights
def tied_copies(model, sd: Optional[dict] = None) -> set:
    """Names of ``state_dict`` entries that are a tied copy of an earlier entry (``lm_head.weight`` of a model with
    tied embeddings): the same ``Parameter`` / buffer object under a second name, or (a tensor in ``sd`` with
    elements) the same storage, offset, shape and strides as an earlier entry. The first name of each shared tensor
    is kept: the name ``named_parameters()`` gives it, i.e. the tracked name. The same on every transformers release
    (4.x lists possibly-tied names in ``_tied_weights_keys`` even when untied; 5.x has ``all_tied_weights_keys``)."""
    copies = set()
    seen: dict = {}
    if hasattr(model, "named_parameters"):
        named = list(model.named_parameters(remove_duplicate=False))
        named += list(model.named_buffers(remove_duplicate=False))
        for n, t in named:
            if id(t) in seen:
                copies.add(n)
            else:
                seen[id(t)] = n
    if sd is not None:
        first: dict = {}
        for k, t in sd.items():
            if k in copies or not hasattr(t, "data_ptr") or t.numel() == 0 or t.device.type == "meta":
                continue
            if getattr(t, "placements", None) is not None or hasattr(t, "_local_tensor"):
                # a DTensor (FSDP2): its data_ptr is its local shard's, empty or not, so storage says nothing about
                # tying; its object identity was counted above
                continue
            try:
                key = (str(t.device), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            except Exception:  # a tensor subclass without plain storage (DTensor): its object identity counted above
                continue
            if key in first:
                copies.add(k)
            else:
                first[key] = k
        copies &= set(sd)
    return copies


def declared_tied_keys(model) -> set:
    """What the model itself declares as tied copies, for comparison only (the tests pin :func:`tied_copies` against
    it): 5.x ``all_tied_weights_keys``; 4.x ``_tied_weights_keys`` when ``config.tie_word_embeddings`` is on."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is not None:
        return set(keys)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        return set(getattr(model, "_tied_weights_keys", None) or ())
    return set()


# ---------------------------------------------------------------------------------------------- evaluation metrics
def evaluate_with_logged_metrics(trainer) -> dict:
    """``trainer.evaluate()``, plus the ``eval_*`` metrics the trainer logged during the call but did not return
    (TRL < 1.5's ``GRPOTrainer.log`` logs a new dict holding ``eval_reward`` and ``eval_rewards/<f>/mean``).
    A returned metric is never replaced."""
    history = trainer.state.log_history
    start = len(history)
    metrics = dict(trainer.evaluate())
    for entry in history[start:]:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.startswith("eval_") and k not in metrics:
                    metrics[k] = v
    return metrics


# ------------------------------------------------------------------------------------------ the Trainer's internals
# Each function below names what it touches and was tested on transformers 4.57.6 .. 5.25.0 and TRL 0.29.1 .. 1.16.0
# (the range of SUPPORTED; tests/test_compat.py runs each one against the installed release's real objects).

def _is_callback_handler(obj) -> bool:
    """A ``transformers.trainer_callback.CallbackHandler`` (told by its class, without importing transformers)."""
    return any(c.__name__ == "CallbackHandler" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


def handler_holding(callback):
    """The ``CallbackHandler`` whose ``callbacks`` list holds ``callback``, found through the garbage collector's
    referrers of that list, or ``None``. Only the fallback for a callback passed in ``callbacks=[...]`` without a
    trainer (``RelexCallback(trainer=...)`` / ``attach`` link it explicitly). Reads ``CallbackHandler.callbacks``
    (transformers 4.57.6 .. 5.25.0)."""
    for lst in gc.get_referrers(callback):
        if not isinstance(lst, list):
            continue
        for owner in gc.get_referrers(lst):
            if _is_callback_handler(owner) and owner.callbacks is lst:
                return owner
    return None


def trainer_of(handler):
    """The object (the Trainer) whose ``callback_handler`` is ``handler``, found through the garbage collector's
    referrers (the Trainer's instance ``__dict__``, then its owner), or ``None``. The fallback of
    :func:`handler_holding` (transformers 4.57.6 .. 5.25.0: ``Trainer.callback_handler``)."""
    for r in gc.get_referrers(handler):
        if getattr(r, "callback_handler", None) is handler:
            return r
        if isinstance(r, dict) and r.get("callback_handler") is handler:
            for t in gc.get_referrers(r):
                if getattr(t, "__dict__", None) is r:
                    return t
    return None


def callback_handler(trainer):
    """``trainer.callback_handler``: the ``CallbackHandler`` that calls the callbacks (transformers 4.57.6 ..
    5.25.0), or ``None``."""
    return getattr(trainer, "callback_handler", None)


def holds(handler, callback) -> bool:
    """Whether ``handler.callbacks`` holds this very instance (not only one of its class)."""
    return handler is not None and any(c is callback for c in handler.callbacks)


def put_first(handler, callback):
    """Make ``callback`` the first entry of ``handler.callbacks`` (so its ``on_log`` adds metrics before the
    reporting integrations see them), added if absent, once only (a second entry of the same instance, e.g. from
    ``attach`` followed by ``trainer.add_callback``, is dropped). Safe while the handler iterates over the list in
    ``call_event`` (the entries after the callback keep their positions). Rewrites ``CallbackHandler.callbacks`` in
    place (transformers 4.57.6 .. 5.25.0)."""
    lst = handler.callbacks
    lst[:] = [callback] + [c for c in lst if c is not callback]


def replace_callback(handler, old, new):
    """Put ``new`` in the place of ``old`` in ``handler.callbacks`` (transformers 4.57.6 .. 5.25.0)."""
    lst = handler.callbacks
    lst[[i for i, c in enumerate(lst) if c is old][0]] = new


@contextmanager
def callbacks_detached(trainer):
    """No callback of ``trainer`` sees an event inside the block (``handler.callbacks`` emptied, then put back as it
    was, also on an error). transformers 4.57.6 .. 5.25.0: ``CallbackHandler.call_event`` iterates over
    ``handler.callbacks``."""
    handler = trainer.callback_handler
    callbacks = list(handler.callbacks)
    handler.callbacks[:] = []
    try:
        yield
    finally:
        handler.callbacks[:] = callbacks


def resume_argument(trainer) -> Optional[str]:
    """The checkpoint directory ``trainer.train(resume_from_checkpoint=...)`` is resuming from, as the Trainer resolved
    it (``True`` -> the last checkpoint), or ``None``. The Trainer keeps it only as a local of its training loop
    (``Trainer._inner_training_loop(..., resume_from_checkpoint=...)``, transformers 4.57.6 .. 5.25.0), which is on the
    call stack while ``on_train_begin`` runs: read from the frame of a method of ``trainer`` that has it."""
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


def trainer_buffers(trainer) -> dict:
    """A deep copy of what an evaluation changes on ``trainer`` besides its log history: ``trainer.control``'s fields,
    and GRPO's metric accumulators and completion log (``GRPOTrainer._metrics`` and ``_logs``, TRL 0.29.1 ..
    1.16.0; absent on other trainers). :func:`restore_trainer_buffers` puts them back."""
    out = {}
    if getattr(trainer, "control", None) is not None:
        out["control"] = copy.copy(trainer.control.__dict__)
    for name in ("_logs", "_metrics"):
        if hasattr(trainer, name):
            out[name] = copy.deepcopy(getattr(trainer, name))
    return out


def restore_trainer_buffers(trainer, saved: dict):
    """Put back what :func:`trainer_buffers` copied, and have a vLLM-generating GRPO trainer sync the weights before
    its next generation (:func:`resync_generation`)."""
    if "control" in saved:
        trainer.control.__dict__.update(saved["control"])
    for name in ("_logs", "_metrics"):
        if name in saved:
            setattr(trainer, name, saved[name])
    resync_generation(trainer)


def resync_generation(trainer):
    """A GRPO trainer generating with vLLM loads the policy's weights into the engine only when the step changed
    (``GRPOTrainer._last_loaded_step``, TRL 0.29.1 .. 1.16.0, set when ``use_vllm``): reset it so the weights just put
    in (or restored) are synced before the next generation. Nothing on other trainers."""
    if hasattr(trainer, "_last_loaded_step"):
        trainer._last_loaded_step = -1


def completion_log(trainer) -> Optional[dict]:
    """GRPO's log of the last generated completions (``GRPOTrainer._logs``: ``{"prompt": deque, "rewards": {func:
    deque}, ...}``, TRL 0.29.1 .. 1.16.0), or ``None`` (another trainer, or a layout without those keys)."""
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, dict) or "prompt" not in logs or "rewards" not in logs:
        return None
    return logs


def set_completion_log(trainer, logs: dict):
    """Replace GRPO's completion log (``GRPOTrainer._logs``, TRL 0.29.1 .. 1.16.0)."""
    trainer._logs = logs


def model_source_path(model) -> Optional[str]:
    """The path or hub id ``from_pretrained`` loaded ``model`` from (``PretrainedConfig._name_or_path``, transformers
    4.57.6 .. 5.25.0), or ``None``."""
    return getattr(getattr(model, "config", None), "_name_or_path", None)
