"""Time as a first-class quantity: steps <-> normalized time t, and phases over [0, 1].

A run of ``total_steps`` steps is mapped onto ``t`` in ``[0, 1]``. A :class:`PhaseSchedule` is a
sequence of named :class:`Phase` objects that cover ``[0, 1]`` without gaps or overlaps; each
phase can override optimizer, data and clan settings while it is in force (for example a
cooperative warmup, clan rounds in the middle, a final anneal at a lower learning rate).

Step ``s`` occupies the time interval ``[s / T, (s + 1) / T)`` and belongs to the phase that
holds the interval's midpoint, so a phase boundary at ``t`` falls before step
``ceil(t * T - 0.5)``. The clan's plan and the replay both use this one rule, which is
why an exported schedule replays on exactly the steps it was recorded on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .checks import int_in, is_int, is_number, number_in, one_of, refuse

__all__ = ["TimeController", "Phase", "PhaseSchedule", "OPTIMIZER_KEYS", "DATA_KEYS", "MODEL_KEYS", "CLAN_KEYS",
           "phase_optimizer", "LR_SHAPES", "lr_shape_at", "check_lr_shape", "default_schedule", "SEARCH_SHARE",
           "SEARCH_SPREAD", "SCARCE_BATCH_SHARE", "data_schedule"]

#: The default schedule's search phase: its share of the run's time, and how far it spreads the lr.
SEARCH_SHARE, SEARCH_SPREAD = 0.1, 30.0
#: The default schedule's scarce-data rule: when one cooperative step's batch (P x B) is at least
#: this share of the training set, the rounds after the search are all competition.
SCARCE_BATCH_SHARE = 0.25

#: Optimizer settings a phase may override: the AdamW genes, plus ``lr_scale`` (a factor on the
#: incumbent's learning rate, see :func:`phase_optimizer`).
OPTIMIZER_KEYS = ("lr", "weight_decay", "betas/0", "betas/1", "eps", "lr_scale")
#: Data settings every phase may override (``batch_size`` is per member in the training machine).
#: A task adds its own (its :attr:`~vmapclan.Task.phase_data`, e.g. ``seq_len`` for
#: stdlib-chars); the training machine and the replay check a phase's other keys against it.
DATA_KEYS = ("batch_size",)
#: Model settings a phase may set: ``freeze``, glob patterns over parameter names
#: (``["embed.*", "blocks.0.*"]``) whose parameters get no update while the phase lasts, and
#: ``grow``, the task's growth settings (:meth:`~vmapclan.Task.grow`), applied at the phase's start.
MODEL_KEYS = ("freeze", "grow")
#: Clan settings a phase may override. ``competition = false`` runs the population
#: cooperatively (identical members, data-parallel) with no rounds and no selection.
CLAN_KEYS = ("competition", "round_length", "duty_cycle", "search")

_TOL = 1e-9  # phase edges closer than this are the same point (floats from TOML or JSON)


_is_number = is_number


def _is_positive_int(value) -> bool:
    return is_int(value) and value >= 1


class TimeController:
    """Maps steps to normalized time ``t = step / total_steps`` and back, and keeps the current step.

    Args:
        total_steps: Steps in the whole run (a positive int).

    Raises:
        ValueError: if ``total_steps`` is not a positive int.

    Example:
        >>> clock = TimeController(200)
        >>> clock.time_at(50), clock.step_at(0.25)
        (0.25, 50)
        >>> clock.advance(10); clock.t
        0.05
    """

    def __init__(self, total_steps: int):
        if not _is_positive_int(total_steps):
            raise ValueError(f"TimeController: total_steps must be a positive int, got {total_steps!r}")
        self.total_steps = total_steps
        self.step = 0

    def time_at(self, step: int) -> float:
        """Normalized time at the start of ``step`` (``step`` in ``[0, total_steps]``).

        Raises:
            ValueError: for a step outside ``[0, total_steps]``.
        """
        int_in(step, "TimeController.time_at: step", 0, self.total_steps)
        return step / self.total_steps

    def step_at(self, t: float) -> int:
        """The first step whose midpoint lies at or after ``t``: ``ceil(t * T - 0.5)``, in ``[0, T]``.

        Raises:
            ValueError: for ``t`` outside ``[0, 1]``.
        """
        if not _is_number(t) or not -_TOL <= t <= 1 + _TOL:
            raise ValueError(f"TimeController.step_at: t must be a number in [0, 1], got {t!r}")
        return min(self.total_steps, max(0, math.ceil(t * self.total_steps - 0.5)))

    @property
    def t(self) -> float:
        """Normalized time now."""
        return self.step / self.total_steps

    @property
    def done(self) -> bool:
        """Whether every step has run."""
        return self.step >= self.total_steps

    def advance(self, steps: int = 1) -> None:
        """Move the clock forward.

        Raises:
            ValueError: for a negative count or one that passes ``total_steps``.
        """
        int_in(steps, "TimeController.advance: steps", 0, expected="a non-negative int")
        if self.step + steps > self.total_steps:
            raise ValueError(
                f"TimeController.advance: {steps} more steps from step {self.step} passes total_steps={self.total_steps}"
            )
        self.step += steps

    def state_dict(self) -> dict:
        """``{"total_steps", "step"}``."""
        return {"total_steps": self.total_steps, "step": self.step}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: if the saved ``total_steps`` differs.
        """
        if state.get("total_steps") != self.total_steps:
            raise ValueError(
                f"TimeController.load_state_dict: saved total_steps={state.get('total_steps')!r}, "
                f"this clock has {self.total_steps}"
            )
        self.step = int_in(state.get("step"), "TimeController.load_state_dict: step", 0, self.total_steps)


