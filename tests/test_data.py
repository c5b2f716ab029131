"""The clan loader: disjoint shards when cooperating, one shared window when competing."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vmapclan import Clan, Gene

P, B = 3, 4


def make_clan(*, population_size=P, round_length=1000, duty_cycle=0.001, seed=0, selection="winner"):
    """A genome-only clan: the loader needs the round clock, not a model.

    Args:
        population_size: P.
        round_length: Steps per round.
        duty_cycle: Competitive fraction.
        seed: The clan's seed (it seeds the loader's permutations).
        selection: Selection strategy.

    Returns:
        A :class:`Clan` with one dummy gene.
    """
    return Clan(genome_config={"g": Gene(0.1, 1.0)}, population_size=population_size,
                round_length=round_length, duty_cycle=duty_cycle, seed=seed, selection=selection)


def drive(clan, loader, steps, member=None):
    """Take up to ``steps`` batches, advancing the clan's clock after each as a training loop would.

    The round ends with ``clan.step`` on equal losses, so the loader sees the phases change
    exactly as it would in training.

    Args:
        clan: The clan the loader belongs to.
        loader: A :class:`ClanLoader` of ``clan``.
        steps: Most batches to take (fewer if the epoch ends).
        member: The current round's member (default: ``clan.round()``).

    Returns:
        A list of ``(phase, batch)`` pairs, the phase being the member's when the batch arrived.
    """
    member = member if member is not None else clan.round()
    out = []
    for batch in loader:
        out.append((member.phase, batch))
        member.step()
        if member.done:
            clan.step(torch.zeros(clan.population_size))
            member = clan.round()
        if len(out) == steps:
            break
    return out


def ids_dataset(n):
    """``TensorDataset`` whose sample ``i`` is ``(i, 10 * i)``, so batches name their samples."""
    index = torch.arange(n)
    return TensorDataset(index, 10 * index)


def test_cooperative_shards_are_disjoint_and_cover_the_epoch():
    clan = make_clan()
    n = 8 * P * B  # divisible: the epoch is covered exactly
    batches = drive(clan, clan.loader(ids_dataset(n), B), steps=10**6)
    assert len(batches) == 8
    seen = []
    for phase, (x, y) in batches:
        assert phase == "cooperative"
        assert x.shape == (P, B) and y.shape == (P, B)
        assert torch.equal(y, 10 * x)  # fields of one sample stay together
        assert x.stride(0) != 0  # real shards, not an expanded view
        seen.append(x.flatten())
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(n))  # disjoint and covering


def test_cooperative_epoch_drops_only_the_incomplete_tail():
    clan = make_clan()
    n = 5 * P * B + P * B - 1  # one sample short of a sixth step
    batches = drive(clan, clan.loader(ids_dataset(n), B), steps=10**6)
    assert len(batches) == 5
    seen = torch.cat([x.flatten() for _, (x, _) in batches])
    assert seen.unique().numel() == seen.numel() == 5 * P * B


def test_competitive_windows_are_identical_views_of_one_window():
    clan = make_clan(round_length=4, duty_cycle=1.0)
    n = 7 * B + 2
    batches = drive(clan, clan.loader(ids_dataset(n), B), steps=10**6)
    assert len(batches) == 7
    windows = []
    for phase, (x, y) in batches:
        assert phase == "competitive"
        assert x.shape == (P, B) and y.shape == (P, B)
        for t in (x, y):
            assert t.stride(0) == 0  # an expanded view: no P-fold copy
            assert all(t[i].data_ptr() == t[0].data_ptr() for i in range(P))
            assert all(torch.equal(t[i], t[0]) for i in range(P))
        windows.append(x[0])
    seen = torch.cat(windows)
    assert seen.unique().numel() == seen.numel() == 7 * B  # a fresh window each step


def test_phase_is_decided_per_batch_at_request_time():
    # round_length=5, duty_cycle=0.4: C = floor(2.0 + 0.5) = 2, so 3 cooperative then 2 competitive.
    clan = make_clan(round_length=5, duty_cycle=0.4)
    n = 200
    batches = drive(clan, clan.loader(ids_dataset(n), B), steps=10)
    phases = [phase for phase, _ in batches]
    expected = ["cooperative"] * 3 + ["competitive"] * 2
    assert phases == expected * 2
    for phase, (x, _) in batches:
        if phase == "cooperative":
            assert x.stride(0) != 0 and x.unique().numel() == P * B
        else:
            assert x.stride(0) == 0 and x[0].unique().numel() == B
    # Nothing was drawn ahead: the samples handed out are exactly 2 * (3 P B + 2 B), all distinct.
    seen = torch.cat([x.flatten() if phase == "cooperative" else x[0] for phase, (x, _) in batches])
    assert seen.numel() == 2 * (3 * P * B + 2 * B) == seen.unique().numel()
    assert clan.loader_state.position == seen.numel()


@pytest.mark.parametrize("n, expected_batches", [(2 * (P * B + B) + P * B - 1, 4), (2 * (P * B + B) - 1, 3)])
def test_epoch_ends_when_the_next_step_cannot_be_filled(n, expected_batches):
    # round_length=2, duty_cycle=0.5: cooperative (P*B samples), competitive (B), cooperative, ...
    clan = make_clan(round_length=2, duty_cycle=0.5)
    loader = clan.loader(ids_dataset(n), B)
    member = clan.round()
    first = drive(clan, loader, steps=10**6, member=member)
    assert len(first) == expected_batches
    seen = torch.cat([x.flatten() if phase == "cooperative" else x[0] for phase, (x, _) in first])
    assert seen.unique().numel() == seen.numel()  # no sample repeats within an epoch
    # The next pass is a new epoch over a fresh permutation.
    second = drive(clan, loader, steps=10**6)
    assert len(second) >= 3
    assert clan.loader_state.epoch == 2


def test_dataset_smaller_than_one_step_is_an_error():
    clan = make_clan()
    with pytest.raises(ValueError, match=r"the dataset has 11 samples, fewer than one step needs "
                                         r"\(12 = population_size x batch_size\)"):
        clan.loader(ids_dataset(P * B - 1), B)
    always_competing = make_clan(duty_cycle=1.0)
    with pytest.raises(ValueError, match=r"the dataset has 3 samples, fewer than one step needs \(4 = batch_size\)"):
        always_competing.loader(ids_dataset(B - 1), B)
    always_competing.loader(ids_dataset(B), B)  # exactly one step is enough
    # The plan, not the round in force, decides: with a horizon the default plan starts with an
    # all-competitive search and cooperates after it, so one batch of B is not enough.
    model = nn.Linear(4, 2)
    planned = Clan(model, torch.optim.AdamW(model.parameters()), population_size=P, total_steps=100,
                   autobind=["adamw"])
    assert planned.cooperative_steps == 0 and any(stretch.cooperates for stretch in planned.plan)
    with pytest.raises(ValueError, match=r"the dataset has 11 samples, fewer than one step needs "
                                         r"\(12 = population_size x batch_size\)"):
        planned.loader(ids_dataset(P * B - 1), B)


def test_bad_loader_arguments_are_errors():
    clan = make_clan()
    with pytest.raises(ValueError, match=r"clan.loader: batch_size must be a positive int, got 0"):
        clan.loader(ids_dataset(100), 0)
    with pytest.raises(ValueError, match=r"clan.loader: batch_size must be a positive int, got True"):
        clan.loader(ids_dataset(100), True)
    with pytest.raises(TypeError, match=r"clan.loader: expected a map-style Dataset .* got int"):
        clan.loader(5, B)


class TupleDataset(Dataset):
    """A plain map-style dataset returning ``(x, y)`` per sample, as most user datasets do."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DictDataset(TupleDataset):
    """A map-style dataset returning ``{"x": ..., "y": ...}`` per sample."""

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_generic_datasets_give_the_tensor_fast_path_batches():
    x, y = torch.randn(60, 2, 3), torch.randint(0, 5, (60,))
    settings = dict(round_length=3, duty_cycle=0.34, seed=7)  # C = 1: cooperative, cooperative, competitive
    results = []
    for dataset in (TensorDataset(x, y), (x, y), TupleDataset(x, y), DictDataset(x, y)):
        clan = make_clan(**settings)
        batches = drive(clan, clan.loader(dataset, B), steps=10**6)
        results.append(batches)
    fast = results[0]
    assert [phase for phase, _ in fast] == ["cooperative", "cooperative", "competitive"] * 2
    for other in results[1:]:
        assert len(other) == len(fast)
        for (phase, batch), (fast_phase, (fx, fy)) in zip(other, fast):
            bx, by = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
            assert phase == fast_phase
            assert torch.equal(bx, fx) and torch.equal(by, fy)
            assert bx.dtype == fx.dtype and by.dtype == fy.dtype
            assert (bx.stride(0) == 0) == (phase == "competitive")


