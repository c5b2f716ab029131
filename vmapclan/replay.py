"""Export the schedule a clan found, and replay it on one plain model with ``torch.optim.AdamW``.

With winner selection the best model's ancestry is one lineage: in every round it trained with
the incumbent genome in the cooperative phase (member 0's genome, which is the incumbent) and
with the round winner's genome in the competitive phase, then became everyone. (A round in which
every member diverged has no winner; the clan restores its starting state, and the export gives
that stretch the incumbent genome.) Its
hyperparameters over time are therefore piecewise constant, and :func:`export_schedule` writes
them as a :class:`~vmapclan.PhaseSchedule`: one phase per stretch of constant settings, each
with every AdamW hyperparameter and the samples per step (``P x B`` while cooperating, ``B``
while competing), and ``clan.competition = false``.

:func:`replay` then trains a single ordinary model from the same initial weights with
``torch.optim.AdamW``, setting the optimizer's param group from the phase in force at each step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .checks import is_int, number_in, read_regular_file, refuse
from .genome import ADAMW_GENES, group_ratios, optimizer_settings
from .plan import data_key, frozen_parameters, phase_data
from .rounds import competitive_steps
from .schedule import Phase, PhaseSchedule, TimeController, phase_optimizer
from .config import RunConfig
from .task import build_optimizer, built_model, call_model, data_batches, data_length, resolve_task

__all__ = ["export_schedule", "write_schedule", "read_schedule", "replay", "ReplayResult", "SCHEDULE_VERSION"]

SCHEDULE_VERSION = 1
GENES = ADAMW_GENES


def _planes_of(record: Mapping) -> tuple[dict, dict]:
    """``(data overrides beyond batch_size, model overrides)`` a history record carries (see the machine)."""
    model = {"freeze": list(record["freeze"])} if "freeze" in record else {}
    if "grow" in record:
        model["grow"] = copy.deepcopy(record["grow"])
    return dict(record.get("data", {})), model


def _lineages(history: Sequence[Mapping], member: int | None, population_size: int | None) -> list[int | None]:
    """The member each record's schedule follows: ``None`` (its winner) without ``member``, else
    the ancestor of the run's final ``member`` that trained in it (the same member without ``sources``)."""
    sizes = {len(r["genomes"]["lr"]) for r in history if r.get("kind") != "cooperative" and "lr" in r.get("genomes", {})}
    size = population_size if population_size is not None else next(iter(sizes), None)
    if population_size is not None and (not is_int(population_size) or sizes - {population_size}):
        raise ValueError(f"export_schedule: population_size={population_size!r}, but the history's rounds hold "
                         f"genomes of {sorted(sizes)} members")
    if member is None:
        return [None] * len(history)
    if not is_int(member) or size is not None and not 0 <= member < size:
        raise ValueError(f"export_schedule: member must be an int in [0, {size}), got {member!r}")
    lineages, current = [], member
    for record in reversed(history):  # member i of a round's end took member sources[i]'s state
        if record.get("sources") is not None:
            current = record["sources"][current]
        lineages.append(current)
    return lineages[::-1]


def _pieces_of(record: Mapping, start: int, member: int | None, duty_cycle: float | None,
               batch_size: int | None, population_size: int | None) -> list[tuple]:
    """``(name, first_step, end_step, hyper, samples_per_step, (data, model))`` pieces of one history record.

    A growth happens once, at the record's start: only its first piece carries it.
    """
    data, model = _planes_of(record)
    after = (data, {k: v for k, v in model.items() if k != "grow"})
    pieces = _hyper_pieces_of(record, start, member, duty_cycle, batch_size, population_size)
    return [(*piece, (data, model) if i == 0 else after) for i, piece in enumerate(pieces)]


