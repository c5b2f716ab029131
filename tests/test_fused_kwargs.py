"""FusedStep with keyword tensors for the model equals the Member loop that passes them as keywords.

A model whose forward takes ``(x, *, mask)`` and a tiny GPT-2 called with ``input_ids=`` and
``attention_mask=``, through a cooperative and a competitive phase, in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, FusedStep

from plain_loop import train_step

from test_fused import compare_runs

P, B = 4, 8


class Masked(nn.Module):
    """An MLP whose logits are multiplied by a keyword-only per-sample mask."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, *, mask):
        return self.net(x) * mask


def masked_clan(model_fn, round_length=6, lr=1e-2, duty_cycle=0.5):
    torch.manual_seed(1)
    model = model_fn().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return Clan(model, optimizer, population_size=P, round_length=round_length, duty_cycle=duty_cycle,
                autobind=["adamw"], selection="winner", seed=3)


def masked_batches(steps):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(P, B, 6, generator=g, dtype=torch.float64),
             torch.rand(P, B, 1, generator=g, dtype=torch.float64).round(),  # half the samples masked to 0
             torch.randint(0, 3, (P, B), generator=g)) for _ in range(steps)]


def loop_step(member, loss_fn, y, key=None, **kwargs):
    """The Member loop's step with the model's inputs given as keywords, or ``x`` positionally and the rest keywords."""
    x = kwargs.pop("x", None)
    return train_step(member, loss_fn, *([] if x is None else [x]), y, key=key, **kwargs).detach()


def run_both(make, data, fused_step, loop, rounds=2, tol=1e-10):
    """Train two clans made by ``make``, the second by ``fused_step(batch)`` and the first by ``loop(member, batch)``.

    Losses and every tensor of the state are compared after each step, across both phases.
    """
    ref, fused = make(), make()
    phases = compare_runs(ref, fused, ((batch, batch) for batch in data), loop, fused_step, rounds,
                          loss_tol=tol, tol=tol, val_tol=None)
    assert phases == {"cooperative", "competitive"}
    return fused


@pytest.mark.parametrize("options", [{"backward": "autograd"}, {"backward": "vmap"}, {"layout": "flat"},
                                     {"compile": "step"}],
                         ids=["views-autograd", "views-vmap", "flat-vmap", "compile-step"])
def test_a_keyword_mask_equals_the_member_loop(options):
    rounds = 1 if options.get("compile") else 2  # compiling is slow: one round still crosses the phase boundary
    clans = []

    def make():
        clans.append(masked_clan(Masked))
        return clans[-1]

    def fused_step(batch):
        if len(clans) == 2:  # the second clan made is the fused one
            clans.append(FusedStep(clans[1], F.cross_entropy, **options))
        x, m, y = batch
        return clans[2](x, y, mask=m)

    run_both(make, masked_batches(6 * rounds), fused_step,
             lambda member, b: loop_step(member, F.cross_entropy, b[2], x=b[0], mask=b[1]), rounds=rounds)
    assert clans[2].backward == options.get("backward", "vmap")


def test_a_keyword_tensor_without_the_member_dimension_is_refused():
    clan = masked_clan(Masked)
    step = FusedStep(clan, F.cross_entropy)
    x, m, y = masked_batches(1)[0]
    with pytest.raises(ValueError, match=r"FusedStep: expected every batch tensor to have the member dimension first "
                                         r"\(\[4, \.\.\.\]\), got \[8, 1\]; use member.share\(t\)"):
        step(x, y, mask=m[0])
    with pytest.raises(ValueError, match=r"member dimension first \(\[4, \.\.\.\]\), got float"):
        step(x, y, mask=1.0)
    with pytest.raises(ValueError, match=r"FusedStep: num_inputs=0 passes the model keyword tensors only, and none "
                                         r"were given"):
        FusedStep(clan, F.cross_entropy, num_inputs=0)(y)
    assert clan.step_in_round == 0  # nothing happened


@pytest.mark.parametrize("backward", ["autograd", "vmap"])
@pytest.mark.parametrize("duty_cycle", [0.5, 1.0], ids=["cooperative", "competitive"])
def test_the_keyword_mask_reaches_the_model(backward, duty_cycle):
    """A mask of zeros makes every logit zero, so every member's loss is log(3)."""
    clan = masked_clan(Masked, duty_cycle=duty_cycle)
    step = FusedStep(clan, F.cross_entropy, backward=backward)
    x, _, y = masked_batches(1)[0]
    zeros = torch.zeros(P, B, 1, dtype=torch.float64)
    log3 = torch.full((P,), 3.0, dtype=torch.float64).log()
    assert clan.phase == ("cooperative" if duty_cycle < 1 else "competitive")
    torch.testing.assert_close(step(x, y, mask=zeros), log3, atol=1e-12, rtol=0)


B_LM, T, V = 3, 6, 24


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lm_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def lm_batches(steps):
    """``(input_ids, attention_mask, target)``, each ``[P, B, T]``, every member's batch with padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, V, (P, B_LM, T), generator=g)
        lengths = torch.randint(2, T + 1, (P, B_LM), generator=g)
        lengths[:, 0] = T - 2
        mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
        out.append((ids.masked_fill(mask == 0, 0), mask, torch.randint(0, V, (P, B_LM, T), generator=g)))
    return out


@pytest.mark.parametrize("backward", ["autograd", "vmap"])
def test_gpt2_with_input_ids_and_attention_mask_keywords_equals_the_member_loop(backward):
    pytest.importorskip("transformers")
    clans = []

    def make():
        clans.append(masked_clan(gpt2, round_length=3))
        return clans[-1]

    def fused_step(batch):
        if len(clans) == 2:
            clans.append(FusedStep(clans[1], lambda out, y: lm_loss(out.logits, y), num_inputs=0, backward=backward))
        ids, mask, y = batch
        return clans[2](y, input_ids=ids, attention_mask=mask)

    run_both(make, lm_batches(6), fused_step,
             lambda member, b: loop_step(member, lm_loss, b[2], key="logits", input_ids=b[0], attention_mask=b[1]))
