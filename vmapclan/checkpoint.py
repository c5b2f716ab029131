"""Checkpoint files: atomic, verified by a content hash, read without trusting a byte of them.

A checkpoint file is one header line, ``vmapclan checkpoint 2 sha256=<64 hex digits> size=<n>``,
then the ``n`` bytes of ``torch.save(state)``. :func:`load_checkpoint` checks the header, the
size and the hash before torch parses anything, so a flipped bit, a torn write or a truncated
file is refused with one line instead of loading different numbers. The state itself stays a
plain dict of tensors and values (read back with ``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import tempfile

import torch

from .checks import read_regular_file
from .rundir import process_alive

__all__ = ["save_checkpoint", "load_checkpoint", "FILE_FORMAT_VERSION"]

#: The file format (the header line and the hash). Version 1 files were a bare ``torch.save``
#: without a hash; they are refused because nothing can vouch for their contents.
FILE_FORMAT_VERSION = 2
_MAGIC = b"vmapclan checkpoint "
_HEADER = re.compile(rb"vmapclan checkpoint (\d+) sha256=([0-9a-f]{64}) size=(\d+)\n")
_MAX_HEADER = 128  # the header line is about 100 bytes


def _temporary_prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path) + "-"


def _remove_stale_temporaries(path: str) -> None:
    """Delete temporary files a killed writer of ``path`` left behind.

    Each writer puts its pid in its temporary file's name; a file whose writer is no longer
    running (or whose name holds no pid: an older writer's) is debris, never a checkpoint.
    """
    directory, prefix = os.path.dirname(path), _temporary_prefix(path)
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if not (pid.isdigit() and process_alive(int(pid))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` (a plain dict of tensors and values) to ``path`` atomically, with its hash.

    The state is serialized in memory, written with its header to a temporary file in the same
    directory, flushed to disk and renamed over ``path`` (``os.replace`` is atomic on POSIX and
    Windows): a process killed at any moment leaves the old checkpoint or the new one, never a
    torn file. Temporary files of earlier writers that were killed are removed first.

    Args:
        state: What to save, e.g. ``{"clan": clan.state_dict(), ...}``.
        path: Destination file.

    Raises:
        OSError: if the file cannot be written (a full disk, a read-only directory); the
            previous checkpoint is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: a full disk then fails in os.write with ENOSPC, not inside torch
    payload = buffer.getbuffer()
    header = b"%s%d sha256=%s size=%d\n" % (_MAGIC, FILE_FORMAT_VERSION, hashlib.sha256(payload).hexdigest().encode(),
                                            len(payload))
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(path)}{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        payload.release()
    # Make the rename itself durable (POSIX: fsync the directory entry).
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, after checking its size and hash.

    Args:
        path: The checkpoint file.
        map_location: As for ``torch.load`` (e.g. ``"cpu"``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a regular file, not a checkpoint, of another format
            version, truncated, or its contents do not match its hash.
    """
    path = os.fspath(path)
    data = read_regular_file(path, "load_checkpoint", "no checkpoint")
    if not data.startswith(_MAGIC):
        if data[:4] == b"PK\x03\x04":  # a bare torch.save zip: what format 1 wrote
            raise ValueError(f"load_checkpoint: {path} is a bare torch.save file: checkpoint format 1 (no content "
                             f"hash), or no checkpoint at all; this vmapclan reads format {FILE_FORMAT_VERSION}, "
                             f"which save_checkpoint writes (a format 1 run cannot resume: start a new run)")
        raise ValueError(f"load_checkpoint: {path} is not a vmapclan checkpoint (no header)")
    end = data.find(b"\n", 0, _MAX_HEADER)
    match = _HEADER.fullmatch(data[:end + 1]) if end >= 0 else None
    if match is None:
        raise ValueError(f"load_checkpoint: {path} has a damaged header")
    version, digest, size = int(match[1]), match[2].decode(), int(match[3])
    if version != FILE_FORMAT_VERSION:
        raise ValueError(f"load_checkpoint: {path} has checkpoint format {version}, this vmapclan reads format "
                         f"{FILE_FORMAT_VERSION}")
    payload = memoryview(data)[end + 1:]
    if len(payload) != size:
        raise ValueError(f"load_checkpoint: {path} holds {len(payload)} bytes after its header, its header says "
                         f"{size}: the file is truncated or damaged")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"load_checkpoint: {path} is damaged: its contents do not match their sha256 hash")
    try:
        # Checkpoints are plain containers of tensors and numbers: no pickled code is needed to read them.
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"load_checkpoint: {path} is not a readable checkpoint ({err})") from err
