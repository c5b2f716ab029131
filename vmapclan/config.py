"""Settings of a run as small dataclasses: model, data, optimizer, clan, schedule, and the whole run.

Each spec checks its fields when built and names the bad one the way it is written in a
config file (``clan.duty_cycle must be a number in (0, 1], got 1.5``). ``to_dict()`` gives a
plain dict that TOML and JSON can hold (no ``None``); ``from_dict()`` reads it back and refuses
unknown fields, so a typo in a config file is an error rather than a silently ignored setting.

Example:
    >>> config = RunConfig.from_dict({"task": "digits-mlp", "total_steps": 200, "clan": {"population_size": 4}})
    >>> config.clan.population_size, config.optimizer.lr
    (4, 0.001)
    >>> RunConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .checks import int_in, number_in, positive_int, read_regular_file, refuse
from .genome import ADAMW_GENES
from .rounds import check_phases, round_problem
from .settings import DEFAULTS, HORIZON_LR_SHAPE, HORIZON_WARMUP, WSD_DECAY
from .schedule import SEARCH_SHARE, SEARCH_SPREAD, Phase, PhaseSchedule, check_lr_shape, default_schedule, lr_shape_at

__all__ = ["ModelSpec", "DataSpec", "OptimizerSpec", "ClanSpec", "ScheduleSpec", "RunConfig", "default_schedule",
           "SEARCH_SHARE", "SEARCH_SPREAD"]


def _fail(section: str, name: str, expected: str, value) -> None:
    refuse(f"{section}.{name}", expected, value)


def _int(section: str, name: str, value, low: int = 1) -> int:
    return positive_int(value, f"{section}.{name}") if low == 1 else int_in(value, f"{section}.{name}", low)


def _float(section: str, name: str, value, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> float:
    return number_in(value, f"{section}.{name}", low, high, low_open=low_open, high_open=high_open)


def _fields_of(cls, data, where: str) -> list[str]:
    """``cls``'s field names, after refusing ``data`` that is not a table or names another field."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a table of settings, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; expected some of {names}")
    return names


