"""Errors a user can act on.

Anything raised as a `ResforgeError` is the user's to fix (a bad name, a bad file, a bad option):
the CLI prints its message alone, without a stack trace. Every other exception is a bug and keeps
its traceback.
"""


class ResforgeError(Exception):
    """A problem with the user's input, stated in one message."""


class ConfigError(ResforgeError, ValueError):
    """An option, recipe or config file that cannot be used."""


class CheckpointError(ResforgeError):
    """A checkpoint that cannot be read, fetched, or does not fit the model."""


class DataError(ResforgeError):
    """A dataset folder or image that cannot be used."""


class ImageError(DataError):
    """One image that cannot be decoded; `reason` says why in one of a few words (missing, empty, not an image,
    corrupt, too many pixels, too elongated), which a server answers each its own way."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class TrainingError(ResforgeError):
    """A run that cannot go on (a NaN loss); the last good checkpoint is kept."""


class ExportError(ResforgeError):
    """An export that failed its checks; no file was kept."""
