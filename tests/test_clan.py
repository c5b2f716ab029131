"""The Clan and Member API: the round clock, genes in force, gradient sync, errors, seeds and resume."""

import functools
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vmapclan import Clan, Gene, member_loss

from plain_loop import train_step

import models

P = 3


mlp = functools.partial(models.mlp, 4, 8, 3, dropout=0.0)  # float64: gradient comparisons are tight


def make_clan(model=None, *, lr=1e-2, **kwargs):
    """A clan of ``model`` (a fresh :func:`mlp` by default) with its AdamW; ``kwargs`` go to ``Clan``."""
    settings = {"population_size": P, "round_length": 4, "duty_cycle": 0.5, "seed": 0, **kwargs}
    return models.adamw_clan(model if model is not None else mlp(), lr=lr, weight_decay=0.01, **settings)


def genome_clan(**kwargs):
    """A genome-only clan with one log gene and one int gene."""
    settings = dict(population_size=P, round_length=4, duty_cycle=0.5, seed=0,
                    genome_config={"x": Gene(1e-3, 1.0, init=0.1), "k": Gene(1, 9, init=5, scale="linear", dtype="int")})
    settings.update(kwargs)
    return Clan(**settings)


def data(n=240, seed=0):
    """A learnable 3-class problem: ``(x [n, 4] float64, y [n] long)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def training_step(member, x, y):
    """One step of the contract's loop: forward, loss, synced backward, update, clock."""
    loss = train_step(member, F.cross_entropy, x, y)
    return loss


def train(clan, loader, steps, val):
    """Run ``steps`` training steps of the contract's loop, selecting at each round's end.

    Args:
        clan: The clan.
        loader: Its loader (epochs restart as needed).
        steps: Training steps to run.
        val: ``(x_val, y_val)`` without the member dimension.
    """
    member, done = clan.round(), 0
    while done < steps:
        for x, y in loader:
            training_step(member, x, y)
            if member.done:
                with torch.no_grad():
                    out = member.model(member.share(val[0]))
                    clan.step(member_loss(F.cross_entropy, out, member.share(val[1])))
                member = clan.round()
            done += 1
            if done == steps:
                break


# -- the round clock ------------------------------------------------------------------------------

def test_phases_and_done_over_a_round():
    clan = make_clan(round_length=5, duty_cycle=0.4)  # C = 2
    x, y = data()
    for round_index in range(2):
        member = clan.round()
        assert member.round_index == clan.round_index == round_index
        seen = []
        for _ in range(5):
            assert not member.done
            seen.append(member.phase)
            training_step(member, member.share(x[:6]), member.share(y[:6]))
        assert seen == ["cooperative"] * 3 + ["competitive"] * 2
        assert member.done and clan.round_done and member.phase == "competitive"
        clan.step(torch.arange(P, dtype=torch.float64))
    assert clan.global_step == 10 and clan.step_in_round == 0


@pytest.mark.parametrize("round_length, duty_cycle, competitive", [
    (10, 0.15, 2),  # 1.5 rounds up
    (10, 0.25, 3),  # 2.5 rounds half up (Python's round() would give 2)
    (10, 0.45, 5),  # 4.5 -> 5 (round() would give 4)
    (10, 0.05, 1),
    (10, 0.01, 1),  # never fewer than one competitive step
    (20, 0.025, 1),
    (7, 0.6, 4),
    (1000, 0.15, 150),
    (7, 1.0, 7),
    (1, 1.0, 1),
])
def test_competitive_steps_formula(round_length, duty_cycle, competitive):
    clan = genome_clan(round_length=round_length, duty_cycle=duty_cycle)
    assert clan.competitive_steps == competitive
    assert clan.cooperative_steps == round_length - competitive
    member = clan.round()
    phases = []
    while not member.done:
        phases.append(member.phase)
        member.step()
    assert phases == ["cooperative"] * (round_length - competitive) + ["competitive"] * competitive


