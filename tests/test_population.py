"""The stacked population: vmapped forwards equal per-member forwards, and stacking is a faithful copy."""

import dataclasses
import functools
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, PopulationModel, member_loss

from plain_loop import train_step

import models

P = 3


def independent(module, population_size=P, seed=0):
    """A population whose members all differ (member 0 keeps ``module``'s weights)."""
    return PopulationModel(module, population_size, init="independent", generator=torch.Generator().manual_seed(seed))


def assert_matches_members(pop, *inputs, atol=1e-10, **kwargs):
    """``pop(*inputs)`` equals each member's plain module run on its own slice of the inputs.

    Args:
        pop: The population.
        *inputs: ``[P, ...]`` tensors.
        atol: Absolute tolerance (float64 models: only summation order differs).
        **kwargs: ``[P, ...]`` keyword tensors.

    Returns:
        The population's output.
    """
    out = pop(*inputs, **kwargs)
    for i in range(pop.population_size):
        module = pop.member_module(i).train(pop.training)
        expected = module(*(x[i] for x in inputs), **{k: v[i] for k, v in kwargs.items()})
        torch.testing.assert_close(out[i], expected, atol=atol, rtol=1e-7)
    return out


mlp = functools.partial(models.mlp, 5, 8, 3)  # float64: the vmapped and plain forwards then agree to 1e-10


def cnn():
    """A float64 CNN with BatchNorm, whose running statistics must stay per member."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def test_mlp_matches_per_member_forwards():
    pop = independent(mlp())
    x = torch.randn(P, 7, 5, dtype=torch.float64)
    out = assert_matches_members(pop, x)
    assert out.shape == (P, 7, 3)
    assert not torch.allclose(out[0], out[1])  # the members really differ


def test_cnn_with_batchnorm_matches_in_train_and_eval_with_per_member_running_stats():
    pop = independent(cnn())
    x = torch.randn(P, 6, 1, 6, 6, dtype=torch.float64) + torch.arange(P, dtype=torch.float64).view(P, 1, 1, 1, 1)
    references = [pop.member_module(i).train() for i in range(P)]
    out = pop(x)  # train mode: batch statistics, running statistics updated per member
    for i, ref in enumerate(references):
        torch.testing.assert_close(out[i], ref(x[i]), atol=1e-10, rtol=1e-7)
        bn = ref[1]
        torch.testing.assert_close(pop.buffers["1.running_mean"][i], bn.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(pop.buffers["1.running_var"][i], bn.running_var, atol=1e-12, rtol=0)
        assert pop.buffers["1.num_batches_tracked"][i] == 1
    assert not torch.allclose(pop.buffers["1.running_mean"][0], pop.buffers["1.running_mean"][1])
    pop.eval()
    assert not pop.training
    with torch.no_grad():
        assert_matches_members(pop, x)  # eval mode: each member's own running statistics


class Scaled(nn.Module):
    """A model with keyword tensor inputs, to check that kwargs are batched too."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2).double()

    def forward(self, x, *, scale, shift=None, power=1):
        out = self.linear(x) * scale
        if shift is not None:
            out = out + shift
        return out**power


class _Outputs(nn.Module):
    """An MLP whose output mixes a tensor, a dict of tensors, a constant and another object."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x, *, scale=None):
        y = self.net(x) * (1.0 if scale is None else scale)
        return y, {"sum": y.sum(-1), "n": 3}, object()


@pytest.mark.parametrize("one_model", [False, True])
def test_without_gradients_on_cpu_the_members_run_one_after_another_to_the_vmapped_result(monkeypatch, one_model):
    pop = independent(_Outputs())
    pop.one_model = one_model
    x, scale = torch.randn(P, 7, 5, dtype=torch.float64), torch.rand(P, 1, dtype=torch.float64)
    batched = pop(x, scale=scale)  # gradients on: the vmapped forward

    def no_vmap(*args, **kwargs):
        raise AssertionError("the forward without gradients on CPU must not vmap")

    monkeypatch.setattr("vmapclan.population.vmap", no_vmap)
    with torch.no_grad():
        looped = pop(x, scale=scale)
    torch.testing.assert_close(looped[0], batched[0].detach(), atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(looped[1]["sum"], batched[1]["sum"].detach(), atol=1e-10, rtol=1e-7)
    assert looped[1]["n"] == 3 and looped[2] is None  # a constant kept, another object dropped, as vmapped
    assert looped[0].shape == (P, 7, 3)
    with pytest.raises(AssertionError, match="must not vmap"):
        pop(x, scale=scale)  # with gradients the forward stays vmapped


def test_keyword_tensors_are_batched():
    pop = independent(Scaled())
    x = torch.randn(P, 5, 4, dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64).view(P, 1, 1)
    shift = torch.randn(P, 1, 2, dtype=torch.float64)
    out = pop(x, scale=scale, shift=shift, power=2)  # power: a plain Python value, passed through
    for i in range(P):
        expected = pop.member_module(i)(x[i], scale=scale[i], shift=shift[i], power=2)
        torch.testing.assert_close(out[i], expected, atol=1e-10, rtol=1e-7)
    assert_matches_members(pop, x, scale=scale)  # shift=None default


class DropoutNet(nn.Module):
    """A linear layer followed by dropout, to see each member's mask."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 32).double()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.linear(x))


