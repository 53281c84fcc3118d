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


class StaleArtefactError(DataError):
    """An artefact a reader needs is missing or made from other inputs, and building it was not asked for."""


class DivergedError(MetabolicError, FloatingPointError):
    """A training run's loss or weights went non-finite; nothing of it is kept."""


# OS faults a user can fix (not bugs): what to do about each, by errno name.
_OS_FAULT_FIXES = {
    "EROFS": "the file system is read-only: point METABOLIC_DATA (and METABOLIC_FIGURES) at a writable folder",
    "EACCES": "make it writable for this user, or point METABOLIC_DATA (and METABOLIC_FIGURES) at a writable folder",
    "EPERM": "make it writable for this user, or point METABOLIC_DATA (and METABOLIC_FIGURES) at a writable folder",
    "ENOSPC": "the disk is full: free space or point METABOLIC_DATA at a larger disk, then rerun (finished work is kept)",
    "EDQUOT": "the disk quota is used up: free space or point METABOLIC_DATA elsewhere, then rerun (finished work is kept)",
}


def os_fault_message(exc: OSError) -> str | None:
    """One line naming the path and the fix for a read-only, permission or full-disk error; None for others."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name not in _OS_FAULT_FIXES:
        return None
    path = exc.filename if exc.filename is not None else "a file"
    return f"cannot write {path}: {exc.strerror or name} ({name}): {_OS_FAULT_FIXES[name]}"