def test_get_gene_is_the_incumbent_when_cooperating_and_each_members_own_when_competing():
    clan = make_clan(autobind=["adamw", "gradient_accumulation"])
    for _ in range(2):
        member = clan.round()
        incumbent = {n: v.clone() for n, v in clan.incumbent.items()}
        own = {n: v.clone() for n, v in clan.genomes.items()}
        assert any(not torch.equal(own[n], incumbent[n].expand(P)) for n in own)  # mutations differ
        for _ in range(2):
            assert member.phase == "cooperative"
            for name in clan.genes:
                assert torch.equal(member.get_gene(name), incumbent[name].expand(P))
            assert torch.equal(clan.optimizer.hyper.lr, incumbent["lr"].expand(P))
            member.step()
        while True:
            assert member.phase == "competitive"
            genome = member.genome
            for name in clan.genes:
                assert torch.equal(member.get_gene(name), own[name])
                assert torch.equal(genome[name], own[name])
            assert torch.equal(clan.optimizer.hyper.lr, own["lr"])
            assert torch.equal(clan.optimizer.hyper.beta2, own["betas/1"])
            assert torch.equal(clan.optimizer.num_grad_accum, own["num_grad_accum"])
            if member.done:
                break
            member.step()
        for name in clan.genes:  # still each member's own at done
            assert torch.equal(member.get_gene(name), own[name])
        clan.step(torch.tensor([2.0, 1.0, 3.0]))


def test_round_has_no_side_effects():
    clan = make_clan()
    clan.loader(TensorDataset(*data()), 4)
    before = copy.deepcopy(clan.state_dict())
    members = [clan.round() for _ in range(3)]
    after = clan.state_dict()
    assert all(m.round_index == 0 and m.phase == "cooperative" for m in members)
    for key in ("round", "round_step", "global_step", "history"):
        assert after[key] == before[key]
    assert torch.equal(after["generator"], before["generator"])
    assert torch.equal(after["loader"]["generator"], before["loader"]["generator"])
    assert all(torch.equal(after["genomes"][n], before["genomes"][n]) for n in before["genomes"])
    assert torch.equal(after["model"]["params"], before["model"]["params"])
    members[0].step()
    assert members[2].phase == "cooperative" and clan.step_in_round == 1  # views of one clock


# -- misuse of the clock --------------------------------------------------------------------------

def finish_round(member):
    """Step the clock to the end of the round without training (the clock is what is tested)."""
    while not member.done:
        member.step()


def test_stale_member_after_clan_step_is_an_error():
    clan = make_clan()
    member = clan.round()
    finish_round(member)
    clan.step(torch.zeros(P))
    message = (r"stale member: it belongs to round 0 but the clan is in round 1; "
               r"take the current one from clan.round\(\)")
    for use in (lambda: member.phase, lambda: member.step(), lambda: member.model, lambda: member.optimizer,
                lambda: member.get_gene("lr"), lambda: member.sync_context(), lambda: member.done):
        with pytest.raises(RuntimeError, match=message):
            use()
    assert clan.round().phase == "cooperative"


def test_member_step_after_done_is_an_error():
    clan = make_clan()
    member = clan.round()
    finish_round(member)
    with pytest.raises(RuntimeError, match=r"member.step\(\): round 0 is done \(4 steps\); call "
                                           r"clan.step\(val_losses\) and take the next member from clan.round\(\)"):
        member.step()
    assert clan.global_step == 4


def test_clan_step_before_done_is_an_error():
    clan = make_clan()
    member = clan.round()
    member.step()
    with pytest.raises(RuntimeError, match=r"clan.step\(\) called at step 1 of 4 in round 0: the round is not done "
                                           r"\(check member.done\)"):
        clan.step(torch.zeros(P))
    assert clan.history == [] and clan.step_in_round == 1


