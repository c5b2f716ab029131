"""The built-in tasks, on data that ships with Python or scikit-learn, and the names a config gives them.

- ``digits-mlp``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes) and an MLP.
- ``stdlib-chars``: next-character prediction on the CPython standard library's own ``.py``
  sources with a small causal transformer (:class:`~vmapclan.char_transformer.CharTransformer`).
  The file list is sorted and shuffled with a fixed seed, so the corpus is the same on every run;
  files are split into train and validation by a hash of their path (a file is never in both),
  and the corpus is capped at ``data.max_chars`` characters so it loads in about a second.

The task protocol itself is :mod:`vmapclan.task`; its names are importable from here too.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import sysconfig
import zlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .char_transformer import Block, CharTransformer
from .checks import int_in, number_in, positive_int
from .config import DataSpec
from .task import TASKS, Task, TaskData, data_batches, data_length, get_task, resolve_task, task_reference

__all__ = ["Task", "TaskData", "DigitsTask", "StdlibCharsTask", "CharTransformer", "get_task", "resolve_task",
           "task_reference", "data_length", "data_batches", "stdlib_corpus", "stdlib_files", "load_digits",
           "digits_mlp", "TASKS", "VOCAB"]


def _positive_ints(model: dict, names) -> None:
    for name in names:
        positive_int(model[name], f"model.{name}")


class DigitsTask(Task):
    """scikit-learn's digits: 8x8 images scaled to [0, 1], 10 classes, an MLP 64 -> hidden -> hidden -> 10.

    Model settings: ``hidden`` (width of the two hidden layers, default 128).
    """

    name = "digits-mlp"
    model_defaults = {"hidden": 128}
    sample_mean_loss = True  # cross-entropy, each sample alike
    data_reads = ("val_fraction",)

    def model_settings(self, model) -> dict:
        """The settings with defaults; ``hidden`` must be a positive int."""
        settings = super().model_settings(model)
        _positive_ints(settings, ["hidden"])
        return settings

    def split(self, data: DataSpec, seed: int):
        """:func:`load_digits` with ``data.val_fraction``."""
        return load_digits(data.val_fraction, seed)

    def build_model(self, model: dict, data: DataSpec) -> nn.Module:
        """The MLP (``model["hidden"]`` wide)."""
        return digits_mlp(model["hidden"])

    def loss(self, output, target):
        """Cross-entropy."""
        return F.cross_entropy(output, target)


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32) / 16.0, torch.tensor(bunch.target, dtype=torch.long)


def load_digits(val_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled digits as tensors, shuffled by ``seed`` and split into train and validation.

    Images are 64 floats in [0, 1] (pixel values / 16); labels are ``long`` in 0..9.

    Returns:
        ``((x_train, y_train), (x_val, y_val))``.

    Example:
        >>> (x, y), (x_val, y_val) = load_digits(0.2)
        >>> x.shape, x_val.shape
        (torch.Size([1438, 64]), torch.Size([359, 64]))
    """
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - max(1, round(val_fraction * len(x)))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def digits_mlp(hidden: int = 256) -> nn.Module:
    """The digits MLP: 64 -> hidden -> hidden -> 10 with ReLUs."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


VOCAB = 128  # ASCII codes; other characters are read as "?"


def stdlib_files() -> list[str]:
    """Relative paths of the standard library's ``.py`` files (no site-packages), sorted.

    Returns:
        Paths relative to ``sysconfig.get_paths()["stdlib"]``.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