class _Spec:
    """Shared ``to_dict`` / ``from_dict`` for the flat specs."""

    section: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """A plain dict of the fields (tuples as lists, no ``None``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None):
        """Build from a dict of fields (missing fields take their defaults).

        Raises:
            TypeError: if ``data`` is not a dict.
            ValueError: for an unknown field or a bad value, naming it.
        """
        if data is None:
            return cls()
        _fields_of(cls, data, cls.section)
        return cls(**data)


class ModelSpec(Mapping):
    """The ``[model]`` table: free-form settings handed to the task, which checks its own keys.

    The task's :meth:`~vmapclan.Task.model_settings` refuses keys it does not read and fills in
    its defaults when the run is built (``digits-mlp`` reads ``hidden``; ``stdlib-chars`` reads
    ``d_model``, ``n_layers``, ``n_heads``, ``dropout`` and ``max_len``).

    Args:
        settings: ``{name: value}`` (also as keyword arguments); names are strings, values
            anything TOML can hold.

    Raises:
        TypeError: for a key that is not a string.

    Example:
        >>> spec = ModelSpec(hidden=64)
        >>> spec["hidden"], dict(spec)
        (64, {'hidden': 64})
    """

    section: ClassVar[str] = "model"

    def __init__(self, settings: Mapping | None = None, /, **more):
        if settings is not None and not isinstance(settings, Mapping):
            raise TypeError(f"model: expected a table of settings, got {type(settings).__name__}")
        merged = {**(settings or {}), **more}
        bad = [k for k in merged if not isinstance(k, str)]
        if bad:
            raise TypeError(f"model: setting names must be strings, got {bad[0]!r}")
        self._settings = copy.deepcopy(merged)

    def __getitem__(self, key: str):
        return self._settings[key]

    def __iter__(self):
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"ModelSpec({self._settings!r})"

    __hash__ = None  # a mapping of mutable values: compared by value, not hashed

    def to_dict(self) -> dict:
        """The settings as a plain dict (a copy)."""
        return copy.deepcopy(self._settings)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> ModelSpec:
        """Build from a dict (``None``: empty, every setting at the task's default).

        Raises:
            TypeError: if ``data`` is not a dict.
        """
        return cls() if data is None else cls(data)


def read_toml(path) -> dict:
    """The plain table of a TOML file.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: for invalid TOML.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    text = read_regular_file(path, None)
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None


@dataclasses.dataclass(frozen=True)
class DataSpec(_Spec):
    """Data settings.

    Args:
        batch_size: Samples per member per step (a cooperative step takes ``P x batch_size``).
        val_fraction: Share of the data held out for validation (digits: of the samples;
            stdlib-chars: of the source files), in (0, 1).
        seq_len: Characters per training window (stdlib-chars).
        max_chars: Cap on the characters read from the standard library (stdlib-chars).
        eval_samples: Validation samples each member is scored on at the end of a round
            (0: all): the bound on what scoring costs, about ``P x eval_samples`` forward
            passes a round. The final metrics always use the whole validation set.
        test_fraction: For a task whose :meth:`~vmapclan.Task.split` gives no test split, the
            share of the validation data set aside by seed as the test split, in [0, 1) (0:
            none). Nothing in a run decides on the test split; the final record reports it.
        extra: The task's own data settings (:attr:`vmapclan.Task.data_defaults`, e.g. a split
            name or an augmentation switch), read as attributes (``data.augment``). In a
            table they sit next to the fields: ``from_dict`` takes every other key as one of
            them and ``to_dict`` writes them back the same way; the task refuses the keys it
            does not read when the run is built.

    Example:
        >>> data = DataSpec.from_dict({"batch_size": 8, "augment": True})
        >>> data.batch_size, data.augment, data.to_dict()["augment"]
        (8, True, True)
    """

    section: ClassVar[str] = "data"
    batch_size: int = 32
    val_fraction: float = 0.2
    seq_len: int = 64
    max_chars: int = 600_000
    eval_samples: int = 512
    test_fraction: float = 0.5
    extra: Mapping = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str):
        # Only for names that are not fields: the task's own settings. (``__dict__`` is read
        # directly, so a copy or unpickling, which looks names up before the fields exist, stops here.)
        extra = self.__dict__.get("extra")
        if extra is None or name not in extra:
            raise AttributeError(f"{type(self).__name__!r} has no field or task data setting {name!r}")
        return extra[name]

    def to_dict(self) -> dict:
        """A plain dict of the fields, with the task's own settings beside them."""
        out = super().to_dict()
        return {**{k: v for k, v in out.items() if k != "extra"}, **copy.deepcopy(dict(self.extra))}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> DataSpec:
        """Build from a dict: the fields, and any other key as one of the task's own settings (:attr:`extra`).

        Raises:
            TypeError: if ``data`` is not a dict or a key is not a string.
            ValueError: for a bad field value, naming it.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.section}: expected a table of settings, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def __post_init__(self) -> None:
        if not isinstance(self.extra, Mapping) or not all(isinstance(k, str) for k in self.extra):
            raise TypeError(f"data: the task's own settings need string names, got {self.extra!r}")
        object.__setattr__(self, "extra", copy.deepcopy(dict(self.extra)))
        _int(self.section, "batch_size", self.batch_size)
        object.__setattr__(self, "val_fraction", _float(self.section, "val_fraction", self.val_fraction, 0, 1,
                                                        low_open=True, high_open=True))
        _int(self.section, "seq_len", self.seq_len)
        _int(self.section, "max_chars", self.max_chars, low=1000)
        _int(self.section, "eval_samples", self.eval_samples, low=0)
        object.__setattr__(self, "test_fraction", _float(self.section, "test_fraction", self.test_fraction, 0, 1,
                                                         high_open=True))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec(_Spec):
    """The AdamW the run starts from (its values seed the incumbent genome).

    Args:
        lr: Learning rate, > 0.
        weight_decay: Decoupled weight decay, >= 0.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: > 0.
        lr_schedule: The learning rate's shape over the run's time, a factor on every
            member's lr at every step (:func:`vmapclan.schedule.lr_shape_at`): ``"constant"``,
            ``"cosine"`` (the default) or ``"wsd"`` (warmup, stable, decay). The genes and the
            phases set the level; the shape gives the form.
        warmup: Share of the run's time over which the lr warms up linearly from 0, in [0, 0.5]
            (default 0.05).
        decay: For ``"wsd"``: share of the run's time at the end over which the lr decays
            linearly to 0.
    """

    section: ClassVar[str] = "optimizer"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = HORIZON_LR_SHAPE
    warmup: float = HORIZON_WARMUP
    decay: float = WSD_DECAY

    def __post_init__(self) -> None:
        s = self.section
        object.__setattr__(self, "lr", _float(s, "lr", self.lr, 0, math.inf, low_open=True, high_open=True))
        object.__setattr__(self, "weight_decay", _float(s, "weight_decay", self.weight_decay, 0, math.inf,
                                                        high_open=True))
        object.__setattr__(self, "eps", _float(s, "eps", self.eps, 0, math.inf, low_open=True, high_open=True))
        if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__len__") or len(self.betas) != 2:
            _fail(s, "betas", "a pair [beta1, beta2]", self.betas)
        betas = tuple(_float(s, f"betas[{i}]", b, 0, 1, high_open=True) for i, b in enumerate(self.betas))
        object.__setattr__(self, "betas", betas)
        check_lr_shape(self.lr_schedule, self.warmup, self.decay, f"{s}.")
        object.__setattr__(self, "warmup", float(self.warmup))
        object.__setattr__(self, "decay", float(self.decay))

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The factor :attr:`lr_schedule` puts on the learning rate at ``step`` of ``total_steps``."""
        return lr_shape_at(step, total_steps, self.lr_schedule, self.warmup, self.decay)

    def build(self, params):
        """``torch.optim.AdamW(params, ...)`` with these settings."""
        import torch

        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class ClanSpec(_Spec):
    """The population.

    Args:
        population_size: P.
        round_length: Steps per round (phases may override it).
        duty_cycle: Competitive fraction of a round, in (0, 1] (phases may override it).
        selection: ``"winner"``, ``"truncation"`` (classic PBT) or ``"none"`` (a sweep: no
            selection); the last two need ``duty_cycle = 1``.
        init: ``"copy"`` (members start identical) or ``"independent"``.
        lr_grid: For a sweep (``selection = "none"``): one fixed learning rate per member, which
            then never mutates. Empty: no grid.
        sweep: For a sweep or PBT (``selection = "none"`` or ``"truncation"``): the genes to draw
            a value per member for, ``{gene: {"range": [low, high], "scale": "log" | "linear"}}``
            (log by default), drawn by the run's seed; every gene not named starts at the
            optimizer's value for every member. The gene's bounds follow the range (widened to
            hold the optimizer's value). Empty: the members start from the usual mutations.
        genes: Overrides of the autobound AdamW genes, ``{name: {field: value}}`` (see
            :class:`vmapclan.Gene`), e.g. ``{"lr": {"low": 1e-4, "high": 1e-1}}``.
        confidence: With winner selection: a challenger wins a round only when its gain over
            the control (member 0, the unmutated incumbent) is significant at this confidence,
            by a paired test on the round's validation samples (``Clan(confidence=...)``), in
            [0, 1); 0: the lowest validation loss wins, however small its lead.
        competitive_lr: How the lr a genome names (the lr of a cooperative step, at batch
            ``P x batch_size``) carries to a competitive step (batch ``batch_size``): ``"same"``
            uses it as is; ``"sqrt"`` (the default) divides it by sqrt(P) (the square-root
            scaling rule for Adam), so a genome is scored the way it will be used. Only with
            winner selection: the members of a sweep or of PBT never cooperate, so their genome's
            lr is the lr they train at.
        keep_best: With winner selection: keep a copy of the best incumbent seen (by its
            validation loss at the end of each round and cooperative stretch) and return it
            as the run's model when it beats the last one on the whole validation split (a
            guard against overfitting, as early stopping is).
    """

    section: ClassVar[str] = "clan"
    population_size: int = DEFAULTS.population_size
    round_length: int = DEFAULTS.round_length
    duty_cycle: float = DEFAULTS.duty_cycle
    selection: str = "winner"
    init: str = "copy"
    lr_grid: tuple[float, ...] = ()
    sweep: dict = dataclasses.field(default_factory=dict)
    genes: dict = dataclasses.field(default_factory=dict)
    confidence: float = 0.0
    keep_best: bool = DEFAULTS.keep_best
    competitive_lr: str = DEFAULTS.competitive_lr

    def __post_init__(self) -> None:
        s = self.section
        _int(s, "population_size", self.population_size)
        _int(s, "round_length", self.round_length)
        object.__setattr__(self, "duty_cycle", _float(s, "duty_cycle", self.duty_cycle, 0, 1, low_open=True))
        if self.selection not in ("winner", "truncation", "none"):
            _fail(s, "selection", "'winner', 'truncation' or 'none'", self.selection)
        if self.selection != "none" and self.population_size < 2:
            raise ValueError(f"clan.population_size must be >= 2 for selection {self.selection!r}, "
                             f"got {self.population_size}")
        if self.selection != "winner" and self.duty_cycle != 1:
            raise ValueError(
                f"clan.duty_cycle must be 1.0 for selection {self.selection!r} (members that differ cannot "
                f"cooperate), got {self.duty_cycle}"
            )
        if self.init not in ("copy", "independent"):
            _fail(s, "init", "'copy' or 'independent'", self.init)
        check_round(s, self.round_length, self.duty_cycle)
        if isinstance(self.lr_grid, (str, bytes)) or not hasattr(self.lr_grid, "__iter__"):
            _fail(s, "lr_grid", "a list of learning rates", self.lr_grid)
        grid = tuple(_float(s, f"lr_grid[{i}]", v, 0, math.inf, low_open=True, high_open=True)
                     for i, v in enumerate(self.lr_grid))
        object.__setattr__(self, "lr_grid", grid)
        if grid and self.selection != "none":
            raise ValueError(f"clan.lr_grid needs clan.selection = 'none' (a sweep), got {self.selection!r}")
        if grid and len(grid) != self.population_size:
            raise ValueError(
                f"clan.lr_grid must hold population_size={self.population_size} values, got {len(grid)}"
            )
        object.__setattr__(self, "sweep", _sweep_table(self.sweep, self.selection, grid))
        if not isinstance(self.genes, Mapping) or not all(isinstance(v, Mapping) for v in self.genes.values()):
            _fail(s, "genes", "a table {gene name: {field: value}}", self.genes)
        object.__setattr__(self, "genes", {k: dict(v) for k, v in self.genes.items()})
        # A run's genes are the AdamW genes: a gene of another name would evolve, read by nothing.
        unknown = sorted(set(self.genes) - set(ADAMW_GENES))
        if unknown:
            raise ValueError(f"clan.genes: no gene {unknown[0]!r}; a run's genes are the AdamW genes "
                             f"{list(ADAMW_GENES)}, whose fields clan.genes overrides")
        object.__setattr__(self, "confidence", _float(s, "confidence", self.confidence, 0, 1, high_open=True))
        if not isinstance(self.keep_best, bool):
            _fail(s, "keep_best", "true or false", self.keep_best)
        if self.competitive_lr not in ("same", "sqrt"):
            _fail(s, "competitive_lr", "'same' or 'sqrt'", self.competitive_lr)
        if self.confidence and self.selection != "winner":
            raise ValueError(f"clan.confidence needs clan.selection = 'winner' (a control to test challengers "
                             f"against), got {self.selection!r}")

    @property
    def selection_arg(self) -> str | None:
        """The ``selection`` argument of :class:`vmapclan.Clan` (``"none"`` becomes ``None``)."""
        return None if self.selection == "none" else self.selection


