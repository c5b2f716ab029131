"""A parameter that sits out updates (frozen, without gradient, added by growth) keeps its own AdamW step count.

``torch.optim.AdamW`` counts steps per parameter and never counts one for a parameter whose
``.grad`` is ``None``; the batched AdamW counts per member and per parameter the updates each
parameter sat out, so that the bias correction resumes where it stopped.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, FusedStep, TrainingMachine

from plain_loop import train_step

SETTINGS = {"lr": 0.05, "betas": (0.8, 0.9), "weight_decay": 0.1, "eps": 1e-6}


class TwoLayers(nn.Module):
    """``b(tanh(a(x)))``, or ``b(x)`` with ``skip_a`` (then ``a`` gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.skip_a = False

    def forward(self, x):
        return self.b(x if self.skip_a else torch.tanh(self.a(x)))


def batches(steps: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(steps)]


SKIPPED = range(3, 8)  # the steps where 'a' gets no gradient


def reference(steps, grow_at=None):
    """Plain torch training of one model; ``grow_at``: a new layer ``c`` joins the optimizer there."""
    torch.manual_seed(0)
    model = TwoLayers().double()
    start = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), **SETTINGS)
    for i, (x, y) in enumerate(batches(steps)):
        if i == grow_at:
            model = grown(model)
            optimizer.add_param_group({"params": list(model.c.parameters()), **SETTINGS})
        model.skip_a = i in SKIPPED
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return start, model


def grown(model):
    """``model`` with a layer ``c`` after ``b`` (deterministic init, so the clan's members and the reference agree)."""
    class Grown(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.a, self.b, self.skip_a = inner.a, inner.b, inner.skip_a
            self.c = nn.Linear(2, 2).to(inner.b.weight.dtype)
            with torch.no_grad():
                self.c.weight.copy_(torch.eye(2) + 0.1)
                self.c.bias.fill_(0.05)

        def forward(self, x):
            return self.c(self.b(x if self.skip_a else torch.tanh(self.a(x))))

    return Grown(model)


@pytest.mark.parametrize("path", ["batched", "per-member", "fused", "fused-per-member"])
def test_a_parameter_without_gradient_resumes_its_own_bias_correction_as_torch_adamw(path):
    steps = 12
    start, expected = reference(steps)
    model = copy.deepcopy(start)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), **SETTINGS), population_size=2, round_length=steps,
                duty_cycle=1.0, selection=None, autobind=["adamw"])
    if not path.startswith("fused"):
        clan.optimizer.update = path
    step = None
    if path.startswith("fused"):  # the per-member kernel takes the gradients per parameter, None for 'a'
        step = FusedStep(clan, F.mse_loss, update="per-member" if path == "fused-per-member" else "auto")
    member = clan.round()
    for i, (x, y) in enumerate(batches(steps)):
        clan.population.module.skip_a = i in SKIPPED
        x, y = member.share(x), member.share(y)
        if step is not None:
            step(x, y)
            continue
        train_step(member, F.mse_loss, x, y)
    got = clan.population.member_module(0)  # member 0 trains with the optimizer's own settings
    for name, tensor in expected.named_parameters():
        torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-12, atol=1e-12, msg=name)
    skipped = clan.optimizer.adamw_state.skipped
    assert skipped[:, :2].tolist() == [[5.0, 5.0]] * 2 and not skipped[:, 2:].any()  # a.weight, a.bias


def test_a_parameter_added_by_growth_starts_its_own_step_count_at_zero():
    steps, grow_at = 12, 6
    start, expected = reference(steps, grow_at)
    model = copy.deepcopy(start)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), **SETTINGS), population_size=2, round_length=grow_at,
                duty_cycle=1.0, selection=None, autobind=["adamw"])
    for i, (x, y) in enumerate(batches(steps)):
        if i == grow_at:
            clan.step(torch.tensor([1.0, 2.0]))
            clan.grow(grown)
            assert clan.optimizer.adamw_state.skipped[:, -2:].tolist() == [[6.0, 6.0]] * 2
        member = clan.round()
        clan.population.module.skip_a = i in SKIPPED
        train_step(member, F.mse_loss, member.share(x), member.share(y))
    got = clan.population.member_module(0)
    for name, tensor in expected.named_parameters():
        torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-12, atol=1e-12, msg=name)