def _hyper_pieces_of(record: Mapping, start: int, member: int | None, duty_cycle: float | None,
                     batch_size: int | None, population_size: int | None) -> list[tuple]:
    """``(name, first_step, end_step, hyper, samples_per_step)`` pieces of one history record."""
    end = record.get("end_step", record.get("step"))
    if record.get("kind") == "cooperative":
        # A stretch undone by a divergence restore is its own piece: its phase goes on after it.
        name = f"{record['phase']}/diverged/{start}" if record.get("event") == "diverged" else record["phase"]
        return [(name, start, end, dict(record["hyper"]), record["batch_size"])]
    genomes = record["genomes"]
    missing = [g for g in GENES if g not in genomes]
    if missing:
        raise ValueError(f"export_schedule: round {record.get('round')} has no gene {missing[0]!r}; "
                         "the clan needs autobind=['adamw']")
    coop = record.get("cooperative_steps")
    if coop is None:
        if duty_cycle is None:
            raise ValueError("export_schedule: the history has no 'cooperative_steps'; pass duty_cycle")
        length = end - start
        coop = 0 if duty_cycle == 1 else length - competitive_steps(length, duty_cycle)
    b = record.get("batch_size", batch_size)
    p = record.get("population_size", population_size)
    if b is None or p is None:
        raise ValueError("export_schedule: the history has no 'batch_size'/'population_size'; pass them")
    lineage = record["winner"] if member is None else member
    name = f"{record.get('phase', 'clan')}/r{record['round']}"
    if lineage is None:
        # A round where every member diverged (the clan restored the round's starting state):
        # no winner, so the stretch carries the incumbent genome, which is member 0's.
        return [(f"{name}/diverged", start, end, {g: genomes[g][0] for g in GENES}, b * p if coop else b)]
    pieces = []
    if coop:
        # Cooperating members share the incumbent genome, which is member 0's.
        pieces.append((f"{name}/coop", start, start + coop, {g: genomes[g][0] for g in GENES}, b * p))
    compete = {g: genomes[g][lineage] for g in GENES}
    compete["lr"] *= record.get("competitive_lr_scale", 1.0)  # the machine's clan.competitive_lr rule
    pieces.append((f"{name}/compete", start + coop, end, compete, b))
    return pieces


def export_schedule(history: Sequence[Mapping], total_steps: int, *, member: int | None = None,
                    duty_cycle: float | None = None, batch_size: int | None = None,
                    population_size: int | None = None) -> PhaseSchedule:
    """The piecewise-constant hyperparameter schedule the best model trained with, over ``t``.

    Args:
        history: The training machine's history (``TrainingResults.history``) or a plain
            ``clan.history`` of contiguous rounds from step 0 (then give ``duty_cycle``,
            ``batch_size`` and ``population_size``).
        total_steps: Steps of the run; the history must cover ``[0, total_steps)``.
        member: Follow the member that ends the run at this index instead of each round's
            winner (winner selection): for a sweep, where members never copy each other, the
            same member in every round; for truncation selection, its ancestry, back through
            each round's ``sources`` (who copied whom).
        duty_cycle: For a plain ``clan.history``: the clan's duty cycle.
        batch_size: For a plain ``clan.history``: per-member batch size.
        population_size: For a plain ``clan.history``: P.

    Returns:
        A :class:`PhaseSchedule` whose phases carry every AdamW hyperparameter in ``optimizer``,
        the samples per step in ``data.batch_size`` (and the phase's other data settings, e.g.
        ``seq_len``), the phase's ``model.freeze``, ``model.grow`` on the phase that starts where
        the model grew, and ``clan.competition = false``; adjacent stretches with equal settings
        are merged.

    Raises:
        ValueError: for an empty history, one with gaps, or one that does not end at ``total_steps``;
            a ``member`` or ``population_size`` that the history's genomes contradict.
        TypeError: for a history that is not a list of records.
    """
    clock = TimeController(total_steps)
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence) or \
            not all(isinstance(r, Mapping) for r in history):
        raise TypeError(f"export_schedule: history must be a list of history records (dicts), got "
                        f"{type(history).__name__}")
    if not history:
        raise ValueError("export_schedule: the history is empty (no rounds ran)")
    if duty_cycle is not None:
        number_in(duty_cycle, "export_schedule: duty_cycle", 0.0, 1.0, low_open=True)
    pieces: list[tuple] = []
    position = 0
    for record, lineage in zip(history, _lineages(history, member, population_size)):
        start = record.get("start_step", position)
        if start != position:
            raise ValueError(f"export_schedule: the history has a gap or overlap at step {position} "
                             f"(the next record starts at step {start})")
        for piece in _pieces_of(record, start, lineage, duty_cycle, batch_size, population_size):
            if pieces and pieces[-1][3:] == piece[3:]:
                pieces[-1] = (pieces[-1][0], pieces[-1][1], piece[2], *pieces[-1][3:])
            else:
                pieces.append(piece)
        position = pieces[-1][2]
    if position != total_steps:
        raise ValueError(f"export_schedule: the history covers steps [0, {position}), "
                         f"but total_steps is {total_steps}")
    phases = [Phase(name, clock.time_at(first), clock.time_at(end), optimizer=hyper,
                    data={"batch_size": int(samples), **data}, model=model, clan={"competition": False})
              for name, first, end, hyper, samples, (data, model) in pieces]
    return PhaseSchedule(phases)


