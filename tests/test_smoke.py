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
    result = load_example("digits").main(epochs=6, population_size=4, round_length=10, hidden=32, progress=False)
    assert result["rounds"] >= 2
    assert result["val_accuracy"] > 0.5  # chance is 0.1
