"""Exceptions raised by fashsim.

Everything fashsim raises on bad input derives from :class:`FashsimError`, so callers (the demo
app, the CLI) can catch one type and show its message; the message always says what was wrong
and, where there is one, what to do about it.
"""

from __future__ import annotations


class FashsimError(Exception):
    """Base class of every error fashsim raises deliberately."""


class DatasetNotFoundError(FashsimError):
    """A dataset could not be found locally nor downloaded."""


class DatasetFormatError(FashsimError):
    """A dataset file or catalog exists but is malformed."""


class InvalidImageError(FashsimError, ValueError):
    """Bytes or a file that cannot be turned into an image the model can read."""


class FolderInUseError(FashsimError):
    """Another process is writing to the same folder (a training run, a shop build)."""
