"""The gradient path: what every training step does with its gradients around the AdamW update.

Every way of training a clan (the ``Member`` loop, :class:`~vmapclan.FusedStep`, the training
machine, Lightning) runs the same three steps, written here once:

1. :func:`reduce_gradients_`: this step's gradients are added to the member's pending
   micro-batches (gradient accumulation) and, in the cooperative phase, averaged over the members,
   so identical members take identical updates (data-parallel training at batch ``P x B``);
2. the AdamW update (:meth:`~vmapclan.BatchedAdamW.apply_`), which divides by the micro-batch
   count, clips each member's gradient and skips the parameters that received no gradient;
3. :func:`release_gradients_`: the members with no micro-batch pending start from zero again.
"""

from __future__ import annotations

import torch

__all__ = ["member_mean", "reduce_gradients_", "release_gradients_", "share_pending_sums_"]


def member_mean(grads: torch.Tensor, group=None) -> torch.Tensor:
    """The mean over the member dimension, broadcast back to every member as a view: ``[P, ...]``.

    With ``group`` (a :class:`~vmapclan.distributed.ClanGroup`, whose ranks hold equally many
    members) the mean is over every member of every rank: each rank's mean, summed over the
    ranks by one all-reduce, divided by their number.
    """
    mean = grads.mean(0, keepdim=True)
    if group is not None:
        mean = group.all_reduce_(mean.contiguous(), "the cooperative gradient all-reduce").div_(group.world_size)
    return mean.expand_as(grads)


def reduce_gradients_(grads: torch.Tensor, grad_buffer: torch.Tensor, *, cooperative: bool, accumulating: bool,
                      keep: bool = False, group=None) -> torch.Tensor:
    """The gradients the update reads: ``grads`` with the pending micro-batches, averaged when cooperating.

    Args:
        grads: ``[P, N]`` this step's gradients; may be ``grad_buffer`` itself (a backward that
            accumulated into it).
        grad_buffer: ``[P, N]`` the population's gradient buffer (``grad_flat``), which holds the
            partial sums of accumulation.
        cooperative: Average over the members.
        accumulating: Gradient accumulation is on: the sums live in ``grad_buffer``.
        keep: The buffer must hold the result (the user can read ``.grad``): average in place
            rather than into a view.
        group: The ranks that share the population (:class:`~vmapclan.distributed.ClanGroup`):
            the cooperative average spans their members too (see :func:`member_mean`).

    Returns:
        ``[P, N]``: the gradient sums to update from (``grad_buffer``, or a view when nothing
        needs to be kept).
    """
    if accumulating:
        if grads is not grad_buffer:
            grad_buffer.add_(grads)
        grads, keep = grad_buffer, True  # the pending sums must be averaged too
    if not cooperative:
        return grads
    if keep and grads is grad_buffer:
        grad_buffer.copy_(member_mean(grad_buffer, group))
        return grad_buffer
    return member_mean(grads, group)


def release_gradients_(population, accum_count: torch.Tensor | None = None) -> None:
    """After an update: zero the gradients of the members with no micro-batch pending (all, without accumulation).

    Without accumulation this is also where the record of which parameters received a gradient
    starts afresh (see :meth:`~vmapclan.PopulationModel.unused_columns`).

    While the members train as one model (:attr:`~vmapclan.PopulationModel.one_model`) only
    member 0's row is in use, and only it is zeroed.

    Args:
        population: The :class:`~vmapclan.PopulationModel`.
        accum_count: ``long [P]`` micro-batches pending per member, or ``None`` without accumulation.
    """
    grads = population.grad_flat[:1] if population.one_model else population.grad_flat
    reached, population.grad_reached = population.grad_reached, set()
    if accum_count is None:
        grads.zero_()
        population.grad_seen.clear()
        return
    grads.masked_fill_((accum_count[:grads.shape[0]] == 0).view(-1, 1), 0)
    # With accumulation the record runs on (a member's window may begin anywhere), with a log of
    # what each update's backwards reached (see PopulationModel.unreached_in_windows).
    population.reached_log.append(frozenset(reached))


def share_pending_sums_(grad_row: torch.Tensor, group) -> None:
    """Before a backward whose one-model gradient row is summed over the ranks: divide its pending sums by ``W``.

    With gradient accumulation, member 0's row holds the sum of the earlier micro-batches,
    already the same on every rank; the all-reduce after the backward adds every rank's row, so
    each rank contributes ``1 / W`` of it and the sum stays what it was.

    Args:
        grad_row: Member 0's row of ``grad_flat``.
        group: The :class:`~vmapclan.distributed.ClanGroup`.
    """
    with torch.no_grad():
        grad_row.div_(group.world_size)
