"""The training machine: a whole population run from a config, driving a clan through its plan.

``TrainingMachine(config, total_steps).train()`` builds the task's data and model, wraps them in a
:class:`~vmapclan.Clan` with the run's horizon, schedule and settings, and drives it: the clan
follows its plan over normalized time itself (searches, clan rounds, cooperative stretches:
:func:`vmapclan.rounds.plan_stretches`), and the machine feeds each step the data of the phase in
force, freezes and grows the model as the phase says (:mod:`vmapclan.plan`), scores the members
at every round's and stretch's end, and records, checkpoints and stops.

A config without phases gets :func:`vmapclan.schedule.default_schedule`, chosen when the data is
loaded (:meth:`TrainingMachine.prepare`), and from then on names those phases itself
(``machine.config``, ``config.toml``, the checkpoint); before ``prepare`` ``machine.schedule``
holds its phases for data that repeats.

Every step costs P member-steps, whatever the phase, so ``total_steps`` fixes the compute. The
run returns a :class:`~vmapclan.record.TrainingResults` with the history, final metrics, the
best model and the exported schedule (see :mod:`vmapclan.replay`).

Divergence is caught in every phase. A cooperative stretch checks its training losses and the
weights every :data:`DIVERGENCE_CHECK_EVERY` steps and at its end (one host sync per check,
none per step); a diverged stretch is undone like a diverged round (:meth:`vmapclan.Clan.restore`),
and after ``max_restores`` restores in a row the run stops with :class:`~vmapclan.DivergenceError`.
Checkpoints are written only from a finite state, and a run never returns a model whose
validation loss is not finite.

``request_stop()`` (the command calls it on Ctrl-C and SIGTERM) ends the run after the step in
progress, saves a checkpoint there and raises :class:`TrainingStopped`; a resume continues from
that step as if nothing had happened.

A phase with ``model.grow`` grows the model at its first step, before its first stretch
(:meth:`vmapclan.Clan.grow` with the task's :meth:`~vmapclan.Task.grow`): between rounds, where
a checkpoint of the phase before holds the model before growth and any later one the grown
model, which a resume grows the population into before loading it. Every growth is first
tried on a copy of the model when the run is built (:func:`vmapclan.plan.plan_phases`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .checks import check_device, positive_int
from .clan import Clan, DivergenceError
from .config import DataSpec, RunConfig
from .data import ClanLoader
from .distributed import any_rank, current_rank
from .evaluation import final_model, score_round
from .genome import ADAMW_GENES, autobind_genes, optimizer_settings
from .plan import PhasePlan, grow_function, growths_before, plan_phases
from .population import member_loss
from .progress import showing_progress
from .record import RunLog, TrainingResults
from .replay import export_schedule
from .resume import (CHECKPOINT_VERSION, load_run_checkpoint, read_run, save_run_checkpoint, saved_step,
                     upgrade_checkpoint)
from .rundir import run_lock
from .schedule import PhaseSchedule, data_schedule
from .task import Task, build_optimizer, built_model, call_model, data_length, resolve_task, task_reference

__all__ = ["TrainingMachine", "TrainingResults", "TrainingStopped", "save_run_checkpoint", "load_run_checkpoint",
           "CHECKPOINT_VERSION", "DIVERGENCE_CHECK_EVERY", "SCORE_BLOCKS"]

# Names this module held before the run layer was split; they import from here for one more release.
_MOVED = {"plan_rounds": "vmapclan.rounds", "phase_data": "vmapclan.plan", "frozen_parameters": "vmapclan.plan"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"vmapclan.machine.{name} is now {_MOVED[name]}.{name}; import it from there (this name goes "
                      "in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'vmapclan.machine' has no attribute {name!r}")


#: Steps between the divergence checks of a cooperative stretch (each check is one host sync).
DIVERGENCE_CHECK_EVERY = 25
#: Blocks of the round's validation samples that pair the members for ``clan.confidence``'s test.
SCORE_BLOCKS = 32


class TrainingStopped(Exception):
    """The run was asked to stop (:meth:`TrainingMachine.request_stop`) and stopped after a step.

    Attributes:
        step: The step it stopped at.
        checkpoint_step: The step of the checkpoint a resume continues from (``None``: no run
            directory), equal to ``step`` unless the state there had diverged.
    """

    def __init__(self, step: int, checkpoint_step: int | None):
        self.step, self.checkpoint_step = step, checkpoint_step
        saved = "" if checkpoint_step is None else (
            f"; checkpoint saved at step {checkpoint_step}" if checkpoint_step == step else
            f"; the state had diverged, so the checkpoint of step {checkpoint_step} is kept")
        super().__init__(f"stopped at step {step}{saved}")


class _StopRequested(Exception):
    """Raised between steps once a stop was requested; turned into :class:`TrainingStopped`."""


def _fused_options(fused, device: torch.device) -> tuple[bool, dict]:
    """``(use FusedStep, its options)`` from ``TrainingMachine``'s ``fused`` argument, checked now."""
    from .step import check_options

    if isinstance(fused, bool):
        return fused, {}
    if not isinstance(fused, Mapping):
        raise TypeError(f"TrainingMachine: fused must be a bool or a dict of FusedStep options, got {type(fused).__name__}")
    allowed = [name for name, param in inspect.signature(check_options).parameters.items()
               if param.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(fused) - set(allowed))
    if unknown:
        raise ValueError(f"TrainingMachine: unknown FusedStep options {unknown}; the options are {allowed}")
    check_options(device, **fused)
    return True, dict(fused)


