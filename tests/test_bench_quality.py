"""The quality benchmark at size tiny: its tasks' three splits, its methods, its summary and its command line."""

import doctest
import json
import math

import pytest
import torch

from vmapclan.bench import quality, quality_tasks
from vmapclan.config import RunConfig
from vmapclan.tasks import stdlib_corpus


def _loaded(task_name, seed=0):
    """The bench task, its checked data settings and its loaded data at size tiny."""
    base = quality.task_configs(task_name, "tiny")
    task = quality_tasks.bench_task(task_name)
    cfg = RunConfig.from_dict({**base, "seed": seed})
    data = task.data_settings(cfg.data)
    return task, cfg, data, task.load(data, seed)


def _rows(part):
    """Each sample of a split as bytes (input and target), for a check that two splits share none."""
    x, y = part
    return {a.numpy().tobytes() + b.numpy().tobytes() for a, b in zip(x, y)}


@pytest.mark.parametrize("name", quality.TASKS)
def test_every_task_splits_three_ways_builds_and_trains(name):
    task, cfg, data, loaded = _loaded(name)
    parts = (loaded.train, loaded.val, loaded.test)
    assert all(len(part[0]) > 0 for part in parts)
    if name == "stdlib-chars":
        # Windows repeat in text; the streams are what must not overlap: train by file, the rest cut in two.
        train, val, test = task.streams(data)
        held = stdlib_corpus(data.val_fraction, data.max_chars)[1]
        assert torch.equal(torch.cat([val, test]), held) and len(val) and len(test)
        assert torch.equal(loaded.test[0][0], test[:data.seq_len].long())
    else:
        rows = [_rows(part) for part in parts]
        assert sum(len(r) for r in rows) == len(rows[0] | rows[1] | rows[2])  # disjoint
    model = task.build_model(task.model_settings(cfg.model), data)
    with torch.no_grad():
        assert torch.isfinite(task.loss(model(loaded.train[0][:4]), loaded.train[1][:4]))
    run = quality.run_method(quality.task_configs(name, "tiny"), "clan", 0)
    steps, p = cfg.total_steps, cfg.clan.population_size
    assert run["member_steps"] == steps * p
    assert math.isfinite(run["test_loss"]) and math.isfinite(run["val_loss"])


def test_abundant_tasks_never_repeat_a_sample():
    for name in ("teacher-regression", "teacher-classification", "stdlib-chars"):
        for size in ("tiny", "small"):
            base = quality.task_configs(name, size)
            reads = base["total_steps"] * base["clan"]["population_size"] * base["data"]["batch_size"]
            if name == "stdlib-chars":
                windows = len(stdlib_corpus(base["data"]["val_fraction"], base["data"]["max_chars"])[0]) \
                    // base["data"]["seq_len"]
                assert reads < windows
            else:
                assert reads < base["data"]["train_samples"]


def test_the_split_of_three_parts_follows_the_seed():
    data = RunConfig.from_dict({"data": {"val_fraction": 0.3}}).data
    train, val, test = quality_tasks.three_way(100, data, 3)
    assert (len(train), len(val), len(test)) == (70, 15, 15)
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(100))
    assert torch.equal(quality_tasks.three_way(100, data, 3)[2], test)
    assert not torch.equal(quality_tasks.three_way(100, data, 4)[2], test)
    with pytest.raises(ValueError, match="need data.test_fraction > 0"):
        quality_tasks.three_way(100, RunConfig.from_dict({"data": {"test_fraction": 0}}).data, 0)


def test_the_finetune_starts_from_a_pretrained_model_of_the_seed():
    task, cfg, data, _ = _loaded("digits-finetune")
    settings = task.model_settings(cfg.model)

    def built(seed):
        torch.manual_seed(seed)
        return torch.cat([p.detach().flatten() for p in task.build_model(settings, data).parameters()])

    assert torch.equal(built(0), built(0)) and not torch.equal(built(0), built(1))
    torch.manual_seed(0)
    fresh = torch.cat([p.detach().flatten() for p in quality_tasks._mlp(64, settings["hidden"], 5).parameters()])
    assert not torch.equal(built(0), fresh)  # the body is trained, not an initialisation


