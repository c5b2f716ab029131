"""Growing a population's model mid-run, every member's state carried over (the model plane's growth).

:func:`grow_population` builds the population of the grown model and its batched AdamW from the
old ones: each member grown by the same function from the same random state (copies stay
copies), then stacked again (:func:`~vmapclan.population.stack_members`), with every member's
weights, gradients, buffers, AdamW moments, step and accumulation counts kept, and the new
parameters starting as a parameter added to a ``torch.optim.AdamW`` does: zero moments and their
own step count at 0. :meth:`vmapclan.Clan.grow` calls it between rounds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .optim import BatchedAdamW, group_scales
from .population import PopulationModel, check_growth, stack_members

__all__ = ["grow_population"]


def _grown_members(old: PopulationModel, fn: Callable[[nn.Module], nn.Module], device: torch.device,
                   who: str) -> list[nn.Module]:
    """Every member of ``old`` as a plain module, grown by ``fn`` from the same global random state."""
    cuda = device.type == "cuda"
    rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    grown = []
    for i in range(old.population_size):
        torch.set_rng_state(rng)  # the same draws for every member: copies stay copies
        if cuda:
            torch.cuda.set_rng_state(cuda_rng, device)
        before = old.member_module(i)
        template = copy.deepcopy(before) if i == 0 else None  # fn may grow its argument in place
        after = fn(before)
        if template is not None:
            check_growth(template, after, who)
        grown.append(after.to(device))
    return grown


def grow_population(old: PopulationModel, optimizer: BatchedAdamW, fn: Callable[[nn.Module], nn.Module], *,
                    device: torch.device, who: str = "Clan.grow") -> tuple[PopulationModel, BatchedAdamW]:
    """The population of every member grown by ``fn``, and its AdamW, with all the old state carried over.

    ``fn(module)`` gets each member as a plain module and returns it grown: every existing
    parameter and buffer kept under its name and shape (:func:`~vmapclan.population.check_growth`),
    new ones added and initialised by ``fn``. New parameters join the first param group (the one
    the genes stand for): lr and decay multipliers 1.

    Args:
        old: The population (its rows brought up to date first).
        optimizer: Its batched AdamW: the new one shares its ``[P]`` hyperparameters, accumulation
            counts and lr factor (the same tensors: whoever writes them keeps writing them).
        fn: ``fn(module) -> nn.Module``.
        device: Where the members live.
        who: The caller, for the messages.

    Returns:
        ``(population, optimizer)``.

    Raises:
        ValueError: for a grown model that drops or reshapes a tensor, or adds nothing.
        TypeError: if ``fn`` returns something other than an ``nn.Module``.
    """
    old.sync_rows()
    old.restore_grad_views()
    new = stack_members(_grown_members(old, fn, device, who), device=device)
    pairs = [(old.columns[n], c) for n, c in new.columns.items() if n in old.columns]
    if optimizer.scales is None:
        ratios = [(1.0, 1.0)] * len(new.columns)
    else:  # a new parameter joins the first group: multipliers 1
        before_ratios = dict(zip(old.columns, optimizer.scales.ratios))
        ratios = [before_ratios.get(n, (1.0, 1.0)) for n in new.columns]
    scales = group_scales(ratios, [new.shapes[n].numel() for n in new.columns], new.dtype, device)
    grown = BatchedAdamW(new, optimizer.hyper, optimizer.num_grad_accum, max_grad_norm=optimizer.max_grad_norm,
                         update=optimizer.requested_update, scales=scales)
    grown.lr_factor = optimizer.lr_factor
    old_names, new_index = list(old.columns), {name: k for k, name in enumerate(new.columns)}
    grown.freeze([new_index[old_names[k]] for k in optimizer.frozen])  # the same parameters stay frozen
    state, grown_state = optimizer.adamw_state, grown.adamw_state
    with torch.no_grad():
        grown_state.step.copy_(state.step)
        grown_state.accum_count.copy_(state.accum_count)
        # A new parameter has taken no update yet: its bias correction starts from its own step 0.
        old_index = {n: k for k, n in enumerate(old.columns)}
        for k, name in enumerate(new.columns):
            grown_state.skipped[:, k] = state.skipped[:, old_index[name]] if name in old_index else state.step
        grown.lagging = optimizer.lagging or len(new.columns) > len(old.columns)
        for source, target in ((old.grad_flat, new.grad_flat), (state.exp_avg, grown_state.exp_avg),
                               (state.exp_avg_sq, grown_state.exp_avg_sq)):
            for before_columns, after_columns in pairs:
                target[:, after_columns].copy_(source[:, before_columns])
    new.grad_seen, new.grad_reached = set(old.grad_seen), set(old.grad_reached)
    # The log of names stays behind: a window that reaches back before the growth counts what was reached since.
    new.partial_backwards = old.partial_backwards
    new.train(old.training)
    new.one_model = old.one_model
    return new, grown
