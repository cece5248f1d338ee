"""The math: everything RELEX computes from numbers, nothing it reads or writes.

Owns the solve over a trajectory arena (:mod:`.solver`: Gram or power passes, top eigenpairs, directions, the
extrapolated piece), the coefficient curves (:mod:`.fit`), the in-window backtest (:mod:`.backtest`), the streaming
fold's slot plan (:mod:`.fold`), the reward trend over the window (:mod:`.trend`) and the Triton kernels with their
torch references (:mod:`.kernels`). May import: the ground floor (``relex_callback.config``, ``.errors``,
``.params``), torch, the standard library. Never files, trajectories, trainers or the command line.
"""
