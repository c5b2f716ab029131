"""The README's training step and round-end validation, written once for the tests that run or compare against them."""

import torch

from vmapclan import member_loss


def train_step(member, loss_fn, *batch, key=None, **model_kwargs):
    """One step of the plain loop: each member's loss, backward inside ``sync_context()``,
    ``optimizer.step()``, ``zero_grad()`` and ``member.step()``.

    Args:
        member: The round's member.
        loss_fn: One member's loss, ``loss_fn(output, target)``.
        *batch: The model's positional inputs, then the target, each ``[P, B, ...]``.
        key: What ``loss_fn`` takes of a dict-like output (``member_loss``'s ``key``).
        **model_kwargs: The model's keyword inputs, each ``[P, B, ...]``.

    Returns:
        The ``[P]`` losses (before the update).
    """
    *inputs, y = batch
    loss = member_loss(loss_fn, member.model(*inputs, **model_kwargs), y, key=key)
    with member.sync_context():
        loss.sum().backward()
    member.optimizer.step()
    member.optimizer.zero_grad()
    member.step()
    return loss


def validation_losses(member, loss_fn, x_val, y_val):
    """The README's round end: every member's ``[P]`` loss on shared validation data, in eval mode
    without gradients; the model is back in training mode afterwards."""
    member.model.eval()
    with torch.no_grad():
        val = member_loss(loss_fn, member.model(member.share(x_val)), member.share(y_val))
    member.model.train()
    return val


def train_to_the_end(clan, loss_fn, train, x_val, y_val, batch_size):
    """The README's whole loop for a clan with a horizon: epochs of its loader until ``clan.done``.

    Returns:
        The ``[P]`` training losses of every step, in order.
    """
    loader = clan.loader(train, batch_size=batch_size)
    member, losses = clan.round(), []
    while not clan.done:
        for batch in loader:
            losses.append(train_step(member, loss_fn, *batch).detach())
            if member.done:
                clan.step(validation_losses(member, loss_fn, x_val, y_val))
                member = clan.round()
                if clan.done:
                    break
    return losses
