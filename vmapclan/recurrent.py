"""Recurrent layers that run under ``torch.func.vmap``: drop-in replacements for torch's.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call one fused kernel (``aten::lstm`` and friends) that has
no batching rule: under vmap they fail ("Batching rule not implemented for aten::lstm.input").
``nn.LSTMCell`` fails the same way, and ``nn.GRUCell`` and ``nn.RNNCell`` run one member at a time
(vmap's slow fallback). The classes here have the same constructor arguments, parameter names,
state-dict keys, initialisation, forward signature, return values and arithmetic as torch's, and
batch over the members under vmap: a population of P members runs each time step as one batched
matmul.

How a layer runs, and why:

- The input projection of a whole sequence is one matmul over ``[T * B, input]``: only the hidden
  projection is left inside the time loop.
- The time loop of each layer and direction is one ``torch.autograd.Function`` with a hand-written
  backward through time (what the fused kernels do). Left to autograd, every time step would be a
  dozen graph nodes, and the gradient of the hidden weights one small matmul per step (a batched
  matmul with an inner dimension of B, slow on CPU); here it is one matmul over all steps. Its
  ``vmap`` rule runs the loop once on the members' stacked tensors (``baddbmm``, ``sigmoid``,
  ``tanh``, ``addcmul``), free of vmap's per-operation dispatch, and ``torch.func.grad`` under vmap
  differentiates through it (FusedStep's ``backward="vmap"``).
- Like the fused kernels on CUDA (cuDNN), the layers give first derivatives only: their backward
  is computed without being recorded, so in a double backward (``create_graph=True``, then
  differentiating the gradient) their part of the gradient is a constant.
- The cells are plain batched operations (one step has no loop to fuse).

What is refused: a ``PackedSequence`` input (see :func:`_refuse_packed` for the padding and masking
that replace it). :func:`vectorizable` swaps torch's layers in a model for these, weights and all,
and :func:`unsupported_recurrent` names the ones a model still holds.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "vectorizable", "unsupported_recurrent"]


# -- the time loops ------------------------------------------------------------------------------
# Each function runs one layer in one direction over ``gx``, the input projection of every step
# ([*, T, B, gates * H], time-major; ``*`` is any leading member dimensions), and returns the
# outputs by position plus the tensors its backward needs. Position t is processed t-th (forward)
# or (T-1-t)-th (``reverse``). ``h0`` and ``c0`` may be None: a zero initial state, whose first
# hidden matmul is skipped.
#
# Under vmap each function's ``vmap`` rule moves the member dimension of every input to the front
# and calls the function once on the whole population: the time loop then runs on plain
# [P, B, ...] tensors (one baddbmm per step for all members), with none of vmap's per-operation
# dispatch, and autograd records one node per layer and direction. Intermediates are returned as
# outputs, marked non-differentiable: torch.func's transforms over an ``autograd.Function`` carry
# only what ``setup_context`` saves from its inputs and outputs.

def _order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _addmm(bias: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``bias + a @ b`` (into ``out`` if given) in one kernel where there is one (matrices, or one
    leading dimension)."""
    if a.dim() == 2 and b.dim() == 2:
        return torch.addmm(bias, a, b, out=out)
    if a.dim() == 3 and b.dim() == 3:
        return torch.baddbmm(bias, a, b, out=out)
    return torch.add(bias, a @ b, out=out)


def _step(t: Tensor, index: int) -> Tensor:
    """Time step ``index`` of a ``[*, T, B, F]`` tensor (a view)."""
    return t.select(-3, index)