def test_backward_outside_sync_context_when_cooperating_is_an_error():
    clan = make_clan()
    member = clan.round()
    x, y = data()
    loss = member_loss(F.cross_entropy, member.model(member.share(x[:5])), member.share(y[:5]))
    with pytest.raises(RuntimeError, match=r"backward ran outside member.sync_context\(\) in the cooperative phase: "
                                           r"members would drift apart"):
        loss.sum().backward()
    member.step()
    member.step()
    assert member.phase == "competitive"  # no sync needed, none required
    member_loss(F.cross_entropy, member.model(member.share(x[:5])), member.share(y[:5])).sum().backward()


# -- gradient sync ------------------------------------------------------------------------------------

def member_grads(clan, x, y):
    """Each member's gradient of its own mean loss, flattened as ``grad_flat`` is: ``[P, N]``."""
    rows = []
    for i in range(clan.population_size):
        module = clan.population.member_module(i)
        F.cross_entropy(module(x[i]), y[i]).backward()
        rows.append(torch.cat([module.get_parameter(n).grad.flatten() for n in clan.population.shapes]))
    return torch.stack(rows)


def test_sync_context_averages_gradients_when_cooperating_and_does_nothing_when_competing():
    clan = make_clan()
    member = clan.round()
    x, y = data()
    xs, ys = x[:18].view(P, 6, 4), y[:18].view(P, 6)  # disjoint shards
    expected = member_grads(clan, xs, ys)
    with member.sync_context():
        member_loss(F.cross_entropy, member.model(xs), ys).sum().backward()
    clan.sync_members()  # cooperating, the members train as one model: member 0's row holds the gradient
    grads = clan.population.grad_flat
    torch.testing.assert_close(grads[0], expected.mean(0), atol=1e-12, rtol=1e-9)
    assert all(torch.equal(grads[i], grads[0]) for i in range(P))  # bit-identical
    member.optimizer.step()
    member.optimizer.zero_grad()
    clan.sync_members()
    assert not grads.any()
    flat = clan.population.flat
    assert all(torch.equal(flat[i], flat[0]) for i in range(P))  # members stay identical
    member.step()
    member.step()

    assert member.phase == "competitive"
    expected = member_grads(clan, xs, ys)
    with member.sync_context():
        member_loss(F.cross_entropy, member.model(xs), ys).sum().backward()
    torch.testing.assert_close(grads, expected, atol=1e-12, rtol=1e-9)
    assert not torch.equal(grads[0], grads[1])


def test_cooperative_phase_keeps_members_identical_while_training():
    clan = make_clan(round_length=6, duty_cycle=0.2)
    x, y = data()
    loader = clan.loader(TensorDataset(x, y), 8)
    member = clan.round()
    for xb, yb in loader:
        if member.phase != "cooperative":
            break
        training_step(member, xb, yb)
        flat = clan.member_state()["params"]  # every member's rows up to date
        assert all(torch.equal(flat[i], flat[0]) for i in range(P))
    assert clan.step_in_round == clan.cooperative_steps == 5


# -- configuration errors -------------------------------------------------------------------------

def two_groups():
    """A model and an AdamW with two param groups, the first with lr 0."""
    model = mlp()
    return model, torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[-1].parameters()}])


def one_layer_only():
    """A model and an AdamW over its first layer only."""
    model = mlp()
    return model, torch.optim.AdamW(model[0].parameters())


def extra_tensor():
    """A model and an AdamW that also holds a tensor outside the model."""
    model = mlp()
    return model, torch.optim.AdamW([*model.parameters(), torch.zeros(2, requires_grad=True)])


def with_optimizer(cls, **kwargs):
    """A builder of a model and ``cls(model.parameters(), **kwargs)``."""
    def build():
        model = mlp()
        return model, cls(model.parameters(), **kwargs)
    return build