def _warn_unread_data(task: Task, data: DataSpec) -> None:
    """Warn of a ``[data]`` field set to another value than its default that ``task`` does not read."""
    defaults = DataSpec()
    for name in task.unread_data():
        if getattr(data, name) != getattr(defaults, name):
            warnings.warn(f"TrainingMachine: data.{name} = {getattr(data, name)!r} is set, but task {task.reference!r} "
                          f"does not read it (a task names the data fields it reads in Task.data_reads)", stacklevel=3)


def _task_args(task: Task, config: RunConfig, out_dir) -> dict:
    """The run's ``task_args`` for a task given as an object: the arguments it was built with, so
    that the run's config rebuilds it (a resume from the command, a replay).

    Raises:
        ValueError: if ``config.task_args`` would build the task with other arguments.
    """
    built, given = task.init_arguments, dict(config.task_args)
    if given:
        if not task.built_with(given):
            raise ValueError(f"TrainingMachine: config.task_args {given} would build {type(task).__name__} with other "
                             f"arguments than it was built with, {built or 'its defaults'}; give the same (or no "
                             f"task_args: the task's own are taken)")
        return given
    if built is None and out_dir is not None:
        warnings.warn(f"TrainingMachine: {type(task).__name__} was built with arguments that config.task_args "
                      f"cannot hold; a resume from the command or a replay builds it from config.task_args, "
                      f"which is empty", stacklevel=3)
    return built or {}


def _clan_of(config: RunConfig, schedule: PhaseSchedule, model: nn.Module, device: torch.device,
             task: Task) -> Clan:
    """The run's clan: the config's settings, the run's horizon and schedule, AdamW genes (over the task's param groups)."""
    c, opt = config.clan, config.optimizer
    # The phases' data and model planes are the machine's (plan.py): the clan follows the rest.
    clan_plane = PhaseSchedule([dataclasses.replace(phase, data={}, model={}) for phase in schedule])
    optimizer = build_optimizer(task, model, opt)
    fields = {name: dict(changes) for name, changes in c.genes.items()}
    starts = optimizer_settings(optimizer)  # the AdamW genes' values
    for name, entry in c.sweep.items():  # a sweep's gene bounds follow its range (and hold the optimizer's value)
        if name not in ADAMW_GENES:
            raise ValueError(f"clan.sweep: no gene {name!r}; the run's genes are {sorted(ADAMW_GENES)}")
        low, high = entry["range"]
        start = float(starts[name])
        fields[name] = {**fields.get(name, {}), "low": min(low, start), "high": max(high, start),
                        "scale": entry["scale"]}
    # The config's fields over the AdamW genes the clan binds, built here so that a bad one is
    # named by the config's own key (every name is an AdamW gene: the config and the loop above
    # refuse the others).
    bound, genes = autobind_genes(["adamw"], optimizer), {}
    for name, changes in fields.items():
        try:
            genes[name] = dataclasses.replace(bound[name], **changes)
        except (TypeError, ValueError) as err:
            where = f"clan.sweep.{name} (with the optimizer's {starts[name]})" if name in c.sweep else f"clan.genes.{name}"
            raise ValueError(f"{where}: {err}") from None
    return Clan(model, optimizer, population_size=c.population_size, round_length=c.round_length,
                duty_cycle=c.duty_cycle, autobind=["adamw"], genome_config=genes, selection=c.selection_arg,
                init=c.init, seed=config.seed, device=device, confidence=c.confidence or None,
                total_steps=config.total_steps, schedule=clan_plane, lr_schedule=opt.lr_schedule, warmup=opt.warmup,
                decay=opt.decay, competitive_lr=c.competitive_lr, keep_best=c.keep_best)