def test_a_frozen_phase_counts_the_updates_its_parameters_sat_out():
    from test_tasks_api import FREEZE, blobs_config

    machine = TrainingMachine(blobs_config(schedule=FREEZE))
    machine.train()
    state, columns = machine.clan.optimizer.adamw_state, list(machine.clan.population.columns)
    assert columns == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # 'first-frozen' holds steps 6-18 (12 updates of every member), 'last-frozen' steps 18-24.
    assert state.skipped.tolist() == [[12.0, 12.0, 6.0, 6.0]] * 3
    assert state.step.tolist() == [24.0] * 3


def test_a_checkpoint_without_skipped_counts_loads_as_none_sat_out():
    model = TwoLayers()
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, round_length=2, duty_cycle=0.5)
    state = clan.state_dict()
    state["format_version"] = 1  # saved before the counts existed
    del state["optimizer"]["skipped"]
    del state["last_good"]["optimizer"]["skipped"]
    clan.optimizer.adamw_state.skipped.fill_(3.0)
    clan.load_state_dict(state)
    assert not clan.optimizer.adamw_state.skipped.any() and not clan.optimizer.lagging
    saved = clan.optimizer.state_dict()
    del saved["skipped"]
    clan.optimizer.load_state_dict(saved)
    assert not clan.optimizer.adamw_state.skipped.any()


@pytest.mark.parametrize("update", ["batched", "per-member"])
def test_the_vmap_backward_finds_the_parameters_the_loss_reaches_again_in_each_phase(update):
    """``torch.func`` gives an unreached parameter zeros, not ``None``: the vmap backward finds the
    parameters the loss reaches once per phase, so a branch that a phase switches off is skipped as
    ``torch.optim.AdamW`` skips it, and one switched on again trains again."""
    from vmapclan import Phase

    steps = 12
    start, expected = reference(steps)  # 'a' unreached on steps 3-7
    model = copy.deepcopy(start)
    phases = [Phase("on", 0.0, 0.25), Phase("off", 0.25, 0.66), Phase("on-again", 0.66, 1.0)]
    clan = Clan(model, torch.optim.AdamW(model.parameters(), **SETTINGS), population_size=2, total_steps=steps,
                schedule=phases, round_length=1, duty_cycle=1.0, selection=None, autobind=["adamw"],
                lr_schedule="constant", warmup=0.0, competitive_lr="same")  # torch's lr on every step
    step = FusedStep(clan, F.mse_loss, backward="vmap", update=update)
    member = clan.round()
    for i, (x, y) in enumerate(batches(steps)):
        assert clan.stretch.index == (0 if i < 3 else 1 if i < 8 else 2)
        clan.population.module.skip_a = i in SKIPPED
        step(member.share(x), member.share(y))
        clan.step(torch.tensor([1.0, 2.0]))
        member = clan.round()
    got = clan.population.member_module(0)
    for name, tensor in expected.named_parameters():
        torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-12, atol=1e-12, msg=name)
    assert clan.optimizer.adamw_state.skipped[:, :2].tolist() == [[5.0, 5.0]] * 2


def accumulated_reference(start, steps: int, accumulate: int, skipped_micro):
    """Plain torch AdamW over ``accumulate`` micro-batches per update, ``a`` unreached in ``skipped_micro``."""
    model = copy.deepcopy(start)
    optimizer = torch.optim.AdamW(model.parameters(), **SETTINGS)
    for i, (x, y) in enumerate(batches(steps)):
        model.skip_a = i in skipped_micro
        F.mse_loss(model(x), y).backward()
        if (i + 1) % accumulate == 0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad /= accumulate
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model


def accumulating_clan(start, counts):
    """A clan of ``len(counts)`` members at the optimizer's settings, accumulating ``counts`` micro-batches each."""
    model = copy.deepcopy(start)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), **SETTINGS), population_size=len(counts),
                round_length=18, duty_cycle=1.0, selection=None, autobind=["adamw", "gradient_accumulation"])
    for gene, values in clan.genes_in_force().items():  # every member at the optimizer's settings
        if gene != "num_grad_accum":
            clan.set_genome(gene, values[:1].expand(len(counts)).clone())
    clan.set_genome("num_grad_accum", torch.tensor(counts))
    return clan