@pytest.mark.parametrize("settings, error, message", [
    (dict(duty_cycle=0), ValueError, r"Clan: duty_cycle must be in \(0, 1\], got 0"),
    (dict(duty_cycle=1.5), ValueError, r"Clan: duty_cycle must be in \(0, 1\], got 1.5"),
    (dict(duty_cycle=-0.1), ValueError, r"Clan: duty_cycle must be in \(0, 1\], got -0.1"),
    (dict(duty_cycle=True), ValueError, r"Clan: duty_cycle must be in \(0, 1\], got True"),
    (dict(round_length=1, duty_cycle=0.5), ValueError,
     r"Clan: round_length=1 with duty_cycle=0.5 leaves no cooperative step \(1 competitive\); "
     r"use a longer round or duty_cycle=1.0"),
    (dict(round_length=4, duty_cycle=0.9), ValueError,
     r"Clan: round_length=4 with duty_cycle=0.9 leaves no cooperative step \(4 competitive\)"),
    (dict(round_length=0), ValueError, r"Clan: round_length must be a positive int, got 0"),
    (dict(population_size=0), ValueError, r"Clan: population_size must be a positive int, got 0"),
    (dict(population_size=1), ValueError, r"Clan: selection='winner' needs population_size >= 2, got 1"),
    (dict(population_size=1, selection="truncation", duty_cycle=1.0), ValueError,
     r"Clan: selection='truncation' needs population_size >= 2, got 1"),
    (dict(selection="truncation"), ValueError,
     r"Clan: selection='truncation' keeps members that differ, so it needs duty_cycle=1.0 \(a cooperative phase "
     r"averages gradients over identical members\), got 0.5"),
    (dict(selection=None), ValueError, r"Clan: selection=None keeps members that differ, so it needs duty_cycle=1.0"),
    (dict(selection="best"), ValueError, r"Clan: selection must be 'winner', 'truncation' or None, got 'best'"),
    (dict(truncation_fraction=0.6), ValueError, r"Clan: truncation_fraction must be in \(0, 0.5\], got 0.6"),
    (dict(seed="0"), TypeError, r"Clan: seed must be an int, got str"),
    (dict(on_divergence="ignore"), ValueError, r"Clan: on_divergence must be 'restore' or 'raise', got 'ignore'"),
    (dict(init="independent"), ValueError,
     r"Clan: init='independent' starts members that differ, so the first round needs duty_cycle=1.0 "
     r"\(a cooperative phase averages gradients over identical members\), got 0.5"),
    (dict(model_and_optimizer=with_optimizer(torch.optim.SGD, lr=0.1)), TypeError,
     r"Clan: the optimizer must be torch.optim.AdamW or torch.optim.Adam \(the population trains with a batched "
     r"AdamW\), got SGD"),
    (dict(model_and_optimizer=with_optimizer(torch.optim.Adam, weight_decay=0.1)), ValueError,
     r"Clan: torch.optim.Adam\(weight_decay=0.1\) adds the decay to the gradient"),
    (dict(model_and_optimizer=with_optimizer(torch.optim.AdamW, amsgrad=True)), ValueError,
     r"Clan: AdamW\(amsgrad=True\) is not supported by the batched AdamW"),
    (dict(model_and_optimizer=with_optimizer(torch.optim.AdamW, maximize=True)), ValueError,
     r"Clan: AdamW\(maximize=True\) is not supported by the batched AdamW"),
    (dict(model_and_optimizer=one_layer_only), ValueError,
     r"Clan: parameters missing from the optimizer: \['3.weight', '3.bias'\]"),
    (dict(model_and_optimizer=two_groups), ValueError,
     r"Clan: the first param group's lr is 0, so it cannot scale group 1's lr \(0.001\)"),
    (dict(model_and_optimizer=extra_tensor), ValueError,
     r"Clan: the optimizer holds 1 tensors that are not parameters of the model"),
    (dict(model_and_optimizer=lambda: (None, torch.optim.AdamW(mlp().parameters()))), ValueError,
     r"Clan: an optimizer was given without a model"),
    (dict(model_and_optimizer=lambda: (mlp(), None)), ValueError,
     r"Clan: a model needs its optimizer \(a torch.optim.AdamW over its parameters\)"),
])
def test_bad_configuration_is_an_error(settings, error, message):
    settings = dict(settings)
    build = settings.pop("model_and_optimizer", None)
    model, optimizer = build() if build is not None else (mlp(), None)
    if build is None:
        optimizer = torch.optim.AdamW(model.parameters())
    base = dict(population_size=P, round_length=4, duty_cycle=0.5)
    base.update(settings)
    with pytest.raises(error, match=message):
        Clan(model, optimizer, **base)


