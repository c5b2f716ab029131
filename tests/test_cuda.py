"""On a CUDA device: the vectorized paths equal their references there too, without vmap fallbacks.

Skipped without a GPU (CI has none). ``test_fused.py`` also holds a CUDA-graph test (graphed
against eager steps); the ones here compare graphed steps and runs with the imperative loop.
"""

import json

import pytest
import torch

from vmapclan import PopulationModel
from vmapclan.tasks import CharTransformer

from test_fused import GRADIENT_IDS, GRADIENTS, run_both

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("compile", [None, "optimizer"])
@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENT_IDS)
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_fused_equals_imperative_on_cuda(gradients, accumulate, compile):  # pragma: no cover - CUDA only
    phases = run_both({**gradients, "compile": compile}, accumulate, device="cuda")
    assert phases == {"cooperative", "competitive"}


def test_fused_compiled_step_equals_imperative_on_cuda():  # pragma: no cover - CUDA only
    run_both({"compile": "step"}, accumulate=False, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transformer_forward_and_gradients_match_members_on_cuda(dtype):  # pragma: no cover - CUDA only
    """Attention under vmap on CUDA: batched (the fallback warning is an error) and equal to each member."""
    torch.manual_seed(0)
    model = CharTransformer(vocab=16, d_model=32, n_layers=2, n_heads=4, max_len=12).to(dtype)
    pop = PopulationModel(model, 3, init="independent", generator=torch.Generator().manual_seed(1), device="cuda")
    tokens = torch.randint(0, 16, (3, 2, 12), device="cuda")
    out = pop(tokens)
    out.square().mean((1, 2, 3)).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-7}
    for i in range(3):
        member = pop.member_module(i)
        expected = member(tokens[i])
        torch.testing.assert_close(out[i], expected, **tol)
        expected.square().mean().backward()
        for name, stacked in pop.named_parameters():
            torch.testing.assert_close(stacked.grad[i], member.get_parameter(name).grad, **tol)


def test_speed_benchmark_smoke_on_cuda(tmp_path):  # pragma: no cover - CUDA only
    """Every variant, CUDA graphs included, runs a step on CUDA (no timing checked)."""
    from vmapclan.bench.__main__ import main
    from vmapclan.bench.speed import VARIANTS

    assert main(["--smoke", "--device", "cuda", "--json", str(tmp_path / "speed.json")]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    assert set(rows) == (set(VARIANTS) - {"loop"}) | {"loop (for-loop)", "loop (foreach)", "loop (fused)"}
    assert result["meta"]["matmul_peak_tflops"] > 0


@pytest.mark.parametrize("kwargs", [{}, {"backward": "autograd"}, {"compile": "optimizer"}],
                         ids=["vmap", "autograd", "compiled-update"])
def test_cuda_graph_step_equals_imperative(kwargs):  # pragma: no cover - CUDA only
    """Replayed graphs train exactly as the imperative loop, across phases, selection and accumulation."""
    phases = run_both({**kwargs, "cuda_graph": True}, accumulate=True, device="cuda")
    assert phases == {"cooperative", "competitive"}


@pytest.mark.parametrize("fused", [{"cuda_graph": True}, {"cuda_graph": True, "compile": "optimizer"}],
                         ids=["graph", "graph-compiled-update"])
def test_machine_with_cuda_graphs_matches_the_imperative_loop(fused):  # pragma: no cover - CUDA only
    """The whole run (warmup, rounds with selection, anneal, validation) with graphed clan rounds."""
    from vmapclan import TrainingMachine

    from test_machine import tiny

    config = tiny(total_steps=120)
    graphed = TrainingMachine(config, device="cuda", fused=fused).train()
    plain = TrainingMachine(config, device="cuda", fused=False).train()
    assert [r["winner"] for r in graphed.rounds] == [r["winner"] for r in plain.rounds]
    for a, b in zip(graphed.rounds, plain.rounds):
        assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-4)
    assert graphed.final["val_loss"] == pytest.approx(plain.final["val_loss"], rel=1e-4)
