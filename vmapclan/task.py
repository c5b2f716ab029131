"""The task protocol: what a run trains (its data, its model, one model's loss), and how a config names a task.

A :class:`Task` gives the data, builds the model and defines one member's loss; the same loss
serves the population (through :func:`vmapclan.member_loss`) and a plain model (the replay).
``config.task`` names a built-in task (:data:`TASKS`, filled by :mod:`vmapclan.tasks`) or a task of
your own as ``"package.module:ClassName"`` (:func:`resolve_task`).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
import math
from collections.abc import Mapping

import optree
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from .checks import is_int, number_in, refuse
from .config import DataSpec
from .population import PopulationModel, member_loss, score_members

__all__ = ["Task", "TaskData", "TASKS", "get_task", "resolve_task", "task_reference", "data_length", "data_batches"]

#: The built-in tasks by short name (:mod:`vmapclan.tasks` registers them); ``config.task`` names one
#: of them or a ``"module:ClassName"``.
TASKS: dict = {}

_EVAL_CHUNK = 256  # validation samples per forward pass: bounds memory for P members at once


def _as_data(data, who: str):
    """A split's data in the form the machine reads: a tuple of tensors (the fast path) or a map-style Dataset."""
    if isinstance(data, TensorDataset):
        data = data.tensors
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Mapping) and \
            data[0] and all(isinstance(t, torch.Tensor) for t in (*data[0].values(), data[1])):
        return KeywordTensors(*data)  # keyword inputs: the Dataset path batches each of them
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len(data) != 2 or len(data[0]) != len(data[1]):
            raise ValueError(f"{who}: expected (inputs, targets) tensors of one length, got "
                             f"{[tuple(t.shape) for t in data]}")
        return tuple(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    raise TypeError(f"{who}: expected a map-style torch Dataset (with __len__) or (inputs, targets) tensors, "
                    f"got {type(data).__name__}")


def call_model(model, inputs):
    """``model(**inputs)`` for a dict of keyword inputs (``input_ids``, ``attention_mask``), else ``model(inputs)``.

    Example:
        >>> call_model(lambda a, b: a + b, {"a": 1, "b": 2})
        3
    """
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def batch_size_of(inputs) -> int:
    """The samples in a batch of inputs: a tensor's first dimension, or a dict's first tensor's."""
    return next(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)).shape[0]


class KeywordTensors(Dataset):
    """``(inputs, targets)`` tensors whose inputs are a dict of keyword tensors, as a map-style Dataset.

    Every sample is ``({name: tensor[i]}, targets[i])``; batches come through ``default_collate``.
    """

    def __init__(self, inputs: Mapping, targets: torch.Tensor):
        lengths = {len(t) for t in inputs.values()} | {len(targets)}
        if len(lengths) != 1:
            raise ValueError(f"KeywordTensors: every input and the targets need one length, got "
                             f"{ {k: len(t) for k, t in inputs.items()} } and {len(targets)} targets")
        self.inputs, self.targets = dict(inputs), targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return {k: t[i] for k, t in self.inputs.items()}, self.targets[i]


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


_UNSET = object()


