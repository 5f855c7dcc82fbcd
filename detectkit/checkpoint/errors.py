"""The errors of reading and writing checkpoints; each message names the file and the problem."""

from __future__ import annotations

import pickle

from detectkit.utils.files import DiskFullError  # the one atomic write raises it

__all__ = ["CheckpointError", "RefusedPickleError", "DiskFullError"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and what is wrong."""


class RefusedPickleError(CheckpointError, pickle.UnpicklingError):
    """The file holds pickled code (a global outside tensors/containers/model classes): never run."""
