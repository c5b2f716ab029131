"""Deprecated: this module is now :mod:`vmapclan.recurrent` (recurrent layers that batch under vmap); this name stays for one release."""

import warnings

from .recurrent import *  # noqa: F401,F403
from .recurrent import __all__  # noqa: F401

warnings.warn("vmapclan.nn is now vmapclan.recurrent; import from there (this name goes in the next release)",
              DeprecationWarning, stacklevel=2)
