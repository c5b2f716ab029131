"""A clan's genes as one stateful part: the specs, the incumbent, every member's genome and their generator.

The rules are pure functions elsewhere (:func:`~vmapclan.genome.offspring`,
:func:`~vmapclan.genome.search_genome`, :func:`~vmapclan.selection.select`); :class:`GenePool`
holds their state between rounds, and checks and loads its own part of a saved clan.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .data import check_generator_state
from .genome import Gene, check_genome, check_genome_state, offspring, search_genome
from .selection import Selection, select

__all__ = ["GenePool"]


class GenePool:
    """The genes of a clan of ``population_size`` members: what is in force, and what comes next.

    Args:
        genes: The gene specs, ``{name: Gene}``.
        population_size: P.
        seed: Seeds the generator every draw comes from (the clan's mutations, and also its
            independent initialisation and its loader's seed, drawn in that order).

    Attributes:
        genes: The specs.
        incumbent: ``{name: 0-d tensor}``: the genome members share while cooperating.
        genomes: ``{name: tensor[P]}``: each member's own, used while competing. The first
            generation: member 0 the incumbent (the control), the others mutations of it.
        generator: The CPU generator.
    """

    def __init__(self, genes: Mapping[str, Gene], population_size: int, seed: int):
        self.genes = dict(genes)
        self.population_size = population_size
        self.generator = torch.Generator().manual_seed(seed)
        self.incumbent = {n: torch.tensor(g.init, dtype=g.torch_dtype) for n, g in self.genes.items()}
        self.genomes = offspring(self.incumbent, self.genes, self.generator, population_size)

    def in_force(self, cooperative: bool, members: slice, overrides: dict[str, float] | None = None) -> dict:
        """The genes in force for ``members`` (indices of the genomes), ``{name: [len(members)]}``.

        The incumbent when ``cooperative`` (with ``overrides``: a cooperative phase's settings in
        place of the incumbent's), each member's own genome otherwise.
        """
        size = len(range(*members.indices(self.population_size)))
        if overrides is not None:
            return {n: (torch.tensor(overrides[n], dtype=torch.float64) if n in overrides else v).expand(size)
                    for n, v in self.incumbent.items()}
        if cooperative:
            return {n: v.expand(size) for n, v in self.incumbent.items()}
        return {n: v[members] for n, v in self.genomes.items()}

    def set(self, name: str, values) -> None:
        """Set gene ``name`` of every member (``[P]`` values within its bounds).

        Raises:
            ValueError: for an unknown gene, or values of another shape or out of bounds.
        """
        if name not in self.genes:
            raise ValueError(f"Clan.set_genome: unknown gene {name!r}; the genes are {sorted(self.genes)}")
        spec = self.genes[name]
        given = values.dtype if isinstance(values, torch.Tensor) else None
        values = torch.as_tensor(values, dtype=spec.torch_dtype).flatten()
        if given is not None and given.is_floating_point and given != values.dtype:
            # A bound written in float32 (torch's default dtype) lands a rounding off it: it means the bound.
            slack = torch.finfo(given).eps
            values = torch.where((values > spec.high) & (values <= spec.high + abs(spec.high) * slack), spec.high, values)
            values = torch.where((values < spec.low) & (values >= spec.low - abs(spec.low) * slack), spec.low, values)
        check_genome({name: values}, {name: spec}, self.population_size)
        self.genomes[name] = values.clone()

    def search(self, spread: float) -> None:
        """A search round's genomes: the lr spread ``spread``-fold around the incumbent's, every other gene held."""
        self.genomes = search_genome(self.incumbent, self.genes, self.population_size, spread)

    def select(self, losses: torch.Tensor, **rules) -> Selection:
        """Select on a round's losses (:func:`~vmapclan.selection.select` with ``rules``) and take the next generation."""
        out = select(losses, self.genomes, self.genes, self.generator, **rules)
        self.incumbent, self.genomes = out.incumbent, out.genomes
        return out

    def restart(self, incumbent: Mapping[str, torch.Tensor]) -> None:
        """After a divergence: ``incumbent`` with half its lr (within bounds), and a new generation of it."""
        incumbent = {n: v.clone() for n, v in incumbent.items()}
        if "lr" in incumbent:  # a more conservative incumbent: half the learning rate
            incumbent["lr"] = (incumbent["lr"] * 0.5).clamp(min=self.genes["lr"].low)
        self.incumbent = incumbent
        self.genomes = offspring(incumbent, self.genes, self.generator, self.population_size)

    def state_dict(self) -> dict:
        """``{"genomes", "incumbent", "generator"}``: copies."""
        return {"genomes": {n: v.clone() for n, v in self.genomes.items()},
                "incumbent": {n: v.clone() for n, v in self.incumbent.items()},
                "generator": self.generator.get_state()}

    def check_incumbent(self, name: str, genes, who: str) -> None:
        """Refuse a saved incumbent (``{gene: 0-d tensor}``, as ``name``) these genes cannot hold."""
        check_genome_state(name, genes, self.genes, (), self.population_size, who)

    def check_state(self, state: Mapping, who: str) -> None:
        """Refuse saved genomes, incumbent or generator these genes cannot take, naming the entry."""
        check_genome_state("genomes", state["genomes"], self.genes, (self.population_size,), self.population_size,
                           who)
        self.check_incumbent("incumbent", state["incumbent"], who)
        check_generator_state(state["generator"], self.generator, f"{who}: the checkpoint's generator")

    def load_state_dict(self, state: Mapping) -> None:
        """Take what :meth:`check_state` accepted."""
        self.genomes = {n: v.clone() for n, v in state["genomes"].items()}
        self.incumbent = {n: v.clone() for n, v in state["incumbent"].items()}
        self.generator.set_state(state["generator"])
