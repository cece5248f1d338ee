"""RelexCallback: the adapter between Trainer events and the RELEX pieces.

The callback holds one :class:`~relex_callback.trainer.window.Window` (``callback.window``) and forwards the Trainer's
events to it: ``on_train_begin`` checks the outputs and opens the window (fresh or resumed); ``on_step_end`` records a
snapshot and, at tcut, runs the end-of-window pipeline; ``on_save`` keeps the window (or the validation state) in each
trainer checkpoint; ``on_log`` hands the ``relex/*`` metrics to the reporting integrations. The Trainer is linked
explicitly (``RelexCallback(..., trainer=trainer)``, :meth:`RelexCallback.attach`) or found at ``on_train_begin``
(:mod:`relex_callback.trainer.trainer_link`).
"""

from __future__ import annotations

import itertools
import logging
import os
import textwrap
import weakref
from typing import Optional, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..compat import callback_handler, check_versions, holds, put_first, trl_in_use
from ..config import SETTINGS, SETTINGS_DOC, RelexConfig, RelexSettings
from .trainer_link import running_trainer, take_back_original
from .window import Window

logger = logging.getLogger("relex_callback")


_CREATED = itertools.count()


class RelexCallback(TrainerCallback, ExportableState):
    r"""
    Early stopping with rank-1 linear extrapolation of the weights (RELEX, arXiv 2605.21468).

    Under RL with verifiable rewards, each weight tensor moves along an almost fixed direction with a coefficient
    that grows almost linearly with the step. The callback records ``Delta_t = theta_t - theta_0`` for every
    ``stride``-th optimizer step up to ``tcut``, takes each tensor's top singular direction ``v`` with coefficients
    ``c_t = <Delta_t, v>``, fits ``c_t = a*t + b`` on the real step numbers, and writes

    $$\theta(H) = \theta_0 + (a H + b)\, v$$

    for every horizon ``H`` as a Hugging Face checkpoint ``<output_dir>/step-H`` that ``from_pretrained`` loads,
    plus ``relex_state.safetensors`` (any other horizon later, with ``relex materialize``) and ``report.json``.

    {settings}

    The Trainer: ``RelexCallback(..., trainer=trainer)`` links it (then ``trainer.add_callback(callback)``, as TRL's
    ``WinRateCallback(judge, trainer)``); :meth:`attach` links and adds; without either, the Trainer that runs the
    callback is found at ``on_train_begin`` (docs/callback.md).

    Example:

    ```python
    from trl import GRPOConfig, GRPOTrainer
    from relex_callback import RelexCallback

    trainer = GRPOTrainer(
        model="Qwen/Qwen2.5-Math-1.5B",
        reward_funcs=accuracy_reward,
        args=GRPOConfig(output_dir="runs/qwen-math", lr_scheduler_type="constant"),
        train_dataset=dataset,
        callbacks=[RelexCallback(tcut=75, horizons=[500, 1000])],
    )
    trainer.train()  # stops after step 75; writes runs/qwen-math/relex/step-500, step-1000
    ```
    """

    def __init__(
        self,
        tcut: int,
        horizons,
        stride: int = 1,
        fit_start: Optional[int] = None,
        rank: int = 1,
        storage: str = "auto",
        dtype: str = "bfloat16",
        max_buffer_bytes=None,
        stop_training: bool = True,
        output_dir: Optional[str] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        solver: str = "auto",
        overwrite: bool = False,
        max_shard_size="50GB",
        fold_rank: Optional[int] = None,
        buffer_slots: Optional[int] = None,
        on_nonfinite: str = "error",
        merge_lora: bool = False,
        fit: str = "linear",
        fit_window: Optional[int] = None,
        degree: int = 2,
        on_flat_reward: str = "warn",
        reward_metric: Optional[str] = None,
        evaluate_horizons: bool = False,
        keep_best: Optional[int] = None,
        fit_clock: str = "lr",
        trainer=None,
    ):
        given = dict(locals())  # the arguments as passed, before any other local is bound
        check_versions(("transformers", "accelerate", "trl") if trl_in_use() else ("transformers", "accelerate"))
        self.settings = RelexSettings.validate(**{s.name: given[s.name] for s in SETTINGS})
        self.window = Window(self.settings)  # the window's state and life (trainer/window.py)
        self._trainer = None  # weakref to the Trainer linked by trainer= / attach()
        self._created = next(_CREATED)
        RelexCallback._instances[self._created] = self
        if trainer is not None:
            self._trainer = weakref.ref(trainer)

    _instances: "weakref.WeakValueDictionary[int, RelexCallback]" = weakref.WeakValueDictionary()

    def attach(self, trainer) -> "RelexCallback":
        """Link this callback to ``trainer`` and add it to the trainer's callbacks if it is not there yet (first,
        so that its ``on_log`` adds the ``relex/*`` metrics before the reporting integrations see them). Returns the
        callback: ``RelexCallback(tcut=75, horizons=[500]).attach(trainer)``. ``RelexCallback(..., trainer=trainer)``
        links without adding (TRL's pattern, as ``WinRateCallback(judge, trainer)``: then ``trainer.add_callback``);
        attaching an instance added already, or adding one attached, keeps one entry."""
        self._trainer = weakref.ref(trainer)
        handler = callback_handler(trainer)
        if not holds(handler, self):
            trainer.add_callback(self)
        put_first(handler, self)
        return self

    @property
    def trainer(self):
        """The Trainer linked by ``trainer=`` / :meth:`attach`, else the one found running the callback at
        ``on_train_begin``, or ``None``."""
        linked = self._trainer() if self._trainer is not None else None
        return linked if linked is not None else self.window.trainer

    # ----------------------------------------------------------------------------- trainer_state.json
    def state(self) -> dict:
        """What ``trainer_state.json`` keeps of this callback (``transformers.trainer_callback.ExportableState``): the
        arguments, and under ``relex_checkpoint`` the run id and step of the window and where this checkpoint's
        trajectory is saved. A resume reads it from the trainer state it resumed with, so the trajectory is found
        (and checked to be this run's) wherever the checkpoint is."""
        s = self.settings
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((f, getattr(s, f)) for f in RelexSettings.__dataclass_fields__ if f != "auto_horizons")}
        if s.auto_horizons:
            args["horizons"], args["evaluate_horizons"] = "auto", False  # validate() derives both again
        w = self.window
        store_id = w.store.run_id if w.store is not None else w.run_id
        ckpt = os.path.join(w.ckpt_root, f"checkpoint-{w.step_seen}") if w.ckpt_root else None
        record = {"run_id": store_id, "step": w.step_seen, "window_done": w.done,
                  "checkpoint": os.path.abspath(ckpt) if ckpt else None,
                  "out_dir": os.path.abspath(self.settings.output_dir or os.path.join(w.ckpt_root, "relex"))
                  if (self.settings.output_dir or w.ckpt_root) else None}
        return {"args": args, "attributes": {"relex_checkpoint": record}}

    @classmethod
    def from_config(cls, cfg: RelexConfig, **overrides) -> "RelexCallback":
        kw = cfg.to_kwargs()
        kw.update(overrides)
        cb = cls(**kw)
        cb.window.entry = "trl_parser"  # messages name --relex_overwrite, not the argument (errors.name_switch)
        return cb

    def __getattr__(self, name):  # the settings read as attributes: cb.tcut, cb.horizons, cb.stop_training, ...
        settings = self.__dict__.get("settings")
        if settings is not None and name in RelexSettings.__dataclass_fields__:
            value = getattr(settings, name)
            return list(value) if name in ("include", "exclude") and value is not None else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _select(self, model):
        self.window.select(model)

    # ---------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        orig = take_back_original(self, RelexCallback._instances)
        if orig is not None:
            return orig.on_train_begin(args, state, control, model=model, **kwargs)
        # the linked Trainer, else the one found through its callback handler; this callback goes first in its list
        trainer = running_trainer(self, self._trainer() if self._trainer is not None else None)
        resumed = self.window.begin(args, state, trainer)  # a second train() starts afresh
        if isinstance(state.stateful_callbacks, dict):  # resumed from a checkpoint saved without this callback: the
            state.stateful_callbacks.setdefault("RelexCallback", self.state())  # Trainer's next save needs the key
        self.window.open(args, state, model, kwargs, resumed)

    def on_step_end(self, args, state, control, **kwargs):
        self.window.step(args, state, control, kwargs)

    def on_save(self, args, state, control, **kwargs):
        self.window.save(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.window.log(state, logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.window.end(args, state, kwargs)


def _window_attribute(name: str, doc: str):
    return property(lambda self: getattr(self.window, name), lambda self, v: setattr(self.window, name, v), doc=doc)


for _name, _doc in (("store", "the TrajectoryStore of the open window"), ("tracked", "this process's tracked tensors"),
                    ("topology", "the process layout (Topology)"), ("validation", "validation mode after tcut"),
                    ("done", "whether the window is done"), ("report", "report.json of the window, once written"),
                    ("skipped_steps", "steps dropped with on_nonfinite='skip'"),
                    ("end_of_window_seconds", "seconds of the end of the window at tcut")):
    setattr(RelexCallback, _name, _window_attribute(_name, f"``callback.window.{_name}``: {_doc}."))


RelexCallback.__doc__ = RelexCallback.__doc__.replace("    {settings}\n",
                                                      textwrap.indent(SETTINGS_DOC.strip("\n"), "    ") + "\n")
