"""Genes: validation, autobinding, and mutations that never leave their bounds."""

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmapclan import Clan, Gene
from vmapclan.genome import autobind_genes, mutate

import models

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
P = 16


@st.composite
def genes(draw, dtype=None, resample_prob=None):
    """A random valid :class:`Gene`: scale, bounds, factors and resample probability.

    Args:
        draw: Hypothesis' draw function.
        dtype: ``"float"`` or ``"int"`` (default: either).
        resample_prob: A fixed resample probability (default: drawn in [0, 1]).
    """
    dtype = dtype or draw(st.sampled_from(["float", "int"]))
    scale = draw(st.sampled_from(["log", "linear", "log1m"]))
    if dtype == "int":
        if scale == "log":
            low = draw(st.integers(1, 20))
        elif scale == "log1m":
            low = draw(st.integers(-30, -1))
        else:
            low = draw(st.integers(-20, 20))
        high = low + draw(st.integers(1, 30))
        if scale == "log1m":
            high = min(high, 0)
    elif scale == "log":
        low = 10.0 ** draw(st.floats(-8, 2))
        high = low * 10.0 ** draw(st.floats(0.01, 6))
    elif scale == "log1m":
        high = 1 - 10.0 ** draw(st.floats(-6, -0.01))
        low = high - draw(st.floats(1e-4, 3))
    else:
        low = draw(st.floats(-100, 100))
        high = low + draw(st.floats(1e-3, 100))
    factors = draw(st.lists(st.floats(0.05, 20).filter(lambda f: abs(math.log(f)) > 1e-3), min_size=1, max_size=3))
    if resample_prob is None:
        resample_prob = draw(st.floats(0, 1))
    return Gene(low, high, scale=scale, dtype=dtype, factors=tuple(factors), resample_prob=resample_prob)


