"""The trajectory: theta_0 and the recorded deltas of one window, wherever they live.

Owns the store (a storage tier: device, pinned host or a memory-mapped disk file; the ring of delta rows, the
per-step snapshot and the streaming fold; persistence into trainer checkpoints; opening a fresh or resumed window)
and the memory plan that sizes it (:mod:`.plan`, also ``relex plan``). May import: the ground floor,
:mod:`relex_callback.core` and :mod:`relex_callback.files`. Never the pipeline, trainers or the command line.
"""
