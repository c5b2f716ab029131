"""The clan's clock: its rounds, and over a horizon the stretches of its plan.

Three counts move with the training steps (:meth:`RoundClock.advance`):

- ``time_step``: every step trained: the time the lr's shape and the plan are read at;
- ``round_step`` and ``global_step``: the steps of clan rounds, in the current round and since
  the start. Steps that train the members as one model outside the round clock (a cooperative
  stretch of the plan, or :meth:`vmapclan.Clan.cooperate`) leave them alone.

With a horizon (``total_steps``) the clock follows a plan (:func:`vmapclan.rounds.plan_stretches`):
the stretch in force says whether the steps are a round's or a cooperative stretch's, and a
stretch ends at its last step (:attr:`RoundClock.round_done`). Without one, rounds of the current
settings follow each other for as long as the user trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .checks import is_int, number_in, refuse
from .rounds import COMPETITIVE, COOPERATIVE, Stretch, competitive_steps, phase_at, plan_stretches, round_problem

__all__ = ["RoundClock", "check_round_settings"]


def check_round_settings(round_length: int, duty_cycle, selection: str | None) -> None:
    """Refuse round settings no round can run with, or that ``selection`` cannot cooperate under.

    Raises:
        ValueError: for a duty cycle outside (0, 1], a round without a cooperative step (unless
            ``duty_cycle == 1``), or selection other than the winner's with ``duty_cycle < 1``.
    """
    number_in(duty_cycle, "Clan: duty_cycle", 0, 1, low_open=True, expected="in (0, 1]")
    problem = round_problem(round_length, duty_cycle)
    if problem is not None:
        raise ValueError(f"Clan: {problem}")
    if selection != "winner" and duty_cycle != 1:
        raise ValueError(f"Clan: selection={selection!r} keeps members that differ, so it needs duty_cycle=1.0 "
                         f"(a cooperative phase averages gradients over identical members), got {duty_cycle}")


class RoundClock:
    """Where a clan stands in its rounds and, with a horizon, in its plan.

    Args:
        round_length: Steps per round (with a plan: of the rounds whose phase sets none).
        duty_cycle: Competitive share of a round, in (0, 1].
        selection: The clan's selection (checked against the duty cycle).
        total_steps: The horizon, or ``None``.
        plan: The stretches that tile ``[0, total_steps)``, with a horizon.

    Attributes:
        round: Rounds completed.
        round_step: Steps of the current round run so far.
        global_step: Round steps since the start.
        time_step: Steps trained since the start, every kind.
        stretch: The plan's current stretch (its index; ``len(plan)`` once the plan is done).
        record_start: Where the current stretch's next record starts: its start, or the step of
            a divergence restore inside it.
        held: Whether the round clock is held (inside :meth:`vmapclan.Clan.cooperate`): steps
            count time only.
    """

    def __init__(self, round_length: int, duty_cycle: float, *, selection: str | None,
                 total_steps: int | None = None, plan: Sequence[Stretch] = ()):
        self.selection = selection
        self.total_steps = total_steps
        self.plan: tuple[Stretch, ...] = tuple(plan)
        self.round = self.round_step = self.global_step = self.time_step = 0
        self.stretch = self.record_start = 0
        self.held = False
        self.set_round(round_length, duty_cycle)

    @classmethod
    def from_settings(cls, settings) -> RoundClock:
        """A clan's clock for its :class:`~vmapclan.settings.ClanSettings`: with a horizon, at the start of its plan."""
        s = settings
        plan = () if s.total_steps is None else plan_stretches(s.schedule, s.total_steps, s.round_length,
                                                                s.duty_cycle)
        clock = cls(s.round_length, s.duty_cycle, selection=s.selection, total_steps=s.total_steps, plan=plan)
        if plan:
            clock.enter(0)
        return clock

    # -- settings -------------------------------------------------------------------------------
    def set_round(self, round_length: int, duty_cycle: float) -> None:
        """Use rounds of ``round_length`` steps at ``duty_cycle`` (checked) from the next round on."""
        check_round_settings(round_length, duty_cycle, self.selection)
        self.round_length, self.duty_cycle = round_length, float(duty_cycle)
        self.competitive_steps = competitive_steps(round_length, duty_cycle)
        self.cooperative_steps = round_length - self.competitive_steps

    @property
    def current(self) -> Stretch | None:
        """The plan's stretch in force (``None`` without a plan, or once it is done)."""
        return self.plan[self.stretch] if self.stretch < len(self.plan) else None

    @property
    def done(self) -> bool:
        """Whether the plan has run to its end (never, without a plan)."""
        return bool(self.plan) and self.stretch >= len(self.plan)

    @property
    def in_cooperative_stretch(self) -> bool:
        """Whether the plan's stretch in force trains cooperatively outside the round clock."""
        current = self.current
        return current is not None and current.kind == "cooperative"

    def enter(self, index: int) -> Stretch | None:
        """Move to the plan's stretch ``index`` (a round gets its settings); returns it, or ``None`` past the end."""
        self.stretch = index
        stretch = self.current
        self.record_start = self.total_steps if stretch is None else stretch.start
        if stretch is not None and stretch.kind == "round":
            self.set_round(stretch.end - stretch.start, stretch.duty_cycle)
        return stretch

    # -- the phase of a step --------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """The phase of the current step; a done round stays in its last phase until selection."""
        if self.in_cooperative_stretch:
            return COOPERATIVE
        return phase_at(min(self.round_step, self.round_length - 1), self.round_length, self.cooperative_steps)

    @property
    def cooperating(self) -> bool:
        """Whether the next step trains the members as one data-parallel model."""
        return self.held or self.phase == COOPERATIVE

    def phase_ahead(self, steps: int) -> str:
        """The phase of the step ``steps`` after the next one (past a round's end: in the rounds after it)."""
        if self.held:  # inside Clan.cooperate(): every step cooperates, the round clock stands
            return COOPERATIVE
        if not self.plan:
            return phase_at(self.round_step + steps, self.round_length, self.cooperative_steps)
        t = self.time_step + steps
        for stretch in self.plan[self.stretch:]:
            if t < stretch.end:
                if stretch.kind == "cooperative":
                    return COOPERATIVE
                length = stretch.end - stretch.start
                return phase_at(t - stretch.start, length, length - competitive_steps(length, stretch.duty_cycle))
        return COMPETITIVE  # past the horizon: no step will run there

    def cooperating_ahead(self, steps: int) -> bool:
        """Whether the step ``steps`` after the next one trains the members as one data-parallel model."""
        return self.held or self.phase_ahead(steps) == COOPERATIVE

    @property
    def round_done(self) -> bool:
        """Whether the round (or the plan's cooperative stretch) in force has run all its steps."""
        if self.done:
            return True
        if self.in_cooperative_stretch:
            return self.time_step >= self.current.end
        return self.round_step >= self.round_length

    # -- moving ---------------------------------------------------------------------------------
    def advance(self) -> bool:
        """Count one training step; returns whether the next step is the round's first competitive one.

        Raises:
            RuntimeError: if the round or the plan is done.
        """
        if self.done:
            raise RuntimeError(f"member.step(): the clan's schedule is done ({self.total_steps} steps); "
                               "train a new clan to go on")
        if self.round_done:
            what = "cooperative stretch" if self.in_cooperative_stretch else "round"
            raise RuntimeError(
                f"member.step(): {what} {self.round} is done ({self._length()} steps); "
                "call clan.step(val_losses) and take the next member from clan.round()")
        self.time_step += 1
        if self.held or self.in_cooperative_stretch:
            return False
        self.round_step += 1
        self.global_step += 1
        return self.round_step == self.cooperative_steps

    def _length(self) -> int:
        current = self.current
        return current.end - current.start if current is not None and current.kind == "cooperative" else \
            self.round_length

    def next_round(self) -> None:
        """Start the next round (after selection, or a divergence restore)."""
        self.round += 1
        self.round_step = 0

    def record_fields(self, schedule) -> dict:
        """What the record of the plan's stretch in force says of it: its kind, phase and steps (none without a plan).

        A round's record also gives its cooperative steps and a search's spread; a cooperative
        stretch's starts at :attr:`record_start`.
        """
        stretch = self.current
        if stretch is None:
            return {}
        fields = {"kind": stretch.kind, "phase": schedule[stretch.index].name}
        if stretch.kind == "cooperative":
            return {**fields, "start_step": self.record_start, "end_step": self.time_step}
        fields.update(start_step=stretch.start, end_step=self.time_step, cooperative_steps=self.cooperative_steps)
        return {**fields, **({"search": stretch.search} if stretch.search is not None else {})}

    # -- state ----------------------------------------------------------------------------------
    FIELDS = ("round", "round_step", "global_step", "time_step", "stretch", "record_start")

    def state_dict(self) -> dict:
        """The counts, as plain ints (the round settings travel in the clan's config)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def check_state(self, state: Mapping, config: Mapping, who: str) -> None:
        """Refuse a saved clock no clan with this plan can be at: counts out of range, or off the plan.

        Args:
            state: The clan's state (:meth:`state_dict`'s fields at its top level).
            config: The state's config (``round_length``, ``duty_cycle``).
            who: The caller, for the messages.

        Raises:
            ValueError: naming the entry.
        """
        def bad(name: str, expected: str, got) -> None:
            refuse(f"{who}: the checkpoint's {name}", expected, got)

        round_length, duty_cycle = config.get("round_length"), config.get("duty_cycle")
        if not is_int(round_length) or round_length < 1:
            bad("round_length", "a positive int", round_length)
        try:
            check_round_settings(round_length, duty_cycle, self.selection)
        except ValueError as err:
            raise ValueError(f"{who}: the checkpoint's round settings are impossible: {err}") from None
        horizon = self.total_steps
        limits = {"round": None, "round_step": round_length, "global_step": None, "time_step": horizon,
                  "stretch": len(self.plan), "record_start": horizon}
        for name, high in limits.items():
            value = state[name]
            if not is_int(value) or value < 0 or (high is not None and value > high):
                bad(name, f"an int in [0, {high if high is not None else 'inf'}]", value)
        if state["global_step"] < state["round_step"]:
            bad("global_step", f">= round_step ({state['round_step']})", state["global_step"])
        if self.plan:
            self._check_position(state, round_length, duty_cycle, bad, who)

    def _check_position(self, state: Mapping, round_length: int, duty_cycle: float, bad: Callable, who: str) -> None:
        """Refuse a saved clock whose round clock is not where the plan has it at its time step.

        A clock stands in the stretch that holds its step, or at the end of its stretch (the
        stretch done, before ``clan.step``): in a round, as many steps in as the plan says, with
        the round's settings; between rounds (a cooperative stretch, or a round's start) at step 0.
        """
        step, index, in_round = state["time_step"], state["stretch"], state["round_step"]
        if index == len(self.plan):
            if step != self.total_steps:
                bad("time_step", f"{self.total_steps} (the plan is done)", step)
            return
        saved = self.plan[index]
        at_end = step == saved.end and (saved.kind == "cooperative" or in_round == saved.end - saved.start)
        stretch = saved if saved.start <= step < saved.end or at_end else next(
            (s for s in self.plan if s.start <= step < s.end), saved)
        if stretch.kind == "round" and step > stretch.start:
            expected = (stretch.end - stretch.start, step - stretch.start, stretch.duty_cycle)
            if (round_length, in_round, duty_cycle) != expected:
                raise ValueError(
                    f"{who}: at step {step} the plan has a round of {expected[0]} steps at duty_cycle {expected[2]}, "
                    f"{expected[1]} steps in; the checkpoint's clan is {in_round} steps into a round of "
                    f"{round_length} at duty_cycle {duty_cycle}")
        elif in_round != 0:
            raise ValueError(f"{who}: at step {step} the plan is between rounds, the checkpoint's clan is {in_round} "
                             f"steps into round {state['round']}")
        if stretch is not saved:
            bad("stretch", f"{self.plan.index(stretch)} (the stretch of step {step})", index)
        if not stretch.start <= state["record_start"] <= step:
            bad("record_start", f"an int in [{stretch.start}, {step}]", state["record_start"])

    def load_state_dict(self, state: Mapping, config: Mapping) -> None:
        """Take the counts and round settings of a state :meth:`check_state` accepted."""
        self.set_round(config["round_length"], config["duty_cycle"])
        for name in self.FIELDS:
            setattr(self, name, state[name])
