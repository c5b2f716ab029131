"""Deprecated: this module is now :mod:`vmapclan.tensorboard_logger` (the TensorBoard writer); this name stays for one release."""

import warnings

from .tensorboard_logger import *  # noqa: F401,F403
from .tensorboard_logger import __all__  # noqa: F401

warnings.warn("vmapclan.board is now vmapclan.tensorboard_logger; import from there (this name goes in the next release)",
              DeprecationWarning, stacklevel=2)
