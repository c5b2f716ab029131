"""Selection as index arithmetic: who copies whom at the end of a round.

Each function returns ``sources``, a ``long[P]`` tensor: member ``i`` takes the weights,
buffers and optimizer state of member ``sources[i]`` (a tensor gather over the member
dimension). They run on the host on ``[P]`` values, once per round. :func:`select` is the whole
rule of a round's end as one pure function: the losses and genomes in, who copies whom, the new
incumbent and the next generation's genomes out (as an ask-tell strategy's ``tell``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .genome import Gene, mutate, offspring

__all__ = ["TIE_TOLERANCE", "Ranking", "rank", "member_means", "truncation_sources", "PairedChoice", "paired_winner",
           "student_t_cdf", "Selection", "select", "check_val_losses"]


class Ranking(list):
    """Members best first (a list), knowing how many of them have a finite loss (``finite``)."""

    finite: int

    def __init__(self, order, finite: int):
        super().__init__(order)
        self.finite = finite


#: Losses this close (relative) are a tie: the same members' losses computed by vmap over another
#: number of members (another world size, another chunking) differ in their last bits, and a tie
#: must go the same way whatever computed it.
TIE_TOLERANCE = 1e-6


def rank(losses: torch.Tensor) -> Ranking:
    """Members ordered best first: lowest loss, non-finite (NaN, +inf, -inf) last, ties to the lowest index.

    Losses within :data:`TIE_TOLERANCE` (relative) of the best of a group are a tie: the group
    goes in index order, so the ranking does not depend on float rounding.

    Example:
        >>> order = rank(torch.tensor([0.5, float("nan"), 0.2, 0.2]))
        >>> order, order.finite
        ([2, 3, 0, 1], 3)
        >>> rank(torch.tensor([0.3, 0.2 + 1e-9, 0.2], dtype=torch.float64))  # a tie within rounding
        [1, 2, 0]
    """
    values = losses.detach().to("cpu", torch.float64).tolist()
    finite = sorted((v, i) for i, v in enumerate(values) if math.isfinite(v))
    order = []
    while finite:
        head = finite[0][0]
        ties = [i for v, i in finite if v - head <= TIE_TOLERANCE * abs(head)]  # a prefix: sorted by value
        order += sorted(ties)
        finite = finite[len(ties):]
    order += [i for i, v in enumerate(values) if not math.isfinite(v)]
    return Ranking(order, sum(math.isfinite(v) for v in values))


def member_means(losses: torch.Tensor) -> torch.Tensor:
    """Each member's loss from paired losses ``[P, K]``: its row's mean, NaN if any value of the row is not finite.

    A member that diverged on one sample is diverged: it ranks last (:func:`rank`).

    Example:
        >>> member_means(torch.tensor([[1.0, 3.0], [0.0, float("inf")]]))
        tensor([2., nan])
    """
    return torch.where(torch.isfinite(losses).all(1), losses.mean(1), torch.tensor(math.nan, dtype=losses.dtype))


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


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t distribution with ``df`` degrees of freedom.

    Example:
        >>> round(student_t_cdf(2.228, 10), 4)  # the two-sided 5% point of t(10)
        0.975
    """
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


class PairedChoice(NamedTuple):
    """What :func:`paired_winner` decided.

    Attributes:
        winner: The member everyone takes: the best significant challenger, or 0 (the control).
        challenger: The challenger with the lowest mean loss (``None`` when none is finite).
        gain: Its mean paired gain over the control (control's loss minus its own; > 0 is better).
        confidence: Its one-sided confidence that the gain is positive (paired t-test).
        needed: The confidence a challenger needed: ``1 - (1 - confidence) / (P - 1)`` (Bonferroni).
    """

    winner: int
    challenger: int | None
    gain: float
    confidence: float
    needed: float


