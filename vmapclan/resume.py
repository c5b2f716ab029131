"""A run's checkpoint: its format, how a run directory is read back for a resume, and earlier formats' upgrade.

A run checkpoint is ``{"format_version", "clan": clan.state_dict(), "machine": the run's own
state}``, written atomically behind a hash (:func:`~vmapclan.save_checkpoint`). The machine's
own state is its config and its record (:class:`~vmapclan.record.RunLog`); the clan's holds the
rest, the time and the plan's position included, and each checks its own part when it is loaded.

Version 2 checkpoints (taken before the clan held the time, the kept incumbent and the plan's
position, which the machine's state then held) are upgraded on reading
(:func:`upgrade_checkpoint`) and resume exactly where they stopped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .checks import is_int
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, read_toml
from .task import Task, task_reference

__all__ = ["CHECKPOINT_VERSION", "save_run_checkpoint", "load_run_checkpoint", "read_run", "upgrade_checkpoint",
           "first_difference"]

#: Version 3: the clan's state holds the time, the plan's position and the kept incumbent. Version 2
#: (checkpoints at any step, the machine holding those) is read and upgraded.
CHECKPOINT_VERSION = 3
_READS = (2, CHECKPOINT_VERSION)


def save_run_checkpoint(path: str | os.PathLike, clan, machine_state: Mapping) -> None:
    """Atomically write ``{"format_version", "clan": clan.state_dict(), "machine": machine_state}``.

    A crash while writing leaves the previous checkpoint intact (see :func:`~vmapclan.save_checkpoint`).

    Args:
        path: Target file.
        clan: The clan to save.
        machine_state: The machine's own state (config and record) as plain values.
    """
    save_checkpoint({"format_version": CHECKPOINT_VERSION, "clan": clan.state_dict(),
                     "machine": dict(machine_state)}, path)


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_run_checkpoint` (this version's or version 2).

    Raises:
        FileNotFoundError: if there is none.
        ValueError: for an unreadable file or one of another format version.
    """
    state = load_checkpoint(path, map_location="cpu")
    version = state.get("format_version") if isinstance(state, Mapping) else None
    if version not in _READS:
        raise ValueError(f"load_run_checkpoint: {path} has format version {version!r}, expected {CHECKPOINT_VERSION}")
    for key in ("clan", "machine"):
        if not isinstance(state.get(key), Mapping):
            raise ValueError(f"load_run_checkpoint: {path} has no {key!r} table; it is not a run checkpoint")
    return dict(state)


