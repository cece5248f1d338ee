"""relex_callback: RELEX (rank-1 linear extrapolation of RL weight trajectories) as a transformers/TRL callback.

Public names only; see README.md.
"""

from .callback import RelexCallback
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
