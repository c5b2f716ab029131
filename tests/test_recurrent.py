"""vmapclan.recurrent's layers against torch's, alone, under vmap, swapped into models and in a clan.

Everything runs in float64, where torch's kernels and these layers differ only by rounding (a few
1e-15 here); :data:`ATOL` leaves room for that and nothing else. vmap fallbacks are errors
(``conftest.py``), so a layer that ran one member at a time would fail every vmap test here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import vmapclan
from vmapclan import Clan, unsupported_recurrent, vectorizable
from vmapclan import recurrent as vnn

from plain_loop import train_step

DTYPE = torch.float64
ATOL = 1e-12
T, B, I, H = 5, 3, 4, 6

LAYERS = [(nn.LSTM, vnn.LSTM), (nn.GRU, vnn.GRU), (nn.RNN, vnn.RNN)]
SETTINGS = [
    {},
    {"num_layers": 2},
    {"bidirectional": True},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"bias": False, "batch_first": True},
]
LSTM_ONLY = [{"proj_size": 3}, {"num_layers": 2, "bidirectional": True, "proj_size": 2}]
RNN_ONLY = [{"nonlinearity": "relu", "num_layers": 2}]


def layer_cases():
    cases = []
    for torch_cls, our_cls in LAYERS:
        extra = LSTM_ONLY if torch_cls is nn.LSTM else RNN_ONLY if torch_cls is nn.RNN else []
        for kw in SETTINGS + extra:
            cases.append(pytest.param(torch_cls, our_cls, kw, id=f"{torch_cls.__name__}-{kw}"))
    return cases


def pair(torch_cls, our_cls, *args, **kw):
    """torch's layer and ours from the same seed, in float64."""
    torch.manual_seed(3)
    theirs = torch_cls(*args, **kw).to(DTYPE)
    torch.manual_seed(3)
    ours = our_cls(*args, **kw).to(DTYPE)
    return theirs, ours


def state_shapes(layer) -> list[tuple]:
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    shapes = [(rows, B, getattr(layer, "proj_size", 0) or layer.hidden_size)]
    if isinstance(layer, (nn.LSTM, vnn.LSTM)):
        shapes.append((rows, B, layer.hidden_size))
    return shapes


def as_list(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def run(layer, x, hx):
    """The output, the final states, and the gradients of a loss of all of them with respect to every
    parameter, the input and the initial states."""
    out, state = layer(x, hx)
    finals = as_list(state)
    loss = (out * torch.linspace(-1, 2, out.numel(), dtype=DTYPE).view_as(out)).sum() + sum(
        (s.sin() * (k + 2)).sum() for k, s in enumerate(finals))
    wrt = list(layer.parameters()) + [x] + ([] if hx is None else as_list(hx))
    return [out, *finals, *torch.autograd.grad(loss, wrt)]


def assert_all_close(got: list, want: list, what: str) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}, tensor {k}: shape {list(g.shape)} != {list(w.shape)}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m: f"{what}, tensor {k}: {m}")


# -- the layers against torch's ------------------------------------------------------------------
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("torch_cls, our_cls, kw", layer_cases())
def test_layer_equals_torch(torch_cls, our_cls, kw, with_state):
    theirs, ours = pair(torch_cls, our_cls, I, H, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), f"{name}: a different initialisation from the same seed"
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if theirs.batch_first else (T, B, I)
    x = torch.randn(*shape, generator=g, dtype=DTYPE)
    hx = None
    if with_state:
        states = [torch.randn(*s, generator=g, dtype=DTYPE) for s in state_shapes(theirs)]
        hx = tuple(states) if len(states) == 2 else states[0]
    want = run(theirs, x.clone().requires_grad_(),
               None if hx is None else type(hx)(s.clone().requires_grad_() for s in as_list(hx))
               if isinstance(hx, tuple) else hx.clone().requires_grad_())
    got = run(ours, x.clone().requires_grad_(),
              None if hx is None else type(hx)(s.clone().requires_grad_() for s in as_list(hx))
              if isinstance(hx, tuple) else hx.clone().requires_grad_())
    assert_all_close(got, want, f"{our_cls.__name__}({kw})")
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("torch_cls, our_cls", LAYERS, ids=[c.__name__ for c, _ in LAYERS])
def test_unbatched_input_and_eval_mode_with_dropout(torch_cls, our_cls):
    theirs, ours = pair(torch_cls, our_cls, I, H, num_layers=2, dropout=0.5)
    theirs.eval(), ours.eval()  # dropout is off in eval mode, in both
    x = torch.randn(T, I, dtype=DTYPE, requires_grad=True)
    assert_all_close(run(ours, x, None), run(theirs, x, None), "unbatched")