def _sweep_values(sweep: Mapping, size: int, seed: int) -> dict[str, list[float]]:
    """Each swept gene's ``size`` values, drawn log-uniform or uniform from its range by ``seed``."""
    generator = torch.Generator().manual_seed(seed + 7)  # its own stream: the run's other draws are unchanged
    out = {}
    for name, entry in sweep.items():
        low, high = entry["range"]
        u = torch.rand(size, generator=generator, dtype=torch.float64)
        values = torch.exp(math.log(low) + u * (math.log(high) - math.log(low))) if entry["scale"] == "log" \
            else low + u * (high - low)
        out[name] = values.tolist()
    return out


class TrainingMachine:
    """Runs a population training from a config, phase by phase.

    Args:
        config: A :class:`~vmapclan.RunConfig` or its dict form (e.g. a parsed TOML file).
        total_steps: Steps to run (default: ``config.total_steps``).
        out_dir: If given, ``config.toml`` is written at the start, ``metrics.jsonl`` is appended
            as training goes and checkpoints (``checkpoint.pt``) are written at phase ends, every
            ``config.checkpoint_every`` rounds (or as many steps of a cooperative stretch) and on
            a stop; the run holds the directory's lock
            (see :func:`vmapclan.rundir.run_lock`) while it trains. The rest of the run directory
            is written by :meth:`TrainingResults.save`.
        callback: Called with event dicts as training goes: ``{"event": "step", "step", "phase",
            "round", "best_val", "losses"}`` after every step (no host sync: ``losses`` is the
            step's ``[P]`` training losses as a tensor on the device), and ``{"event": "round", ...}``,
            ``{"event": "cooperative", ...}``, ``{"event": "train", ...}`` records as they are made.
        device: Where the population lives (default: CPU).
        fused: Train with :class:`~vmapclan.FusedStep` (one vmapped forward and backward and one
            batched update per step; the same numbers as the imperative loop): ``True``, ``False``
            (the imperative loop), or a dict of ``FusedStep`` options, e.g. ``{"cuda_graph": True,
            "compile": "optimizer"}`` on CUDA.
        progress: Show the command's progress bar (:class:`~vmapclan.progress.ProgressBar`, in a
            terminal or a notebook; needs tqdm) while :meth:`train` runs: the step, the phase and
            round, the last round's best validation loss, the training loss and the lr in force.
        task: A :class:`~vmapclan.Task` to train instead of the one ``config.task`` names;
            ``config.task`` becomes its reference (``"module:ClassName"``), which a resume and
            the replay import, and ``config.task_args`` the arguments it was built with
            (:attr:`~vmapclan.Task.init_arguments`; given ``task_args`` must build the same), so
            a task class that resumes from the command lives in an importable module.

    Raises:
        ValueError, TypeError: for a bad config (naming the field), a task that cannot be
            imported, model settings the task refuses, ``total_steps``, ``fused`` or a device
            this torch cannot use.

    Example:
        >>> results = TrainingMachine({"task": "digits-mlp", "clan": {"population_size": 4}}, 200).train()  # doctest: +SKIP
        >>> results.final["val_accuracy"]  # doctest: +SKIP
    """

    def __init__(self, config: RunConfig | Mapping, total_steps: int | None = None, *,
                 out_dir: str | os.PathLike | None = None, callback: Callable[[dict], None] | None = None,
                 device: torch.device | str | None = None, fused: bool | Mapping = True,
                 task: Task | None = None, progress: bool = False):
        if isinstance(config, Mapping):
            config = RunConfig.from_dict(config)
        if not isinstance(config, RunConfig):
            raise TypeError(f"TrainingMachine: config must be a RunConfig or a dict, got {type(config).__name__}")
        if total_steps is not None:
            config = config.replace(total_steps=positive_int(total_steps, "TrainingMachine: total_steps"))
        if task is not None:
            if not isinstance(task, Task):
                raise TypeError(f"TrainingMachine: task must be a vmapclan.Task, got {type(task).__name__}")
            config = config.replace(task=task_reference(task), task_args=_task_args(task, config, out_dir))
        self.task = resolve_task(config.task, config.task_args) if task is None else task
        self.model_settings = self.task.model_settings(config.model)
        config = config.replace(data=self.task.data_settings(config.data))  # the task's own, with defaults
        _warn_unread_data(self.task, config.data)
        self.config = config
        self.total_steps = config.total_steps
        # Without phases in the config, the default schedule's last phase depends on the data's
        # size (see default_schedule): set again once the data is loaded, with the same phases' count.
        self.schedule = config.schedule.to_schedule(config.clan.selection)
        self.task.check_data(self.model_settings, config.data)
        self.phases: list[PhasePlan] = plan_phases(self.task, config, self.schedule,
                                                   model_settings=self.model_settings)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Under torch.distributed every rank trains its members and takes part in each checkpoint's
        # gathers; rank 0 alone writes the run directory.
        self.rank = current_rank()
        self.device = check_device(device if device is not None else "cpu", "TrainingMachine")
        self.log = RunLog(self.total_steps, config.log_every or max(1, self.total_steps // 100), self.device,
                          self.out_dir, writes=self.rank == 0)
        self.log.callback = callback
        if not isinstance(progress, bool):
            raise TypeError(f"TrainingMachine: progress must be a bool, got {type(progress).__name__}")
        self.progress = progress
        self.fused, self._fused_options = _fused_options(fused, self.device)
        #: The :class:`~vmapclan.FusedStep` in use (made at the first fused step, again after a growth).
        self.fused_step = None
        self.clan: Clan | None = None
        #: Growths applied to the population so far.
        self.growths = 0
        self._streams: dict[tuple, object] = {}
        self._datasets: dict[tuple, object] = {}  # TaskData per distinct data settings
        # Whether every training loss of the cooperative stretch since its last check was finite;
        # kept on the device so the steps themselves never wait for the host.
        self._losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._stop_requested = False
        self._prepared = self._trained = False
        self._resume_state: dict | None = None
        #: The step of the last checkpoint written (``None`` before the first).
        self.checkpoint_step: int | None = None

    # -- the record -----------------------------------------------------------------------------
    callback = property(lambda self: self.log.callback, lambda self, fn: setattr(self.log, "callback", fn),
                        doc="The event callback (see the constructor).")
    history = property(lambda self: self.log.history, doc="The run's history records so far.")
    metrics = property(lambda self: self.log.metrics, doc="The run's metrics records so far.")
    best_val = property(lambda self: self.log.best_val, doc="The lowest round or stretch validation loss so far.")
    step = property(lambda self: 0 if self.clan is None else self.clan.time_step, doc="Steps trained so far.")

    # -- assembly -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the data, the model and the clan, and restore a resumed run's state; check the plan.

        :meth:`train` calls it first if it has not run. Calling it before lets a caller tell
        bad input (a config that cannot run, a checkpoint that does not fit) from training.

        Raises:
            ValueError, TypeError: for settings that cannot run (e.g. a phase needing more
                samples per step than the training data holds, gene bounds), naming the setting,
                or a checkpoint that does not fit this run.
        """
        if self._prepared:
            return
        self._build()
        self._check_data()
        if self._resume_state is not None:
            self._restore(self._resume_state)
        self._prepared = True

    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the model's init; a replay with the same seed starts from the same weights
        data = self.task.load(cfg.data, cfg.seed)
        self._datasets[()] = data
        if not cfg.schedule.phases:
            self.schedule = data_schedule(cfg.clan.selection, cfg.total_steps, cfg.clan.population_size,
                                          cfg.data.batch_size, data_length(data.train))
            # The run's config names the phases it got: config.toml and the checkpoint hold them,
            # so a resume (or a later default) cannot change the plan under a running run.
            self.config = cfg = cfg.replace(schedule=[phase.to_dict() for phase in self.schedule])
        model = built_model(self.task, self.model_settings, cfg.data, data)
        self.phases = plan_phases(self.task, cfg, self.schedule, model, self.model_settings)
        for phase in self.phases:
            if phase.data_key not in self._datasets:
                self._datasets[phase.data_key] = self.task.load(phase.data, cfg.seed)
        self.clan = _clan_of(cfg, self.schedule, model, self.device, self.task)
        if self.clan.group is not None:  # the clan compared its own settings; the rest of the run must agree too
            self.clan.group.check_same(self.config.to_toml(), "the run's config", who="TrainingMachine")
        if cfg.clan.lr_grid or cfg.clan.sweep:
            # The members' start: the named genes drawn (or the lr grid); every other gene is held
            # at the incumbent for every member. _clan_of checked the swept names (the grid is the lr's).
            where = "clan.lr_grid" if cfg.clan.lr_grid else "clan.sweep"
            drawn = {"lr": list(cfg.clan.lr_grid)} if cfg.clan.lr_grid else \
                _sweep_values(cfg.clan.sweep, cfg.clan.population_size, cfg.seed)
            for name, value in self.clan.incumbent.items():
                values = drawn.get(name, [value.item()] * cfg.clan.population_size)
                if self.clan.genes[name].dtype == "int":
                    values = [round(v) for v in values]
                try:
                    self.clan.set_genome(name, values)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None

    @property
    def data(self):
        """The task's data for the config's data settings (:class:`~vmapclan.task.TaskData`), once built."""
        return self._datasets.get(())

    def _check_data(self) -> None:
        """Refuse, before training, a stretch whose steps take more samples than the training data holds."""
        p = self.clan.population_size
        for stretch in self.clan.plan:
            phase = self.phases[stretch.index]
            n = data_length(self._datasets[phase.data_key].train)
            cooperates = stretch.cooperates
            need = p * phase.batch_size if cooperates else phase.batch_size
            if need > n:
                what = (f"population_size x batch_size = {p} x {phase.batch_size} = {need} samples" if cooperates
                        else f"batch_size = {phase.batch_size} samples")
                raise ValueError(
                    f"{phase.where}: a {'cooperative' if cooperates else 'competitive'} "
                    f"step takes {what}, but the training data has only {n}; lower data.batch_size"
                    f"{' or clan.population_size' if cooperates else ''}")

    def _stream(self, phase: PhasePlan):
        """An endless batch iterator over the phase's training data (epochs back to back).

        Every loader shares the clan's epoch position; one over data of another length draws a
        new permutation on its first batch, so a phase that changes the data starts a new epoch.
        """
        key = (phase.batch_size, phase.data_key)
        if key not in self._streams:
            data = self._datasets[phase.data_key]
            # Its size is checked against the stretches it serves (_check_data checked them all).
            serves = [s for s in self.clan.plan if (self.phases[s.index].batch_size, self.phases[s.index].data_key) == key]
            loader = ClanLoader(self.clan, data.train, phase.batch_size, stretches=serves)

            def endless():
                empty = 0
                while True:
                    for batch in loader:
                        empty = 0
                        yield batch
                    # One empty pass is the end of an epoch; two in a row mean no step fits the data
                    # (``_check_data`` refuses that before training: this only keeps a loop from spinning).
                    empty += 1
                    if empty > 1:
                        raise ValueError(f"TrainingMachine: the training data ({data_length(data.train)} samples) "
                                         f"cannot fill one step of batch_size {phase.batch_size}")

            self._streams[key] = endless()
        return self._streams[key]

    # -- growth and the model plane -------------------------------------------------------------
    def grow_to(self, count: int) -> None:
        """Apply the schedule's growths in order until ``count`` are in force (the population rebuilt each time)."""
        grown = [plan for plan in self.phases if plan.grow is not None]
        while self.growths < count:
            self.clan.grow(grow_function(self.task, self.schedule, grown[self.growths].index))
            self.growths += 1
            self.fused_step = None  # made for the population it was bound to

    def _enter(self, phase: PhasePlan) -> None:
        """The phase's model plane: its growths in force, and the optimizer skipping its frozen parameters."""
        self.grow_to(sum(1 for plan in self.phases[:phase.index + 1] if plan.grow is not None))
        index = {name: k for k, name in enumerate(self.clan.population.columns)}
        self.clan.optimizer.freeze([index[name] for name in phase.freeze])

    # -- the step -------------------------------------------------------------------------------
    def _step(self, member, batch) -> torch.Tensor:
        """One step of the clan (fused when enabled), the clock included; returns the ``[P]`` losses."""
        x, y = batch
        keywords = isinstance(x, Mapping)  # a dict of keyword inputs goes to the model as keywords
        if self.fused:
            if self.fused_step is None:
                from .step import FusedStep

                options = {"sample_mean_loss": self.task.sample_mean_loss, "num_inputs": 0 if keywords else 1,
                           **self._fused_options}
                self.fused_step = FusedStep(self.clan, self.task.loss, **options)
            return self.fused_step(y, **x) if keywords else self.fused_step(x, y)
        loss = member_loss(self.task.loss, call_model(member.model, x), y)  # [P]
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        member.step()
        return loss.detach()

    def request_stop(self) -> None:
        """Ask the run to stop after the step in progress (safe to call from a signal handler).

        :meth:`train` then saves a checkpoint at that step (with an ``out_dir``) and raises
        :class:`TrainingStopped`; :meth:`resume` continues from there.
        """
        self._stop_requested = True

    def _poll_stop(self) -> None:
        # Never after a stretch's last step: its record, selection and restore point come first,
        # so a stop always lands where a resume can pick the stretch up again.
        stop = self._stop_requested
        if self.clan.group is not None:  # every rank stops at the same step (a signal reaches them apart)
            stop = any_rank(self.clan.group, stop, "the stop check")
        if stop and not self.clan.round_done:
            raise _StopRequested

    # -- divergence -----------------------------------------------------------------------------
    def _any_finite(self) -> bool:
        """Whether any member of the clan, on any rank, holds only finite values."""
        return any_rank(self.clan.group, bool(self.clan.population.finite_members().any()), "the finiteness check")

    def _cooperative_diverged(self) -> bool:
        """Whether the cooperative stretch since the last check saw a non-finite loss or weight (one host sync)."""
        diverged = ~self._losses_finite | ~torch.isfinite(self.clan.population.flat).all()
        self._losses_finite.fill_(True)
        return any_rank(self.clan.group, bool(diverged), "the divergence check")

    def _score(self, phase: PhasePlan, paired: bool = False) -> torch.Tensor:
        """Every member's loss on the phase's per-round evaluation data (``[P, SCORE_BLOCKS]`` when ``paired``).

        Identical members (after a data-parallel stretch) are scored once, as one model.
        """
        with self.log.timing("evaluate"):
            return score_round(self.task, self.clan, self._datasets[phase.data_key].eval,
                               blocks=SCORE_BLOCKS if paired else None)

    def _add(self, record: dict, phase: PhasePlan, start: int) -> None:
        """Record a round's or stretch's ``record`` with the machine's fields: batch size, the data and model planes."""
        cooperative = record.get("kind") == "cooperative"
        # One step counter: the run's time (start_step, end_step). The clan's own "step" counts its
        # member.step() calls, micro-batches included, and would disagree with it.
        record = {k: v for k, v in record.items() if k != "step"}
        record["batch_size"] = phase.batch_size * (self.clan.population_size if cooperative else 1)
        if not cooperative:
            record["population_size"] = self.clan.population_size
        record.update(phase.record_fields(growth=start == phase.first_step))
        self.log.add(record, "cooperative" if cooperative else "round")

    def _after_restore(self, phase: PhasePlan) -> None:
        """After a cooperative stretch's restore at its end: the restored incumbent scored, for keep-best."""
        val = self._score(phase)
        if any_rank(self.clan.group, not bool(torch.isfinite(val).all()), "the divergence check"):
            return
        incumbent = val[0].item()
        self.log.saw_val([incumbent])
        self.clan.keep(incumbent)

    # -- stretches ------------------------------------------------------------------------------
    def _run_stretch(self) -> None:
        """The steps of the clan's stretch in force not yet run, then its end: selection, or the stretch's record."""
        clan = self.clan
        stretch = clan.stretch
        phase = self.phases[stretch.index]
        self._enter(phase)
        stream = self._stream(phase)
        cooperative = stretch.kind == "cooperative"
        with self.log.timing("train"):
            ended = self._run_steps(stretch, phase, stream)
        if ended:
            return
        start = clan.clock.record_start if cooperative else stretch.start
        val = self._score(phase, paired=not cooperative and clan.confidence is not None)
        with self.log.timing("select"):
            record = clan.step(val)
        self._add(record, phase, start)
        if record.get("event") == "diverged" and cooperative:
            self._after_restore(phase)
        if self.out_dir is not None and not cooperative and self.config.checkpoint_every and \
                clan.round_index % self.config.checkpoint_every == 0:
            self.checkpoint()

    def _run_steps(self, stretch, phase: PhasePlan, stream) -> bool:
        """The steps of ``stretch`` not yet run, with a cooperative stretch's divergence checks and restores.

        Returns whether a restore at the stretch's last step ended it (its record is made).
        """
        clan = self.clan
        cooperative = stretch.kind == "cooperative"
        member = clan.round()
        member.model.train()
        while not clan.round_done:
            self.log.switch("train" if member.phase == "cooperative" else "compete")
            logged = self.log.logs(clan.time_step + 1)  # the lr this step takes, for its record: no host sync
            lr = clan.optimizer.lr_in_force[0] if logged else None
            loss = self._step(member, next(stream))
            if cooperative:
                self._losses_finite &= torch.isfinite(loss).all()
            self.log.step(loss, clan.time_step, phase.phase.name, clan.round_index, lr=lr)
            if cooperative and (clan.time_step % DIVERGENCE_CHECK_EVERY == 0 or clan.round_done) \
                    and self._cooperative_diverged():
                start = clan.clock.record_start
                with self.log.timing("select"):
                    record = clan.restore()
                self._add(record, phase, start)
                if clan.stretch is not stretch:  # restored at its last step: the stretch is over
                    self._after_restore(phase)
                    return True
                member = clan.round()
                continue
            if cooperative and self._checkpoint_due():
                self.checkpoint()
            self._poll_stop()
        return False

    def _checkpoint_due(self) -> bool:
        """Whether a cooperative stretch saves a checkpoint at this step: ``checkpoint_every`` rounds'
        steps since the last one, at a divergence check (it just passed), before the stretch's end.

        A long stretch (one data-parallel model over most of a run on abundant data) is then
        saved as often as rounds are; a kill loses no more of it.
        """
        clan = self.clan
        every = self.config.checkpoint_every * clan.round_length  # the rounds' length in force (the phase's)
        return self.out_dir is not None and every > 0 and not clan.round_done and \
            clan.time_step % DIVERGENCE_CHECK_EVERY == 0 and clan.time_step - (self.checkpoint_step or 0) >= every

    # -- running --------------------------------------------------------------------------------
    def machine_state(self) -> dict:
        """The machine's own state as plain values (the clan's is saved next to it)."""
        return {"config": self.config.to_dict(), **self.log.state_dict()}

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, callback: Callable[[dict], None] | None = None,
               device: torch.device | str | None = None, fused: bool | Mapping = True,
               task: Task | None = None) -> TrainingMachine:
        """A machine that continues the run whose ``checkpoint.pt`` is in ``run_dir``.

        Its :meth:`train` restores the clan (weights, optimizer, genomes, loader position, random
        generators, the time and the plan's position) and the machine's history and metrics, skips
        what was done, and ends with the same weights, genomes and history as the run would have
        without the interruption. ``metrics.jsonl`` is cut back to the checkpoint, so no record
        appears twice. The run keeps the settings it started with (:func:`vmapclan.resume.read_run`).

        Args:
            run_dir: The run directory given as ``out_dir`` to the interrupted run.
            callback, device, fused: As for the constructor (the numbers do not depend on ``fused``).
            task: The run's task, for one that cannot be imported by the checkpoint's
                ``config.task`` (default: imported from it).

        Raises:
            FileNotFoundError: if ``run_dir`` has no checkpoint.
            ValueError: if the checkpoint is unreadable, damaged or of another format version, or
                ``run_dir/config.toml`` differs from the checkpoint's config (naming the setting).
        """
        config, state = read_run(run_dir, task)
        machine = cls(config, out_dir=run_dir, callback=callback, device=device, fused=fused, task=task)
        # The run keeps the task_args it started with: a run written before tasks recorded their
        # arguments has none, and its config.toml says so.
        machine.config = machine.config.replace(task_args=config.task_args)
        machine._resume_state = state
        return machine

    def _restore(self, state: Mapping) -> None:
        """Load a checkpoint's state after checking that it belongs to this run and this point of it."""
        who = "TrainingMachine.resume"
        state = upgrade_checkpoint(state, self.clan, self.total_steps, who)
        step = saved_step(state)
        if step is None or not 0 <= step <= self.total_steps:
            raise ValueError(f"{who}: the checkpoint's time_step must be an int in [0, {self.total_steps}], "
                             f"got {state['clan'].get('time_step')!r}")
        self.log.check_state(state["machine"], step, who)
        loader = state["clan"].get("loader")
        perm = loader.get("perm") if isinstance(loader, Mapping) else None
        sizes = sorted({data_length(d.train) for d in self._datasets.values()})
        if perm is not None and (not isinstance(perm, torch.Tensor) or perm.dim() != 1 or len(perm) not in sizes):
            got = list(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
            raise ValueError(f"{who}: the checkpoint's loader permutation is {got}, the training "
                             f"data has {' or '.join(map(str, sizes))} samples")
        # A checkpoint taken after a growth holds the grown model: grow the population first (the
        # checkpoint then overwrites every value, the random generators included).
        self.grow_to(growths_before(self.phases, step))
        try:
            self.clan.load_state_dict(state["clan"])
        except (KeyError, TypeError, AttributeError, RuntimeError) as err:
            # Every check of Clan.load_state_dict names what it expected; anything else is a state
            # that is not a clan's at all.
            raise ValueError(f"{who}: the checkpoint's clan state is malformed ({type(err).__name__}: {err})") from None
        self.log.load_state_dict(state["machine"])
        if not self._any_finite():
            raise ValueError(f"{who}: the checkpoint holds NaN or infinite values in every member")

    def checkpoint(self) -> Path:
        """Save ``checkpoint.pt`` into ``out_dir`` atomically (see :func:`~vmapclan.resume.save_run_checkpoint`).

        Only a state with at least one finite member is saved (members that cooperate are
        identical, so there it means all of them): a diverged state never replaces a good
        checkpoint.

        Raises:
            ValueError: if the machine has no ``out_dir`` or has not started.
            vmapclan.DivergenceError: if every member holds a NaN or infinite value (nothing is written).
            OSError: if the file cannot be written (the previous checkpoint stays).
        """
        if self.out_dir is None or self.clan is None:
            raise ValueError("TrainingMachine.checkpoint: needs an out_dir and a started run")
        if not self._any_finite():
            raise DivergenceError(
                f"TrainingMachine.checkpoint: at step {self.step} every member holds NaN or infinite values; "
                f"not saved (the checkpoint of step {self.checkpoint_step} is kept)")
        path = self.out_dir / "checkpoint.pt"
        with self.log.timing("checkpoint"):
            if self.rank == 0:
                save_run_checkpoint(path, self.clan, self.machine_state())
            else:
                self.clan.state_dict()  # its gathers of the members are collectives: every rank takes part
        self.checkpoint_step = self.step
        return path

    def _start(self) -> None:
        """The run directory at the start: the metrics (cut back on a resume), ``config.toml``, a first checkpoint."""
        if self.out_dir is None:
            return
        if self.rank == 0:
            self.log.rewrite()  # a resumed run rewrites the metrics up to its checkpoint: later lines were lost work
        if self._resume_state is None:
            if self.rank == 0:
                (self.out_dir / "config.toml").write_text(self._config_toml())  # what a resume holds to
            self.checkpoint()  # a run stopped before its first round can resume too
        else:
            self.checkpoint_step = self.step

    def train(self) -> TrainingResults:
        """Run every phase and return the results.

        Seeds torch's global generator with ``config.seed`` first (the model's initial weights
        and dropout draw from it), so a run is reproducible from its config.

        Raises:
            RuntimeError: if this machine has already trained.
            vmapclan.rundir.RunDirectoryBusy: if another live process holds ``out_dir``'s lock.
            vmapclan.DivergenceError: if the population diverged and could not be restored, or
                the run would end without a finite model.
            TrainingStopped: after :meth:`request_stop`, with the checkpoint saved.
        """
        if self._trained:
            raise RuntimeError("TrainingMachine.train: this machine has already run; make a new one")
        self._trained = True
        writes = self.out_dir is not None and self.rank == 0
        bar = showing_progress(self.log, self.total_steps, self.config.task, start=self.step) \
            if self.progress and self.rank == 0 else contextlib.nullcontext()
        with run_lock(self.out_dir) if writes else contextlib.nullcontext(), self.log.timing("other"), bar:
            with self.log.timing("setup"):
                self.prepare()
                self._start()
            try:
                while not self.clan.done:
                    stretch = self.clan.stretch
                    self._run_stretch()
                    if stretch.phase_end and self.out_dir is not None:
                        self.checkpoint()
            except _StopRequested:
                saved = None
                if self.out_dir is not None:
                    # A cooperative stretch that saw a non-finite loss since its last check is diverged.
                    if self.checkpoint_step != self.step and \
                            not any_rank(self.clan.group, not bool(self._losses_finite), "the divergence check") \
                            and self._any_finite():
                        self.checkpoint()  # unless this very step was just saved
                    saved = self.checkpoint_step
                raise TrainingStopped(self.step, saved) from None
            with self.log.timing("evaluate"):
                final, best_model, schedule = self._final()
        return TrainingResults(config=self.config, total_steps=self.total_steps, history=self.history,
                               metrics=self.metrics, final=final, best_model=best_model, schedule=schedule,
                               unread_data=self.task.unread_data())

    def _final(self) -> tuple[dict, nn.Module, PhaseSchedule]:
        """The final record, the run's model (see :func:`~vmapclan.evaluation.final_model`) and its schedule."""
        clan = self.clan
        scores, best, best_model = final_model(self.task, clan, self._datasets[()])
        # A sweep's members never copy each other: the best one's own genes are its schedule.
        # With truncation its rounds' sources (who copied whom) lead back through its ancestors;
        # a run begun before rounds recorded them follows each round's winner.
        selection = self.config.clan.selection
        follows_best = selection == "none" or selection == "truncation" and all(
            "sources" in r for r in self.history if r.get("kind") == "round")
        schedule = export_schedule(self.history, self.total_steps, member=best if follows_best else None)
        seconds = self.log.elapsed()  # this evaluation's up to here
        final = {"event": "final", "step": clan.time_step, **scores, "best_member": best,
                 "rounds": sum(r["kind"] == "round" for r in self.history),
                 "seconds": sum(seconds.values()), "seconds_in": seconds,
                 "member_steps": self.total_steps * clan.population_size, "world_size": clan.world_size}
        self.log.record(final)
        return final, best_model, schedule

    def _config_toml(self) -> str:
        """``config.toml``: the config, and the number of processes that trained the run, as a comment.

        A comment, because the config does not depend on it: a resume may run on another number
        of ranks (each takes its members from the checkpoint).
        """
        return f"# world_size = {self.clan.world_size}  (processes that trained this run)\n" + \
            self.config.to_toml(self.task.unread_data())