def write_schedule(path: str | os.PathLike, schedule: PhaseSchedule, config: RunConfig, total_steps: int,
                   clan: Mapping | None = None) -> None:
    """Write ``schedule.json``: the phases, the run's config and ``total_steps``, and the clan's final metrics.

    Args:
        path: Target file.
        schedule: The exported schedule.
        config: The run's config (the replay rebuilds the task, model and data from it).
        total_steps: Steps the schedule spans.
        clan: ``{"val_loss", "val_accuracy"}`` of the clan's best model (with ``test_loss``,
            ``test_accuracy`` where the run has a test split), shown next to the replay's.
    """
    schedule.save(path, format_version=SCHEDULE_VERSION, total_steps=total_steps,
                  config=config.replace(total_steps=total_steps).to_dict(), clan=dict(clan or {}))


def read_schedule(path: str | os.PathLike) -> tuple[PhaseSchedule, RunConfig, dict]:
    """Read ``schedule.json`` written by :func:`write_schedule`.

    Returns:
        ``(schedule, config, clan_metrics)``; ``config.total_steps`` is the schedule's length.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: for a file that is not a vmapclan schedule.
    """
    text = read_regular_file(path, "read_schedule", "no schedule")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not JSON: {err}") from None
    if not isinstance(data, Mapping) or data.get("format_version") != SCHEDULE_VERSION:
        raise ValueError(f"{path}: not a vmapclan schedule (format_version {SCHEDULE_VERSION} expected)")
    for key in ("config", "total_steps", "phases"):
        if key not in data:
            raise ValueError(f"{path}: missing field {key!r}")
    config = RunConfig.from_saved(data["config"]).replace(total_steps=data["total_steps"])
    return PhaseSchedule.from_dict(data), config, dict(data.get("clan", {}))


def _grow_plain(task, model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, phase: Phase):
    """``(grown model, its AdamW)``: the task's growth, every kept parameter's optimizer state carried over."""
    from .population import check_growth

    before = dict(model.named_parameters())
    template = copy.deepcopy(model)
    try:
        grown = task.grow(model, phase.model["grow"])
    except NotImplementedError as err:
        raise ValueError(f"replay: phase {phase.name!r}: model.grow: {err}") from None
    check_growth(template, grown, f"replay: phase {phase.name!r}: model.grow")
    grown.train(template.training)
    fresh = build_optimizer(task, grown, config.optimizer)
    for name, parameter in grown.named_parameters():
        if name in before and before[name] in optimizer.state:
            fresh.state[parameter] = optimizer.state[before[name]]
    return grown, fresh


@dataclasses.dataclass
class ReplayResult:
    """What :func:`replay` returns.

    Attributes:
        model: The trained plain model.
        final: ``{"val_loss", "val_accuracy"}`` on the whole validation set, and
            ``test_loss``, ``test_accuracy`` on the test split where the run has one.
        trace: Per step (when asked for): the param group's ``lr``, ``weight_decay``, ``betas``,
            ``eps`` and the batch size used.
        losses: The training loss of every step.
    """

    model: nn.Module
    final: dict
    trace: list[dict]
    losses: list[float]