def _wrapped(*tensors) -> bool:
    """Whether any tensor is one of torch.func's wrappers (a backward run under ``vmap(grad(...))``)."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _Steps:
    """Per-step results of a ``[*, T, B, features]`` tensor shaped as ``like``.

    On plain tensors, an empty tensor stored time-major: each step's slice (:meth:`at`) is
    contiguous, so a step's kernels write into it (out=) without a copy, and there is no stack at
    the end (its copies would cost as much as the steps' elementwise work). Under torch.func's
    transforms, where out= has no batching rule, a list stacked at the end (:meth:`at` is None).
    ``member_major`` stores the tensor as ``like`` is laid out instead.
    """

    def __init__(self, like: Tensor, features: int, wrapped: bool, member_major: bool = False):
        self.wrapped = wrapped
        lead, steps, batch = like.shape[:-3], like.shape[-3], like.shape[-2]
        if wrapped:
            self.items: list = [None] * steps
        else:
            self.buffer = (like.new_empty((*lead, steps, batch, features)) if member_major
                           else like.new_empty((steps, *lead, batch, features)).movedim(0, -3))
            self.slices = self.buffer.unbind(-3)

    def at(self, t: int) -> Tensor | None:
        return None if self.wrapped else self.slices[t]

    def put(self, t: int, value: Tensor) -> Tensor:
        """Record step ``t``'s ``value``; returns the stored tensor (in-place changes to it are kept)."""
        if self.wrapped:
            self.items[t] = value
            return value
        if value is not self.slices[t]:
            self.slices[t].copy_(value)
        return self.slices[t]

    def all(self) -> Tensor:
        return torch.stack(self.items, -3) if self.wrapped else self.buffer


def _previous(out: Tensor, first: Tensor | None, reverse: bool) -> Tensor:
    """The state each position starts from: ``first`` (zeros when None) for the first processed step,
    else the previous processed step's ``out``."""
    first = out.new_zeros(out[..., 0, :, :].shape) if first is None else first.expand(out[..., 0, :, :].shape)
    if reverse:
        return torch.cat([out[..., 1:, :, :], first.unsqueeze(-3)], -3)
    return torch.cat([first.unsqueeze(-3), out[..., :-1, :, :]], -3)


def _weight_grad(d_gates: Tensor, inputs: Tensor) -> Tensor:
    """``sum over steps and batch of d_gates^T inputs``: one matmul over all steps, ``[*, G, H]``."""
    return d_gates.flatten(-3, -2).transpose(-1, -2) @ inputs.flatten(-3, -2)


# ``grad * y * (1 - y)`` and ``grad * (1 - y^2)`` for y = sigmoid(x), tanh(x): one kernel each.
_sigmoid_grad = torch.ops.aten.sigmoid_backward
_tanh_grad = torch.ops.aten.tanh_backward


def _members_first(info, in_dims, *tensors):
    """Every tensor with the member dimension first (unbatched ones expanded, a view), None kept."""
    out = []
    for t, d in zip(tensors, in_dims):
        if t is None:
            out.append(None)
        elif d is None:
            out.append(t.expand(info.batch_size, *t.shape))
        else:
            out.append(t.movedim(d, 0))
    return out


class _LSTMScan(torch.autograd.Function):
    """One LSTM layer and direction: gates i, f, g, o as torch orders them."""

    @staticmethod
    def forward(gx, h0, c0, w_hh, w_hr, reverse):
        steps, size = gx.shape[-3], gx.shape[-1] // 4
        w_hh_t = w_hh.transpose(-1, -2)
        w_hr_t = w_hr.transpose(-1, -2) if w_hr is not None else None
        # Every step writes into these (out=) rather than into lists stacked at the end: the copies
        # of a stack cost as much as the steps' elementwise work.
        wrapped = _wrapped(gx, h0, c0, w_hh, w_hr)
        acts = _Steps(gx, 4 * size, wrapped)
        cell_gates, cells, tanh_cells = (_Steps(gx, size, wrapped) for _ in range(3))
        outs = _Steps(gx, w_hh.shape[-1], wrapped)
        h, c = h0, c0
        for t in _order(steps, reverse):
            # A zero initial state has no hidden matmul: the gates are the input projection.
            gates = acts.put(t, _step(gx, t).clone() if h is None else _addmm(_step(gx, t), h, w_hh_t, out=acts.at(t)))
            # One sigmoid over all four gates (the g slot's is unused) is fewer calls than three.
            g = cell_gates.put(t, torch.tanh(gates[..., 2 * size:3 * size], out=cell_gates.at(t)))
            i, f, _, o = gates.sigmoid_().chunk(4, -1)
            c = cells.put(t, torch.mul(i, g, out=cells.at(t)) if c is None
                          else torch.addcmul(f * c, i, g, out=cells.at(t)))
            tc = tanh_cells.put(t, torch.tanh(c, out=tanh_cells.at(t)))
            h = outs.put(t, torch.mul(o, tc, out=outs.at(t)) if w_hr_t is None
                         else torch.matmul(o * tc, w_hr_t, out=outs.at(t)))
        return outs.all(), h.clone(), c.clone(), acts.all(), cell_gates.all(), cells.all(), tanh_cells.all()

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, h0, c0, w_hh, w_hr, reverse = inputs
        out, _, _, acts, cell_gates, cells, tanh_cells = output
        ctx.mark_non_differentiable(acts, cell_gates, cells, tanh_cells)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, c0, w_hh, w_hr, out, acts, cell_gates, cells, tanh_cells)
        ctx.reverse = reverse

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c, *_):
        # First derivatives only (see the module docstring): the gradient is computed, not recorded.
        with torch.no_grad():
            h0, c0, w_hh, w_hr, out, acts, g, cells, tanh_cells = ctx.saved_tensors
            reverse, steps = ctx.reverse, out.shape[-3]
            i, f, _, o = acts.chunk(4, -1)
            # Every factor that does not depend on the incoming gradient, for all steps at once (with
            # the kernels autograd uses for sigmoid and tanh), so that the loop below is six operations
            # per step:
            #   d gates = [dc * g * i(1-i), dc * c_prev * f(1-f), dc * i * (1-g^2), dh * tanh(c) * o(1-o)]
            factors = torch.cat([_sigmoid_grad(g, i), _sigmoid_grad(_previous(cells, c0, reverse), f),
                                 _tanh_grad(i, g), _sigmoid_grad(tanh_cells, o)], -1)
            through_h = _tanh_grad(o, tanh_cells)  # dc += dh * o * (1 - tanh(c)^2)
            f_steps, through_steps, factor_steps = f.unbind(-3), through_h.unbind(-3), factors.unbind(-3)
            out_steps = grad_out.unbind(-3) if grad_out is not None else None
            dh = grad_h if grad_h is not None else torch.zeros_like(out[..., 0, :, :])
            dc = grad_c if grad_c is not None else torch.zeros_like(cells[..., 0, :, :])
            # Member-major, as gx came: the gradient goes on into the input projection's matmul.
            wrapped = _wrapped(out, grad_out, grad_h, grad_c)
            # Member-major, as gx came: the gradient goes on into the input projection's matmul.
            d_gx = _Steps(acts, acts.shape[-1], wrapped, member_major=True)
            d_outs = _Steps(out, out.shape[-1], wrapped) if w_hr is not None else None
            for t in _order(steps, not reverse):
                if out_steps is not None:
                    dh = dh + out_steps[t]
                if w_hr is not None:
                    d_outs.put(t, dh)
                    dh = dh @ w_hr
                dc = torch.addcmul(dc, dh, through_steps[t])
                d_gates = d_gx.put(t, torch.mul(torch.cat([dc, dc, dc, dh], -1), factor_steps[t], out=d_gx.at(t)))
                dh = d_gates @ w_hh
                dc = dc * f_steps[t]
            d_gx = d_gx.all()
            d_w_hh = _weight_grad(d_gx, _previous(out, h0, reverse))
            d_w_hr = _weight_grad(d_outs.all(), o * tanh_cells) if w_hr is not None else None
            return d_gx, (dh if h0 is not None else None), (dc if c0 is not None else None), d_w_hh, d_w_hr, None

    @staticmethod
    def vmap(info, in_dims, gx, h0, c0, w_hh, w_hr, reverse):
        return _LSTMScan.apply(*_members_first(info, in_dims, gx, h0, c0, w_hh, w_hr), reverse), (0,) * 7


