"""relex_callback: RELEX (rank-1 linear extrapolation of RL weight trajectories) as a transformers/TRL callback.

Public names only; see README.md.
"""

from .errors import (RelexEndOfWindowError, RelexError, RelexInputError, RelexMemoryError, RelexNonFiniteError,
                     RelexWriteError)

__all__ = [
    "RelexCallback",
    "RelexConfig",
    "RelexSettings",
    "RelexError",
    "RelexInputError",
    "RelexMemoryError",
    "RelexNonFiniteError",
    "RelexWriteError",
    "RelexEndOfWindowError",
    "load_state",
    "extrapolate_checkpoints",
    "extrapolate_trajectory",
    "materialize",
    "evaluate_horizons",
]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use only: RelexCallback needs transformers' Trainer machinery (seconds to import), the others
    # need torch (~1.3 s here), and `relex --help` or an argument mistake should answer without either.
    if name == "RelexCallback":
        from .trainer.callback import RelexCallback

        return RelexCallback
    if name in ("RelexConfig", "RelexSettings"):
        from . import config

        return getattr(config, name)
    if name in ("extrapolate_checkpoints", "extrapolate_trajectory", "materialize"):
        from .offline import api

        return getattr(api, name)
    if name == "evaluate_horizons":
        from .trainer.scoring import evaluate_horizons

        return evaluate_horizons
    if name == "load_state":
        from .files.state import load_state

        return load_state
    raise AttributeError(f"module 'relex_callback' has no attribute {name!r}")
