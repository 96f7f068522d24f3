"""The one error type for bad input (unknown task or method, missing or corrupt file, unreachable hub id, bad flag).

The scripts turn a `BadInput` into one line and exit 2 (`src.cli.run`); every other exception (CUDA out of memory,
a shape bug) keeps its traceback. `BadInput` is a ValueError and `MissingFile` also a FileNotFoundError, so code
that catches those still does.
"""


class BadInput(ValueError):
    """Input the user can fix; the message names the problem and the fix."""


class MissingFile(BadInput, FileNotFoundError):
    """A file the command needs is not there; the message says which command creates it."""