def _check_overrides(where: str, kind: str, overrides, allowed: Sequence[str]) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"{where}: {kind} must be a dict of overrides, got {type(overrides).__name__}")
    # Data keys beyond DATA_KEYS belong to the task, which the machine asks when the run is built.
    unknown = [k for k in overrides if k not in allowed and not (kind == "data" and isinstance(k, str))]
    if unknown:
        raise ValueError(f"{where}: unknown {kind} setting {unknown[0]!r}; expected one of {list(allowed)}")
    for key, value in overrides.items():
        bad = None
        if key in ("lr", "eps", "lr_scale"):
            bad = None if _is_number(value) and value > 0 else "a positive number"
        elif key == "weight_decay":
            bad = None if _is_number(value) and value >= 0 else "a non-negative number"
        elif key in ("betas/0", "betas/1"):
            bad = None if _is_number(value) and 0 <= value < 1 else "a number in [0, 1)"
        elif key in ("batch_size", "round_length"):
            bad = None if _is_positive_int(value) else "a positive int"
        elif key == "duty_cycle":
            bad = None if _is_number(value) and 0 < value <= 1 else "a number in (0, 1]"
        elif key == "competition":
            bad = None if isinstance(value, bool) else "true or false"
        elif key == "search":
            bad = None if _is_number(value) and 1 < value <= 1000 else "a number in (1, 1000]"
        elif key == "freeze":
            ok = (isinstance(value, (list, tuple)) and value
                  and all(isinstance(v, str) and v for v in value))
            bad = None if ok else "a non-empty list of parameter name patterns"
        if bad:
            raise ValueError(f"{where}: {kind}.{key} must be {bad}, got {value!r}")
    return dict(overrides)


