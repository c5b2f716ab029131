"""Selection on hand-built cases: who wins, and which rows of the population move."""

import math

import pytest
import torch
from torch import nn

from vmapclan import Clan, DivergenceError, Gene
from vmapclan.genome import mutate
from vmapclan.selection import rank, truncation_sources

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("losses, order", [
    ([0.5, NAN, 0.2, 0.2], [2, 3, 0, 1]),
    ([INF, -INF, NAN, 1.0], [3, 0, 1, 2]),  # every non-finite value ranks last, ties to the lowest index
    ([-INF, 2.0, 1.0], [2, 1, 0]),  # -inf is not a great loss, it is a diverged one
    ([1.0, 1.0, 1.0], [0, 1, 2]),
    ([-1.0, -2.0, 0.0], [1, 0, 2]),
    ([NAN, NAN], [0, 1]),
])
def test_rank(losses, order):
    assert rank(torch.tensor(losses)) == order
    assert rank(torch.tensor(losses, dtype=torch.float16)) == order


@pytest.mark.parametrize("p, fraction, k", [(8, 0.25, 2), (4, 0.25, 1), (3, 0.5, 1), (2, 0.1, 1), (9, 0.5, 4)])
def test_truncation_sources_replace_the_bottom_with_the_top(p, fraction, k):
    order = torch.randperm(p, generator=torch.Generator().manual_seed(p)).tolist()
    sources = truncation_sources(order, fraction, torch.Generator().manual_seed(0))
    top, bottom = set(order[:k]), set(order[p - k:])
    for member in range(p):
        if member in bottom:
            assert sources[member].item() in top
        else:
            assert sources[member].item() == member


