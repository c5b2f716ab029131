"""TimeController and PhaseSchedule: step <-> t, validation of phases, lookup."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmapclan import Phase, PhaseSchedule, TimeController


def three_phases():
    return PhaseSchedule([
        Phase("warmup", 0.0, 0.1, clan={"competition": False}),
        Phase("clan", 0.1, 0.9, clan={"round_length": 20, "duty_cycle": 0.5}),
        Phase("anneal", 0.9, 1.0, optimizer={"lr_scale": 0.1}, data={"batch_size": 8}, clan={"competition": False}),
    ])


def test_time_controller_maps_steps_and_time():
    clock = TimeController(200)
    assert clock.time_at(0) == 0.0 and clock.time_at(50) == 0.25 and clock.time_at(200) == 1.0
    assert clock.step_at(0.0) == 0 and clock.step_at(0.25) == 50 and clock.step_at(1.0) == 200
    clock.advance(10)
    assert clock.step == 10 and clock.t == 0.05 and not clock.done
    clock.advance(190)
    assert clock.done
    restored = TimeController(200)
    restored.load_state_dict(clock.state_dict())
    assert restored.step == 200


@given(st.integers(1, 10_000), st.integers(0, 10_000))
def test_step_at_inverts_time_at(total, step):
    step = min(step, total)
    clock = TimeController(total)
    assert clock.step_at(clock.time_at(step)) == step


def test_time_controller_errors():
    with pytest.raises(ValueError, match=r"TimeController: total_steps must be a positive int, got 0"):
        TimeController(0)
    clock = TimeController(10)
    with pytest.raises(ValueError, match=r"time_at: step must be an int in \[0, 10\], got 11"):
        clock.time_at(11)
    with pytest.raises(ValueError, match=r"step_at: t must be a number in \[0, 1\], got 1.5"):
        clock.step_at(1.5)
    with pytest.raises(ValueError, match=r"advance: 11 more steps from step 0 passes total_steps=10"):
        clock.advance(11)
    with pytest.raises(ValueError, match=r"advance: steps must be a non-negative int, got -1"):
        clock.advance(-1)
    with pytest.raises(ValueError, match=r"saved total_steps=5, this clock has 10"):
        clock.load_state_dict({"total_steps": 5, "step": 1})


def test_phase_at_lookup_and_edges():
    schedule = three_phases()
    assert schedule.phase_at(0.0).name == "warmup"
    assert schedule.phase_at(0.0999).name == "warmup"
    assert schedule.phase_at(0.1).name == "clan"  # a phase holds its start, not its end
    assert schedule.phase_at(0.9).name == "anneal"
    assert schedule.phase_at(1.0).name == "anneal"
    assert schedule["clan"].clan["round_length"] == 20 and schedule[2].name == "anneal"
    assert not schedule["warmup"].competition and schedule["clan"].competition
    with pytest.raises(KeyError, match="no phase named 'main'"):
        schedule["main"]
    with pytest.raises(ValueError, match=r"t must be a number in \[0, 1\], got -0.1"):
        schedule.phase_at(-0.1)


def test_step_ranges_tile_the_run_and_agree_with_phase_at_step():
    schedule = three_phases()
    for total in (1, 7, 10, 33, 1000):
        ranges = schedule.step_ranges(total)
        assert ranges[0][1] == 0 and ranges[-1][2] == total
        for (_, _, end), (_, first, _) in zip(ranges, ranges[1:]):
            assert end == first
        for phase, first, end in ranges:
            for step in range(first, end):
                assert schedule.phase_at_step(step, total) is phase
    assert [(p.name, a, b) for p, a, b in schedule.step_ranges(100)] == [("warmup", 0, 10), ("clan", 10, 90),
                                                                         ("anneal", 90, 100)]


@pytest.mark.parametrize("phases, message", [
    ([], "needs at least one phase"),
    ([Phase("a", 0.1, 1.0)], r"the first phase 'a' starts at t=0.1; the phases must cover \[0, 1\] from t=0"),
    ([Phase("a", 0.0, 0.9)], r"the last phase 'a' ends at t=0.9; the phases must cover \[0, 1\] up to t=1"),
    ([Phase("a", 0.0, 0.4), Phase("b", 0.5, 1.0)],
     r"gap between phase 'a' \(ends at t=0.4\) and phase 'b' \(starts at t=0.5\)"),
    ([Phase("a", 0.0, 0.6), Phase("b", 0.5, 1.0)],
     r"phase 'a' \(ends at t=0.6\) overlaps phase 'b' \(starts at t=0.5\)"),
    ([Phase("a", 0.0, 0.5), Phase("a", 0.5, 1.0)], "phase names must be unique, 'a' appears more than once"),
])
def test_schedule_validation(phases, message):
    with pytest.raises(ValueError, match=message):
        PhaseSchedule(phases)


def test_schedule_type_errors():
    with pytest.raises(TypeError, match="phases must be a list of Phase objects, got dict"):
        PhaseSchedule({"name": "a"})
    with pytest.raises(TypeError, match=r"phases\[0\] must be a Phase or a dict, got int"):
        PhaseSchedule([3])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": ""}, ValueError, "Phase: name must be a non-empty string, got ''"),
    ({"start_t": -0.5}, ValueError, r"Phase 'p': start_t must be a number in \[0, 1\], got -0.5"),
    ({"end_t": True}, ValueError, r"Phase 'p': end_t must be a number in \[0, 1\], got True"),
    ({"start_t": 0.5, "end_t": 0.5}, ValueError, "start_t must be below end_t, got start_t=0.5, end_t=0.5"),
    ({"optimizer": {"momentum": 0.9}, "clan": {"competition": False}}, ValueError,
     r"Phase 'p': unknown optimizer setting 'momentum'; expected one of \['lr'"),
    ({"optimizer": {"lr": -1.0}, "clan": {"competition": False}}, ValueError,
     "Phase 'p': optimizer.lr must be a positive number, got -1.0"),
    ({"optimizer": {"betas/0": 1.0}, "clan": {"competition": False}}, ValueError,
     r"optimizer.betas/0 must be a number in \[0, 1\), got 1.0"),
    ({"optimizer": {"lr": 0.1, "lr_scale": 0.5}, "clan": {"competition": False}}, ValueError,
     "give optimizer.lr or optimizer.lr_scale, not both"),
    ({"optimizer": {"lr": 0.1}}, ValueError,
     r"optimizer overrides \['lr'\] need clan.competition = false"),
    ({"data": {"batch_size": 0}}, ValueError, "Phase 'p': data.batch_size must be a positive int, got 0"),
    ({"model": {"freeze": []}}, ValueError, r"model.freeze must be a non-empty list of parameter name patterns"),
    ({"model": {"thaw": ["a"]}}, ValueError, r"unknown model setting 'thaw'; expected one of \['freeze', 'grow'\]"),
    ({"clan": {"duty_cycle": 0}}, ValueError, r"clan.duty_cycle must be a number in \(0, 1\], got 0"),
    ({"clan": {"competition": "no"}}, ValueError, "clan.competition must be true or false, got 'no'"),
    ({"clan": [1]}, TypeError, "Phase 'p': clan must be a dict of overrides, got list"),
])
def test_phase_validation_names_the_field(kwargs, error, message):
    args = {"name": "p", "start_t": 0.0, "end_t": 1.0, **kwargs}
    with pytest.raises(error, match=message):
        Phase(**args)


def test_round_trip_through_dict_and_json(tmp_path):
    schedule = three_phases()
    assert PhaseSchedule.from_dict(schedule.to_dict()) == schedule
    assert PhaseSchedule.from_dict(schedule.to_dict()["phases"]) == schedule
    path = tmp_path / "s.json"
    schedule.save(path, total_steps=100)
    assert json.loads(path.read_text())["total_steps"] == 100
    assert PhaseSchedule.load(path) == schedule
    assert schedule.to_dict()["phases"][1] == {"name": "clan", "start_t": 0.1, "end_t": 0.9,
                                               "clan": {"round_length": 20, "duty_cycle": 0.5}}


def test_from_dict_errors():
    with pytest.raises(ValueError, match="PhaseSchedule.from_dict: missing field 'phases'"):
        PhaseSchedule.from_dict({"phase": []})
    with pytest.raises(ValueError, match=r"Phase.from_dict: unknown field 'start'; expected some of"):
        Phase.from_dict({"name": "a", "start": 0, "end_t": 1})
    with pytest.raises(ValueError, match="Phase.from_dict: missing field 'end_t'"):
        Phase.from_dict({"name": "a", "start_t": 0})
    with pytest.raises(TypeError, match="Phase.from_dict: expected a dict, got str"):
        Phase.from_dict("warmup")


@pytest.mark.parametrize("edge, total", [(0.275, 100), (0.035, 100), (0.5166666666666667, 30), (0.3, 10), (0.5, 7)])
def test_a_step_belongs_to_the_phase_whose_range_holds_it_also_where_an_edge_falls_on_a_half_step(edge, total):
    """The plan (its stretches) and the replay read one rule: an edge on a half step in float time
    (0.275 x 100 - 0.5 rounds to 27.000000000000004) gives the same phase to each step in both."""
    from vmapclan.rounds import plan_stretches

    schedule = PhaseSchedule([Phase("warm", 0.0, edge, clan={"competition": False}), Phase("clan", edge, 1.0)])
    planned = {step: schedule.phases[s.index].name for s in plan_stretches(schedule, total, 10, 0.25)
               for step in range(s.start, s.end)}
    assert sorted(planned) == list(range(total))
    assert [schedule.phase_at_step(step, total).name for step in range(total)] == [planned[s] for s in range(total)]
