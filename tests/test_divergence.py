"""Divergence: a diverging member never takes the run down, and a diverged population is restored."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, DivergenceError, member_loss

from plain_loop import train_step

import models

P, B = 4, 8


def make_clan(seed=0, **kwargs):
    settings = {"population_size": P, "round_length": 6, "duty_cycle": 0.5, "seed": seed, **kwargs}
    return models.adamw_clan(models.mlp(6, 12, 3, batchnorm=True, seed=0), lr=1e-2, weight_decay=1e-2, **settings)


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


X_VAL, Y_VAL = data(seed=2)


def train_round(clan, loader_iter, poison=None):
    """Run one round; ``poison(clan)`` is called before every step. Returns the validation losses."""
    member = clan.round()
    while not member.done:
        if poison is not None:
            poison(clan)
        x, y = next(loader_iter)
        train_step(member, F.cross_entropy, x, y)
    member.model.eval()
    with torch.no_grad():
        val = member_loss(F.cross_entropy, member.model(member.share(X_VAL)), member.share(Y_VAL))
    member.model.train()
    return val


def forever(loader):
    while True:
        yield from loader


def population_state(clan):
    opt = clan.optimizer.adamw_state
    return [clan.population.flat.clone(), clan.population.grad_flat.clone(), opt.exp_avg.clone(),
            opt.exp_avg_sq.clone(), opt.step.clone(), *[b.clone() for b in clan.population.buffers.values()]]


def poison_all(clan):
    with torch.no_grad():
        clan.population.flat[:, :5] = float("nan")


def test_cooperative_divergence_restores_the_last_good_round_with_half_the_lr():
    clan = make_clan()
    batches = forever(clan.loader(data(), batch_size=B))
    clan.step(train_round(clan, batches))
    start_of_round_1 = population_state(clan)
    lr_before = clan.incumbent["lr"].item()

    val = train_round(clan, batches, poison=poison_all)
    assert not torch.isfinite(val).any()
    with pytest.warns(RuntimeWarning, match="the whole population diverged in round 1; restored the state of the start of round 1"):
        record = clan.step(val)

    for restored, saved in zip(population_state(clan), start_of_round_1):
        assert torch.equal(restored, saved)
    assert record["event"] == "diverged" and record["winner"] is None and record["restored_round"] == 1
    assert clan.incumbent["lr"].item() == pytest.approx(lr_before / 2)
    # The event is in the history, after round 0's ordinary record, with round 1's (NaN) losses.
    assert len(clan.history) == 2 and clan.history[-1] is record and "event" not in clan.history[0]
    assert record["round"] == 1 and len(record["val_losses"]) == P and all(map(math.isnan, record["val_losses"]))
    assert clan.genomes["lr"][0].item() == pytest.approx(lr_before / 2)  # member 0 keeps the incumbent

    clan.step(train_round(clan, batches))  # training goes on, finite
    assert torch.isfinite(clan.population.flat).all()
    assert "event" not in clan.history[-1]


def test_repeated_divergence_gives_up_after_max_restores():
    clan = make_clan(max_restores=2)
    batches = forever(clan.loader(data(), batch_size=B))
    lr0 = clan.incumbent["lr"].item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        clan.step(train_round(clan, batches, poison=poison_all))
        clan.step(train_round(clan, batches, poison=poison_all))
    assert clan.incumbent["lr"].item() == pytest.approx(lr0 / 4)
    with pytest.raises(DivergenceError, match="gave up after 2 consecutive restores"):
        clan.step(train_round(clan, batches, poison=poison_all))


def test_on_divergence_raise():
    clan = make_clan(on_divergence="raise")
    batches = forever(clan.loader(data(), batch_size=B))
    with pytest.raises(DivergenceError, match="every member's validation loss is NaN or infinite in round 0"):
        clan.step(train_round(clan, batches, poison=poison_all))


def test_a_member_diverging_in_the_competitive_phase_harms_no_one():
    poisoned, clean = make_clan(), make_clan()
    batches_p = forever(poisoned.loader(data(), batch_size=B))
    batches_c = forever(clean.loader(data(), batch_size=B))

    def poison_member_2(clan):
        if clan.phase == "competitive":
            with torch.no_grad():
                clan.population.flat[2] = float("inf")

    val_p = train_round(poisoned, batches_p, poison=poison_member_2)
    val_c = train_round(clean, batches_c)
    others = [0, 1, 3]
    assert torch.equal(poisoned.population.flat[others], clean.population.flat[others])
    assert torch.equal(val_p[others], val_c[others])
    assert not math.isfinite(val_p[2].item())
    record = poisoned.step(val_p)
    assert record["winner"] != 2
    assert torch.isfinite(poisoned.population.flat).all()  # everyone took the winner's weights


def test_gradient_clipping_per_member_matches_clip_grad_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3, round_length=50,
                duty_cycle=1.0, selection=None, autobind=["adamw"], init="independent", max_grad_norm=0.05)
    lrs = [1e-3, 1e-2, 3e-2]
    clan.set_genome("lr", lrs)
    refs = [clan.population.member_module(i) for i in range(3)]
    ref_opts = [torch.optim.AdamW(r.parameters(), lr=lrs[i], betas=tuple(clan.genomes[k][i].item() for k in ("betas/0", "betas/1")),
                                  weight_decay=clan.genomes["weight_decay"][i].item(), eps=clan.genomes["eps"][i].item())
                for i, r in enumerate(refs)]
    member = clan.round()
    g = torch.Generator().manual_seed(3)
    clipped = 0
    for _ in range(12):
        x = torch.randn(3, B, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (3, B), generator=g)
        train_step(member, F.cross_entropy, x, y)
        for i, (ref, opt) in enumerate(zip(refs, ref_opts)):
            F.cross_entropy(ref(x[i]), y[i]).backward()
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            clipped += int(norm > 0.05)
            opt.step()
            opt.zero_grad()
    assert clipped > 0  # the limit was active
    for i, ref in enumerate(refs):
        for name, stacked in clan.population.named_parameters():
            torch.testing.assert_close(stacked[i], ref.get_parameter(name), rtol=1e-10, atol=1e-12)


def test_bad_max_grad_norm():
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number or None, got -1"):
        make_clan(max_grad_norm=-1)


def test_bad_divergence_settings():
    with pytest.raises(ValueError, match="on_divergence must be 'restore' or 'raise', got 'ignore'"):
        make_clan(on_divergence="ignore")
    with pytest.raises(ValueError, match="max_restores must be a positive int, got 0"):
        make_clan(max_restores=0)


def test_resume_keeps_the_restore_point():
    clan = make_clan()
    batches = forever(clan.loader(data(), batch_size=B))
    clan.step(train_round(clan, batches))
    saved = clan.state_dict()
    other = make_clan(seed=9)
    other.load_state_dict(saved)
    for clan_ in (clan, other):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            clan_.step(train_round(clan_, forever(clan_.loader(data(), batch_size=B)), poison=poison_all))
    assert torch.equal(clan.population.flat, other.population.flat)
    assert repr(clan.history) == repr(other.history)  # repr: NaN losses compare unequal with ==
    assert clan.history[-1]["event"] == "diverged"
