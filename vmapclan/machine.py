"""The training machine: a whole population run from a config, phase by phase over normalized time.

``TrainingMachine(config, total_steps).train()`` builds the task's data and model, wraps them in a
:class:`~vmapclan.Clan`, and walks the config's :class:`~vmapclan.PhaseSchedule`:

- a phase with ``clan.competition = false`` trains the population *cooperatively*: every member
  identical, each on its own shard of ``batch_size`` samples, gradients averaged (data-parallel
  training of one model at batch ``P x batch_size``), with the phase's optimizer overrides;
- a phase with competition runs clan rounds (cooperation, competition, selection) with the
  phase's ``round_length`` and ``duty_cycle``; the last round of a phase absorbs the steps that do
  not fill a whole round, so every round ends inside its phase.

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
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .clan import Clan
from .optim import ADAMW_FIELDS
from .population import member_loss
from .replay import export_schedule, write_schedule
from .rounds import plan_rounds
from .schedule import Phase, PhaseSchedule, TimeController, phase_optimizer
from .specs import RunConfig
from .tasks import get_task

__all__ = ["TrainingMachine", "TrainingResults", "save_run_checkpoint", "load_run_checkpoint", "plan_rounds",
           "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


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
    return dict(state)


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
            ``seconds``, ``member_steps``.
        best_model: A plain ``nn.Module`` with the best member's weights.
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
                       clan={"val_loss": self.final["val_loss"], "val_accuracy": self.final["val_accuracy"]})
        files["config"] = out / "config.toml"
        files["config"].write_text(self.config.replace(total_steps=self.total_steps).to_toml())
        files["best_model"] = out / "best_model.pt"
        torch.save(self.best_model.state_dict(), files["best_model"])
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
        out_dir: If given, ``metrics.jsonl`` is appended as training goes and checkpoints
            (``checkpoint.pt``) are written at phase ends and every ``config.checkpoint_every``
            rounds. The rest of the run directory is written by :meth:`TrainingResults.save`.
        callback: Called with event dicts as training goes: ``{"event": "step", "step", "phase",
            "round", "best_val"}`` after every step (no host sync), and ``{"event": "round", ...}``,
            ``{"event": "cooperative", ...}``, ``{"event": "train", ...}`` records as they are made.
        device: Where the population lives (default: CPU).
        fused: Train with :class:`~vmapclan.FusedStep` (one vmapped forward and backward and one
            batched update per step; the same numbers as the imperative loop), in clan rounds and
            in cooperative phases alike (there with :meth:`~vmapclan.FusedStep.train_step`, which
            leaves the round clock alone): ``True``, ``False`` (the imperative loop), or a dict of
            ``FusedStep`` options, e.g. ``{"cuda_graph": True, "compile": "optimizer"}`` on CUDA.

    Raises:
        ValueError, TypeError: for a bad config (naming the field), ``total_steps`` or ``fused``.

    Example:
        >>> results = TrainingMachine({"task": "digits-mlp", "clan": {"population_size": 4}}, 200).train()  # doctest: +SKIP
        >>> results.final["val_accuracy"]  # doctest: +SKIP
    """

    def __init__(self, config: RunConfig | Mapping, total_steps: int | None = None, *,
                 out_dir: str | os.PathLike | None = None, callback: Callable[[dict], None] | None = None,
                 device: torch.device | str | None = None, fused: bool | Mapping = True):
        if isinstance(config, Mapping):
            config = RunConfig.from_dict(config)
        if not isinstance(config, RunConfig):
            raise TypeError(f"TrainingMachine: config must be a RunConfig or a dict, got {type(config).__name__}")
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"TrainingMachine: total_steps must be a positive int, got {total_steps!r}")
            config = config.replace(total_steps=total_steps)
        self.config = config
        self.total_steps = config.total_steps
        self.clock = TimeController(self.total_steps)
        self.schedule = config.schedule.to_schedule()
        self.task = get_task(config.task)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callback = callback
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.log_every = config.log_every or max(1, self.total_steps // 100)
        self.fused, self._fused_options = _fused_options(fused, self.device)
        self._fused_step = None
        self.history: list[dict] = []
        self.metrics: list[dict] = []
        self.clan: Clan | None = None
        self.best_val = math.inf
        self._streams: dict[int, object] = {}
        self._phase_name = ""
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = 0

    # -- assembly ---------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the model's init; a replay with the same seed starts from the same weights
        self.data = self.task.load(cfg.data, cfg.seed)
        model = self.task.build_model(cfg.model, cfg.data)
        optimizer = cfg.optimizer.build(model.parameters())
        first = self.schedule[0]
        self.clan = Clan(model, optimizer, population_size=cfg.clan.population_size,
                         round_length=first.clan.get("round_length", cfg.clan.round_length),
                         duty_cycle=first.clan.get("duty_cycle", cfg.clan.duty_cycle), autobind=["adamw"],
                         genome_config=cfg.clan.genes, selection=cfg.clan.selection_arg, init=cfg.clan.init,
                         seed=cfg.seed, device=self.device)
        if cfg.clan.lr_grid:
            # A sweep over lr only: every other gene is held at the incumbent for every member.
            for name, value in self.clan.incumbent.items():
                values = cfg.clan.lr_grid if name == "lr" else [value.item()] * cfg.clan.population_size
                self.clan.set_genome(name, values)

    def _stream(self, batch_size: int):
        """An endless batch iterator over the training data (epochs back to back) for ``batch_size``."""
        if batch_size not in self._streams:
            loader = self.clan.loader(self.data.train, batch_size=batch_size)

            def endless():
                while True:
                    yield from loader

            self._streams[batch_size] = endless()
        return self._streams[batch_size]

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

    def _cooperative_step(self, member, batch) -> None:
        """One data-parallel step of identical members, outside the round clock (fused when enabled)."""
        if self.fused:
            self._after_step(self._fused().train_step(*batch, cooperative=True))
        else:
            self._after_step(self._train_step(member, batch, cooperative=True))

    def _round_step(self, member, batch) -> None:
        """One step of a clan round, advancing the round clock (fused when enabled)."""
        if self.fused:
            self._after_step(self._fused()(*batch))
        else:
            self._after_step(self._train_step(member, batch))
            member.step()

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
                           "round": self.clan.round_index, "best_val": self.best_val})

    def _record(self, record: dict) -> None:
        self.metrics.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.callback is not None and record["event"] != "step":
            self.callback(record)

    # -- phases -----------------------------------------------------------------------------------
    def _phase_hyper(self, phase: Phase) -> dict[str, float]:
        """The hyperparameters of a cooperative phase: the incumbent's, with the phase's overrides."""
        return phase_optimizer(phase.optimizer, {name: self.clan.incumbent[name].item() for name in ADAMW_FIELDS})

    def _run_cooperative(self, phase: Phase, steps: int) -> None:
        """``steps`` data-parallel steps of identical members, outside the round clock."""
        clan = self.clan
        member = clan.round()
        member.model.train()
        # Between rounds the clan sits at step 0 of its next round; the steps taken here leave
        # the round clock alone, average the gradients over the (identical) members, and train
        # with the phase's hyperparameters, written into the optimizer for the phase's length.
        hyper = self._phase_hyper(phase)
        with torch.no_grad():
            for gene, field in ADAMW_FIELDS.items():
                getattr(member.optimizer.hyper, field).fill_(hyper[gene])
        batch_size = phase.data.get("batch_size", self.config.data.batch_size)
        stream = self._stream(batch_size)
        start = self.clock.step
        with clan.cooperate():  # identical members trained as one model at batch P x B
            for _ in range(steps):
                self._cooperative_step(member, next(stream))
            val = self.task.population_losses(member.model, *self.data.eval)
        clan.reconfigure()  # writes the clan's own genes back into the optimizer
        # The members are identical again: make this the point a divergence restores to, so a
        # diverging round after this phase does not also undo it.
        clan.mark_restore_point()
        record = {"kind": "cooperative", "phase": phase.name, "start_step": start, "end_step": self.clock.step,
                  "hyper": hyper, "batch_size": batch_size * clan.population_size, "val_loss": val[0].item()}
        self.best_val = min(self.best_val, record["val_loss"])
        self.history.append(record)
        self._record({"event": "cooperative", **record})

    def _run_rounds(self, phase: Phase, first: int, steps: int) -> None:
        cfg, clan = self.config, self.clan
        round_length = phase.clan.get("round_length", cfg.clan.round_length)
        duty_cycle = phase.clan.get("duty_cycle", cfg.clan.duty_cycle)
        rounds, leftover = plan_rounds(steps, round_length, duty_cycle)
        batch_size = phase.data.get("batch_size", cfg.data.batch_size)
        stream = self._stream(batch_size)
        position = first
        for length in rounds:
            position += length
            if position <= self.clock.step:
                continue  # done before the checkpoint this run resumed from
            clan.reconfigure(round_length=length, duty_cycle=duty_cycle)
            cooperative_steps, start = clan.cooperative_steps, self.clock.step
            member = clan.round()
            member.model.train()
            for _ in range(length):
                self._round_step(member, next(stream))
            val = self.task.population_losses(member.model, *self.data.eval)
            record = dict(clan.step(val))
            record.update(kind="round", phase=phase.name, start_step=start, end_step=self.clock.step,
                          cooperative_steps=cooperative_steps, batch_size=batch_size,
                          population_size=clan.population_size)
            self.best_val = min(self.best_val, min(v for v in record["val_losses"] if math.isfinite(v))
                                if any(math.isfinite(v) for v in record["val_losses"]) else math.inf)
            self.history.append(record)
            self._record({"event": "round", **record})
            if self.out_dir is not None and cfg.checkpoint_every and clan.round_index % cfg.checkpoint_every == 0:
                self.checkpoint()
        if leftover:
            self._run_cooperative(dataclasses.replace(phase, optimizer={}), leftover)

    # -- running ----------------------------------------------------------------------------------
    def machine_state(self) -> dict:
        """The machine's own state as plain values (the clan's is saved next to it)."""
        return {"config": self.config.to_dict(), "clock": self.clock.state_dict(), "history": list(self.history),
                "metrics": list(self.metrics), "best_val": self.best_val, "loss_sum": self._loss_sum.item(),
                "loss_count": self._loss_count}

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, callback: Callable[[dict], None] | None = None,
               device: torch.device | str | None = None, fused: bool | Mapping = True) -> TrainingMachine:
        """A machine that continues the run whose ``checkpoint.pt`` is in ``run_dir``.

        Its :meth:`train` restores the clan (weights, optimizer, genomes, loader position, random
        generators) and the machine's clock, history and metrics, skips what was done, and ends
        with the same weights, genomes and history as the run would have without the interruption.
        ``metrics.jsonl`` is cut back to the checkpoint, so no record appears twice.

        Args:
            run_dir: The run directory given as ``out_dir`` to the interrupted run.
            callback: As for the constructor.
            device: As for the constructor.
            fused: As for the constructor (the numbers do not depend on it).

        Raises:
            FileNotFoundError: if ``run_dir`` has no checkpoint.
            ValueError: if the checkpoint is unreadable or of another format version.
        """
        state = load_run_checkpoint(Path(run_dir) / "checkpoint.pt")
        config = RunConfig.from_dict(state["machine"]["config"])
        machine = cls(config, out_dir=run_dir, callback=callback, device=device, fused=fused)
        machine._resume_state = state
        return machine

    def _restore(self, state: Mapping) -> None:
        saved = state["machine"]
        self.clan.load_state_dict(state["clan"])
        self.clock.load_state_dict(saved["clock"])
        self.history, self.metrics = list(saved["history"]), list(saved["metrics"])
        self.best_val = saved["best_val"]
        self._loss_sum.fill_(saved["loss_sum"])
        self._loss_count = saved["loss_count"]

    def checkpoint(self) -> Path:
        """Save ``checkpoint.pt`` into ``out_dir`` atomically (see :func:`save_run_checkpoint`).

        Raises:
            ValueError: if the machine has no ``out_dir`` or has not started.
        """
        if self.out_dir is None or self.clan is None:
            raise ValueError("TrainingMachine.checkpoint: needs an out_dir and a started run")
        path = self.out_dir / "checkpoint.pt"
        save_run_checkpoint(path, self.clan, self.machine_state())
        return path

    def train(self) -> TrainingResults:
        """Run every phase and return the results.

        Seeds torch's global generator with ``config.seed`` first (the model's initial weights
        and dropout draw from it), so a run is reproducible from its config.

        Raises:
            RuntimeError: if this machine has already trained.
            vmapclan.DivergenceError: if every member's validation loss is NaN or infinite.
        """
        if self.clan is not None:
            raise RuntimeError("TrainingMachine.train: this machine has already run; make a new one")
        start_time = time.perf_counter()
        self._build()
        resume = getattr(self, "_resume_state", None)
        if resume is not None:
            self._restore(resume)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # A resumed run rewrites the metrics up to its checkpoint: later lines were lost work.
            (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.metrics))
            if resume is None:
                self.checkpoint()  # a run stopped before its first round can resume too
        for phase, first, end in self.schedule.step_ranges(self.total_steps):
            if end == first or end <= self.clock.step:
                continue  # a phase shorter than half a step, or one finished before a resume
            self._phase_name = phase.name
            if phase.competition:
                self._run_rounds(phase, first, end - first)
            else:
                self._run_cooperative(phase, end - first)
            if self.out_dir is not None:
                self.checkpoint()
        final = self._final(time.perf_counter() - start_time)
        return TrainingResults(config=self.config, total_steps=self.total_steps, history=self.history,
                               metrics=self.metrics, final=final, best_model=self._best_model,
                               schedule=self._exported)

    def _final(self, seconds: float) -> dict:
        population = self.clan.population
        members = self.task.population_losses(population, *self.data.val)
        finite = torch.where(torch.isfinite(members), members, torch.full_like(members, math.inf))
        best = int(torch.argmin(finite).item())
        self._best_model = population.member_module(best).eval()
        scores = self.task.evaluate(self._best_model, *self.data.val)
        # A sweep's members never copy each other: the best one's own genes are its schedule.
        # With truncation the history does not say who copied whom, so each round's winner
        # stands in for the lineage (an approximation).
        self._exported = export_schedule(self.history, self.total_steps,
                                         member=best if self.config.clan.selection == "none" else None)
        final = {"event": "final", "step": self.clock.step, "val_loss": scores["loss"],
                 "val_accuracy": scores["accuracy"], "member_val_losses": members.tolist(), "best_member": best,
                 "rounds": sum(r["kind"] == "round" for r in self.history), "seconds": seconds,
                 "member_steps": self.total_steps * self.clan.population_size}
        self._record(final)
        return final