@dataclasses.dataclass(frozen=True)
class Phase:
    """A named stretch ``[start_t, end_t)`` of normalized time with its setting overrides.

    Args:
        name: Non-empty name, unique within a schedule.
        start_t: Where the phase begins, in ``[0, 1)``.
        end_t: Where it ends, in ``(start_t, 1]``.
        optimizer: Overrides of ``lr``, ``weight_decay``, ``betas/0``, ``betas/1``, ``eps`` (fixed
            values) and ``lr_scale`` (a factor on the incumbent's learning rate when the phase
            begins; see :func:`phase_optimizer`). They need ``clan.competition = false``: a clan
            phase evolves them.
        data: Overrides of ``batch_size`` and of the data settings the task lets a phase change
            (:attr:`vmapclan.Task.phase_data`, e.g. ``seq_len``); the data is reloaded with them
            from the phase's first step.
        model: ``freeze``: glob patterns (:mod:`fnmatch`) over the model's parameter names;
            the parameters they match get no update and no weight decay while the phase lasts,
            and their optimizer moments are kept as they were. A pattern that matches no
            parameter is an error when the run is built. ``grow``: the task's settings for
            growing the model at the phase's start (:meth:`vmapclan.Task.grow`, e.g.
            ``{"blocks": 1, "init": "identity"}`` for stdlib-chars), checked by the task when
            the run is built; not in the first phase.
        clan: ``competition`` (bool, default true: clan rounds with selection; false: the
            population trains cooperatively as one data-parallel model), ``round_length``,
            ``duty_cycle``; ``search`` (a number s > 1) makes the phase a *search*: one round
            over the whole phase, all competition, in which member 0 keeps the incumbent and
            the others try learning rates spread evenly in log over ``[lr / s, lr * s]``
            (:func:`vmapclan.genome.search_genome`) with every other gene at the incumbent's
            value; the round's winner, as any round's, becomes the incumbent.

    Raises:
        ValueError, TypeError: naming the phase and the bad field.

    Example:
        >>> Phase("anneal", 0.9, 1.0, optimizer={"lr_scale": 0.1}, clan={"competition": False}).competition
        False
    """

    name: str
    start_t: float
    end_t: float
    optimizer: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    clan: dict = dataclasses.field(default_factory=dict)
    model: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Phase: name must be a non-empty string, got {self.name!r}")
        where = f"Phase {self.name!r}"
        for field in ("start_t", "end_t"):
            value = getattr(self, field)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"{where}: {field} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, field, float(value))
        if not self.start_t < self.end_t:
            raise ValueError(f"{where}: start_t must be below end_t, got start_t={self.start_t}, end_t={self.end_t}")
        object.__setattr__(self, "optimizer", _check_overrides(where, "optimizer", self.optimizer, OPTIMIZER_KEYS))
        object.__setattr__(self, "data", _check_overrides(where, "data", self.data, DATA_KEYS))
        object.__setattr__(self, "clan", _check_overrides(where, "clan", self.clan, CLAN_KEYS))
        model = _check_overrides(where, "model", self.model, MODEL_KEYS)
        if "freeze" in model:
            model["freeze"] = list(model["freeze"])
        object.__setattr__(self, "model", model)
        if self.optimizer and self.competition:
            raise ValueError(
                f"{where}: optimizer overrides {sorted(self.optimizer)} need clan.competition = false "
                "(a phase with clan rounds evolves the optimizer's hyperparameters)"
            )
        if "lr" in self.optimizer and "lr_scale" in self.optimizer:
            raise ValueError(f"{where}: give optimizer.lr or optimizer.lr_scale, not both")
        if self.search is not None:
            clash = [k for k in ("competition", "round_length", "duty_cycle") if k in self.clan]
            if clash:
                raise ValueError(f"{where}: clan.search is one round over the whole phase, all competition; "
                                 f"it takes no clan.{clash[0]}")

    @property
    def competition(self) -> bool:
        """Whether clan rounds (competition and selection) run in this phase."""
        return self.clan.get("competition", True)

    @property
    def search(self) -> float | None:
        """The lr's spread of a search phase (``clan.search``), else ``None``."""
        return self.clan.get("search")

    def duty_cycle(self, default: float) -> float:
        """The competitive share of the phase's rounds: 1 for a search (all competition), else its
        ``clan.duty_cycle`` or ``default`` (the run's)."""
        return 1.0 if self.search is not None else self.clan.get("duty_cycle", default)

    @property
    def duration(self) -> float:
        """``end_t - start_t``."""
        return self.end_t - self.start_t

    def contains(self, t: float) -> bool:
        """Whether ``start_t <= t < end_t`` (the last phase of a schedule also holds ``t = 1``)."""
        return self.start_t <= t < self.end_t

    def to_dict(self) -> dict:
        """A plain dict (JSON and TOML safe); empty override tables are left out."""
        out: dict[str, Any] = {"name": self.name, "start_t": self.start_t, "end_t": self.end_t}
        for key in ("optimizer", "data", "clan", "model"):
            if getattr(self, key):
                out[key] = copy.deepcopy(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Phase:
        """Build from :meth:`to_dict`'s form.

        Raises:
            ValueError: for missing or unknown fields.
            TypeError: if ``data`` is not a dict.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"Phase.from_dict: expected a dict, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise ValueError(f"Phase.from_dict: unknown field {unknown[0]!r}; expected some of {sorted(fields)}")
        for key in ("name", "start_t", "end_t"):
            if key not in data:
                raise ValueError(f"Phase.from_dict: missing field {key!r} in {dict(data)!r}")
        return cls(**data)


class PhaseSchedule:
    """Named phases that cover ``[0, 1]`` in order, with no gaps or overlaps.

    Args:
        phases: :class:`Phase` objects (or their dicts), in time order.

    Raises:
        ValueError: for an empty schedule, duplicate names, or phases that do not tile ``[0, 1]``
            (the message names the phases at the gap or overlap).

    Example:
        >>> schedule = PhaseSchedule([
        ...     Phase("warmup", 0.0, 0.1, clan={"competition": False}),
        ...     Phase("clan", 0.1, 0.9),
        ...     Phase("anneal", 0.9, 1.0, optimizer={"lr_scale": 0.1}, clan={"competition": False}),
        ... ])
        >>> schedule.phase_at(0.5).name
        'clan'
        >>> [(p.name, a, b) for p, a, b in schedule.step_ranges(100)]
        [('warmup', 0, 10), ('clan', 10, 90), ('anneal', 90, 100)]
    """

    def __init__(self, phases: Sequence[Phase | Mapping]):
        if isinstance(phases, (str, bytes, Mapping)) or not isinstance(phases, Sequence):
            raise TypeError(f"PhaseSchedule: phases must be a list of Phase objects, got {type(phases).__name__}")
        built = []
        for i, phase in enumerate(phases):
            if isinstance(phase, Mapping):
                phase = Phase.from_dict(phase)
            if not isinstance(phase, Phase):
                raise TypeError(f"PhaseSchedule: phases[{i}] must be a Phase or a dict, got {type(phase).__name__}")
            built.append(phase)
        if not built:
            raise ValueError("PhaseSchedule: needs at least one phase")
        names = [p.name for p in built]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"PhaseSchedule: phase names must be unique, {duplicates[0]!r} appears more than once")
        if abs(built[0].start_t) > _TOL:
            raise ValueError(
                f"PhaseSchedule: the first phase {built[0].name!r} starts at t={built[0].start_t}; "
                "the phases must cover [0, 1] from t=0"
            )
        for a, b in zip(built, built[1:]):
            if b.start_t > a.end_t + _TOL:
                raise ValueError(
                    f"PhaseSchedule: gap between phase {a.name!r} (ends at t={a.end_t}) and "
                    f"phase {b.name!r} (starts at t={b.start_t})"
                )
            if b.start_t < a.end_t - _TOL:
                raise ValueError(
                    f"PhaseSchedule: phase {a.name!r} (ends at t={a.end_t}) overlaps phase {b.name!r} "
                    f"(starts at t={b.start_t}); phases must be in time order without overlaps"
                )
        if abs(built[-1].end_t - 1) > _TOL:
            raise ValueError(
                f"PhaseSchedule: the last phase {built[-1].name!r} ends at t={built[-1].end_t}; "
                "the phases must cover [0, 1] up to t=1"
            )
        self.phases: tuple[Phase, ...] = tuple(built)

    @classmethod
    def single(cls, name: str = "main", **overrides) -> PhaseSchedule:
        """One phase over all of ``[0, 1]`` (``overrides`` as for :class:`Phase`)."""
        return cls([Phase(name, 0.0, 1.0, **overrides)])

    def __len__(self) -> int:
        return len(self.phases)

    def __iter__(self):
        return iter(self.phases)

    def __getitem__(self, key: int | str) -> Phase:
        """A phase by position or by name."""
        if isinstance(key, str):
            for phase in self.phases:
                if phase.name == key:
                    return phase
            raise KeyError(f"PhaseSchedule: no phase named {key!r}; the phases are {[p.name for p in self.phases]}")
        return self.phases[key]

    def __eq__(self, other) -> bool:
        return isinstance(other, PhaseSchedule) and self.phases == other.phases

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.name}[{p.start_t:g}, {p.end_t:g})" for p in self.phases)
        return f"PhaseSchedule({inner})"

    def index_at(self, t: float) -> int:
        """Position of the phase in force at ``t`` (``t = 1`` is in the last phase).

        Raises:
            ValueError: for ``t`` outside ``[0, 1]``.
        """
        if not _is_number(t) or not 0 <= t <= 1:
            raise ValueError(f"PhaseSchedule.phase_at: t must be a number in [0, 1], got {t!r}")
        for i, phase in enumerate(self.phases[:-1]):
            if t < self.phases[i + 1].start_t:
                return i
        return len(self.phases) - 1

    def phase_at(self, t: float) -> Phase:
        """The phase in force at normalized time ``t``.

        Raises:
            ValueError: for ``t`` outside ``[0, 1]``.
        """
        return self.phases[self.index_at(t)]

    def phase_at_step(self, step: int, total_steps: int) -> Phase:
        """The phase that step ``step`` of ``total_steps`` belongs to: the one whose :meth:`step_ranges` holds it.

        Raises:
            ValueError: for a step outside ``[0, total_steps)``.
        """
        int_in(step, "PhaseSchedule.phase_at_step: step", 0, total_steps - 1, expected=f"an int in [0, {total_steps})")
        # The ranges, not the step's midpoint in float time: the two disagree where an edge falls
        # on a half step and rounds one way in t * total_steps and the other in (step + 0.5) / total_steps.
        return next(phase for phase, first, end in self.step_ranges(total_steps) if first <= step < end)

    def step_ranges(self, total_steps: int) -> list[tuple[Phase, int, int]]:
        """``(phase, first_step, end_step)`` for every phase over a run of ``total_steps``.

        The ranges tile ``[0, total_steps)``; a phase shorter than half a step may get none
        (``first_step == end_step``).
        """
        clock = TimeController(total_steps)
        edges = [clock.step_at(p.start_t) for p in self.phases] + [total_steps]
        return [(p, edges[i], max(edges[i], edges[i + 1])) for i, p in enumerate(self.phases)]

    def to_dict(self) -> dict:
        """``{"phases": [phase dicts]}``."""
        return {"phases": [p.to_dict() for p in self.phases]}

    @classmethod
    def from_dict(cls, data: Mapping | Sequence) -> PhaseSchedule:
        """Build from :meth:`to_dict`'s form (or a bare list of phase dicts).

        Raises:
            ValueError, TypeError: for a malformed schedule.
        """
        if isinstance(data, Mapping):
            if "phases" not in data:
                raise ValueError("PhaseSchedule.from_dict: missing field 'phases'")
            data = data["phases"]
        return cls(data)

    def save(self, path: str | os.PathLike, **metadata) -> None:
        """Write ``{"phases": [...], **metadata}`` as JSON."""
        with open(path, "w") as f:
            json.dump({**metadata, **self.to_dict()}, f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PhaseSchedule:
        """Read a schedule written by :meth:`save` (other top-level keys are ignored)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))