@functools.lru_cache(maxsize=4)
def stdlib_corpus(val_fraction: float, max_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token streams (``uint8``, ASCII codes) from the standard library's sources.

    Files go to validation when a CRC32 of their path falls in the lowest ``val_fraction`` of its
    range, so the split is by file and does not depend on which files a Python install has. The
    sorted list is shuffled with a fixed seed (a spread of modules rather than the alphabet's
    start) and read until each side holds its share of ``max_chars``.

    Args:
        val_fraction: Share of files (and of the character budget) for validation, in (0, 1).
        max_chars: Characters read in all.

    Returns:
        ``(train_tokens, val_tokens)``.

    Raises:
        RuntimeError: if no standard library sources are found.
    """
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"stdlib-chars: no .py files under {sysconfig.get_paths()['stdlib']!r}")
    random.Random(0).shuffle(files)
    root = sysconfig.get_paths()["stdlib"]
    budget = {False: int(max_chars * (1 - val_fraction)), True: max(1, int(max_chars * val_fraction))}
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    have = {False: 0, True: 0}
    for rel in files:
        is_val = zlib.crc32(rel.encode()) / 2**32 < val_fraction
        if have[is_val] >= budget[is_val]:
            if all(have[k] >= budget[k] for k in budget):
                break
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read(budget[is_val] - have[is_val])
        data = text.encode("ascii", errors="replace")  # non-ASCII characters become '?'
        parts[is_val].append(data + b"\n")
        have[is_val] += len(data) + 1
    out = []
    for is_val in (False, True):
        blob = b"".join(parts[is_val])
        out.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone())
    return out[0], out[1]


class StdlibCharsTask(Task):
    """Next-character prediction on the standard library's sources with a small causal transformer.

    Model settings: ``d_model`` (64), ``n_layers`` (2), ``n_heads`` (4, dividing ``d_model``),
    ``dropout`` (0.0) and ``max_len`` (0: ``data.seq_len``), the longest window the position
    embedding holds. A phase may change ``data.seq_len`` up to ``max_len``, and grow the model
    by appending blocks (see :meth:`grow`).
    """

    #: The keys of a phase's ``model.grow`` table, with their defaults.
    GROW_DEFAULTS = {"blocks": 1, "init": "identity"}

    name = "stdlib-chars"
    sample_mean_loss = True  # cross-entropy over every position of equal-length windows
    data_reads = ("val_fraction", "seq_len", "max_chars")
    model_defaults = {"d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "max_len": 0}
    phase_data = ("seq_len",)

    def model_settings(self, model) -> dict:
        """The settings with defaults, checked (``n_heads`` must divide ``d_model``)."""
        settings = super().model_settings(model)
        _positive_ints(settings, ["d_model", "n_layers", "n_heads"])
        max_len = settings["max_len"]
        int_in(max_len, "model.max_len", 0)
        settings["dropout"] = number_in(settings["dropout"], "model.dropout", 0, 1, high_open=True)
        if settings["d_model"] % settings["n_heads"]:
            raise ValueError(f"model.n_heads must divide model.d_model, got n_heads={settings['n_heads']}, "
                             f"d_model={settings['d_model']}")
        return settings

    def check_data(self, model: dict, data: DataSpec) -> None:
        """Refuse a ``seq_len`` longer than the model's ``max_len``."""
        if model["max_len"] and data.seq_len > model["max_len"]:
            raise ValueError(f"data.seq_len={data.seq_len} is longer than model.max_len={model['max_len']}; "
                             f"raise model.max_len")

    def split(self, data: DataSpec, seed: int):
        """Windows of ``data.seq_len`` characters and their next characters, from :func:`stdlib_corpus`."""
        train, val = stdlib_corpus(data.val_fraction, data.max_chars)

        def windows(tokens):
            # Windows of seq_len + 1 that overlap by one character: inputs and next-char targets.
            chunks = tokens.long().unfold(0, data.seq_len + 1, data.seq_len)
            return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

        if len(val) < data.seq_len + 1 or len(train) < data.seq_len + 1:
            raise ValueError(
                f"data.max_chars={data.max_chars} is too small for data.seq_len={data.seq_len} "
                f"({len(train)} training and {len(val)} validation characters)"
            )
        return windows(train), windows(val)

    def build_model(self, model: dict, data: DataSpec) -> nn.Module:
        """A :class:`CharTransformer` sized by ``model`` for windows up to ``max_len`` (or ``data.seq_len``)."""
        return CharTransformer(VOCAB, model["d_model"], model["n_layers"], model["n_heads"],
                               model["max_len"] or data.seq_len, model["dropout"])

    def loss(self, output, target):
        """Cross-entropy over every position."""
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def grow(self, module: nn.Module, settings) -> nn.Module:
        """Append ``blocks`` transformer blocks to the :class:`CharTransformer` (in place).

        ``settings`` is the phase's ``model.grow`` table: ``blocks`` (default 1) and ``init``:

        - ``"identity"`` (default): fresh blocks, initialised as the model's own, with their two
          output projections (attention ``proj`` and the MLP's last layer) zero, weights and
          biases. Each new block then adds nothing to the residual stream: the grown model
          computes exactly what the model before it did, and training moves the new blocks away
          from the identity.
        - ``"copy"``: copies of the last block, as progressive stacking does; the model's
          function changes (the last block's transformation is applied once more).

        Example:
            >>> m = CharTransformer(128, 16, 1, 2, 8)
            >>> len(StdlibCharsTask().grow(m, {"blocks": 2}).blocks)
            3

        Raises:
            TypeError: if ``settings`` is not a table.
            ValueError: for an unknown key, ``blocks`` not a positive int, or another ``init``.
        """
        if not isinstance(settings, Mapping):
            raise TypeError(f"model.grow must be a table of {sorted(self.GROW_DEFAULTS)}, got {settings!r}")
        unknown = [k for k in settings if k not in self.GROW_DEFAULTS]
        if unknown:
            raise ValueError(f"model.grow: unknown setting {unknown[0]!r}; it reads {sorted(self.GROW_DEFAULTS)}")
        settings = {**self.GROW_DEFAULTS, **settings}
        blocks, init = settings["blocks"], settings["init"]
        positive_int(blocks, "model.grow.blocks")
        if init not in ("identity", "copy"):
            raise ValueError(f"model.grow.init must be 'identity' or 'copy', got {init!r}")
        if not isinstance(module, CharTransformer):
            raise TypeError(f"model.grow: expected a CharTransformer, got {type(module).__name__}")
        last = module.blocks[-1]
        reference = module.head.weight
        for _ in range(blocks):
            if init == "copy":
                block = copy.deepcopy(last)
            else:
                block = Block(last.ln1.normalized_shape[0], last.n_heads, last.dropout)
                with torch.no_grad():
                    for sub in block.modules():
                        if isinstance(sub, nn.Linear):
                            sub.weight.normal_(0.0, 0.02)  # as CharTransformer initialises its own
                    for out in (block.proj, block.mlp[2]):
                        out.weight.zero_()
                        out.bias.zero_()
            module.blocks.append(block.to(device=reference.device, dtype=reference.dtype))
        return module



TASKS.update({"digits-mlp": DigitsTask(), "stdlib-chars": StdlibCharsTask()})
