"""Hugging Face models as users write them, and the outputs they return.

GPT-2 and BERT are built from tiny configs with the library's defaults (SDPA attention, GPT-2's
``use_cache=True``), called with keyword inputs and an attention mask with padding, and trained
through the Member loop; every member must equal a plain copy trained alone by its own
``torch.optim.AdamW`` in float64 (the plain copies keep SDPA attention and the 2D mask).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, PopulationModel, additive_attention_mask, member_loss

from plain_loop import train_step

transformers = pytest.importorskip("transformers")

P, B, T, V, STEPS = 4, 3, 6, 24, 3
DTYPE = torch.float64
ATOL = 1e-10
LR = [1e-2, 3e-3, 3e-2, 2e-2]
WD = [1e-2, 0.1, 1e-3, 3e-2]


def lm_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DTYPE)


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, type_vocab_size=1,
                                     pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).to(DTYPE)


def batches(seed: int):
    """``STEPS`` batches of ``(input_ids, attention_mask, target)``, each ``[P, B, T]``, with padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, V, (P, B, T), generator=g)
        lengths = torch.randint(2, T + 1, (P, B), generator=g)
        lengths[:, 0] = T - 2  # every member's batch holds padding
        mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
        out.append((ids.masked_fill(mask == 0, 0), mask, torch.randint(0, V, (P, B, T), generator=g)))
    return out


def sweep(model: nn.Module) -> Clan:
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=LR[0], weight_decay=WD[0]), population_size=P,
                round_length=100, duty_cycle=1.0, selection=None, autobind=["adamw"], seed=3)
    # Every gene set: construction mutated the challengers' genes.
    for name, values in (("lr", LR), ("weight_decay", WD), ("betas/0", [0.9] * P), ("betas/1", [0.999] * P),
                         ("eps", [1e-8] * P)):
        clan.set_genome(name, values)
    return clan


def reference(build, data) -> list[dict]:
    """Every member's final parameters, from a plain copy trained alone with keyword inputs and the 2D mask."""
    finals = []
    for i in range(P):
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=LR[i], weight_decay=WD[i])
        for ids, mask, y in data:
            loss = lm_loss(model(input_ids=ids[i], attention_mask=mask[i]).logits, y[i])
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals.append({n: t.detach().clone() for n, t in model.named_parameters()})
    return finals


def train(clan: Clan, data, mask_of) -> None:
    member = clan.round()
    for ids, mask, y in data:
        loss = train_step(member, lm_loss, y, key="logits", input_ids=ids, attention_mask=mask_of(mask))
        assert loss.shape == (P,)


def assert_members_equal(clan: Clan, finals: list[dict]) -> None:
    for i in range(P):
        trained = dict(clan.population.member_module(i).named_parameters())
        for name, want in finals[i].items():
            torch.testing.assert_close(trained[name], want, atol=ATOL, rtol=0,
                                       msg=lambda m, i=i, name=name: f"member {i}: {name}: {m}")
    name = next(iter(finals[0]))
    assert not torch.allclose(finals[0][name], finals[1][name]), "the members' settings made no difference"


def test_gpt2_with_defaults_kwargs_and_a_padding_mask_trains_like_plain_copies():
    model = gpt2()
    assert model.config.use_cache and model.config._attn_implementation == "sdpa"
    data = batches(1)
    clan = sweep(model)
    train(clan, data, lambda mask: mask)
    assert_members_equal(clan, reference(gpt2, data))
    # The members run eager attention (see PopulationModel); the user's model is left as it was.
    assert clan.population.module.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def test_bert_with_an_additive_mask_trains_like_plain_copies_with_the_2d_mask():
    data = batches(2)
    clan = sweep(bert())
    train(clan, data, lambda mask: additive_attention_mask(mask, DTYPE))
    assert_members_equal(clan, reference(bert, data))


def test_bert_with_a_2d_mask_is_refused_with_the_module_and_the_fix():
    population = PopulationModel(bert(), P)
    ids, mask, _ = batches(3)[0]
    with pytest.raises(RuntimeError, match=r"member.model: bert \(BertModel\) branches on a tensor's values in "
                                           r"_ignore_bidirectional_mask_sdpa\(\).*additive_attention_mask"):
        population(input_ids=ids, attention_mask=mask)
    out = population(input_ids=ids, attention_mask=additive_attention_mask(mask, DTYPE))
    assert out.logits.shape == (P, B, T, V)


def test_keyword_inputs_are_batched_per_member():
    population = PopulationModel(gpt2(), P, init="independent", generator=torch.Generator().manual_seed(0))
    ids, mask, _ = batches(4)[0]
    out = population(input_ids=ids, attention_mask=mask)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions" and list(out.keys()) == ["logits"]
    for i in range(P):
        plain = population.member_module(i)(input_ids=ids[i], attention_mask=mask[i]).logits
        torch.testing.assert_close(out.logits[i], plain, atol=1e-12, rtol=0)
    # Each member saw its own inputs: member 1's weights on member 0's batch give another result.
    other = population.member_module(1)(input_ids=ids[0], attention_mask=mask[0]).logits
    assert not torch.allclose(out.logits[1], other)


