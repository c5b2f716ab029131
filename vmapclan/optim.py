"""Batched AdamW: one AdamW per member, each with its own hyperparameters.

``torch.optim.AdamW`` takes one set of hyperparameters per parameter group; a population needs P
of them, changing every round. Here the hyperparameters are ``[P]`` tensors held next to the
optimizer state, so mutation and selection are tensor writes and nothing is recompiled.

The update rule is written once, in :func:`adamw_step_`, as its two halves:
:func:`adamw_factors_` (the ``[P]`` counters and per-member factors) and :func:`adamw_apply_`
(the elementwise work over ``[P, N]``). :func:`adamw_kernel_step_` runs the same rule as
PyTorch's fused AdamW kernel once per member. :func:`adamw_update` is the one dispatcher over
these implementations (tensor ops, the per-member kernel, compiled tensor ops), as
``torch.optim.adamw`` dispatches over for-loop, foreach and fused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .checks import number_in
from .genome import ADAMW_GENES, GRAD_ACCUM_GENE, group_ratios, is_adamw
from .gradients import release_gradients_

__all__ = ["AdamWHyper", "GroupScales", "group_scales", "AdamWState", "AdamWFactors", "adamw_init", "adamw_factors_", "clip_factors", "adamw_apply_",
           "adamw_step_",
           "adamw_kernel_step_", "adamw_update", "resolve_update", "keep_columns", "BatchedAdamW", "UPDATES",
           "ADAMW_FIELDS", "optimizer_ratios"]


class AdamWHyper(NamedTuple):
    """Per-member AdamW hyperparameters, each a ``float64`` tensor ``[P]``."""

    lr: torch.Tensor
    weight_decay: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor


ADAMW_FIELDS = dict(zip(ADAMW_GENES, AdamWHyper._fields))
"""Gene name (as ``torch.optim.AdamW`` names the setting) -> :class:`AdamWHyper` field."""


class GroupScales(NamedTuple):
    """How several param groups scale the ``[P]`` lr and weight decay, column by column of ``flat[P, N]``.

    A parameter in a group with ``lr_k`` and ``weight_decay_k`` updates with ``lr * lr_k / lr_ref``
    and ``weight_decay * wd_k / wd_ref``, where ``lr`` and ``weight_decay`` are the member's
    ``[P]`` values (the genes) and the references are those of the groups they stand for (see
    :func:`group_scales`).

    Attributes:
        lr: ``[1, N]``: each column's lr multiplier, in the parameters' dtype.
        decay: ``[1, N]``: each column's multiplier of ``lr * weight_decay``.
        sizes: The parameters' value counts, in ``flat``'s column order.
        ratios: ``(lr multiplier, weight-decay multiplier)`` of each parameter, in the same order.
    """

    lr: torch.Tensor
    decay: torch.Tensor
    sizes: tuple[int, ...]
    ratios: tuple[tuple[float, float], ...]


def group_scales(ratios: Sequence[tuple[float, float]], sizes: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str | None = None) -> GroupScales | None:
    """The :class:`GroupScales` of parameters with these ``(lr, weight-decay)`` multipliers; ``None`` if all are 1.

    Args:
        ratios: Per parameter, in ``flat``'s column order: its group's ``lr / lr_ref`` and
            ``weight_decay / wd_ref``.
        sizes: Per parameter, its value count.
        dtype, device: Of the parameters.

    Example:
        >>> s = group_scales([(1.0, 1.0), (0.5, 0.0)], [3, 2], torch.float64)
        >>> s.lr.tolist(), s.decay.tolist()
        ([[1.0, 1.0, 1.0, 0.5, 0.5]], [[1.0, 1.0, 1.0, 0.0, 0.0]])
    """
    ratios = tuple((float(a), float(b)) for a, b in ratios)
    if all(r == (1.0, 1.0) for r in ratios):
        return None  # one group's worth: the update needs no per-column factors
    sizes = tuple(int(n) for n in sizes)
    counts = torch.tensor(sizes)
    lr = torch.tensor([a for a, _ in ratios], dtype=torch.float64).repeat_interleave(counts)
    wd = torch.tensor([b for _, b in ratios], dtype=torch.float64).repeat_interleave(counts)
    return GroupScales(lr.to(dtype=dtype, device=device).view(1, -1), (lr * wd).to(dtype=dtype, device=device).view(1, -1),
                       sizes, ratios)


class AdamWState(NamedTuple):
    """Per-member AdamW state.

    Attributes:
        step: ``float64 [P]``: updates applied so far (for bias correction).
        exp_avg: ``[P, N]``: first moment.
        exp_avg_sq: ``[P, N]``: second moment.
        accum_count: ``long [P]``: micro-batches accumulated since the member's last update.
        skipped: ``float64 [P, K]`` or ``None``: per parameter (``K`` of them, in ``flat``'s
            column order), the member's updates it sat out: frozen, without a gradient, or not
            there yet (added by growth). Its bias correction counts ``step - skipped``, its own
            updates, as ``torch.optim.AdamW`` keeps one step count per parameter. ``None`` (what
            :func:`adamw_init` gives): every parameter takes every update.
    """

    step: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    accum_count: torch.Tensor
    skipped: torch.Tensor | None = None


class AdamWFactors(NamedTuple):
    """The per-member factors of one :func:`adamw_step_`, ``[P, 1]`` columns in the parameters' dtype.

    ``count`` (the micro-batches each member's gradient sums) and ``ready`` (``bool [P]``: the
    members updated this call) are ``None`` without gradient accumulation.
    """

    decay: torch.Tensor
    one_minus_beta1: torch.Tensor
    beta2: torch.Tensor
    one_minus_beta2: torch.Tensor
    step_size: torch.Tensor
    bias2_sqrt: torch.Tensor
    eps: torch.Tensor
    count: torch.Tensor | None
    ready: torch.Tensor | None


def adamw_init(params: torch.Tensor) -> AdamWState:
    """Fresh state for member-major parameters ``params[P, N]``."""
    p = params.shape[0]
    return AdamWState(
        step=torch.zeros(p, dtype=torch.float64, device=params.device),
        exp_avg=torch.zeros_like(params),
        exp_avg_sq=torch.zeros_like(params),
        accum_count=torch.zeros(p, dtype=torch.long, device=params.device),
    )


def adamw_factors_(state: AdamWState, hyper: AdamWHyper, num_grad_accum: torch.Tensor | None,
                   dtype: torch.dtype, scales: GroupScales | None = None,
                   param_sizes: Sequence[int] | None = None) -> AdamWFactors:
    """The ``[P]`` half of :func:`adamw_step_`: advance the counters and compute the per-member factors.

    With ``scales`` (several param groups) the decay and step-size factors are ``[P, N]``: each
    member's ``[P, 1]`` column times the groups' ``[1, N]`` multipliers. With ``state.skipped``
    (and ``param_sizes``, the parameters' value counts) the bias corrections are ``[P, N]`` too:
    each parameter's from its own step count.

    Kept apart from :func:`adamw_apply_` so that a compiled update compiles only the
    elementwise work: inductor would fuse these float64 scalar computations (``beta1 ** t``...)
    into the ``[P, N]`` loop and redo them for every element.
    """
    p = state.step.shape[0]

    def column(t: torch.Tensor) -> torch.Tensor:  # [P] float64 -> [P, 1] in the parameters' dtype
        return t.to(dtype).view(p, 1)

    lr, wd, beta1, beta2, eps = hyper
    count = ready = None
    if num_grad_accum is None:
        state.step.add_(1)
    else:
        state.accum_count.add_(1)
        ready = state.accum_count >= num_grad_accum
        count = column(state.accum_count.to(torch.float64))
        state.step.add_(ready.to(torch.float64))
    t = state.step.clamp(min=1)  # members that never stepped are masked out
    decay, step_size = column(1 - lr * wd), column(lr / (1 - beta1**t))
    bias2_sqrt = column((1 - beta2**t).sqrt())
    if state.skipped is not None:
        # Each parameter's own count, computed per parameter [P, K], then spread over its columns.
        counts = torch.tensor(list(param_sizes), device=t.device)
        own = (state.step.view(p, 1) - state.skipped).clamp(min=1)
        step_size = (lr.view(p, 1) / (1 - beta1.view(p, 1)**own)).to(dtype).repeat_interleave(counts, dim=1)
        bias2_sqrt = (1 - beta2.view(p, 1)**own).sqrt().to(dtype).repeat_interleave(counts, dim=1)
    if scales is not None:
        decay, step_size = 1 - column(lr * wd) * scales.decay, step_size * scales.lr
    return AdamWFactors(decay, column(1 - beta1), column(beta2), column(1 - beta2),
                        step_size, bias2_sqrt, column(eps), count, ready)


def clip_factors(grads: torch.Tensor, count: torch.Tensor | None, max_grad_norm: float) -> torch.Tensor:
    """Each member's gradient-clipping factor ``min(1, max_grad_norm / (||g|| + 1e-6))``, a ``[P, 1]`` column.

    ``g`` is the member's gradient, divided by its micro-batch ``count`` when accumulating. Kept
    out of the compiled elementwise half: inductor fails to compile the norm's reduction feeding
    the in-place update (torch 2.13 on CPU: ``KeyError`` in its scheduler).
    """
    g = grads if count is None else grads / count
    return (max_grad_norm / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)


def adamw_apply_(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 factors: AdamWFactors, clip: torch.Tensor | None = None) -> None:
    """The ``[P, N]`` half of :func:`adamw_step_`: the elementwise AdamW with :func:`adamw_factors_`'s columns.

    Pure elementwise work, so that ``torch.compile`` turns it into one or two loops. ``clip``
    is :func:`clip_factors`' column when clipping.
    """
    g = grads if factors.count is None else grads / factors.count
    if clip is not None:
        g = g * clip
    if factors.ready is None:
        params.mul_(factors.decay)
        exp_avg.lerp_(g, factors.one_minus_beta1)
        exp_avg_sq.mul_(factors.beta2).addcmul_(g, g * factors.one_minus_beta2)
        denom = exp_avg_sq.sqrt().div_(factors.bias2_sqrt).add_(factors.eps)
        params.sub_(exp_avg.div(denom).mul_(factors.step_size))
        return
    mask = factors.ready.view(-1, 1)
    m_new = torch.lerp(exp_avg, g, factors.one_minus_beta1)
    v_new = (exp_avg_sq * factors.beta2).addcmul_(g, g * factors.one_minus_beta2)
    denom = v_new.sqrt().div_(factors.bias2_sqrt).add_(factors.eps)
    p_new = params * factors.decay - m_new.div(denom).mul_(factors.step_size)
    params.copy_(torch.where(mask, p_new, params))
    exp_avg.copy_(torch.where(mask, m_new, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v_new, exp_avg_sq))


def adamw_step_(params: torch.Tensor, grads: torch.Tensor, state: AdamWState, hyper: AdamWHyper,
                num_grad_accum: torch.Tensor | None = None, max_grad_norm: float | None = None, *,
                apply: Callable = adamw_apply_, scales: GroupScales | None = None,
                param_sizes: Sequence[int] | None = None) -> None:
    """One batched AdamW step, in place on ``params`` and ``state``.

    For each member ``i`` with gradient ``g`` (``grads[i]``, or with accumulation the sum of the
    member's micro-batch gradients divided by their count) and ``t = step[i] + 1``::

        p  <- p * (1 - lr * weight_decay)
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g * g
        p  <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    which is ``torch.optim.AdamW`` (without amsgrad) with member ``i``'s hyperparameters.

    With ``num_grad_accum`` (``long [P]``) every call counts one micro-batch per member; only the
    members whose count reaches their ``num_grad_accum`` are updated (their count restarts),
    the others are left exactly as they were. No host synchronisation happens.

    With ``max_grad_norm``, each member's gradient ``g`` is first scaled by
    ``min(1, max_grad_norm / (||g|| + 1e-6))`` (``torch.nn.utils.clip_grad_norm_`` per member).

    Args:
        params: ``[P, N]`` member-major parameters.
        grads: ``[P, N]`` gradients (summed over accumulated micro-batches).
        state: The state from :func:`adamw_init`, updated in place.
        hyper: ``[P]`` hyperparameters.
        num_grad_accum: Optional ``long [P]`` accumulation counts.
        max_grad_norm: Optional per-member gradient-norm limit.
        apply: The elementwise half: :func:`adamw_apply_` or a compiled version of it.
        scales: Several param groups' lr and weight-decay multipliers per column (see
            :class:`GroupScales`); ``None`` for one group.
        param_sizes: The parameters' value counts in column order, needed with
            ``state.skipped`` (each parameter's own bias correction, ``t = step[i] - skipped[i, k] + 1``).
    """
    factors = adamw_factors_(state, hyper, num_grad_accum, params.dtype, scales, param_sizes)
    clip = None if max_grad_norm is None else clip_factors(grads, factors.count, max_grad_norm)
    apply(params, grads, state.exp_avg, state.exp_avg_sq, factors, clip)
    if factors.ready is not None:
        state.accum_count.masked_fill_(factors.ready, 0)


def adamw_kernel_step_(params: torch.Tensor, grads, state: AdamWState, hyper: AdamWHyper,
                       num_grad_accum: torch.Tensor | None = None, max_grad_norm: float | None = None, *,
                       sizes: Sequence[int] | None = None, scales: GroupScales | None = None,
                       param_sizes: Sequence[int] | None = None) -> None:
    """:func:`adamw_step_` (same arguments, same contract) with PyTorch's fused AdamW kernel per member.

    ``torch._fused_adamw_`` (what ``torch.optim.AdamW(fused=True)`` runs) reads each tensor once
    and writes it once, where the batched :func:`adamw_step_` makes about ten passes
    over ``[P, N]``. Its hyperparameters are Python floats, so the ``[P]`` tensors (and, with
    accumulation, which members are ready) are read on the host once per step: free on CPU, a
    synchronisation on CUDA, so this is the CPU form. Results equal :func:`adamw_step_`
    to float rounding.

    The gradients may also come one per parameter, as a backward returns them, so that they
    need not be copied into a ``[P, N]`` buffer first: with ``sizes`` (the parameters' value
    counts, in ``params``' column order), ``grads`` is a sequence of ``[P, ...]`` tensors, and a
    ``None`` marks a parameter without gradient, which is skipped (no weight decay, no moment
    update), as ``torch.optim.AdamW`` skips it. The kernel walks its tensors' memory in order,
    so every member's gradient is made dense first (a no-op for a dense one): vmap can return a
    gradient transposed (a position embedding looked up with ``arange``), and the kernel would
    read it wrongly.

    Args:
        params, state, hyper, num_grad_accum, max_grad_norm: As for :func:`adamw_step_`.
        grads: ``[P, N]`` gradients, or with ``sizes`` one ``[P, ...]`` tensor (or ``None``) per parameter.
        sizes: Values per parameter, when ``grads`` comes per parameter.
        scales: Several param groups' multipliers (see :class:`GroupScales`): the kernel takes one
            lr and weight decay per call, so it runs once per distinct group setting.
        param_sizes: As for :func:`adamw_step_` (with ``state.skipped``).
    """
    p = params.shape[0]
    if scales is not None and sizes is None:  # split by parameter, to give each its group's setting
        sizes, grads = scales.sizes, list(grads.split(scales.sizes, dim=1))
    if state.skipped is not None and sizes is None:  # split by parameter, to give each its own step
        sizes, grads = tuple(param_sizes), list(grads.split(tuple(param_sizes), dim=1))
    ratios = scales.ratios if scales is not None else None
    if num_grad_accum is None:
        state.step.add_(1)
        ready, counts = [True] * p, [1] * p
    else:
        state.accum_count.add_(1)
        ready_mask = state.accum_count >= num_grad_accum
        state.step.add_(ready_mask.to(state.step.dtype))
        ready, counts = ready_mask.tolist(), state.accum_count.tolist()
    steps = state.step.to(torch.float32).unbind()  # the kernel takes the step already counted
    own = None if state.skipped is None else (state.step.view(p, 1) - state.skipped).to(torch.float32)
    lr, wd, beta1, beta2, eps = (t.tolist() for t in hyper)
    for i in range(p):
        if not ready[i]:
            continue
        rows = (params[i], state.exp_avg[i], state.exp_avg_sq[i])
        if sizes is None:
            tensors = [(*rows, grads[i], (1.0, 1.0))]
            kept = [0]
        else:
            tensors = [(w, m, v, g[i], r) for w, m, v, g, r in
                       zip(*(r.split(sizes) for r in rows), grads, ratios or [(1.0, 1.0)] * len(sizes)) if g is not None]
            kept = [k for k, g in enumerate(grads) if g is not None]  # each tensor's parameter index
        ws, ms, vs, gs, rs = ([t[k] for t in tensors] for k in range(5))
        gs = [g.reshape(-1) if g.is_contiguous() else g.contiguous().reshape(-1) for g in gs]
        if counts[i] != 1:
            gs = [g / counts[i] for g in gs]
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
            scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            gs = [g * scale for g in gs]
        for ratio in dict.fromkeys(rs):  # one kernel call per group setting
            pick = [k for k, r in enumerate(rs) if r == ratio]
            torch._fused_adamw_([ws[k] for k in pick], [gs[k] for k in pick], [ms[k] for k in pick],
                                [vs[k] for k in pick], [],
                                [steps[i]] * len(pick) if own is None else [own[i, kept[k]] for k in pick],
                                lr=lr[i] * ratio[0],
                                weight_decay=wd[i] * ratio[1], beta1=beta1[i], beta2=beta2[i], eps=eps[i],
                                amsgrad=False, maximize=False)
    if num_grad_accum is not None:
        state.accum_count.masked_fill_(ready_mask, 0)


UPDATES = ("auto", "batched", "per-member")
"""How the AdamW update runs: ``"batched"`` (:func:`adamw_step_`: tensor ops over ``[P, N]``, no
host reads; can be compiled), ``"per-member"`` (:func:`adamw_kernel_step_`: PyTorch's fused AdamW
kernel once per member, hyperparameters read on the host; CPU only), or ``"auto"`` (see
:func:`resolve_update`)."""

# Per member, the fused kernel costs a call (~10 us) and one pass over the member's N values; the
# batched update costs ~10 passes over all P x N values. Measured on 2 CPU threads at P = 32: the
# batched update wins at N = 1000 (0.22 vs 0.33 ms), they tie at N = 4000 (0.37 vs 0.38 ms), and
# the kernel wins from there on (N = 16000: 2.2 vs 0.48 ms; N = 64000: 9.3 vs 0.94 ms).
_KERNEL_MIN_NUMEL = 4096


def resolve_update(update: str, params: torch.Tensor, *, compile: bool = False) -> str:
    """The update ``"auto"`` stands for, for member-major ``params[P, N]``; an explicit one is returned as is.

    ``"per-member"`` for CPU tensors of one member (a population training as one model) or of at
    least 4096 values per member, not compiled (reading the ``[P]`` hyperparameters on the host
    costs nothing there, and the fused kernel makes one pass where the batched update makes
    about ten); ``"batched"`` for several smaller members, where the per-call cost of P kernel
    calls dominates, when compiling, and on accelerators, where host reads would synchronise.

    Raises:
        ValueError: for an unknown update.
    """
    if update not in UPDATES:
        raise ValueError(f"BatchedAdamW: update must be one of {UPDATES}, got {update!r}")
    if update != "auto":
        return update
    kernel = (params.device.type == "cpu" and not compile
              and (params.shape[0] == 1 or params.shape[1] >= _KERNEL_MIN_NUMEL))
    return "per-member" if kernel else "batched"


@functools.cache
def _compiled_apply() -> Callable:
    return torch.compile(adamw_apply_, dynamic=False)


def adamw_update(update: str, *, compile: bool = False) -> Callable:
    """The AdamW step for a resolved ``update``: a function with :func:`adamw_step_`'s arguments.

    Args:
        update: ``"batched"`` or ``"per-member"`` (see :data:`UPDATES`; resolve ``"auto"`` with
            :func:`resolve_update` first).
        compile: Compile the elementwise half of the batched update with ``torch.compile``.

    Raises:
        ValueError: for another update, or ``compile`` with ``"per-member"``.
    """
    if update == "per-member":
        if compile:
            raise ValueError("adamw_update: the per-member kernel cannot be compiled")
        return adamw_kernel_step_
    if update != "batched":
        raise ValueError(f"adamw_update: update must be 'batched' or 'per-member', got {update!r}")
    return functools.partial(adamw_step_, apply=_compiled_apply()) if compile else adamw_step_


@contextlib.contextmanager
def keep_columns(tensors: Sequence[torch.Tensor], columns: Sequence[slice]):
    """Undo whatever the block writes into ``columns`` of each ``[P, N]`` tensor.

    Each entry is a ``slice`` (those columns of every row) or ``(rows, slice)`` (of the rows in
    the index tensor ``rows`` only).

    This is how an update skips the parameters that received no gradient, as
    ``torch.optim.AdamW`` skips a parameter whose ``.grad`` is ``None``: their values and moments
    stay exactly as they were (no weight decay, no moment decay). Nothing is copied when
    ``columns`` is empty.
    """
    saved = []
    for entry in columns:
        rows, c = (None, entry) if isinstance(entry, slice) else entry
        saved += [(t, rows, c, (t[:, c] if rows is None else t[rows, c]).clone()) for t in tensors]
    yield
    for t, rows, c, values in saved:
        if rows is None:
            t[:, c] = values
        else:
            t[rows, c] = values


class BatchedAdamW(torch.optim.Optimizer):
    """The population's optimizer: AdamW per member, over the stacked parameters.

    It behaves like a ``torch.optim.Optimizer`` (``step``, ``zero_grad``, ``state_dict``,
    ``load_state_dict``) whose parameters are the stacked ``[P, ...]`` tensors of a
    :class:`~vmapclan.PopulationModel`. The math is :func:`adamw_step_`; the hyperparameters
    are the ``[P]`` tensors of ``hyper``, which the clan rewrites in place at phase boundaries
    and selection. As in ``torch.optim.AdamW``, a parameter that received no gradient since the
    last ``zero_grad()`` is skipped (no weight decay, no moment update). While the members train
    as one model (:attr:`~vmapclan.PopulationModel.one_model`) it updates member 0's row only.

    Args:
        population: The :class:`~vmapclan.PopulationModel` to train.
        hyper: ``[P]`` hyperparameters on the population's device.
        num_grad_accum: Optional ``long [P]`` accumulation counts (also rewritten in place).
        max_grad_norm: Optional per-member gradient-norm clipping (see :func:`adamw_step_`).
        update: One of :data:`UPDATES` (default ``"auto"``: :func:`resolve_update` picks PyTorch's
            fused kernel per member on CPU for members of 4096 values or more, the batched tensor-op
            update otherwise, which reads nothing on the host).
        scales: Several param groups' lr and weight-decay multipliers over ``flat``'s columns
            (:func:`group_scales`); ``None`` (default) for one group.

    Note:
        ``zero_grad`` always zeroes in place (reusing the gradient buffer; ``set_to_none`` is
        accepted and ignored) and, with accumulation, zeroes only the members that have no
        micro-batches pending, so the usual ``step(); zero_grad()`` loop accumulates correctly.
    """

    def __init__(self, population, hyper: AdamWHyper, num_grad_accum: torch.Tensor | None = None,
                 max_grad_norm: float | None = None, update: str = "auto", scales: GroupScales | None = None):
        if max_grad_norm is not None:
            number_in(max_grad_norm, "BatchedAdamW: max_grad_norm", 0, math.inf, low_open=True, high_open=True,
                      expected="a positive number or None")
        super().__init__(list(population.parameters()), defaults={})
        self.population = population
        self.hyper = hyper
        self.num_grad_accum = num_grad_accum
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        #: The parameters' value counts, in ``flat``'s column order.
        self.param_sizes = tuple(shape.numel() for shape in population.shapes.values())
        flat = population.flat
        self.adamw_state = adamw_init(flat)._replace(
            skipped=torch.zeros(flat.shape[0], len(self.param_sizes), dtype=torch.float64, device=flat.device))
        #: Whether some parameter may have sat out an update (``adamw_state.skipped`` not all zero):
        #: only then do the bias corrections go per parameter. Set on the host, never read off the device.
        self.lagging = False
        if scales is not None and sum(scales.sizes) != population.numel:
            raise ValueError(f"BatchedAdamW: scales cover {sum(scales.sizes)} values, the population's members "
                             f"{population.numel}")
        self.scales = scales
        #: A factor on every member's lr at each update (the clan's time shape and competitive share), a
        #: 0-d tensor on the population's device, rewritten in place; ``None`` means 1.
        self.lr_factor: torch.Tensor | None = None
        #: The parameters (indices in ``flat``'s column order) that no update touches: see :meth:`freeze`.
        self.frozen: tuple[int, ...] = ()
        self._frozen_columns: list[slice] = []
        self._indices: dict[tuple, torch.Tensor] = {}  # index tensors of skip_, by the parameters they name
        self.update = update
        # The population's rows of the optimizer state are its own, kept in step with member 0's by it.
        population.register_member_state("optimizer", self.adamw_state._asdict())

    @property
    def update(self) -> str:
        """The resolved :data:`UPDATES` choice for the members trained apart; settable (``"auto"`` resolves again)."""
        return self._update

    @update.setter
    def update(self, update: str) -> None:
        flat = self.population.flat
        #: The update as asked for (``"auto"`` stays so: a grown population resolves it again).
        self.requested_update = update
        self._update = resolve_update(update, flat)
        #: The update for member 0's row alone, while the members train as one model.
        self.one_model_update = resolve_update(update, flat[:1])
        self._step = adamw_update(self._update)
        self._one_model_step = adamw_update(self.one_model_update)

    @classmethod
    def for_population(cls, population, settings: dict[str, float], *, accumulate: bool = False,
                       max_grad_norm: float | None = None, ratios: Sequence[tuple[float, float]] | None = None,
                       lr_factor: bool = False) -> BatchedAdamW:
        """The batched AdamW of ``population``, every member at ``settings`` until genes are written in.

        Args:
            population: The :class:`~vmapclan.PopulationModel`.
            settings: ``{gene name: value}`` of every AdamW setting (a ``torch.optim.AdamW``'s,
                :func:`~vmapclan.genome.optimizer_settings`).
            accumulate: Keep ``[P]`` gradient-accumulation counts (``num_grad_accum``, all 1).
            max_grad_norm: Per-member clipping.
            ratios: Each parameter's param-group multipliers (:func:`optimizer_ratios`).
            lr_factor: Keep a factor on every member's lr (:attr:`lr_factor`, 1 until written).
        """
        device, p = population.device, population.population_size
        hyper = AdamWHyper(**{field: torch.full((p,), settings[gene], dtype=torch.float64, device=device)
                              for gene, field in ADAMW_FIELDS.items()})
        accum = torch.ones(p, dtype=torch.long, device=device) if accumulate else None
        scales = None if ratios is None else group_scales(
            ratios, [shape.numel() for shape in population.shapes.values()], population.dtype, device)
        optimizer = cls(population, hyper, accum, max_grad_norm=max_grad_norm, scales=scales)
        if lr_factor:
            optimizer.lr_factor = torch.ones((), dtype=torch.float64, device=device)
        return optimizer

    @property
    def lr_in_force(self) -> torch.Tensor:
        """Every member's lr of the next update (the first param group's): the lr gene times :attr:`lr_factor`, ``[P]``.

        On the device: reading it is one host sync.
        """
        return self.hyper.lr if self.lr_factor is None else self.hyper.lr * self.lr_factor

    def set_genes(self, genes: dict[str, torch.Tensor], fixed: dict[str, float]) -> None:
        """Write the genes in force into the ``[P]`` hyperparameters, in place.

        Args:
            genes: ``{gene name: [P] tensor}``; an AdamW gene's values go to its hyperparameter,
                ``num_grad_accum``'s to the accumulation counts.
            fixed: ``{gene name: value}`` for the AdamW settings that are not genes.
        """
        with torch.no_grad():
            for gene, field in ADAMW_FIELDS.items():
                if gene in genes:
                    getattr(self.hyper, field).copy_(genes[gene])
                else:
                    getattr(self.hyper, field).fill_(fixed[gene])
            if GRAD_ACCUM_GENE in genes and self.num_grad_accum is not None:
                self.num_grad_accum.copy_(genes[GRAD_ACCUM_GENE])

    def freeze(self, params: Sequence[int]) -> None:
        """Skip ``params`` (indices in ``flat``'s column order) at every update until the next ``freeze``.

        A frozen parameter is skipped the way one without a gradient is (as ``torch.optim.AdamW``
        skips a ``.grad`` of ``None``): no update, no weight decay, its moments as they were, and
        the update counted as sat out (:meth:`skip_`), so its bias correction resumes where it
        stopped. ``freeze(())`` unfreezes everything.
        """
        columns = list(self.population.columns.values())
        bad = [k for k in params if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(columns)]
        if bad:
            raise ValueError(f"BatchedAdamW.freeze: parameter indices must be ints in [0, {len(columns)}), "
                             f"got {bad[0]!r}")
        self.frozen = tuple(dict.fromkeys(params))
        self._frozen_columns = [columns[k] for k in self.frozen]

    def skip_(self, params: Sequence[int], steps: torch.Tensor) -> None:
        """Count ``steps`` as updates sat out by ``params`` (``[P]``; member 0's ``[1]`` while training as one model).

        What a parameter that took no part in an update needs, so that its bias correction
        later resumes from its own step count (``torch.optim.AdamW`` never counts a step for
        a parameter without gradient): a frozen one, one without gradient, one added later.

        Args:
            params: Parameter indices, in ``flat``'s column order.
            steps: The updates each member applied meanwhile.
        """
        if len(params) == 0:
            return
        skipped = self.adamw_state.skipped
        key = tuple(params)
        if key not in self._indices:  # made once, before any CUDA graph captures a step that reads it
            self._indices[key] = torch.tensor(list(params), device=skipped.device)
        index = self._indices[key]
        rows = skipped[:steps.shape[0]]
        rows.index_add_(1, index, steps.to(skipped.dtype).view(-1, 1).expand(-1, len(index)).contiguous())
        self.lagging = True

    def apply_(self, grads, step: Callable | None = None, *, sizes: Sequence[int] | None = None) -> None:
        """Update every member from ``grads[P, N]`` (with accumulation: the summed micro-batches).

        The one place every training path (this optimizer's :meth:`step`, :class:`~vmapclan.FusedStep`)
        applies AdamW: with the hyperparameters and accumulation counts in force, skipping the
        parameters that received no gradient and the frozen ones (:meth:`freeze`).

        While the members train as one model, only member 0's row of everything is read and
        updated (``grads`` may then be that row alone, ``[1, N]``). With :attr:`lr_factor` set,
        every member's lr is multiplied by it.

        Args:
            grads: The gradients, e.g. the population's ``grad_flat``; with ``sizes``, one
                ``[P, ...]`` tensor per parameter, ``None`` for a parameter without gradient
                (only for the per-member kernel, see :func:`adamw_kernel_step_`).
            step: The AdamW implementation (default: this optimizer's, from ``update``, or for
                one model's row ``one_model_update``).
            sizes: The parameters' value counts, when ``grads`` comes per parameter.
        """
        pop = self.population
        params, state, hyper, accum = pop.flat, self.adamw_state, self.hyper, self.num_grad_accum
        if self.lr_factor is not None:
            hyper = hyper._replace(lr=hyper.lr * self.lr_factor)
        if pop.one_model:  # every member is a copy of member 0: update its row alone
            if sizes is not None:
                raise ValueError("BatchedAdamW.apply_: per-parameter gradients are for members trained apart")
            params, grads, hyper = params[:1], grads[:1], AdamWHyper(*(h[:1] for h in hyper))
            state = AdamWState(*(None if t is None else t[:1] for t in state))
            accum = None if accum is None else accum[:1]
            step = step or self._one_model_step
            pop.rows_stale = True
        step = step or self._step
        # Only with several groups or per-parameter counts, so that a step function without the
        # keywords still works.
        extra = {} if self.scales is None else {"scales": self.scales}
        if self.lagging:
            extra["param_sizes"] = self.param_sizes
        else:
            state = state._replace(skipped=None)  # every count is the member's: no per-parameter work
        # A frozen parameter's update is undone (keep_columns), as is that of one the backward did
        # not reach; both count as updates sat out.
        # With accumulation, after a backward that skipped a parameter, it is decided per member:
        # each updating member's own window of micro-batches (groups of rows and parameters).
        windows = None if accum is None or sizes is not None else pop.unreached_in_windows(state.accum_count, accum)
        if sizes is not None:  # a missing gradient is a None: the kernel skips it
            idle, unused = [k for k, g in enumerate(grads) if g is None], []
        elif windows is None:
            unused = pop.unused_columns()
            idle = [k for k, name in enumerate(pop.columns) if name not in pop.grad_seen] if unused else []
        else:
            idle, unused = [], []
        frozen = [(k, c) for k, c in zip(self.frozen, self._frozen_columns) if k not in idle]
        idle += [k for k, _ in frozen]
        unused += [c for _, c in frozen]
        columns = list(pop.columns.values())
        windows = [(rows, [k for k in ks if k not in idle]) for rows, ks in windows or []]
        unused += [(torch.tensor(rows, device=params.device), columns[k]) for rows, ks in windows for k in ks]
        before = state.step.clone() if idle or windows else None
        with keep_columns((params, state.exp_avg, state.exp_avg_sq), unused):
            if sizes is not None:
                step(params, grads, state, hyper, accum, self.max_grad_norm, sizes=sizes, **extra)
            else:
                step(params, grads, state, hyper, accum, self.max_grad_norm, **extra)
        if idle:
            self.skip_(idle, state.step - before)
        for rows, ks in windows:
            mask = torch.zeros_like(before)
            mask[rows] = 1.0
            self.skip_(ks, (state.step - before) * mask)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every member whose accumulation count is reached (every member without one).

        Args:
            closure: Optional callable that re-evaluates the loss (runs with grad enabled).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.population.restore_grad_views()
        self.apply_(self.population.grad_flat)
        return loss

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (of members with no pending micro-batches)."""
        self.population.restore_grad_views()
        release_gradients_(self.population, None if self.num_grad_accum is None else self.adamw_state.accum_count)

    def state_dict(self) -> dict:
        """The optimizer state as a plain dict of tensors (every member's rows up to date)."""
        self.population.sync_rows()
        return {name: t.clone() for name, t in self.adamw_state._asdict().items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict`, in place.

        Every entry is checked before any is copied, so a refused state leaves the optimizer as it was.
        """
        self.population.sync_rows()  # the parameters' rows must agree with the moments written into every row
        current = self.adamw_state._asdict()
        if "skipped" not in state_dict:  # a state saved before per-parameter step counts: none sat out
            state_dict = {**state_dict, "skipped": torch.zeros_like(current["skipped"])}
        for name, t in current.items():
            if name not in state_dict:
                raise ValueError(f"BatchedAdamW.load_state_dict: missing {name!r}")
            src = state_dict[name]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"BatchedAdamW.load_state_dict: {name!r} must be a tensor, got {type(src).__name__}")
            if src.shape != t.shape:
                raise ValueError(
                    f"BatchedAdamW.load_state_dict: {name!r} has shape {list(src.shape)}, expected {list(t.shape)}"
                )
            if name in ("step", "skipped", "accum_count") and bool((src < 0).any()):
                raise ValueError(f"BatchedAdamW.load_state_dict: {name!r} holds a negative count")
        for name, t in current.items():
            t.copy_(state_dict[name])
        self.lagging = bool(self.adamw_state.skipped.any())


def optimizer_ratios(optimizer, model) -> list[tuple[float, float]] | None:
    """Check the user's model and optimizer; return each trainable parameter's group ``(lr, wd)`` ratios, in model order.

    The batched AdamW stands for ``torch.optim.AdamW`` (or ``torch.optim.Adam`` without weight
    decay) with any number of param groups: their lr and weight decay relative to the first
    group's become per-column multipliers (:func:`group_scales`). An optimizer that has stepped
    already gets a warning: the clan takes its settings, not its state.

    Raises:
        TypeError: for another optimizer.
        ValueError: for amsgrad or maximize, Adam's L2 weight decay, or parameters missing from it
            or foreign to the model; a model without an optimizer or the other way round (``None``
            for both is a genome-only clan: no ratios)."""
    if model is None:
        if optimizer is not None:
            raise ValueError("Clan: an optimizer was given without a model")
        return None
    if optimizer is None:
        raise ValueError("Clan: a model needs its optimizer (a torch.optim.AdamW over its parameters)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Clan: model must be an nn.Module, got {type(model).__name__}")
    if not is_adamw(optimizer):
        raise TypeError(
            f"Clan: the optimizer must be torch.optim.AdamW or torch.optim.Adam (the population trains with a "
            f"batched AdamW), got {type(optimizer).__name__}"
        )
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    for k, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"Clan: AdamW({flag}=True) is not supported by the batched AdamW")
        if not decoupled and not group.get("decoupled_weight_decay") and group["weight_decay"] != 0:
            # torch's Adam adds weight_decay * p to the gradient (L2), before the moments: another update.
            raise ValueError(
                f"Clan: torch.optim.Adam(weight_decay={group['weight_decay']}) adds the decay to the gradient (L2), "
                "which the batched AdamW does not do; use torch.optim.AdamW (decoupled weight decay) or Adam with "
                f"weight_decay=0 (param group {k})"
            )
    ratios = group_ratios(optimizer)
    group_of: dict[int, int] = {}
    for k, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = k
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in group_of]
    if missing:
        raise ValueError(f"Clan: parameters missing from the optimizer: {missing}")
    # Frozen parameters may sit in the optimizer (AdamW(model.parameters())): torch skips them, and so does the clan.
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    strangers = [i for i in group_of if i not in trainable and i not in frozen]
    if strangers:
        raise ValueError(f"Clan: the optimizer holds {len(strangers)} tensors that are not parameters of the model")
    if any(optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]):
        warnings.warn("Clan: the optimizer has stepped already, and its state (moments, step counts) is not carried "
                      "over: the clan's AdamW starts afresh from the model's weights and the optimizer's settings",
                      stacklevel=3)
    return [ratios[group_of[i]] for i in trainable]