def paired_winner(losses: torch.Tensor, confidence: float) -> PairedChoice:
    """Winner selection that keeps the control unless a challenger's gain is significant.

    Member 0 is the control (it trained with the unmutated incumbent genome); members 1 to P-1
    are challengers, and every member was scored on the same samples, so each column of
    ``losses`` pairs them. For challenger ``i`` the paired differences ``losses[0] - losses[i]``
    give a mean gain and, by a one-sided paired t-test, the confidence that the gain is
    positive. A challenger is adopted only when that confidence reaches
    ``1 - (1 - confidence) / (P - 1)``, so that the chance of adopting any challenger whose true
    gain is zero stays below ``1 - confidence`` however many there are (Bonferroni). Of the
    adopted ones, the lowest mean loss wins (ties to the lowest index). A challenger whose losses
    are not all finite is never adopted. If the control's own losses are not all finite, the
    finite member with the lowest mean wins (as :func:`rank` orders them).

    Args:
        losses: ``[P, K]`` losses: ``K >= 2`` paired columns (samples or blocks of samples).
        confidence: The family-wise confidence, in (0, 1).

    Returns:
        A :class:`PairedChoice`.

    Raises:
        ValueError: for a tensor that is not ``[P, K]`` with ``P >= 2`` and ``K >= 2``, or a
            confidence outside (0, 1).

    Example:
        >>> base = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> paired_winner(torch.stack([base, base - 0.5, base + 0.01 * torch.tensor([1., -1, 1, -1])]), 0.9).winner
        1
    """
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ValueError(f"paired_winner: confidence must be a float in (0, 1), got {confidence!r}")
    if losses.dim() != 2 or losses.shape[0] < 2 or losses.shape[1] < 2:
        raise ValueError(f"paired_winner: losses must have shape [P, K] with P >= 2 members and K >= 2 paired "
                         f"values, got {list(losses.shape)}")
    values = losses.detach().to("cpu", torch.float64)
    p, k = values.shape
    means = member_means(values)
    finite = torch.isfinite(means)
    needed = 1.0 - (1.0 - confidence) / (p - 1)
    order = rank(means)
    if not bool(finite[0]):
        return PairedChoice(order[0] if bool(finite.any()) else 0, None, math.nan, math.nan, needed)
    gains = values[0] - values  # [P, K]: > 0 where the challenger did better
    mean_gain = gains.mean(1)
    sd = gains.std(1, correction=1)
    confidences = []
    for i in range(p):
        if i == 0 or not bool(finite[i]):
            confidences.append(0.0)
        elif sd[i] == 0:
            confidences.append(1.0 if mean_gain[i] > 0 else 0.0 if mean_gain[i] < 0 else 0.5)
        else:
            confidences.append(student_t_cdf(float(mean_gain[i] / (sd[i] / math.sqrt(k))), k - 1))
    challengers = [i for i in order if i != 0 and bool(finite[i])]
    adopted = [i for i in challengers if confidences[i] >= needed and mean_gain[i] > 0]
    best = challengers[0] if challengers else None
    return PairedChoice(adopted[0] if adopted else 0, best,
                        float(mean_gain[best]) if best is not None else math.nan,
                        confidences[best] if best is not None else math.nan, needed)


class Selection(NamedTuple):
    """What a round's end decided (:func:`select`).

    Attributes:
        winner: The member whose genome becomes the incumbent.
        sources: ``long[P]``: member ``i`` takes member ``sources[i]``'s state.
        incumbent: ``{name: 0-d tensor}``, the winner's genes.
        genomes: ``{name: tensor[P]}``, the next round's genomes.
        record: The round's record: ``genomes`` (the round's, as lists), ``val_losses`` (each
            member's), ``winner``, ``incumbent`` (as numbers), and with ``confidence`` the best
            ``challenger``, its ``gain`` and its ``confidence``.
    """

    winner: int
    sources: torch.Tensor
    incumbent: dict
    genomes: dict
    record: dict


