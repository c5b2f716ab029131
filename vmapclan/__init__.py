"""vmapclan: train a population of one PyTorch model at once, evolving its hyperparameter schedule.

P members are stacked along a leading member dimension and trained with ``torch.func.vmap``
and a batched AdamW whose hyperparameters differ per member. See :class:`Clan`.
"""

from .clan import FORMAT_VERSION, Clan, DivergenceError, Member
from .data import ClanLoader
from .genome import Gene
from .optim import AdamWHyper, AdamWState, BatchedAdamW, adamw_init, adamw_step_
from .population import PopulationModel, member_loss

__version__ = "0.1.0"

__all__ = [
    "Clan",
    "Member",
    "DivergenceError",
    "FORMAT_VERSION",
    "ClanLoader",
    "Gene",
    "PopulationModel",
    "member_loss",
    "BatchedAdamW",
    "AdamWHyper",
    "AdamWState",
    "adamw_init",
    "adamw_step_",
    "__version__",
]