def _init_record(cls, args: tuple, kwargs: dict):
    """``(given, defaults)``: the keyword arguments of ``cls(*args, **kwargs)`` and its signature's
    defaults, or ``False`` where ``cls(**given)`` cannot rebuild it (see :attr:`Task.init_arguments`)."""
    try:
        signature = inspect.signature(cls)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # no signature to read, or arguments __init__ refuses in its own words
        return False
    given, defaults = {}, {}
    for param in signature.parameters.values():
        default = param.default
        if default is not param.empty and (default is None or _toml_value(default)):
            defaults[param.name] = default  # others stay out: the record holds only plain values
        if param.kind is param.VAR_KEYWORD:
            given.update(bound.get(param.name, {}))
        elif param.name in bound and param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            return False
        elif param.name in bound and not (param.name in defaults and _same(bound[param.name], default)):
            given[param.name] = bound[param.name]  # a default passed as it is needs no task_args
    if not all(_toml_value(v) for v in given.values()):
        return False  # kept out of the record too: a task stays picklable and holds nothing more
    return given, defaults


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def _toml_value(value) -> bool:
    """Whether a TOML table holds ``value`` as it is and reads it back the same (builtin types only:
    a numpy float would land in a checkpoint that loads with ``weights_only``)."""
    if type(value) is dict:
        return all(type(k) is str and _toml_value(v) for k, v in value.items())
    if type(value) is list:
        return all(_toml_value(v) for v in value)
    return type(value) in (str, bool, int, float)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's data, each split ``(x, y)`` tensors (the fast path) or a map-style ``Dataset``.

    Attributes:
        train: Training data.
        val: Validation data: what selection, the search, keep-best and the final choice of
            model read.
        eval: The first ``data.eval_samples`` of a fixed shuffle of ``val``, used to score
            members at the end of every round.
        test: Test data, or ``None``: read once, for the final record, by nothing that decides.
    """

    train: tuple | Dataset
    val: tuple | Dataset
    eval: tuple | Dataset
    test: tuple | Dataset | None = None


def _take(data, index: torch.Tensor):
    """The samples ``index`` of a split: tensors indexed, a ``Dataset`` as a ``Subset``."""
    return tuple(t[index.to(t.device)] for t in data) if isinstance(data, tuple) else Subset(data, index.tolist())


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

    def __new__(cls, *args, **kwargs):
        # What the task is built with, bound to its class's signature (a dataclass's, an inherited
        # or a wrapped __init__ alike): a run's config.task_args rebuilds it from the record.
        task = super().__new__(cls)
        task.__dict__["_init_record"] = _init_record(cls, args, kwargs)
        return task

    @property
    def init_arguments(self) -> dict | None:
        """The arguments this task was built with, by keyword (``{}`` for none), or ``None`` where
        ``Class(**task_args)`` cannot rebuild it: an argument that no TOML table holds (a tensor,
        a function), or one passed to a ``*args`` or a positional-only parameter.

        The training machine writes them as the run's ``config.task_args``, so that a resume
        from the command or a replay rebuilds the same task.
        """
        record = self.__dict__.get("_init_record")
        return {} if record is None else None if record is False else dict(record[0])

    def built_with(self, args: Mapping) -> bool:
        """Whether ``Class(**args)`` builds this task with the arguments it was built with (the
        defaults filling in for what ``args`` leaves out); ``True`` where they are not known."""
        record = self.__dict__.get("_init_record")
        if not record:
            return True
        given, defaults = record
        full = {**defaults, **given}
        return set(args) <= set(full) and all(_same(args.get(k, defaults.get(k, _UNSET)), v) for k, v in full.items())

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
            >>> from vmapclan.tasks import DigitsTask
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
        """The train, validation, per-round evaluation and test data (from :meth:`split`).

        A split of two parts gets its test split from the validation data: a share
        ``data.test_fraction`` of it, drawn by ``seed`` (none when the share is 0).

        Raises:
            TypeError, ValueError: if :meth:`split` returns something else than ``(train, val)``
                or ``(train, val, test)``, an empty part, or validation data too small to
                carve a test split from.
        """
        who = f"{type(self).__name__}.split"
        split = self.split(data, seed)
        if not isinstance(split, (tuple, list)) or len(split) not in (2, 3):
            raise TypeError(f"{who}: expected (train, val) or (train, val, test), got {type(split).__name__}"
                            + (f" of {len(split)}" if isinstance(split, (tuple, list)) else ""))
        parts = [_as_data(part, f"{who} ({side})") for part, side in zip(split, ("train", "val", "test"))]
        if any(data_length(part) == 0 for part in parts):
            raise ValueError(f"{who}: the {' and '.join(('train', 'validation', 'test')[:len(parts)])} data "
                             f"must not be empty")
        train, val, test = (*parts, None)[:3]
        if test is None and data.test_fraction > 0:
            size = data_length(val)
            n_test = round(data.test_fraction * size)
            if not 1 <= n_test < size:
                raise ValueError(f"{who}: {size} validation samples are too few to set data.test_fraction = "
                                 f"{data.test_fraction} of them aside as the test split; give the task a test "
                                 f"split of its own, or set data.test_fraction = 0")
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 2))
            val, test = _take(val, order[n_test:].sort().values), _take(val, order[:n_test].sort().values)
        size = data_length(val)
        n = size if data.eval_samples == 0 else min(data.eval_samples, size)
        pick = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1))[:n]
        return TaskData(train, val, _take(val, pick), test)

    @abc.abstractmethod
    def split(self, data: DataSpec, seed: int):
        """The training, validation and (optionally) test data for ``data`` and ``seed``.

        Args:
            data: The run's data settings (a phase's, when it changes one of :attr:`phase_data`).
            seed: The run's seed.

        Returns:
            ``(train, val)`` or ``(train, val, test)``, each ``(inputs, targets)`` tensors, a
            ``TensorDataset`` (indexed directly: the fast path) or any map-style ``Dataset`` of
            ``(input, target)`` samples (batched with ``default_collate``). Without a test
            split the machine sets ``data.test_fraction`` of the validation data aside as one.
        """

    @abc.abstractmethod
    def build_model(self, model: dict, data: DataSpec) -> nn.Module:
        """A fresh model (initialised from torch's global generator: the machine seeds it first).

        Args:
            model: The run's ``[model]`` settings, as :meth:`model_settings` returns them.
            data: The run's data settings.
        """

    #: The :class:`~vmapclan.DataSpec` fields :meth:`split` (or :meth:`build_model`) reads, besides
    #: the machine's own (``batch_size``, ``eval_samples``, ``test_fraction``): ``val_fraction``,
    #: ``seq_len``, ``max_chars``. A run's ``config.toml`` leaves out the others where they hold
    #: their default (:meth:`unread_data`).
    data_reads: tuple[str, ...] = ()

    def unread_data(self) -> tuple[str, ...]:
        """The :class:`~vmapclan.DataSpec` fields this task does not read (see :attr:`data_reads`)."""
        machine = ("batch_size", "eval_samples", "test_fraction", "extra")  # read for every task (extra: its own)
        return tuple(f.name for f in dataclasses.fields(DataSpec) if f.name not in machine + tuple(self.data_reads))

    #: Whether :meth:`loss` is a plain mean over its batch's samples, each weighted alike (no
    #: ``ignore_index`` padding, no class weights): the cooperative step then takes it once on the
    #: merged ``P x B`` batch (``FusedStep(sample_mean_loss=True)``), which is cheaper. Declare it
    #: only where it holds; by default every member's loss is taken on its own samples.
    sample_mean_loss: bool = False

    @abc.abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One model's mean loss (a scalar); vmapped over members by :func:`vmapclan.member_loss`."""

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """AdamW's param groups for ``model``, or ``None`` (the default) for one group of every parameter.

        Return torch-style groups: ``{"params": [...]}`` with, optionally, the group's own
        ``weight_decay`` (``0.0`` for biases and norms, as transformer recipes do) and an
        ``lr_scale`` (the group's lr as a factor of the run's). Every trainable parameter
        belongs to one group. The genes scale every group in proportion: a group keeps its
        ratio to the first decaying group's weight decay and to the first group's lr.

        Example:
            >>> def param_groups(self, model):  # doctest: +SKIP
            ...     decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            ...     rest = [p for n, p in model.named_parameters() if p.dim() < 2]
            ...     return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        """
        return None

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
        """Share of correct predictions (a scalar); override it for a task where that means nothing.

        NaN for an output that is not one tensor of scores (a tuple or dict output: override it).
        """
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() == 0 or target.is_floating_point():
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
            xb, yb = optree.tree_map(lambda t: t.to(device), (xb, yb))
            out = call_model(model, xb)
            size = batch_size_of(xb)
            loss += self.loss(out, yb).item() * size
            correct += self.accuracy(out, yb).item() * size
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
        if blocks is not None and (not is_int(blocks) or blocks < 1):
            refuse(f"{type(self).__name__}.population_losses: blocks", "a positive int or None", blocks)
        if blocks is None:
            chunks = list(data_batches(data))
        else:
            pieces = torch.arange(data_length(data)).tensor_split(min(blocks, data_length(data)))
            chunks = [next(data_batches(data, piece)) for piece in pieces]

        def losses_of(chunk, _index):
            xb, yb = population.share(chunk)
            return member_loss(self.loss, call_model(population, xb), yb)

        return score_members(population, chunks, losses_of, size_of=lambda chunk: batch_size_of(chunk[0]),
                             who=f"{type(self).__name__}.loss", per_batch=blocks is not None)

    def population_scores(self, population: PopulationModel, data) -> dict:
        """``{"loss", "accuracy"}``: each member's on ``data``, ``[P]`` each, in one pass (eval mode, chunked)."""
        def scores_of(chunk, _index):
            xb, yb = population.share(chunk)
            out = call_model(population, xb)
            loss = member_loss(self.loss, out, yb)
            # Member by member: a task's own accuracy may do what vmap cannot (an .item(), a branch).
            accuracy = [self.accuracy(*optree.tree_map(lambda t, i=i: t[i], (out, yb))) for i in range(len(loss))]
            return torch.stack([loss.double(), torch.stack(accuracy).double().to(loss.device)], 1)

        scores = score_members(population, data_batches(data), scores_of, size_of=lambda chunk: batch_size_of(chunk[0]),
                               who=f"{type(self).__name__}.loss", width=2)
        return {"loss": scores[:, 0], "accuracy": scores[:, 1]}




def _describe(value) -> str:
    """What a value is, in a few words: ``a str``, ``a tuple of (Tensor [8, 3], None)``, ``an Out (a dataclass)``."""
    def short(v) -> str:
        return f"Tensor {list(v.shape)}" if isinstance(v, torch.Tensor) else "None" if v is None else type(v).__name__

    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{article} {name} of ({', '.join(short(v) for v in value)})"
    if isinstance(value, Mapping):
        return f"{article} {name} of {{{', '.join(f'{k!r}: {short(v)}' for k, v in value.items())}}}"
    return f"{article} {name}" + (" (a dataclass)" if dataclasses.is_dataclass(value) else "")


_GROUP_KEYS = ("params", "weight_decay", "lr_scale")


def build_optimizer(task: Task, model: nn.Module, spec) -> torch.optim.AdamW:
    """The run's ``torch.optim.AdamW`` for ``model``: ``spec``'s settings over the task's :meth:`~Task.param_groups`.

    Args:
        task: The task (its ``param_groups``, ``None`` for one group).
        model: The model.
        spec: The run's :class:`~vmapclan.OptimizerSpec`.

    Raises:
        TypeError, ValueError: for groups that are not a list of dicts of :data:`_GROUP_KEYS`,
            a bad value, or a trainable parameter in no group or in two.
    """
    groups = task.param_groups(model)
    if groups is None:
        return spec.build(model.parameters())
    who = f"{type(task).__name__}.param_groups"
    if not isinstance(groups, (list, tuple)) or not groups or not all(isinstance(g, Mapping) for g in groups):
        raise TypeError(f"{who}: expected a non-empty list of dicts with 'params', got {_describe(groups)}")
    torch_groups, seen = [], {}
    for k, group in enumerate(groups):
        unknown = sorted(set(group) - set(_GROUP_KEYS))
        if unknown:
            hint = " (give the group's lr as lr_scale, a factor of the run's lr)" if "lr" in unknown else ""
            raise ValueError(f"{who}: group {k} has unknown key {unknown[0]!r}{hint}; a group takes {list(_GROUP_KEYS)}")
        params = list(group.get("params", []))
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError(f"{who}: group {k} needs 'params', a non-empty list of the model's parameters")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"{who}: a parameter is in groups {seen[id(p)]} and {k}; give each to one group")
            seen[id(p)] = k
        entry = {"params": params}
        if "weight_decay" in group:
            entry["weight_decay"] = number_in(group["weight_decay"], f"{who}: group {k} weight_decay", 0, math.inf,
                                              high_open=True)
        if "lr_scale" in group:
            entry["lr"] = spec.lr * number_in(group["lr_scale"], f"{who}: group {k} lr_scale", 0, math.inf,
                                              low_open=True, high_open=True)
        torch_groups.append(entry)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{who}: the trainable parameter {missing[0]!r} is in no group ({len(missing)} in all)")
    return torch.optim.AdamW(torch_groups, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps)


