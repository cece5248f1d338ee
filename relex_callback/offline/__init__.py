"""The offline side: RELEX over files already on disk.

:mod:`.api` holds ``extrapolate_checkpoints``, ``extrapolate_trajectory`` and ``materialize`` (the public functions
re-exported by ``relex_callback``); :mod:`.cli` is the ``relex`` command (``extrapolate``, ``materialize``,
``report``, ``plan``): argument parsing and one call each. May import every layer below it: the ground floor,
``core``, ``files``, ``trajectory``, ``pipeline``. Never the trainer side.
"""
