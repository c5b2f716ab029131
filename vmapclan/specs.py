"""Deprecated: this module is now :mod:`vmapclan.config` (the run config); this name stays for one release."""

import warnings

from .config import *  # noqa: F401,F403
from .config import __all__  # noqa: F401

warnings.warn("vmapclan.specs is now vmapclan.config; import from there (this name goes in the next release)",
              DeprecationWarning, stacklevel=2)