def _sweep_table(sweep, selection: str, grid: tuple) -> dict:
    """``[clan] sweep`` checked: ``{gene: {"range": [low, high], "scale": ...}}`` with ``low < high``, log ones positive."""
    if not isinstance(sweep, Mapping) or not all(isinstance(v, Mapping) for v in sweep.values()):
        _fail("clan", "sweep", "a table {gene: {range = [low, high], scale = 'log' or 'linear'}}", sweep)
    if sweep and selection == "winner":
        raise ValueError("clan.sweep needs clan.selection = 'none' (a sweep) or 'truncation' (PBT): winner "
                         "selection starts every member from the incumbent")
    if sweep and grid:
        raise ValueError("clan.sweep and clan.lr_grid both set the members' genes: give one of them")
    out = {}
    for name, entry in sweep.items():
        where = f"clan.sweep.{name}"
        unknown = sorted(set(entry) - {"range", "scale"})
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; a gene's sweep takes 'range' and 'scale'")
        scale = entry.get("scale", "log")
        if scale not in ("log", "linear"):
            raise ValueError(f"{where}.scale must be 'log' or 'linear', got {scale!r}")
        bounds = entry.get("range")
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ValueError(f"{where}.range must be [low, high], got {bounds!r}")
        low, high = (number_in(v, f"{where}.range", 0 if scale == "log" else -math.inf, math.inf,
                               low_open=True, high_open=True) for v in bounds)
        if not low < high:
            raise ValueError(f"{where}.range must have low < high, got {list(bounds)}")
        out[name] = {"range": [low, high], "scale": scale}
    return out