def bn_clan(selection="winner", population_size=3, **kwargs):
    """A 3-member always-competitive clan of a small BatchNorm model, one step per round.

    Args:
        selection: Selection strategy.
        population_size: P.
        **kwargs: More ``Clan`` arguments.

    Returns:
        The clan, with its round already done (ready for ``clan.step``).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                population_size=population_size, round_length=1, duty_cycle=1.0, selection=selection,
                autobind=["adamw", "gradient_accumulation"], seed=0, **kwargs)
    clan.round().step()
    return clan


def fill_distinct_rows(clan):
    """Give every member different parameters, gradients, buffers and optimizer state."""
    p = clan.population_size
    g = torch.Generator().manual_seed(1)
    pop, state = clan.population, clan.optimizer.adamw_state
    with torch.no_grad():
        pop.flat.copy_(torch.randn(pop.flat.shape, generator=g))
        pop.grad_flat.copy_(torch.randn(pop.grad_flat.shape, generator=g))
        for b in pop.buffers.values():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + torch.arange(p).view(-1, *[1] * (b.dim() - 1)))
            else:
                b.copy_(torch.arange(p).view(-1, *[1] * (b.dim() - 1)) + 10)
        state.step.copy_(torch.arange(p) + 1.0)
        state.exp_avg.copy_(torch.randn(state.exp_avg.shape, generator=g))
        state.exp_avg_sq.copy_(torch.rand(state.exp_avg_sq.shape, generator=g))
        state.accum_count.copy_(torch.arange(p) % 2)


def snapshot(clan):
    """Clones of every member-major tensor that selection must move together."""
    pop, state = clan.population, clan.optimizer.adamw_state
    out = {"flat": pop.flat, "grad_flat": pop.grad_flat}
    out.update({f"buffer:{n}": b for n, b in pop.buffers.items()})
    out.update({f"adamw:{n}": t for n, t in state._asdict().items()})
    return {n: t.detach().clone() for n, t in out.items()}


def storage_pointers(clan):
    """``{name: storage address}`` of every tensor selection moves, and of each parameter leaf and its .grad."""
    pop, state = clan.population, clan.optimizer.adamw_state
    tensors = {"flat": pop.flat, "grad_flat": pop.grad_flat}
    tensors.update({f"buffer:{n}": b for n, b in pop.buffers.items()})
    tensors.update({f"adamw:{n}": t for n, t in state._asdict().items()})
    for name, leaf in pop.named_parameters():
        tensors[f"param:{name}"], tensors[f"grad:{name}"] = leaf, leaf.grad
    return {n: t.untyped_storage().data_ptr() for n, t in tensors.items()}


def assert_rows_moved(clan, before, sources):
    """Row ``i`` of every tensor now holds what row ``sources[i]`` held before."""
    after = snapshot(clan)
    assert set(after) == set(before)
    assert any(n.startswith("buffer:") and "running_mean" in n for n in after)
    for name, old in before.items():
        for i, src in enumerate(sources):
            assert torch.equal(after[name][i], old[src]), (name, i, src)


@pytest.mark.parametrize("losses, winner", [
    ([3.0, 1.0, 2.0], 1),
    ([NAN, 5.0, NAN], 1),  # NaN never wins
    ([-INF, 2.0, 1.0], 2),
    ([INF, NAN, 0.0], 2),
    ([2.0, 1.0, 1.0], 1),  # ties to the lowest index
    ([0.0, 1.0, 2.0], 0),
])
def test_winner_selection_moves_every_row_to_the_winner(losses, winner):
    clan = bn_clan()
    fill_distinct_rows(clan)
    before = snapshot(clan)
    used = {n: v.clone() for n, v in clan.genomes.items()}
    params_before = {n: t.detach().clone() for n, t in clan.population.named_parameters()}
    storages = storage_pointers(clan)
    record = clan.step(torch.tensor(losses))
    assert record["winner"] == winner
    assert_rows_moved(clan, before, [winner] * 3)
    # Selection copies in place: every tensor keeps its storage, and the parameter leaves and
    # their .grad are still views of the moved buffers, not copies.
    assert storage_pointers(clan) == storages
    pop = clan.population
    for name, leaf in pop.named_parameters():
        assert torch.equal(leaf.detach(), params_before[name][winner].expand_as(leaf))
        assert leaf.untyped_storage().data_ptr() == pop.flat.untyped_storage().data_ptr()
        assert leaf.grad.untyped_storage().data_ptr() == pop.grad_flat.untyped_storage().data_ptr()
    # The winner's genome is the incumbent; member 0 keeps it unmutated, the others mutate it.
    for name, values in clan.genomes.items():
        assert clan.incumbent[name] == used[name][winner]
        assert values[0] == used[name][winner]
    for i in (1, 2):
        assert any(clan.genomes[n][i] != clan.incumbent[n] for n in clan.genes)
    # Always competitive: the optimizer trains each member with its own genome, member 0 the incumbent.
    assert torch.equal(clan.optimizer.hyper.lr, clan.genomes["lr"])
    assert torch.equal(clan.optimizer.num_grad_accum, clan.genomes["num_grad_accum"])
    # best_model() is a plain module with the winner's weights and buffers.
    best = clan.best_model().state_dict()
    for name, stacked in clan.population.named_parameters():
        assert torch.equal(best[name], params_before[name][winner])
    for name in clan.population.buffers:
        assert torch.equal(best[name], before[f"buffer:{name}"][winner])


def test_winner_draws_mutations_from_the_clan_generator():
    clan = bn_clan()
    generator = torch.Generator()
    generator.set_state(clan.genepool.generator.get_state())
    used = {n: v.clone() for n, v in clan.genomes.items()}
    clan.step(torch.tensor([3.0, 1.0, 2.0]))
    start = {n: v[1].expand(3).clone() for n, v in used.items()}
    expected = mutate(start, clan.genes, generator, mask=torch.arange(3) > 0)
    for name in clan.genes:
        assert torch.equal(clan.genomes[name], expected[name])


def test_cooperative_clan_applies_the_new_incumbent_to_everyone():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3, round_length=4,
                duty_cycle=0.5, autobind=["adamw"], seed=0)
    member = clan.round()
    for _ in range(4):
        member.step()
    used = {n: v.clone() for n, v in clan.genomes.items()}
    clan.step(torch.tensor([3.0, 2.0, 1.0]))
    assert clan.phase == "cooperative"
    assert torch.equal(clan.optimizer.hyper.lr, used["lr"][2].to(torch.float64).expand(3))
    assert torch.equal(clan.optimizer.hyper.beta2, used["betas/1"][2].expand(3))


@pytest.mark.parametrize("settings", [dict(on_divergence="raise"), dict(selection="truncation"),
                                      dict(selection=None)])
def test_all_non_finite_losses_are_a_divergence_error_and_change_nothing(settings):
    clan = bn_clan(**settings)
    fill_distinct_rows(clan)
    before = snapshot(clan)
    genomes = {n: v.clone() for n, v in clan.genomes.items()}
    with pytest.raises(DivergenceError, match=r"clan.step: every member's validation loss is NaN or infinite "
                                              r"in round 0: \[nan, inf, -inf\]"):
        clan.step(torch.tensor([NAN, INF, -INF]))
    assert_rows_moved(clan, before, [0, 1, 2])
    assert all(torch.equal(clan.genomes[n], genomes[n]) for n in genomes)
    assert clan.history == [] and clan.round_index == 0


@pytest.mark.parametrize("losses, sources", [
    ([0.1, 0.4, 0.3, 0.2], [0, 0, 2, 3]),  # k = 1: member 1 (worst) copies member 0 (best)
    ([0.4, NAN, 0.1, 0.2], [0, 2, 2, 3]),  # NaN is the worst
    ([0.1, 0.1, 0.1, 0.1], [0, 1, 2, 0]),  # ties: the last index is the worst, the first the best
])
def test_truncation_bottom_copies_top_then_mutates_the_rest_keep_themselves(losses, sources):
    clan = bn_clan(selection="truncation", population_size=4, truncation_fraction=0.25)
    fill_distinct_rows(clan)
    before = snapshot(clan)
    used = {n: v.clone() for n, v in clan.genomes.items()}
    record = clan.step(torch.tensor(losses))
    assert record["winner"] == rank(torch.tensor(losses))[0]
    assert_rows_moved(clan, before, sources)
    for i, src in enumerate(sources):
        if src == i:  # kept: weights and genome untouched
            assert all(clan.genomes[n][i] == used[n][i] for n in used)
        else:  # copied, then mutated away from the source's genome
            assert any(clan.genomes[n][i] != used[n][src] for n in used)
            for n, spec in clan.genes.items():
                assert spec.low <= clan.genomes[n][i] <= spec.high
    for n in used:
        assert clan.incumbent[n] == used[n][record["winner"]]


def test_selection_none_leaves_everything_in_place():
    clan = bn_clan(selection=None)
    fill_distinct_rows(clan)
    before = snapshot(clan)
    used = {n: v.clone() for n, v in clan.genomes.items()}
    record = clan.step(torch.tensor([2.0, 1.0, 3.0]))
    assert record["winner"] == 1
    assert_rows_moved(clan, before, [0, 1, 2])
    for n in used:
        assert torch.equal(clan.genomes[n], used[n])
        assert clan.incumbent[n] == used[n][1]


def test_history_record_has_exactly_the_contract_keys_and_values():
    clan = bn_clan()
    used = {n: v.tolist() for n, v in clan.genomes.items()}
    record = clan.step(torch.tensor([3.0, NAN, 2.0]))
    assert clan.history == [record]
    # The contract's keys, and the share of a genome's lr a competitive step took (competitive_lr="sqrt").
    assert set(record) == {"round", "step", "genomes", "val_losses", "winner", "incumbent", "competitive_lr_scale"}
    assert record["competitive_lr_scale"] == 3 ** -0.5
    assert record["round"] == 0 and record["step"] == 1 and record["winner"] == 2
    assert record["genomes"] == used
    assert record["val_losses"][0] == 3.0 and math.isnan(record["val_losses"][1]) and record["val_losses"][2] == 2.0
    assert record["incumbent"] == {n: v[2] for n, v in used.items()}
    assert isinstance(record["incumbent"]["num_grad_accum"], int)
    assert isinstance(record["incumbent"]["lr"], float)

    clan.round().step()
    second = clan.step([1.0, 2.0, 3.0])  # a plain list of losses is accepted
    assert second["round"] == 1 and second["step"] == 2 and second["winner"] == 0
    assert second["genomes"]["lr"][0] == record["incumbent"]["lr"]  # member 0 ran the incumbent
    assert len(clan.history) == 2


def test_genome_only_selection_updates_genes_only():
    clan = Clan(genome_config={"x": Gene(0.1, 10.0, init=1.0), "k": Gene(1, 9, init=5, dtype="int", scale="linear")},
                population_size=3, round_length=1, duty_cycle=1.0, seed=4)
    clan.round().step()
    used = {n: v.clone() for n, v in clan.genomes.items()}
    clan.step(torch.tensor([1.0, 0.5, 2.0]))
    assert clan.incumbent["x"] == used["x"][1] and clan.incumbent["k"] == used["k"][1]
    assert clan.genomes["x"][0] == used["x"][1] and clan.genomes["k"][0] == used["k"][1]


def test_losses_equal_to_rounding_tie_to_the_lowest_index():
    """Three members at one loss, computed by two world sizes whose last bits differ: the same winner."""
    one = torch.tensor([0.0950, 0.0892820012, 0.1, 0.2, 0.3, 0.0892820019, 0.0892820005], dtype=torch.float64)
    two = one.clone()
    two[[1, 5, 6]] = torch.tensor([0.0892820019, 0.0892820003, 0.0892820011], dtype=torch.float64)
    assert rank(one)[:3] == rank(two)[:3] == [1, 5, 6]
    assert rank(torch.tensor([0.2 * (1 + 2e-6), 0.2]))[0] == 1  # beyond the tolerance: a real difference
    assert rank(torch.tensor([0.0, 0.0, -1e-12], dtype=torch.float64)) == [2, 0, 1]