def test_independent_members_may_cooperate_only_after_the_first_selection():
    clan = make_clan(init="independent", duty_cycle=1.0)
    with pytest.raises(ValueError, match=r"Clan: init='independent' starts members that differ, so the first round "
                                         r"needs duty_cycle=1.0 .*got 0.5"):
        clan.reconfigure(duty_cycle=0.5)
    finish_round(clan.round())
    clan.step(torch.tensor([2.0, 1.0, 3.0]))  # everyone takes the winner's weights
    clan.reconfigure(duty_cycle=0.5)
    assert clan.round().phase == "cooperative"
    flat = clan.population.flat
    assert all(torch.equal(flat[i], flat[0]) for i in range(P))


def test_population_of_one_is_allowed_for_a_sweep():
    clan = make_clan(population_size=1, selection=None, duty_cycle=1.0)
    member = clan.round()
    finish_round(member)
    assert clan.step(torch.tensor([1.0]))["winner"] == 0


def test_unknown_genes_and_bad_genome_values_are_errors():
    clan = make_clan()
    member = clan.round()
    with pytest.raises(ValueError, match=r"member.get_gene: unknown gene 'momentum'; the genes are "
                                         r"\['betas/0', 'betas/1', 'eps', 'lr', 'weight_decay'\]"):
        member.get_gene("momentum")
    with pytest.raises(ValueError, match=r"Clan.set_genome: unknown gene 'momentum'; the genes are \['betas/0'"):
        clan.set_genome("momentum", [0.1] * P)
    with pytest.raises(ValueError, match=r"gene 'lr': values \[2.0, 0.001, 0.001\] leave the bounds \[0.0001, 1.0\]"):
        clan.set_genome("lr", [2.0, 1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"gene 'lr': expected shape \[3\], got \[2\]"):
        clan.set_genome("lr", [1e-3, 1e-3])
    # A bound written as a float32 tensor (torch's default dtype) is a rounding above 0.1: it means the
    # bound. A float32 value a step further out is still refused.
    clan.set_genome("lr", torch.tensor([1e-4, 1e-2, 1.0]))
    assert clan.genomes["lr"].tolist() == [1e-4, torch.tensor(1e-2).item(), 1.0] and torch.tensor(1e-4).item() != 1e-4
    with pytest.raises(ValueError, match=r"gene 'lr': values \[1.000000\d*\d, .*leave the bounds \[0.0001, 1.0\]"):
        clan.set_genome("lr", torch.tensor([1.0, 1e-3, 1e-3]).nextafter(torch.tensor(2.0)).nextafter(torch.tensor(2.0)))


def test_set_genome_takes_effect_in_the_competitive_phase():
    clan = make_clan()
    member = clan.round()
    clan.set_genome("lr", [1e-3, 2e-3, 3e-3])
    assert torch.equal(clan.optimizer.hyper.lr, torch.full((P,), 1e-2, dtype=torch.float64))  # still cooperating
    member.step()
    member.step()
    assert torch.equal(member.get_gene("lr"), torch.tensor([1e-3, 2e-3, 3e-3], dtype=torch.float64))
    assert torch.equal(clan.optimizer.hyper.lr, torch.tensor([1e-3, 2e-3, 3e-3], dtype=torch.float64))


@pytest.mark.parametrize("losses, error, message", [
    (torch.zeros(2), ValueError, r"clan.step: val_losses must have shape \[3\] or \[3, K\] \(one loss per member, "
                                 r"or K per member\), got \[2\]"),
    (torch.zeros(P, 2, 1), ValueError, r"clan.step: val_losses must have shape \[3\] or \[3, K\] .*got \[3, 2, 1\]"),
    (torch.zeros(2, 5), ValueError, r"clan.step: val_losses must have shape \[3\] or \[3, K\] .*got \[2, 5\]"),
    (torch.zeros(P, 0), ValueError, r"clan.step: val_losses must have shape \[3\] or \[3, K\] .*got \[3, 0\]"),
    (torch.tensor(1.0), ValueError, r"clan.step: val_losses must have shape \[3\] .*got \[\]"),
    ("low", TypeError, r"clan.step: val_losses must be a tensor of shape \[3\] or \[3, K\], got str"),
    (torch.zeros(P, dtype=torch.complex64), TypeError, r"clan.step: val_losses must be real numbers, got dtype "
                                                       r"torch.complex64"),
    (torch.zeros(P, dtype=torch.bool), TypeError, r"clan.step: val_losses must be real numbers, got dtype torch.bool"),
])
def test_bad_val_losses_are_errors(losses, error, message):
    clan = make_clan()
    finish_round(clan.round())
    with pytest.raises(error, match=message):
        clan.step(losses)
    assert clan.history == [] and clan.round_done


# -- seeds, genome-only clans and resume ----------------------------------------------------------

def run(seed, steps=14):
    """Train a fresh clan of :func:`mlp` (dropout on) for ``steps`` steps from ``seed``."""
    torch.manual_seed(0)  # the same starting weights and dropout stream for every call
    x, y = data()
    clan = make_clan(mlp(dropout=0.2), seed=seed, lr=3e-2)
    train(clan, clan.loader(TensorDataset(x[:200], y[:200]), 8), steps, (x[200:], y[200:]))
    return clan


def test_same_seed_gives_the_same_history_and_weights():
    first, again, other = run(seed=0), run(seed=0), run(seed=1)
    assert len(first.history) == 3
    assert first.history == again.history
    assert torch.equal(first.population.flat, again.population.flat)
    assert first.history != other.history
    assert not torch.equal(first.population.flat, other.population.flat)


def test_genome_only_clan_evolves_its_genes():
    clan = Clan(genome_config={"lr": Gene(1e-5, 1e-1, init=1e-2)}, population_size=4, round_length=2, duty_cycle=0.5,
                seed=0)
    member = clan.round()
    assert member.model is None and member.optimizer is None
    with pytest.raises(ValueError, match=r"Clan.best_model: this clan has no model \(a genome-only clan\)"):
        clan.best_model()
    distances = []
    for _ in range(40):
        member = clan.round()
        member.step()
        member.step()
        lr = member.get_gene("lr")
        clan.step((lr.log10() + 3.5).abs())  # the best lr is 10**-3.5
        distances.append(abs(clan.incumbent["lr"].log10().item() + 3.5))
    assert distances[0] <= 1.5
    assert all(b <= a for a, b in zip(distances, distances[1:]))  # the incumbent never gets worse
    assert distances[-1] < 0.2
    assert len(clan.history) == 40


def snapshot(clan):
    """Every number a resumed clan must reproduce."""
    pop, opt = clan.population, clan.optimizer
    out = {"flat": pop.flat, "grad_flat": pop.grad_flat, **{f"buf:{n}": b for n, b in pop.buffers.items()},
           **{f"opt:{n}": t for n, t in opt.adamw_state._asdict().items()},
           **{f"genome:{n}": v for n, v in clan.genomes.items()}}
    return {n: t.clone() for n, t in out.items()}


def test_state_dict_resumes_into_a_fresh_clan_to_identical_numbers():
    x, y = data()
    train_set, val = TensorDataset(x[:100], y[:100]), (x[200:], y[200:])

    def fresh(seed):
        return make_clan(mlp(dropout=0.3, batchnorm=True), seed=seed, lr=3e-2,
                         autobind=["adamw", "gradient_accumulation"],
                         genome_config={"num_grad_accum": {"high": 3, "resample_prob": 0.5}})

    torch.manual_seed(0)
    clan = fresh(0)
    loader = clan.loader(train_set, 6)
    train(clan, loader, 7, val)  # stop in the competitive phase of round 1, mid-epoch
    assert clan.phase == "competitive" and clan.round_index == 1
    saved = copy.deepcopy(clan.state_dict())
    train(clan, loader, 11, val)
    expected, history = snapshot(clan), copy.deepcopy(clan.history)

    torch.manual_seed(123)  # another global RNG state: the checkpoint must restore it
    resumed = fresh(5)  # another seed: the checkpoint must win
    resumed.load_state_dict(saved)
    train(resumed, resumed.loader(train_set, 6), 11, val)
    got = snapshot(resumed)
    assert len(history) == 4 and resumed.history == history
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_load_state_dict_refuses_another_configuration():
    saved = make_clan().state_dict()
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's population_size is 3, "
                                         r"this clan's is 4"):
        make_clan(population_size=4).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: checkpoint format version 99, "
                                         r"this vmapclan reads versions 1 and 2"):
        make_clan().load_state_dict({**saved, "format_version": 99})
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: not a vmapclan state dict \(no 'format_version'\)"):
        make_clan().load_state_dict({})


