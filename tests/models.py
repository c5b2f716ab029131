"""The small models and clans the tests build, written once: each test file picks its shapes and settings."""

import torch
from torch import nn

from vmapclan import Clan

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(inputs: int, hidden: int, outputs: int, *, act: str = "tanh", dtype=torch.float64, seed: int | None = None,
        batchnorm: bool = False, dropout: float | None = None) -> nn.Sequential:
    """``Linear(inputs, hidden)``, an optional ``BatchNorm1d``, the activation, an optional ``Dropout``, ``Linear(hidden, outputs)``.

    Args:
        inputs, hidden, outputs: The widths.
        act: ``"tanh"`` or ``"relu"``.
        dtype: The parameters' dtype (float64 by default: comparisons can then be tight).
        seed: Seed torch's generator first (``None``: draw from it as it stands).
        batchnorm: A ``BatchNorm1d(hidden)`` after the first layer.
        dropout: A ``Dropout(dropout)`` after the activation (``None``: none).
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers = [nn.Linear(inputs, hidden), *([nn.BatchNorm1d(hidden)] if batchnorm else []), ACTIVATIONS[act](),
              *([nn.Dropout(dropout)] if dropout is not None else []), nn.Linear(hidden, outputs)]
    return nn.Sequential(*layers).to(dtype)


def adamw_clan(model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 1e-2, accumulate: bool = False,
               autobind=None, genome_config=None, **settings) -> Clan:
    """A clan of ``model`` with its ``torch.optim.AdamW`` and the AdamW genes.

    With ``accumulate``, the gradient-accumulation gene too, at 2 from the start (so that even the
    first cooperative phase accumulates). ``autobind`` and ``genome_config`` replace those; ``settings`` go to
    :class:`~vmapclan.Clan`.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if autobind is None:
        autobind = ["adamw", "gradient_accumulation"] if accumulate else ["adamw"]
    genes = genome_config if genome_config is not None else {"num_grad_accum": {"init": 2}} if accumulate else None
    return Clan(model, optimizer, autobind=autobind, genome_config=genes, **settings)