def test_dropout_between_layers_in_training_only():
    _, ours = pair(nn.LSTM, vnn.LSTM, I, H, num_layers=2, dropout=0.5)
    plain = copy.deepcopy(ours)
    plain.dropout = 0.0
    x = torch.randn(T, B, I, dtype=DTYPE)
    out, (h, c) = ours(x)
    reference, (h_ref, c_ref) = plain(x)
    assert not torch.allclose(out, reference)  # the second layer saw a dropped-out input
    torch.testing.assert_close(h[0], h_ref[0], atol=ATOL, rtol=0)  # not after the first layer's states
    ours.eval()
    torch.testing.assert_close(ours(x)[0], reference, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1, but got "
                                         "dropout=0.5 and num_layers=1"):
        vnn.GRU(I, H, dropout=0.5)


CELLS = [
    pytest.param(nn.LSTMCell, vnn.LSTMCell, {}, id="LSTMCell"),
    pytest.param(nn.GRUCell, vnn.GRUCell, {}, id="GRUCell"),
    pytest.param(nn.RNNCell, vnn.RNNCell, {}, id="RNNCell"),
    pytest.param(nn.RNNCell, vnn.RNNCell, {"nonlinearity": "relu", "bias": False}, id="RNNCell-relu-nobias"),
    pytest.param(nn.LSTMCell, vnn.LSTMCell, {"bias": False}, id="LSTMCell-nobias"),
]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("torch_cls, our_cls, kw", CELLS)
def test_cell_equals_torch(torch_cls, our_cls, kw, with_state, batched):
    theirs, ours = pair(torch_cls, our_cls, I, H, **kw)
    assert dict(ours.state_dict()).keys() == dict(theirs.state_dict()).keys()
    lead = (B,) if batched else ()
    x = torch.randn(*lead, I, dtype=DTYPE, requires_grad=True)
    hx = None
    if with_state:
        states = [torch.randn(*lead, H, dtype=DTYPE, requires_grad=True)
                  for _ in range(2 if torch_cls is nn.LSTMCell else 1)]
        hx = tuple(states) if len(states) == 2 else states[0]

    def outputs(cell):
        finals = as_list(cell(x, hx))
        loss = sum((s.sin() * (k + 2)).sum() for k, s in enumerate(finals))
        return finals + list(torch.autograd.grad(loss, list(cell.parameters()) + [x] + (as_list(hx) if hx is not None else [])))

    assert_all_close(outputs(ours), outputs(theirs), our_cls.__name__)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("torch_cls, our_cls, kw", [
    (nn.LSTM, vnn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 2}),
    (nn.GRU, vnn.GRU, {"bias": False}),
    (nn.RNN, vnn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTMCell, vnn.LSTMCell, {}),
    (nn.GRUCell, vnn.GRUCell, {"bias": False}),
])
def test_state_dicts_are_the_same_and_load_both_ways(torch_cls, our_cls, kw):
    torch.manual_seed(0)
    theirs = torch_cls(I, H, **kw)
    torch.manual_seed(1)
    ours = our_cls(I, H, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    torch.manual_seed(2)
    back = torch_cls(I, H, **kw)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


# -- under vmap ---------------------------------------------------------------------------------
P = 3


def stacked(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {n: torch.stack([m.get_parameter(n).detach() for m in modules]) for n, _ in modules[0].named_parameters()}


VMAP_CASES = [
    pytest.param(nn.LSTM, vnn.LSTM, {"num_layers": 2, "bidirectional": True}, True, id="LSTM-2-layers-bidirectional"),
    pytest.param(nn.LSTM, vnn.LSTM, {"proj_size": 3, "batch_first": True}, False, id="LSTM-proj"),
    pytest.param(nn.GRU, vnn.GRU, {"num_layers": 2, "batch_first": True}, True, id="GRU-2-layers"),
    pytest.param(nn.GRU, vnn.GRU, {"bidirectional": True, "bias": False}, False, id="GRU-bidirectional"),
    pytest.param(nn.RNN, vnn.RNN, {"bidirectional": True}, True, id="RNN-bidirectional"),
]


@pytest.mark.parametrize("torch_cls, our_cls, kw, with_state", VMAP_CASES)
def test_vmap_over_members_equals_a_loop_of_torch_layers(torch_cls, our_cls, kw, with_state):
    torch.manual_seed(0)
    members = [torch_cls(I, H, **kw).to(DTYPE) for _ in range(P)]
    ours = vectorizable(copy.deepcopy(members[0]))
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(P, *((B, T) if kw.get("batch_first") else (T, B)), I, generator=g, dtype=DTYPE)
    states = [torch.randn(P, *s, generator=g, dtype=DTYPE) for s in state_shapes(members[0])] if with_state else None

    def loss_of(out, finals):
        return out.square().sum() + sum((s * (k + 1.5)).sum() for k, s in enumerate(finals))

    def one(params, x, *hx):
        hx = (tuple(hx) if len(hx) == 2 else hx[0]) if hx else None
        out, state = functional_call(ours, params, (x, hx))
        return loss_of(out, as_list(state)), out

    params = {n: t.requires_grad_() for n, t in stacked(members).items()}
    inputs = [xs] + (states or [])
    # Forward under vmap, backward outside it (the Member loop's way)...
    losses, outs = vmap(one)(params, *inputs)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    # ...and gradients taken under vmap with torch.func.grad (FusedStep's backward="vmap").
    func_grads = vmap(grad(lambda p, *a: one(p, *a)[0]))(params, *inputs)
    for i, member in enumerate(members):
        hx = None if states is None else (tuple(s[i] for s in states) if len(states) == 2 else states[0][i])
        out, state = member(xs[i], hx)
        want = [out, *torch.autograd.grad(loss_of(out, as_list(state)), list(member.parameters()))]
        assert_all_close([outs[i], *(gr[i] for gr in grads)], want, f"member {i}")
        assert_all_close([func_grads[n][i] for n in params], want[1:], f"member {i}, torch.func.grad")


@pytest.mark.parametrize("torch_cls, our_cls", [(nn.LSTMCell, vnn.LSTMCell), (nn.GRUCell, vnn.GRUCell),
                                                (nn.RNNCell, vnn.RNNCell)], ids=["LSTMCell", "GRUCell", "RNNCell"])
def test_vmap_over_members_of_a_cell_equals_a_loop(torch_cls, our_cls):
    torch.manual_seed(0)
    members = [torch_cls(I, H).to(DTYPE) for _ in range(P)]
    ours = vectorizable(copy.deepcopy(members[0]))
    xs = torch.randn(P, T, B, I, dtype=DTYPE)

    def unroll(cell, params, x):  # the cell over a sequence, its state carried
        state = None
        for t in range(x.shape[0]):
            state = functional_call(cell, params, (x[t], state))
        return sum(s.sum() for s in as_list(state))

    params = stacked(members)
    got = vmap(grad(lambda p, x: unroll(ours, p, x)))(params, xs)
    for i, member in enumerate(members):
        want = torch.autograd.grad(unroll(member, dict(member.named_parameters()), xs[i]), list(member.parameters()))
        assert_all_close([got[n][i] for n in params], list(want), f"member {i}")


def test_vmap_over_data_with_shared_weights():
    """Weights without a member dimension (in_dims None): the time loop expands them and their
    gradient is the sum over the batch of inputs."""
    torch.manual_seed(0)
    theirs, ours = pair(nn.LSTM, vnn.LSTM, I, H)
    xs = torch.randn(P, T, B, I, dtype=DTYPE)
    out = vmap(lambda x: ours(x)[0])(xs)
    out.sum().backward()
    want = torch.stack([theirs(x)[0] for x in xs])
    want.sum().backward()
    assert_all_close([out] + [p.grad for p in ours.parameters()], [want] + [p.grad for p in theirs.parameters()],
                     "shared weights")


# -- models: swap and find ---------------------------------------------------------------------
class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, I)
        self.encoder = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.decoder = nn.ModuleList([nn.GRUCell(2 * H, H)])
        self.head = nn.Linear(H, 3)

    def forward(self, idx):
        h, _ = self.encoder(self.embed(idx))
        state = None
        for t in range(h.shape[1]):
            state = self.decoder[0](h[:, t], state)
        return self.head(state)


def test_vectorizable_keeps_the_parameters_and_the_outputs():
    torch.manual_seed(0)
    model = Tagger().to(DTYPE)
    model.eval()
    idx = torch.randint(0, 10, (B, T))
    want = model(idx)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    rng = torch.random.get_rng_state()
    assert vectorizable(model) is model
    assert torch.equal(torch.random.get_rng_state(), rng)  # no weights were drawn
    assert type(model.encoder) is vnn.LSTM and type(model.decoder[0]) is vnn.GRUCell
    assert not model.encoder.training  # the mode is carried over
    assert model.encoder.batch_first and model.encoder.bidirectional and model.encoder.num_layers == 2
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    Clan(model, optimizer, population_size=2, round_length=4, duty_cycle=0.5)  # the optimizer still fits
    torch.testing.assert_close(model(idx), want, atol=ATOL, rtol=0)
    assert unsupported_recurrent(model) is None


def test_vectorizable_of_a_layer_and_of_a_shared_layer():
    lstm = nn.LSTM(I, H)
    new = vectorizable(lstm)
    assert type(new) is vnn.LSTM and new.weight_ih_l0 is lstm.weight_ih_l0
    shared = nn.GRU(I, H)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    vectorizable(model)
    assert model["a"] is model["b"][0] and type(model["a"]) is vnn.GRU


def test_vectorizable_refuses_what_it_cannot_carry():
    class MyLSTM(nn.LSTM):
        pass

    with pytest.raises(TypeError, match=r"vectorizable: model\.0 is a MyLSTM, a subclass of torch\.nn\.LSTM; "
                                        r"expected torch\.nn\.LSTM itself"):
        vectorizable(nn.Sequential(MyLSTM(I, H)))
    hooked = nn.GRU(I, H)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"vectorizable: model\.rnn has forward hooks, which the replacement would "
                                         r"not carry; expected none"):
        vectorizable(nn.ModuleDict({"rnn": hooked}))
    parametrized = nn.LSTMCell(I, H)
    torch.nn.utils.parametrizations.weight_norm(parametrized, "weight_hh")
    with pytest.raises(ValueError, match=r"vectorizable: model has parametrized weights, which the replacement "
                                         r"would not carry; expected a plain torch\.nn\.LSTMCell"):
        vectorizable(parametrized)
    with pytest.raises(TypeError, match="vectorizable: expected an nn.Module, got str"):
        vectorizable("model")


