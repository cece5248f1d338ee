"""relex_callback: RELEX (rank-1 linear extrapolation of RL weight trajectories) as a transformers/TRL callback.

Public names only; see README.md.
"""

from .config import RelexConfig, RelexSettings
from .errors import RelexError, RelexInputError, RelexMemoryError, RelexNonFiniteError
from .state import load_state

__all__ = [
    "RelexCallback",
    "RelexConfig",
    "RelexSettings",
    "RelexError",
    "RelexInputError",
    "RelexMemoryError",
    "RelexNonFiniteError",
    "load_state",
]
__version__ = "0.1.0"


def __getattr__(name):
    # RelexCallback needs transformers' Trainer machinery (seconds to import); the `relex` CLI never does, so it is
    # imported on first use only.
    if name == "RelexCallback":
        from .callback import RelexCallback

        return RelexCallback
    raise AttributeError(f"module 'relex_callback' has no attribute {name!r}")
