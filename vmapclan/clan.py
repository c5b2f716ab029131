"""The Clan: a population of one model, trained in rounds of cooperation and competition.

Every rule that decides the model a clan returns lives here or in the pure functions it calls,
so a user's own loop, Lightning and the training machine get the same model from the same
settings (:class:`~vmapclan.settings.ClanSettings`):

- the round clock and, over a horizon, the plan of rounds, searches and cooperative stretches
  (:mod:`vmapclan.clock`, :func:`vmapclan.rounds.plan_stretches`);
- the lr in force at every step: the genes, times the time shape over the horizon, times the
  competitive share of a genome's lr (:attr:`Clan.lr_factor`);
- selection and the next generation (:func:`vmapclan.selection.select`), the divergence restore
  and the kept best incumbent (:mod:`vmapclan.snapshots`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence

import optree
import torch
from torch import nn

from .checks import check_device, positive_int
from .clan_state import FORMAT_VERSION, clan_state_dict, load_clan_state
from .clock import RoundClock, check_round_settings
from .cooperation import Cooperation
from .data import ClanLoader, LoaderState
from .distributed import check_clan_group, resolve_group
from .genepool import GenePool
from .genome import GRAD_ACCUM_GENE, gene_specs, optimizer_settings
from .growth import grow_population
from .member import Member
from .optim import ADAMW_FIELDS, BatchedAdamW, optimizer_ratios
from .population import PopulationModel, check_fits
from .rounds import COOPERATIVE
from .schedule import phase_optimizer
from .selection import check_val_losses, member_means
from .settings import DEFAULTS, ClanSettings, check_independent_start
from .snapshots import KeptIncumbent, RestorePoint

__all__ = ["Clan", "Member", "DivergenceError", "FORMAT_VERSION"]

_TORCH_ADAMW = {"lr": 1e-3, "weight_decay": 1e-2, "betas/0": 0.9, "betas/1": 0.999, "eps": 1e-8}


class DivergenceError(RuntimeError):
    """Every member's validation loss is NaN or infinite: there is no member to select."""