def phase_optimizer(overrides: Mapping[str, float], incumbent: Mapping[str, float]) -> dict[str, float]:
    """The AdamW settings a cooperative phase trains with: the incumbent's, with the phase's overrides.

    The one meaning of a phase's optimizer table, for the clan and the replay alike:
    a fixed value (``lr``, ``weight_decay``, ``betas/0``, ``betas/1``, ``eps``) replaces the
    incumbent's; ``lr_scale`` multiplies the incumbent's ``lr``. The incumbent is the genome the
    clan has evolved when the phase begins (in the clan), or the configured optimizer's
    settings where nothing evolves them (a plain replay, or a run before its first round).

    Args:
        overrides: The phase's ``optimizer`` table.
        incumbent: ``{gene: value}`` for every AdamW gene.

    Returns:
        ``{gene: value}`` for every AdamW gene.

    Example:
        >>> phase_optimizer({"lr_scale": 0.1, "eps": 1e-6}, {"lr": 3e-3, "weight_decay": 0.0, "betas/0": 0.9,
        ...                                                   "betas/1": 0.999, "eps": 1e-8})["lr"]
        0.00030000000000000003
    """
    settings = {name: float(value) for name, value in incumbent.items()}
    for key, value in overrides.items():
        if key == "lr_scale":
            settings["lr"] = settings["lr"] * value
        else:
            settings[key] = float(value)
    return settings


