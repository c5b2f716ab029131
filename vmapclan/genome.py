"""Genes: hyperparameters that evolve, their bounds, and how they mutate.

A genome is a dict ``{name: tensor[P]}`` holding one value per member (``float64`` for float
genes, ``torch.long`` for integer genes). Mutation is a pure function of the genome, the gene
specs and random draws from an explicit ``torch.Generator``, so a run is reproducible from its
seed and a mutation can never leave a gene's bounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .checks import int_in, is_number, number_in, refuse

__all__ = ["Gene", "ADAMW_GENES", "GRAD_ACCUM_GENE", "autobind_genes", "gene_specs", "mutate", "offspring", "search_genome",
           "check_genome", "check_genome_state", "optimizer_settings", "group_ratios"]

Scale = Literal["log", "linear", "log1m"]

ADAMW_GENES = ("lr", "weight_decay", "betas/0", "betas/1", "eps")
GRAD_ACCUM_GENE = "num_grad_accum"


@dataclasses.dataclass(frozen=True)
class Gene:
    """One evolvable hyperparameter.

    Args:
        low: Smallest allowed value (inclusive).
        high: Largest allowed value (inclusive).
        init: Starting value of the incumbent. ``None`` takes the value bound from the optimizer
            or, for user genes, the midpoint of the bounds in the gene's scale.
        scale: Space in which the gene moves. ``"log"`` multiplies the value by a factor,
            ``"linear"`` multiplies it too (so 0 stays 0 unless resampled, as in classic PBT),
            ``"log1m"`` multiplies ``1 - value`` (for momentum-like genes close to 1).
        dtype: ``"float"`` or ``"int"``. Integer genes move by at least one step when perturbed.
        factors: Perturbation factors; each mutation picks one uniformly at random.
        resample_prob: Probability that a mutation draws a fresh value uniformly in the gene's
            scale instead of perturbing.

    Example:
        >>> Gene(1e-5, 1e-1, init=1e-3)  # a log-scale learning rate
        Gene(low=1e-05, high=0.1, init=0.001, scale='log', dtype='float', factors=(0.8, 1.25), resample_prob=0.0)
    """

    low: float
    high: float
    init: float | None = None
    scale: Scale = "log"
    dtype: Literal["float", "int"] = "float"
    factors: tuple[float, ...] = (0.8, 1.25)
    resample_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.scale not in ("log", "linear", "log1m"):
            raise ValueError(f"Gene: scale must be 'log', 'linear' or 'log1m', got {self.scale!r}")
        if self.dtype not in ("float", "int"):
            raise ValueError(f"Gene: dtype must be 'float' or 'int', got {self.dtype!r}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if not is_number(value):
                refuse(f"Gene: {name}", "a finite number", value)
        if not self.low < self.high:
            raise ValueError(f"Gene: bounds must satisfy low < high, got low={self.low!r}, high={self.high!r}")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"Gene: a log-scale gene needs low > 0, got low={self.low!r}")
        if self.scale == "log1m" and self.high >= 1:
            raise ValueError(f"Gene: a log1m-scale gene needs high < 1, got high={self.high!r}")
        if self.dtype == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"Gene: an int gene needs integer bounds, got low={self.low!r}, high={self.high!r}")
        factors = tuple(self.factors)
        if not factors or any(not (isinstance(f, (int, float)) and f > 0 and math.isfinite(f)) for f in factors):
            raise ValueError(f"Gene: factors must be a non-empty tuple of positive numbers, got {self.factors!r}")
        if all(f == 1 for f in factors):
            raise ValueError(f"Gene: factors {self.factors!r} never change the value; give at least one factor != 1")
        object.__setattr__(self, "factors", factors)
        if not 0.0 <= self.resample_prob <= 1.0:
            raise ValueError(f"Gene: resample_prob must be in [0, 1], got {self.resample_prob!r}")
        if self.init is not None:
            self.check_value(self.init, "init")
            # torch.tensor(2.5, dtype=torch.long) would silently truncate the incumbent to 2.
            if self.dtype == "int" and self.init != int(self.init):
                raise ValueError(f"Gene: an int gene needs an integer init, got {self.init!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``torch.long`` for integer genes, ``torch.float64`` for float genes."""
        return torch.long if self.dtype == "int" else torch.float64

    def check_value(self, value: float, what: str = "value") -> None:
        """Raise ``ValueError`` if ``value`` lies outside ``[low, high]``."""
        if not (self.low <= value <= self.high):
            raise ValueError(f"Gene: {what} {value!r} is outside the bounds [{self.low!r}, {self.high!r}]")

    def default_init(self) -> float:
        """The midpoint of the bounds in the gene's scale (rounded for integer genes)."""
        lo, hi = self._to_unit(torch.tensor([self.low, self.high], dtype=torch.float64))
        mid = self._from_unit((lo + hi) / 2).item()
        return float(round(mid)) if self.dtype == "int" else mid

    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "log":
            return x.log()
        if self.scale == "log1m":
            return torch.log1p(-x)
        return x

    def _from_unit(self, u: torch.Tensor) -> torch.Tensor:
        if self.scale == "log":
            return u.exp()
        if self.scale == "log1m":
            return -torch.expm1(u)
        return u


