"""The digits example runs end to end at a tiny size and learns."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_learns():
    result = load_example("digits").main(steps=120, population_size=4, hidden=32, progress=False)
    assert result["rounds"] >= 2 and result["steps"] == 120
    assert result["history"][0]["search"] == 30.0  # the default plan's search comes first
    assert result["val_accuracy"] > 0.5  # chance is 0.1
