"""The training machine: a whole population run from a config, phase by phase over normalized time.

``TrainingMachine(config, total_steps).train()`` builds the task's data and model, wraps them in a
:class:`~vmapclan.Clan`, and walks the config's :class:`~vmapclan.PhaseSchedule`:

- a phase with ``clan.competition = false`` trains the population *cooperatively*: every member
  identical, each on its own shard of ``batch_size`` samples, gradients averaged (data-parallel
  training of one model at batch ``P x batch_size``), with the phase's optimizer overrides;
- a phase with competition runs clan rounds (cooperation, competition, selection) with the
  phase's ``round_length`` and ``duty_cycle``; the last round of a phase absorbs the steps that do
  not fill a whole round, so every round ends inside its phase;
- a phase with ``clan.search`` is one all-competitive round whose challengers spread the lr
  around the incumbent's (:func:`vmapclan.genome.search_genome`).

A config without phases gets :func:`vmapclan.specs.default_schedule`, chosen when the data is
loaded (:meth:`TrainingMachine.prepare`), and from then on names those phases itself
(``machine.config``, ``config.toml``, the checkpoint); before ``prepare`` ``machine.schedule``
holds its phases for data that repeats.

Every step costs P member-steps, whatever the phase, so ``total_steps`` fixes the compute. The
machine scores each member on validation data at the end of every round, records metrics, saves
checkpoints when given an ``out_dir``, and returns a :class:`TrainingResults` with the history,
final metrics, the best model and the exported schedule (see :mod:`vmapclan.replay`).

How a cooperative phase runs: between rounds the clan sits at step 0 of its next round and
its members are identical. The machine trains there with the gradients averaged over the
members (``clan.sync_context(cooperative=True)``, or ``FusedStep.train_step(...,
cooperative=True)``) and without advancing the round clock: the steps do not count towards the
round. The phase's optimizer overrides are written into the batched AdamW's ``[P]``
hyperparameters and the clan's own genes are written back afterwards (``clan.reconfigure()``),
and the end of the phase becomes the point the clan's divergence recovery restores to.

Divergence is caught in every phase. A cooperative phase checks its training losses and the
weights every :data:`DIVERGENCE_CHECK_EVERY` steps and at its end (one host sync per check,
none per step); a diverged stretch is undone like a diverged round (the clan's restore point,
half the learning rate), and after ``max_restores`` restores in a row the run stops with
:class:`~vmapclan.DivergenceError`. Checkpoints and restore points are written only from a
finite state, and a run never returns a model whose validation loss is not finite.

``request_stop()`` (the command calls it on Ctrl-C and SIGTERM) ends the run after the step in
progress, saves a checkpoint there and raises :class:`TrainingStopped`; a resume continues
from that step as if nothing had happened.

A phase with ``model.grow`` grows the model at its first step, before its first stretch
(:meth:`vmapclan.Clan.grow` with the task's :meth:`~vmapclan.Task.grow`): between rounds, where
a checkpoint of the phase before holds the model before growth and any later one the grown
model, which a resume grows the population into before loading it. Every growth is first
tried on a copy of the model when the run is built, which checks its settings and gives the
parameter names each phase's freeze patterns are checked against.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import inspect
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import optree
import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .clan import Clan, DivergenceError, check_device
from .distributed import any_rank, broadcast_object, current_rank
from .genome import search_genome
from .optim import ADAMW_FIELDS, keep_columns
from .population import member_loss
from .replay import export_schedule, write_schedule
from .rounds import plan_rounds
from .rundir import run_lock
from .schedule import DATA_KEYS, Phase, PhaseSchedule, TimeController, phase_optimizer
from .specs import DataSpec, RunConfig
from .tasks import Task, data_length, resolve_task, task_reference

__all__ = ["TrainingMachine", "TrainingResults", "TrainingStopped", "save_run_checkpoint", "load_run_checkpoint",
           "plan_rounds", "phase_data", "frozen_parameters", "CHECKPOINT_VERSION", "DIVERGENCE_CHECK_EVERY",
           "SCORE_BLOCKS"]

#: Version 2: checkpoints may be taken at any step (a stop), not only at round and phase ends.
CHECKPOINT_VERSION = 2
#: Steps between the divergence checks of a cooperative phase (each check is one host sync).
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


@dataclasses.dataclass(frozen=True)
class _Stretch:
    """One stretch of the run's plan: a clan round, or steps run cooperatively outside the round clock."""

    kind: str  # "round" or "cooperative"
    phase: Phase
    index: int  # the phase's index in the schedule
    start: int
    end: int
    duty_cycle: float | None = None  # rounds only
    phase_end: bool = False  # the last stretch of its phase: a checkpoint follows
    first: bool = False  # the first stretch of its phase: a growth comes before it


