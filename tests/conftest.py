"""Test settings: vmap fallbacks are errors, so a per-member loop can never hide behind vmap."""

import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _vmap_fallback_is_an_error():
    """Turn on functorch's fallback warning and make it an error for every test."""
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*we have not yet implemented the batching rule.*")
        yield
    torch._C._functorch._set_vmap_fallback_warning_enabled(False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_everywhere():
    """One thread from the start, so module fixtures (which run before :func:`_one_thread`) train
    with the thread count of the tests they are compared with: another count sums in another
    order, which a bitwise resume check sees as 1-ulp differences."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the tests' tiny tensors gain nothing from threads, and on a
    machine shared with other jobs each thread hand-off can cost milliseconds (tests ran ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
