"""The Clan: a population of one model, trained in rounds of cooperation and competition."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import optree
import torch
from torch import nn

from .data import ClanLoader, LoaderState
from .distributed import resolve_group
from .genome import GRAD_ACCUM_GENE, Gene, autobind_genes, check_genome, group_ratios, is_adamw, mutate, optimizer_settings
from .gradients import reduce_gradients_
from .optim import ADAMW_FIELDS, AdamWHyper, BatchedAdamW, group_scales
from .population import PopulationModel
from .rounds import COOPERATIVE, competitive_steps, phase_at, round_problem
from .selection import member_means, paired_winner, rank, truncation_sources

__all__ = ["Clan", "Member", "DivergenceError", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _with_skipped(optimizer, like: torch.Tensor):
    """A saved optimizer table, with all-zero ``skipped`` counts if it predates them (nothing sat out)."""
    if not isinstance(optimizer, Mapping) or "skipped" in optimizer:
        return optimizer
    return {**optimizer, "skipped": torch.zeros_like(like)}


class DivergenceError(RuntimeError):
    """Every member's validation loss is NaN or infinite: there is no member to select."""


def check_device(device, who: str) -> torch.device:
    """``device`` as a ``torch.device``, refusing a name torch does not know or a device it cannot use.

    Args:
        device: A device or its name (``"cpu"``, ``"cuda:0"``).
        who: The caller, for the message (``"Clan"``).

    Raises:
        ValueError: naming the device and why it cannot be used (e.g. a torch built without CUDA).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{who}: device must be a device such as 'cpu' or 'cuda', got {device!r} ({err})") from None
    try:
        torch.empty(0, device=device)  # torch raises AssertionError for CUDA on a CPU-only build
    except (RuntimeError, AssertionError) as err:
        if device.type == "cuda" and not torch.backends.cuda.is_built():
            reason = f"this torch ({torch.__version__}) is built without CUDA"
        else:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{who}: device {str(device)!r} cannot be used: {reason}") from None
    return device


def _check_fits(population_size: int, model: nn.Module | None, genes: int, device: torch.device | None) -> None:
    """Refuse a population that cannot fit in the memory of its device, before allocating any of it.

    Each member holds its weights, gradients and two AdamW moments (about four copies of the
    model) and its genes; allocating far more than the device has would fail deep inside torch,
    or get the process killed by the operating system instead of raising.
    """
    values = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 4 if model is not None else 0
    need = population_size * (values + 8 * 3 * max(genes, 1))
    device = device if device is not None else (next(iter(model.parameters()), torch.empty(0)).device
                                                if model is not None else torch.device("cpu"))
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if need > have:
        raise ValueError(f"Clan: population_size={population_size} needs about {need / 2**30:.3g} GiB on {device}, "
                         f"more than its {have / 2**30:.3g} GiB")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Clan: {name} must be a positive int, got {value!r}")
    return value


def _check_round_settings(round_length: int, duty_cycle, selection) -> None:
    if isinstance(duty_cycle, bool) or not isinstance(duty_cycle, (int, float)) or not 0 < duty_cycle <= 1:
        raise ValueError(f"Clan: duty_cycle must be in (0, 1], got {duty_cycle!r}")
    problem = round_problem(round_length, duty_cycle)
    if problem is not None:
        raise ValueError(f"Clan: {problem}")
    if selection != "winner" and duty_cycle != 1:
        raise ValueError(
            f"Clan: selection={selection!r} keeps members that differ, so it needs duty_cycle=1.0 "
            f"(a cooperative phase averages gradients over identical members), got {duty_cycle}"
        )


def _check_optimizer(optimizer, model: nn.Module) -> list[tuple[float, float]]:
    """Check the user's optimizer; return each trainable parameter's group ``(lr, wd)`` ratios, in model order."""
    if not is_adamw(optimizer):
        raise TypeError(
            f"Clan: the optimizer must be torch.optim.AdamW or torch.optim.Adam (the population trains with a "
            f"batched AdamW), got {type(optimizer).__name__}"
        )
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    for k, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"Clan: AdamW({flag}=True) is not supported by the batched AdamW")
        if not decoupled and not group.get("decoupled_weight_decay") and group["weight_decay"] != 0:
            # torch's Adam adds weight_decay * p to the gradient (L2), before the moments: another update.
            raise ValueError(
                f"Clan: torch.optim.Adam(weight_decay={group['weight_decay']}) adds the decay to the gradient (L2), "
                "which the batched AdamW does not do; use torch.optim.AdamW (decoupled weight decay) or Adam with "
                f"weight_decay=0 (param group {k})"
            )
    ratios = group_ratios(optimizer)
    group_of: dict[int, int] = {}
    for k, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = k
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in group_of]
    if missing:
        raise ValueError(f"Clan: parameters missing from the optimizer: {missing}")
    # Frozen parameters may sit in the optimizer (AdamW(model.parameters())): torch skips them, and so does the clan.
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    strangers = [i for i in group_of if i not in trainable and i not in frozen]
    if strangers:
        raise ValueError(f"Clan: the optimizer holds {len(strangers)} tensors that are not parameters of the model")
    return [ratios[group_of[i]] for i in trainable]


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

    Args:
        model: The model to train (copied; the original is not trained in place). ``None``
            makes a genome-only clan that evolves genes for the user's own training code.
        optimizer: A ``torch.optim.AdamW`` (or ``torch.optim.Adam`` with ``weight_decay=0``) over
            ``model``'s trainable parameters, in any number of param groups (frozen parameters
            may be in it; they are skipped). Its values seed the incumbent genome and fix the
            hyperparameters that are not genes; the lr and weight-decay genes scale every group
            in proportion (the README's "What models work").
        population_size: P.
        round_length: Steps per round.
        duty_cycle: Fraction of the round that is competitive, in (0, 1]. ``1.0`` is classic
            PBT (always competitive).
        autobind: ``"adamw"`` adds genes lr, weight_decay, betas/0, betas/1, eps;
            ``"gradient_accumulation"`` adds num_grad_accum.
        genome_config: ``{name: Gene | dict}``: more genes, or overrides of autobound ones (a dict
            updates the autobound spec's fields).
        selection: ``"winner"`` (default), ``"truncation"`` (bottom quantile copies the top, then
            mutates; needs ``duty_cycle=1``) or ``None`` (a vectorized sweep; needs ``duty_cycle=1``).
        truncation_fraction: The quantile for ``"truncation"``, in (0, 0.5].
        init: ``"copy"`` or ``"independent"`` member weights (see :class:`PopulationModel`).
        seed: Seeds mutations, independent init and the loader's permutations.
        device: Where the members live (default: the model's device).
        max_grad_norm: Optional per-member gradient-norm clipping before each update.
        on_divergence: What ``clan.step`` does when every member's validation loss is NaN or
            infinite (with ``selection="winner"`` and a model): ``"restore"`` (default) goes back to
            the weights, optimizer state and incumbent of the start of the last good round, halves
            the incumbent's lr (within its bounds), records the event in the history and warns;
            ``"raise"`` raises :class:`DivergenceError`.
        max_restores: Consecutive restores allowed before :class:`DivergenceError` is raised anyway.
        confidence: With winner selection, adopt a challenger only when its gain over member 0
            (the control, which trained with the unmutated incumbent) is significant at this
            family-wise confidence, in (0, 1): ``clan.step`` then takes paired losses ``[P, K]``
            (every member scored on the same K samples or blocks of samples) and decides by a
            one-sided paired t-test per challenger, Bonferroni-corrected over the P - 1 of them
            (:func:`vmapclan.selection.paired_winner`). ``None`` (default): the lowest mean loss
            wins, however small its lead.
        process_group: The ``torch.distributed`` group whose ranks share the population (default:
            the default group when ``torch.distributed`` is initialised, e.g. under ``torchrun``).
            Each of its ``W`` ranks holds ``population_size / W`` members (``local_size``, from
            global index ``member_offset``): ``member.model``, the loader's batches and the
            ``val_losses`` given to :meth:`step` are this rank's; genomes and history are the whole
            clan's, the same on every rank. Every rank must build the same clan (checked) and run
            the same steps. See :mod:`vmapclan.distributed`.

    Example:
        >>> clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
        ...             population_size=8, round_length=100, duty_cycle=0.2, autobind=["adamw"])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 population_size: int = 8, round_length: int = 1000, duty_cycle: float = 0.15,
                 autobind: Sequence[str] | str = (), genome_config: Mapping | None = None,
                 selection: str | None = "winner", truncation_fraction: float = 0.25, init: str = "copy",
                 seed: int = 0, device: torch.device | str | None = None, max_grad_norm: float | None = None,
                 on_divergence: str = "restore", max_restores: int = 3, confidence: float | None = None,
                 process_group=None):
        self.population_size = _positive_int(population_size, "population_size")
        #: The ranks sharing the population (:class:`~vmapclan.distributed.ClanGroup`), ``None`` in one process.
        self.group = resolve_group(process_group, self.population_size)
        self.world_size = 1 if self.group is None else self.group.world_size
        #: This rank's members: ``local_size`` of them, global indices from ``member_offset``.
        self.local_size = self.population_size // self.world_size
        self.member_offset = 0 if self.group is None else self.group.offset
        self._members = slice(self.member_offset, self.member_offset + self.local_size)
        self.round_length = _positive_int(round_length, "round_length")
        if selection not in ("winner", "truncation", None):
            raise ValueError(f"Clan: selection must be 'winner', 'truncation' or None, got {selection!r}")
        if selection is not None and self.population_size < 2:
            raise ValueError(f"Clan: selection={selection!r} needs population_size >= 2, got {population_size}")
        self.selection = selection
        self._set_round_settings(round_length, duty_cycle)
        if init not in ("copy", "independent"):
            raise ValueError(f"Clan: init must be 'copy' or 'independent', got {init!r}")
        self.init = init
        self._check_independent_start(duty_cycle, model is not None)
        if isinstance(truncation_fraction, bool) or not isinstance(truncation_fraction, (int, float)) \
                or not 0 < truncation_fraction <= 0.5:
            raise ValueError(f"Clan: truncation_fraction must be in (0, 0.5], got {truncation_fraction!r}")
        if isinstance(autobind, str):
            autobind = [autobind]
        if not isinstance(autobind, Sequence) or not all(isinstance(name, str) for name in autobind):
            raise TypeError(f"Clan: autobind must be 'adamw', 'gradient_accumulation' or a list of them, got {autobind!r}")
        if genome_config is not None and not isinstance(genome_config, Mapping):
            raise TypeError(f"Clan: genome_config must be a dict {{gene name: Gene or dict}}, got {genome_config!r}")
        if device is not None:
            device = check_device(device, "Clan")
        self.selection, self.truncation_fraction = selection, float(truncation_fraction)
        if on_divergence not in ("restore", "raise"):
            raise ValueError(f"Clan: on_divergence must be 'restore' or 'raise', got {on_divergence!r}")
        self.on_divergence = on_divergence
        self.max_restores = _positive_int(max_restores, "max_restores")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
                raise ValueError(f"Clan: confidence must be a number in (0, 1) or None, got {confidence!r}")
            if selection != "winner":
                raise ValueError(f"Clan: confidence needs selection='winner' (a control to test challengers "
                                 f"against), got selection={selection!r}")
            confidence = float(confidence)
        self.confidence = confidence
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Clan: seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**63:  # what torch.Generator.manual_seed takes
            raise ValueError(f"Clan: seed must be an int in [0, 2**63), got {seed}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

        if model is None and optimizer is not None:
            raise ValueError("Clan: an optimizer was given without a model")
        if model is not None and optimizer is None:
            raise ValueError("Clan: a model needs its optimizer (a torch.optim.AdamW over its parameters)")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Clan: model must be an nn.Module, got {type(model).__name__}")
        ratios = _check_optimizer(optimizer, model) if model is not None else None
        self.genes = self._gene_specs(autobind, optimizer, genome_config)
        if self.group is not None:
            self._check_group(model, init)
        _check_fits(self.local_size, model, len(self.genes), device)
        self.incumbent = {n: torch.tensor(g.init, dtype=g.torch_dtype) for n, g in self.genes.items()}
        self.genomes = {n: v.expand(self.population_size).clone() for n, v in self.incumbent.items()}
        # Member 0 keeps the incumbent as a control; the others start from mutations of it.
        challengers = torch.arange(self.population_size) > 0
        self.genomes = mutate(self.genomes, self.genes, self._generator, mask=challengers)

        self.population: PopulationModel | None = None
        self.optimizer: BatchedAdamW | None = None
        if model is not None:
            self.population = PopulationModel(model, self.local_size, init=init, generator=self._generator,
                                              device=device)
            self.device = self.population.device
            constants = optimizer_settings(optimizer)
            hyper = AdamWHyper(**{
                field: torch.full((self.local_size,), constants[gene], dtype=torch.float64,
                                  device=self.device)
                for gene, field in ADAMW_FIELDS.items()
            })
            accum = (torch.ones(self.local_size, dtype=torch.long, device=self.device)
                     if GRAD_ACCUM_GENE in self.genes else None)
            pop = self.population
            scales = group_scales(ratios, [pop.shapes[n].numel() for n in pop.shapes], pop.dtype, self.device)
            self.optimizer = BatchedAdamW(pop, hyper, accum, max_grad_norm=max_grad_norm, scales=scales)
            self._bind_population()
        else:
            self.device = torch.device(device) if device is not None else torch.device("cpu")

        loader_seed = int(torch.randint(2**62, (1,), generator=self._generator).item())
        self._loader_state = LoaderState(torch.Generator().manual_seed(loader_seed))
        self._round = 0
        self._round_step = 0
        self._global_step = 0
        self._syncing = False
        self._averaging = False  # inside a cooperative sync_context while the members train as one model
        self._cooperating = False  # inside cooperate()
        self.history: list[dict] = []
        self._restores = 0
        self._last_good: dict | None = None
        self.mark_restore_point()
        self._apply_genes()

    # -- genes ----------------------------------------------------------------------------------
    @staticmethod
    def _gene_specs(autobind, optimizer, genome_config) -> dict[str, Gene]:
        genes = autobind_genes(autobind, optimizer)
        for name, spec in (genome_config or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Clan: gene names must be non-empty strings, got {name!r}")
            if isinstance(spec, Mapping):
                base = genes.get(name)
                try:
                    spec = dataclasses.replace(base, **spec) if base is not None else Gene(**spec)
                except TypeError as err:
                    raise ValueError(f"Clan: genome_config[{name!r}]: {err}") from None
            elif not isinstance(spec, Gene):
                raise TypeError(f"Clan: genome_config[{name!r}] must be a Gene or a dict, got {type(spec).__name__}")
            if spec.init is None:
                bound = genes.get(name)
                init = bound.init if bound is not None and bound.init is not None else spec.default_init()
                spec = dataclasses.replace(spec, init=init)
            genes[name] = spec
        return genes

    def _genes_in_force(self) -> dict[str, torch.Tensor]:
        """The genes in force for this rank's members, ``{name: [local_size]}``."""
        if self.phase == COOPERATIVE:
            return {n: v.expand(self.local_size) for n, v in self.incumbent.items()}
        return {n: v[self._members] for n, v in self.genomes.items()}

    def _apply_genes(self) -> None:
        """Enter the current phase: write the genes in force into the optimizer's ``[P]`` tensors.

        Also where the members start or stop training as one model (see :meth:`cooperate`).
        """
        if self.optimizer is None:
            return
        self._train_as_one(self.phase == COOPERATIVE)
        genes = self._genes_in_force()
        for gene, field in ADAMW_FIELDS.items():
            if gene in genes:
                getattr(self.optimizer.hyper, field).copy_(genes[gene])
        if GRAD_ACCUM_GENE in genes:
            self.optimizer.num_grad_accum.copy_(genes[GRAD_ACCUM_GENE])

    def set_genome(self, name: str, values) -> None:
        """Set gene ``name`` of every member (``[P]`` values within the gene's bounds), e.g. for a sweep.

        The values take effect at once in the competitive phase (and in the next one otherwise).
        """
        if name not in self.genes:
            raise ValueError(f"Clan.set_genome: unknown gene {name!r}; the genes are {sorted(self.genes)}")
        values = torch.as_tensor(values, dtype=self.genes[name].torch_dtype).flatten()
        check_genome({name: values}, {name: self.genes[name]}, self.population_size)
        self.genomes[name] = values.clone()
        self._apply_genes()

    # -- the round clock --------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``"cooperative"`` or ``"competitive"``: the phase of the current step."""
        # A done round stays in its last phase until clan.step(): the genes in force at
        # member.done are the competitors' own.
        return phase_at(min(self._round_step, self.round_length - 1), self.round_length, self.cooperative_steps)

    @property
    def cooperating(self) -> bool:
        """Whether the next step trains the members as one data-parallel model: a step of the
        round's cooperative phase, or any step inside :meth:`cooperate` (whatever the round's phase,
        e.g. after a round that is all competition)."""
        return self._cooperating or self.phase == COOPERATIVE

    def phase_ahead(self, steps: int) -> str:
        """The phase of the step ``steps`` after the next one to run, under the current round settings.

        Steps past the round's end count into the next rounds: at ``round_done``,
        ``phase_ahead(0)`` is the phase of the next round's first step.
        """
        return phase_at(self._round_step + steps, self.round_length, self.cooperative_steps)

    @property
    def round_index(self) -> int:
        """Rounds completed so far (the current round's number, from 0)."""
        return self._round

    @property
    def step_in_round(self) -> int:
        """``member.step()`` calls so far in the current round."""
        return self._round_step

    @property
    def global_step(self) -> int:
        """``member.step()`` calls since the start."""
        return self._global_step

    @property
    def round_done(self) -> bool:
        """Whether the current round has run all its steps (time for ``clan.step``)."""
        return self._round_step >= self.round_length

    def reconfigure(self, *, round_length: int | None = None, duty_cycle: float | None = None) -> None:
        """Change the round settings between rounds (a phase schedule does this at phase boundaries).

        Args:
            round_length: New steps per round (default: unchanged).
            duty_cycle: New competitive fraction, in (0, 1] (default: unchanged).

        Raises:
            RuntimeError: in the middle of a round.
            ValueError: for settings ``Clan`` itself would refuse.
        """
        if self._round_step != 0:
            raise RuntimeError(
                f"Clan.reconfigure: only between rounds; round {self._round} is at step {self._round_step}"
            )
        round_length = self.round_length if round_length is None else _positive_int(round_length, "round_length")
        duty_cycle = self.duty_cycle if duty_cycle is None else duty_cycle
        _check_round_settings(round_length, duty_cycle, self.selection)
        if self._round == 0:
            self._check_independent_start(duty_cycle, self.population is not None)
        self._set_round_settings(round_length, duty_cycle)
        self._apply_genes()

    def _set_round_settings(self, round_length: int, duty_cycle: float) -> None:
        _check_round_settings(round_length, duty_cycle, self.selection)
        self.round_length, self.duty_cycle = round_length, float(duty_cycle)
        self.competitive_steps = competitive_steps(round_length, duty_cycle)
        self.cooperative_steps = round_length - self.competitive_steps

    def _check_independent_start(self, duty_cycle, has_model: bool) -> None:
        # Independently initialised members differ until the first selection; averaging their
        # gradients in a cooperative phase would apply one member's update to another's weights.
        if self.init == "independent" and has_model and duty_cycle != 1:
            raise ValueError(
                f"Clan: init='independent' starts members that differ, so the first round needs duty_cycle=1.0 "
                f"(a cooperative phase averages gradients over identical members), got {duty_cycle}"
            )

    def _check_group(self, model: nn.Module | None, init: str) -> None:
        """Refuse what a clan across ranks cannot do, and a clan that differs between the ranks."""
        world = self.group.world_size
        if self.selection == "truncation":
            raise ValueError(f"Clan: selection='truncation' is not supported across {world} ranks (a member may copy "
                             "one held by another rank); use selection='winner' or None")
        if init == "independent" and model is not None:
            raise ValueError(f"Clan: init='independent' is not supported across {world} ranks; use init='copy'")
        # Ranks that built different clans would train in lockstep on wrong numbers: compare now.
        shapes = ({n: list(t.shape) for n, t in model.state_dict().items()} if model is not None else None)
        settings = repr((self._config(), self.seed, self.init, self.on_divergence, self.max_restores, shapes))
        self.group.check_same(settings, "the clan's settings, seed and model")

    def round(self) -> Member:
        """The view of the current round. No side effects: calling it twice gives equal views."""
        return Member(self, self._round)

    def loader(self, dataset, batch_size: int, *, device: torch.device | str | None = None) -> ClanLoader:
        """A loader yielding ``[P, B, ...]`` batches as the phase requires (see :class:`ClanLoader`)."""
        return ClanLoader(self, dataset, batch_size, device=device)

    @property
    def loader_state(self) -> LoaderState:
        """The position and generator of the clan's data order, shared by all its loaders (part of the state)."""
        return self._loader_state

    def advance(self) -> None:
        """Advance the round clock by one step (what ``member.step()`` and :class:`~vmapclan.FusedStep` do).

        Raises:
            RuntimeError: if the round is done (call :meth:`step` first).
        """
        if self.round_done:
            raise RuntimeError(
                f"member.step(): round {self._round} is done ({self.round_length} steps); "
                "call clan.step(val_losses) and take the next member from clan.round()"
            )
        self._round_step += 1
        self._global_step += 1
        if self._round_step == self.cooperative_steps:
            self._apply_genes()  # entering the competitive phase: each member's own genome

    def _check_backward_synced(self, _leaf) -> None:
        if (self.phase == COOPERATIVE or self.population.one_model) and not self._syncing:
            raise RuntimeError(
                "backward ran outside member.sync_context() in the cooperative phase: members would drift apart; "
                "wrap it as `with member.sync_context(): loss.sum().backward()`"
            )

    def _check_stacked_backward(self, leaf) -> None:
        if self.population.one_model:
            raise RuntimeError(
                "a backward reached the stacked [P, ...] parameters while the members train as one model (the "
                "cooperative phase), e.g. through a penalty on member.model.parameters(); compute the loss from "
                "member.model's output, and take a term on the weights from member 0's model, "
                "member.model.module.parameters()"
            )
        self._check_backward_synced(leaf)

    def _average_over_members(self, grad: torch.Tensor) -> torch.Tensor | None:
        # Member 0's weights ran every member's shard, so its gradient is the members' sum:
        # inside a cooperative sync_context that is averaged as it arrives.
        return grad / self.population_size if self._averaging else None

    def _bind_population(self) -> None:
        """Install the clan's backward checks, gradient averaging and row syncing on its population."""
        for leaf in self.population.parameters():
            leaf.register_post_accumulate_grad_hook(self._check_stacked_backward)
        for leaf in self.population.module_params.values():
            leaf.register_hook(self._average_over_members)
            leaf.register_post_accumulate_grad_hook(self._check_backward_synced)
        self.population.sync_rows = self.sync_members

    # -- growth -----------------------------------------------------------------------------------
    def grow(self, fn) -> None:
        """Rebuild the population with a larger model: every member grown by ``fn``, its state carried over.

        ``fn(module)`` gets each member as a plain module (:meth:`~vmapclan.PopulationModel.member_module`)
        and returns it grown: every existing parameter and buffer kept under its name and shape
        (:func:`~vmapclan.population.check_growth`), new ones added and initialised by ``fn``. It
        runs once per member from the same global RNG state, so members that were copies of one
        another stay copies (a random initialisation draws the same values for each). The new
        population keeps every member's weights, gradients (partial accumulation sums), buffers,
        genome, AdamW moments, step and accumulation counts; the new parameters start with zero
        moments and gradients and their own step count at 0 (as a parameter added to a
        ``torch.optim.AdamW``), in the first param group (the one the genes stand for). The restore
        point of divergence recovery becomes the grown state. Only between rounds.

        :attr:`population` and :attr:`optimizer` are new objects afterwards (members from
        :meth:`round` see them); a :class:`~vmapclan.FusedStep` of the old population refuses to
        run: make a new one.

        Args:
            fn: ``fn(module) -> nn.Module``.

        Raises:
            ValueError: for a genome-only clan, or a grown model that drops or reshapes a tensor
                (naming it) or adds nothing.
            TypeError: if ``fn`` returns something other than an ``nn.Module``.
            RuntimeError: in the middle of a round.

        Example:
            >>> clan.grow(lambda m: torch.nn.Sequential(*m, torch.nn.Linear(4, 4)))  # doctest: +SKIP
        """
        from .population import check_growth, stack_members

        if self.population is None:
            raise ValueError("Clan.grow: this clan has no model (a genome-only clan)")
        if self._round_step != 0:
            raise RuntimeError(f"Clan.grow: only between rounds; round {self._round} is at step {self._round_step}")
        old, optimizer = self.population, self.optimizer
        self.sync_members()
        old.restore_grad_views()
        cuda = self.device.type == "cuda"
        rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None
        grown = []
        for i in range(self.population_size):
            torch.set_rng_state(rng)  # the same draws for every member: copies stay copies
            if cuda:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            before = old.member_module(i)
            template = copy.deepcopy(before) if i == 0 else None  # fn may grow its argument in place
            after = fn(before)
            if template is not None:
                check_growth(template, after, "Clan.grow")
            grown.append(after.to(self.device))
        new = stack_members(grown, device=self.device)
        pairs = [(old.columns[n], c) for n, c in new.columns.items() if n in old.columns]
        ratios = [(1.0, 1.0)] * len(new.columns) if optimizer.scales is None else None
        if ratios is None:  # a new parameter joins the first group: multipliers 1
            before_ratios = dict(zip(old.columns, optimizer.scales.ratios))
            ratios = [before_ratios.get(n, (1.0, 1.0)) for n in new.columns]
        scales = group_scales(ratios, [new.shapes[n].numel() for n in new.columns], new.dtype, self.device)
        grown_optimizer = BatchedAdamW(new, optimizer.hyper, optimizer.num_grad_accum,
                                       max_grad_norm=optimizer.max_grad_norm, update=optimizer.update, scales=scales)
        grown_optimizer.lr_factor = optimizer.lr_factor  # the same tensor: whoever writes it keeps writing it
        state, grown_state = optimizer.adamw_state, grown_optimizer.adamw_state
        with torch.no_grad():
            grown_state.step.copy_(state.step)
            grown_state.accum_count.copy_(state.accum_count)
            # A new parameter has taken no update yet: its bias correction starts from its own step 0.
            old_index = {n: k for k, n in enumerate(old.columns)}
            for k, name in enumerate(new.columns):
                grown_state.skipped[:, k] = state.skipped[:, old_index[name]] if name in old_index else state.step
            grown_optimizer.lagging = optimizer.lagging or len(new.columns) > len(old.columns)
            for source, target in ((old.grad_flat, new.grad_flat), (state.exp_avg, grown_state.exp_avg),
                                   (state.exp_avg_sq, grown_state.exp_avg_sq)):
                for before_columns, after_columns in pairs:
                    target[:, after_columns].copy_(source[:, before_columns])
        new.grad_seen = set(old.grad_seen)
        new.train(old.training)
        new.one_model = old.one_model
        self.population, self.optimizer = new, grown_optimizer
        self._bind_population()
        self.mark_restore_point()

    # -- one model while cooperating ------------------------------------------------------------
    def _train_as_one(self, on: bool) -> None:
        """Turn training the (identical) members as one model on or off; off brings every row up to date."""
        pop = self.population
        if pop is None:
            return
        on = on and self.selection == "winner"  # only winner selection keeps every member a copy of one
        if pop.one_model and not on:
            self.sync_members()
        pop.one_model = on

    def sync_members(self) -> None:
        """Bring every member's rows of the parameters, gradients and optimizer state up to date with member 0's.

        While the members are identical (the cooperative phase, :meth:`cooperate`) the clan
        trains them as one model, member 0, and leaves the other rows behind until they are
        needed: the competitive phase, selection, :meth:`state_dict`, :meth:`member_state`,
        :meth:`best_model`, the population's :meth:`~vmapclan.PopulationModel.parameters`. Those
        call this; call it yourself before reading the raw ``flat``/``grad_flat`` buffers or the
        optimizer's moments during a cooperative phase. Buffers (BatchNorm statistics) are
        per member at all times and are not touched.
        """
        pop = self.population
        if pop is None or not pop.rows_stale:
            return
        state = self._state_tree()
        del state["buffers"]
        with torch.no_grad():
            for t in optree.tree_leaves(state):
                t[1:].copy_(t[:1].expand_as(t[1:]))
        pop.rows_stale = False

    @contextlib.contextmanager
    def cooperate(self):
        """Train the members as one data-parallel model outside the round clock (a warmup, an anneal).

        Inside, the members must be identical and each step averages their gradients
        (``sync_context(cooperative=True)``, :meth:`~vmapclan.FusedStep.train_step` with
        ``cooperative=True``): the step does the work of one model at batch ``P x B`` (see
        :attr:`~vmapclan.PopulationModel.one_model`), whatever the round's phase. The training
        machine runs its cooperative phases in it.

        Raises:
            RuntimeError: in the middle of a round (members may differ there).
        """
        if self._round_step != 0:
            raise RuntimeError(
                f"Clan.cooperate: only between rounds, where the members are copies of one; round {self._round} "
                f"is at step {self._round_step}"
            )
        self._train_as_one(True)
        self._cooperating = True
        try:
            yield
        finally:
            self._cooperating = False
            self._train_as_one(self.phase == COOPERATIVE)

    @contextlib.contextmanager
    def sync_context(self, *, cooperative: bool | None = None):
        """Context for ``backward()``: on exit, averages the gradients over members when cooperating.

        Args:
            cooperative: Whether to average; default: whether the current step is cooperative
                (what ``member.sync_context()`` does), or the members train as one model
                (inside :meth:`cooperate`).
        """
        one_model = self.population is not None and self.population.one_model
        if cooperative is None:  # members trained as one model always cooperate (see cooperate())
            cooperative = self.phase == COOPERATIVE or one_model
        syncing, self._syncing = self._syncing, True  # the backward check: this backward is averaged here
        averaging, self._averaging = self._averaging, cooperative and one_model
        across = self.group is not None and self.population is not None and cooperative and one_model
        if across:
            self._share_pending_sums()
        try:
            yield
        finally:
            self._syncing, self._averaging = syncing, averaging
        if across:
            # Member 0's gradient holds this rank's members' share of the mean (the hook divided by
            # the whole population's size): the sum over the ranks is the mean over every member.
            self.group.all_reduce_(self.population.grad_flat[0], "the cooperative gradient all-reduce")
        if self.population is not None and cooperative and not one_model:
            # After a user's ``p.grad = None`` the backward wrote fresh tensors, not grad_flat:
            # bring them back first, or the average misses them and the members drift apart.
            pop = self.population
            pop.restore_grad_views()
            with torch.no_grad():
                reduce_gradients_(pop.grad_flat, pop.grad_flat, cooperative=True, accumulating=False, keep=True,
                                  group=self.group)

    def _share_pending_sums(self) -> None:
        """Before a backward whose gradient row is summed over the ranks: divide the pending micro-batches by W.

        With gradient accumulation, member 0's row holds the sum of earlier micro-batches, already
        the same on every rank; the all-reduce after the backward adds every rank's row, so each
        rank contributes ``1 / W`` of it and the sum stays what it was.
        """
        if self.optimizer.num_grad_accum is not None:
            with torch.no_grad():
                self.population.grad_flat[0].div_(self.group.world_size)

    # -- selection ------------------------------------------------------------------------------
    def _check_losses(self, val_losses) -> torch.Tensor:
        p = self.local_size  # this rank's members (all of them in one process)
        expected = f"[{p}, K] (paired losses)" if self.confidence is not None else f"[{p}] or [{p}, K]"
        if not isinstance(val_losses, torch.Tensor):
            try:
                val_losses = torch.as_tensor(val_losses, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"clan.step: val_losses must be a tensor of shape {expected}, got {type(val_losses).__name__}"
                ) from None
        paired = val_losses.dim() == 2 and val_losses.shape[0] == p and val_losses.shape[1] >= 1
        if not (val_losses.shape == (p,) or paired) or (self.confidence is not None and
                                                        (not paired or val_losses.shape[1] < 2)):
            what = ("every member's losses on the same K >= 2 samples or blocks, for the paired test of "
                    "confidence" if self.confidence is not None else "one loss per member, or K per member")
            mine = f"; this rank's members: {self.local_size} of {self.population_size}" if self.group else ""
            raise ValueError(f"clan.step: val_losses must have shape {expected} ({what}{mine}), "
                             f"got {list(val_losses.shape)}")
        if not (val_losses.is_floating_point() or val_losses.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"clan.step: val_losses must be real numbers, got dtype {val_losses.dtype}")
        return val_losses.detach().to("cpu", torch.float64)

    def step(self, val_losses) -> dict:
        """End the round: select on ``val_losses`` (lower is better), mutate, start the next round.

        ``val_losses`` is ``[P]`` (a loss per member) or ``[P, K]`` (each member's losses on the
        same K samples or blocks of samples; a member's loss is its row's mean). Non-finite
        losses rank last; ties go to the lowest index. With ``confidence`` set, the losses must
        be ``[P, K]`` and a challenger wins only with a significant paired gain over member 0;
        the record then holds the best challenger's ``gain`` and its ``confidence``. Returns the
        round's history record.

        Raises:
            RuntimeError: if the round is not done.
            ValueError, TypeError: for losses of the wrong shape or type.
            DivergenceError: if every loss is NaN or infinite and the clan cannot restore (see
                ``on_divergence`` and ``max_restores``; restoring needs a model and winner selection).
        """
        if not self.round_done:
            raise RuntimeError(
                f"clan.step() called at step {self._round_step} of {self.round_length} in round {self._round}: "
                "the round is not done (check member.done)"
            )
        paired = self._check_losses(val_losses)
        if self.group is not None:  # every rank ranks the whole population's losses, in the same order
            paired = self.group.all_gather(paired, "selection's all-gather of the validation losses")
        losses = member_means(paired) if paired.dim() == 2 else paired
        order = rank(losses)
        used = {n: v.tolist() for n, v in self.genomes.items()}
        if not math.isfinite(losses[order[0]].item()):
            return self._recover(losses, used)
        best = order[0]
        choice = None
        if self.confidence is not None:
            choice = paired_winner(paired, self.confidence)
            best = choice.winner
        identity = torch.arange(self.population_size)
        self.incumbent = {n: v[best].clone() for n, v in self.genomes.items()}
        if self.selection == "winner":
            sources = torch.full((self.population_size,), best, dtype=torch.long)
            genomes = {n: v.expand(self.population_size).clone() for n, v in self.incumbent.items()}
            self.genomes = mutate(genomes, self.genes, self._generator, mask=identity > 0)
        elif self.selection == "truncation":
            sources = truncation_sources(order, self.truncation_fraction, self._generator)
            copied = {n: v[sources] for n, v in self.genomes.items()}
            self.genomes = mutate(copied, self.genes, self._generator, mask=sources != identity)
        else:
            sources = identity
        if self.population is not None and not torch.equal(sources, identity):
            if self.group is not None:  # winner selection: its owner sends the winner's row to every member
                self.group.broadcast_row_(self.member_state(), best, "selection's broadcast of the winner")
            else:
                index = sources.to(self.device)
                with torch.no_grad():
                    optree.tree_map(lambda t: t.copy_(t.index_select(0, index)), self.member_state())
        record = {
            "round": self._round,
            "step": self._global_step,
            "genomes": used,
            "val_losses": losses.tolist(),
            "winner": best,
            "incumbent": {n: v.item() for n, v in self.incumbent.items()},
        }
        if choice is not None:
            record.update(challenger=choice.challenger, gain=choice.gain, confidence=choice.confidence)
        self.history.append(record)
        self._restores = 0
        self._next_round()
        return record

    def _next_round(self) -> None:
        self._round += 1
        self._round_step = 0
        self.mark_restore_point()
        self._apply_genes()

    # -- divergence -------------------------------------------------------------------------------
    def member_state(self) -> dict:
        """The population's member-major tensors as one pytree: every tensor with the member dimension first.

        ``{"params": flat, "grads": grad_flat, "buffers": {name: [P, ...]}, "optimizer": {name: [P, ...]}}``,
        the live tensors themselves (not copies). Selection, the divergence restore point and
        the state dict are each one tree operation over it. Empty for a genome-only clan.
        """
        self.sync_members()
        return self._state_tree()

    def _state_tree(self) -> dict:
        """:meth:`member_state` without bringing the rows up to date (for what reads row 0 or writes every row)."""
        if self.population is None:
            return {}
        pop = self.population
        return {"params": pop.flat, "grads": pop.grad_flat, "buffers": pop.buffers,
                "optimizer": self.optimizer.adamw_state._asdict()}

    def mark_restore_point(self) -> None:
        """Make the current state the one a divergence restores to (the clan does so at every round start).

        Only with winner selection, where every member starts the round as a copy of member 0,
        so one row of each tensor is the whole population's state. The training machine calls it
        at the end of a cooperative phase, where the members are identical again.
        """
        if self.population is None or self.selection != "winner":
            return
        self._last_good = {
            "round": self._round,
            **optree.tree_map(lambda t: t[0].clone(), self._state_tree()),  # member 0's row is up to date
            "incumbent": {n: v.clone() for n, v in self.incumbent.items()},
        }

    def _recover(self, losses: torch.Tensor, used: dict) -> dict:
        message = (f"clan.step: every member's validation loss is NaN or infinite in round {self._round}: "
                   f"{losses.tolist()}")
        if self._last_good is None or self.on_divergence == "raise":
            raise DivergenceError(message)
        if self._restores >= self.max_restores:
            raise DivergenceError(f"{message}; gave up after {self._restores} consecutive restores")
        good = self._last_good
        live = self._state_tree()
        with torch.no_grad():
            optree.tree_map(lambda t, row: t.copy_(row.expand_as(t)), live, {k: good[k] for k in live})
        self.population.rows_stale = False
        incumbent = {n: v.clone() for n, v in good["incumbent"].items()}
        if "lr" in incumbent:  # a more conservative incumbent: half the learning rate
            incumbent["lr"] = (incumbent["lr"] * 0.5).clamp(min=self.genes["lr"].low)
        self.incumbent = incumbent
        genomes = {n: v.expand(self.population_size).clone() for n, v in incumbent.items()}
        self.genomes = mutate(genomes, self.genes, self._generator, mask=torch.arange(self.population_size) > 0)
        self._restores += 1
        record = {
            "round": self._round,
            "step": self._global_step,
            "genomes": used,
            "val_losses": losses.tolist(),
            "winner": None,
            "incumbent": {n: v.item() for n, v in incumbent.items()},
            "event": "diverged",
            "restored_round": good["round"],
        }
        self.history.append(record)
        warnings.warn(
            f"vmapclan: the whole population diverged in round {self._round}; restored the state of the start of "
            f"round {good['round']} with lr {record['incumbent'].get('lr', 'unchanged')}",
            RuntimeWarning, stacklevel=3,
        )
        self._next_round()  # its snapshot is the restored state with the halved lr
        return record

    # -- results ----------------------------------------------------------------------------------
    def best_model(self) -> nn.Module:
        """A new plain ``nn.Module`` with member 0's current weights (after selection, the winner's)."""
        if self.population is None:
            raise ValueError("Clan.best_model: this clan has no model (a genome-only clan)")
        return self.population.member_module(0)

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "population_size": self.population_size,
            "round_length": self.round_length,
            "duty_cycle": self.duty_cycle,
            "selection": self.selection,
            "confidence": self.confidence,
            "truncation_fraction": self.truncation_fraction,
            "genes": {n: dataclasses.asdict(g) for n, g in self.genes.items()},
        }

    def state_dict(self) -> dict:
        """Everything needed to resume exactly, as a plain dict of tensors and values.

        Includes weights, gradients (partial accumulation sums), buffers, optimizer moments and
        counters, genomes, the incumbent, the round clock, the loader's position, the clan's
        generators, torch's global RNG state (dropout under vmap draws from it) and the history.

        In a clan across ranks this is a collective (every rank must call it): the member-major
        tensors of every rank are gathered, so that every rank returns the whole clan's state, the
        same as one process's clan of ``population_size`` members (with ``world_size`` and each
        rank's RNG state, ``torch_rng_ranks``, added). Save it from rank 0; any number of ranks
        that divides ``population_size`` can load it.
        """
        state = {
            "format_version": FORMAT_VERSION,
            "config": self._config(),
            "round": self._round,
            "round_step": self._round_step,
            "global_step": self._global_step,
            "genomes": {n: v.clone() for n, v in self.genomes.items()},
            "incumbent": {n: v.clone() for n, v in self.incumbent.items()},
            "generator": self._generator.get_state(),
            "loader": self._loader_state.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": copy.deepcopy(self.history),
            "restores": self._restores,
            "last_good": copy.deepcopy(self._last_good),
            "model": None,
            "optimizer": None,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.group is not None:
            state["world_size"] = self.world_size
            # Dropout draws from each rank's own global RNG: keep every rank's, for a resume at this world size.
            ranks = self.group.all_gather(torch.get_rng_state().unsqueeze(0), "state_dict's gather of the RNG states")
            state["torch_rng_ranks"] = [r.clone() for r in ranks]  # each its own tensor: set_rng_state reads from 0
        if self.population is not None:
            pop = self.population
            pop.restore_grad_views()  # gradients a user detached with ``p.grad = None`` belong in the state
            members = optree.tree_map(lambda t: t.detach().clone(), self.member_state())
            if self.group is not None:
                members = self.group.gather_rows(members, "state_dict's gather of the members")
            state["model"] = {"shapes": {n: list(s) for n, s in pop.shapes.items()},
                              **{k: members[k] for k in ("params", "grads", "buffers")}}
            state["optimizer"] = members["optimizer"]
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`, in place (the loader, member views and optimizer stay valid).

        Also restores torch's global RNG state, so dropout continues as in the saved run. The
        whole state is checked before anything is copied (a refused state leaves the clan as it
        was): the settings (gene set and bounds, selection, population size, round settings),
        every member tensor's shape and dtype, the counters, the genomes and incumbent within
        their bounds, the generators, the loader's permutation and position, and the restore point.

        In a clan across ranks each rank takes its own members' rows of the whole clan's state (a
        state saved by any number of ranks, or by one process, with the same ``population_size``).

        Raises:
            ValueError: for another format version, clan configuration or model, or a value no
                clan can hold, naming the entry.
        """
        who = "Clan.load_state_dict"
        if not isinstance(state, Mapping) or "format_version" not in state:
            raise ValueError(f"{who}: not a vmapclan state dict (no 'format_version')")
        if state["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{who}: checkpoint format version {state['format_version']!r}, "
                f"this vmapclan reads version {FORMAT_VERSION}"
            )
        missing = [k for k in ("config", "round", "round_step", "global_step", "genomes", "incumbent", "generator",
                               "loader", "torch_rng", "history", "restores", "last_good", "model", "optimizer")
                   if k not in state]
        if missing:
            raise ValueError(f"{who}: the checkpoint has no {missing[0]!r} entry")

        def refuse(name: str, expected: str, got) -> None:
            raise ValueError(f"{who}: the checkpoint's {name} must be {expected}, got {got!r}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        mine, theirs = self._config(), state["config"]
        if not isinstance(theirs, Mapping):
            refuse("config", "a table", type(theirs).__name__)
        for key in mine:
            if key in ("round_length", "duty_cycle"):
                continue  # round settings are state (see reconfigure), taken from the checkpoint below
            if mine[key] != theirs.get(key):
                raise ValueError(f"{who}: the checkpoint's {key} is {theirs.get(key)!r}, this clan's is {mine[key]!r}")
        round_length, duty_cycle = theirs.get("round_length"), theirs.get("duty_cycle")
        if not is_int(round_length) or round_length < 1:
            refuse("round_length", "a positive int", round_length)
        try:
            _check_round_settings(round_length, duty_cycle, self.selection)
        except ValueError as err:
            raise ValueError(f"{who}: the checkpoint's round settings are impossible: {err}") from None
        for name, low, high in (("round", 0, None), ("round_step", 0, round_length), ("global_step", 0, None),
                                ("restores", 0, self.max_restores)):
            value = state[name]
            if not is_int(value) or value < low or (high is not None and value > high):
                refuse(name, f"an int in [{low}, {high if high is not None else 'inf'}]", value)
        if state["global_step"] < state["round_step"]:
            refuse("global_step", f">= round_step ({state['round_step']})", state["global_step"])
        if not isinstance(state["history"], list) or not all(isinstance(r, Mapping) for r in state["history"]):
            refuse("history", "a list of round records", type(state["history"]).__name__)

        def check_genes(name: str, genes, shape: tuple) -> None:
            if not isinstance(genes, Mapping) or not all(isinstance(v, torch.Tensor) for v in genes.values()):
                refuse(name, "a table of tensors", type(genes).__name__)
            if set(genes) != set(self.genes):
                raise ValueError(f"{who}: the checkpoint's {name} has genes {sorted(genes)}, expected {sorted(self.genes)}")
            for gene, spec in self.genes.items():
                values = genes[gene]
                if values.dtype != spec.torch_dtype or values.shape != shape:
                    raise ValueError(f"{who}: the checkpoint's {name}[{gene!r}] is {values.dtype} {list(values.shape)}, "
                                     f"expected {spec.torch_dtype} {list(shape)}")
            try:
                check_genome({g: v.reshape(-1).expand(self.population_size) for g, v in genes.items()}, self.genes,
                             self.population_size)
            except ValueError as err:
                raise ValueError(f"{who}: the checkpoint's {name}: {err}") from None

        check_genes("genomes", state["genomes"], (self.population_size,))
        check_genes("incumbent", state["incumbent"], ())

        def check_generator_state(name: str, value, like: torch.Tensor) -> None:
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.shape != like.shape:
                got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{who}: the checkpoint's {name} is {got}, expected a generator state "
                                 f"(uint8 {list(like.shape)})")

        check_generator_state("generator", state["generator"], self._generator.get_state())
        check_generator_state("torch_rng", state["torch_rng"], torch.get_rng_state())
        loader = state["loader"]
        if not isinstance(loader, Mapping) or set(loader) != {"generator", "perm", "position", "epoch"}:
            refuse("loader", "a table of generator, perm, position and epoch", loader if not isinstance(loader, Mapping)
                   else sorted(loader))
        check_generator_state("loader/generator", loader["generator"], self._loader_state.generator.get_state())
        perm, position, epoch = loader["perm"], loader["position"], loader["epoch"]
        if perm is not None:
            if not isinstance(perm, torch.Tensor) or perm.dtype != torch.long or perm.dim() != 1:
                refuse("loader/perm", "None or a 1-D long tensor", type(perm).__name__ if not isinstance(
                    perm, torch.Tensor) else f"{perm.dtype} {list(perm.shape)}")
            if not torch.equal(perm.sort().values, torch.arange(perm.numel())):
                raise ValueError(f"{who}: the checkpoint's loader/perm is not a permutation of {perm.numel()} samples")
        limit = perm.numel() if perm is not None else None
        if not is_int(position) or position < 0 or (limit is not None and position > limit):
            refuse("loader/position", f"an int in [0, {limit if limit is not None else 'inf'}]", position)
        if not is_int(epoch) or epoch < (1 if perm is not None else 0):
            refuse("loader/epoch", f"an int >= {1 if perm is not None else 0}", epoch)

        saved_model = state["model"]
        if (saved_model is None) != (self.population is None):
            raise ValueError(f"{who}: the checkpoint and this clan disagree on having a model")
        if self.population is not None:
            pop = self.population
            if not isinstance(saved_model, Mapping) or not {"shapes", "params", "grads", "buffers"} <= set(saved_model):
                refuse("model", "a table of shapes, params, grads and buffers", type(saved_model).__name__)
            shapes = {n: list(s) for n, s in pop.shapes.items()}
            buffers = saved_model["buffers"]
            if saved_model["shapes"] != shapes or not isinstance(buffers, Mapping) or set(buffers) != set(pop.buffers):
                raise ValueError(
                    f"{who}: the checkpoint is of another model: parameters "
                    f"{saved_model['shapes']} vs this model's {shapes}"
                )
            # Every member-major tensor is checked before any is copied: a refused state leaves the clan as it was.
            saved = {"params": saved_model["params"], "grads": saved_model["grads"], "buffers": buffers,
                     "optimizer": state["optimizer"]}
            if self.group is not None:  # the whole clan's [P, ...] rows: this rank takes its own members'
                saved = optree.tree_map(lambda t: t[self._members] if isinstance(t, torch.Tensor) and t.dim() > 0
                                        and t.shape[0] == self.population_size else t, saved)
            saved["optimizer"] = _with_skipped(saved["optimizer"], self.optimizer.adamw_state.skipped)
            live = self._state_tree()
            if optree.tree_structure(saved) != optree.tree_structure(live):
                got = sorted(state["optimizer"]) if isinstance(state["optimizer"], Mapping) else state["optimizer"]
                raise ValueError(f"{who}: the checkpoint's optimizer entries are {got}, "
                                 f"expected {sorted(live['optimizer'])}")
            paths, targets, _ = optree.tree_flatten_with_path(live)
            for path, target, source in zip(paths, targets, optree.tree_leaves(saved)):
                if not isinstance(source, torch.Tensor) or source.shape != target.shape or source.dtype != target.dtype:
                    got = f"{source.dtype} {list(source.shape)}" if isinstance(source, torch.Tensor) \
                        else type(source).__name__
                    raise ValueError(f"{who}: the checkpoint's {'/'.join(map(str, path))} is "
                                     f"{got}, expected {target.dtype} {list(target.shape)}")
            good = state["last_good"]
            if isinstance(good, Mapping) and isinstance(good.get("optimizer"), Mapping):
                good = {**good, "optimizer": _with_skipped(good["optimizer"], self.optimizer.adamw_state.skipped[0])}
            if good is not None:
                # The restore point: one member's row of each tensor, finite, and an incumbent in bounds.
                rows = {k: good.get(k) for k in live} if isinstance(good, Mapping) else None
                if rows is None or not is_int(good.get("round")) or optree.tree_structure(rows) != \
                        optree.tree_structure(live):
                    refuse("last_good", "None or a restore point of this model", type(good).__name__)
                for path, target, row in zip(paths, targets, optree.tree_leaves(rows)):
                    if not isinstance(row, torch.Tensor) or row.shape != target.shape[1:] or row.dtype != target.dtype:
                        got = f"{row.dtype} {list(row.shape)}" if isinstance(row, torch.Tensor) else type(row).__name__
                        raise ValueError(f"{who}: the checkpoint's last_good/{'/'.join(map(str, path))} is {got}, "
                                         f"expected {target.dtype} {list(target.shape[1:])}")
                    if row.is_floating_point() and not bool(torch.isfinite(row).all()):
                        raise ValueError(f"{who}: the checkpoint's restore point holds NaN or infinite values in "
                                         f"{'/'.join(map(str, path))}")
                check_genes("last_good/incumbent", good.get("incumbent"), ())
        elif state["last_good"] is not None:
            refuse("last_good", "None for a clan without a model", type(state["last_good"]).__name__)

        if self.population is not None:
            with torch.no_grad():
                optree.tree_map(lambda t, src: t.copy_(src), live, saved)
            self.population.rows_stale = False
            self.optimizer.lagging = bool(saved["optimizer"]["skipped"].any()) or (
                good is not None and bool(good["optimizer"]["skipped"].any()))
        self.genomes = {n: v.clone() for n, v in state["genomes"].items()}
        self.incumbent = {n: v.clone() for n, v in state["incumbent"].items()}
        self._set_round_settings(round_length, duty_cycle)
        self._round, self._round_step, self._global_step = state["round"], state["round_step"], state["global_step"]
        self._generator.set_state(state["generator"])
        self._loader_state.load_state_dict(loader)
        ranks = state.get("torch_rng_ranks")
        torch.set_rng_state(ranks[self.group.rank] if self.group is not None and isinstance(ranks, list)
                            and len(ranks) == self.world_size else state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = copy.deepcopy(state["history"])
        self._restores = state["restores"]
        self._last_good = copy.deepcopy(good if self.population is not None else state["last_good"])
        self._apply_genes()


class Member:
    """This round's view of the population: model, optimizer, genes and the round clock.

    Obtained from :meth:`Clan.round`; it goes stale when the round ends (``clan.step``), and
    using a stale member is an error.

    Attributes:
        model: The :class:`PopulationModel` (``None`` for a genome-only clan).
        optimizer: The :class:`BatchedAdamW` (``None`` for a genome-only clan).
    """

    def __init__(self, clan: Clan, round_index: int):
        self._clan = clan
        self._round = round_index

    def _live(self) -> Clan:
        if self._round != self._clan._round:
            raise RuntimeError(
                f"stale member: it belongs to round {self._round} but the clan is in round {self._clan._round}; "
                "take the current one from clan.round()"
            )
        return self._clan

    @property
    def model(self) -> PopulationModel | None:
        """The stacked model; call it with ``[P, B, ...]`` inputs."""
        return self._live().population

    @property
    def optimizer(self) -> BatchedAdamW | None:
        """The batched AdamW."""
        return self._live().optimizer

    @property
    def phase(self) -> str:
        """``"cooperative"`` or ``"competitive"``."""
        return self._live().phase

    @property
    def done(self) -> bool:
        """Whether this round has run all its steps: time to validate and call ``clan.step``."""
        return self._live().round_done

    @property
    def round_index(self) -> int:
        """The round this member view belongs to."""
        return self._round

    def step(self) -> None:
        """Advance the round clock by one step (call once per batch, after the optimizer)."""
        self._live().advance()

    def sync_context(self):
        """Context for ``backward()``: in the cooperative phase, averages gradients over members on exit.

        In the competitive phase it does nothing. A backward outside it in the cooperative
        phase is an error.
        """
        return self._live().sync_context()

    @property
    def genome(self) -> dict[str, torch.Tensor]:
        """Every gene in force, ``{name: [P]}`` (the incumbent broadcast when cooperating)."""
        return self._live()._genes_in_force()

    def get_gene(self, name: str) -> torch.Tensor:
        """Gene ``name`` in force for each member, ``[P]`` on the CPU (``long`` for integer genes).

        Raises:
            ValueError: for a gene the clan does not have.
        """
        genes = self.genome
        if name not in genes:
            raise ValueError(f"member.get_gene: unknown gene {name!r}; the genes are {sorted(genes)}")
        return genes[name]

    def share(self, data):
        """``data`` with a member dimension, as a view: every member sees the same values."""
        clan = self._live()
        if clan.population is not None:
            return clan.population.share(data)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"member.share: expected a tensor, got {type(data).__name__}")
        return data.unsqueeze(0).expand(clan.local_size, *data.shape)