def first_difference(a, b, prefix: str = "") -> str | None:
    """The dotted name of the first setting where the plain values ``a`` and ``b`` differ, or ``None``.

    Example:
        >>> first_difference({"clan": {"population_size": 8}}, {"clan": {"population_size": 4}})
        'clan.population_size'
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
        return None
    return None if a == b else prefix or "config"


def _lookup(data, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def read_run(run_dir: str | os.PathLike, task: Task | None = None) -> tuple[RunConfig, dict]:
    """The config and checkpoint of the run in ``run_dir``, for a resume.

    The run keeps the settings it started with: a ``config.toml`` in ``run_dir`` that says
    otherwise is refused rather than mixed into the saved state. A config written before a run
    named its phases resumes under the default of that time, one phase of clan rounds.

    Args:
        run_dir: The run directory.
        task: The run's task, for one that cannot be imported by the checkpoint's ``config.task``.

    Raises:
        FileNotFoundError: if ``run_dir`` has no checkpoint.
        ValueError: for a damaged or foreign checkpoint, an edited ``config.toml`` (naming the
            setting), or another task.
    """
    run_dir = Path(run_dir)
    state = load_run_checkpoint(run_dir / "checkpoint.pt")
    if not isinstance(state["machine"].get("config"), Mapping):
        raise ValueError(f"TrainingMachine.resume: {run_dir / 'checkpoint.pt'} has no machine config")
    try:
        config = RunConfig.from_saved(state["machine"]["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"TrainingMachine.resume: the checkpoint's config is invalid: {err}") from None
    toml_path = run_dir / "config.toml"
    if toml_path.exists():
        try:
            edited = RunConfig.from_saved(read_toml(toml_path)).to_dict()
        except (ValueError, TypeError, OSError) as err:
            raise ValueError(f"TrainingMachine.resume: {toml_path} cannot be read: {err}") from None
        saved = config.to_dict()
        field = first_difference(saved, edited)
        if field is not None:
            edit, kept = _lookup(edited, field), _lookup(saved, field)  # None: the setting is not there
            says = f"sets {field} = {edit!r}" if edit is not None else f"has no {field}"
            raise ValueError(
                f"TrainingMachine.resume: {toml_path} {says}, the checkpoint's run has "
                f"{'none' if kept is None else repr(kept)}; a resumed run keeps its settings: undo the edit, or "
                f"start a new run")
    if not config.schedule.phases:
        # Written before a run's config named the phases it got: the default then was one phase
        # of clan rounds over the whole run, and the run continues under it.
        config = config.replace(schedule=[{"name": "clan", "start_t": 0.0, "end_t": 1.0}])
    if task is not None and task_reference(task) != config.task:
        raise ValueError(f"TrainingMachine.resume: the run trained task {config.task!r}, "
                         f"got task {task_reference(task)!r}")
    return config, state


def saved_step(state: Mapping) -> int | None:
    """The step a run checkpoint was taken at (``None`` if it says none an int)."""
    if state.get("format_version") == 2:
        clock = state["machine"].get("clock")
        step = clock.get("step") if isinstance(clock, Mapping) else None
    else:
        step = state["clan"].get("time_step")
    return step if is_int(step) else None


def upgrade_checkpoint(state: Mapping, clan, total_steps: int, who: str = "TrainingMachine.resume") -> dict:
    """A version-2 run checkpoint in today's form (a version-3 one as it is).

    Version 2 kept the time (``machine/clock``) and the kept incumbent (``machine/kept``) in the
    machine's state, and the clan's state (its version 1) had no plan position: they move into
    the clan's state, which takes the settings the run's config gives ``clan`` (its horizon, plan
    and lr settings), the stretch in force at the saved step, and where its next record starts.

    Args:
        state: The checkpoint (:func:`load_run_checkpoint`).
        clan: The run's clan, built from the checkpoint's config.
        total_steps: The run's steps.
        who: The caller, for the messages.

    Raises:
        ValueError: for a version-2 clock no run of this config can have.
    """
    if state.get("format_version") == CHECKPOINT_VERSION:
        return dict(state)
    machine = dict(state["machine"])
    clock = machine.pop("clock", None)
    if not isinstance(clock, Mapping):
        raise ValueError(f"{who}: the checkpoint's machine/clock must be a table, got {clock!r}")
    if clock.get("total_steps") != total_steps:
        raise ValueError(f"{who}: the checkpoint's machine/clock/total_steps must be {total_steps} (the config's), "
                         f"got {clock.get('total_steps')!r}")
    step = clock.get("step")
    if not is_int(step) or not 0 <= step <= total_steps:
        raise ValueError(f"{who}: the checkpoint's machine/clock/step must be an int in [0, {total_steps}], "
                         f"got {step!r}")
    clan_state = dict(state["clan"])
    if isinstance(clan_state.get("config"), Mapping):
        clan_state["config"] = {**clan.state_config(), **clan_state["config"]}
    plan = clan.plan
    index = next((k for k, s in enumerate(plan) if s.start <= step < s.end), len(plan))
    history = machine.get("history")
    last_end = history[-1].get("end_step", 0) if isinstance(history, list) and history and \
        isinstance(history[-1], Mapping) else 0
    clan_state.update(time_step=step, stretch=index, kept=machine.pop("kept", None),
                      record_start=max(plan[index].start, last_end) if index < len(plan) else total_steps)
    return {**state, "format_version": CHECKPOINT_VERSION, "clan": clan_state, "machine": machine}
