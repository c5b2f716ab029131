"""The zoo benchmark runs every variant it lists, at the smallest size (timings are not asserted)."""

from vmapclan.bench.zoo import format_zoo, run_zoo


def test_zoo_benchmark_smoke():
    rows = run_zoo(["linear-lstm"], population=2, reps=1, warmup=0, min_time=0.0, log=lambda line: None)
    variants = [r["variant"] for r in rows]
    assert variants == ["member loop", "fused (default)", "fused batched/vmap", "fused batched/autograd",
                        "fused per-member/vmap", "fused per-member/autograd"]
    assert all(r["ms"] > 0 for r in rows)
    # 41k values per member on CPU: PyTorch's kernel per member, and the autograd backward.
    assert rows[1]["choice"] == "per-member/autograd"
    table = format_zoo(rows)
    assert table.count("\n") == len(rows) + 1 and "linear-lstm" in table