def check_round(where: str, round_length: int, duty_cycle: float) -> None:
    """Raise ``ValueError`` unless a round of ``round_length`` keeps a cooperative step (or ``duty_cycle == 1``).

    Args:
        where: Field prefix for the message (``"clan"`` or ``"schedule[2].clan"``).
        round_length: Steps per round.
        duty_cycle: Competitive fraction.
    """
    problem = round_problem(round_length, duty_cycle)
    if problem is not None:
        raise ValueError(f"{where}.{problem}")


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """The phases of a run, as plain dicts (the TOML ``[[schedule]]`` tables).

    Args:
        phases: Phase dicts (see :class:`vmapclan.Phase`); empty means :func:`default_schedule`.
    """

    phases: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.phases, (str, bytes, Mapping)) or not hasattr(self.phases, "__iter__"):
            raise TypeError(f"schedule must be a list of phase tables, got {type(self.phases).__name__}")
        phases = []
        for i, p in enumerate(self.phases):
            if isinstance(p, Phase):
                p = p.to_dict()
            if not isinstance(p, Mapping):
                raise TypeError(f"schedule[{i}] must be a phase table, got {type(p).__name__}")
            phases.append(copy.deepcopy(dict(p)))
        object.__setattr__(self, "phases", tuple(phases))
        if phases:
            try:
                self.to_schedule()
            except (ValueError, TypeError) as err:
                raise type(err)(f"schedule: {err}") from None

    def to_schedule(self, selection: str = "winner", passes: float | None = None,
                    batch_share: float | None = None) -> PhaseSchedule:
        """The :class:`vmapclan.PhaseSchedule`; when empty, :func:`default_schedule` for ``selection``,
        ``passes`` and ``batch_share``."""
        if not self.phases:
            return default_schedule(selection, passes, batch_share)
        return PhaseSchedule([Phase.from_dict(p) for p in self.phases])

    def to_dict(self) -> list[dict]:
        """The phase dicts, as a list."""
        return [copy.deepcopy(p) for p in self.phases]

    @classmethod
    def from_dict(cls, data) -> ScheduleSpec:
        """Build from a list of phase dicts (or ``{"phases": [...]}``, or ``None``)."""
        if data is None:
            return cls()
        if isinstance(data, Mapping):
            if set(data) != {"phases"}:
                raise ValueError(f"schedule: expected a list of phase tables or {{'phases': [...]}}, got keys {sorted(data)}")
            data = data["phases"]
        return cls(tuple(data) if isinstance(data, list) else data)


