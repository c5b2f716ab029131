"""The examples in the package's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import vmapclan

SHIMS = {"vmapclan.specs", "vmapclan.fused", "vmapclan.nn", "vmapclan.board"}  # deprecated names: nothing of their own
MODULES = sorted(m.name for m in pkgutil.walk_packages(vmapclan.__path__, "vmapclan.")
                 if m.name not in SHIMS and not m.name.startswith("vmapclan.bench") and m.name != "vmapclan.lightning")


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, **vars(module)}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
