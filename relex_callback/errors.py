"""Exceptions raised by relex_callback.

Every input mistake raises :class:`RelexInputError` with a message that says what to change; the CLI turns it
into one line on stderr and exit code 2. Anything else is a bug or an environment failure and keeps its traceback.
"""

import signal


class RelexError(Exception):
    """Base class of every error this package raises on purpose."""


class RelexInputError(RelexError, ValueError):
    """A setting, argument or input file is wrong; the message says what to change."""


class RelexMemoryError(RelexInputError):
    """The trajectory does not fit the chosen storage tier; the message names the bytes and the options."""


class RelexNonFiniteError(RelexError, FloatingPointError):
    """A weight delta contains NaN or Inf; the message names the tensor and the step."""


class RelexWriteError(RelexError, OSError):
    """Writing a checkpoint failed (disk full, unwritable directory); nothing was left under the final name."""


class RelexEndOfWindowError(RelexError, RuntimeError):
    """The end of a window failed for a reason that is not an input (a kernel, CUDA, out of memory, a bug); the
    recorded window was kept and the message names the command that finishes the job. The original error is its
    ``__cause__``."""


class RelexInterrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached the ``relex`` command while it worked (a ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` takes it for a failed write). Raised by the command's
    signal handler; the writer it interrupts removes what it had written, and the command exits with one line."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.removed: list = []  # what the interrupted writer had written and removed again
        self.out_dir = None
        self.complete = False  # the signal came after the writer had finished: every output is whole
        super().__init__(f"interrupted by {self.name}")


OVERWRITE_HINT = "pass overwrite"
"""How a message built below the entry points (files/fs.py, the writers) asks for ``overwrite``; each entry point
names its own switch in its place (:func:`name_switch`)."""
SWITCHES = {
    "callback": "overwrite=True to RelexCallback",
    "trl_parser": "--relex_overwrite (relex_overwrite: true in the YAML config)",
    "cli": "--overwrite",
}


def name_switch(e: BaseException, entry: str) -> BaseException:
    """``e`` with :data:`OVERWRITE_HINT` replaced by the switch of ``entry`` (a key of :data:`SWITCHES`): the same
    exception type, traceback and cause; ``e`` itself when its message does not ask for overwrite."""
    msg = str(e)
    if not isinstance(e, RelexError) or OVERWRITE_HINT not in msg or entry not in SWITCHES:
        return e
    new = type(e)(msg.replace(OVERWRITE_HINT, "pass " + SWITCHES[entry]))
    new.__cause__, new.__suppress_context__ = e.__cause__, e.__suppress_context__
    return new.with_traceback(e.__traceback__)
