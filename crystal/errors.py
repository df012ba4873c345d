"""Errors a user can act on. Each message names the file or key at fault and the fix."""

from __future__ import annotations


class CrystalError(RuntimeError):
    """Base of every error that should reach the user as one line rather than a traceback."""


class DataError(CrystalError):
    """Missing, corrupt or mismatched data."""


class CheckpointError(CrystalError):
    """A checkpoint that is missing, corrupt, or from another run."""


class TrainingError(CrystalError):
    """Training cannot go on (e.g. the loss keeps diverging after the allowed rollbacks)."""


# Config validation (__post_init__) raises ValueError; a missing file FileNotFoundError.
USER_ERRORS = (CrystalError, ValueError, FileNotFoundError)
