"""Errors raised by the library.

Every error a user can cause with bad input is a ``DualTokenError`` (a ``ValueError``), so callers can catch one
class and show its message; the subclasses say which kind of input was wrong.
"""


class DualTokenError(ValueError):
    """Base class of every input error the library raises on purpose."""


class ImageInputError(DualTokenError):
    """An image file or image tensor cannot be used (corrupt, empty, too large, wrong shape or dtype)."""


class CodesError(DualTokenError):
    """Token codes of the wrong shape, dtype or outside the codebook."""


class CheckpointError(DualTokenError):
    """A model folder is missing files, holds a non-safetensors file, or does not match its config."""


class ConfigError(DualTokenError):
    """A config or preset is unknown or inconsistent."""


class MissingDataError(DualTokenError):
    """A data set needed for the toy world or training is not installed."""


class DataError(DualTokenError):
    """A data source (shard, folder) is empty or unreadable as a whole."""
