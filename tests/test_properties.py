"""Properties over settings: whatever is accepted runs and keeps its invariants; the rest is refused clearly."""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmapclan import Clan, Gene
from vmapclan.schedule import Phase, PhaseSchedule

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(round_length=st.integers(-2, 30),
       duty_cycle=st.one_of(st.just(1.0), st.floats(0.05, 0.95), st.floats(-0.5, 1.5, allow_nan=False)),
       population_size=st.one_of(st.integers(2, 5), st.integers(0, 5)),
       selection=st.sampled_from(["winner", "truncation", None]),
       losses_seed=st.integers(0, 1000))
def test_round_settings(round_length, duty_cycle, population_size, selection, losses_seed):
    genes = {"x": Gene(0.1, 10.0), "k": Gene(1, 6, init=3, scale="linear", dtype="int")}
    try:
        clan = Clan(genome_config=genes, population_size=population_size, round_length=round_length,
                    duty_cycle=duty_cycle, selection=selection, seed=losses_seed)
    except ValueError as err:
        event("refused")
        assert str(err).startswith("Clan: ")
        competitive = max(1, math.floor(duty_cycle * round_length + 0.5)) if round_length >= 1 else 0
        assert (population_size < 1 or round_length < 1 or not 0 < duty_cycle <= 1
                or (duty_cycle < 1 and round_length - competitive < 1)
                or (selection is not None and population_size < 2)
                or (selection != "winner" and duty_cycle != 1))
        return
    event("accepted")
    competitive = max(1, math.floor(duty_cycle * round_length + 0.5))
    g = torch.Generator().manual_seed(losses_seed)
    for round_index in range(3):
        member = clan.round()
        phases = []
        while not member.done:
            phases.append(member.phase)
            genome = member.genome
            if member.phase == "cooperative":  # everyone uses the incumbent
                for name, values in genome.items():
                    assert torch.equal(values, clan.incumbent[name].expand(population_size))
            else:
                for name, values in genome.items():
                    assert torch.equal(values, clan.genomes[name])
            member.step()
        assert phases == ["cooperative"] * (round_length - competitive) + ["competitive"] * competitive
        losses = torch.rand(population_size, generator=g, dtype=torch.float64)
        record = clan.step(losses)
        assert record["round"] == round_index
        assert record["winner"] == int(losses.argmin())
        for name, spec in clan.genes.items():
            values = clan.genomes[name]
            assert values.dtype == spec.torch_dtype
            assert bool(((values >= spec.low) & (values <= spec.high)).all())
        if selection == "winner":
            for name in clan.genes:  # member 0 keeps the unmutated incumbent
                assert clan.genomes[name][0] == clan.incumbent[name]
    assert clan.global_step == 3 * round_length


# Mixtures keep both sides well sampled: settings most likely valid, and anything at all.
gene_fields = st.fixed_dictionaries({
    "low": st.one_of(st.floats(1e-4, 0.5), st.floats(-5, 5, allow_nan=False)),
    "width": st.one_of(st.floats(0.01, 0.4), st.floats(-1, 10, allow_nan=False)),
    "scale": st.sampled_from(["log", "linear", "log1m"]),
    "dtype": st.sampled_from(["float", "int"]),
    "factors": st.lists(st.floats(0.05, 20, allow_nan=False), min_size=1, max_size=3),
    "resample_prob": st.one_of(st.floats(0, 1), st.floats(-0.2, 1.2, allow_nan=False)),
    "init_at": st.one_of(st.none(), st.floats(-0.2, 1.2, allow_nan=False)),
})


@SETTINGS
@given(fields=gene_fields, seed=st.integers(0, 10_000))
def test_gene_configs(fields, seed):
    low = fields["low"]
    high = low + fields["width"]
    if fields["dtype"] == "int":
        low, high = float(round(low)), float(round(high))
    init = None if fields["init_at"] is None else low + fields["init_at"] * (high - low)
    if fields["dtype"] == "int" and init is not None:
        init = float(round(init))
    config = {"low": low, "high": high, "init": init, "scale": fields["scale"], "dtype": fields["dtype"],
              "factors": tuple(fields["factors"]), "resample_prob": fields["resample_prob"]}
    try:
        clan = Clan(genome_config={"g": config}, population_size=4, round_length=2, duty_cycle=1.0, seed=seed)
    except ValueError as err:
        event("refused")
        assert str(err).startswith("Clan: genome_config['g']: Gene: ")  # the gene named
        return
    event("accepted")
    spec = clan.genes["g"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        member = clan.round()
        member.step()
        member.step()
        values = member.get_gene("g")
        assert values.dtype == spec.torch_dtype
        assert bool(((values >= spec.low) & (values <= spec.high)).all()), values
        clan.step(torch.rand(4, generator=g))


@SETTINGS
@given(cuts=st.lists(st.floats(0.01, 0.99, allow_nan=False), max_size=4),
       jitter=st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.05, -0.05]), min_size=5, max_size=5),
       probes=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=10))
def test_phase_schedules(cuts, jitter, probes):
    edges = [0.0, *sorted(set(round(c, 3) for c in cuts)), 1.0]
    phases, contiguous = [], True
    for i in range(len(edges) - 1):
        start = edges[i] if i == 0 else min(max(edges[i] + jitter[i], 0.0), 1.0)
        contiguous &= start == edges[i]
        phases.append((f"p{i}", start, edges[i + 1]))
    try:
        schedule = PhaseSchedule([Phase(name, start, end) for name, start, end in phases])
    except ValueError as err:
        event("refused")
        assert not contiguous
        assert str(err).startswith(("PhaseSchedule: ", "Phase "))
        return
    event("accepted")
    assert contiguous
    for t in probes:
        phase = schedule.phase_at(t)
        assert phase.start_t <= t < phase.end_t or (t == 1.0 and phase is schedule.phases[-1])


def test_phase_schedule_refuses_t_outside():
    schedule = PhaseSchedule([Phase("all", 0.0, 1.0)])
    with pytest.raises(ValueError, match="t must be a number in \\[0, 1\\]"):
        schedule.phase_at(1.5)
