"""How a clan's members train as one data-parallel model: gradient averaging, its checks, and one model's work.

While the members are identical (a cooperative phase), the population trains one model,
member 0 (:attr:`~vmapclan.PopulationModel.one_model`), on every member's shard: the backward
lands in member 0's gradient, which :meth:`Cooperation.sync_context` averages over the members
(and, across ranks, sums over them). Backward hooks refuse a backward that would let identical
members drift apart: one outside ``sync_context`` while cooperating, or one that reaches the
stacked ``[P, ...]`` parameters while the members train as one model.
"""

from __future__ import annotations

import contextlib

import torch

from .gradients import reduce_gradients_, share_pending_sums_
from .rounds import COOPERATIVE

__all__ = ["Cooperation"]


class Cooperation:
    """The gradient averaging of one clan and the checks around it (the clan's :meth:`~vmapclan.Clan.sync_context`).

    Args:
        clan: The :class:`~vmapclan.Clan` (read through its public attributes: ``phase``,
            ``selection``, ``population``, ``optimizer``, ``group``, ``population_size``).
    """

    def __init__(self, clan):
        self._clan = clan
        self.syncing = False  # inside sync_context: a backward here is averaged
        self.averaging = False  # inside a cooperative sync_context while the members train as one model

    def bind(self, population) -> None:
        """Install the backward checks and the averaging of member 0's gradient on ``population``."""
        for leaf in population.parameters():
            leaf.register_post_accumulate_grad_hook(self._check_stacked_backward)
        for leaf in population.module_params.values():
            leaf.register_hook(self._average_over_members)
            leaf.register_post_accumulate_grad_hook(self._check_backward_synced)

    def train_as_one(self, on: bool) -> None:
        """Turn training the (identical) members as one model on or off; off brings every row up to date."""
        clan = self._clan
        population = clan.population
        if population is None:
            return
        on = on and clan.selection == "winner"  # only winner selection keeps every member a copy of one
        if population.one_model and not on:
            population.sync_rows()
        population.one_model = on

    def _check_backward_synced(self, _leaf) -> None:
        if (self._clan.phase == COOPERATIVE or self._clan.population.one_model) and not self.syncing:
            raise RuntimeError(
                "backward ran outside member.sync_context() in the cooperative phase: members would drift apart; "
                "wrap it as `with member.sync_context(): loss.sum().backward()`"
            )

    def _check_stacked_backward(self, leaf) -> None:
        if self._clan.population.one_model:
            raise RuntimeError(
                "a backward reached the stacked [P, ...] parameters while the members train as one model (the "
                "cooperative phase), e.g. through a penalty on member.model.parameters(); compute the loss from "
                "member.model's output, and a term on the weights with member.model.weight_term(fn), which "
                "gives every member its own term in either phase"
            )
        self._check_backward_synced(leaf)

    def _average_over_members(self, grad: torch.Tensor) -> torch.Tensor | None:
        # Member 0's weights ran every member's shard, so its gradient is the members' sum:
        # inside a cooperative sync_context that is averaged as it arrives.
        return grad / self._clan.population_size if self.averaging else None

    @contextlib.contextmanager
    def sync_context(self, *, cooperative: bool | None = None):
        """Context for ``backward()``: on exit, the gradients averaged over the members when cooperating.

        Args:
            cooperative: Whether to average; default: whether the clan's step is cooperative, or
                the members train as one model.
        """
        clan = self._clan
        pop, group = clan.population, clan.group
        one_model = pop is not None and pop.one_model
        if cooperative is None:  # members trained as one model always cooperate (see Clan.cooperate)
            cooperative = clan.phase == COOPERATIVE or one_model
        syncing, self.syncing = self.syncing, True
        averaging, self.averaging = self.averaging, cooperative and one_model
        across = group is not None and pop is not None and cooperative and one_model
        if across and clan.optimizer.num_grad_accum is not None:
            share_pending_sums_(pop.grad_flat[0], group)
        try:
            yield
        finally:
            self.syncing, self.averaging = syncing, averaging
        if across:
            # Member 0's gradient holds this rank's members' share of the mean (the hook divided by
            # the whole population's size): the sum over the ranks is the mean over every member.
            group.all_reduce_(pop.grad_flat[0], "the cooperative gradient all-reduce")
        if pop is not None and cooperative and not one_model:
            # After a user's ``p.grad = None`` the backward wrote fresh tensors, not grad_flat:
            # bring them back first, or the average misses them and the members drift apart.
            pop.restore_grad_views()
            with torch.no_grad():
                reduce_gradients_(pop.grad_flat, pop.grad_flat, cooperative=True, accumulating=False, keep=True,
                                  group=group)
