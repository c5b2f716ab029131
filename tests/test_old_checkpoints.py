"""Checkpoints of the previous format resume to exactly what their run gave, and those runs still give it.

``tests/data/checkpoints_v2/`` holds run directories stopped mid-run by the release before the
clan held its horizon, plan and kept incumbent (run checkpoint format 2, clan state format 1),
and ``<run>.expected.pt``: that release's uninterrupted outcome of each run (the best model's
weights, the history and the final record). The runs cover a cooperative warmup and anneal,
the default schedule (search, then rounds or one data-parallel model), growth with a data
change, a sweep, PBT, and freezing with the paired test. The comparisons are bitwise, with the
one torch thread the tests run on (torch 2.13.0 on CPU: another build may round differently).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vmapclan import RunConfig, TrainingMachine
from vmapclan.resume import load_run_checkpoint

DATA = Path(__file__).parent / "data" / "checkpoints_v2"
STOPPED = sorted(p.name for p in DATA.iterdir() if p.is_dir())
RUNS = sorted({name.rsplit("-", 1)[0] for name in STOPPED})


def expected(run: str) -> dict:
    return torch.load(DATA / f"{run}.expected.pt")


def assert_same_outcome(results, outcome: dict) -> None:
    weights = results.best_model.state_dict()
    assert weights.keys() == outcome["best_model"].keys()
    for name, value in outcome["best_model"].items():
        assert torch.equal(weights[name], value), name
    assert json.loads(json.dumps(results.history)) == json.loads(outcome["history"])
    final = {k: v for k, v in results.final.items() if k != "seconds"}
    assert json.loads(json.dumps(final)) == json.loads(outcome["final"])


def test_the_fixtures_are_of_the_previous_format():
    assert len(STOPPED) >= 10 and len(RUNS) == 7
    for name in STOPPED:
        state = load_run_checkpoint(DATA / name / "checkpoint.pt")
        assert state["format_version"] == 2 and state["clan"]["format_version"] == 1
        assert "clock" in state["machine"] and "time_step" not in state["clan"]


@pytest.mark.parametrize("name", STOPPED)
def test_an_old_checkpoint_resumes_to_its_runs_outcome(tmp_path, name):
    run = tmp_path / name
    shutil.copytree(DATA / name, run)
    assert_same_outcome(TrainingMachine.resume(run).train(), expected(name.rsplit("-", 1)[0]))


@pytest.mark.parametrize("run", RUNS)
def test_the_run_gives_what_it_gave_before(run):
    config = RunConfig.from_toml(DATA / next(n for n in STOPPED if n.startswith(run + "-")) / "config.toml")
    assert_same_outcome(TrainingMachine(config).train(), expected(run))
