"""The errors that are the user's to fix: a bad config value, an unreadable image, a missing weights file.

They share `JaxtlError`, which the command line prints as one line with exit code 2. Each also derives from the
built-in exception it refines (`ValueError`, `FileNotFoundError`), so library callers can catch either. Any other
exception is a bug in jaxtl and keeps its traceback.
"""

from __future__ import annotations


class JaxtlError(Exception):
    """An error the user can fix; the message names the file, key or value and what to do."""


class ConfigError(JaxtlError, ValueError):
    """A config key or value is unknown, out of range, or set where the run never reads it."""


class DataError(JaxtlError, ValueError):
    """A dataset folder or image set cannot be used as given (empty class, too few images, ...)."""


class ImageReadError(DataError):
    """An image file cannot be decoded, or is larger than the pixel limit."""


class MissingFileError(JaxtlError, FileNotFoundError):
    """A file or folder the run needs does not exist (and cannot be fetched)."""


class WriteError(JaxtlError, OSError):
    """A write failed (a full disk, no permission, a read-only file system): the message names the directory and
    the cause; nothing half-written is left where it would be read."""


class WorkdirError(JaxtlError, OSError):
    """A workdir cannot be used: it is a file, lies under a file, is read-only, or another run holds it."""


class RunFileError(JaxtlError, ValueError):
    """A file a run wrote (its config, advice or checkpoints) is damaged and cannot be rebuilt from what is left."""


class DivergedError(JaxtlError, ArithmeticError):
    """Training produced a non-finite loss or gradient; the checkpoints hold the last finite state."""
