"""The trainer side: RELEX inside a running transformers ``Trainer`` / TRL ``GRPOTrainer``.

Owns :class:`~.callback.RelexCallback` (the settings, the link to the Trainer, the events forwarded), the window's
state and life (:mod:`.window`, its computations in :mod:`.lifecycle`), finding the Trainer that runs it
(:mod:`.trainer_link`; every private part of transformers / TRL it touches is :mod:`relex_callback.compat`'s), the
process layout and its collectives (:mod:`.topology`: single, DDP/ZeRO-1/2, ZeRO-3, FSDP2), validation mode
(:mod:`.validation`) and scoring horizons with the trainer's own evaluation (:mod:`.scoring`, with
:mod:`.live_weights` and :mod:`.evaluation`). May import every layer below it, the offline API included (scoring
rebuilds horizons from a state file as ``relex materialize`` does). Never the examples.
"""