def start_values(gene, generator):
    """``[P]`` values spread over the gene's range, both bounds included."""
    values = [gene.low, gene.high, gene.default_init()]
    lo, hi = gene._to_unit(torch.tensor([float(gene.low), float(gene.high)], dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand(P - len(values), generator=generator, dtype=torch.float64)
    x = torch.cat([torch.tensor(values, dtype=torch.float64), gene._from_unit(u)]).clamp(gene.low, gene.high)
    return (x.round() if gene.dtype == "int" else x).to(gene.torch_dtype)


def assert_in_bounds(values, gene):
    """``values`` are ``[P]`` of the gene's dtype, every one within ``[low, high]``."""
    assert values.dtype == gene.torch_dtype
    assert values.shape == (P,)
    assert bool(((values >= gene.low) & (values <= gene.high)).all()), (values, gene)


@PROPERTY
@given(gene=genes(), seed=st.integers(0, 2**31 - 1))
def test_mutations_never_leave_the_bounds(gene, seed):
    generator = torch.Generator().manual_seed(seed)
    genome = {"g": start_values(gene, generator)}
    for _ in range(25):
        genome = mutate(genome, {"g": gene}, generator)
        assert_in_bounds(genome["g"], gene)


@PROPERTY
@given(gene=genes(dtype="int", resample_prob=0.0), seed=st.integers(0, 2**31 - 1))
def test_perturbed_int_genes_move_at_least_one_step_unless_clipped(gene, seed):
    generator = torch.Generator().manual_seed(seed)
    x = start_values(gene, generator)
    for _ in range(10):
        new = mutate({"g": x}, {"g": gene}, generator)["g"]
        moved = (new - x).abs() >= 1
        clipped = (new == gene.low) | (new == gene.high)
        assert bool((moved | clipped).all()), (x, new, gene)
        x = new


@pytest.mark.parametrize("scale, low, high, x, factor, expected", [
    ("log", 1, 9, 3, 1.1, 4),
    ("log", 1, 9, 3, 0.9, 2),
    ("linear", -9, 9, 3, 1.1, 4),
    ("linear", -9, 9, -3, 1.1, -4),  # a factor > 1 takes a negative value further down
    ("linear", -9, 9, -3, 0.9, -2),
    ("linear", -9, 9, 0, 1.1, 1),  # 0 cannot be scaled: the factor's sign decides
    ("linear", -9, 9, 0, 0.9, -1),
    ("log1m", -9, 0, -2, 1.1, -3),  # a factor > 1 grows 1 - x, i.e. lowers x
    ("log1m", -9, 0, -2, 0.9, -1),
])
def test_stuck_int_genes_step_the_way_the_factor_moves_them(scale, low, high, x, factor, expected):
    gene = Gene(low, high, scale=scale, dtype="int", factors=(factor,))
    new = mutate({"g": torch.tensor([x])}, {"g": gene}, torch.Generator().manual_seed(0))["g"]
    assert new.tolist() == [expected]


@PROPERTY
@given(gene=genes(resample_prob=1.0), seed=st.integers(0, 2**31 - 1))
def test_resampled_values_stay_in_bounds_and_vary(gene, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.full((P,), gene.default_init(), dtype=torch.float64).to(gene.torch_dtype)
    draws = torch.stack([mutate({"g": x}, {"g": gene}, generator)["g"] for _ in range(8)])
    for row in draws:
        assert_in_bounds(row, gene)
    assert draws.unique().numel() > 1


def test_int_resampling_reaches_both_bounds_uniformly():
    gene = Gene(1, 3, dtype="int", scale="linear", resample_prob=1.0)
    x = torch.full((1000,), 2, dtype=torch.long)
    draws = mutate({"g": x}, {"g": gene}, torch.Generator().manual_seed(0))["g"]
    counts = torch.bincount(draws, minlength=4)[1:]
    assert counts.sum() == 1000
    assert bool((counts > 250).all()), counts


def test_log_resampling_is_uniform_in_log_space():
    gene = Gene(1e-6, 1.0, resample_prob=1.0)
    x = torch.full((4000,), 1e-3, dtype=torch.float64)
    draws = mutate({"g": x}, {"g": gene}, torch.Generator().manual_seed(0))["g"]
    assert abs(draws.log10().median().item() + 3) < 0.2  # the log-midpoint, not the linear one


def test_int_log_resampling_is_log_uniform():
    gene = Gene(1, 1000, dtype="int", resample_prob=1.0)
    x = torch.full((4000,), 10, dtype=torch.long)
    draws = mutate({"g": x}, {"g": gene}, torch.Generator().manual_seed(0))["g"]
    assert draws.min() == 1 and draws.max() > 900
    assert 15 < draws.double().median() < 35  # about sqrt(0.5 * 1000.5), not the linear midpoint 500


def test_perturbation_multiplies_by_one_of_the_factors():
    specs = {"log": Gene(1e-4, 1.0, factors=(0.5, 2.0)), "lin": Gene(-10.0, 10.0, scale="linear", factors=(0.5, 2.0)),
             "b": Gene(0.5, 0.999, scale="log1m", factors=(0.5, 2.0))}
    genome = {"log": torch.full((P,), 1e-2, dtype=torch.float64), "lin": torch.full((P,), -1.0, dtype=torch.float64),
              "b": torch.full((P,), 0.9, dtype=torch.float64)}
    new = mutate(genome, specs, torch.Generator().manual_seed(0))
    for values, options in ((new["log"], (5e-3, 2e-2)), (new["lin"], (-0.5, -2.0)), (1 - new["b"], (0.05, 0.2))):
        close = [torch.isclose(values, torch.tensor(v, dtype=torch.float64)) for v in options]
        assert bool((close[0] | close[1]).all()), values
        assert bool(close[0].any()) and bool(close[1].any())


def test_same_generator_seed_gives_the_same_mutations():
    specs = {"lr": Gene(1e-5, 1e-1, resample_prob=0.3), "n": Gene(1, 8, scale="linear", dtype="int", resample_prob=0.2)}
    genome = {"lr": torch.full((P,), 1e-3, dtype=torch.float64), "n": torch.full((P,), 4, dtype=torch.long)}
    first = mutate(genome, specs, torch.Generator().manual_seed(5))
    again = mutate(genome, specs, torch.Generator().manual_seed(5))
    other = mutate(genome, specs, torch.Generator().manual_seed(6))
    assert all(torch.equal(first[n], again[n]) for n in specs)
    assert not all(torch.equal(first[n], other[n]) for n in specs)


def test_mask_keeps_unmasked_members_and_the_input_is_not_modified():
    specs = {"lr": Gene(1e-5, 1e-1)}
    genome = {"lr": torch.full((4,), 1e-3, dtype=torch.float64)}
    mask = torch.tensor([False, True, False, True])
    new = mutate(genome, specs, torch.Generator().manual_seed(0), mask=mask)
    assert torch.equal(new["lr"][~mask], genome["lr"][~mask])
    assert bool((new["lr"][mask] != 1e-3).all())
    assert torch.equal(genome["lr"], torch.full((4,), 1e-3, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(low=2.0, high=1.0), r"Gene: bounds must satisfy low < high, got low=2.0, high=1.0"),
    (dict(low=1.0, high=1.0), r"Gene: bounds must satisfy low < high, got low=1.0, high=1.0"),
    (dict(low=0.0, high=1.0), r"Gene: a log-scale gene needs low > 0, got low=0.0"),
    (dict(low=-1.0, high=1.0, scale="log"), r"Gene: a log-scale gene needs low > 0, got low=-1.0"),
    (dict(low=0.5, high=1.0, scale="log1m"), r"Gene: a log1m-scale gene needs high < 1, got high=1.0"),
    (dict(low=1.0, high=2.0, factors=()), r"Gene: factors must be a non-empty tuple of positive numbers, got \(\)"),
    (dict(low=1.0, high=2.0, factors=(0.5, -2.0)), r"Gene: factors must be a non-empty tuple of positive numbers"),
    (dict(low=1.0, high=2.0, factors=(0.5, math.inf)), r"Gene: factors must be a non-empty tuple of positive numbers"),
    (dict(low=1.0, high=2.0, factors=(1.0, 1)), r"Gene: factors \(1.0, 1\) never change the value"),
    (dict(low=1.0, high=2.0, resample_prob=1.5), r"Gene: resample_prob must be in \[0, 1\], got 1.5"),
    (dict(low=1.0, high=2.0, resample_prob=-0.1), r"Gene: resample_prob must be in \[0, 1\], got -0.1"),
    (dict(low=1.0, high=2.0, resample_prob=math.nan), r"Gene: resample_prob must be in \[0, 1\], got nan"),
    (dict(low=1.0, high=2.0, init=5.0), r"Gene: init 5.0 is outside the bounds \[1.0, 2.0\]"),
    (dict(low=1.0, high=2.0, init=0.5), r"Gene: init 0.5 is outside the bounds \[1.0, 2.0\]"),
    (dict(low=1.0, high=2.0, scale="sqrt"), r"Gene: scale must be 'log', 'linear' or 'log1m', got 'sqrt'"),
    (dict(low=1.0, high=2.0, dtype="bool"), r"Gene: dtype must be 'float' or 'int', got 'bool'"),
    (dict(low=math.nan, high=2.0), r"Gene: low must be a finite number, got nan"),
    (dict(low=1.0, high=math.inf), r"Gene: high must be a finite number, got inf"),
    (dict(low=1.0, high="2"), r"Gene: high must be a finite number, got '2'"),
    (dict(low=1, high=2.5, dtype="int"), r"Gene: an int gene needs integer bounds, got low=1, high=2.5"),
    (dict(low=1, high=8, init=2.5, dtype="int"), r"Gene: an int gene needs an integer init, got 2.5"),
])
def test_gene_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Gene(**kwargs)


def test_default_init_is_the_midpoint_in_the_gene_scale():
    assert math.isclose(Gene(1e-4, 1e-2).default_init(), 1e-3)
    assert Gene(0.0, 4.0, scale="linear").default_init() == 2.0
    assert math.isclose(Gene(0.9, 0.999, scale="log1m").default_init(), 1 - math.sqrt(0.1 * 0.001))
    assert Gene(1, 5, scale="linear", dtype="int").default_init() == 3


mlp = functools.partial(models.mlp, 3, 4, 2, act="relu", dtype=torch.float32)  # for clans whose genes are tested


def test_autobind_genes_are_seeded_from_the_adamw_values():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.85, 0.995), eps=1e-7)
    clan = Clan(model, optimizer, population_size=4, round_length=4, duty_cycle=0.25,
                autobind=["adamw", "gradient_accumulation"])
    assert set(clan.genes) == {"lr", "weight_decay", "betas/0", "betas/1", "eps", "num_grad_accum"}
    expected = {"lr": 3e-3, "weight_decay": 0.05, "betas/0": 0.85, "betas/1": 0.995, "eps": 1e-7, "num_grad_accum": 1}
    for name, value in expected.items():
        assert clan.incumbent[name].item() == value
        assert clan.genes[name].init == value
        spec = clan.genes[name]
        assert spec.low < value < spec.high or (name == "num_grad_accum" and spec.low == value)
    assert math.isclose(clan.genes["lr"].low, 3e-5) and math.isclose(clan.genes["lr"].high, 0.3)
    assert (clan.genes["num_grad_accum"].low, clan.genes["num_grad_accum"].high) == (1, 8)
    assert clan.genes["betas/1"].scale == "log1m" and clan.genes["betas/1"].high < 1
    # Cooperative phase: the optimizer runs the incumbent, i.e. the user's AdamW values.
    member = clan.round()
    for name, value in expected.items():
        assert torch.equal(member.get_gene(name), torch.full((4,), value, dtype=clan.genes[name].torch_dtype))
    hyper = clan.optimizer.hyper
    assert torch.equal(hyper.lr, torch.full((4,), 3e-3, dtype=torch.float64))
    assert torch.equal(hyper.beta1, torch.full((4,), 0.85, dtype=torch.float64))
    assert torch.equal(hyper.eps, torch.full((4,), 1e-7, dtype=torch.float64))