def test_unsupported_recurrent_names_the_module_and_the_alternative():
    model = Tagger()
    assert unsupported_recurrent(model) == (
        "model.encoder is a torch.nn.LSTM, which has no vmap batching rule; use vmapclan.recurrent.LSTM (same weights "
        "and state dict) or vmapclan.recurrent.vectorizable(model) (1 more: model.decoder.0)")
    assert unsupported_recurrent(nn.Sequential(nn.GRUCell(I, H)), root="net") == (
        "net.0 is a torch.nn.GRUCell, which vmap runs one member at a time (no batching rule); use "
        "vmapclan.recurrent.GRUCell (same weights and state dict) or vmapclan.recurrent.vectorizable(net)")

    class MyRNN(nn.RNN):
        pass

    assert unsupported_recurrent(MyRNN(I, H)).startswith("model is a MyRNN (a torch.nn.RNN), which has no vmap")
    many = nn.Sequential(*[nn.LSTM(I, I) for _ in range(6)])
    assert unsupported_recurrent(many).endswith("(5 more: model.1, model.2, model.3, ...)")
    assert unsupported_recurrent(nn.Sequential(vnn.LSTM(I, H), nn.Linear(H, 2))) is None
    assert "\n" not in unsupported_recurrent(Tagger())


def test_torch_layers_really_fail_under_vmap():
    """What the module exists for: if torch gains batching rules, this test says so."""
    lstm = nn.LSTM(I, H)
    params = {n: p.detach().expand(P, *p.shape) for n, p in lstm.named_parameters()}
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::lstm"):
        vmap(lambda p, x: functional_call(lstm, p, (x,))[0])(params, torch.randn(P, T, B, I))