_SECTIONS = {"model": ModelSpec, "data": DataSpec, "optimizer": OptimizerSpec, "clan": ClanSpec}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a :class:`vmapclan.TrainingMachine` run needs.

    Args:
        task: A built-in task (``"digits-mlp"``, ``"stdlib-chars"``) or a task of your own as
            ``"package.module:ClassName"`` (a :class:`vmapclan.Task` subclass, imported when the
            run is built; see :func:`vmapclan.tasks.resolve_task`).
        total_steps: Training steps (``TrainingMachine``'s ``total_steps`` argument overrides it).
            Every step costs P member-steps, cooperative or competitive.
        task_args: Keyword arguments for a task of your own (``task = "module:Class"`` is built
            as ``Class(**task_args)``): the ``[task_args]`` table, values anything TOML holds.
            Empty for a built-in task. ``TrainingMachine(config, task=obj)`` fills it with the
            arguments ``obj`` was built with (:attr:`vmapclan.Task.init_arguments`).
        seed: Seeds the model's init, the data split, the clan's mutations and the loader.
        log_every: Steps between training-loss records (0: about 100 records per run).
        checkpoint_every: Rounds between checkpoints when the machine has an ``out_dir``; in a
            cooperative stretch, every ``checkpoint_every x clan.round_length`` steps (at its
            next divergence check, which comes every 25 steps). Default 10; 0: only at phase
            ends (and on a stop).
        model, data, optimizer, clan, schedule: The sections.

    Raises:
        ValueError, TypeError: naming the bad field, e.g. ``clan.round_length``.
    """

    task: str = "digits-mlp"
    task_args: Mapping = dataclasses.field(default_factory=dict)
    total_steps: int = 1000
    seed: int = 0
    log_every: int = 0
    checkpoint_every: int = 10
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    clan: ClanSpec = dataclasses.field(default_factory=ClanSpec)
    schedule: ScheduleSpec = dataclasses.field(default_factory=ScheduleSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            _fail("config", "task", "a task name or 'package.module:ClassName'", self.task)
        if not isinstance(self.task_args, Mapping) or not all(isinstance(k, str) for k in self.task_args):
            _fail("config", "task_args", "a table of keyword arguments for the task's class", self.task_args)
        object.__setattr__(self, "task_args", copy.deepcopy(dict(self.task_args)))
        _int("config", "total_steps", self.total_steps)
        _int("config", "seed", self.seed, low=0)
        _int("config", "log_every", self.log_every, low=0)
        _int("config", "checkpoint_every", self.checkpoint_every, low=0)
        for key, kind in {**_SECTIONS, "schedule": ScheduleSpec}.items():
            if not isinstance(getattr(self, key), kind):
                raise TypeError(f"config.{key} must be a {kind.__name__}, got {type(getattr(self, key)).__name__}")
        check_phases(self.schedule.to_schedule(self.clan.selection), selection=self.clan.selection,
                     init=self.clan.init, round_length=self.clan.round_length, duty_cycle=self.clan.duty_cycle)

    def replace(self, **changes) -> RunConfig:
        """A copy with top-level fields replaced; a section may be given as a dict of field changes.

        Example:
            >>> RunConfig().replace(total_steps=50, clan={"population_size": 4}).clan.population_size
            4
        """
        for key, value in list(changes.items()):
            if key == "model" and isinstance(value, Mapping) and not isinstance(value, ModelSpec):
                changes[key] = ModelSpec({**getattr(self, key), **value})
            elif key in _SECTIONS and isinstance(value, Mapping) and not isinstance(value, _SECTIONS[key]):
                changes[key] = dataclasses.replace(getattr(self, key), **value)
            elif key == "schedule" and not isinstance(value, ScheduleSpec):
                changes[key] = ScheduleSpec.from_dict(value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A plain dict, TOML and JSON safe (``schedule`` is a list of phase tables)."""
        out: dict[str, Any] = {"task": self.task, "total_steps": self.total_steps, "seed": self.seed,
                               "log_every": self.log_every, "checkpoint_every": self.checkpoint_every}
        if self.task_args:  # only when given: a config without arguments reads as before
            out["task_args"] = copy.deepcopy(self.task_args)
        for key in _SECTIONS:
            out[key] = getattr(self, key).to_dict()
        out["schedule"] = self.schedule.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> RunConfig:
        """Build from a dict such as a parsed TOML file.

        Raises:
            TypeError: if ``data`` is not a dict.
            ValueError: for unknown or bad fields, naming them.
        """
        _fields_of(cls, data, "config")
        kwargs = {k: v for k, v in data.items() if k not in _SECTIONS and k != "schedule"}
        for key, kind in _SECTIONS.items():
            kwargs[key] = kind.from_dict(data.get(key))
        kwargs["schedule"] = ScheduleSpec.from_dict(data.get("schedule"))
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path) -> RunConfig:
        """Read a TOML config file.

        Raises:
            FileNotFoundError: if there is no such file.
            ValueError: for invalid TOML or bad settings.
        """
        return cls.from_dict(read_toml(path))

    @classmethod
    def from_saved(cls, data: Mapping) -> RunConfig:
        """A config the package wrote itself (a run's ``config.toml``, checkpoint or ``schedule.json``).

        It holds every field of its time. A field added since takes the value that gives what
        the run did then, not today's default: a saved ``[data]`` without ``test_fraction``
        (written before runs set a test split aside) reads as ``test_fraction = 0``.

        Raises:
            ValueError, TypeError: as :meth:`from_dict`.
        """
        data_table = data.get("data") if isinstance(data, Mapping) else None
        if isinstance(data_table, Mapping) and "test_fraction" not in data_table:
            data = {**data, "data": {**data_table, "test_fraction": 0.0}}
        return cls.from_dict(data)

    def to_toml(self, unread: Sequence[str] = ()) -> str:
        """The config as TOML text (what :meth:`from_toml` reads).

        Args:
            unread: ``[data]`` fields the run's task does not read
                (:meth:`vmapclan.Task.unread_data`): left out where they hold their default,
                which reading the text back gives them again.
        """
        import tomli_w

        out = self.to_dict()
        defaults = DataSpec().to_dict()
        out["data"] = {k: v for k, v in out["data"].items() if not (k in unread and v == defaults.get(k))}
        return tomli_w.dumps(out)
