"""Optimizers as people configure them: several AdamW param groups, Adam, frozen parameters.

A sweep clan (every member its own lr and weight decay) trained through the Member loop must equal
P plain copies, each trained by its own ``torch.optim.AdamW`` with the same groups, where each
group's lr and weight decay are the member's genes scaled as the user's groups scale the first
(decaying) group's, in float64.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan

from plain_loop import train_step

P, B, STEPS = 4, 5, 4
DTYPE = torch.float64
LR = [1e-2, 3e-3, 3e-2, 2e-2]
WD = [1e-2, 0.1, 1e-3, 0.3]
BASE_LR, BASE_WD = 1e-2, 1e-2


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    net[0].weight.requires_grad_(False)  # frozen, yet in the optimizer
    return net


def groups(net: nn.Module, lr: float, wd: float) -> list[dict]:
    """No decay on biases and norms; the last layer's weight at 0.5x the lr and 3x the decay."""
    decay = [net[3].weight]
    no_decay = [p for n, p in net.named_parameters() if n.endswith("bias") or n.startswith("1.")]
    return [{"params": [net[0].weight] + decay[:0]},  # the frozen weight: torch skips it
            {"params": decay, "lr": lr * 0.5, "weight_decay": wd * 3},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(kind, net, lr, wd):
    if kind == "adam":
        return torch.optim.Adam(net.parameters(), lr=lr)  # weight_decay=0: AdamW with no decay
    return torch.optim.AdamW(groups(net, lr, wd), lr=lr, weight_decay=wd)


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(P, B, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (P, B), generator=g))
            for _ in range(STEPS)]


@pytest.mark.parametrize("kind", ["groups", "adam"])
def test_param_groups_and_frozen_parameters_train_like_torch_adamw_per_member(kind):
    batches = data()
    net = model()
    clan = Clan(net, make_optimizer(kind, net, BASE_LR, BASE_WD), population_size=P, round_length=100,
                duty_cycle=1.0, selection=None, autobind=["adamw"], seed=2)
    wd_genes = WD if kind == "groups" else [0.0] * P
    for name, values in (("lr", LR), ("weight_decay", wd_genes), ("betas/0", [0.9] * P), ("betas/1", [0.999] * P),
                         ("eps", [1e-8] * P)):
        clan.set_genome(name, values)
    member = clan.round()
    for x, y in batches:
        train_step(member, F.cross_entropy, x, y)
    for i in range(P):
        plain = model()
        opt = make_optimizer(kind, plain, LR[i], wd_genes[i])
        for x, y in batches:
            F.cross_entropy(plain(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()
        trained = dict(clan.population.member_module(i).named_parameters())
        for name, want in plain.named_parameters():
            torch.testing.assert_close(trained[name], want, atol=1e-12, rtol=0,
                                       msg=lambda m, i=i, name=name: f"member {i}: {name}: {m}")
    assert torch.equal(trained["0.weight"], model()[0].weight)  # frozen: untouched
    assert not torch.allclose(trained["3.weight"], model()[3].weight)
    if kind == "groups":
        # The groups really differ: the bias group without decay, the weight with 0.5x lr.
        scales = clan.optimizer.scales
        assert scales is not None and sorted(set(scales.ratios)) == [(0.5, 3.0), (1.0, 0.0)]


@pytest.mark.parametrize("options", [{}, {"backward": "vmap"}, {"update": "per-member"}, {"update": "batched"}],
                         ids=["default", "vmap", "per-member", "batched"])
def test_fused_step_with_param_groups_equals_the_member_loop(options):
    """FusedStep applies the groups' lr and decay multipliers as the Member loop does, in a
    cooperative phase (one model's row) and a competitive one (every member its own genes)."""
    from vmapclan import FusedStep

    def clan():
        net = model()
        return Clan(net, make_optimizer("groups", net, BASE_LR, BASE_WD), population_size=P, round_length=4,
                    duty_cycle=0.5, autobind=["adamw"], seed=2)

    ref, fused = clan(), clan()
    step = FusedStep(fused, F.cross_entropy, **options)
    member = ref.round()
    phases = []
    for x, y in data():
        phases.append(ref.phase)
        train_step(member, F.cross_entropy, x, y)
        step(x, y)
        got, want = fused.member_state(), ref.member_state()
        for part in ("params", "optimizer"):
            for a, b in zip(optree.tree_leaves(got[part]), optree.tree_leaves(want[part])):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert phases == ["cooperative", "cooperative", "competitive", "competitive"]
    assert not torch.equal(ref.population.flat[1], ref.population.flat[2])  # the members competed apart
