"""The README's training step, written once for the tests that run or compare against it."""

from vmapclan import member_loss


def train_step(member, loss_fn, x, y):
    """One step of the plain loop: each member's loss, backward inside ``sync_context()``,
    ``optimizer.step()``, ``zero_grad()`` and ``member.step()``.

    Returns:
        The ``[P]`` losses (before the update).
    """
    loss = member_loss(loss_fn, member.model(x), y)
    with member.sync_context():
        loss.sum().backward()
    member.optimizer.step()
    member.optimizer.zero_grad()
    member.step()
    return loss
