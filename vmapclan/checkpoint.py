"""Atomic checkpoint files: a crash while saving never destroys the previous checkpoint."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` (a plain dict of tensors and values) to ``path`` atomically.

    The state is written to a temporary file in the same directory, flushed to disk, and then
    renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows). A process killed at
    any moment leaves either the old checkpoint or the new one, never a torn file.

    Args:
        state: What to save, e.g. ``{"clan": clan.state_dict(), ...}``.
        path: Destination file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX: fsync the directory entry).
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The checkpoint file.
        map_location: As for ``torch.load`` (e.g. ``"cpu"``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}")
    try:
        # Checkpoints are plain containers of tensors and numbers: no pickled code is needed to read them.
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"load_checkpoint: {path} is not a readable checkpoint ({err})") from err

