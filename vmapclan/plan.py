"""The run's plan: the settings in force in each phase of a schedule, resolved once for the machine and the replay.

A phase of a run's :class:`~vmapclan.PhaseSchedule` may change the three planes: the data (its
``batch_size`` and the task's own settings, :func:`phase_data`), the model (``freeze`` patterns,
:func:`frozen_parameters`; ``grow`` settings, applied at the phase's start) and the optimizer and
clan settings, which the clan follows itself. :func:`plan_phases` resolves every phase's data and
model settings against the task when the run is built, growing a copy of the model through the
schedule to check every growth and name the parameters each freeze pattern matches; the training
machine and the replay read the resulting :class:`PhasePlan` list and nothing else of a phase.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import DataSpec, RunConfig
from .population import check_growth
from .schedule import DATA_KEYS, Phase, PhaseSchedule
from .task import Task, task_reference

__all__ = ["PhasePlan", "plan_phases", "phase_data", "frozen_parameters", "data_key", "grow_function",
           "check_growth_phases", "growths_before"]


def phase_data(task: Task, data: DataSpec, phase: Phase, where: str = "") -> DataSpec:
    """The data settings in force during ``phase``: ``data`` with the phase's task data overrides.

    The one reading of a phase's ``data`` table beyond ``batch_size``: each key must be one of
    the task's :attr:`~vmapclan.Task.phase_data`.

    Args:
        task: The run's task.
        data: The config's data settings.
        phase: The phase.
        where: Prefix for error messages (e.g. ``"schedule[1] ('long')"``).

    Raises:
        ValueError, TypeError: for a key the task does not let a phase change, or a bad value.

    Example:
        >>> from vmapclan.tasks import TASKS
        >>> phase_data(TASKS["stdlib-chars"], DataSpec(), Phase("p", 0, 1, data={"seq_len": 16})).seq_len
        16
    """
    where = where or f"phase {phase.name!r}"
    changes = {k: v for k, v in phase.data.items() if k not in DATA_KEYS}
    allowed = list(DATA_KEYS) + list(task.phase_data)
    for key in changes:
        if key not in allowed:
            raise ValueError(f"{where}: unknown data setting {key!r} for task {task_reference(task)!r}; "
                             f"a phase may change {allowed}")
    if not changes:
        return data
    fields = {f.name for f in dataclasses.fields(DataSpec)} - {"extra"}
    own = {k: v for k, v in changes.items() if k not in fields}  # the task's own settings (data_defaults)
    try:
        return dataclasses.replace(data, **{k: v for k, v in changes.items() if k in fields},
                                   extra={**data.extra, **own})
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None


def frozen_parameters(names, patterns, where: str = "") -> list[str]:
    """The parameter names that match any of the glob ``patterns`` (:mod:`fnmatch`), in ``names``' order.

    Args:
        names: Parameter names (``model.named_parameters()``'s).
        patterns: A phase's ``model.freeze`` patterns.
        where: Prefix for the error message.

    Raises:
        ValueError: if a pattern matches no parameter (naming it and some of the names).

    Example:
        >>> frozen_parameters(["0.weight", "0.bias", "2.weight"], ["0.*"])
        ['0.weight', '0.bias']
    """
    names = list(names)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = names[:8] + (["..."] if len(names) > 8 else [])
            raise ValueError(f"{where + ': ' if where else ''}model.freeze pattern {pattern!r} matches no parameter; "
                             f"the parameters are {shown}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def data_key(data: DataSpec, base: DataSpec) -> tuple:
    """A hashable name for a phase's data settings: the fields that differ from the config's (``()``: the same).

    Example:
        >>> data_key(DataSpec(seq_len=16), DataSpec())
        (('seq_len', 16),)
    """
    # The task's own settings are a table of any TOML values: named by their JSON text.
    return tuple((f.name, json.dumps(getattr(data, f.name), sort_keys=True) if f.name == "extra"
                  else getattr(data, f.name)) for f in dataclasses.fields(data)
                 if getattr(data, f.name) != getattr(base, f.name))


def grow_function(task: Task, schedule: PhaseSchedule, index: int) -> Callable[[nn.Module], nn.Module]:
    """``module -> grown module`` for phase ``index``'s ``model.grow`` (the task's :meth:`~vmapclan.Task.grow`),
    its errors naming the phase."""
    phase = schedule[index]
    where = f"schedule[{index}] ({phase.name!r})"

    def grow(module: nn.Module) -> nn.Module:
        try:
            return task.grow(module, phase.model["grow"])
        except NotImplementedError as err:
            raise ValueError(f"{where}: model.grow: {err}") from None
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from None

    return grow


def check_growth_phases(schedule: PhaseSchedule, total_steps: int) -> None:
    """Refuse a ``model.grow`` where it cannot apply: in the first phase, or in a phase without steps."""
    ranges = schedule.step_ranges(total_steps)
    for i, phase in enumerate(schedule):
        if "grow" not in phase.model:
            continue
        where = f"schedule[{i}] ({phase.name!r})"
        if i == 0:
            raise ValueError(f"{where}: model.grow applies at a phase's start; the first phase trains the model "
                             f"the task builds")
        if ranges[i][1] == ranges[i][2]:
            raise ValueError(f"{where}: model.grow needs a phase that runs at least one step; it has none in "
                             f"{total_steps} steps")


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """The data and model settings in force during one phase of a run.

    Attributes:
        index: The phase's index in the schedule.
        phase: The phase.
        first_step: Its first step (``step_ranges``'s).
        data: The data settings (the config's, with the phase's task data overrides).
        data_key: :func:`data_key` of ``data``: phases with equal keys train on the same data.
        batch_size: Samples per member per step.
        freeze: The names of the parameters its ``model.freeze`` patterns match.
        grow: Its ``model.grow`` settings (the task's), or ``None``.
    """

    index: int
    phase: Phase
    first_step: int
    data: DataSpec
    data_key: tuple
    batch_size: int
    freeze: tuple[str, ...]
    grow: object | None

    @property
    def where(self) -> str:
        """``"schedule[i] ('name')"``, for messages."""
        return f"schedule[{self.index}] ({self.phase.name!r})"

    def record_fields(self, *, growth: bool) -> dict:
        """The history record fields of the phase's data and model planes (none when it changes neither).

        ``data``: the phase's data settings beyond ``batch_size``; ``freeze``: its freeze
        patterns; ``grow``: its growth settings, on the record that starts at the phase's first
        step (``growth``). The exported schedule carries them on, so the replay follows them.
        """
        out = {}
        if growth and self.grow is not None:
            out["grow"] = copy.deepcopy(self.grow)
        data = {k: v for k, v in self.phase.data.items() if k not in DATA_KEYS}
        if data:
            out["data"] = data
        if "freeze" in self.phase.model:
            out["freeze"] = list(self.phase.model["freeze"])
        return out


def plan_phases(task: Task, config: RunConfig, schedule: PhaseSchedule, model: nn.Module | None = None,
                model_settings: dict | None = None) -> list[PhasePlan]:
    """Every phase's data and model settings, checked against the task: the one reading of a schedule's planes.

    Each phase's data settings are checked by the task (:meth:`~vmapclan.Task.check_data`). With
    ``model``, a copy of it grows through the schedule (checking every growth without moving the
    run's random numbers) and every phase's freeze patterns are matched against its parameters.

    Args:
        task: The run's task.
        config: The run's config (its data settings, batch size and horizon).
        schedule: The run's phases.
        model: The model the task built, or ``None`` to leave freezing and growth unresolved
            (``freeze`` then empty).
        model_settings: The task's checked model settings (for :meth:`~vmapclan.Task.check_data`).

    Raises:
        ValueError, TypeError: naming the phase and the setting.
    """
    settings = task.model_settings(config.model) if model_settings is None else model_settings
    check_growth_phases(schedule, config.total_steps)
    names = _architectures(task, schedule, model) if model is not None else [[] for _ in schedule]
    plans = []
    for i, (phase, first, _end) in enumerate(schedule.step_ranges(config.total_steps)):
        where = f"schedule[{i}] ({phase.name!r})"
        data = phase_data(task, config.data, phase, where)
        if data is not config.data:
            task.check_data(settings, data)
        freeze = frozen_parameters(names[i], phase.model["freeze"], where) \
            if "freeze" in phase.model and model is not None else []
        plans.append(PhasePlan(i, phase, first, data, data_key(data, config.data),
                               phase.data.get("batch_size", config.data.batch_size), tuple(freeze),
                               copy.deepcopy(phase.model.get("grow"))))
    return plans


def _architectures(task: Task, schedule: PhaseSchedule, model: nn.Module) -> list[list[str]]:
    """Each phase's parameter names, growing a copy of ``model`` as the schedule will (checking every growth)."""
    names, current = [], model
    with torch.random.fork_rng(devices=[]):  # the check must not move the run's random numbers
        for i, phase in enumerate(schedule):
            if "grow" in phase.model:
                grown = grow_function(task, schedule, i)(copy.deepcopy(current))
                check_growth(current, grown, f"schedule[{i}] ({phase.name!r}): model.grow")
                current = grown
            names.append([n for n, _ in current.named_parameters()])
    return names


def growths_before(plans: Sequence[PhasePlan], step: int) -> int:
    """How many of the plan's growths apply before ``step`` (those of phases that start earlier)."""
    return sum(1 for plan in plans if plan.grow is not None and plan.first_step < step)
