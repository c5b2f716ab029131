"""Selection as index arithmetic: who copies whom at the end of a round.

Each function returns ``sources``, a ``long[P]`` tensor: member ``i`` takes the weights,
buffers and optimizer state of member ``sources[i]`` (a tensor gather over the member
dimension). They run on the host on ``[P]`` values, once per round.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rank", "winner_sources", "truncation_sources"]


def rank(losses: torch.Tensor) -> list[int]:
    """Members ordered best first: lowest loss, non-finite (NaN, +inf, -inf) last, ties to the lowest index.

    Example:
        >>> rank(torch.tensor([0.5, float("nan"), 0.2, 0.2]))
        [2, 3, 0, 1]
    """
    values = losses.detach().to("cpu", torch.float64).tolist()
    return sorted(range(len(values)), key=lambda i: (not math.isfinite(values[i]), values[i] if math.isfinite(values[i]) else 0.0, i))


def winner_sources(order: list[int]) -> torch.Tensor:
    """Everyone takes the best member: ``[order[0]] * P``."""
    return torch.full((len(order),), order[0], dtype=torch.long)


def truncation_sources(order: list[int], fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Classic PBT truncation: the bottom ``fraction`` copy random members of the top ``fraction``.

    At least one member is replaced (when P >= 2); everyone else keeps itself.

    Args:
        order: Members best first, from :func:`rank`.
        fraction: In (0, 0.5].
        generator: CPU generator choosing which top member each bottom member copies.
    """
    p = len(order)
    sources = torch.arange(p)
    k = min(max(1, int(fraction * p)), p // 2)
    if k == 0:
        return sources
    top, bottom = order[:k], order[p - k:]
    picks = torch.randint(k, (k,), generator=generator)
    for member, pick in zip(bottom, picks.tolist()):
        sources[member] = top[pick]
    return sources