class Extras(nn.Module):
    """An output holding a tensor, a None, an int and an arbitrary object next to its tensors."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, *, scale):
        return {"y": self.lin(x) * scale, "none": None, "count": 3, "state": object(), "pair": (x.sum(), "tag")}


def test_non_tensor_parts_of_an_output_are_dropped_or_kept_as_constants():
    population = PopulationModel(Extras(), P)
    x, scale = torch.randn(P, 5, 3), torch.arange(1.0, P + 1).view(P, 1, 1)
    out = population(x, scale=scale)
    assert set(out) == {"y", "none", "count", "state", "pair"}
    assert out["none"] is None and out["count"] == 3 and out["state"] is None and out["pair"][1] == "tag"
    assert out["y"].shape == (P, 5, 2) and out["pair"][0].shape == (P,)
    plain = population.member_module(2)
    torch.testing.assert_close(out["y"][2], plain.lin(x[2]) * 3)  # the keyword tensor is batched too
    loss = member_loss(F.mse_loss, out["y"], torch.zeros(P, 5, 2))
    assert loss.shape == (P,)


def test_member_loss_takes_a_model_output_whole_by_key_or_by_function():
    population = PopulationModel(gpt2(), P)
    ids, mask, y = batches(5)[0]
    out = population(input_ids=ids, attention_mask=mask)
    by_key = member_loss(lm_loss, out, y, key="logits")
    by_function = member_loss(lm_loss, out, y, key=lambda o: o.logits)
    assert by_key.shape == (P,) and torch.equal(by_key, by_function)
    assert torch.equal(by_key, member_loss(lm_loss, dict(out)["logits"], y))
    # Whole, as FusedStep takes it: fn gets each member's ModelOutput.
    whole = member_loss(lambda o, t: lm_loss(o.logits, t), out, y)
    assert torch.equal(whole, by_key)
    with pytest.raises(KeyError, match=r"member_loss: key='loss' is not in the output "
                                       r"\(CausalLMOutputWithCrossAttentions with keys \['logits'\]\)"):
        member_loss(lm_loss, out, y, key="loss")


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 3))
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inner(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on data
            return x
        return -x


def test_a_branch_on_data_is_refused_naming_the_submodule():
    with pytest.raises(RuntimeError, match=r"member.model: gate \(Gate\) branches on a tensor's values in forward\(\) "
                                           r"at test_hf.py:\d+, which vmap cannot batch.*torch.where"):
        PopulationModel(Branches(), P)(torch.randn(P, 2, 3))


# -- keyword inputs through the training machine and the command ---------------------------------
class KeywordCharLM(__import__("vmapclan").Task):
    """A tiny GPT-2 character LM whose samples are ``({"input_ids", "attention_mask"}, target)``.

    Windows of the repeating text ``"abcd..."`` with random lengths: padding is masked out and
    its targets are ``-100``, so the loss weighs each window by its real characters.
    """

    def split(self, data, seed):
        g = torch.Generator().manual_seed(seed)

        def part(n):
            start = torch.randint(0, V, (n, 1), generator=g)
            ids = (start + torch.arange(T + 1)) % (V - 1) + 1
            lengths = torch.randint(3, T + 1, (n,), generator=g)
            mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
            target = ids[:, 1:].masked_fill(mask == 0, -100)
            return {"input_ids": ids[:, :-1].masked_fill(mask == 0, 0), "attention_mask": mask}, target

        return part(96), part(32), part(32)

    def build_model(self, model, data):
        config = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                         bos_token_id=1, eos_token_id=1, use_cache=False)
        return transformers.GPT2LMHeadModel(config)

    def loss(self, output, target):
        return F.cross_entropy(output.logits.flatten(0, -2), target.flatten(), ignore_index=-100)


KEYWORD_RUN = {"total_steps": 40, "seed": 1, "optimizer": {"lr": 3e-3}, "data": {"batch_size": 4},
               "clan": {"population_size": 2, "round_length": 10}}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "member-loop"])
def test_keyword_inputs_train_through_the_machine(fused):
    from vmapclan import TrainingMachine

    results = TrainingMachine(KEYWORD_RUN, task=KeywordCharLM(), fused=fused).train()
    first = [m for m in results.metrics if m["event"] == "train"][0]["loss"]
    assert results.final["test_loss"] < first  # it learned the pattern
    assert math.log(V) > results.final["val_loss"]


def test_keyword_inputs_train_through_the_command_and_replay(tmp_path, capsys, monkeypatch):
    import sys

    from vmapclan.cli import EXIT_OK, main

    monkeypatch.setattr(sys.modules[__name__], "KeywordCharLM", KeywordCharLM, raising=False)
    config = tmp_path / "c.toml"
    config.write_text('task = "test_hf:KeywordCharLM"\ntotal_steps = 30\nseed = 1\n[data]\nbatch_size = 4\n'
                      '[clan]\npopulation_size = 2\nround_length = 10\n')
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--no-progress", "--no-plots"]) == EXIT_OK
    assert main(["replay", str(tmp_path / "r" / "schedule.json"), "--no-progress"]) == EXIT_OK
    assert "test loss" in capsys.readouterr().out
