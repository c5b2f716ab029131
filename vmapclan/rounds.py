"""The round rules, in one place: how a round splits into phases, and how a run splits into rounds.

A round of ``round_length`` steps is cooperative for its first ``round_length - C`` steps and
competitive for the last ``C = max(1, floor(duty_cycle * round_length + 0.5))``. The clan, the
config checks, the clan's plan, the replay's export and the Lightning loader all read
these functions; none writes the rule again.

Over a horizon of ``total_steps``, a :class:`~vmapclan.PhaseSchedule` splits into *stretches*
(:func:`plan_stretches`): the clan rounds of its competitive phases, and the steps of its
cooperative phases, which train one data-parallel model outside the round clock.
:func:`check_phases` holds the rules a schedule must follow for a clan's settings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .checks import refuse

__all__ = ["COOPERATIVE", "COMPETITIVE", "competitive_steps", "round_problem", "phase_at", "plan_rounds",
           "Stretch", "plan_stretches", "check_phases"]

COOPERATIVE, COMPETITIVE = "cooperative", "competitive"


def competitive_steps(round_length: int, duty_cycle: float) -> int:
    """``C = max(1, floor(duty_cycle * round_length + 0.5))``: competitive steps per round.

    Example:
        >>> competitive_steps(100, 0.15), competitive_steps(10, 0.01)
        (15, 1)
    """
    return max(1, math.floor(duty_cycle * round_length + 0.5))


def round_problem(round_length: int, duty_cycle: float) -> str | None:
    """Why a round of ``round_length`` steps at ``duty_cycle`` cannot run, or ``None`` if it can.

    A round must keep at least one cooperative step unless ``duty_cycle == 1`` (always competitive).
    """
    competitive = competitive_steps(round_length, duty_cycle)
    if duty_cycle < 1 and round_length - competitive < 1:
        return (f"round_length={round_length} with duty_cycle={duty_cycle} leaves no cooperative step "
                f"({competitive} competitive); use a longer round or duty_cycle=1.0")
    return None


def phase_at(position: int, round_length: int, cooperative_steps: int) -> str:
    """The phase of the step ``position`` steps into a round (positions past its end count into the next ones)."""
    return COOPERATIVE if position % round_length < cooperative_steps else COMPETITIVE


def plan_rounds(steps: int, round_length: int, duty_cycle: float) -> tuple[list[int], int]:
    """Split ``steps`` of a clan phase into rounds that end inside the phase.

    Rounds are ``round_length`` long; the last absorbs the remainder. A phase shorter than one
    round gets one shorter round if it can still hold a cooperative step (or ``duty_cycle == 1``);
    otherwise its steps run cooperatively.

    Args:
        steps: Steps in the phase.
        round_length: Steps per round.
        duty_cycle: Competitive fraction.

    Returns:
        ``(round_lengths, cooperative_steps)``: the rounds, and steps left to run cooperatively.

    Example:
        >>> plan_rounds(100, 30, 0.25)
        ([30, 30, 40], 0)
        >>> plan_rounds(1, 30, 0.25)
        ([], 1)
    """
    if steps >= round_length:
        rounds = [round_length] * (steps // round_length)
        rounds[-1] += steps % round_length
        return rounds, 0
    if steps >= 1 and round_problem(steps, duty_cycle) is None:
        return [steps], 0
    return [], steps


class Stretch(NamedTuple):
    """One stretch of a clan's plan: a clan round, or steps trained cooperatively outside the round clock.

    Attributes:
        kind: ``"round"`` or ``"cooperative"``.
        index: The phase's index in the schedule.
        start: Its first step.
        end: The step after its last.
        duty_cycle: A round's competitive share (1 for a search); ``None`` for a cooperative stretch.
        search: A search round's lr spread (:func:`vmapclan.genome.search_genome`), else ``None``.
        phase_end: Whether it is its phase's last stretch.
        first: Whether it is its phase's first stretch.
    """

    kind: str
    index: int
    start: int
    end: int
    duty_cycle: float | None = None
    search: float | None = None
    phase_end: bool = False
    first: bool = False

    @property
    def cooperates(self) -> bool:
        """Whether some of its steps cooperate, each taking ``P x B`` samples: a cooperative stretch, or a round that is not all competition."""
        return self.kind == "cooperative" or self.duty_cycle != 1


def plan_stretches(schedule, total_steps: int, round_length: int, duty_cycle: float) -> tuple[Stretch, ...]:
    """The stretches that tile ``[0, total_steps)`` under ``schedule``: the one plan of a clan's rounds.

    A phase with ``clan.competition = false`` is one cooperative stretch. A search phase
    (``clan.search``) is one round over the whole phase, all competition. Another phase splits
    into rounds of its ``round_length`` (:func:`plan_rounds`: the last absorbs the remainder);
    steps too few for a round run cooperatively. A phase shorter than half a step has no
    stretch.

    Args:
        schedule: A :class:`~vmapclan.PhaseSchedule`.
        total_steps: The horizon.
        round_length: The rounds' length where a phase does not set ``clan.round_length``.
        duty_cycle: The rounds' competitive share where a phase does not set ``clan.duty_cycle``.

    Example:
        >>> from vmapclan.schedule import Phase, PhaseSchedule
        >>> plan = plan_stretches(PhaseSchedule([Phase("warm", 0, 0.2, clan={"competition": False}),
        ...                                      Phase("clan", 0.2, 1)]), 100, 30, 0.25)
        >>> [(s.kind, s.start, s.end) for s in plan]
        [('cooperative', 0, 20), ('round', 20, 50), ('round', 50, 100)]
    """
    plan = []
    for index, (phase, first, end) in enumerate(schedule.step_ranges(total_steps)):
        if end == first:
            continue  # a phase shorter than half a step
        if not phase.competition:
            plan.append(Stretch("cooperative", index, first, end, phase_end=True, first=True))
            continue
        duty = phase.duty_cycle(duty_cycle)
        if phase.search is not None:  # one round over the whole phase, all competition
            plan.append(Stretch("round", index, first, end, duty, phase.search, phase_end=True, first=True))
            continue
        rounds, leftover = plan_rounds(end - first, phase.clan.get("round_length", round_length), duty)
        position = first
        for i, length in enumerate(rounds):
            plan.append(Stretch("round", index, position, position + length, duty,
                                phase_end=not leftover and i == len(rounds) - 1, first=i == 0))
            position += length
        if leftover:  # too short for a round: these steps run cooperatively, with the incumbent's settings
            plan.append(Stretch("cooperative", index, position, end, phase_end=True, first=not rounds))
    return tuple(plan)


def check_phases(schedule, *, selection: str, init: str, round_length: int, duty_cycle: float) -> None:
    """Refuse a schedule that a clan with these settings cannot follow, naming the phase.

    Cooperative phases (``clan.competition = false``) need winner selection (members must be
    identical to cooperate) and, before the first clan round, members that start as copies
    (``init = "copy"``); a search needs winner selection; the first clan phase of independently
    initialised members is all competition; every round keeps a cooperative step unless its
    duty cycle is 1, which selection other than the winner's needs.

    Args:
        schedule: A :class:`~vmapclan.PhaseSchedule`.
        selection: ``"winner"``, ``"truncation"`` or ``"none"``.
        init: ``"copy"`` or ``"independent"``.
        round_length, duty_cycle: The defaults of phases that do not set them.

    Raises:
        ValueError: naming the phase and the setting.
    """
    competed = False
    for i, phase in enumerate(schedule):
        where = f"schedule[{i}] ({phase.name!r})"
        duty = phase.duty_cycle(duty_cycle)
        if not phase.competition and not competed and init == "independent":
            raise ValueError(f"{where}: clan.competition = false before any clan round needs clan.init = 'copy' "
                             "(independently initialised members are not identical, so they cannot cooperate)")
        if phase.search is not None and selection != "winner":
            raise ValueError(f"{where}: clan.search needs clan.selection = 'winner' (the best of the spread "
                             f"becomes the incumbent), got {selection!r}")
        if phase.competition and not competed and init == "independent" and duty != 1:
            raise ValueError(f"{where}: clan.init = 'independent' needs clan.duty_cycle = 1.0 in the first clan phase "
                             f"(members differ until the first selection, so they cannot cooperate), got {duty}")
        competed = competed or phase.competition
        if not phase.competition and selection != "winner":
            raise ValueError(f"{where}: clan.competition = false needs clan.selection = 'winner' (members must be "
                             f"identical to cooperate), got {selection!r}")
        if phase.competition and phase.search is None:
            problem = round_problem(phase.clan.get("round_length", round_length), duty)
            if problem is not None:
                raise ValueError(f"{where}.clan.{problem}")
            if selection != "winner" and duty != 1:
                refuse(f"{where}: clan.duty_cycle", f"1.0 for selection {selection!r}", duty)
