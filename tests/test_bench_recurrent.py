"""The recurrent benchmark runs every variant at the smallest size (timings are not asserted)."""

from vmapclan.bench.recurrent import format_recurrent, run_recurrent


def test_bench_recurrent_smoke():
    rows = run_recurrent(["lstm", "gru"], population=2, size="tiny", reps=1, warmup=0, min_time=0.0,
                         log=lambda line: None)
    assert [(r["model"], r["variant"]) for r in rows] == [
        (m, v) for m in ("lstm", "gru") for v in ("loop", "member loop", "fused")]
    assert all(r["ms"] > 0 for r in rows) and all(r["speedup"] == 1.0 for r in rows if r["variant"] == "loop")
    table = format_recurrent(rows).splitlines()
    assert len(table) == 4 and table[0].startswith("| model | loop: ms/step |") and table[2].startswith("| lstm |")
