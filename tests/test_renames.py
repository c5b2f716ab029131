"""The modules renamed in the redesign import under their old names for one release, with a DeprecationWarning."""

import importlib
import sys
import warnings

import pytest

import vmapclan

RENAMED = {"specs": ("config", "RunConfig"), "fused": ("step", "FusedStep"), "nn": ("recurrent", "LSTM"),
           "board": ("tensorboard_logger", "TensorBoardLogger")}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_module_name_still_imports_and_warns(old):
    new, name = RENAMED[old]
    sys.modules.pop(f"vmapclan.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"vmapclan.{old} is now vmapclan.{new}; import from there"):
        module = importlib.import_module(f"vmapclan.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(f"vmapclan.{new}"), name)


def test_vmapclan_nn_is_still_an_attribute_of_the_package():
    sys.modules.pop("vmapclan.nn", None)
    vmapclan.__dict__.pop("nn", None)
    with pytest.warns(DeprecationWarning, match="vmapclan.nn is now vmapclan.recurrent"):
        assert vmapclan.nn.GRU is vmapclan.recurrent.GRU
    with pytest.raises(AttributeError, match="module 'vmapclan' has no attribute 'nothing'"):
        vmapclan.nothing  # noqa: B018


@pytest.mark.parametrize("name, home", [("plan_rounds", "vmapclan.rounds"), ("phase_data", "vmapclan.plan"),
                                        ("frozen_parameters", "vmapclan.plan")])
def test_names_that_left_the_machine_still_import_from_it(name, home):
    import vmapclan.machine as machine

    with pytest.warns(DeprecationWarning, match=rf"vmapclan.machine.{name} is now {home}.{name}"):
        found = getattr(machine, name)
    assert found is getattr(importlib.import_module(home), name)


def test_no_module_of_the_package_imports_an_old_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for module in ("vmapclan.cli", "vmapclan.lightning", "vmapclan.bench.speed", "vmapclan.bench.quality",
                       "vmapclan.bench.zoo", "vmapclan.bench.recurrent", "vmapclan.bench.cooperative",
                       "vmapclan.bench.distributed", "vmapclan.plots"):
            importlib.import_module(module)