def test_the_schedulefree_methods_lr_grid_and_pick_by_validation():
    pytest.importorskip("schedulefree")
    base = quality.task_configs("wine-mlp", "tiny")
    lr, p = base["optimizer"]["lr"], base["clan"]["population_size"]
    assert quality.method_lr_grid(base, "schedulefree") == [lr]
    grid = quality.method_lr_grid(base, "schedulefree-oracle")
    assert grid == quality.method_lr_grid(base, "oracle") == quality.lr_grid(lr, p)
    assert len(grid) == p and grid[0] == pytest.approx(lr / 10) and grid[-1] == pytest.approx(lr * 30)
    run = quality.run_method(base, "schedulefree-oracle", 0)
    best = min(range(p), key=lambda i: run["grid_val_losses"][i])
    assert run["lr"] == grid[best] and run["member_steps"] == base["total_steps"] * p
    alone = quality.schedulefree_run(base, 0, grid[best])
    assert run["test_loss"] == alone["test_loss"] and run["val_loss"] == alone["val_loss"]


def test_schedulefree_scores_the_averaged_weights(monkeypatch):
    schedulefree = pytest.importorskip("schedulefree")
    calls = []

    class Recording(schedulefree.AdamWScheduleFree):
        def train(self):
            calls.append("train")
            return super().train()

        def eval(self):
            calls.append("eval")
            return super().eval()

    evaluate = quality_tasks.WineTask.evaluate

    def recorded(self, model, data, target=None):
        calls.append("evaluate")
        return evaluate(self, model, data, target)

    monkeypatch.setattr(schedulefree, "AdamWScheduleFree", Recording)
    monkeypatch.setattr(quality_tasks.WineTask, "evaluate", recorded)
    out = quality.schedulefree_run(quality.task_configs("wine-mlp", "tiny"), 0, 1e-3)
    assert calls == ["train", "eval", "evaluate", "evaluate"] and not out["diverged"]


def _run(seed, val, test, seconds=1.0):
    return {"seed": seed, "val_loss": val, "test_loss": test, "seconds": seconds}


def test_the_summary_counts_paired_wins_on_the_test_split():
    runs = {"clan": [_run(0, 0.5, 0.40), _run(1, 0.7, 0.60), _run(2, 0.6, 0.50)],
            "sweep": [_run(0, 0.6, 0.45), _run(1, 0.6, 0.55), _run(2, 0.6, 0.50)],
            "oracle": [_run(0, 0.4, math.inf), _run(1, 0.4, 0.70), _run(2, 0.4, 0.30)]}
    s = quality.summarize(runs)
    assert s["sweep"]["test_clan_better"] == 1 and s["sweep"]["test_seeds"] == 3  # a tie is no win
    assert s["sweep"]["test_diff_mean"] == pytest.approx((0.05 - 0.05 + 0.0) / 3)
    assert s["sweep"]["clan_better"] == 1 and s["sweep"]["diff_mean"] == pytest.approx(0.0)  # validation
    assert s["oracle"]["test_clan_better"] == 2  # a diverged run (inf) loses
    assert s["oracle"]["test_mean"] == math.inf and "test_diff_mean" not in s["oracle"]
    assert s["clan"]["test_mean"] == pytest.approx(0.5) and "test_clan_better" not in s["clan"]
    assert quality.paired_wins({0: 1.0, 1: math.nan}, {0: 2.0, 1: 0.5, 2: 0.1}) == (1, 2)

    held = {"clan": [_run(0, 0.5, 0.9)], "sweep": [_run(0, 0.5, 0.8)]}
    results = {"a": {"runs": runs, "summary": s}, "b": {"runs": runs, "summary": s},
               "h": {"runs": held, "summary": quality.summarize(held), "holdout": True}}
    assert quality.overall(results)["sweep"] == {"wins": 2, "pairs": 6, "share": pytest.approx(1 / 3)}
    assert quality.overall(results)["oracle"]["wins"] == 4
    assert quality.overall(results, holdout=True) == {"sweep": {"wins": 0, "pairs": 1, "share": 0.0}}
    table = quality.markdown(results)
    assert "### Tasks" in table and "### Held-out tasks" in table
    assert table.index("**h**") > table.index("### Held-out tasks") > table.index("**b**")
    assert "| a | sweep | 0.5000 ± 0.0500 | 0.6000 ± 0.0000 | +0.0000 ± 0.0500 | 1/3 | 1.0 |" in table
    assert "| 0 | 0.4000 | 0.4500 | inf |" in table
    assert "Over all 6 (task, seed) pairs: clan beats sweep on 33% (2/6), oracle on 67% (4/6)." in table
    assert "Over all 1 (task, seed) pairs: clan beats sweep on 0% (0/1)." in table


