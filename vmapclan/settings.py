"""A clan's settings as one frozen object, checked once: what :class:`~vmapclan.Clan` is built from.

Everything that decides how a clan trains and which model it returns is here, with its
default, for a user's own loop and the training machine alike:

- the population and its rounds: ``population_size``, ``round_length``, ``duty_cycle``,
  ``selection`` (and ``truncation_fraction``, ``confidence``), ``init``, ``seed``;
- the horizon and the plan over it: ``total_steps`` and ``schedule`` (the phases; a clan with a
  horizon and no schedule follows :func:`~vmapclan.schedule.default_schedule`: a search over
  the lr, then clan rounds);
- the learning rate's time shape over the horizon (``lr_schedule``, ``warmup``, ``decay``) and
  the competitive step's share of a genome's lr (``competitive_lr``);
- what the clan keeps: ``keep_best``, and divergence recovery (``on_divergence``,
  ``max_restores``); ``max_grad_norm``.

Example:
    >>> settings = ClanSettings(population_size=4, total_steps=1000)
    >>> settings.lr_schedule, settings.warmup, [p.name for p in settings.schedule]
    ('cosine', 0.05, ['search', 'clan'])
    >>> ClanSettings(population_size=4).lr_schedule  # no horizon: no time shape
    'constant'
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

from .checks import is_int, number_in, one_of, positive_int, refuse
from .clock import check_round_settings
from .rounds import check_phases
from .schedule import PhaseSchedule, check_lr_shape, data_schedule, default_schedule, lr_shape_at

__all__ = ["ClanSettings", "DEFAULTS", "SELECTIONS", "COMPETITIVE_LRS", "HORIZON_LR_SHAPE", "HORIZON_WARMUP", "WSD_DECAY",
           "check_independent_start"]

SELECTIONS = ("winner", "truncation", None)
#: The lr's time shape with a horizon (and without a setting of one's own): a cosine after a 5% warmup.
HORIZON_LR_SHAPE, HORIZON_WARMUP, WSD_DECAY = "cosine", 0.05, 0.2
#: How a competitive step (batch ``B``) uses a genome's lr, named for a cooperative step (batch ``P x B``).
COMPETITIVE_LRS = ("same", "sqrt")


def check_independent_start(init: str, duty_cycle: float) -> None:
    """Refuse a first round that averages the gradients of independently initialised members.

    They differ until the first selection, so a cooperative phase would apply one member's update
    to another's weights: the first round must be all competition.

    Raises:
        ValueError: for ``init="independent"`` with ``duty_cycle < 1``.
    """
    if init == "independent" and duty_cycle != 1:
        raise ValueError(f"Clan: init='independent' starts members that differ, so the first round needs duty_cycle=1.0 "
                         f"(a cooperative phase averages gradients over identical members), got {duty_cycle}")


@dataclasses.dataclass(frozen=True)
class ClanSettings:
    """The settings a :class:`~vmapclan.Clan` is built from: every ``Clan`` keyword but the model's.

    Args:
        population_size: P (default 8).
        round_length: Steps per round (default 40; with a schedule, of the phases that set none).
        duty_cycle: Fraction of a round that is competitive, in (0, 1] (default 0.25). ``1.0``
            is classic PBT (always competitive).
        selection: ``"winner"`` (default), ``"truncation"`` (the bottom quantile copies the top,
            then mutates; needs ``duty_cycle=1``) or ``None`` (a vectorized sweep; needs
            ``duty_cycle=1``).
        truncation_fraction: The quantile for ``"truncation"``, in (0, 0.5].
        init: ``"copy"`` or ``"independent"`` member weights (see :class:`~vmapclan.PopulationModel`).
        seed: Seeds mutations, independent init and the loader's permutations, in [0, 2**63).
        max_grad_norm: Optional per-member gradient-norm clipping before each update.
        on_divergence: What ``clan.step`` does when every member's validation loss is NaN or
            infinite (with winner selection and a model): ``"restore"`` (default) goes back to the
            weights, optimizer state and incumbent of the start of the last good round (or the end of
            the last good cooperative stretch), halves
            the incumbent's lr (within its bounds), records the event in the history and warns;
            ``"raise"`` raises :class:`~vmapclan.DivergenceError`.
        max_restores: Consecutive restores allowed before the error is raised anyway.
        confidence: With winner selection, adopt a challenger only when its gain over member 0
            (the control, which trained with the unmutated incumbent) is significant at this
            family-wise confidence, in (0, 1): ``clan.step`` then takes paired losses ``[P, K]``
            (every member scored on the same K samples or blocks of samples) and decides by a
            one-sided paired t-test per challenger, Bonferroni-corrected over the P - 1 of them
            (:func:`vmapclan.selection.paired_winner`). ``None`` (default): the lowest mean loss
            wins, however small its lead.
        total_steps: The horizon: how many steps (``member.step()`` calls) the loop will train.
            ``None`` (default): no horizon: rounds follow each other for as long as the loop
            goes, at the genomes' lr (with the competitive share), with no plan.
        schedule: The phases over the horizon (a :class:`~vmapclan.PhaseSchedule` or a list of
            :class:`~vmapclan.Phase` or their dicts): each phase's ``clan`` settings
            (``competition = False``: one data-parallel model, no rounds; ``search = s``: one
            all-competitive round spreading the lr ``s``-fold; ``round_length``, ``duty_cycle``)
            and a cooperative phase's ``optimizer`` settings. Needs ``total_steps``; default
            :func:`~vmapclan.schedule.default_schedule`: a search over the first 10%, then rounds.
        lr_schedule: The lr's time shape over the horizon, a factor on every member's lr at
            every step (:func:`~vmapclan.schedule.lr_shape_at`): ``"cosine"`` (the default with a
            horizon), ``"wsd"`` or ``"constant"`` (the only one without a horizon).
        warmup: The share of the horizon the lr warms up over from 0 (default 0.05 with a horizon).
        decay: For ``"wsd"``: the share of the horizon its final linear decay takes (default 0.2).
        competitive_lr: ``"sqrt"`` (default): with winner selection a competitive step (batch B)
            trains at the genome's lr over sqrt(P), because the genome's lr is what a cooperative
            step (batch P x B) applies: a genome is scored the way it will be used (the
            square-root scaling rule for Adam). ``"same"``: the genome's lr as is. Only with winner
            selection, whose genomes are the ones cooperative steps train with; a sweep's or PBT's
            members train at their genome's lr.
        keep_best: With winner selection (default ``True``): keep a copy of the incumbent with
            the lowest validation loss given to ``clan.step`` at a round's (or cooperative
            stretch's) end, and its step (:meth:`~vmapclan.Clan.kept_model`).

    Raises:
        ValueError, TypeError: naming the setting (``"Clan: duty_cycle must be in (0, 1], got 2"``).
    """

    population_size: int = 8
    round_length: int = 40
    duty_cycle: float = 0.25
    selection: str | None = "winner"
    truncation_fraction: float = 0.25
    init: str = "copy"
    seed: int = 0
    max_grad_norm: float | None = None
    on_divergence: str = "restore"
    max_restores: int = 3
    confidence: float | None = None
    total_steps: int | None = None
    schedule: PhaseSchedule | Sequence | None = None
    lr_schedule: str | None = None
    warmup: float | None = None
    decay: float | None = None
    competitive_lr: str = "sqrt"
    keep_best: bool = True
    #: Whether ``schedule`` was left to the default (no schedule given): only then can the data's size change it.
    _defaulted: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive_int(self.population_size, "Clan: population_size")
        positive_int(self.round_length, "Clan: round_length")
        one_of(self.selection, "Clan: selection", SELECTIONS, "'winner', 'truncation' or None")
        if self.selection is not None and self.population_size < 2:
            raise ValueError(f"Clan: selection={self.selection!r} needs population_size >= 2, "
                             f"got {self.population_size}")
        check_round_settings(self.round_length, self.duty_cycle, self.selection)
        object.__setattr__(self, "duty_cycle", float(self.duty_cycle))
        one_of(self.init, "Clan: init", ("copy", "independent"), "'copy' or 'independent'")
        object.__setattr__(self, "truncation_fraction", number_in(
            self.truncation_fraction, "Clan: truncation_fraction", 0, 0.5, low_open=True, expected="in (0, 0.5]"))
        one_of(self.on_divergence, "Clan: on_divergence", ("restore", "raise"), "'restore' or 'raise'")
        positive_int(self.max_restores, "Clan: max_restores")
        if self.confidence is not None:
            object.__setattr__(self, "confidence", number_in(self.confidence, "Clan: confidence", 0, 1, low_open=True,
                                                             high_open=True, expected="a number in (0, 1) or None"))
            if self.selection != "winner":
                raise ValueError(f"Clan: confidence needs selection='winner' (a control to test challengers "
                                 f"against), got selection={self.selection!r}")
        if not is_int(self.seed):
            raise TypeError(f"Clan: seed must be an int, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**63:  # what torch.Generator.manual_seed takes
            raise ValueError(f"Clan: seed must be an int in [0, 2**63), got {self.seed}")
        one_of(self.competitive_lr, "Clan: competitive_lr", COMPETITIVE_LRS, "'same' or 'sqrt'")
        if not isinstance(self.keep_best, bool):
            refuse("Clan: keep_best", "True or False", self.keep_best)
        self._check_horizon()

    def _check_horizon(self) -> None:
        """Resolve the horizon's defaults (schedule, lr shape) and refuse what needs a horizon without one."""
        horizon = self.total_steps
        if horizon is not None:
            positive_int(horizon, "Clan: total_steps")
        else:
            given = {"schedule": self.schedule is not None,
                     "lr_schedule": self.lr_schedule not in (None, "constant"),
                     "warmup": self.warmup not in (None, 0, 0.0)}
            for name, set_ in given.items():
                if set_:
                    raise ValueError(f"Clan: {name}={getattr(self, name)!r} needs total_steps (the horizon it spans)")
        shape = self.lr_schedule or (HORIZON_LR_SHAPE if horizon is not None else "constant")
        warmup = self.warmup if self.warmup is not None else (HORIZON_WARMUP if horizon is not None else 0.0)
        decay = self.decay if self.decay is not None else WSD_DECAY
        check_lr_shape(shape, warmup, decay, "Clan: ")
        if shape != "wsd" and decay != WSD_DECAY:  # the default passes unremarked (the machine always gives one)
            warnings.warn(f"Clan: decay={decay!r} is the share of the 'wsd' shape's final decay; "
                          f"lr_schedule={shape!r} does not read it", stacklevel=5)
        object.__setattr__(self, "lr_schedule", shape)
        object.__setattr__(self, "warmup", float(warmup))
        object.__setattr__(self, "decay", float(decay))
        if horizon is None:
            return
        schedule = self.schedule
        if schedule is None:
            schedule = default_schedule(self.selection)
            object.__setattr__(self, "_defaulted", True)
        elif not isinstance(schedule, PhaseSchedule):
            if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence):
                raise TypeError(f"Clan: schedule must be a PhaseSchedule or a list of phases, "
                                f"got {type(schedule).__name__}")
            schedule = PhaseSchedule(list(schedule))
        for i, phase in enumerate(schedule):
            planes = {"data": phase.data, "model": phase.model}
            for plane, settings in planes.items():
                if settings:
                    raise ValueError(f"Clan: schedule[{i}] ({phase.name!r}): {plane} settings {sorted(settings)} are "
                                     "the training machine's (it loads the data and builds the model); a clan follows "
                                     "a phase's clan and optimizer settings")
        check_phases(schedule, selection="none" if self.selection is None else self.selection, init=self.init,
                     round_length=self.round_length, duty_cycle=self.duty_cycle)
        object.__setattr__(self, "schedule", schedule)

    def for_genes(self, genes) -> ClanSettings:
        """These settings for a clan of ``genes``: without a float ``lr`` gene the default plan has no search.

        Raises:
            ValueError: for a schedule of one's own with a search (it spreads the lr gene) and no lr gene.
        """
        search = [p for p in self.schedule or () if p.search is not None]
        lr = genes.get("lr")
        if not search or (lr is not None and lr.dtype == "float"):
            return self
        if self.schedule == default_schedule(self.selection):  # the default: rounds over the whole horizon
            return dataclasses.replace(self, schedule=PhaseSchedule.single("clan"))
        raise ValueError(f"Clan: phase {search[0].name!r} is a search (clan.search), which spreads the lr gene; "
                         "bind it (autobind=['adamw']) or give a schedule without a search")

    def data_plan(self, train_samples: int, batch_size: int) -> PhaseSchedule | None:
        """The default plan for this data, when it differs from the one these settings follow; else ``None``.

        A clan built without a schedule follows :func:`~vmapclan.schedule.default_schedule`
        for data of unknown size (clan rounds); the training machine chooses by the data's size
        (``passes`` and ``batch_share`` of ``train_samples`` at ``batch_size``). ``None`` as well
        without a horizon, with a schedule given (even one equal to that default), or when the
        data's plan only competes and so does this clan (``duty_cycle = 1``).

        Raises:
            ValueError, TypeError: unless both counts are positive ints.
        """
        positive_int(train_samples, "ClanSettings.data_plan: train_samples")
        positive_int(batch_size, "ClanSettings.data_plan: batch_size")
        if self.total_steps is None or not self._defaulted:
            return None
        plan = data_schedule(self.selection, self.total_steps, self.population_size, batch_size, train_samples)
        if plan == self.schedule or (plan[-1].name == "compete" and self.duty_cycle == 1):
            return None
        return plan

    @property
    def competitive_share(self) -> float:
        """The factor on a genome's lr in a competitive step: ``1 / sqrt(P)`` for ``"sqrt"`` with winner selection, else 1."""
        if self.competitive_lr == "sqrt" and self.selection == "winner":
            return self.population_size ** -0.5
        return 1.0

    def lr_factor(self, step: int, cooperative: bool) -> float:
        """The factor on every member's lr at ``step``: the time shape over the horizon, times the
        competitive share unless the step is ``cooperative``.

        The shape is ``lr_schedule``'s (:func:`~vmapclan.schedule.lr_shape_at`), 1 without a
        horizon or past it.

        Example:
            >>> round(ClanSettings(population_size=4, total_steps=10, warmup=0.0).lr_factor(5, cooperative=False), 4)
            0.2109
        """
        factor = 1.0
        if self.total_steps is not None and step < self.total_steps:
            factor = lr_shape_at(step, self.total_steps, self.lr_schedule, self.warmup, self.decay)
        return factor if cooperative else factor * self.competitive_share

    @property
    def shapes_lr(self) -> bool:
        """Whether a step's lr differs from the genome's: a time shape, or a competitive share."""
        timed = self.total_steps is not None and (self.lr_schedule != "constant" or self.warmup > 0)
        return timed or self.competitive_share != 1.0

    #: What a state's config holds of the settings besides the population, selection and genes.
    STATE_KEYS = ("total_steps", "schedule", "lr_schedule", "warmup", "decay", "competitive_lr", "keep_best",
                  "max_grad_norm")

    def state_config(self, genes, round_length: int, duty_cycle: float, adamw: Mapping | None = None) -> dict:
        """The settings a clan's saved state records, with ``genes`` and the round settings in force.

        With ``adamw`` (the optimizer's settings), also ``"adamw"``: the values of it no gene
        holds (the lr of a clan without the lr gene), which every update applies.
        """
        out = {"population_size": self.population_size, "round_length": round_length, "duty_cycle": duty_cycle,
               "selection": self.selection, "confidence": self.confidence,
               "truncation_fraction": self.truncation_fraction,
               "genes": {n: dataclasses.asdict(g) for n, g in genes.items()},
               **{k: v for k, v in self.to_dict().items() if k in self.STATE_KEYS}}
        if adamw is not None:
            out["adamw"] = {n: list(v) if isinstance(v, tuple) else v for n, v in sorted(adamw.items()) if n not in genes}
        return out

    def to_dict(self) -> dict:
        """The settings as plain values (the schedule as its phases' dicts): what a clan's state records."""
        out = dataclasses.asdict(self)
        out["schedule"] = None if self.schedule is None else self.schedule.to_dict()["phases"]
        return out


#: The default settings: ``Clan``'s keywords and the run config's ``[clan]`` section default to them.
DEFAULTS = ClanSettings()