#: The time shapes of the learning rate over a run (see :func:`lr_shape_at`).
LR_SHAPES = ("constant", "cosine", "wsd")


def check_lr_shape(shape: str, warmup: float, decay: float, where: str = "optimizer.") -> None:
    """Raise ``ValueError`` unless ``(shape, warmup, decay)`` describe a learning-rate shape :func:`lr_shape_at` can run.

    Args:
        shape: One of :data:`LR_SHAPES`.
        warmup: Share of the run's time spent warming up, in ``[0, 0.5]``.
        decay: For ``"wsd"``: share of the run's time at the end over which the lr decays, in
            ``(0, 1 - warmup]``.
        where: What the settings' names follow in the message (``"optimizer."``, ``"Clan: "``).
    """
    one_of(shape, f"{where}lr_schedule", LR_SHAPES)
    number_in(warmup, f"{where}warmup", 0, 0.5)
    if not _is_number(decay) or not 0 < decay <= 1 - warmup:
        refuse(f"{where}decay", f"a number in (0, 1 - warmup] = (0, {1 - warmup:g}]", decay)


def lr_shape_at(step: int, total_steps: int, shape: str = "constant", warmup: float = 0.0,
                decay: float = 0.2) -> float:
    """The factor on the learning rate at ``step`` of ``total_steps``: the run's time-shaped base schedule.

    The applied learning rate of every member is its ``lr`` (the gene, or a cooperative
    phase's setting) times this factor, so the clan evolves the level and the shape gives the
    form over time. The factor is read at the step's midpoint ``t = (step + 1/2) / T``:

    - a linear warmup from 0 to 1 over ``t < warmup`` (every shape);
    - ``"constant"``: 1 after it;
    - ``"cosine"``: ``(1 + cos(pi * (t - warmup) / (1 - warmup))) / 2`` after it, down to 0 at ``t = 1``;
    - ``"wsd"`` (warmup, stable, decay): 1 until ``t = 1 - decay``, then linear down to 0 at ``t = 1``.

    Args:
        step: The step, in ``[0, total_steps)``.
        total_steps: Steps of the run.
        shape: One of :data:`LR_SHAPES`.
        warmup: Share of the run's time spent warming up.
        decay: For ``"wsd"``: share of the run's time the final decay takes.

    Example:
        >>> [round(lr_shape_at(s, 4, "cosine"), 3) for s in range(4)]
        [0.962, 0.691, 0.309, 0.038]
        >>> round(lr_shape_at(0, 100, "constant", warmup=0.1), 6)
        0.05
    """
    int_in(step, "lr_shape_at: step", 0, total_steps - 1, expected=f"an int in [0, {total_steps})")
    one_of(shape, "lr_shape_at: shape", LR_SHAPES)
    t = (step + 0.5) / total_steps
    if t < warmup:
        return t / warmup
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (1.0 - warmup)))
    if shape == "wsd" and t > 1.0 - decay:
        return (1.0 - t) / decay
    return 1.0