def replay(schedule: PhaseSchedule, config: RunConfig | Mapping, *, total_steps: int | None = None,
           trace: bool = False, callback: Callable[[int, str], None] | None = None,
           task=None, keep_step: int | None = None) -> ReplayResult:
    """Train one plain model with ``torch.optim.AdamW`` following ``schedule``.

    The model is built and initialised as the training machine does (same task, config and
    seed), so it starts from the clan's initial weights. At each step the param group takes the
    ``lr``, ``weight_decay``, ``betas`` and ``eps`` of the phase in force, by the machine's rule
    (:func:`~vmapclan.schedule.phase_optimizer`, with the config's optimizer as the incumbent: a
    value a phase does not set keeps the config's; ``lr_scale`` multiplies the config's lr),
    the lr times the factor of the config's ``optimizer.lr_schedule`` at that step, and the batch holds the
    phase's ``data.batch_size`` samples (default: ``config.data.batch_size``), drawn from a
    fresh permutation each epoch. A phase's other data settings (``seq_len``) take the data
    the task loads with them from the phase's first step on (a new epoch), and the parameters
    a phase's ``model.freeze`` matches are skipped by the optimizer while it lasts, as a
    parameter without a gradient is. A phase with ``model.grow`` grows the model at its first
    step (:meth:`~vmapclan.Task.grow`): the existing parameters keep their AdamW state, the
    new ones start fresh in a new optimizer built from the config.

    Args:
        schedule: The schedule to follow (e.g. from :func:`read_schedule`).
        config: The run config (task, model, data, optimizer, seed).
        total_steps: Steps to run (default: ``config.total_steps``).
        trace: Record the settings used at every step.
        callback: Called as ``callback(step, phase_name)`` after every step.
        task: The :class:`~vmapclan.Task` to train (default: the one ``config.task`` names,
            imported if it is a ``"module:ClassName"``).
        keep_step: Return the model as it was after this many steps (the run's ``kept_step``,
            where the training machine kept its best incumbent); the steps after it still run,
            so the trace and losses cover the whole schedule.

    Returns:
        A :class:`ReplayResult`.

    Raises:
        ValueError: for a batch size larger than the training set, a task that cannot be
            imported, or model, data, freeze or growth settings the task refuses.
        TypeError: for a schedule, config or callback of the wrong kind.
    """
    if not isinstance(schedule, PhaseSchedule):
        raise TypeError(f"replay: schedule must be a PhaseSchedule (read_schedule gives one), got "
                        f"{type(schedule).__name__}")
    if isinstance(config, Mapping):
        config = RunConfig.from_dict(config)
    if not isinstance(config, RunConfig):
        raise TypeError(f"replay: config must be a RunConfig or a dict of its tables (RunConfig.from_toml reads a "
                        f"file), got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"replay: callback must be callable, got {type(callback).__name__}")
    total = config.total_steps if total_steps is None else total_steps
    TimeController(total)  # validates total_steps
    if keep_step is not None and (not is_int(keep_step) or not 0 <= keep_step <= total):
        refuse("replay: keep_step", f"an int in [0, {total}]", keep_step)
    run = _PlainRun(resolve_task(config.task, config.task_args) if task is None else resolve_task(task), config)
    steps_trace, losses, kept = [], [], None
    for step in range(total):
        if step == keep_step:
            kept = copy.deepcopy(run.model.state_dict())
        phase = schedule.phase_at_step(step, total)
        loss, entry = run.step(phase, step, total)
        losses.append(loss)
        if trace:
            steps_trace.append(entry)
        if callback is not None:
            callback(step + 1, phase.name)
    if kept is not None:
        run.model.load_state_dict(kept)
    data = run.datasets[()]
    final = {f"val_{k}": v for k, v in run.task.evaluate(run.model, data.val).items()}
    if data.test is not None:
        final.update({f"test_{k}": v for k, v in run.task.evaluate(run.model, data.test).items()})
    return ReplayResult(model=run.model.eval(), final=final, trace=steps_trace, losses=losses)


class _PlainRun:
    """One plain model and its ``torch.optim.AdamW``, trained a step at a time in a schedule's phases."""

    def __init__(self, task, config: RunConfig):
        self.task, self.model_settings = task, task.model_settings(config.model)
        self.config = config = config.replace(data=task.data_settings(config.data))  # the task's own, with defaults
        torch.manual_seed(config.seed)  # as TrainingMachine: the same initial weights
        self.datasets = {(): task.load(config.data, config.seed)}
        self.model = built_model(task, self.model_settings, config.data, self.datasets[()])
        self.optimizer = build_optimizer(task, self.model, config.optimizer)
        # The genes stand for the first (decaying) group's settings; every group follows in proportion.
        self.configured, self.ratios = optimizer_settings(self.optimizer), group_ratios(self.optimizer)
        self.parameters = dict(self.model.named_parameters())
        self.frozen_in: dict[str, list[str]] = {}  # phase name -> the parameter names its freeze patterns match
        self.generator = torch.Generator().manual_seed(config.seed + 2)
        self.perm, self.position, self.current = None, 0, None
        self.model.train()

    def _enter(self, phase: Phase):
        """The phase's data (loaded once per data settings) and frozen parameters; the model grown at its start."""
        if phase.name != self.current and "grow" in phase.model:
            self.model, self.optimizer = _grow_plain(self.task, self.model, self.optimizer, self.config, phase)
            self.parameters, self.frozen_in = dict(self.model.named_parameters()), {}
        self.current = phase.name
        spec = phase_data(self.task, self.config.data, phase)
        key = data_key(spec, self.config.data)
        if key not in self.datasets:
            self.task.check_data(self.model_settings, spec)
            self.datasets[key] = self.task.load(spec, self.config.seed)
        if phase.name not in self.frozen_in:
            self.frozen_in[phase.name] = frozen_parameters(self.parameters, phase.model.get("freeze", ()),
                                                           f"phase {phase.name!r}")
        return self.datasets[key].train, self.frozen_in[phase.name]

    def _batch(self, train, phase: Phase):
        """The next batch of the phase's size, from a fresh permutation each epoch, as the clan's loader draws."""
        n = data_length(train)
        batch_size = phase.data.get("batch_size", self.config.data.batch_size)
        if batch_size > n:
            raise ValueError(f"replay: phase {phase.name!r} asks for batch_size={batch_size}, "
                             f"the training set has {n} samples")
        if self.perm is None or len(self.perm) != n or n - self.position < batch_size:
            # Epoch over, or other data: a new permutation, as the clan's loader does.
            self.perm, self.position = torch.randperm(n, generator=self.generator), 0
        index = self.perm[self.position:self.position + batch_size]
        self.position += batch_size
        return (*next(data_batches(train, index)), batch_size)

    def step(self, phase: Phase, step: int, total: int) -> tuple[float, dict]:
        """One step at the phase's settings; returns its loss and what it used (the trace's entry)."""
        train, frozen = self._enter(phase)
        settings = phase_optimizer(phase.optimizer, self.configured)
        lr = settings["lr"] * self.config.optimizer.lr_factor(step, total)  # the run's lr shape, as in the machine
        for group, (lr_ratio, wd_ratio) in zip(self.optimizer.param_groups, self.ratios):
            group["lr"], group["weight_decay"] = lr * lr_ratio, settings["weight_decay"] * wd_ratio
            group["eps"], group["betas"] = settings["eps"], (settings["betas/0"], settings["betas/1"])
        x, y, batch_size = self._batch(train, phase)
        loss = self.task.loss(call_model(self.model, x), y)
        loss.backward()
        for name in frozen:  # AdamW skips a parameter without a gradient: no update, no decay
            self.parameters[name].grad = None
        self.optimizer.step()
        self.optimizer.zero_grad()
        first = self.optimizer.param_groups[0]  # the group the genes stand for (one group: the only one)
        return loss.item(), {"step": step, "phase": phase.name, "lr": first["lr"],
                             "weight_decay": first["weight_decay"], "betas": first["betas"], "eps": first["eps"],
                             "batch_size": batch_size, "data": {k: v for k, v in phase.data.items() if k != "batch_size"},
                             "freeze": frozen,
                             "input_shape": ({k: tuple(t.shape) for k, t in x.items()} if isinstance(x, Mapping)
                                             else tuple(x.shape))}