class _GRUScan(torch.autograd.Function):
    """One GRU layer and direction: gates r, z, n, with torch's ``n = tanh(x_n + r * (W_hn h + b_hn))``
    and ``h' = (h - n) * z + n``."""

    @staticmethod
    def forward(gx, h0, w_hh, b_hh, reverse):
        steps, size = gx.shape[-3], w_hh.shape[-1]
        w_hh_t = w_hh.transpose(-1, -2)
        b_hh = b_hh.unsqueeze(-2) if b_hh is not None else None  # [*, 1, 3H]: broadcast over the batch
        wrapped = _wrapped(gx, h0, w_hh, b_hh)
        hidden = _Steps(gx, 3 * size, wrapped)  # each step's hidden projection W_hh h + b_hh
        gates, news, outs = _Steps(gx, 2 * size, wrapped), _Steps(gx, size, wrapped), _Steps(gx, size, wrapped)
        h = h0
        for t in _order(steps, reverse):
            x = _step(gx, t)
            if h is None:  # a zero state: the hidden projection is its bias alone
                gh = b_hh.expand(x.shape).clone() if b_hh is not None else torch.zeros_like(x)
            elif b_hh is not None:
                gh = _addmm(b_hh, h, w_hh_t, out=hidden.at(t))
            else:
                gh = torch.matmul(h, w_hh_t, out=hidden.at(t))
            hidden.put(t, gh)
            rz = gates.put(t, torch.add(x[..., :2 * size], gh[..., :2 * size], out=gates.at(t)).sigmoid_())
            r, z = rz.chunk(2, -1)
            n = news.put(t, torch.addcmul(x[..., 2 * size:], r, gh[..., 2 * size:], out=news.at(t)).tanh_())
            h = outs.put(t, torch.addcmul(n, torch.neg(n) if h is None else h - n, z, out=outs.at(t)))
        return outs.all(), h.clone(), gates.all(), news.all(), hidden.all()[..., 2 * size:]

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, h0, w_hh, b_hh, reverse = inputs
        out, _, gates, news, hidden_news = output
        ctx.mark_non_differentiable(gates, news, hidden_news)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, w_hh, out, gates, news, hidden_news)
        ctx.reverse, ctx.has_bias = reverse, b_hh is not None

    @staticmethod
    def backward(ctx, grad_out, grad_h, *_):
        # First derivatives only (see the module docstring): the gradient is computed, not recorded.
        with torch.no_grad():
            h0, w_hh, out, gates, n, hn = ctx.saved_tensors
            reverse, steps = ctx.reverse, out.shape[-3]
            r, z = gates.chunk(2, -1)
            h_prev = _previous(out, h0, reverse)
            # Every gradient of a gate is the incoming dh times a factor known from the forward:
            #   dz = dh * (h - n) * z(1-z),  dn = dh * (1-z)(1-n^2),  dr = dn * hn * r(1-r),  d hn = dn * r.
            d_n = _tanh_grad(1 - z, n)
            d_z = _sigmoid_grad(h_prev - n, z)
            d_r = _sigmoid_grad(d_n * hn, r)
            to_gx = torch.cat([d_r, d_z, d_n], -1)
            to_gh = torch.cat([d_r, d_z, d_n * r], -1)
            z_steps, to_gh_steps = z.unbind(-3), to_gh.unbind(-3)
            out_steps = grad_out.unbind(-3) if grad_out is not None else None
            dh = grad_h if grad_h is not None else torch.zeros_like(out[..., 0, :, :])
            wrapped = _wrapped(out, grad_out, grad_h)
            d_h, d_gh = _Steps(out, out.shape[-1], wrapped), _Steps(to_gh, to_gh.shape[-1], wrapped)
            for t in _order(steps, not reverse):
                if out_steps is not None:
                    dh = dh + out_steps[t]
                d_h.put(t, dh)
                d_hidden = d_gh.put(t, torch.mul(torch.cat([dh, dh, dh], -1), to_gh_steps[t], out=d_gh.at(t)))
                dh = _addmm(dh * z_steps[t], d_hidden, w_hh)
            d_h, d_gh = d_h.all(), d_gh.all()
            d_gx = torch.cat([d_h, d_h, d_h], -1).mul_(to_gx)
            d_w_hh = _weight_grad(d_gh, h_prev)
            d_b_hh = d_gh.flatten(-3, -2).sum(-2) if ctx.has_bias else None
            return d_gx, (dh if h0 is not None else None), d_w_hh, d_b_hh, None

    @staticmethod
    def vmap(info, in_dims, gx, h0, w_hh, b_hh, reverse):
        return _GRUScan.apply(*_members_first(info, in_dims, gx, h0, w_hh, b_hh), reverse), (0,) * 5


