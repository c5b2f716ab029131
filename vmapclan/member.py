"""The round's view of a clan: what the seed's training loop calls ``member``."""

from __future__ import annotations

import torch

__all__ = ["Member"]


class Member:
    """This round's view of the population: model, optimizer, genes and the round clock.

    Obtained from :meth:`vmapclan.Clan.round`; it goes stale when the round ends
    (``clan.step``), and using a stale member is an error.

    Attributes:
        model: The :class:`~vmapclan.PopulationModel` (``None`` for a genome-only clan).
        optimizer: The :class:`~vmapclan.BatchedAdamW` (``None`` for a genome-only clan).
    """

    def __init__(self, clan, round_index: int):
        self._clan = clan
        self._round = round_index

    def _live(self):
        if self._round != self._clan.round_index:
            raise RuntimeError(
                f"stale member: it belongs to round {self._round} but the clan is in round "
                f"{self._clan.round_index}; take the current one from clan.round()"
            )
        return self._clan

    @property
    def model(self):
        """The stacked model; call it with ``[P, B, ...]`` inputs."""
        return self._live().population

    @property
    def optimizer(self):
        """The batched AdamW."""
        return self._live().optimizer

    @property
    def phase(self) -> str:
        """``"cooperative"`` or ``"competitive"``."""
        return self._live().phase

    @property
    def done(self) -> bool:
        """Whether this round (or cooperative stretch) has run all its steps: time to validate and call ``clan.step``."""
        return self._live().round_done

    @property
    def round_index(self) -> int:
        """The round this member view belongs to."""
        return self._round

    def step(self) -> None:
        """Count one step (call once per batch, after the optimizer): a round's moves the round clock, a
        cooperative stretch's only the time (see :meth:`vmapclan.Clan.advance`)."""
        self._live().advance()

    def sync_context(self):
        """Context for ``backward()``: in the cooperative phase, averages gradients over members on exit.

        In the competitive phase it does nothing. A backward outside it in the cooperative
        phase is an error.
        """
        return self._live().sync_context()

    @property
    def genome(self) -> dict[str, torch.Tensor]:
        """Every gene in force, ``{name: [P]}`` (the incumbent broadcast when cooperating)."""
        return self._live().genes_in_force()

    def get_gene(self, name: str) -> torch.Tensor:
        """Gene ``name`` in force for each member, ``[P]`` on the CPU (``long`` for integer genes).

        Raises:
            ValueError: for a gene the clan does not have.
        """
        genes = self.genome
        if name not in genes:
            raise ValueError(f"member.get_gene: unknown gene {name!r}; the genes are {sorted(genes)}")
        return genes[name]

    def share(self, data):
        """``data`` with a member dimension, as a view: every member sees the same values."""
        clan = self._live()
        if clan.population is not None:
            return clan.population.share(data)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"member.share: expected a tensor, got {type(data).__name__}")
        return data.unsqueeze(0).expand(clan.local_size, *data.shape)
