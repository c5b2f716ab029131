"""The round rules, in one place: how a round splits into phases, and how a run splits into rounds.

A round of ``round_length`` steps is cooperative for its first ``round_length - C`` steps and
competitive for the last ``C = max(1, floor(duty_cycle * round_length + 0.5))``. The clan, the
config checks, the training machine, the replay's export and the Lightning loader all read
these functions; none writes the rule again.
"""

from __future__ import annotations

import math

__all__ = ["COOPERATIVE", "COMPETITIVE", "competitive_steps", "round_problem", "phase_at", "plan_rounds"]

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
