"""The one end-of-window pipeline: checks -> solve -> state file -> each horizon -> report.

:mod:`.finalize` runs it for every caller (the callback at ``tcut``, ``relex extrapolate``) and every writer; the
solve is a strategy (:class:`.finalize.SolveStrategy`): buffered (one arena in memory) or streamed tensor-major by
groups straight from memory-mapped checkpoints (:mod:`.streamed`). May import: the ground floor,
:mod:`relex_callback.core`,
:mod:`relex_callback.files` and :mod:`relex_callback.trajectory`. Never trainers or the command line.
"""
