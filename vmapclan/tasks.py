"""The task protocol (:class:`Task`) and the built-in tasks on data that ships with Python or scikit-learn.

- ``digits-mlp``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes) and an MLP.
- ``stdlib-chars``: next-character prediction on the CPython standard library's own ``.py``
  sources with a small causal transformer. The file list is sorted and shuffled with a fixed
  seed, so the corpus is the same on every run; files are split into train and validation by a
  hash of their path (a file is never in both), and the corpus is capped at
  ``data.max_chars`` characters so it loads in about a second.

A task gives the data, builds the model, and defines one member's loss; the same loss serves
the population (through :func:`vmapclan.member_loss`) and a plain model (the replay).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import functools
import math
import os
import random
import sysconfig
import zlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from .population import PopulationModel, member_loss, score_members
from .specs import DataSpec

__all__ = ["Task", "TaskData", "DigitsTask", "StdlibCharsTask", "CharTransformer", "get_task", "resolve_task",
           "task_reference", "data_length", "data_batches", "stdlib_corpus", "stdlib_files", "load_digits",
           "digits_mlp", "TASKS", "VOCAB"]

_EVAL_CHUNK = 256  # validation samples per forward pass: bounds memory for P members at once


def _as_data(data, who: str):
    """A split's data in the form the machine reads: a tuple of tensors (the fast path) or a map-style Dataset."""
    if isinstance(data, TensorDataset):
        data = data.tensors
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len(data) != 2 or len(data[0]) != len(data[1]):
            raise ValueError(f"{who}: expected (inputs, targets) tensors of one length, got "
                             f"{[tuple(t.shape) for t in data]}")
        return tuple(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    raise TypeError(f"{who}: expected a map-style torch Dataset (with __len__) or (inputs, targets) tensors, "
                    f"got {type(data).__name__}")


def data_length(data) -> int:
    """Samples in a task's data: ``(x, y)`` tensors or a map-style ``Dataset``.

    Example:
        >>> data_length((torch.zeros(5, 2), torch.zeros(5)))
        5
    """
    return len(data[0]) if isinstance(data, tuple) else len(data)


def data_batches(data, index: torch.Tensor | None = None, chunk: int = _EVAL_CHUNK):
    """``(x, y)`` batches of ``data`` (tensors or a ``Dataset`` of ``(input, target)`` samples), in order.

    Args:
        data: ``(x, y)`` tensors or a map-style ``Dataset``.
        index: Sample indices to take (default: all, in order); taken in one batch when given.
        chunk: Samples per batch when ``index`` is not given.

    Example:
        >>> [x.shape[0] for x, _ in data_batches((torch.zeros(5, 2), torch.zeros(5)), chunk=2)]
        [2, 2, 1]
    """
    if index is not None:
        pieces = [index]
    else:
        n = data_length(data)
        pieces = [torch.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    for piece in pieces:
        if isinstance(data, tuple):
            yield tuple(t[piece.to(t.device)] for t in data)
        else:
            x, y = default_collate([data[i] for i in piece.tolist()])
            yield x, y


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's data, each split ``(x, y)`` tensors (the fast path) or a map-style ``Dataset``.

    Attributes:
        train: Training data.
        val: Validation data (final metrics).
        eval: The first ``data.eval_samples`` of a fixed shuffle of ``val``, used to score
            members at the end of every round.
    """

    train: tuple | Dataset
    val: tuple | Dataset
    eval: tuple | Dataset


class Task(abc.ABC):
    """What a run trains: its data, its model and one model's loss.

    Subclass it and implement :meth:`split`, :meth:`build_model` and :meth:`loss`; then run it
    with ``TrainingMachine(config, task=MyTask())`` or, from a config file, with
    ``task = "package.module:MyTask"`` (the class is imported and built with the config's
    ``[task_args]`` table as keyword arguments, none by default).
    The built-in tasks (:data:`TASKS`) are subclasses like any other.

    Attributes:
        name: A short name (the built-in tasks); empty for a task named by its import path.
        model_defaults: The ``[model]`` settings the task reads, with their defaults, or
            ``None`` to take the table as it is. With defaults, :meth:`model_settings` refuses
            other keys and fills in the missing ones.
        data_defaults: The task's own data settings beyond :class:`~vmapclan.DataSpec`'s fields
            (a split name, an augmentation switch), with their defaults: the ``[data]`` table
            may set them, :meth:`data_settings` refuses other keys and fills in the missing
            ones, and :meth:`split` reads them as attributes (``data.augment``).
        phase_data: Data settings (fields of :class:`~vmapclan.DataSpec` or keys of
            :attr:`data_defaults`) a phase may change with ``data = {...}`` besides
            ``batch_size``; the machine reloads the data for them at the phase boundary
            (:meth:`load` with the changed settings).

    Example:
        >>> class Regression(Task):
        ...     model_defaults = {"width": 16}
        ...     def split(self, data, seed):
        ...         x = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed))
        ...         y = x.sum(1, keepdim=True)
        ...         return (x[:48], y[:48]), (x[48:], y[48:])
        ...     def build_model(self, model, data):
        ...         return nn.Sequential(nn.Linear(3, model["width"]), nn.ReLU(), nn.Linear(model["width"], 1))
        ...     def loss(self, output, target):
        ...         return F.mse_loss(output, target)
        >>> Regression().model_settings({})
        {'width': 16}
    """

    name: str = ""
    model_defaults: dict | None = None
    data_defaults: dict = {}
    phase_data: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """What ``config.task`` holds for this task: its short name, or ``"module:ClassName"``."""
        return task_reference(self)

    def model_settings(self, model) -> dict:
        """The ``[model]`` table checked and completed; override it to check values too.

        Args:
            model: The run's ``[model]`` table.

        Returns:
            The settings :meth:`build_model` receives.

        Raises:
            TypeError: if ``model`` is not a table.
            ValueError: for a key the task does not read (with :attr:`model_defaults`).
        """
        if not isinstance(model, Mapping):
            raise TypeError(f"model: expected a table of settings, got {type(model).__name__}")
        if self.model_defaults is None:
            return dict(model)
        unknown = [k for k in model if k not in self.model_defaults]
        if unknown:
            raise ValueError(f"model: unknown setting {unknown[0]!r} for task {self.reference!r}; "
                             f"it reads {sorted(self.model_defaults)}")
        return {**self.model_defaults, **model}

    def data_settings(self, data: DataSpec) -> DataSpec:
        """The data settings checked and completed with :attr:`data_defaults` (``data`` itself when complete).

        Args:
            data: The run's data settings.

        Raises:
            ValueError: for a setting that is neither a :class:`~vmapclan.DataSpec` field nor one of
                :attr:`data_defaults`, or a :attr:`phase_data` name that is neither.

        Example:
            >>> class Augmented(DigitsTask):
            ...     data_defaults = {"augment": False}
            >>> Augmented().data_settings(DataSpec()).augment
            False
        """
        fields = [f.name for f in dataclasses.fields(DataSpec) if f.name != "extra"]
        reads = fields + sorted(self.data_defaults)
        for name in self.phase_data:
            if name not in reads:
                raise ValueError(f"task {self.reference!r}: phase_data names {name!r}, which is neither a data field "
                                 f"nor one of its data_defaults {sorted(self.data_defaults)}")
        unknown = [k for k in data.extra if k not in self.data_defaults]
        if unknown:
            raise ValueError(f"data: unknown setting {unknown[0]!r} for task {self.reference!r}; it reads {reads}")
        if all(k in data.extra for k in self.data_defaults):
            return data
        return dataclasses.replace(data, extra={**copy.deepcopy(self.data_defaults), **data.extra})

    def check_data(self, model: dict, data: DataSpec) -> None:
        """Raise ``ValueError`` if ``data`` (the config's, or a phase's) cannot run with ``model``; by default nothing.

        Args:
            model: The checked model settings (:meth:`model_settings`).
            data: The data settings.
        """

    def load(self, data: DataSpec, seed: int) -> TaskData:
        """The train, validation and per-round evaluation data (from :meth:`split`).

        Raises:
            TypeError, ValueError: if :meth:`split` returns something else than ``(train, val)``.
        """
        who = f"{type(self).__name__}.split"
        split = self.split(data, seed)
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise TypeError(f"{who}: expected (train, val), got {type(split).__name__}")
        train, val = (_as_data(part, f"{who} ({side})") for part, side in zip(split, ("train", "val")))
        size = data_length(val)
        if size == 0 or data_length(train) == 0:
            raise ValueError(f"{who}: the train and validation data must not be empty")
        n = size if data.eval_samples == 0 else min(data.eval_samples, size)
        pick = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1))[:n]
        evaluation = (val[0][pick], val[1][pick]) if isinstance(val, tuple) else Subset(val, pick.tolist())
        return TaskData(train, val, evaluation)

    @abc.abstractmethod
    def split(self, data: DataSpec, seed: int):
        """The training and validation data for ``data`` and ``seed``.

        Args:
            data: The run's data settings (a phase's, when it changes one of :attr:`phase_data`).
            seed: The run's seed.

        Returns:
            ``(train, val)``, each ``(inputs, targets)`` tensors, a ``TensorDataset`` (indexed
            directly: the fast path) or any map-style ``Dataset`` of ``(input, target)`` samples
            (batched with ``default_collate``).
        """

    @abc.abstractmethod
    def build_model(self, model: dict, data: DataSpec) -> nn.Module:
        """A fresh model (initialised from torch's global generator: the machine seeds it first).

        Args:
            model: The run's ``[model]`` settings, as :meth:`model_settings` returns them.
            data: The run's data settings.
        """

    @abc.abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One model's mean loss (a scalar); vmapped over members by :func:`vmapclan.member_loss`."""

    def grow(self, module: nn.Module, settings) -> nn.Module:
        """The model grown at the start of a phase with ``model = { grow = settings }``; by default none.

        Override it to let phases grow the model (the seed's progressive stacks): return the
        grown module (``module`` changed in place, or a new one). Every existing parameter and
        buffer must stay, with its name and shape (its values and optimizer state carry over);
        the new ones are initialised here, from torch's global generator. The machine calls it
        once for every member, from the same generator state; the replay once for its model.
        It also runs once on a copy of the model when the run is built, to check ``settings``
        and the freeze patterns of later phases.

        Args:
            module: One member as a plain module (the architecture in force before the phase).
            settings: The phase's ``model.grow`` value, as the config gives it.

        Returns:
            The grown module.

        Raises:
            NotImplementedError: if the task does not grow (the default).
            ValueError, TypeError: for settings the task refuses.
        """
        raise NotImplementedError(f"task {self.reference!r} does not grow its model (it defines no Task.grow)")

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Share of correct predictions (a scalar); override it for a task where that means nothing."""
        if not output.is_floating_point() or output.dim() == 0 or target.is_floating_point():
            return torch.full((), math.nan)
        return (output.argmax(-1) == target).float().mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data, target: torch.Tensor | None = None) -> dict:
        """``{"loss", "accuracy"}`` of a plain model on ``data``, in eval mode, chunked.

        ``data`` is a split (tensors or a ``Dataset``), or inputs with ``target``. The model's
        training mode is restored afterwards.
        """
        data = data if target is None else (data, target)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss = correct = 0.0
        n = data_length(data)
        for xb, yb in data_batches(data):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            loss += self.loss(out, yb).item() * len(xb)
            correct += self.accuracy(out, yb).item() * len(xb)
        model.train(was_training)
        return {"loss": loss / n, "accuracy": correct / n}

    def population_losses(self, population: PopulationModel, data, target: torch.Tensor | None = None, *,
                          blocks: int | None = None) -> torch.Tensor:
        """Each member's mean loss on shared ``data`` (as for :meth:`evaluate`): a ``[P]`` tensor (eval mode, chunked).

        With ``blocks``, the data is cut into that many consecutive blocks of near-equal size
        (at most one per sample) and the result is every member's mean loss on each, ``[P, blocks]``:
        paired values for a significance test between members.
        """
        data = data if target is None else (data, target)
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"{type(self).__name__}.population_losses: blocks must be a positive int or None, "
                             f"got {blocks!r}")
        if blocks is None:
            chunks = list(data_batches(data))
        else:
            pieces = torch.arange(data_length(data)).tensor_split(min(blocks, data_length(data)))
            chunks = [next(data_batches(data, piece)) for piece in pieces]

        def losses_of(chunk, _index):
            xb, yb = population.share(chunk)
            return member_loss(self.loss, population(xb), yb)

        return score_members(population, chunks, losses_of, size_of=lambda chunk: len(chunk[0]),
                             who=f"{type(self).__name__}.loss", per_batch=blocks is not None)


def _positive_ints(model: dict, names) -> None:
    for name in names:
        value = model[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be a positive int, got {value!r}")


class DigitsTask(Task):
    """scikit-learn's digits: 8x8 images scaled to [0, 1], 10 classes, an MLP 64 -> hidden -> hidden -> 10.

    Model settings: ``hidden`` (width of the two hidden layers, default 128).
    """

    name = "digits-mlp"
    model_defaults = {"hidden": 128}

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
    model_defaults = {"d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "max_len": 0}
    phase_data = ("seq_len",)

    def model_settings(self, model) -> dict:
        """The settings with defaults, checked (``n_heads`` must divide ``d_model``)."""
        settings = super().model_settings(model)
        _positive_ints(settings, ["d_model", "n_layers", "n_heads"])
        max_len = settings["max_len"]
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"model.max_len must be an int >= 0, got {max_len!r}")
        dropout = settings["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
        settings["dropout"] = float(dropout)
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
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"model.grow.blocks must be a positive int, got {blocks!r}")
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
                block = _Block(last.ln1.normalized_shape[0], last.n_heads, last.dropout)
                with torch.no_grad():
                    for sub in block.modules():
                        if isinstance(sub, nn.Linear):
                            sub.weight.normal_(0.0, 0.02)  # as CharTransformer initialises its own
                    for out in (block.proj, block.mlp[2]):
                        out.weight.zero_()
                        out.bias.zero_()
            module.blocks.append(block.to(device=reference.device, dtype=reference.dtype))
        return module


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    """A small causal character transformer: token and position embeddings, blocks, a linear head.

    Args:
        vocab: Number of token ids.
        d_model: Width.
        n_layers: Blocks.
        n_heads: Attention heads.
        max_len: Longest sequence.
        dropout: Dropout probability.

    Example:
        >>> CharTransformer(128, 32, 1, 4, 16)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 128])
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        with torch.no_grad():  # GPT-2 style small init keeps the first losses near log(vocab)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
            for block in self.blocks:
                block.proj.weight.mul_(1 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``."""
        positions = torch.arange(idx.shape[-1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


#: The built-in tasks by short name; ``config.task`` names one of them or a ``"module:ClassName"``.
TASKS: dict[str, Task] = {"digits-mlp": DigitsTask(), "stdlib-chars": StdlibCharsTask()}


def task_reference(task: Task) -> str:
    """What ``config.task`` holds for ``task``: a built-in's short name, else ``"module:ClassName"``.

    Example:
        >>> task_reference(TASKS["digits-mlp"]), task_reference(StdlibCharsTask())
        ('digits-mlp', 'stdlib-chars')
    """
    if task.name in TASKS and type(TASKS[task.name]) is type(task):
        return task.name
    return f"{type(task).__module__}:{type(task).__qualname__}"


def resolve_task(spec: str | Task, args: Mapping | None = None) -> Task:
    """The task ``spec`` names: a built-in's short name, or ``"package.module:ClassName"`` built with ``args``.

    Args:
        spec: A name from :data:`TASKS`, an import path ``"module:Class"``, or a :class:`Task` (returned as is).
        args: Keyword arguments for the class (a config's ``[task_args]`` table); none for a
            built-in task or a :class:`Task` given as is.

    Raises:
        ValueError: for an unknown name, a module that cannot be imported, a missing class, a
            class that is not a :class:`Task` subclass, arguments for a built-in task, or a class
            that cannot be built with ``args``; the message is one line.
        TypeError: if ``args`` is not a table with string keys.

    Example:
        >>> type(resolve_task("vmapclan.tasks:DigitsTask")).__name__
        'DigitsTask'
    """
    args = {} if args is None else args
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise TypeError(f"task_args must be a table of keyword arguments, got {args!r}")
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"task must be a task name, 'package.module:ClassName' or a Task, got {type(spec).__name__}")
    if spec in TASKS:
        if args:
            raise ValueError(f"task_args: the built-in task {spec!r} takes no arguments, got {sorted(args)}")
        return TASKS[spec]
    module_name, colon, class_name = spec.partition(":")
    if not colon or not module_name or not class_name:
        raise ValueError(f"task {spec!r} is neither a built-in task {sorted(TASKS)} nor 'package.module:ClassName'")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing the user's module is reported, in one line
        raise ValueError(f"task {spec!r}: cannot import {module_name!r}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    found = module
    for part in class_name.split("."):
        found = getattr(found, part, None)
    if found is None:
        raise ValueError(f"task {spec!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(found, type) and issubclass(found, Task)):
        raise ValueError(f"task {spec!r}: {class_name} is not a vmapclan.Task subclass "
                         f"(got {type(found).__name__} {found!r:.60})")
    try:
        return found(**args)
    except Exception as err:
        call = f"{class_name}(**task_args)" if args else f"{class_name}()"
        raise ValueError(f"task {spec!r}: {call} failed: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None


def get_task(name: str) -> Task:
    """The task called ``name`` (see :func:`resolve_task`).

    Raises:
        ValueError: for an unknown name or an import path that does not give a Task.

    Example:
        >>> get_task("digits-mlp").name
        'digits-mlp'
    """
    return resolve_task(name)