def test_bad_names_are_refused_before_anything_runs(capsys):
    base = quality.task_configs("wine-mlp", "tiny")
    with pytest.raises(ValueError, match=r"quality: unknown task 'mnist'; expected one of \['digits-mlp'"):
        quality.run_quality(["wine-mlp", "mnist"], [0], "tiny")
    with pytest.raises(ValueError, match="quality: unknown method 'adam'; expected one of"):
        quality.run_quality(["wine-mlp"], [0], "tiny", methods=["clan", "adam"])
    with pytest.raises(ValueError, match="quality: unknown holdout task 'mnist'"):
        quality.run_quality(["wine-mlp"], [0], "tiny", holdout=["mnist"])
    with pytest.raises(ValueError, match=r"quality: seeds must be distinct, got \[0, 0\]"):
        quality.run_quality(["wine-mlp"], [0, 0], "tiny")
    with pytest.raises(ValueError, match="quality: unknown method 'adam'"):
        quality.run_method(base, "adam", 0)
    with pytest.raises(ValueError, match="quality: unknown method 'adam'"):
        quality.method_lr_grid(base, "adam")
    with pytest.raises(ValueError, match="quality: unknown task 'mnist'"):
        quality_tasks.bench_task("mnist")
    assert quality.main(["--tasks", "mnist"]) == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err
    assert quality.main(["--methods", "adam"]) == 2
    assert "invalid choice: 'adam'" in capsys.readouterr().err
    assert quality.main(["--holdout", "iris"]) == 2
    assert "invalid choice: 'iris'" in capsys.readouterr().err
    assert quality.main(["--seeds", "1", "1"]) == 2
    assert "--seeds must be distinct, got [1, 1]" in capsys.readouterr().err


def test_the_command_reports_test_losses_and_holdout_tasks(tmp_path, capsys):
    pytest.importorskip("schedulefree")
    out = tmp_path / "q.json"
    argv = ["--size", "tiny", "--seeds", "0", "--tasks", "wine-mlp", "digits-finetune", "--holdout", "wine-mlp",
            "--methods", "clan", "cosine", "schedulefree", "--out", str(out)]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "### Tasks" in printed and "### Held-out tasks" in printed
    assert "| digits-finetune | schedulefree |" in printed and "Over all 1 (task, seed) pairs" in printed
    saved = json.loads(out.read_text())
    assert saved["holdout"] == ["wine-mlp"] and saved["methods"] == ["clan", "cosine", "schedulefree"]
    res = saved["results"]
    assert res["wine-mlp"]["holdout"] and not res["digits-finetune"]["holdout"]
    for task in res.values():
        for runs in task["runs"].values():
            assert all(math.isfinite(r["test_loss"]) for r in runs)
        assert "test_clan_better" in task["summary"]["cosine"]
    assert set(saved["overall"]["tasks"]) == {"cosine", "schedulefree"}
    assert saved["overall"]["holdout"]["cosine"]["pairs"] == 1


def test_the_docstring_examples_run():
    for module in (quality, quality_tasks):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module.__name__}"