def test_dropout_eval_is_exact_and_train_draws_different_masks_per_member():
    pop = PopulationModel(DropoutNet(), P)  # identical members
    x = pop.share(torch.randn(4, 6, dtype=torch.float64))  # identical inputs
    pop.eval()
    assert_matches_members(pop, x, atol=0)
    pop.train()
    out = pop(x)
    clean = pop.member_module(0).linear(x[0])
    for i in range(P):
        kept = out[i] != 0
        torch.testing.assert_close(out[i][kept], 2 * clean[kept])  # kept units scaled by 1 / (1 - p)
        assert 0.2 < kept.double().mean() < 0.8
    for i in range(1, P):
        assert not torch.equal(out[i] != 0, out[0] != 0)  # masks differ across members


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer_matches_per_member_forwards(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0 if train else 0.1, batch_first=True).double()
    pop = independent(layer).train(train)
    x = torch.randn(P, 2, 5, 8, dtype=torch.float64)
    if train:
        assert_matches_members(pop, x)
    else:
        with torch.no_grad():  # the plain module takes its fused fast path here; same numbers
            assert_matches_members(pop, x, atol=1e-9)


def test_transformer_padding_mask_keyword_is_batched():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    pop = independent(layer)
    x = torch.randn(P, 2, 5, 8, dtype=torch.float64)
    mask = torch.zeros(P, 2, 5, dtype=torch.bool)
    mask[1, :, -2:] = True  # only member 1 pads: the mask must not leak across members
    out = assert_matches_members(pop, x, src_key_padding_mask=mask)
    unmasked = pop(x)
    torch.testing.assert_close(out[0], unmasked[0])
    assert not torch.allclose(out[1], unmasked[1])


