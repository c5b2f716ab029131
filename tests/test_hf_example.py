"""The Hugging Face GPT-2 example runs end to end at a tiny size and learns."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")


def test_hf_gpt2_example_learns():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hf_gpt2.py"
    spec = importlib.util.spec_from_file_location("hf_gpt2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(size=1, population_size=4, steps=40, batch_size=8, context=32, round_length=10)
    assert len(result["history"]) == 4
    # From uniform guessing over 128 characters (ln 128 = 4.85) to something that learned the text.
    assert result["initial_val_loss"] > 4.0 and result["val_loss"] < result["initial_val_loss"] - 0.8
    assert type(result["model"]).__name__ == "GPT2LMHeadModel"