@pytest.mark.parametrize("counts, path", [((1, 1), "member"), ((2, 2), "member"), ((1, 2), "member"),
                                          ((2, 3), "member"), ((1, 2), "fused"), ((3, 2), "fused"),
                                          ((2, 3), "resumed"), ((3, 3), "resumed")])
def test_with_the_accumulation_gene_each_members_window_without_gradient_is_skipped_as_torch_adamw(counts, path):
    """Each member's update skips the parameters that no micro-batch of its own window reached, as
    ``torch.optim.AdamW`` skips a ``None`` grad: also when the members accumulate different counts,
    and resumed from a state saved in the middle of a window."""
    steps, skipped_micro = 18, range(6, 12) if path != "resumed" else range(2, 18)  # resumed: 'a' never again
    torch.manual_seed(0)
    start = TwoLayers().double()
    clan = accumulating_clan(start, counts)
    step = FusedStep(clan, F.mse_loss) if path == "fused" else None
    member = clan.round()
    for i, (x, y) in enumerate(batches(steps)):
        if path == "resumed" and i == 4:  # mid-window: 1 of 2 or 3 micro-batches pending
            state = copy.deepcopy(clan.state_dict())
            clan = accumulating_clan(start, counts)
            clan.load_state_dict(state)
            member = clan.round()
        clan.population.module.skip_a = i in skipped_micro
        if step is not None:
            step(member.share(x), member.share(y))
        else:
            train_step(member, F.mse_loss, member.share(x), member.share(y))
    for m, accumulate in enumerate(counts):
        expected = accumulated_reference(start, steps, accumulate, skipped_micro)
        got = clan.population.member_module(m)
        for name, tensor in expected.named_parameters():
            torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-12, atol=1e-12, msg=f"{m} {name}")
        updates = [(i + 1) // accumulate - 1 for i in range(steps) if (i + 1) % accumulate == 0]
        sat_out = sum(all(j in skipped_micro for j in range(u * accumulate, (u + 1) * accumulate)) for u in updates)
        assert clan.optimizer.adamw_state.skipped[m, :2].tolist() == [float(sat_out)] * 2


@pytest.mark.parametrize("counts", [(1, 3), (3, 3)])
def test_the_vmap_backward_with_accumulation_skips_what_a_phase_switches_off(counts):
    """The vmap backward's reached parameters (found per phase) feed each member's window as autograd's do."""
    from vmapclan import Phase

    steps = 12
    torch.manual_seed(0)
    start = TwoLayers().double()
    model = copy.deepcopy(start)
    phases = [Phase("on", 0.0, 0.25), Phase("off", 0.25, 0.66), Phase("on-again", 0.66, 1.0)]
    clan = Clan(model, torch.optim.AdamW(model.parameters(), **SETTINGS), population_size=2, total_steps=steps,
                schedule=phases, round_length=1, duty_cycle=1.0, selection=None,
                autobind=["adamw", "gradient_accumulation"], lr_schedule="constant", warmup=0.0, competitive_lr="same")
    step = FusedStep(clan, F.mse_loss, backward="vmap")
    member = clan.round()
    for i, (x, y) in enumerate(batches(steps)):
        if i == 0:  # the genes as the optimizer's, the counts as given (set_genome holds them to the next round)
            for gene, values in clan.genes_in_force().items():
                clan.set_genome(gene, torch.tensor(counts) if gene == "num_grad_accum" else values[:1].expand(2).clone())
        clan.population.module.skip_a = i in SKIPPED
        step(member.share(x), member.share(y))
        clan.step(torch.tensor([1.0, 2.0]))
        member = clan.round()
    for m, accumulate in enumerate(counts):
        expected = accumulated_reference(start, steps, accumulate, SKIPPED)
        got = clan.population.member_module(m)
        for name, tensor in expected.named_parameters():
            torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-12, atol=1e-12, msg=f"{m} {name}")