class TiedModel(nn.Module):
    """An embedding tied to the output layer, with a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4).double()
        self.out = nn.Linear(4, 10, bias=False).double()
        self.out.weight = self.emb.weight
        self.register_buffer("offset", torch.randn(4, dtype=torch.float64), persistent=False)

    def forward(self, tokens):
        return self.out(self.emb(tokens) + self.offset)


def test_tied_weights_stay_tied_in_forward_backward_and_member_module():
    pop = independent(TiedModel())
    assert list(pop.params) == ["emb.weight"] and list(pop.buffers) == ["offset"]
    tokens = torch.randint(0, 10, (P, 6))
    out = assert_matches_members(pop, tokens)
    out.square().sum().backward()
    for i in range(P):
        module = pop.member_module(i)
        assert module.out.weight is module.emb.weight
        module(tokens[i]).square().sum().backward()
        torch.testing.assert_close(pop.params["emb.weight"].grad[i], module.emb.weight.grad, atol=1e-10, rtol=1e-7)


def test_transformer_encoder_layer_gradients_match():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    pop = independent(layer)
    x = torch.randn(P, 2, 5, 8, dtype=torch.float64)
    pop(x).square().sum().backward()
    for i in range(P):
        ref = pop.member_module(i)
        ref(x[i]).square().sum().backward()
        for name, stacked in pop.named_parameters():
            torch.testing.assert_close(stacked.grad[i], ref.get_parameter(name).grad, atol=1e-9, rtol=1e-7)


def test_inputs_without_the_member_dimension_are_errors():
    pop = PopulationModel(mlp(), P)
    with pytest.raises(ValueError, match=r"member.model: expected every tensor input to have the member dimension "
                                         r"first \(\[3, \.\.\.\]\), got shape \[7, 5\]; use member.share\(x\)"):
        pop(torch.randn(7, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"member.model: .* got shape \[\]"):
        pop(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"member.model: .* got shape \[2, 5\]"):
        independent(Scaled())(torch.randn(P, 5, 4, dtype=torch.float64), scale=torch.ones(2, 5))


def test_batchnorm_with_momentum_none_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(ValueError, match=r"PopulationModel: 1 is a BatchNorm with momentum=None \(cumulative average\), "
                                         r"which reads its batch count with .item\(\) and cannot run under vmap"):
        PopulationModel(model, P)
    with pytest.raises(ValueError, match=r"BatchNorm with momentum=None"):
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, round_length=4)
    PopulationModel(nn.BatchNorm1d(4, momentum=None, track_running_stats=False), P)  # no running stats: fine


def test_bad_population_arguments_are_errors():
    with pytest.raises(TypeError, match=r"PopulationModel: expected an nn.Module, got function"):
        PopulationModel(lambda x: x, P)
    with pytest.raises(ValueError, match=r"PopulationModel: init must be 'copy' or 'independent', got 'random'"):
        PopulationModel(mlp(), P, init="random")
    with pytest.raises(ValueError, match=r"PopulationModel: the model has no trainable parameters"):
        PopulationModel(nn.ReLU(), P)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match=r"PopulationModel: all trainable parameters must share one floating dtype; "
                                         r"0.weight is torch.float32 but 1.weight is torch.float64"):
        PopulationModel(mixed, P)


def test_member_loss_returns_one_loss_per_member():
    logits = torch.randn(P, 6, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (P, 6))
    loss = member_loss(F.cross_entropy, logits, target)
    assert loss.shape == (P,)
    for i in range(P):
        torch.testing.assert_close(loss[i], F.cross_entropy(logits[i], target[i]))
    smoothed = member_loss(F.cross_entropy, logits, target, label_smoothing=0.1)
    torch.testing.assert_close(smoothed[1], F.cross_entropy(logits[1], target[1], label_smoothing=0.1))


def test_member_loss_wrong_shapes_are_errors():
    logits = torch.randn(P, 6, 4)
    with pytest.raises(ValueError, match=r"member_loss: fn must reduce each member's batch to a scalar "
                                         r"\(loss of shape \[3\]\), got \[3, 6\]; use a mean or sum reduction"):
        member_loss(F.cross_entropy, logits, torch.randint(0, 4, (P, 6)), reduction="none")
    with pytest.raises(ValueError, match=r"member_loss: target must have the member dimension first \(\[3, \.\.\.\]\), "
                                         r"got shape \[2, 6\]"):
        member_loss(F.cross_entropy, logits, torch.randint(0, 4, (2, 6)))
    with pytest.raises(ValueError, match=r"member_loss: target must have the member dimension first .* got shape \[\]"):
        member_loss(F.mse_loss, logits, torch.tensor(0.0))
    with pytest.raises(TypeError, match=r"member_loss: output must hold a tensor with a member dimension, got float"):
        member_loss(F.mse_loss, 1.0, logits)


def test_member_loss_passes_an_outputs_other_leaves_through():
    """A tuple with a None, a dict with an int, a list: fn gets them as they are, the tensors per member."""
    logits, y = torch.randn(P, 6, 4), torch.randint(0, 4, (P, 6))
    want = member_loss(F.cross_entropy, logits, y)
    seen = []

    def fn(out, target):
        seen.append(out)
        return F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out["logits"], target)

    for output in ((logits, None), [logits], {"logits": logits, "n": 3}):
        assert torch.equal(member_loss(fn, output, y), want)
    assert seen[0][1] is None and seen[2]["n"] == 3

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    with pytest.raises(TypeError, match=r"member_loss: output must hold a tensor with a member dimension, got Out "
                                        r"\(a dataclass: return a tensor, tuple or dict of tensors, or pass key=\)"):
        member_loss(F.cross_entropy, Out(logits), y)


def test_share_is_a_view_without_copy():
    pop = PopulationModel(mlp(), P)
    x = torch.randn(7, 5, dtype=torch.float64)
    shared = pop.share(x)
    assert shared.shape == (P, 7, 5)
    assert shared.stride(0) == 0 and shared.data_ptr() == x.data_ptr()
    x[0, 0] = 42.0  # a view: it sees later writes
    assert bool((shared[:, 0, 0] == 42.0).all())
    tree = pop.share({"a": x, "b": [x[0]], "n": 3})
    assert tree["a"].data_ptr() == x.data_ptr() and tree["b"][0].shape == (P, 5) and tree["n"] == 3
    out = pop(shared)
    torch.testing.assert_close(out[1], out[0])


def test_member_module_is_a_plain_module_with_that_members_weights():
    original = cnn()
    pop = independent(original)
    with torch.no_grad():
        pop.buffers["1.running_mean"].copy_(torch.arange(P, dtype=torch.float64).view(P, 1).expand(P, 4))
    for i in range(P):
        module = pop.member_module(i)
        assert type(module) is nn.Sequential and not isinstance(module, PopulationModel)
        state = module.state_dict()
        for name, stacked in pop.named_parameters():
            assert torch.equal(state[name], stacked[i].detach())
            assert module.get_parameter(name).requires_grad
        for name, stacked in pop.buffers.items():
            assert torch.equal(state[name], stacked[i])
        with torch.no_grad():  # independent of the population
            module[0].weight.zero_()
        assert not bool((pop.params["0.weight"][i] == 0).all())
    assert torch.equal(pop.member_module(-1).state_dict()["1.running_mean"], torch.full((4,), float(P - 1),
                                                                                          dtype=torch.float64))
    with pytest.raises(IndexError, match=r"member index 3 out of range for a population of 3"):
        pop.member_module(P)


def test_training_does_not_modify_the_users_module():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=0.1), population_size=P, round_length=2,
                duty_cycle=0.5, autobind=["adamw"])
    member = clan.round()
    for _ in range(2):
        x, y = torch.randn(P, 4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (P, 4))
        train_step(member, F.cross_entropy, x, y)
    clan.step(torch.arange(P, dtype=torch.float64))
    assert not torch.equal(clan.population.params["0.weight"][0], before["0.weight"])  # training happened
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    best = clan.best_model()
    assert best is not model and torch.equal(best.state_dict()["0.weight"], clan.population.params["0.weight"][0])


def test_independent_init_gives_different_members_reproducibly():
    original = mlp()
    first, again, other = independent(original, seed=1), independent(original, seed=1), independent(original, seed=2)
    assert torch.equal(first.flat, again.flat)
    assert torch.equal(first.flat[0], other.flat[0])  # member 0 keeps the module's own weights
    assert not torch.equal(first.flat[1:], other.flat[1:])
    for i in range(P):
        for j in range(i):
            assert not torch.equal(first.flat[i], first.flat[j])
    torch.testing.assert_close(first.member_module(0).state_dict()["0.weight"], original.state_dict()["0.weight"],
                               rtol=0, atol=0)
    copies = PopulationModel(original, P)
    assert all(torch.equal(copies.flat[i], copies.flat[0]) for i in range(P))
    # Through the clan: the seed decides the members.
    clans = [Clan(original, torch.optim.AdamW(original.parameters()), population_size=P, round_length=4,
                  duty_cycle=1.0, init="independent", seed=s) for s in (5, 5, 6)]
    assert torch.equal(clans[0].population.flat, clans[1].population.flat)
    assert not torch.equal(clans[0].population.flat, clans[2].population.flat)


def test_independent_init_reinitialises_attention_like_a_fresh_layer():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    pop = independent(layer)
    in_proj, out_bias = pop.params["self_attn.in_proj_weight"], pop.params["self_attn.out_proj.bias"]
    for i in range(1, P):  # nn.MultiheadAttention only has a private _reset_parameters
        assert not torch.equal(in_proj[i], in_proj[0]), i
        assert not torch.equal(pop.params["linear1.weight"][i], pop.params["linear1.weight"][0])
        assert torch.equal(out_bias[i], torch.zeros(8))  # the parent's reset has the last word, as in __init__
    bound = (6 / (8 + 3 * 8)) ** 0.5  # xavier_uniform_ of the [3 * 8, 8] in_proj weight
    assert in_proj.abs().max() <= bound


def test_parameters_are_views_of_the_flat_buffer_and_grads_of_grad_flat():
    pop = PopulationModel(mlp(), P)
    x = torch.randn(P, 2, 5, dtype=torch.float64)
    pop(x).sum().backward()
    offset = 0
    for name, leaf in pop.named_parameters():
        n = leaf[0].numel()
        assert leaf.shape == (P, *pop.shapes[name])
        assert torch.equal(leaf.detach().reshape(P, -1), pop.flat[:, offset:offset + n])
        assert torch.equal(leaf.grad.reshape(P, -1), pop.grad_flat[:, offset:offset + n])
        offset += n
    assert offset == pop.numel == pop.flat.shape[1]
    assert pop.grad_flat.abs().sum() > 0