def test_breaking_out_and_iterating_again_continues_the_epoch():
    n = 100
    straight = make_clan(round_length=4, duty_cycle=0.5)
    expected = drive(straight, straight.loader(ids_dataset(n), B), steps=6)

    clan = make_clan(round_length=4, duty_cycle=0.5)
    loader = clan.loader(ids_dataset(n), B)
    member = clan.round()
    got = drive(clan, loader, steps=2, member=member)
    got += drive(clan, loader, steps=1, member=clan.round())
    got += drive(clan, clan.loader(ids_dataset(n), B), steps=3, member=clan.round())  # a new loader too
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (_, (gx, gy)), (_, (ex, ey)) in zip(got, expected):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_loader_after_load_state_dict_continues_the_saved_run():
    n = 90
    clan = make_clan(round_length=4, duty_cycle=0.5, seed=3)
    drive(clan, clan.loader(ids_dataset(n), B), steps=5)  # stop mid-epoch and mid-round
    saved = copy.deepcopy(clan.state_dict())
    expected = drive(clan, clan.loader(ids_dataset(n), B), steps=12)  # crosses into the next epoch

    fresh = make_clan(round_length=4, duty_cycle=0.5, seed=99)  # another seed: the state must win
    fresh.load_state_dict(saved)
    got = drive(fresh, fresh.loader(ids_dataset(n), B), steps=12)
    got += drive(fresh, fresh.loader(ids_dataset(n), B), steps=12 - len(got))
    expected += drive(clan, clan.loader(ids_dataset(n), B), steps=12 - len(expected))
    assert len(got) == len(expected) == 12
    for (gp, (gx, _)), (ep, (ex, _)) in zip(got, expected):
        assert gp == ep and torch.equal(gx, ex)


class NamedDataset(Dataset):
    """Samples with a string field, as datasets of files or captions have."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return {"x": torch.tensor(float(i)), "name": f"s{i}"}


def test_non_tensor_fields_pass_through_in_batch_order():
    clan = make_clan(round_length=2, duty_cycle=0.5)
    batches = drive(clan, clan.loader(NamedDataset(), B), steps=4)
    assert [phase for phase, _ in batches] == ["cooperative", "competitive"] * 2
    for phase, batch in batches:
        x, names = batch["x"], batch["name"]
        samples = x.flatten() if phase == "cooperative" else x[0]
        assert x.shape == (P, B)
        assert names == [f"s{int(i)}" for i in samples.tolist()]
