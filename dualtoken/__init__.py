"""DualToken: one SigLIP tower, two residual-VQ vocabularies (pixel and semantic).

Public entry points are imported lazily so that ``import dualtoken`` stays cheap (no transformers import).
"""

from .config import DualTokenConfig, list_presets
from .errors import (CheckpointError, CodesError, ConfigError, DataError, DualTokenError, ImageInputError,
                     MissingDataError)

__version__ = "0.1.0"

_LAZY = {
    "DualTokenizer": "tokenizer",
    "EncodeOutput": "tokenizer",
    "DualTokenizerOutput": "tokenizer",
    "ResidualVQ": "quantizer",
    "Teacher": "teacher",
    "UnifiedModel": "unified",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dualtoken' has no attribute {name!r}")


__all__ = ["DualTokenConfig", "list_presets", "DualTokenError", "ImageInputError", "CodesError", "CheckpointError",
           "ConfigError", "DataError", "MissingDataError", *_LAZY]