# -- refusals and torch's checks ------------------------------------------------------------------
def test_packed_sequence_is_refused_with_the_alternative():
    lstm = vnn.LSTM(I, H, batch_first=True)
    packed = pack_padded_sequence(torch.randn(B, T, I), torch.tensor([5, 3, 2]), batch_first=True)
    with pytest.raises(TypeError, match=r"vmapclan\.recurrent\.LSTM: expected a padded tensor, got a PackedSequence, "
                                        r"which vmap cannot batch .*pad the sequences \(torch\.nn\.utils\.rnn\."
                                        r"pad_sequence\), run the layer on the padded batch and mask"):
        lstm(packed)
    with pytest.raises(TypeError, match=r"vmapclan\.recurrent\.GRU: expected a padded tensor, got a PackedSequence"):
        vnn.GRU(I, H, batch_first=True)(packed)


@pytest.mark.parametrize("make, error, match", [
    (lambda cls: cls(I, H, dropout=1.5), ValueError, r"dropout should be a number in range \[0, 1\] representing "
                                                     r"the probability of an element being zeroed, got 1\.5"),
    (lambda cls: cls(I, H, bias=1), TypeError, "bias should be of type bool, got: int"),
    (lambda cls: cls(I, H, batch_first=None), TypeError, "batch_first should be of type bool, got: NoneType"),
    (lambda cls: cls(4.0, H), TypeError, "input_size should be of type int, got: float"),
    (lambda cls: cls(I, "6"), TypeError, "hidden_size should be of type int, got: str"),
    (lambda cls: cls(0, H), ValueError, "input_size must be greater than zero, got 0"),
    (lambda cls: cls(I, 0), ValueError, "hidden_size must be greater than zero, got 0"),
    (lambda cls: cls(I, H, num_layers=0), ValueError, "num_layers must be greater than zero, got 0"),
])
@pytest.mark.parametrize("torch_cls, our_cls", LAYERS, ids=[c.__name__ for c, _ in LAYERS])
def test_constructor_refusals_match_torch(torch_cls, our_cls, make, error, match):
    with pytest.raises(error):
        make(torch_cls)
    with pytest.raises(error, match=match):
        make(our_cls)