def built_model(task: Task, settings: dict, spec: DataSpec, data: TaskData) -> nn.Module:
    """``task.build_model(settings, spec)``, refused unless it is an ``nn.Module`` that runs on every split.

    Each of the training, validation and test splits (the last when there is one) runs once
    through :func:`check_model_runs`: a split the model cannot take is refused before the run
    writes anything, not at the first round's scoring or at the final record. These checks
    decide nothing, so the test split still changes no decision.

    Raises:
        ValueError: the task's own refusal of a setting, as it raised it; any other error of
            ``build_model`` (a wrong type deep in torch, say), naming the hook and the settings;
            or a split the model or the loss fails on.
        TypeError: if ``build_model`` returns no ``nn.Module``, or as :func:`check_model_runs`.
    """
    name = type(task).__name__
    try:
        model = task.build_model(settings, spec)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's hook: any error is reported as it is
        raise ValueError(f"{name}.build_model fails for the model settings {settings}: {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}.build_model must return an nn.Module, got {_describe(model)}")
    for split, samples in (("training", data.train), ("validation", data.val), ("test", data.test)):
        if samples is not None:
            check_model_runs(task, model, samples, spec.batch_size, split, training=split == "training")
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def check_model_runs(task: Task, model: nn.Module, data, batch_size: int, split: str = "training", *,
                     training: bool = True) -> None:
    """Run ``model`` and ``task.loss`` once on a few samples of ``data``, to refuse a pair that cannot train.

    With ``training``, in training mode with gradients on, as it trains (no backward runs);
    else in eval mode without gradients, as it is scored. From a forked random state, with the
    buffers it writes (BatchNorm's statistics) and the module's mode put back afterwards: the run
    goes on as if this had not happened. The machine calls it (through :func:`built_model`)
    when it builds a run, before it writes anything.

    Args:
        split: The split's name in the messages.
        training: Run it as training does (the training split) or as scoring does.

    Raises:
        ValueError: if the forward or the loss fails, naming the error's first line.
        TypeError: if the model returns no tensor (a string, a dataclass), or the loss no scalar tensor.
    """
    name = type(task).__name__
    n = min(batch_size, data_length(data))
    x, y = next(data_batches(data, torch.arange(n)))
    buffers = {key: b.clone() for key, b in model.named_buffers()}
    was_training = model.training
    model.train(training)
    try:
        with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(training):
            try:
                output = call_model(model, x)
            except Exception as err:  # noqa: BLE001 - the user's model: any error is reported as it is
                raise ValueError(f"{name}: the model fails on a batch of {n} {split} samples: "
                                 f"{_first_line(err)}") from None
            if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(output)):
                raise TypeError(f"{name}: the model returned {_describe(output)}; expected a tensor, or a tuple, "
                                f"list or dict holding tensors")
            try:
                loss = task.loss(output, y)
            except Exception as err:  # noqa: BLE001 - the user's loss: any error is reported as it is
                raise ValueError(f"{name}.loss fails on the model's output ({_describe(output)}) for {split} "
                                 f"samples: {_first_line(err)}") from None
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                raise TypeError(f"{name}.loss must return one model's loss as a scalar float tensor, got "
                                f"{_describe(loss)}")
    finally:
        model.train(was_training)
        with torch.no_grad():
            for key, b in model.named_buffers():
                b.copy_(buffers[key])


def task_reference(task: Task) -> str:
    """What ``config.task`` holds for ``task``: a built-in's short name, else ``"module:ClassName"``.

    Example:
        >>> from vmapclan.tasks import StdlibCharsTask
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
