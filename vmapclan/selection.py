"""Selection as index arithmetic: who copies whom at the end of a round.

Each function returns ``sources``, a ``long[P]`` tensor: member ``i`` takes the weights,
buffers and optimizer state of member ``sources[i]`` (a tensor gather over the member
dimension). They run on the host on ``[P]`` values, once per round.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Ranking", "rank", "winner_sources", "truncation_sources"]


class Ranking(list):
    """Members best first (a list), knowing how many of them have a finite loss (``finite``)."""

    finite: int

    def __init__(self, order, finite: int):
        super().__init__(order)
        self.finite = finite


def rank(losses: torch.Tensor) -> Ranking:
    """Members ordered best first: lowest loss, non-finite (NaN, +inf, -inf) last, ties to the lowest index.

    Example:
        >>> order = rank(torch.tensor([0.5, float("nan"), 0.2, 0.2]))
        >>> order, order.finite
        ([2, 3, 0, 1], 3)
    """
    values = losses.detach().to("cpu", torch.float64).tolist()
    order = sorted(range(len(values)), key=lambda i: (not math.isfinite(values[i]), values[i] if math.isfinite(values[i]) else 0.0, i))
    return Ranking(order, sum(math.isfinite(v) for v in values))


def winner_sources(order: list[int]) -> torch.Tensor:
    """Everyone takes the best member: ``[order[0]] * P``."""
    return torch.full((len(order),), order[0], dtype=torch.long)


def truncation_sources(order: list[int], fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Classic PBT truncation: the bottom ``fraction`` copy random members of the top ``fraction``.

    At least one member is replaced (when P >= 2), and every member whose loss is not finite
    is, however many there are (a diverged member never survives selection); the members it
    copies all have finite losses. Everyone else keeps itself.

    Args:
        order: Members best first, from :func:`rank` (a plain list counts every loss as finite).
        fraction: In (0, 0.5].
        generator: CPU generator choosing which top member each replaced member copies.
    """
    p = len(order)
    sources = torch.arange(p)
    finite = getattr(order, "finite", p)
    k = min(max(1, int(fraction * p)), p // 2)
    if k == 0 or finite == 0:
        return sources
    top, bottom = order[:min(k, finite)], order[min(p - k, finite):]
    picks = torch.randint(len(top), (len(bottom),), generator=generator)
    for member, pick in zip(bottom, picks.tolist()):
        sources[member] = top[pick]
    return sources
