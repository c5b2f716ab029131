"""The run directory's rules: which files make a run, and the lock that keeps one writer in it.

A run directory is written by one process at a time. :func:`run_lock` holds ``run.lock`` in it
for as long as a run writes there: the file names its holder (pid and host), and the lock
itself is an advisory ``flock`` the kernel drops when the holder dies, so the lock of a killed
run is stale the moment it dies and the next run takes it over. Where ``flock`` is missing
the lock is the file's existence, and a lock whose pid no longer runs on this host is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["RUN_FILES", "LOCK_NAME", "RunDirectoryBusy", "run_lock", "run_files_in", "remove_run_files",
           "process_alive"]

#: The files a run writes into its directory (plots included; ``tensorboard`` is a directory).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "history.json", "schedule.json", "config.toml", "best_model.pt",
             "replay.json", "genes.png", "val_losses.png", "train_loss.png", "tensorboard")
#: The lock file's name.
LOCK_NAME = "run.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_held: dict[str, list] = {}  # lock path -> [open file or None, depth]: this process's locks (re-entrant)


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (a pid we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError) as err:
        return isinstance(err, PermissionError)
    return True


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file is unreadable)"


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"


def _acquire_flock(path: Path):
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunDirectoryBusy(f"run directory {path.parent} is in use by {_holder_text(path)}; "
                                   f"wait for that run to end or stop it") from None
        except BaseException:
            f.close()
            raise
        # A holder that just finished unlinked the file it had locked: a lock on that file
        # guards nothing, so lock the file the path names now.
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()  # a dead holder's record, if any: the lock is ours now
    f.write(_holder())
    f.flush()
    return f


def _acquire_exclusive(path: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                stale = holder["host"] == socket.gethostname() and not process_alive(int(holder["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                stale = False
            if not stale:
                raise RunDirectoryBusy(f"run directory {path.parent} is in use by {_holder_text(path)}; wait for "
                                       f"that run to end, or delete {path} if it is gone") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_holder())
        return
    raise RunDirectoryBusy(f"run directory {path.parent} is in use by {_holder_text(path)}")


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike):
    """Hold the lock of run directory ``directory`` (created if missing) inside the ``with`` block.

    Re-entrant within a process: the command holds it around a whole run and the training
    machine, inside, takes it again.

    Raises:
        RunDirectoryBusy: if a live process holds it, naming that process (pid, host, since when).
        OSError: if the directory or the lock file cannot be written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
    else:
        handle = _acquire_flock(path) if fcntl is not None else _acquire_exclusive(path)
        _held[key] = [handle, 1]
    try:
        yield
    finally:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            # The file goes first, while the lock is still held, so no one finds it locked by no one.
            with contextlib.suppress(OSError):
                os.unlink(path)
            if entry[0] is not None:
                entry[0].close()


def run_files_in(directory: str | os.PathLike) -> list[str]:
    """The run files (see :data:`RUN_FILES`) that ``directory`` holds, in that order; ``[]`` if none."""
    directory = Path(directory)
    return [name for name in RUN_FILES if (directory / name).exists()]


def remove_run_files(directory: str | os.PathLike) -> None:
    """Delete the run files of ``directory`` (only those: anything else there stays)."""
    for name in run_files_in(directory):
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # the TensorBoard event files of the replaced run
        else:
            path.unlink()