@pytest.mark.parametrize("kw, error, match", [
    ({"proj_size": -1}, ValueError, "proj_size should be a positive integer or zero to disable projections, got -1"),
    ({"proj_size": H}, ValueError, "proj_size has to be smaller than hidden_size, got proj_size=6 and hidden_size=6"),
])
def test_lstm_projection_refusals_match_torch(kw, error, match):
    with pytest.raises(error):
        nn.LSTM(I, H, **kw)
    with pytest.raises(error, match=match):
        vnn.LSTM(I, H, **kw)


def test_unknown_nonlinearity_is_refused_as_torch_does():
    for cls in (vnn.RNN, vnn.RNNCell, nn.RNN):  # torch's RNNCell refuses only in forward
        with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'. Select from 'tanh' or 'relu'."):
            cls(I, H, nonlinearity="gelu")


def lstm_state(rows=1, batch=B, hidden=H, dims=3):
    shape = (rows, batch, hidden)[3 - dims:]
    return torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize("cls_pair, x, hx, error, match", [
    ((nn.LSTM, vnn.LSTM), torch.zeros(2, T, B, I), None, ValueError, "LSTM: Expected input to be 2D or 3D, got 4D instead"),
    ((nn.RNN, vnn.RNN), torch.zeros(I), None, ValueError, "RNN: Expected input to be 2D or 3D, got 1D tensor instead"),
    ((nn.GRU, vnn.GRU), torch.zeros(T, B, I + 1), None, RuntimeError,
     r"input\.size\(-1\) must be equal to input_size\. Expected 4, got 5"),
    ((nn.LSTM, vnn.LSTM), torch.zeros(T, B, I), lstm_state(rows=2), RuntimeError,
     r"Expected hidden\[0\] size \(1, 3, 6\), got \[2, 3, 6\]"),
    ((nn.GRU, vnn.GRU), torch.zeros(T, B, I), torch.zeros(1, B + 1, H), RuntimeError,
     r"Expected hidden size \(1, 3, 6\), got \[1, 4, 6\]"),
    ((nn.LSTM, vnn.LSTM), torch.zeros(T, B, I), lstm_state(dims=2), RuntimeError,
     r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\) tensors"),
    ((nn.GRU, vnn.GRU), torch.zeros(T, I), torch.zeros(1, 1, H), RuntimeError,
     "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    ((nn.GRU, vnn.GRU), torch.zeros(T, B, I, dtype=torch.float64), None, ValueError,
     r"RNN input dtype \(torch\.float64\) does not match weight dtype \(torch\.float32\)\. Convert input: "
     r"input\.to\(torch\.float32\), or convert model: model\.to\(torch\.float64\)"),
])
def test_forward_refusals_match_torch(cls_pair, x, hx, error, match):
    torch_cls, our_cls = cls_pair
    with pytest.raises(error, match=match):
        torch_cls(I, H)(x, hx)
    with pytest.raises(error, match=match):
        our_cls(I, H)(x, hx)