def select(losses: torch.Tensor, genomes: Mapping[str, torch.Tensor], specs: Mapping[str, Gene],
           generator: torch.Generator, *, selection: str | None = "winner", truncation_fraction: float = 0.25,
           confidence: float | None = None) -> Selection:
    """Select on a round's validation losses and make the next generation.

    ``losses`` is ``[P]`` or paired ``[P, K]`` (a member's loss is its row's mean,
    :func:`member_means`); at least one must be finite. The best member (:func:`rank`; with
    ``confidence``, :func:`paired_winner`) gives its genes to the incumbent. Then:

    - ``"winner"``: everyone takes the winner's state; member 0 keeps the incumbent genome,
      the others mutate it (:func:`~vmapclan.genome.offspring`);
    - ``"truncation"``: the bottom quantile copies the top (:func:`truncation_sources`), and
      the members that copied mutate what they copied;
    - ``None``: nobody copies anyone; the genomes stay (a diverged member stays diverged).

    Without selection the record lists the members whose loss is not finite as
    ``diverged_members``, when any is (with selection they are replaced).

    Args:
        losses: ``[P]`` or ``[P, K]`` (float64, on the CPU).
        genomes: The round's genomes, ``{name: tensor[P]}``.
        specs: The gene specs.
        generator: The CPU generator the draws come from, in a fixed order.
        selection: ``"winner"``, ``"truncation"`` or ``None``.
        truncation_fraction: The quantile for ``"truncation"``.
        confidence: With ``"winner"`` and paired losses: the paired test's family-wise confidence.

    Example:
        >>> genes = {"lr": Gene(1e-4, 1.0, init=1e-2)}
        >>> losses = torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64)
        >>> out = select(losses, {"lr": torch.tensor([1e-2, 2e-2, 5e-3], dtype=torch.float64)}, genes,
        ...              torch.Generator().manual_seed(0))
        >>> out.winner, out.sources.tolist(), out.incumbent["lr"].item(), out.genomes["lr"][0].item()
        (1, [1, 1, 1], 0.02, 0.02)
        >>> out.record["val_losses"], out.record["winner"]
        ([0.5, 0.2, 0.9], 1)
    """
    means = member_means(losses) if losses.dim() == 2 else losses
    order = rank(means)
    p = len(order)
    used = {n: v.tolist() for n, v in genomes.items()}
    winner, choice = order[0], None
    if confidence is not None:
        choice = paired_winner(losses, confidence)
        winner = choice.winner
    identity = torch.arange(p)
    incumbent = {n: v[winner].clone() for n, v in genomes.items()}
    if selection == "winner":
        sources = torch.full((p,), winner, dtype=torch.long)
        genomes = offspring(incumbent, specs, generator, p)
    elif selection == "truncation":
        sources = truncation_sources(order, truncation_fraction, generator)
        genomes = mutate({n: v[sources] for n, v in genomes.items()}, specs, generator, mask=sources != identity)
    else:
        sources = identity
        genomes = dict(genomes)
    record = {"genomes": used, "val_losses": means.tolist(), "winner": winner,
              "incumbent": {n: v.item() for n, v in incumbent.items()}}
    if selection == "truncation":  # who copied whom: the lineage a schedule's export follows
        record["sources"] = sources.tolist()
    if selection is None and order.finite < p:  # said plainly: without selection it stays diverged to the end
        record["diverged_members"] = sorted(order[order.finite:])
    if choice is not None:
        record.update(challenger=choice.challenger, gain=choice.gain, confidence=choice.confidence)
    return Selection(winner, sources, incumbent, genomes, record)


def check_val_losses(val_losses, members: int, *, paired_test: bool, population_size: int | None = None) -> torch.Tensor:
    """``val_losses`` as ``float64`` on the CPU, refused unless it holds ``members`` members' losses.

    Args:
        val_losses: ``[members]`` or ``[members, K]`` (anything ``torch.as_tensor`` takes).
        members: The members the caller holds (a rank's, in a clan across ranks).
        paired_test: The paired test needs ``[members, K]`` with ``K >= 2``.
        population_size: The whole clan's P, when ``members`` is a rank's share (for the message).

    Raises:
        TypeError: for something that is not a tensor of real numbers.
        ValueError: for another shape, naming the expected one.
    """
    expected = f"[{members}, K] (paired losses)" if paired_test else f"[{members}] or [{members}, K]"
    if not isinstance(val_losses, torch.Tensor):
        try:
            val_losses = torch.as_tensor(val_losses, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"clan.step: val_losses must be a tensor of shape {expected}, "
                            f"got {type(val_losses).__name__}") from None
    paired = val_losses.dim() == 2 and val_losses.shape[0] == members and val_losses.shape[1] >= 1
    if not (val_losses.shape == (members,) or paired) or (paired_test and (not paired or val_losses.shape[1] < 2)):
        what = ("every member's losses on the same K >= 2 samples or blocks, for the paired test of confidence"
                if paired_test else "one loss per member, or K per member")
        mine = f"; this rank's members: {members} of {population_size}" if population_size not in (None, members) \
            else ""
        raise ValueError(f"clan.step: val_losses must have shape {expected} ({what}{mine}), "
                         f"got {list(val_losses.shape)}")
    if not (val_losses.is_floating_point() or val_losses.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"clan.step: val_losses must be real numbers, got dtype {val_losses.dtype}")
    return val_losses.detach().to("cpu", torch.float64)
