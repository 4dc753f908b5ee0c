"""The one error type of a user's refused input, shared by the applications and the training scripts.

The other documented user errors belong to the module that detects them (``CheckpointError``,
``ImageError``, ``UnknownModelError``, ``DeviceError``); this one is for everything else a command
refuses: an option value, a dataset, a file. The command line prints its message as one line and
exits with code 2.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A refused option value, dataset or path: the message is one line naming the option by its
    command-line name (``--out``, ``--data-dir``, ...) or the path, what was expected and what was found."""