def save_run_checkpoint(path: str | os.PathLike, clan: Clan, machine_state: Mapping) -> None:
    """Atomically write ``{"format_version", "clan": clan.state_dict(), "machine": machine_state}``.

    A crash while writing leaves the previous checkpoint intact (see :func:`~vmapclan.save_checkpoint`).

    Args:
        path: Target file.
        clan: The clan to save.
        machine_state: The machine's own state (step, history, config) as plain values.
    """
    save_checkpoint({"format_version": CHECKPOINT_VERSION, "clan": clan.state_dict(),
                     "machine": dict(machine_state)}, path)


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_run_checkpoint`.

    Raises:
        FileNotFoundError: if there is none.
        ValueError: for an unreadable file or one of another format version.
    """
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, Mapping) or state.get("format_version") != CHECKPOINT_VERSION:
        version = state.get("format_version") if isinstance(state, Mapping) else None
        raise ValueError(f"load_run_checkpoint: {path} has format version {version!r}, expected {CHECKPOINT_VERSION}")
    for key in ("clan", "machine"):
        if not isinstance(state.get(key), Mapping):
            raise ValueError(f"load_run_checkpoint: {path} has no {key!r} table; it is not a run checkpoint")
    return dict(state)


def _first_difference(a, b, prefix: str = "") -> str | None:
    """The dotted name of the first setting where the plain values ``a`` and ``b`` differ, or ``None``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
        return None
    return None if a == b else prefix or "config"


def _lookup(data, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def phase_data(task: Task, data: DataSpec, phase: Phase, where: str = "") -> DataSpec:
    """The data settings in force during ``phase``: ``data`` with the phase's task data overrides.

    The one reading of a phase's ``data`` table beyond ``batch_size``, for the machine and the
    replay: each key must be one of the task's :attr:`~vmapclan.Task.phase_data`.

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


def _data_key(data: DataSpec, base: DataSpec) -> tuple:
    """A hashable name for a phase's data settings: the fields that differ from the config's."""
    # The task's own settings are a table of any TOML values: named by their JSON text.
    return tuple((f.name, json.dumps(getattr(data, f.name), sort_keys=True) if f.name == "extra"
                  else getattr(data, f.name)) for f in dataclasses.fields(data)
                 if getattr(data, f.name) != getattr(base, f.name))


@dataclasses.dataclass
class TrainingResults:
    """What a :class:`TrainingMachine` run returns.

    Attributes:
        config: The run's config.
        total_steps: Steps run.
        history: One record per round (``kind="round"``: the clan's record plus ``phase``,
            ``start_step``, ``end_step``, ``cooperative_steps``, ``batch_size``) and per cooperative
            stretch (``kind="cooperative"``: ``phase``, ``start_step``, ``end_step``, ``hyper``,
            ``batch_size``, ``val_loss``), in time order.
        metrics: Every metrics record (training-loss logs, rounds, the final record).
        final: ``val_loss`` and ``val_accuracy`` of the best model on the whole validation set,
            ``member_val_losses`` (every member, whole validation set), ``best_member``,
            ``seconds``, ``member_steps``; with ``clan.keep_best``, when the incumbent kept at an
            earlier step beats the last model, also ``kept_step`` (the step it was kept at) and
            ``last_val_loss`` (the last model's loss).
        best_model: A plain ``nn.Module`` with the best member's weights (or the kept incumbent's).
        schedule: The exported :class:`PhaseSchedule` the best model's lineage trained with.
    """

    config: RunConfig
    total_steps: int
    history: list[dict]
    metrics: list[dict]
    final: dict
    best_model: nn.Module
    schedule: PhaseSchedule

    @property
    def rounds(self) -> list[dict]:
        """The clan round records only."""
        return [r for r in self.history if r["kind"] == "round"]

    def rounds_table(self, max_rows: int | None = None) -> str:
        """A text table: one row per round or cooperative stretch (the last ``max_rows`` if given)."""
        head = f"{'phase':<12} {'round':>5} {'steps':>11} {'t_end':>6} {'winner':>6} {'best val':>9} " \
               f"{'lr':>9} {'wd':>9} {'beta1':>6} {'beta2':>7}"
        rows = [head, "-" * len(head)]
        records = self.history if max_rows is None else self.history[-max_rows:]
        if max_rows is not None and len(self.history) > max_rows:
            rows.append(f"... {len(self.history) - max_rows} earlier rows not shown")
        for r in records:
            if r["kind"] == "round":
                finite = [v for v in r["val_losses"] if math.isfinite(v)]
                winner = "div" if r["winner"] is None else str(r["winner"])  # every member diverged
                hyper, rnd, best = r["incumbent"], str(r["round"]), min(finite) if finite else math.nan
            else:
                hyper, rnd, winner, best = r["hyper"], "-", "-", r["val_loss"]
            steps = f"{r['start_step']}-{r['end_step']}"
            rows.append(f"{r['phase'][:12]:<12} {rnd:>5} {steps:>11} {r['end_step'] / self.total_steps:>6.3f} "
                        f"{winner:>6} {best:>9.4f} {hyper['lr']:>9.2e} {hyper['weight_decay']:>9.2e} "
                        f"{hyper['betas/0']:>6.3f} {hyper['betas/1']:>7.4f}")
        rows.append(f"final: val loss {self.final['val_loss']:.4f}  val accuracy {self.final['val_accuracy']:.3f}  "
                    f"({self.final['seconds']:.1f}s, {self.final['member_steps']} member-steps)")
        return "\n".join(rows)

    def save(self, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
        """Write the run directory.

        Files: ``metrics.jsonl``, ``history.json``, ``schedule.json`` (the exported schedule with
        the config and the clan's final metrics, for ``vmapclan replay``), ``config.toml``,
        ``best_model.pt`` (the best model's ``state_dict``), and with ``plots`` the PNG plots
        ``genes.png``, ``val_losses.png`` and ``train_loss.png`` (needs matplotlib).

        Args:
            out_dir: The run directory (created if missing).
            plots: Whether to draw the plots.

        Returns:
            ``{name: path}`` of the files written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        files["metrics"] = out / "metrics.jsonl"
        with open(files["metrics"], "w") as f:
            for record in self.metrics:
                f.write(json.dumps(record) + "\n")
        files["history"] = out / "history.json"
        files["history"].write_text(json.dumps(self.history, indent=1))
        files["schedule"] = out / "schedule.json"
        write_schedule(files["schedule"], self.schedule, self.config, self.total_steps,
                       clan={key: self.final[key] for key in ("val_loss", "val_accuracy", "kept_step")
                             if key in self.final})
        files["config"] = out / "config.toml"
        world = f"# world_size = {self.final['world_size']}  (processes that trained this run)\n" \
            if "world_size" in self.final else ""
        files["config"].write_text(world + self.config.replace(total_steps=self.total_steps).to_toml())
        files["best_model"] = out / "best_model.pt"
        buffer = io.BytesIO()
        torch.save(self.best_model.state_dict(), buffer)  # in memory: a full disk fails below with ENOSPC, not in torch
        files["best_model"].write_bytes(buffer.getbuffer())
        if plots:
            from .plots import save_plots

            files.update(save_plots(self, out))
        return files


def _fused_options(fused, device: torch.device) -> tuple[bool, dict]:
    """``(use FusedStep, its options)`` from ``TrainingMachine``'s ``fused`` argument, checked now."""
    from .fused import check_options

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


class TrainingMachine:
    """Runs a population training from a config, phase by phase.

    Args:
        config: A :class:`~vmapclan.RunConfig` or its dict form (e.g. a parsed TOML file).
        total_steps: Steps to run (default: ``config.total_steps``).
        out_dir: If given, ``config.toml`` is written at the start, ``metrics.jsonl`` is appended
            as training goes and checkpoints (``checkpoint.pt``) are written at phase ends, every
            ``config.checkpoint_every`` rounds and on a stop; the run holds the directory's lock
            (see :func:`vmapclan.rundir.run_lock`) while it trains. The rest of the run directory
            is written by :meth:`TrainingResults.save`.
        callback: Called with event dicts as training goes: ``{"event": "step", "step", "phase",
            "round", "best_val", "losses"}`` after every step (no host sync: ``losses`` is the
            step's ``[P]`` training losses as a tensor on the device), and ``{"event": "round", ...}``,
            ``{"event": "cooperative", ...}``, ``{"event": "train", ...}`` records as they are made.
        device: Where the population lives (default: CPU).
        fused: Train with :class:`~vmapclan.FusedStep` (one vmapped forward and backward and one
            batched update per step; the same numbers as the imperative loop), in clan rounds and
            in cooperative phases alike (there with :meth:`~vmapclan.FusedStep.train_step`, which
            leaves the round clock alone): ``True``, ``False`` (the imperative loop), or a dict of
            ``FusedStep`` options, e.g. ``{"cuda_graph": True, "compile": "optimizer"}`` on CUDA.
        task: A :class:`~vmapclan.Task` to train instead of the one ``config.task`` names;
            ``config.task`` becomes its reference (``"module:ClassName"``), which a resume and
            the replay import, so a task class that resumes from the command lives in an
            importable module and builds without arguments.

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
                 task: Task | None = None):
        if isinstance(config, Mapping):
            config = RunConfig.from_dict(config)
        if not isinstance(config, RunConfig):
            raise TypeError(f"TrainingMachine: config must be a RunConfig or a dict, got {type(config).__name__}")
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"TrainingMachine: total_steps must be a positive int, got {total_steps!r}")
            config = config.replace(total_steps=total_steps)
        if task is not None:
            if not isinstance(task, Task):
                raise TypeError(f"TrainingMachine: task must be a vmapclan.Task, got {type(task).__name__}")
            config = config.replace(task=task_reference(task))
        self.task = resolve_task(config.task, config.task_args) if task is None else task
        self.model_settings = self.task.model_settings(config.model)
        config = config.replace(data=self.task.data_settings(config.data))  # the task's own, with defaults
        self.config = config
        self.total_steps = config.total_steps
        self.clock = TimeController(self.total_steps)
        # Without phases in the config, the default schedule's last phase depends on the data's
        # size (see default_schedule): set again once the data is loaded, with the same phases' count.
        self.schedule = config.schedule.to_schedule(config.clan.selection)
        self.task.check_data(self.model_settings, config.data)
        self._phase_data = []  # each phase's data settings, checked now
        for i, phase in enumerate(self.schedule):
            spec = phase_data(self.task, config.data, phase, f"schedule[{i}] ({phase.name!r})")
            if spec is not config.data:
                self.task.check_data(self.model_settings, spec)
            self._phase_data.append(spec)
        self._check_growth_phases()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Under torch.distributed every rank trains its members and takes part in each checkpoint's
        # gathers; rank 0 alone writes the run directory.
        self.rank = current_rank()
        self.callback = callback
        self.device = check_device(device if device is not None else "cpu", "TrainingMachine")
        self.log_every = config.log_every or max(1, self.total_steps // 100)
        self.fused, self._fused_options = _fused_options(fused, self.device)
        self._fused_step = None
        self.history: list[dict] = []
        self.metrics: list[dict] = []
        self.clan: Clan | None = None
        self.best_val = math.inf
        # The best incumbent seen ({"step", "val", "row"}), with clan.keep_best.
        self._kept: dict | None = None
        self._streams: dict[tuple, object] = {}
        self._datasets: dict[tuple, object] = {}  # TaskData per distinct data settings
        self._frozen: list[slice] = []  # columns of flat kept unchanged by the steps of the current stretch
        self._phase_name = ""
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = 0
        # Whether every training loss of the cooperative stretch since its last check was finite;
        # kept on the device so the steps themselves never wait for the host.
        self._losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._stop_requested = False
        self._prepared = self._trained = False
        self._checkpoint_step: int | None = None

    # -- growth -----------------------------------------------------------------------------------
    def _check_growth_phases(self) -> None:
        """Refuse a ``model.grow`` where it cannot apply: in the first phase, or a phase without steps."""
        ranges = list(self.schedule.step_ranges(self.total_steps))
        self._phase_first = [first for _, first, _ in ranges]
        self._grow_phases = [i for i, phase in enumerate(self.schedule) if "grow" in phase.model]
        self._grown = 0  # growths applied to the population so far
        for i in self._grow_phases:
            where = f"schedule[{i}] ({self.schedule[i].name!r})"
            if i == 0:
                raise ValueError(f"{where}: model.grow applies at a phase's start; the first phase trains the model "
                                 f"the task builds")
            if ranges[i][1] == ranges[i][2]:
                raise ValueError(f"{where}: model.grow needs a phase that runs at least one step; it has none in "
                                 f"{self.total_steps} steps")

    def _grow_fn(self, index: int) -> Callable[[nn.Module], nn.Module]:
        """``module -> grown module`` for phase ``index``'s ``model.grow``, errors naming the phase."""
        phase = self.schedule[index]
        where = f"schedule[{index}] ({phase.name!r})"

        def grow(module: nn.Module) -> nn.Module:
            try:
                return self.task.grow(module, phase.model["grow"])
            except NotImplementedError as err:
                raise ValueError(f"{where}: model.grow: {err}") from None
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}: {err}") from None

        return grow

    def _architectures(self, model: nn.Module) -> list[list[str]]:
        """Each phase's parameter names, growing a copy of ``model`` as the schedule will (checking every growth)."""
        from .population import check_growth

        names, current = [], model
        with torch.random.fork_rng(devices=[]):  # the check must not move the run's random numbers
            for i, phase in enumerate(self.schedule):
                if "grow" in phase.model:
                    grown = self._grow_fn(i)(copy.deepcopy(current))
                    check_growth(current, grown, f"schedule[{i}] ({phase.name!r}): model.grow")
                    current = grown
                names.append([n for n, _ in current.named_parameters()])
        return names

    def _grow_to(self, count: int) -> None:
        """Apply the schedule's growths in order until ``count`` are in force (the population rebuilt each time)."""
        while self._grown < count:
            self.clan.grow(self._grow_fn(self._grow_phases[self._grown]))
            self._grown += 1
            self._fused_step = None  # made for the population it was bound to
            self._kept = None  # an incumbent kept before the growth is another model: keep the best since

    def _growths_until(self, index: int) -> int:
        """How many growths are in force in phase ``index``."""
        return sum(1 for i in self._grow_phases if i <= index)

    # -- assembly ---------------------------------------------------------------------------------
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
        resume = getattr(self, "_resume_state", None)
        if resume is not None:
            self._restore(resume)
        self._prepared = True

    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the model's init; a replay with the same seed starts from the same weights
        self.data = self.task.load(cfg.data, cfg.seed)
        self._datasets[()] = self.data
        if not cfg.schedule.phases:
            passes = cfg.total_steps * cfg.clan.population_size * cfg.data.batch_size / data_length(self.data.train)
            self.schedule = cfg.schedule.to_schedule(cfg.clan.selection, passes)
            # The run's config names the phases it got: config.toml and the checkpoint hold them,
            # so a resume (or a later default) cannot change the plan under a running run.
            self.config = cfg = cfg.replace(schedule=[phase.to_dict() for phase in self.schedule])
        model = self.task.build_model(self.model_settings, cfg.data)
        names = self._architectures(model)
        self._freeze = [frozen_parameters(names[i], phase.model["freeze"], f"schedule[{i}] ({phase.name!r})")
                        if "freeze" in phase.model else [] for i, phase in enumerate(self.schedule)]
        for spec in self._phase_data:
            key = _data_key(spec, cfg.data)
            if key not in self._datasets:
                self._datasets[key] = self.task.load(spec, cfg.seed)
        optimizer = cfg.optimizer.build(model.parameters())
        first = self.schedule[0]
        self.clan = Clan(model, optimizer, population_size=cfg.clan.population_size,
                         round_length=first.clan.get("round_length", cfg.clan.round_length),
                         duty_cycle=first.duty_cycle(cfg.clan.duty_cycle), autobind=["adamw"],
                         genome_config=cfg.clan.genes, selection=cfg.clan.selection_arg, init=cfg.clan.init,
                         seed=cfg.seed, device=self.device, confidence=cfg.clan.confidence or None)
        if self.clan.group is not None:  # the clan compared its own settings; the rest of the run must agree too
            self.clan.group.check_same(self.config.to_toml(), "the run's config", who="TrainingMachine")
        self._lr_factor = None
        opt = cfg.optimizer
        # A competitive step's share of a genome's lr (see clan.competitive_lr): only where a genome's
        # lr is also a cooperative step's, with winner selection (a sweep's or PBT's members never cooperate).
        sqrt = cfg.clan.competitive_lr == "sqrt" and cfg.clan.selection == "winner"
        self._competitive_lr = cfg.clan.population_size ** -0.5 if sqrt else 1.0
        if opt.lr_schedule != "constant" or opt.warmup > 0 or self._competitive_lr != 1.0:
            # The run's lr shape: one factor on every member's lr, written in place before each step.
            self._lr_factor = torch.ones((), dtype=torch.float64, device=self.device)
            self.clan.optimizer.lr_factor = self._lr_factor
        if cfg.clan.lr_grid:
            # A sweep over lr only: every other gene is held at the incumbent for every member.
            for name, value in self.clan.incumbent.items():
                values = cfg.clan.lr_grid if name == "lr" else [value.item()] * cfg.clan.population_size
                try:
                    self.clan.set_genome(name, values)
                except ValueError as err:
                    raise ValueError(f"clan.lr_grid: {err}") from None

    def _plan(self) -> Iterator[_Stretch]:
        """The run's stretches in order: every clan round and every cooperative stretch, tiling the steps.

        The one walk over the schedule: training, the checks before it and the checks of a
        resumed state all read it.
        """
        cfg = self.config
        for index, (phase, first, end) in enumerate(self.schedule.step_ranges(self.total_steps)):
            if end == first:
                continue  # a phase shorter than half a step
            if not phase.competition:
                yield _Stretch("cooperative", phase, index, first, end, phase_end=True, first=True)
                continue
            duty_cycle = phase.duty_cycle(cfg.clan.duty_cycle)
            if phase.search is not None:  # one round over the whole phase, all competition
                yield _Stretch("round", phase, index, first, end, duty_cycle, phase_end=True, first=True)
                continue
            rounds, leftover = plan_rounds(end - first, phase.clan.get("round_length", cfg.clan.round_length),
                                           duty_cycle)
            position = first
            for i, length in enumerate(rounds):
                yield _Stretch("round", phase, index, position, position + length, duty_cycle,
                               phase_end=not leftover and i == len(rounds) - 1, first=i == 0)
                position += length
            if leftover:
                # Too short for a round: these steps run cooperatively, with the incumbent's settings.
                yield _Stretch("cooperative", dataclasses.replace(phase, optimizer={}), index, position, end,
                               phase_end=True, first=not rounds)

    def _check_data(self) -> None:
        """Refuse, before training, a stretch whose steps take more samples than the training data holds."""
        p = self.clan.population_size
        for stretch in self._plan():
            n = data_length(self._data_of(stretch).train)
            batch = stretch.phase.data.get("batch_size", self.config.data.batch_size)
            cooperates = stretch.kind == "cooperative" or stretch.duty_cycle != 1
            need = p * batch if cooperates else batch
            if need > n:
                what = (f"population_size x batch_size = {p} x {batch} = {need} samples" if cooperates
                        else f"batch_size = {batch} samples")
                raise ValueError(
                    f"schedule[{stretch.index}] ({stretch.phase.name!r}): a {'cooperative' if cooperates else 'competitive'} "
                    f"step takes {what}, but the training data has only {n}; lower data.batch_size"
                    f"{' or clan.population_size' if cooperates else ''}")

    def _data_of(self, stretch: _Stretch):
        """The data of the stretch's phase (the config's, or reloaded with the phase's data settings)."""
        return self._datasets[_data_key(self._phase_data[stretch.index], self.config.data)]

    def _stream(self, batch_size: int, stretch: _Stretch):
        """An endless batch iterator over the stretch's training data (epochs back to back) for ``batch_size``.

        Every loader shares the clan's epoch position; one over data of another length draws a
        new permutation on its first batch, so a phase that changes the data starts a new epoch.
        """
        data = self._data_of(stretch)
        key = (batch_size, _data_key(self._phase_data[stretch.index], self.config.data))
        if key not in self._streams:
            loader = self.clan.loader(data.train, batch_size=batch_size)

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
                                         f"cannot fill one step of batch_size {batch_size}")

            self._streams[key] = endless()
        return self._streams[key]

    # -- the step ---------------------------------------------------------------------------------
    def _fused(self):
        if self._fused_step is None:
            from .fused import FusedStep

            self._fused_step = FusedStep(self.clan, self.task.loss, **self._fused_options)
        return self._fused_step

    def _train_step(self, member, batch, cooperative: bool | None = None) -> torch.Tensor:
        """One step of the imperative loop, without the round clock; returns the ``[P]`` losses.

        ``cooperative=None`` averages the gradients when the clan's current step is cooperative
        (``member.sync_context()``); a cooperative phase of the machine passes ``True``.
        """
        x, y = batch
        loss = member_loss(self.task.loss, member.model(x), y)  # [P]
        with self.clan.sync_context(cooperative=cooperative):
            loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        return loss.detach()

    @contextlib.contextmanager
    def _keep_frozen(self):
        """Undo the step's writes to the frozen parameters' weights and moments (every row).

        A frozen parameter is skipped the way the optimizer skips one without a gradient: no
        update, no weight decay, moments as they were, and the update not counted in its own
        step count (its bias correction resumes where it stopped). Every row is kept, so the
        rows a cooperative step leaves behind (they catch up from row 0 later) stay consistent too.
        """
        if not self._frozen:
            yield
            return
        optimizer = self.clan.optimizer
        state = optimizer.adamw_state
        keeper = keep_columns((self.clan.population.flat, state.exp_avg, state.exp_avg_sq), self._frozen)
        with torch.no_grad():  # the copies in and out are no part of the step's graph
            keeper.__enter__()
            before = state.step.clone()
        yield
        with torch.no_grad():
            keeper.__exit__(None, None, None)
            optimizer.skip_(self._frozen_params, state.step - before)

    def _shape_lr(self, competitive: bool = False) -> None:
        """Write this step's lr factor into the optimizer: the run's lr shape (``optimizer.lr_schedule``),
        and for a competitive step the ``clan.competitive_lr`` rule."""
        if self._lr_factor is not None:
            factor = self.config.optimizer.lr_factor(self.clock.step, self.total_steps)
            self._lr_factor.fill_(factor * self._competitive_lr if competitive else factor)

    def _cooperative_step(self, member, batch) -> None:
        """One data-parallel step of identical members, outside the round clock (fused when enabled)."""
        self._shape_lr()
        with self._keep_frozen():
            if self.fused:
                loss = self._fused().train_step(*batch, cooperative=True)
            else:
                loss = self._train_step(member, batch, cooperative=True)
        self._losses_finite &= torch.isfinite(loss).all()
        self._after_step(loss)

    def _round_step(self, member, batch) -> None:
        """One step of a clan round, advancing the round clock (fused when enabled)."""
        self._shape_lr(competitive=self.clan.phase == "competitive")
        with self._keep_frozen():
            if self.fused:
                loss = self._fused().train_step(*batch, cooperative=self.clan.phase == "cooperative")
            else:
                loss = self._train_step(member, batch)
        # The clock moves after the frozen columns are restored: entering the competitive phase
        # brings the other members' rows up to date from member 0's, which must see them kept.
        member.step()
        self._after_step(loss)

    def _after_step(self, loss: torch.Tensor) -> None:
        self._loss_sum += loss.mean().double()  # summed on device: no host sync per step
        self._loss_count += 1
        self.clock.advance()
        if self.clock.step % self.log_every == 0 or self.clock.done:
            self._record({"event": "train", "step": self.clock.step, "t": self.clock.t, "phase": self._phase_name,
                          "loss": self._loss_sum.item() / self._loss_count})
            self._loss_sum.zero_()
            self._loss_count = 0
        if self.callback is not None:
            self.callback({"event": "step", "step": self.clock.step, "phase": self._phase_name,
                           "round": self.clan.round_index, "best_val": self.best_val, "losses": loss})

    def _record(self, record: dict) -> None:
        self.metrics.append(record)
        if self.out_dir is not None and self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.callback is not None and record["event"] != "step":
            self.callback(record)

    def request_stop(self) -> None:
        """Ask the run to stop after the step in progress (safe to call from a signal handler).

        :meth:`train` then saves a checkpoint at that step (with an ``out_dir``) and raises
        :class:`TrainingStopped`; :meth:`resume` continues from there.
        """
        self._stop_requested = True

    def _poll_stop(self, stretch: _Stretch) -> None:
        # Never after a stretch's last step: the stretch's record, selection and restore point
        # come first, so a stop always lands where a resume can pick the stretch up again.
        stop = self._stop_requested
        if self.clan.group is not None:  # every rank stops at the same step (a signal reaches them apart)
            stop = any_rank(self.clan.group, stop, "the stop check")
        if stop and self.clock.step < stretch.end:
            raise _StopRequested

    # -- divergence -------------------------------------------------------------------------------
    def _finite_members(self) -> torch.Tensor:
        """``bool[P]``: which of this rank's members hold only finite weights, gradients, buffers and optimizer state."""
        finite = torch.ones(self.clan.local_size, dtype=torch.bool, device=self.device)
        for leaf in optree.tree_leaves(self.clan.member_state()):
            if leaf.is_floating_point():
                finite &= torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(1)
        return finite

    def _any_finite(self) -> bool:
        """Whether any member of the clan, on any rank, holds only finite values."""
        return any_rank(self.clan.group, bool(self._finite_members().any()), "the finiteness check")

    def _cooperative_diverged(self) -> bool:
        """Whether the cooperative stretch since the last check saw a non-finite loss or weight (one host sync)."""
        diverged = ~self._losses_finite | ~torch.isfinite(self.clan.population.flat).all()
        self._losses_finite.fill_(True)
        return any_rank(self.clan.group, bool(diverged), "the divergence check")

    def _recover_cooperative(self, stretch: _Stretch, start: int) -> None:
        """Undo a diverged cooperative stretch the way a diverged round is undone, or stop the run.

        The clan's restore point (the last state known good) comes back with half the
        incumbent's learning rate; the steps since then are lost, as in a diverged round.
        """
        clan = self.clan
        where = (f"phase {stretch.phase.name!r} (cooperative, steps {stretch.start}-{stretch.end}): the training loss "
                 f"or the weights became NaN or infinite by step {self.clock.step}")
        if clan._restores >= clan.max_restores:
            raise DivergenceError(f"{where}; gave up after {clan._restores} consecutive restores")
        losses = torch.full((clan.population_size,), math.nan, dtype=torch.float64)
        clan._recover(losses, {n: v.tolist() for n, v in clan.genomes.items()})  # the clan's one restore rule
        record = {"kind": "cooperative", "phase": stretch.phase.name, "start_step": start,
                  "end_step": self.clock.step, "hyper": self._phase_hyper(stretch.phase),
                  "batch_size": self._batch_size(stretch) * clan.population_size, "val_loss": math.nan,
                  "event": "diverged", "restored_round": clan.history[-1]["restored_round"],
                  **self._planes(stretch, start)}
        self.history.append(record)
        self._record({"event": "cooperative", **record})

    # -- phases -----------------------------------------------------------------------------------
    def _phase_hyper(self, phase: Phase) -> dict[str, float]:
        """The hyperparameters of a cooperative phase: the incumbent's, with the phase's overrides."""
        return phase_optimizer(phase.optimizer, {name: self.clan.incumbent[name].item() for name in ADAMW_FIELDS})

    def _batch_size(self, stretch: _Stretch) -> int:
        return stretch.phase.data.get("batch_size", self.config.data.batch_size)

    def _enter(self, stretch: _Stretch) -> None:
        """Set the stretch's model plane: the columns its steps keep (its phase's frozen parameters)."""
        columns = self.clan.population.columns
        self._frozen = [columns[name] for name in self._freeze[stretch.index]]
        index = {name: k for k, name in enumerate(columns)}
        self._frozen_params = [index[name] for name in self._freeze[stretch.index]]

    @staticmethod
    def _planes(stretch: _Stretch, start: int | None = None) -> dict:
        """The record fields of a phase's data and model planes (none when the phase changes neither).

        ``data``: the phase's data settings beyond ``batch_size``; ``freeze``: its freeze patterns;
        ``grow``: its growth settings, on the phase's first record only (the one starting at
        the phase's first step: ``start``, default the stretch's). The exported schedule carries
        them on, so the replay follows them.
        """
        out = {}
        if stretch.first and "grow" in stretch.phase.model and (start is None or start == stretch.start):
            out["grow"] = copy.deepcopy(stretch.phase.model["grow"])
        data = {k: v for k, v in stretch.phase.data.items() if k not in DATA_KEYS}
        if data:
            out["data"] = data
        if "freeze" in stretch.phase.model:
            out["freeze"] = list(stretch.phase.model["freeze"])
        return out

    def _run_cooperative(self, stretch: _Stretch) -> None:
        """The steps of a cooperative stretch not yet run: data-parallel steps of identical members."""
        clan, phase = self.clan, stretch.phase
        # Between rounds the clan sits at step 0 of its next round; the steps taken here leave
        # the round clock alone, average the gradients over the (identical) members, and train
        # with the phase's hyperparameters, written into the optimizer for the phase's length.
        batch_size = self._batch_size(stretch)
        stream = self._stream(batch_size, stretch)
        self._enter(stretch)
        evaluation = self._data_of(stretch).eval
        # The records tile the run, so this one starts where the last ends: the stretch's start,
        # or the step of a restore inside it (also after a resume in the middle of it).
        start = self.history[-1]["end_step"] if self.history else 0
        while True:
            hyper = self._phase_hyper(phase)
            with torch.no_grad():
                for gene, field in ADAMW_FIELDS.items():
                    getattr(clan.optimizer.hyper, field).fill_(hyper[gene])
            member = clan.round()
            member.model.train()
            diverged = False
            with clan.cooperate():  # identical members trained as one model at batch P x B
                while self.clock.step < stretch.end and not diverged:
                    self._cooperative_step(member, next(stream))
                    if self.clock.step % DIVERGENCE_CHECK_EVERY == 0 or self.clock.step == stretch.end:
                        diverged = self._cooperative_diverged()
                    if not diverged:
                        self._poll_stop(stretch)
                val = None
                if not diverged:
                    val = self.task.population_losses(member.model, evaluation)
                    diverged = any_rank(clan.group, not bool(torch.isfinite(val).all()), "the divergence check")
            if not diverged:
                break
            self._recover_cooperative(stretch, start)
            start = self.clock.step
        clan.reconfigure()  # writes the clan's own genes back into the optimizer
        # The members are identical again, and finite (checked above): make this the point a
        # divergence restores to, so a diverging round after this phase does not also undo it.
        clan.mark_restore_point()
        self.best_val = min(self.best_val, val[0].item())
        self._keep(val[0].item())
        if start == self.clock.step:
            return  # restored after the stretch's last step: its diverged record covers it
        record = {"kind": "cooperative", "phase": phase.name, "start_step": start, "end_step": self.clock.step,
                  "hyper": hyper, "batch_size": batch_size * clan.population_size, "val_loss": val[0].item(),
                  **self._planes(stretch, start)}
        self.history.append(record)
        self._record({"event": "cooperative", **record})

    def _run_round(self, stretch: _Stretch) -> None:
        """The steps of a clan round not yet run, then validation and selection."""
        cfg, clan = self.config, self.clan
        batch_size = self._batch_size(stretch)
        stream = self._stream(batch_size, stretch)
        self._enter(stretch)
        length = stretch.end - stretch.start
        if self.clock.step == stretch.start:
            clan.reconfigure(round_length=length, duty_cycle=stretch.duty_cycle)
            if stretch.phase.search is not None:  # the challengers' lrs spread around the incumbent's
                genome = search_genome(clan.incumbent, clan.genes, clan.population_size, stretch.phase.search)
                for name, values in genome.items():
                    clan.set_genome(name, values)
        # else: resumed inside the round, whose settings are part of the clan's restored state
        cooperative_steps = clan.cooperative_steps
        member = clan.round()
        member.model.train()
        while self.clock.step < stretch.end:
            self._round_step(member, next(stream))
            self._poll_stop(stretch)
        # With a confidence, the paired test reads each member's losses on the same blocks of samples.
        paired = {"blocks": SCORE_BLOCKS} if clan.confidence is not None else {}
        val = self.task.population_losses(member.model, self._data_of(stretch).eval, **paired)
        record = dict(clan.step(val))
        record.update(kind="round", phase=stretch.phase.name, start_step=stretch.start, end_step=self.clock.step,
                      cooperative_steps=cooperative_steps, batch_size=batch_size,
                      population_size=clan.population_size, **self._planes(stretch))
        if stretch.phase.search is not None:
            record["search"] = stretch.phase.search
        if self._competitive_lr != 1.0:  # the export gives the competitive steps this share of the lr
            record["competitive_lr_scale"] = self._competitive_lr
        self.best_val = min(self.best_val, min(v for v in record["val_losses"] if math.isfinite(v))
                            if any(math.isfinite(v) for v in record["val_losses"]) else math.inf)
        if record["winner"] is not None:
            self._keep(record["val_losses"][record["winner"]])
        self.history.append(record)
        self._record({"event": "round", **record})
        if self.out_dir is not None and cfg.checkpoint_every and clan.round_index % cfg.checkpoint_every == 0:
            self.checkpoint()

    def _keep(self, val: float) -> None:
        """With ``clan.keep_best``: copy member 0 (the incumbent, after selection) if its validation loss is the best yet."""
        clan = self.clan
        if not self.config.clan.keep_best or clan.selection != "winner" or not math.isfinite(val):
            return
        if self._kept is None or val < self._kept["val"]:
            clan.sync_members()
            self._kept = {"step": self.clock.step, "val": val, "row": clan.population.member_row(0)}

    # -- running ----------------------------------------------------------------------------------
    def machine_state(self) -> dict:
        """The machine's own state as plain values and tensors (the clan's is saved next to it)."""
        return {"config": self.config.to_dict(), "clock": self.clock.state_dict(), "history": list(self.history),
                "metrics": list(self.metrics), "best_val": self.best_val, "loss_sum": self._loss_sum.item(),
                "loss_count": self._loss_count, "kept": self._kept}

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, callback: Callable[[dict], None] | None = None,
               device: torch.device | str | None = None, fused: bool | Mapping = True,
               task: Task | None = None) -> TrainingMachine:
        """A machine that continues the run whose ``checkpoint.pt`` is in ``run_dir``.

        Its :meth:`train` restores the clan (weights, optimizer, genomes, loader position, random
        generators) and the machine's clock, history and metrics, skips what was done, and ends
        with the same weights, genomes and history as the run would have without the interruption.
        ``metrics.jsonl`` is cut back to the checkpoint, so no record appears twice. The run keeps
        the settings it started with: a ``config.toml`` in ``run_dir`` that says otherwise is
        refused rather than mixed into the saved state.

        Args:
            run_dir: The run directory given as ``out_dir`` to the interrupted run.
            callback: As for the constructor.
            device: As for the constructor.
            fused: As for the constructor (the numbers do not depend on it).
            task: The run's task, for one that cannot be imported by the checkpoint's
                ``config.task`` (default: imported from it).

        Raises:
            FileNotFoundError: if ``run_dir`` has no checkpoint.
            ValueError: if the checkpoint is unreadable, damaged or of another format version, or
                ``run_dir/config.toml`` differs from the checkpoint's config (naming the setting).
        """
        run_dir = Path(run_dir)
        state = load_run_checkpoint(run_dir / "checkpoint.pt")
        if not isinstance(state["machine"].get("config"), Mapping):
            raise ValueError(f"TrainingMachine.resume: {run_dir / 'checkpoint.pt'} has no machine config")
        try:
            config = RunConfig.from_dict(state["machine"]["config"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"TrainingMachine.resume: the checkpoint's config is invalid: {err}") from None
        toml_path = run_dir / "config.toml"
        if toml_path.exists():
            try:
                edited = RunConfig.from_toml(toml_path).to_dict()
            except (ValueError, TypeError, OSError) as err:
                raise ValueError(f"TrainingMachine.resume: {toml_path} cannot be read: {err}") from None
            saved = config.to_dict()
            field = _first_difference(saved, edited)
            if field is not None:
                raise ValueError(
                    f"TrainingMachine.resume: {toml_path} sets {field} = {_lookup(edited, field)!r}, the checkpoint's "
                    f"run has {_lookup(saved, field)!r}; a resumed run keeps its settings: undo the edit, or start "
                    f"a new run")
        if not config.schedule.phases:
            # Written before a run's config named the phases it got: the default then was one phase
            # of clan rounds over the whole run, and the run continues under it.
            config = config.replace(schedule=[{"name": "clan", "start_t": 0.0, "end_t": 1.0}])
        if task is not None and task_reference(task) != config.task:
            raise ValueError(f"TrainingMachine.resume: the run trained task {config.task!r}, "
                             f"got task {task_reference(task)!r}")
        machine = cls(config, out_dir=run_dir, callback=callback, device=device, fused=fused, task=task)
        machine._resume_state = state
        return machine

    def _restore(self, state: Mapping) -> None:
        """Load a checkpoint's state after checking that it belongs to this run and this point of it."""
        saved = state["machine"]
        self._check_saved_machine(saved)
        loader = state["clan"].get("loader")
        perm = loader.get("perm") if isinstance(loader, Mapping) else None
        sizes = sorted({data_length(d.train) for d in self._datasets.values()})
        if perm is not None and (not isinstance(perm, torch.Tensor) or perm.dim() != 1 or len(perm) not in sizes):
            got = list(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
            raise ValueError(f"TrainingMachine.resume: the checkpoint's loader permutation is {got}, the training "
                             f"data has {' or '.join(map(str, sizes))} samples")
        # A checkpoint taken after a growth holds the grown model: grow the population first (the
        # checkpoint then overwrites every value, the random generators included).
        step = saved["clock"]["step"]
        self._grow_to(sum(1 for i in self._grow_phases if self._phase_first[i] < step))
        try:
            self.clan.load_state_dict(state["clan"])
        except (KeyError, TypeError, AttributeError, RuntimeError) as err:
            # Every check of Clan.load_state_dict names what it expected; anything else is a state
            # that is not a clan's at all.
            raise ValueError(f"TrainingMachine.resume: the checkpoint's clan state is malformed "
                             f"({type(err).__name__}: {err})") from None
        self.clock.load_state_dict(saved["clock"])
        self.history, self.metrics = list(saved["history"]), list(saved["metrics"])
        self.best_val = float(saved["best_val"])
        self._loss_sum.fill_(saved["loss_sum"])
        self._loss_count = saved["loss_count"]
        self._kept = self._checked_kept(saved.get("kept"), step)
        self._check_position()
        if not self._any_finite():
            raise ValueError("TrainingMachine.resume: the checkpoint holds NaN or infinite values in every member")

    def _check_saved_machine(self, saved: Mapping) -> None:
        """Refuse a checkpoint's machine state with values no run of this config can have."""
        def refuse(name: str, expected: str, got) -> None:
            raise ValueError(f"TrainingMachine.resume: the checkpoint's machine/{name} must be {expected}, got {got!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        clock = saved.get("clock")
        if not isinstance(clock, Mapping):
            refuse("clock", "a table", clock)
        if clock.get("total_steps") != self.total_steps:
            refuse("clock/total_steps", f"{self.total_steps} (the config's)", clock.get("total_steps"))
        step = clock.get("step")
        if not is_int(step) or not 0 <= step <= self.total_steps:
            refuse("clock/step", f"an int in [0, {self.total_steps}]", step)
        for name in ("history", "metrics"):
            records = saved.get(name)
            if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
                refuse(name, "a list of records", type(records).__name__)
        history = saved["history"]
        ends = [r.get("end_step") for r in history]
        if not all(is_int(e) for e in ends) or ends != sorted(ends) or (ends and ends[-1] > step):
            refuse("history", f"records in step order ending by step {step}", ends)
        best_val = saved.get("best_val")
        if not is_number(best_val) or math.isnan(best_val):
            refuse("best_val", "a number", best_val)
        loss_sum = saved.get("loss_sum")
        if not is_number(loss_sum) or math.isinf(loss_sum):
            refuse("loss_sum", "a number", loss_sum)
        expected = 0 if step == self.total_steps else step % self.log_every
        if saved.get("loss_count") != expected:
            refuse("loss_count", f"{expected} (steps since the last training-loss record at step {step})",
                   saved.get("loss_count"))

    def _checked_kept(self, kept, step: int) -> dict | None:
        """A checkpoint's kept incumbent (see ``clan.keep_best``), refused unless it is one member of this population."""
        if kept is None:
            return None
        pop = self.clan.population
        row = kept.get("row") if isinstance(kept, Mapping) else None
        step_ok = isinstance(kept, Mapping) and isinstance(kept.get("step"), int) and 0 <= kept["step"] <= step
        val = kept.get("val") if isinstance(kept, Mapping) else None
        ok = (step_ok and isinstance(val, float) and math.isfinite(val) and isinstance(row, Mapping)
              and isinstance(row.get("params"), torch.Tensor) and row["params"].shape == pop.flat.shape[1:]
              and isinstance(row.get("buffers"), Mapping) and set(row["buffers"]) == set(pop.buffers)
              and all(isinstance(v, torch.Tensor) and v.shape == pop.buffers[n].shape[1:]
                      for n, v in row["buffers"].items()))
        if not ok:
            raise ValueError(f"TrainingMachine.resume: the checkpoint's machine/kept must be the best incumbent's "
                             f"step (<= {step}), finite loss and one member's weights [{pop.flat.shape[1]}] and "
                             f"buffers, got {type(kept).__name__}")
        return kept

    def _check_position(self) -> None:
        """Refuse a restored clan whose round clock is not where this run's plan has it at the restored step."""
        step, clan = self.clock.step, self.clan
        for stretch in self._plan():
            if not stretch.start <= step < stretch.end:
                continue
            if stretch.kind == "round" and step > stretch.start:
                expected = (stretch.end - stretch.start, step - stretch.start, stretch.duty_cycle)
                got = (clan.round_length, clan.step_in_round, clan.duty_cycle)
                if got != expected:
                    raise ValueError(
                        f"TrainingMachine.resume: at step {step} the plan has a round of {expected[0]} steps at "
                        f"duty_cycle {expected[2]}, {expected[1]} steps in; the checkpoint's clan is {got[1]} steps "
                        f"into a round of {got[0]} at duty_cycle {got[2]}")
                return
            break
        if clan.step_in_round != 0:
            raise ValueError(f"TrainingMachine.resume: at step {step} the plan is between rounds, the checkpoint's "
                             f"clan is {clan.step_in_round} steps into round {clan.round_index}")

    def checkpoint(self) -> Path:
        """Save ``checkpoint.pt`` into ``out_dir`` atomically (see :func:`save_run_checkpoint`).

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
                f"TrainingMachine.checkpoint: at step {self.clock.step} every member holds NaN or infinite values; "
                f"not saved (the checkpoint of step {self._checkpoint_step} is kept)")
        path = self.out_dir / "checkpoint.pt"
        if self.rank == 0:
            save_run_checkpoint(path, self.clan, self.machine_state())
        else:
            self.clan.state_dict()  # its gathers of the members are collectives: every rank takes part
        self._checkpoint_step = self.clock.step
        return path

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
        start_time = time.perf_counter()
        writes = self.out_dir is not None and self.rank == 0
        with run_lock(self.out_dir) if writes else contextlib.nullcontext():
            self.prepare()
            resume = getattr(self, "_resume_state", None)
            if self.out_dir is not None:
                if writes:
                    # A resumed run rewrites the metrics up to its checkpoint: later lines were lost work.
                    (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.metrics))
                if resume is None and writes:
                    (self.out_dir / "config.toml").write_text(self._config_toml())  # what a resume holds to
                if resume is None:
                    self.checkpoint()  # a run stopped before its first round can resume too
                else:
                    self._checkpoint_step = self.clock.step
            try:
                for stretch in self._plan():
                    if stretch.end <= self.clock.step:
                        continue  # finished before the checkpoint this run resumed from
                    self._grow_to(self._growths_until(stretch.index))
                    self._phase_name = stretch.phase.name
                    if stretch.kind == "round":
                        self._run_round(stretch)
                    else:
                        self._run_cooperative(stretch)
                    if stretch.phase_end and self.out_dir is not None:
                        self.checkpoint()
            except _StopRequested:
                saved = None
                if self.out_dir is not None:
                    # A cooperative stretch that saw a non-finite loss since its last check is diverged.
                    if not any_rank(self.clan.group, not bool(self._losses_finite), "the divergence check") \
                            and self._any_finite():
                        self.checkpoint()
                    saved = self._checkpoint_step
                raise TrainingStopped(self.clock.step, saved) from None
            final = self._final(time.perf_counter() - start_time)
        return TrainingResults(config=self.config, total_steps=self.total_steps, history=self.history,
                               metrics=self.metrics, final=final, best_model=self._best_model,
                               schedule=self._exported)

    def _final(self, seconds: float) -> dict:
        population, group = self.clan.population, self.clan.group
        members = self.task.population_losses(population, self.data.val)
        if group is not None:
            members = group.all_gather(members, "the final all-gather of the validation losses")
        finite = torch.where(torch.isfinite(members), members, torch.full_like(members, math.inf))
        best = int(torch.argmin(finite).item())
        self._best_model = self._member_module(best).eval()
        scores = self.task.evaluate(self._best_model, self.data.val)
        if not math.isfinite(scores["loss"]) or not self._member_finite(best):
            raise DivergenceError(f"TrainingMachine: the run ends without a finite model: the best member's "
                                  f"validation loss is {scores['loss']}")
        kept = {}
        if self._kept is not None and self._kept["step"] < self.clock.step:
            model = population.member_module(0, row=self._kept["row"]).eval()
            kept_scores = self.task.evaluate(model, self.data.val)
            if kept_scores["loss"] < scores["loss"]:  # the incumbent kept earlier beats the last model
                kept = {"kept_step": self._kept["step"], "last_val_loss": scores["loss"]}
                self._best_model, scores = model, kept_scores
        # A sweep's members never copy each other: the best one's own genes are its schedule.
        # With truncation the history does not say who copied whom, so each round's winner
        # stands in for the lineage (an approximation).
        self._exported = export_schedule(self.history, self.total_steps,
                                         member=best if self.config.clan.selection == "none" else None)
        final = {"event": "final", "step": self.clock.step, "val_loss": scores["loss"],
                 "val_accuracy": scores["accuracy"], "member_val_losses": members.tolist(), "best_member": best,
                 "rounds": sum(r["kind"] == "round" for r in self.history), "seconds": seconds,
                 "member_steps": self.total_steps * self.clan.population_size, "world_size": self.clan.world_size,
                 **kept}
        self._record(final)
        return final

    def _member_module(self, member: int) -> nn.Module:
        """A plain module of the clan's member ``member`` (a global index: its rank sends it to the others)."""
        clan = self.clan
        if clan.group is None:
            return clan.population.member_module(member)
        owner, local = clan.group.owner(member), member - clan.member_offset
        state = clan.population.member_module(local).state_dict() if clan.group.rank == owner else None
        state = broadcast_object(clan.group, state, owner, "the broadcast of the best member")
        module = clan.population.member_module(0)
        module.load_state_dict(state)
        return module

    def _member_finite(self, member: int) -> bool:
        """Whether the clan's member ``member`` (a global index) holds only finite values."""
        local = member - self.clan.member_offset
        mine = 0 <= local < self.clan.local_size and bool(self._finite_members()[local])
        return any_rank(self.clan.group, mine, "the finiteness check")

    def _config_toml(self) -> str:
        """``config.toml``: the config, and the number of processes that trained the run, as a comment.

        A comment, because the config does not depend on it: a resume may run on another number
        of ranks (each takes its members from the checkpoint).
        """
        return f"# world_size = {self.clan.world_size}  (processes that trained this run)\n" + self.config.to_toml()
