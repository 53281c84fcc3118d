"""User-facing errors: one line that names the bad value and the fix.

The CLI and the notebooks print these without a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class MetabolicError(Exception):
    """Base class for errors caused by input (config, assets, data), not by a bug."""


class ConfigError(MetabolicError, ValueError):
    """A profile, override key or value is invalid."""


class AssetError(MetabolicError, FileNotFoundError):
    """An asset (corpus, tokenizer, encoder, backbone) could not be resolved."""


class DataError(MetabolicError, ValueError):
    """Input data is empty, inconsistent or made for another configuration."""
