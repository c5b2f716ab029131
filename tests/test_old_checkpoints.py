"""Checkpoints of the previous format resume to exactly what their run gave, and those runs still give it.

``tests/data/checkpoints_v2/`` holds run directories stopped mid-run by the release before the
clan held its horizon, plan and kept incumbent (run checkpoint format 2, clan state format 1),
and ``<run>.expected.pt``: that release's uninterrupted outcome of each run (the best model's
weights, the history and the final record). The runs cover a cooperative warmup and anneal,
the default schedule (search, then rounds or one data-parallel model), growth with a data
change, a sweep, PBT, and freezing with the paired test. The comparisons are bitwise, with the
one torch thread the tests run on (torch 2.13.0 on CPU: another build may round differently).

Two things changed on purpose since: the final evaluation scores each model once (identical
members as one plain model, different ones in the vmapped pass that picks the best), so the
final record's losses round differently (compared to 1e-6 here); on CPU the members of a
round are scored one after another rather than in one vmapped pass, so a round's losses, gain
and confidence round differently too (to 1e-6 here; every selection and weight stays
bitwise); and a fresh run sets a test split aside from its validation data, which the fresh runs
below turn off (``data.test_fraction = 0``, what a resumed old run gets);
and the run's history records keep one step counter (``start_step``/``end_step``, not the
clan's ``step``).
"""

import dataclasses
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
    history, old_history = json.loads(json.dumps(results.history)), json.loads(outcome["history"])
    for ours, theirs in zip(history, old_history, strict=True):
        ours.pop("step", None), theirs.pop("step", None)  # the run's records keep one step counter now
        if "sources" not in theirs:  # truncation's rounds record who copied whom now
            ours.pop("sources", None)
        if ours["kind"] == "cooperative":  # scored as one model now
            assert ours.pop("val_loss") == pytest.approx(theirs.pop("val_loss"), rel=1e-6, nan_ok=True)
        if "val_losses" in theirs:  # a round's members are scored one after another now
            scale = max(abs(v) for v in theirs["val_losses"])
            assert ours.pop("val_losses") == pytest.approx(theirs.pop("val_losses"), rel=1e-6, nan_ok=True)
            # The gain is a difference of two such losses, so its rounding is the losses' (not its own
            # size's); the confidence is a t-test's on paired differences of that size.
            for key, tolerance in (("gain", 1e-6 * scale), ("confidence", 1e-3)):
                if key in theirs:
                    assert ours.pop(key) == pytest.approx(theirs.pop(key), abs=tolerance, nan_ok=True), key
    assert history == old_history
    final = {k: v for k, v in results.final.items() if not k.startswith("seconds")}
    old = json.loads(outcome["final"])
    for key in ("member_val_losses", "val_loss", "val_accuracy", "last_val_loss"):
        assert (key in final) == (key in old), key
        if key in old:
            assert final.pop(key) == pytest.approx(old.pop(key), rel=1e-6), key
    assert json.loads(json.dumps(final)) == old


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
    config = config.replace(data=dataclasses.replace(config.data, test_fraction=0.0))
    assert_same_outcome(TrainingMachine(config).train(), expected(run))