class _RNNScan(torch.autograd.Function):
    """One Elman RNN layer and direction: ``h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (or ReLU)."""

    @staticmethod
    def forward(gx, h0, w_hh, relu, reverse):
        steps = gx.shape[-3]
        w_hh_t = w_hh.transpose(-1, -2)
        outs = _Steps(gx, gx.shape[-1], _wrapped(gx, h0, w_hh))
        h = h0
        for t in _order(steps, reverse):
            # A zero initial state has no hidden matmul.
            pre = outs.put(t, _step(gx, t).clone() if h is None else _addmm(_step(gx, t), h, w_hh_t, out=outs.at(t)))
            h = pre.relu_() if relu else pre.tanh_()
        return outs.all(), h.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        gx, h0, w_hh, relu, reverse = inputs
        out, _ = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, w_hh, out)
        ctx.relu, ctx.reverse = relu, reverse

    @staticmethod
    def backward(ctx, grad_out, grad_h):
        # First derivatives only (see the module docstring): the gradient is computed, not recorded.
        with torch.no_grad():
            h0, w_hh, out = ctx.saved_tensors
            reverse, steps = ctx.reverse, out.shape[-3]
            slope = (out > 0).to(out.dtype) if ctx.relu else _tanh_grad(torch.ones_like(out), out)
            slope_steps = slope.unbind(-3)
            out_steps = grad_out.unbind(-3) if grad_out is not None else None
            dh = grad_h if grad_h is not None else torch.zeros_like(out[..., 0, :, :])
            d_gx = _Steps(out, out.shape[-1], _wrapped(out, grad_out, grad_h), member_major=True)
            for t in _order(steps, not reverse):
                if out_steps is not None:
                    dh = dh + out_steps[t]
                dh = d_gx.put(t, torch.mul(dh, slope_steps[t], out=d_gx.at(t))) @ w_hh
            d_gx = d_gx.all()
            d_w_hh = _weight_grad(d_gx, _previous(out, h0, reverse))
            return d_gx, (dh if h0 is not None else None), d_w_hh, None, None

    @staticmethod
    def vmap(info, in_dims, gx, h0, w_hh, relu, reverse):
        return _RNNScan.apply(*_members_first(info, in_dims, gx, h0, w_hh), relu, reverse), (0, 0)


# -- the layers --------------------------------------------------------------------------------
def _refuse_packed(who: str, input) -> None:
    """Refuse a ``PackedSequence``: its per-step batch sizes are data, and vmap needs one shape for
    every member.

    The alternative is padding and masking. Pad the sequences to one length (``pad_sequence``),
    run the layer on the padded batch, and mask what comes after each sequence's end: a
    unidirectional layer's outputs at the valid positions do not depend on the padding after them,
    so a masked loss is exact, and the state after sequence b's last token is
    ``output[b, lengths[b] - 1]`` (batch_first), not ``h_n``. A bidirectional layer's reverse
    direction reads the padding first; for exact results run the reverse direction as a second
    unidirectional layer on each sequence reversed within its length.
    """
    if isinstance(input, PackedSequence):
        raise TypeError(
            f"vmapclan.recurrent.{who}: expected a padded tensor, got a PackedSequence, which vmap cannot batch "
            "(its batch sizes per step are data); pad the sequences (torch.nn.utils.rnn.pad_sequence), run "
            "the layer on the padded batch and mask the positions after each sequence's end (README, 'Models')"
        )