# -- no host synchronisation in the training step ------------------------------------------------

SYNCS = ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__")


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Make every tensor-to-host conversion raise while the block runs."""
    def forbid(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync in the training step: Tensor.{name}")
        return raise_

    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, forbid(name))
        yield


def test_no_host_sync_helper_catches_a_sync(monkeypatch):
    with no_host_sync(monkeypatch):
        for convert in (lambda t: t.item(), lambda t: bool(t), lambda t: t.tolist(), lambda t: float(t)):
            with pytest.raises(AssertionError, match=r"host sync in the training step"):
                convert(torch.tensor(1.0))
    assert torch.tensor(2.0).item() == 2.0  # restored


class TinyTransformer(nn.Module):
    """A one-layer transformer classifier over sequences of 5 tokens of width 8."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_training_step_never_syncs_with_the_host(monkeypatch, kind):
    x, y = data()
    if kind == "transformer":
        x = x.float().repeat(1, 10).view(-1, 5, 8)
        model = TinyTransformer()
    else:
        model = mlp(dropout=0.1, batchnorm=True)
    clan = make_clan(model, autobind=["adamw", "gradient_accumulation"], max_grad_norm=1.0)
    # The update accelerators run (and the CPU default for small members). The CPU default for
    # larger members, PyTorch's fused kernel per member, reads the [P] hyperparameters on the
    # host, which is no synchronisation there.
    clan.optimizer.update = "batched"
    loader = iter(clan.loader(TensorDataset(x, y), 8))
    member = clan.round()
    for _ in range(3 * clan.round_length):
        with no_host_sync(monkeypatch):
            xb, yb = next(loader)
            loss = train_step(member, F.cross_entropy, xb, yb)
            done = member.done
        if done:  # one host sync per round is allowed: selection
            clan.step(loss.detach())
            member = clan.round()
    assert len(clan.history) == 3


def test_an_optimizer_that_has_stepped_gives_its_settings_not_its_state_and_a_warning():
    """A warmed-up torch AdamW (a fine-tune resumed, say): the clan takes its lr and betas, and says
    that its moments and step counts stay behind."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"Clan: the optimizer has stepped already, and its state \(moments, step "
                                         r"counts\) is not carried over: the clan's AdamW starts afresh"):
        clan = Clan(model, optimizer, population_size=2, autobind=["adamw"], round_length=4, duty_cycle=0.5)
    state = clan.optimizer.adamw_state
    assert state.step.eq(0).all() and state.exp_avg.eq(0).all() and clan.incumbent["lr"].item() == 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = nn.Linear(3, 2)
        Clan(fresh, torch.optim.AdamW(fresh.parameters()), population_size=2, autobind=["adamw"], round_length=4,
             duty_cycle=0.5)