def autobind_genes(names, optimizer: torch.optim.Optimizer | None) -> dict[str, Gene]:
    """The genes that ``autobind`` names create, seeded from the user's optimizer.

    ``"adamw"`` binds ``lr``, ``weight_decay``, ``betas/0``, ``betas/1`` and ``eps`` with bounds
    around the optimizer's values (two decades either side for lr, weight decay and eps; one
    decade of ``1 - beta``); ``"gradient_accumulation"`` binds ``num_grad_accum`` in ``[1, 8]``.

    Raises:
        ValueError: for an unknown name, or ``"adamw"`` without an AdamW optimizer.
    """
    if isinstance(names, str):
        names = [names]
    genes: dict[str, Gene] = {}
    for name in names:
        if name == "adamw":
            if not is_adamw(optimizer):
                raise ValueError(
                    "Clan: autobind=['adamw'] needs optimizer=torch.optim.AdamW(...), "
                    f"got {type(optimizer).__name__ if optimizer is not None else None}"
                )
            settings = optimizer_settings(optimizer)
            lr, wd, eps = settings["lr"], settings["weight_decay"], settings["eps"]
            beta1, beta2 = settings["betas/0"], settings["betas/1"]
            for key, value in (("lr", lr), ("eps", eps)):
                if not value > 0:
                    raise ValueError(f"Clan: autobind=['adamw'] evolves the optimizer's {key} by factors (within "
                                     f"{key} / 100 and {key} x 100), so it must be positive, got {value}")
            genes["lr"] = Gene(lr / 100, lr * 100, init=lr)
            genes["weight_decay"] = (
                Gene(wd / 100, wd * 100, init=wd) if wd > 0 else Gene(0.0, 1.0, init=0.0, scale="linear")
            )
            for key, beta in (("betas/0", beta1), ("betas/1", beta2)):
                # 1 - beta may grow 10x (capped at 0.5, i.e. beta >= 0.5) or shrink 10x.
                lo = 1 - max(min((1 - beta) * 10, 0.5), 1 - beta)
                hi = 1 - (1 - beta) / 10
                genes[key] = Gene(lo, hi, init=beta, scale="log1m")
            genes["eps"] = Gene(eps / 100, eps * 100, init=eps)
        elif name == "gradient_accumulation":
            genes[GRAD_ACCUM_GENE] = Gene(1, 8, init=1, scale="linear", dtype="int")
        else:
            raise ValueError(f"Clan: unknown autobind name {name!r}; expected 'adamw' or 'gradient_accumulation'")
    return genes