_MODES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _RecurrentBase(nn.Module):
    """What LSTM, GRU and RNN share: torch's ``nn.RNNBase`` parameters, checks and layer loop."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        # torch's own checks and messages, so the layers are drop-in replacements.
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          stacklevel=3)
        for name, value, kind in (("bias", bias, bool), ("batch_first", batch_first, bool),
                                  ("input_size", input_size, int), ("hidden_size", hidden_size, int),
                                  ("num_layers", num_layers, int), ("proj_size", proj_size, int)):
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")
        if input_size <= 0:
            raise ValueError(f"input_size must be greater than zero, got {input_size}")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be greater than zero, got {hidden_size}")
        if num_layers <= 0:
            raise ValueError(f"num_layers must be greater than zero, got {num_layers}")
        if proj_size < 0:
            raise ValueError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
                             f"hidden_size={hidden_size}")
        factory = {"device": device, "dtype": dtype}
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        gate_size = _MODES[mode] * hidden_size
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # The same parameters, names and creation order as nn.RNNBase: the state dicts match and
        # reset_parameters draws the same numbers from the same seed.
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = "_reverse" if direction == 1 else ""
                params = {f"weight_ih_l{layer}{suffix}": (gate_size, layer_input),
                          f"weight_hh_l{layer}{suffix}": (gate_size, real_hidden)}
                if bias:
                    params[f"bias_ih_l{layer}{suffix}"] = (gate_size,)
                    params[f"bias_hh_l{layer}{suffix}"] = (gate_size,)
                if proj_size > 0:
                    params[f"weight_hr_l{layer}{suffix}"] = (proj_size, hidden_size)
                for name, shape in params.items():
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(params)
                self._all_weights.append(list(params))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in ``±1/sqrt(hidden_size)``."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Does nothing: torch's version packs the weights for cuDNN, which these layers do not call."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as ``nn.RNNBase.all_weights``."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # -- forward --------------------------------------------------------------------------------
    def _who(self) -> str:
        return "RNN" if self.mode.startswith("RNN") else self.mode

    def _prepare(self, input, states: list[Tensor | None]):
        """Check the input and states as torch does; return the time-major batched input, the states
        as ``[L * D, B, ...]`` (or None) and whether the input was unbatched."""
        who = self._who()
        _refuse_packed(who, input)
        if input.dim() not in (2, 3):
            raise ValueError(f"{who}: Expected input to be 2D or 3D, got {input.dim()}D "
                             f"{'tensor ' if who == 'RNN' else ''}instead")
        batched = input.dim() == 3
        given = [s for s in states if s is not None]
        if given:
            want = 3 if batched else 2
            if any(s.dim() != want for s in given):
                dims = ", ".join(f"{s.dim()}-D" for s in given)
                got = f"({dims}) tensors" if len(states) == 2 else f"{dims} tensor"
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx"
                                   f"{' and cx' if len(states) == 2 else ''} should also be {want}-D but got {got}")
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            states = [s.unsqueeze(1) if s is not None else None for s in states]
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")
        if self.batch_first:
            input = input.transpose(0, 1)
        batch = input.size(1)
        rows = self.num_layers * (2 if self.bidirectional else 1)
        sizes = [self.proj_size or self.hidden_size, self.hidden_size]
        for k, s in enumerate(states):
            if s is not None and tuple(s.shape) != (rows, batch, sizes[k]):
                which = f"hidden[{k}] size" if len(states) == 2 else "hidden size"
                raise RuntimeError(f"Expected {which} {(rows, batch, sizes[k])}, got {list(s.shape)}")
        return input, states, not batched

    def _layers(self, x: Tensor, states: list[Tensor | None], scan) -> tuple[Tensor, list[list[Tensor]]]:
        """Run every layer and direction with ``scan(k, gx, names, states_k) -> (out, final states)``."""
        directions = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = []
        for layer in range(self.num_layers):
            steps, batch = x.shape[:2]
            flat = x.reshape(steps * batch, x.shape[-1])  # one matmul for the whole sequence
            outs = []
            for direction in range(directions):
                k = layer * directions + direction
                names = self._all_weights[k]
                w_ih = getattr(self, names[0])
                bias = self._input_bias(names)
                gx = F.linear(flat, w_ih, bias).view(steps, batch, -1)
                out, final = scan(gx, names, [s[k] if s is not None else None for s in states], direction == 1)
                outs.append(out)
                finals.append(final)
            x = outs[0] if directions == 1 else torch.cat(outs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, finals

    def _input_bias(self, names: list[str]) -> Tensor | None:
        return getattr(self, names[2]) if self.bias else None

    def _finish(self, x: Tensor, finals: list[list[Tensor]], unbatched: bool):
        output = x.transpose(0, 1) if self.batch_first else x
        hidden = [torch.stack([f[j] for f in finals]) for j in range(len(finals[0]))]
        if unbatched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = [h.squeeze(1) for h in hidden]
        return output, hidden


def _same_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Under autocast the input projection comes out in the lower precision; the recurrence then
    # runs in it too (as torch's autocast runs its fused kernels), so every operand is cast to it.
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LSTM(_RecurrentBase):
    """``torch.nn.LSTM`` that runs under ``torch.func.vmap``: same arguments, parameters, state dict,
    initialisation, forward and numbers.

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        num_layers: Stacked layers.
        bias: Whether the layers have ``bias_ih`` and ``bias_hh``.
        batch_first: Input and output ``[B, T, F]`` instead of ``[T, B, F]`` (the states stay ``[L * D, B, H]``).
        dropout: Dropout on every layer's output but the last, in training mode.
        bidirectional: A second, reverse direction per layer.
        proj_size: If > 0, the hidden state is projected to this size (``weight_hr_l{k}``).
        device: Where the parameters are created.
        dtype: Their dtype.

    Inputs are those of ``torch.nn.LSTM``: ``input`` ``[T, B, input_size]`` (or ``[T, input_size]``
    unbatched) and optionally ``(h_0, c_0)``; a ``PackedSequence`` is refused (pad and mask
    instead, see the README). Returns ``(output, (h_n, c_n))``.

    Example:
        >>> lstm = LSTM(8, 16, num_layers=2, batch_first=True)
        >>> output, (h_n, c_n) = lstm(torch.randn(4, 10, 8))
        >>> output.shape, h_n.shape
        (torch.Size([4, 10, 16]), torch.Size([2, 4, 16]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 *, device=None, dtype=None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)

    def _input_bias(self, names):
        # Both biases enter the gates by plain addition: folding b_hh into the sequence-wide input
        # projection takes an addition out of every time step.
        return getattr(self, names[2]) + getattr(self, names[3]) if self.bias else None

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """Run the layers over a sequence, as ``torch.nn.LSTM.forward``: ``(output, (h_n, c_n))``."""
        x, (h0, c0), unbatched = self._prepare(input, [None, None] if hx is None else list(hx))

        def scan(gx, names, state, reverse):
            h, c = (_same_dtype(s, gx.dtype) for s in state)
            w_hh = _same_dtype(getattr(self, names[1]), gx.dtype)
            w_hr = _same_dtype(getattr(self, names[-1]), gx.dtype) if self.proj_size > 0 else None
            out, h_n, c_n, *_ = _LSTMScan.apply(gx, h, c, w_hh, w_hr, reverse)
            return out, (h_n, c_n)

        output, (h_n, c_n) = self._finish(*self._layers(x, [h0, c0], scan), unbatched)
        return output, (h_n, c_n)


class GRU(_RecurrentBase):
    """``torch.nn.GRU`` that runs under ``torch.func.vmap``: same arguments, parameters, state dict,
    initialisation, forward and numbers (gates r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        num_layers: Stacked layers.
        bias: Whether the layers have ``bias_ih`` and ``bias_hh``.
        batch_first: Input and output ``[B, T, F]`` instead of ``[T, B, F]`` (``h_n`` stays ``[L * D, B, H]``).
        dropout: Dropout on every layer's output but the last, in training mode.
        bidirectional: A second, reverse direction per layer.
        device: Where the parameters are created.
        dtype: Their dtype.

    Returns ``(output, h_n)``; a ``PackedSequence`` input is refused (pad and mask instead).

    Example:
        >>> gru = GRU(8, 16, bidirectional=True)
        >>> output, h_n = gru(torch.randn(10, 4, 8))
        >>> output.shape, h_n.shape
        (torch.Size([10, 4, 32]), torch.Size([2, 4, 16]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, device=None, dtype=None) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        """Run the layers over a sequence, as ``torch.nn.GRU.forward``: ``(output, h_n)``."""
        x, (h0,), unbatched = self._prepare(input, [hx])

        def scan(gx, names, state, reverse):
            w_hh = _same_dtype(getattr(self, names[1]), gx.dtype)
            b_hh = _same_dtype(getattr(self, names[3]), gx.dtype) if self.bias else None
            out, h_n, *_ = _GRUScan.apply(gx, _same_dtype(state[0], gx.dtype), w_hh, b_hh, reverse)
            return out, (h_n,)

        output, (h_n,) = self._finish(*self._layers(x, [h0], scan), unbatched)
        return output, h_n


class RNN(_RecurrentBase):
    """``torch.nn.RNN`` (Elman, tanh or ReLU) that runs under ``torch.func.vmap``: same arguments,
    parameters, state dict, initialisation, forward and numbers.

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        num_layers: Stacked layers.
        nonlinearity: ``"tanh"`` or ``"relu"`` (fourth, as in torch).
        bias: Whether the layers have ``bias_ih`` and ``bias_hh``.
        batch_first: Input and output ``[B, T, F]`` instead of ``[T, B, F]``.
        dropout: Dropout on every layer's output but the last, in training mode.
        bidirectional: A second, reverse direction per layer.
        device: Where the parameters are created.
        dtype: Their dtype.

    Example:
        >>> rnn = RNN(8, 16, nonlinearity="relu")
        >>> output, h_n = rnn(torch.randn(10, 4, 8))
        >>> output.shape
        torch.Size([10, 4, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _input_bias(self, names):
        return getattr(self, names[2]) + getattr(self, names[3]) if self.bias else None

    def forward(self, input: Tensor, hx: Tensor | None = None):
        """Run the layers over a sequence, as ``torch.nn.RNN.forward``: ``(output, h_n)``."""
        x, (h0,), unbatched = self._prepare(input, [hx])
        relu = self.mode == "RNN_RELU"

        def scan(gx, names, state, reverse):
            w_hh = _same_dtype(getattr(self, names[1]), gx.dtype)
            out, h_n = _RNNScan.apply(gx, _same_dtype(state[0], gx.dtype), w_hh, relu, reverse)
            return out, (h_n,)

        output, (h_n,) = self._finish(*self._layers(x, [h0], scan), unbatched)
        return output, h_n


# -- the cells ---------------------------------------------------------------------------------
class _CellBase(nn.Module):
    """torch's ``nn.RNNCellBase``: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, uniform init."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in ``±1/sqrt(hidden_size)``."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def _prepare(self, input: Tensor, states: list[Tensor | None]):
        """torch's checks; the input and states with a batch dimension, and whether it was added."""
        who = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{who}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for k, s in enumerate(states):
            if s is not None and s.dim() not in (1, 2):
                which = f"hx[{k}]" if len(states) == 2 else "hidden"
                raise ValueError(f"{who}: Expected {which} to be 1D or 2D, got {s.dim()}D instead")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{who}: expected input of {self.input_size} features (input_size), got "
                               f"{input.size(-1)}")
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            states = [s.unsqueeze(0) if s is not None else None for s in states]
        for k, s in enumerate(states):
            if s is not None and tuple(s.shape) != (input.size(0), self.hidden_size):
                which = f"hx[{k}]" if len(states) == 2 else "hx"
                raise RuntimeError(f"{who}: expected {which} of shape {(input.size(0), self.hidden_size)} "
                                   f"(batch, hidden_size), got {list(s.shape)}")
        return input, states, unbatched

    def _projections(self, input: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The input and hidden projections, and the state (zeros when None, as torch's cells: the
        hidden weights then get torch's zero gradient rather than none, which AdamW would skip)."""
        if h is None:
            h = input.new_zeros(input.shape[0], self.hidden_size)
        return F.linear(input, self.weight_ih, self.bias_ih), F.linear(h, self.weight_hh, self.bias_hh), h


class LSTMCell(_CellBase):
    """``torch.nn.LSTMCell`` that runs under ``torch.func.vmap``: same arguments, parameters,
    initialisation and numbers. ``forward(input, (h, c)) -> (h', c')``.

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        bias: Whether the cell has ``bias_ih`` and ``bias_hh``.
        device: Where the parameters are created.
        dtype: Their dtype.

    Example:
        >>> cell = LSTMCell(8, 16)
        >>> h, c = cell(torch.randn(4, 8))
        >>> h, c = cell(torch.randn(4, 8), (h, c))
        >>> h.shape
        torch.Size([4, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One step: ``(h', c')`` from ``input`` ``[B, input_size]`` (or ``[input_size]``) and ``(h, c)``."""
        input, (h, c), unbatched = self._prepare(input, [None, None] if hx is None else list(hx))
        gi, gh, h = self._projections(input, h)
        i, f, g, o = (gi + gh).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = torch.zeros_like(h) if c is None else c
        c = f * c + i * g
        h = o * torch.tanh(c)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class GRUCell(_CellBase):
    """``torch.nn.GRUCell`` that runs under ``torch.func.vmap`` batched (torch's runs one member at a
    time there): same arguments, parameters, initialisation and numbers. ``forward(input, h) -> h'``.

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        bias: Whether the cell has ``bias_ih`` and ``bias_hh``.
        device: Where the parameters are created.
        dtype: Their dtype.

    Example:
        >>> cell = GRUCell(8, 16)
        >>> h = cell(torch.randn(4, 8))
        >>> cell(torch.randn(4, 8), h).shape
        torch.Size([4, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``h'`` from ``input`` ``[B, input_size]`` (or ``[input_size]``) and ``h``."""
        input, (h,), unbatched = self._prepare(input, [hx])
        gi, gh, h = self._projections(input, h)
        size = self.hidden_size
        r, z = torch.sigmoid(gi[..., :2 * size] + gh[..., :2 * size]).chunk(2, -1)
        n = torch.tanh(gi[..., 2 * size:] + r * gh[..., 2 * size:])
        h = (h - n) * z + n
        return h.squeeze(0) if unbatched else h


class RNNCell(_CellBase):
    """``torch.nn.RNNCell`` that runs under ``torch.func.vmap`` batched: ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``
    (or ReLU), same arguments, parameters, initialisation and numbers.

    Args:
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        bias: Whether the cell has ``bias_ih`` and ``bias_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        device: Where the parameters are created.
        dtype: Their dtype.

    Example:
        >>> RNNCell(8, 16)(torch.randn(4, 8)).shape
        torch.Size([4, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", *,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step: ``h'`` from ``input`` ``[B, input_size]`` (or ``[input_size]``) and ``h``."""
        input, (h,), unbatched = self._prepare(input, [hx])
        gi, gh, _ = self._projections(input, h)
        pre = gi + gh
        h = torch.relu(pre) if self.nonlinearity == "relu" else torch.tanh(pre)
        return h.squeeze(0) if unbatched else h


# -- models ------------------------------------------------------------------------------------
_REPLACEMENTS: dict[type, type] = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell,
                                   nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _torch_recurrent(module: nn.Module) -> type | None:
    """The torch recurrent class ``module`` is (or derives from), else None."""
    for cls in _REPLACEMENTS:
        if isinstance(module, cls):
            return cls
    return None


def _path(root: str, name: str) -> str:
    return f"{root}.{name}" if name else root


def unsupported_recurrent(model: nn.Module, root: str = "model") -> str | None:
    """A one-line message naming the torch recurrent layers in ``model`` that vmap cannot batch, or None.

    ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and ``nn.LSTMCell`` fail under vmap (no batching rule);
    ``nn.GRUCell`` and ``nn.RNNCell`` run one member at a time. The message names the first such
    module by its path, the alternative, and how many more there are.

    Args:
        model: The model to inspect.
        root: How the model is named in the message.

    Returns:
        The message, or ``None`` when the model holds none of them.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LSTM(4, 8))
        >>> print(unsupported_recurrent(model))  # doctest: +NORMALIZE_WHITESPACE
        model.1 is a torch.nn.LSTM, which has no vmap batching rule; use vmapclan.recurrent.LSTM (same
        weights and state dict) or vmapclan.recurrent.vectorizable(model)
    """
    found = [(name, module) for name, module in model.named_modules() if _torch_recurrent(module) is not None]
    if not found:
        return None
    name, module = found[0]
    cls = _torch_recurrent(module)
    what = f"torch.nn.{cls.__name__}" if type(module) is cls else f"{type(module).__name__} (a torch.nn.{cls.__name__})"
    why = ("which vmap runs one member at a time (no batching rule)" if cls in (nn.GRUCell, nn.RNNCell)
           else "which has no vmap batching rule")
    message = (f"{_path(root, name)} is a {what}, {why}; use vmapclan.recurrent.{cls.__name__} (same weights and "
               f"state dict) or vmapclan.recurrent.vectorizable({root})")
    if len(found) > 1:
        others = ", ".join(_path(root, n) for n, _ in found[1:4]) + (", ..." if len(found) > 4 else "")
        message += f" ({len(found) - 1} more: {others})"
    return message


def _hooks(module: nn.Module) -> list[str]:
    kinds = {"forward hooks": ("_forward_hooks", "_forward_pre_hooks"),
             "backward hooks": ("_backward_hooks", "_backward_pre_hooks"),
             "state-dict hooks": ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                  "_load_state_dict_post_hooks")}
    return [kind for kind, attrs in kinds.items() if any(getattr(module, a, None) for a in attrs)]


def _swapped(module: nn.Module, path: str) -> nn.Module:
    cls = _torch_recurrent(module)
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise ValueError(f"vectorizable: {path} has parametrized weights, which the replacement would not carry; "
                         f"expected a plain torch.nn.{cls.__name__}: register the parametrization on the "
                         f"vmapclan.recurrent.{cls.__name__} instead")
    if type(module) is not cls:
        raise TypeError(f"vectorizable: {path} is a {type(module).__name__}, a subclass of torch.nn.{cls.__name__}; "
                        f"expected torch.nn.{cls.__name__} itself (a subclass's own code cannot be carried over): "
                        f"build it on vmapclan.recurrent.{cls.__name__} instead")
    hooks = _hooks(module)
    if hooks:
        raise ValueError(f"vectorizable: {path} has {' and '.join(hooks)}, which the replacement would not carry; "
                         f"expected none: register them on the vmapclan.recurrent.{cls.__name__} instead")
    new_cls = _REPLACEMENTS[cls]
    if cls in (nn.LSTM, nn.GRU, nn.RNN):
        kwargs = {"num_layers": module.num_layers, "bias": module.bias, "batch_first": module.batch_first,
                  "dropout": module.dropout, "bidirectional": module.bidirectional}
        if cls is nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        if cls is nn.RNN:
            kwargs["nonlinearity"] = module.nonlinearity
    else:
        kwargs = {"bias": module.bias}
        if cls is nn.RNNCell:
            kwargs["nonlinearity"] = module.nonlinearity
    # Built on the meta device: no memory and no draw from the random generator for weights that
    # are replaced at once by the module's own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warned about dropout with one layer already
        new = new_cls(module.input_size, module.hidden_size, device="meta", **kwargs)
    mine = dict(new.named_parameters())
    theirs = dict(module.named_parameters())
    if mine.keys() != theirs.keys():
        raise ValueError(f"vectorizable: {path} has the parameters {sorted(theirs)}; expected those of its "
                         f"settings, {sorted(mine)}")
    for name, param in theirs.items():
        setattr(new, name, param)  # the same Parameter objects: an optimizer over them stays valid
    new.train(module.training)
    return new


def vectorizable(model: nn.Module) -> nn.Module:
    """``model`` with every ``torch.nn`` LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell replaced by the
    ``vmapclan.recurrent`` layer of the same settings, so that a population can run it under vmap.

    The replacements hold the very ``nn.Parameter`` objects of the layers they replace (as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does): the outputs are the same, and an
    optimizer built over ``model.parameters()`` before the call still holds the model's parameters.
    Submodules are replaced in place; use the return value, which is a new module when ``model``
    itself is a recurrent layer.

    Args:
        model: The model to convert.

    Returns:
        ``model`` (edited in place) or, when ``model`` is itself a torch recurrent layer, its replacement.

    Raises:
        TypeError: for a subclass of a torch recurrent layer (its own code cannot be carried over).
        ValueError: for a layer with hooks or parametrized weights, which the replacement would drop.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LSTM(4, 8))
        >>> model = vectorizable(model)
        >>> type(model[1]).__module__, type(model[1]).__name__
        ('vmapclan.recurrent', 'LSTM')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vectorizable: expected an nn.Module, got {type(model).__name__}")
    done: dict[int, nn.Module] = {}  # a layer used in two places is replaced by one module

    def convert(module: nn.Module, path: str) -> nn.Module:
        if _torch_recurrent(module) is not None:
            if id(module) not in done:
                done[id(module)] = _swapped(module, path)
            return done[id(module)]
        for name, child in list(module.named_children()):
            new = convert(child, _path(path, name))
            if new is not child:
                setattr(module, name, new)
        return module

    return convert(model, "model")