def default_schedule(selection: str = "winner", passes: float | None = None,
                     batch_share: float | None = None) -> PhaseSchedule:
    """The phases of a clan with a horizon and no schedule of its own (and of a run whose config names none).

    With winner selection, two phases:

    - ``search`` over the first :data:`SEARCH_SHARE` of the run: one all-competitive round in
      which the members try learning rates spread :data:`SEARCH_SPREAD`-fold either way of the
      configured one (``clan.search``); the best becomes the incumbent. Mutations by small
      factors, round after round, cannot move the lr that far, and greedy selection on short
      rounds drifts it down.
    - then, by the data's size:

      - when the run sees each training sample at most once (``passes <= 1``: the data is
        abundant, nothing can be overfitted, and the rounds' short-horizon selection costs more
        than it finds), ``train``: one data-parallel model to the end at the searched lr
        (``clan.competition = false``);
      - when one cooperative step's batch would hold at least :data:`SCARCE_BATCH_SHARE` of the
        training set (``batch_share = P x B / training samples``: scarce data), ``compete``:
        rounds of all competition (``clan.duty_cycle = 1``), each member at batch B. A batch
        that large leaves little of the gradient noise that keeps a small-data model from
        fitting its training set too closely. On the bench's four such tasks (``batch_share``
        0.38-0.6) all competition cut the fine-tune's test loss by a quarter and moved the others
        by 0.97x to 1.06x (breast cancer the one that lost), while on tasks at 0.2 and below
        cooperation won;
      - otherwise (or when not known) ``clan``: clan rounds, whose selection and kept best
        incumbent guard against overfitting the repeated data.

    With truncation or no selection (PBT, a sweep): one phase of clan rounds, ``clan``. A run of
    fewer than 5 steps gives the search no step (a phase shorter than half a step is skipped).

    Args:
        selection: ``"winner"``, ``"truncation"``, or ``"none"`` / ``None`` (a sweep).
        passes: Passes over the training data the run would make if every step were
            cooperative (``total_steps * population_size * batch_size / training samples``);
            ``None`` when not known yet.
        batch_share: The share of the training data one cooperative step reads
            (``population_size * batch_size / training samples``); ``None`` when not known.

    Example:
        >>> [(p.name, p.clan) for p in default_schedule("winner", passes=0.5)]
        [('search', {'search': 30.0}), ('train', {'competition': False})]
        >>> [(p.name, p.clan) for p in default_schedule("winner", passes=170.0, batch_share=0.43)][1]
        ('compete', {'duty_cycle': 1.0})
    """
    if selection != "winner":
        return PhaseSchedule.single("clan")
    if passes is not None and passes <= 1:
        main = Phase("train", SEARCH_SHARE, 1.0, clan={"competition": False})
    elif batch_share is not None and batch_share >= SCARCE_BATCH_SHARE:
        main = Phase("compete", SEARCH_SHARE, 1.0, clan={"duty_cycle": 1.0})
    else:
        main = Phase("clan", SEARCH_SHARE, 1.0)
    return PhaseSchedule([Phase("search", 0.0, SEARCH_SHARE, clan={"search": SEARCH_SPREAD}), main])


def data_schedule(selection: str, total_steps: int, population_size: int, batch_size: int,
                  train_samples: int) -> PhaseSchedule:
    """:func:`default_schedule` for a run of ``total_steps`` over ``train_samples`` at ``batch_size`` per member.

    The one place that turns the data's size into ``passes`` and ``batch_share``: the training
    machine plans with it, and :meth:`vmapclan.ClanSettings.data_plan` compares a clan's plan to it.

    Example:
        >>> [p.name for p in data_schedule("winner", 400, 8, 8, 150)]  # 64 of 150 samples a step
        ['search', 'compete']
    """
    share = population_size * batch_size / train_samples
    return default_schedule(selection, total_steps * share, share)