@pytest.mark.parametrize("cls_pair, x, hx, error, match", [
    ((nn.LSTMCell, vnn.LSTMCell), torch.zeros(1, B, I), None, ValueError,
     "LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    ((nn.LSTMCell, vnn.LSTMCell), torch.zeros(B, I), (torch.zeros(1, B, H), torch.zeros(B, H)), ValueError,
     r"LSTMCell: Expected hx\[0\] to be 1D or 2D, got 3D instead"),
    ((nn.GRUCell, vnn.GRUCell), torch.zeros(B, I), torch.zeros(1, B, H), ValueError,
     "GRUCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ((nn.GRUCell, vnn.GRUCell), torch.zeros(B, I + 1), None, RuntimeError,
     r"GRUCell: expected input of 4 features \(input_size\), got 5"),
    ((nn.RNNCell, vnn.RNNCell), torch.zeros(B, I), torch.zeros(B + 1, H), RuntimeError,
     r"RNNCell: expected hx of shape \(3, 6\) \(batch, hidden_size\), got \[4, 6\]"),
    ((nn.LSTMCell, vnn.LSTMCell), torch.zeros(B, I), (torch.zeros(B, H), torch.zeros(B, H + 1)), RuntimeError,
     r"LSTMCell: expected hx\[1\] of shape \(3, 6\) \(batch, hidden_size\), got \[3, 7\]"),
])
def test_cell_refusals(cls_pair, x, hx, error, match):
    torch_cls, our_cls = cls_pair
    with pytest.raises(error):  # torch refuses too (its own words for the sizes)
        torch_cls(I, H)(x, hx)
    with pytest.raises(error, match=match):
        our_cls(I, H)(x, hx)


# -- in a clan -----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """An LSTM over embedded tokens, the mean of its outputs into a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, I)
        self.rnn = nn.LSTM(I, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(H, 3)

    def forward(self, idx):
        out, _ = self.rnn(self.embed(idx))
        return self.head(out.mean(1))


def test_a_clan_of_lstm_members_trains_as_plain_torch_lstms_with_adamw():
    """A sweep clan (every member its own AdamW hyperparameters and batches) of the model with
    vmapclan.recurrent.LSTM equals P plain copies built on torch.nn.LSTM, each trained by torch.optim.AdamW."""
    steps, lrs, decays = 3, [1e-2, 3e-3, 3e-2], [1e-2, 0.1, 1e-3]
    torch.manual_seed(0)
    plain = Classifier().to(DTYPE)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 12, (P, B, T), generator=g), torch.randint(0, 3, (P, B), generator=g))
               for _ in range(steps)]
    references = []
    for i in range(P):
        model = copy.deepcopy(plain)
        opt = torch.optim.AdamW(model.parameters(), lr=lrs[i], weight_decay=decays[i])
        for x, y in batches:
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()
        references.append(dict(model.named_parameters()))
    model = vectorizable(copy.deepcopy(plain))
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=lrs[0], weight_decay=decays[0]),
                population_size=P, round_length=100, duty_cycle=1.0, selection=None, autobind=["adamw"], seed=1)
    clan.set_genome("lr", lrs)
    clan.set_genome("weight_decay", decays)
    for name, value in (("betas/0", 0.9), ("betas/1", 0.999), ("eps", 1e-8)):  # construction mutated them
        clan.set_genome(name, [value] * P)
    for x, y in batches:
        train_step(clan.round(), F.cross_entropy, x, y)
    for i in range(P):
        for name, want in references[i].items():
            got = clan.population.params[name][i]
            torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0, msg=lambda m: f"member {i}, {name}: {m}")
    moved = (clan.population.params["rnn.weight_hh_l1"][0] - plain.rnn.weight_hh_l1).abs().max()
    assert moved > 1e-4