def gene_specs(autobind, optimizer, genome_config) -> dict[str, Gene]:
    """A clan's genes: those ``autobind`` names (seeded from ``optimizer``), then ``genome_config``'s.

    Args:
        autobind: ``"adamw"``, ``"gradient_accumulation"`` or a list of them.
        optimizer: The user's optimizer (its values seed the bound genes' ``init``).
        genome_config: ``{name: Gene | dict}`` or ``None``: more genes, or overrides of bound ones
            (a dict updates the bound spec's fields).

    Raises:
        TypeError: for an ``autobind`` or ``genome_config`` of the wrong type.
        ValueError: for an unknown name, an empty gene name or bad gene fields.
    """
    if isinstance(autobind, str):
        autobind = [autobind]
    if not isinstance(autobind, Sequence) or not all(isinstance(name, str) for name in autobind):
        raise TypeError(f"Clan: autobind must be 'adamw', 'gradient_accumulation' or a list of them, got {autobind!r}")
    if genome_config is not None and not isinstance(genome_config, Mapping):
        raise TypeError(f"Clan: genome_config must be a dict {{gene name: Gene or dict}}, got {genome_config!r}")
    genes = autobind_genes(autobind, optimizer)
    for name, spec in (genome_config or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Clan: gene names must be non-empty strings, got {name!r}")
        if isinstance(spec, Mapping):
            base = genes.get(name)
            try:
                spec = dataclasses.replace(base, **spec) if base is not None else Gene(**spec)
            except (TypeError, ValueError) as err:  # an unknown field, or bounds that leave out the start
                raise ValueError(f"Clan: genome_config[{name!r}]: {err}") from None
        elif not isinstance(spec, Gene):
            raise TypeError(f"Clan: genome_config[{name!r}] must be a Gene or a dict, got {type(spec).__name__}")
        if spec.init is None:
            bound = genes.get(name)
            init = bound.init if bound is not None and bound.init is not None else spec.default_init()
            spec = dataclasses.replace(spec, init=init)
        genes[name] = spec
    return genes


def is_adamw(optimizer) -> bool:
    """Whether ``optimizer`` is one the batched AdamW stands for: ``torch.optim.AdamW`` or ``torch.optim.Adam``."""
    return isinstance(optimizer, torch.optim.Adam)  # torch.optim.AdamW is a subclass


def optimizer_settings(optimizer) -> dict[str, float]:
    """The settings the genes stand for, by gene name, over all of an AdamW's param groups.

    ``lr`` is the first group's; ``weight_decay`` the first decaying group's (0 when none
    decays); betas and eps are every group's (:func:`group_ratios` checks they agree).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}],
        ...                         lr=1e-3, weight_decay=0.1)
        >>> optimizer_settings(opt)["weight_decay"]
        0.1
    """
    groups = optimizer.param_groups
    settings = adamw_settings(groups[0])
    settings["weight_decay"] = next((float(g["weight_decay"]) for g in groups if g["weight_decay"] > 0), 0.0)
    return settings


def group_ratios(optimizer) -> list[tuple[float, float]]:
    """Each param group's ``(lr, weight decay)`` relative to :func:`optimizer_settings`' (1 for one group).

    Raises:
        ValueError: if the groups' betas or eps differ (the genes hold one value per member), or
            the first group's lr is 0 while another's is not.
    """
    reference = optimizer_settings(optimizer)
    ratios = []
    for k, group in enumerate(optimizer.param_groups):
        own = adamw_settings(group)
        for name in ("betas/0", "betas/1", "eps"):
            if own[name] != reference[name]:
                raise ValueError(f"Clan: every param group must have the first group's {name} "
                                 f"({reference[name]}), group {k} has {own[name]}")
        if reference["lr"] == 0:
            if own["lr"] != 0:
                raise ValueError(f"Clan: the first param group's lr is 0, so it cannot scale group {k}'s lr "
                                 f"({own['lr']}); put a group with a positive lr first")
            lr_ratio = 1.0
        else:
            lr_ratio = own["lr"] / reference["lr"]
        wd_ratio = own["weight_decay"] / reference["weight_decay"] if reference["weight_decay"] > 0 else 1.0
        ratios.append((lr_ratio, wd_ratio))
    return ratios


def adamw_settings(group: Mapping) -> dict[str, float]:
    """A ``torch.optim.AdamW`` param group's settings by gene name: ``{"lr", "weight_decay", "betas/0", "betas/1", "eps"}``."""
    return {"lr": float(group["lr"]), "weight_decay": float(group["weight_decay"]), "betas/0": float(group["betas"][0]),
            "betas/1": float(group["betas"][1]), "eps": float(group["eps"])}


def mutate(genome: Mapping[str, torch.Tensor], specs: Mapping[str, Gene], generator: torch.Generator,
           mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Return a mutated copy of ``genome``; members where ``mask`` is False keep their values.

    Each gene of each member is resampled uniformly in the gene's scale with probability
    ``resample_prob``, else multiplied by one of ``factors`` (in the gene's scale; integer genes
    move by at least one step), then clipped to ``[low, high]``. The random draws come from
    ``generator`` in a fixed order (genes in ``specs`` order), so the result depends only on the
    generator's state.

    Args:
        genome: ``{name: tensor[P]}`` on the CPU.
        specs: The gene specs, same names as ``genome``.
        generator: A CPU ``torch.Generator``.
        mask: Optional ``bool[P]``: which members mutate (default: all).

    Returns:
        A new genome dict.
    """
    out = {}
    for name, spec in specs.items():
        x = genome[name]
        p = x.shape[0]
        coin = torch.rand(p, generator=generator, dtype=torch.float64)
        pick = torch.randint(len(spec.factors), (p,), generator=generator)
        uniform = torch.rand(p, generator=generator, dtype=torch.float64)
        xf = x.to(torch.float64)
        factor = torch.tensor(spec.factors, dtype=torch.float64)[pick]
        if spec.scale == "linear":
            perturbed = xf * factor
        else:
            perturbed = spec._from_unit(spec._to_unit(xf) + factor.log())
        lo_u, hi_u = spec._to_unit(torch.tensor([spec.low, spec.high], dtype=torch.float64))
        resampled = spec._from_unit(lo_u + (hi_u - lo_u) * uniform)
        if spec.dtype == "int":
            # A factor too small to move an integer: take one step its way. "Its way" is where the
            # unrounded value went (a factor > 1 lowers a log1m gene and a negative linear one);
            # only at 0, where a linear gene cannot move, does the factor's own sign decide.
            way = torch.where(perturbed != xf, (perturbed - xf).sign(), factor.log().sign())
            perturbed = perturbed.round()
            stuck = perturbed == xf
            perturbed = torch.where(stuck, xf + way, perturbed)
            # Uniform in the gene's scale over [low - 1/2, high + 1/2], then to the nearest integer:
            # a linear gene draws each integer equally, a log gene (a batch size) log-uniformly.
            lo_i, hi_i = spec._to_unit(torch.tensor([spec.low - 0.5, spec.high + 0.5], dtype=torch.float64))
            resampled = (spec._from_unit(lo_i + (hi_i - lo_i) * uniform) + 0.5).floor().clamp(spec.low, spec.high)
        new = torch.where(coin < spec.resample_prob, resampled, perturbed).clamp(spec.low, spec.high)
        new = new.to(spec.torch_dtype)
        out[name] = new if mask is None else torch.where(mask, new, x)
    return out


def offspring(incumbent: Mapping[str, torch.Tensor], specs: Mapping[str, Gene], generator: torch.Generator,
              population_size: int) -> dict[str, torch.Tensor]:
    """The next generation: member 0 the ``incumbent`` (the control), every other member a mutation of it.

    The one rule for a new generation, at the clan's start, after winner selection and after a
    divergence restore.

    Args:
        incumbent: ``{name: 0-d tensor}``.
        specs: The gene specs, same names.
        generator: The CPU generator the mutations draw from (:func:`mutate`).
        population_size: P.

    Returns:
        ``{name: tensor[P]}``.

    Example:
        >>> genes = {"lr": Gene(1e-4, 1.0, init=1e-2)}
        >>> offspring({"lr": torch.tensor(1e-2, dtype=torch.float64)}, genes, torch.Generator(), 3)["lr"][0].item()
        0.01
    """
    genomes = {n: v.expand(population_size).clone() for n, v in incumbent.items()}
    return mutate(genomes, specs, generator, mask=torch.arange(population_size) > 0)


def search_genome(incumbent: Mapping[str, torch.Tensor], specs: Mapping[str, Gene], population_size: int,
                  spread: float, gene: str = "lr") -> dict[str, torch.Tensor]:
    """The genomes of a search round: member 0 the incumbent, the others ``gene`` spread in log around it.

    The ``n = population_size - 1`` challengers hold every gene at the incumbent's value except
    ``gene``, which is the incumbent's times ``spread ** e``: ``m = n // 2`` of them below it
    (``e = -1/m, -2/m, ..., -1``) and ``n - m`` above (``e = 1/(n-m), ..., 1``), so the lowest
    is ``value / spread`` and the highest ``value * spread``; each is clipped to the gene's
    bounds. A short competition among them moves the level of a gene much further than
    mutations by small factors can.

    Args:
        incumbent: ``{name: 0-d tensor}``, the genome in force (as ``Clan.incumbent``).
        specs: The gene specs, same names as ``incumbent``; ``gene`` a float gene among them.
        population_size: P (at least 2).
        spread: The factor to the lowest and highest value, above 1.
        gene: The gene to spread (default ``"lr"``).

    Returns:
        ``{name: tensor[P]}`` in the genes' dtypes.

    Example:
        >>> specs = {"lr": Gene(1e-4, 1.0, init=1e-2)}
        >>> [round(v, 6) for v in search_genome({"lr": torch.tensor(1e-2)}, specs, 5, 10.0)["lr"].tolist()]
        [0.01, 0.003162, 0.001, 0.031623, 0.1]
    """
    if gene not in specs or specs[gene].dtype != "float":
        raise ValueError(f"search_genome: gene must be one of the float genes {sorted(n for n, g in specs.items() if g.dtype == 'float')}, "
                         f"got {gene!r}")
    int_in(population_size, "search_genome: population_size", 2)
    number_in(spread, "search_genome: spread", 1, math.inf, low_open=True, high_open=True, expected="a number above 1")
    n = population_size - 1
    below, above = n // 2, n - n // 2
    exponents = [0.0] + [-k / below for k in range(1, below + 1)] + [k / above for k in range(1, above + 1)]
    out = {name: incumbent[name].detach().cpu().to(spec.torch_dtype).expand(population_size).clone()
           for name, spec in specs.items()}
    spec = specs[gene]
    center = incumbent[gene].detach().cpu().to(torch.float64)
    # Member 0's exponent is 0: a factor of exactly 1, so the control is the incumbent bit for bit.
    values = center * torch.tensor(float(spread), dtype=torch.float64) ** torch.tensor(exponents, dtype=torch.float64)
    out[gene] = values.clamp(spec.low, spec.high).to(spec.torch_dtype)
    return out


def check_genome(genome: Mapping[str, torch.Tensor], specs: Mapping[str, Gene], population_size: int) -> None:
    """Raise ``ValueError`` unless ``genome`` has exactly the genes of ``specs``, shape ``[P]``, in bounds."""
    if set(genome) != set(specs):
        raise ValueError(f"genome has genes {sorted(genome)}, expected {sorted(specs)}")
    for name, spec in specs.items():
        values = genome[name]
        if values.shape != (population_size,):
            raise ValueError(f"gene {name!r}: expected shape [{population_size}], got {list(values.shape)}")
        if not bool(((values >= spec.low) & (values <= spec.high)).all()):
            raise ValueError(f"gene {name!r}: values {values.tolist()} leave the bounds [{spec.low}, {spec.high}]")


def check_genome_state(name: str, genes, specs: Mapping[str, Gene], shape: tuple, population_size: int,
                       who: str) -> None:
    """Refuse a saved genome (``shape`` ``[P]``) or incumbent (``shape`` ``()``) that these genes cannot hold.

    Raises:
        ValueError: for other genes, dtypes or shapes, or values out of bounds, naming ``name``.
    """
    if not isinstance(genes, Mapping) or not all(isinstance(v, torch.Tensor) for v in genes.values()):
        raise ValueError(f"{who}: the checkpoint's {name} must be a table of tensors, got {type(genes).__name__!r}")
    if set(genes) != set(specs):
        raise ValueError(f"{who}: the checkpoint's {name} has genes {sorted(genes)}, expected {sorted(specs)}")
    for gene, spec in specs.items():
        values = genes[gene]
        if values.dtype != spec.torch_dtype or values.shape != shape:
            raise ValueError(f"{who}: the checkpoint's {name}[{gene!r}] is {values.dtype} {list(values.shape)}, "
                             f"expected {spec.torch_dtype} {list(shape)}")
    try:
        check_genome({g: v.reshape(-1).expand(population_size) for g, v in genes.items()}, specs, population_size)
    except ValueError as err:
        raise ValueError(f"{who}: the checkpoint's {name}: {err}") from None
