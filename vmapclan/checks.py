"""The checks at the public boundary, written once: one vocabulary and one wording for every refusal.

A refusal reads ``"<what> must be <expected>, got <value>"``, where ``what`` names the argument or
setting the way the caller knows it (``"Clan: round_length"``, ``"clan.duty_cycle"``,
``"schedule[1] ('clan'): clan.duty_cycle"``). The predicates (:func:`is_int`, :func:`is_number`)
say what Python's own types do not: a ``bool`` is an ``int`` to Python but never a count or a rate
here, and a number must be finite.

Example:
    >>> positive_int(3, "Clan: round_length")
    3
    >>> number_in(1.5, "clan.duty_cycle", 0, 1, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: clan.duty_cycle must be a number in (0, 1], got 1.5
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Collection
from typing import NoReturn

import torch

__all__ = ["is_int", "is_number", "refuse", "positive_int", "int_in", "number_in", "one_of", "check_device"]


def is_int(value) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def refuse(what: str, expected: str, got, error: type[Exception] = ValueError) -> NoReturn:
    """Raise ``error("<what> must be <expected>, got <got!r>")``."""
    raise error(f"{what} must be {expected}, got {got!r}")


def positive_int(value, what: str) -> int:
    """``value`` if it is an int >= 1, else :func:`refuse` (``"... must be a positive int, got ..."``)."""
    if not is_int(value) or value < 1:
        refuse(what, "a positive int", value)
    return value


def int_in(value, what: str, low: int = 0, high: int | None = None, expected: str | None = None) -> int:
    """``value`` if it is an int in ``[low, high]`` (``high=None``: no upper bound), else :func:`refuse`.

    The expectation reads ``"an int in [low, high]"``, or ``"an int >= low"`` without ``high``
    (or ``expected``, when that wording is not the caller's).
    """
    if not is_int(value) or value < low or (high is not None and value > high):
        refuse(what, expected or (f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"), value)
    return value


def number_in(value, what: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
              expected: str | None = None) -> float:
    """``float(value)`` if it is a finite number in the interval, else :func:`refuse`.

    Args:
        value: The value to check.
        what: Its name, for the message.
        low, high: The bounds (``math.inf`` for none).
        low_open, high_open: Whether a bound itself is outside the interval.
        expected: The expectation's wording, when the interval's (``"a number in (0, 1]"``) is not it.
    """
    ok = is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        refuse(what, expected or f"a number in {interval}", value)
    return float(value)


def one_of(value, what: str, options: Collection, expected: str | None = None):
    """``value`` if it is one of ``options``, else :func:`refuse` (``"... must be one of [...]"``)."""
    if value not in options:
        refuse(what, expected or f"one of {list(options)}", value)
    return value


def check_device(device, who: str) -> torch.device:
    """``device`` as a ``torch.device``, refusing a name torch does not know or a device it cannot use.

    Args:
        device: A device or its name (``"cpu"``, ``"cuda:0"``).
        who: The caller, for the message (``"Clan"``).

    Raises:
        ValueError: naming the device and why it cannot be used (e.g. a torch built without CUDA).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{who}: device must be a device such as 'cpu' or 'cuda', got {device!r} ({err})") from None
    try:
        torch.empty(0, device=device)  # torch raises AssertionError for CUDA on a CPU-only build
    except (RuntimeError, AssertionError) as err:
        if device.type == "cuda" and not torch.backends.cuda.is_built():
            reason = f"this torch ({torch.__version__}) is built without CUDA"
        else:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{who}: device {str(device)!r} cannot be used: {reason}") from None
    return device


def read_regular_file(path, who: str | None, missing: str = "no such file") -> bytes:
    """The bytes of the file ``path``, refusing anything else (a directory, a FIFO) without blocking on it.

    Raises:
        FileNotFoundError: ``"{who}: {missing} at {path}"`` when nothing is there.
        ValueError: for a path that is not a regular file, or that cannot be read (the message
            starts with ``"{who}: "``, or with the path when ``who`` is ``None``).
    """
    prefix = "" if who is None else f"{who}: "
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}{missing} at {path}") from None
    except OSError as err:
        raise ValueError(f"{prefix}cannot open {path}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{prefix}{path} is {'a directory, not a file' if stat.S_ISDIR(mode) else 'not a regular file'}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{prefix}cannot read {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