def test_autobind_zero_weight_decay_gets_a_linear_gene():
    optimizer = torch.optim.AdamW(mlp().parameters(), lr=1e-3, weight_decay=0.0)
    genes = autobind_genes("adamw", optimizer)
    assert genes["weight_decay"].scale == "linear" and genes["weight_decay"].init == 0.0
    assert genes["weight_decay"].low == 0.0


def test_unknown_autobind_name_and_adamw_without_optimizer_are_errors():
    with pytest.raises(ValueError, match=r"Clan: unknown autobind name 'sgd'; expected 'adamw' or 'gradient_accumulation'"):
        Clan(autobind=["sgd"], population_size=2, round_length=4)
    with pytest.raises(ValueError, match=r"Clan: autobind=\['adamw'\] needs optimizer=torch.optim.AdamW\(...\), got None"):
        Clan(autobind=["adamw"], population_size=2, round_length=4)


def test_genome_config_overrides_an_autobound_gene_and_adds_a_user_gene():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clan = Clan(model, optimizer, population_size=3, round_length=4, duty_cycle=0.25, autobind=["adamw"],
                genome_config={"lr": {"low": 1e-4, "high": 1e-2, "resample_prob": 0.5},
                               "dropout": Gene(0.0, 0.5, init=0.1, scale="linear"),
                               "width": {"low": 1, "high": 5, "dtype": "int", "scale": "linear"},
                               "eps": Gene(1e-10, 1e-6)})
    lr = clan.genes["lr"]
    assert (lr.low, lr.high, lr.resample_prob, lr.init) == (1e-4, 1e-2, 0.5, 1e-3)  # init still the optimizer's
    assert clan.genes["eps"].init == 1e-8  # a Gene without init takes the bound value
    assert clan.genes["dropout"].init == 0.1 and clan.incumbent["dropout"].item() == 0.1
    assert clan.genes["width"].init == 3 and clan.incumbent["width"].dtype == torch.long
    assert set(clan.genomes) == {"lr", "weight_decay", "betas/0", "betas/1", "eps", "dropout", "width"}
    with pytest.raises(ValueError, match=r"Gene: init 0.001 is outside the bounds \[0.01, 0.1\]"):
        Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), population_size=2, round_length=4,
             duty_cycle=0.25, autobind=["adamw"], genome_config={"lr": {"low": 1e-2, "high": 1e-1}})


