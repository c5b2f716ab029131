"""Deprecated: this module is now :mod:`vmapclan.step` (the fused training step); this name stays for one release."""

import warnings

from .step import *  # noqa: F401,F403
from .step import __all__  # noqa: F401

warnings.warn("vmapclan.fused is now vmapclan.step; import from there (this name goes in the next release)",
              DeprecationWarning, stacklevel=2)
