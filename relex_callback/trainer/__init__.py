"""The trainer side: RELEX inside a running transformers ``Trainer`` / TRL ``GRPOTrainer``.

Owns :class:`~.callback.RelexCallback` (the glue between Trainer events and the layers below), finding the Trainer
that runs it (:mod:`.trainer_link`), the process layout and its collectives (:mod:`.topology`: single, DDP/ZeRO-1/2,
ZeRO-3, FSDP2), validation mode (:mod:`.validation`) and scoring horizons with the trainer's own evaluation
(:mod:`.scoring`). May import every layer below it, the offline API included (scoring rebuilds horizons from a
state file as ``relex materialize`` does). Never the examples.
"""
