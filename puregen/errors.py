"""Error types that the command line maps to exit codes.

`InputError` (and its subclasses) means the user gave something we cannot
use: a bad file, a bad argument, a missing or mismatched checkpoint. The CLI
prints its message without a traceback and exits with 2. Anything else is an
internal failure (exit 1).
"""


class PuregenError(Exception):
    """Base class of every error puregen raises on purpose."""


class InputError(PuregenError, ValueError):
    """Bad input data or arguments; the message names the file and the problem."""


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""