class Clan:
    """A population of P members of one model, evolving their hyperparameters in rounds.

    Training time is a sequence of rounds of ``round_length`` steps (``member.step()`` calls).
    The first ``round_length - C`` steps are *cooperative*: all members hold the same weights and
    the incumbent genome, each gets its own shard of data, and ``sync_context()`` averages
    their gradients (data-parallel training at batch ``P x B``). The last
    ``C = max(1, floor(duty_cycle * round_length + 0.5))`` steps are *competitive*: each member
    trains with its own genome (member 0 the incumbent, the others mutations of it) on the same
    data. ``clan.step(val_losses)`` then selects: with ``selection="winner"`` every member takes
    the best member's parameters, buffers and optimizer state, and its genome becomes the
    incumbent.

    With ``total_steps`` (the steps the loop will run) the clan follows a plan over that horizon
    (``schedule``; by default :func:`~vmapclan.schedule.default_schedule`: a search over the lr
    for the first 10%, then clan rounds), shapes every step's lr in time (cosine with a 5%
    warmup by default) and keeps its best incumbent: the settings the training machine runs
    with, so that a loop of your own gets the same model. :attr:`done` says when the plan is over.

    Args:
        model: The model to train (copied; the original is not trained in place). ``None``
            makes a genome-only clan that evolves genes for the user's own training code.
        optimizer: A ``torch.optim.AdamW`` (or ``torch.optim.Adam`` with ``weight_decay=0``) over
            ``model``'s trainable parameters, in any number of param groups (frozen parameters
            may be in it; they are skipped). Its values seed the incumbent genome and fix the
            hyperparameters that are not genes; the lr and weight-decay genes scale every group
            in proportion (the README's "What models work").
        autobind: ``"adamw"`` adds genes lr, weight_decay, betas/0, betas/1, eps;
            ``"gradient_accumulation"`` adds num_grad_accum.
        genome_config: ``{name: Gene | dict}``: more genes, or overrides of autobound ones (a dict
            updates the autobound spec's fields).
        device: Where the members live (default: the model's device).
        process_group: The ``torch.distributed`` group whose ranks share the population (default:
            the default group when ``torch.distributed`` is initialised, e.g. under ``torchrun``).
            Each of its ``W`` ranks holds ``population_size / W`` members (``local_size``, from
            global index ``member_offset``): ``member.model``, the loader's batches and the
            ``val_losses`` given to :meth:`step` are this rank's; genomes and history are the whole
            clan's, the same on every rank. Every rank must build the same clan (checked) and run
            the same steps. See :mod:`vmapclan.distributed`.
        population_size, round_length, duty_cycle, selection, truncation_fraction, init, seed,
            max_grad_norm, on_divergence, max_restores, confidence, total_steps, schedule,
            lr_schedule, warmup, decay, competitive_lr, keep_best: The clan's settings, each
            described (with its default) by :class:`~vmapclan.settings.ClanSettings`, which the
            clan holds as :attr:`settings`.

    Example:
        >>> clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), population_size=8,
        ...             autobind=["adamw"], total_steps=3000)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 population_size: int = DEFAULTS.population_size, round_length: int = DEFAULTS.round_length,
                 duty_cycle: float = DEFAULTS.duty_cycle, autobind: Sequence[str] | str = (),
                 genome_config: Mapping | None = None, selection: str | None = DEFAULTS.selection,
                 truncation_fraction: float = DEFAULTS.truncation_fraction, init: str = DEFAULTS.init,
                 seed: int = DEFAULTS.seed, device: torch.device | str | None = None, max_grad_norm: float | None = None,
                 on_divergence: str = DEFAULTS.on_divergence, max_restores: int = DEFAULTS.max_restores,
                 confidence: float | None = None, total_steps: int | None = None, schedule=None,
                 lr_schedule: str | None = None, warmup: float | None = None, decay: float | None = None,
                 competitive_lr: str = DEFAULTS.competitive_lr, keep_best: bool = DEFAULTS.keep_best,
                 process_group=None):
        #: The settings the clan was built from, checked (:class:`~vmapclan.settings.ClanSettings`).
        self.settings = s = ClanSettings(
            population_size=population_size, round_length=round_length, duty_cycle=duty_cycle, selection=selection,
            truncation_fraction=truncation_fraction, init=init, seed=seed, max_grad_norm=max_grad_norm,
            on_divergence=on_divergence, max_restores=max_restores, confidence=confidence, total_steps=total_steps,
            schedule=schedule, lr_schedule=lr_schedule, warmup=warmup, decay=decay, competitive_lr=competitive_lr,
            keep_best=keep_best)
        self.population_size = s.population_size
        #: The ranks sharing the population (:class:`~vmapclan.distributed.ClanGroup`), ``None`` in one process.
        self.group = resolve_group(process_group, s.population_size)
        self.world_size = 1 if self.group is None else self.group.world_size
        #: This rank's members: ``local_size`` of them, global indices from ``member_offset`` (``members``).
        self.local_size = s.population_size // self.world_size
        self.member_offset = 0 if self.group is None else self.group.offset
        self.members = slice(self.member_offset, self.member_offset + self.local_size)
        if device is not None:
            device = check_device(device, "Clan")
        ratios = optimizer_ratios(optimizer, model)
        genes = gene_specs(autobind, optimizer, genome_config)
        self.settings = s = s.for_genes(genes)
        self.clock = RoundClock.from_settings(s)
        if model is not None:
            check_independent_start(s.init, self.clock.duty_cycle)
        check_fits(self.local_size, model, len(genes), device)
        #: The genes, incumbent, genomes and their generator (:class:`~vmapclan.genepool.GenePool`).
        self.genepool = GenePool(genes, s.population_size, s.seed)  # draws the first generation's mutations
        self._constants = optimizer_settings(optimizer) if optimizer is not None else dict(_TORCH_ADAMW)
        if self.group is not None:
            check_clan_group(self.group, selection=s.selection, init=s.init, model=model,
                             settings=repr((self.state_config(), s.to_dict())))
        #: Gradient averaging, its checks and the one-model switch (:class:`~vmapclan.cooperation.Cooperation`).
        self.cooperation = Cooperation(self)
        self._lr_written: float | None = None  # the lr factor last written into the optimizer
        self.population: PopulationModel | None = None
        self.optimizer: BatchedAdamW | None = None
        if model is not None:
            self._build_population(model, ratios, device)
        else:
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        loader_seed = int(torch.randint(2**62, (1,), generator=self.genepool.generator).item())
        self._loader_state = LoaderState(torch.Generator().manual_seed(loader_seed))
        self.history: list[dict] = []
        #: What divergence goes back to, and the best incumbent kept (:mod:`vmapclan.snapshots`).
        self.restore_point, self.kept = RestorePoint(), KeptIncumbent()
        self.mark_restore_point()
        self._enter_stretch()

    def _build_population(self, model: nn.Module, ratios, device) -> None:
        s = self.settings
        self.population = PopulationModel(model, self.local_size, init=s.init, generator=self.genepool.generator,
                                          device=device)
        self.device = self.population.device
        self.optimizer = BatchedAdamW.for_population(
            self.population, self._constants, accumulate=GRAD_ACCUM_GENE in self.genes, max_grad_norm=s.max_grad_norm,
            ratios=ratios, lr_factor=s.shapes_lr)  # the lr factor: written before each step (see _shape_lr)
        self.cooperation.bind(self.population)

    # -- settings -------------------------------------------------------------------------------
    selection = property(lambda self: self.settings.selection, doc="``\"winner\"``, ``\"truncation\"`` or ``None``.")
    truncation_fraction = property(lambda self: self.settings.truncation_fraction, doc="Truncation's quantile.")
    init = property(lambda self: self.settings.init, doc="``\"copy\"`` or ``\"independent\"``.")
    seed = property(lambda self: self.settings.seed, doc="The clan's seed.")
    on_divergence = property(lambda self: self.settings.on_divergence, doc="``\"restore\"`` or ``\"raise\"``.")
    max_restores = property(lambda self: self.settings.max_restores, doc="Consecutive restores allowed.")
    confidence = property(lambda self: self.settings.confidence, doc="The paired test's confidence, or ``None``.")
    total_steps = property(lambda self: self.settings.total_steps, doc="The horizon, or ``None``.")
    round_length = property(lambda self: self.clock.round_length, doc="Steps of the current round.")
    duty_cycle = property(lambda self: self.clock.duty_cycle, doc="The current round's competitive share.")
    competitive_steps = property(lambda self: self.clock.competitive_steps, doc="The round's competitive steps.")
    cooperative_steps = property(lambda self: self.clock.cooperative_steps, doc="The round's cooperative steps.")

    genes = property(lambda self: self.genepool.genes, doc="The gene specs, ``{name: Gene}``.")
    incumbent = property(lambda self: self.genepool.incumbent, doc="``{name: 0-d tensor}``: the genome shared while cooperating.")
    genomes = property(lambda self: self.genepool.genomes, doc="``{name: tensor[P]}``: every member's own genome.")

    plan = property(lambda self: self.clock.plan, doc="The stretches of the plan over the horizon (empty without one).")
    stretch = property(lambda self: self.clock.current, doc="The plan's stretch in force (``None`` without one, or "
                       "once it is done).")

    def state_config(self) -> dict:
        """The settings a saved state records and a clan loading it must share (the round settings excepted)."""
        return self.settings.state_config(self.genes, self.round_length, self.duty_cycle, self._constants)

    # -- genes and the lr in force --------------------------------------------------------------
    def _stretch_hyper(self) -> dict[str, float]:
        """The AdamW settings of a cooperative stretch: the incumbent's, with its phase's overrides."""
        incumbent = {g: self.incumbent[g].item() if g in self.incumbent else self._constants[g] for g in ADAMW_FIELDS}
        return phase_optimizer(self.settings.schedule[self.stretch.index].optimizer, incumbent)

    def genes_in_force(self) -> dict[str, torch.Tensor]:
        """The genes in force for this rank's members, ``{name: [local_size]}`` (see :meth:`GenePool.in_force`)."""
        overrides = self._stretch_hyper() if self.clock.in_cooperative_stretch else None
        return self.genepool.in_force(self.cooperating, self.members, overrides)  # cooperate() too: one model

    lr_factor = property(lambda self: self.settings.lr_factor(self.time_step, self.cooperating), doc="The factor on "
                         "every member's lr at the next step: the time shape times the competitive share.")

    def _shape_lr(self) -> None:
        factor = self.optimizer.lr_factor if self.optimizer is not None else None
        if factor is not None and (value := self.lr_factor) != self._lr_written:
            factor.fill_(value)  # the next step's factor; written only when it changes (a write costs a kernel)
            self._lr_written = value

    def _refresh(self) -> None:
        """Enter the current phase: the members train as one model while cooperating, the genes in force
        go into the optimizer's ``[P]`` tensors, and the lr factor follows."""
        if self.optimizer is None:
            return
        self.cooperation.train_as_one(self.clock.cooperating)
        stretch = self._stretch_hyper() if self.clock.in_cooperative_stretch else None  # read once: .item() syncs
        genes = self.genepool.in_force(self.phase == COOPERATIVE, self.members, stretch)
        self.optimizer.set_genes(genes, self._constants if stretch is None else stretch)
        self._shape_lr()

    def set_genome(self, name: str, values) -> None:
        """Set gene ``name`` of every member (``[P]`` values within the gene's bounds), e.g. for a sweep.

        The values take effect at once in the competitive phase (and in the next one otherwise).
        """
        self.genepool.set(name, values)
        self._refresh()

    # -- the round clock ------------------------------------------------------------------------
    phase = property(lambda self: self.clock.phase, doc="``\"cooperative\"`` or ``\"competitive\"``: the current "
                     "step's phase (a done round stays in its last).")
    cooperating = property(lambda self: self.clock.cooperating, doc="Whether the next step trains the members as one "
                           "data-parallel model (a cooperative phase or stretch, or inside :meth:`cooperate`).")
    round_done = property(lambda self: self.clock.round_done, doc="Whether the current round (or cooperative "
                          "stretch) has run all its steps: time for :meth:`step`.")

    def phase_ahead(self, steps: int) -> str:
        """The phase of the step ``steps`` after the next one to run (past the round's end: in the next rounds,
        by the plan with a horizon, else by the current round settings)."""
        return self.clock.phase_ahead(steps)

    def cooperating_ahead(self, steps: int) -> bool:
        """Whether the step ``steps`` after the next one trains the members as one data-parallel model."""
        return self.clock.cooperating_ahead(steps)

    round_index = property(lambda self: self.clock.round, doc="Rounds completed so far (the current round's number).")
    step_in_round = property(lambda self: self.clock.round_step, doc="Steps of the current round so far.")
    global_step = property(lambda self: self.clock.global_step,
                           doc="Steps of clan rounds since the start (a cooperative stretch's count in time_step only).")
    time_step = property(lambda self: self.clock.time_step, doc="Steps trained since the start, every kind.")
    done = property(lambda self: self.clock.done, doc="Whether the plan over the horizon has run to its end.")

    def reconfigure(self, *, round_length: int | None = None, duty_cycle: float | None = None) -> None:
        """Change the round settings between rounds (a clan without a horizon; a plan sets its own).

        Args:
            round_length: New steps per round (default: unchanged).
            duty_cycle: New competitive fraction, in (0, 1] (default: unchanged).

        Raises:
            RuntimeError: in the middle of a round, or for a clan that follows a plan.
            ValueError: for settings ``Clan`` itself would refuse.
        """
        if self.plan:
            raise RuntimeError("Clan.reconfigure: this clan follows the plan of its schedule over total_steps="
                               f"{self.total_steps}; give the phases their round settings instead")
        if self.step_in_round != 0:
            raise RuntimeError(f"Clan.reconfigure: only between rounds; round {self.round_index} is at step "
                               f"{self.step_in_round}")
        round_length = self.round_length if round_length is None else positive_int(round_length, "Clan: round_length")
        duty_cycle = self.duty_cycle if duty_cycle is None else duty_cycle
        check_round_settings(round_length, duty_cycle, self.selection)
        if self.round_index == 0 and self.population is not None:
            check_independent_start(self.init, duty_cycle)
        self.clock.set_round(round_length, duty_cycle)
        self._refresh()

    def round(self) -> Member:
        """The view of the current round. No side effects: calling it twice gives equal views."""
        return Member(self, self.round_index)

    def loader(self, dataset, batch_size: int, *, device: torch.device | str | None = None) -> ClanLoader:
        """A loader yielding ``[P, B, ...]`` batches as the phase requires (see :class:`ClanLoader`)."""
        return ClanLoader(self, dataset, batch_size, device=device)

    loader_state = property(lambda self: self._loader_state, doc="The position and generator of the clan's data "
                            "order, shared by all its loaders (part of the state).")

    def advance(self) -> None:
        """Count one training step (``member.step()``, :class:`~vmapclan.FusedStep`): a round's moves the
        round clock, a cooperative stretch's (or one inside :meth:`cooperate`) only the time.

        Raises:
            RuntimeError: if the round is done (call :meth:`step` first), or the plan is.
        """
        if self.clock.advance():
            self._refresh()  # entering the competitive phase: each member's own genome
        else:
            self._shape_lr()

    def _enter_stretch(self) -> None:
        """Take up the plan's stretch in force (a search round gets its spread of lrs), then its phase."""
        stretch = self.stretch
        if stretch is not None and stretch.search is not None:
            self.genepool.search(stretch.search)
        self._refresh()

    def _move_on(self, *, new_round: bool = True, next_stretch: bool = True) -> None:
        """After a round, a cooperative stretch or a restore: the next round and stretch of the plan, a restore point."""
        if new_round:
            self.clock.next_round()
        if next_stretch and self.plan:
            self.clock.enter(self.clock.stretch + 1)
        self.mark_restore_point()
        self._enter_stretch()

    # -- one model while cooperating ----------------------------------------------------------
    def sync_members(self) -> None:
        """Bring every member's rows up to date with member 0's (:meth:`~vmapclan.PopulationModel.sync_rows`):
        before reading the raw ``flat``/``grad_flat`` buffers or the moments while cooperating."""
        if self.population is not None:
            self.population.sync_rows()

    @contextlib.contextmanager
    def cooperate(self):
        """Train the identical members as one data-parallel model outside the round clock (a warmup, an anneal).

        Each step inside averages the gradients, doing one model's work at batch ``P x B``
        (:attr:`~vmapclan.PopulationModel.one_model`), whatever the round's phase; a step counted
        inside (:meth:`advance`) moves the time, not the round clock. A clan with a horizon plans
        its cooperative stretches itself (``clan.competition = False`` in a phase).

        Raises:
            RuntimeError: in the middle of a round, or for a clan that follows a plan.
        """
        if self.plan:
            raise RuntimeError("Clan.cooperate: this clan follows the plan of its schedule over total_steps="
                               f"{self.total_steps}; give it a phase with clan.competition = False instead")
        if self.step_in_round != 0:
            raise RuntimeError(
                f"Clan.cooperate: only between rounds, where the members are copies of one; round "
                f"{self.round_index} is at step {self.step_in_round}"
            )
        self.clock.held = True
        self.cooperation.train_as_one(True)
        self._shape_lr()
        try:
            yield
        finally:
            self.clock.held = False
            self.cooperation.train_as_one(self.cooperating)
            self._shape_lr()

    def sync_context(self, *, cooperative: bool | None = None):
        """Context for ``backward()``: on exit, averages the gradients over members when cooperating.

        Args:
            cooperative: Whether to average; default: whether the current step is cooperative
                (what ``member.sync_context()`` does), or the members train as one model
                (inside :meth:`cooperate`). See :class:`~vmapclan.cooperation.Cooperation`.
        """
        return self.cooperation.sync_context(cooperative=cooperative)

    # -- growth ---------------------------------------------------------------------------------
    def grow(self, fn) -> None:
        """Rebuild the population with a larger model, every member grown by ``fn`` with its state carried over.

        Between rounds only. ``fn(module) -> nn.Module`` grows each member given as a plain
        module (:func:`vmapclan.growth.grow_population` says what carries over and what is
        refused). The grown state becomes the restore point, and a kept incumbent (another
        architecture) is forgotten. :attr:`population` and :attr:`optimizer` are new objects
        afterwards: make a new :class:`~vmapclan.FusedStep`.

        Raises:
            ValueError, TypeError: for a genome-only clan, or a growth ``grow_population`` refuses.
            RuntimeError: in the middle of a round.
        """
        if self.population is None:
            raise ValueError("Clan.grow: this clan has no model (a genome-only clan)")
        if self.step_in_round != 0:
            raise RuntimeError(f"Clan.grow: only between rounds; round {self.round_index} is at step "
                               f"{self.step_in_round}")
        self.population, self.optimizer = grow_population(self.population, self.optimizer, fn, device=self.device)
        self.cooperation.bind(self.population)
        self.kept.forget()
        self.mark_restore_point()

    # -- selection ------------------------------------------------------------------------------
    def _losses(self, val_losses, *, paired_test: bool) -> torch.Tensor:
        """The whole clan's losses from this rank's ``val_losses`` (checked: :func:`~vmapclan.selection.check_val_losses`)."""
        losses = check_val_losses(val_losses, self.local_size, paired_test=paired_test,
                                  population_size=self.population_size)
        if self.group is not None:  # every rank ranks the whole population's losses, in the same order
            losses = self.group.all_gather(losses, "selection's all-gather of the validation losses")
        return losses

    def step(self, val_losses) -> dict:
        """End the round: select on ``val_losses`` (lower is better), mutate, start the next round.

        ``val_losses`` is ``[P]`` or ``[P, K]`` (every member's losses on the same K samples or
        blocks; a member's loss is its row's mean), ranked by :func:`~vmapclan.selection.select`
        (with ``confidence``: paired ``[P, K]``, and the record holds the best challenger's
        ``gain`` and ``confidence``). At a cooperative stretch's end (identical members, no
        selection) they give its validation loss, for keep-best. Returns the history record.

        Raises:
            RuntimeError: if the round is not done, or the plan is.
            ValueError, TypeError: for losses of the wrong shape or type.
            DivergenceError: if every loss is NaN or infinite and the clan cannot restore (see
                ``on_divergence`` and ``max_restores``; restoring needs a model and winner selection).
        """
        if self.done:
            raise RuntimeError(f"clan.step(): the clan's schedule is done ({self.total_steps} steps)")
        if not self.round_done:
            where = (f"step {self.time_step} of the cooperative stretch {self.stretch.start}-{self.stretch.end}"
                     if self.clock.in_cooperative_stretch else
                     f"step {self.step_in_round} of {self.round_length} in round {self.round_index}")
            raise RuntimeError(f"clan.step() called at {where}: the round is not done (check member.done)")
        if self.clock.in_cooperative_stretch:
            return self._end_cooperative(val_losses)
        paired = self._losses(val_losses, paired_test=self.confidence is not None)
        losses = member_means(paired) if paired.dim() == 2 else paired
        if not bool(torch.isfinite(losses).any()):
            return self.restore(losses)
        out = self.genepool.select(paired, selection=self.selection, truncation_fraction=self.truncation_fraction,
                                   confidence=self.confidence)
        if self.population is not None and not torch.equal(out.sources, torch.arange(self.population_size)):
            if self.group is not None:  # winner selection: its owner sends the winner's row to every member
                self.group.broadcast_row_(self.population.member_state(), out.winner,
                                          "selection's broadcast of the winner")
            else:
                index = out.sources.to(self.device)
                with torch.no_grad():
                    optree.tree_map(lambda t: t.copy_(t.index_select(0, index)), self.population.member_state())
        record = {"round": self.round_index, "step": self.global_step, **out.record, **self._round_fields()}
        self.history.append(record)
        self.restore_point.restores = 0
        self.keep(record["val_losses"][out.winner])
        self._move_on()
        return record

    def _round_fields(self) -> dict:
        """What a round's record says of the plan (:meth:`RoundClock.record_fields`) and of a genome's lr share."""
        share = self.settings.competitive_share  # the export gives the competitive steps this share of the lr
        return {**self.clock.record_fields(self.settings.schedule), **({"competitive_lr_scale": share} if share != 1.0
                                                                       else {})}

    def _stretch_record(self, val_loss: float) -> dict:
        return {**self.clock.record_fields(self.settings.schedule), "hyper": self._stretch_hyper(), "val_loss": val_loss}

    def _end_cooperative(self, val_losses) -> dict:
        """The end of a cooperative stretch: its record and keep-best, or a restore if it diverged."""
        losses = self._losses(val_losses, paired_test=False)
        losses = member_means(losses) if losses.dim() == 2 else losses
        if not bool(torch.isfinite(losses).all()):
            return self.restore()
        record = self._stretch_record(losses[0].item())
        self.history.append(record)
        self.keep(record["val_loss"])
        self._move_on(new_round=False)  # the members are identical and finite: a restore point
        return record

    # -- divergence and the kept best -----------------------------------------------------------
    def member_state(self) -> dict:
        """The member-major tensors as one pytree, rows up to date (:meth:`~vmapclan.PopulationModel.member_state`;
        ``{}`` for a genome-only clan): selection, the restore point and the state dict are one tree operation each."""
        return {} if self.population is None else self.population.member_state()

    def mark_restore_point(self) -> None:
        """Make the current state the one a divergence restores to (done at every round start and stretch end).

        Only with winner selection, where every member starts the round as a copy of member 0,
        so one row of each tensor is the whole population's state.
        """
        if self.population is None or self.selection != "winner":
            return
        self.restore_point.mark(self.population.member_state(sync=False), self.round_index, self.incumbent)

    def restore(self, losses: torch.Tensor | None = None) -> dict:
        """Undo a divergence: back to the restore point (the last good round's start or stretch's end), half the lr.

        :meth:`step` does it when every member's loss is NaN or infinite, and a driver that finds
        a cooperative stretch diverged before its end calls it (the training machine checks every
        few steps). The steps since the restore point are lost; a cooperative stretch goes on.

        Args:
            losses: The round's ``[P]`` losses, for the record (``None``: NaN for every member).

        Returns:
            The ``"diverged"`` record added to the history.

        Raises:
            DivergenceError: with ``on_divergence="raise"``, without a restore point (no model,
                or not winner selection), or after ``max_restores`` restores in a row.
            RuntimeError: in the middle of a round, or once the plan is done.
        """
        point, clock, stretch = self.restore_point, self.clock, self.stretch
        cooperative = clock.in_cooperative_stretch
        if self.done or not (cooperative or self.round_done):
            raise RuntimeError("Clan.restore: only at a round's end or inside a cooperative stretch of the plan")
        if cooperative:
            message = (f"phase {self.settings.schedule[stretch.index].name!r} (cooperative, steps {stretch.start}-"
                       f"{stretch.end}): the training loss or the weights became NaN or infinite by step "
                       f"{self.time_step}")
        else:
            losses = torch.full((self.population_size,), math.nan, dtype=torch.float64) if losses is None else losses
            message = (f"clan.step: every member's validation loss is NaN or infinite in round {self.round_index}: "
                       f"{losses.tolist()}")
        if point.saved is None or self.on_divergence == "raise":
            raise DivergenceError(message)
        if point.restores >= self.max_restores:
            raise DivergenceError(f"{message}; gave up after {point.restores} consecutive restores")
        used = {n: v.tolist() for n, v in self.genomes.items()}
        point.restore(self.population)
        self.genepool.restart(point.saved["incumbent"])
        if cooperative:  # the stretch's record, in the place of the round's
            record = self._stretch_record(math.nan)
        else:
            record = {"round": self.round_index, "step": self.global_step, "genomes": used,
                      "val_losses": losses.tolist(), "winner": None,
                      "incumbent": {n: v.item() for n, v in self.incumbent.items()}, **self._round_fields()}
        record.update(event="diverged", restored_round=point.saved["round"])
        self.history.append(record)
        warnings.warn(f"vmapclan: the whole population diverged in round {self.round_index}; restored the state "
                      f"of the start of round {point.saved['round']} with lr "
                      f"{self.incumbent['lr'].item() if 'lr' in self.incumbent else 'unchanged'}",
                      RuntimeWarning, stacklevel=3)
        # The next round; a cooperative stretch goes on from here (and ends, if this was its end).
        ended = cooperative and self.round_done
        self._move_on(next_stretch=not cooperative or ended)  # its restore point: the restored state, half the lr
        if cooperative and not ended:
            clock.record_start = self.time_step
        return record

    def keep(self, val_loss: float) -> None:
        """With ``keep_best``: keep member 0, the incumbent, if ``val_loss`` is the lowest validation loss yet.

        :meth:`step` offers it at every round's and cooperative stretch's end; call it after
        scoring the incumbent at another time (the training machine does after a restore).
        """
        if not self.settings.keep_best or self.selection != "winner" or self.population is None:
            return

        def row():
            self.population.sync_rows()
            return self.population.member_row(0)

        self.kept.offer(float(val_loss), self.time_step, row)

    # -- results --------------------------------------------------------------------------------
    def best_model(self) -> nn.Module:
        """A new plain ``nn.Module`` with member 0's current weights (after selection, the winner's)."""
        if self.population is None:
            raise ValueError("Clan.best_model: this clan has no model (a genome-only clan)")
        return self.population.member_module(0)

    def kept_model(self) -> nn.Module | None:
        """A new plain ``nn.Module`` of the kept incumbent (``keep_best``; ``None`` before one is kept): the
        lowest validation loss at any round's or stretch's end. Compare it with :meth:`best_model` on
        held-out data and take the better (the training machine does, on its whole validation split)."""
        if self.population is None:
            raise ValueError("Clan.kept_model: this clan has no model (a genome-only clan)")
        return None if self.kept.saved is None else self.population.member_module(0, row=self.kept.saved["row"])

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly, as a plain dict of tensors and values (:mod:`vmapclan.clan_state`).

        Weights, gradients (partial accumulation sums), buffers, optimizer moments and counters,
        genomes, the incumbent, the round clock and the plan's position, the kept incumbent, the
        loader's position, the generators, torch's global RNG state (dropout draws from it) and
        the history. Across ranks a collective: every rank returns the whole clan's state (save it
        from rank 0; any number of ranks that divides ``population_size`` can load it).
        """
        return clan_state_dict(self)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` in place (loaders, member views and the optimizer stay valid).

        Torch's global RNG state too, so dropout continues as in the saved run. Every part checks
        its own entries before anything is copied (:func:`vmapclan.clan_state.load_clan_state`),
        and a state of an earlier format is upgraded first; across ranks, each takes its members' rows.

        Raises:
            ValueError: for another format version, clan configuration or model, or a value no
                clan can hold, naming the entry.
        """
        upgraded = load_clan_state(self, state)
        stretch = self.stretch
        if upgraded and stretch is not None and self.time_step == stretch.start and self.step_in_round == 0:
            self.clock.enter(self.clock.stretch)  # saved before the stretch was taken up: take it up now
            self._enter_stretch()
        else:
            self._refresh()