def test_genome_config_bad_entries_are_errors():
    with pytest.raises(ValueError, match=r"Clan: genome_config\['x'\]: .*unexpected keyword argument 'lo'"):
        Clan(genome_config={"x": {"lo": 1.0, "high": 2.0}}, population_size=2, round_length=4)
    with pytest.raises(TypeError, match=r"Clan: genome_config\['x'\] must be a Gene or a dict, got float"):
        Clan(genome_config={"x": 1.0}, population_size=2, round_length=4)
    with pytest.raises(ValueError, match=r"Clan: gene names must be non-empty strings, got ''"):
        Clan(genome_config={"": Gene(1.0, 2.0)}, population_size=2, round_length=4)


def test_integer_genes_are_long_and_float_genes_float64():
    clan = Clan(genome_config={"n": Gene(1, 8, init=2, scale="linear", dtype="int"), "x": Gene(0.1, 1.0)},
                population_size=4, round_length=1, duty_cycle=1.0)
    member = clan.round()
    assert clan.genomes["n"].dtype == torch.long and clan.incumbent["n"].dtype == torch.long
    assert member.get_gene("n").dtype == torch.long
    assert member.get_gene("x").dtype == torch.float64
    for _ in range(5):
        member.step()
        clan.step(torch.arange(4.0))
        member = clan.round()
        assert member.get_gene("n").dtype == torch.long
        assert isinstance(clan.history[-1]["incumbent"]["n"], int)
