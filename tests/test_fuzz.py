"""Fuzzing: whatever a user writes, the answer is a clean refusal or a run with finite weights.

Three groups, each a small hypothesis search (bounded examples, tiny runs, no deadline):

- TOML configs through the ``vmapclan train`` command (in-process): exit 3 with one line, exit 4
  with one line, or exit 0 with a finite ``best_model.pt``; never a traceback, never a hang.
- Arguments to ``Clan(...)``: ``ValueError``/``TypeError``, or a clan whose members are finite.
- Single-byte corruptions of a mid-run ``checkpoint.pt``: the resume refuses (exit 3), or ends
  exactly where the clean run ends.

``VMAPCLAN_FUZZ_EXAMPLES`` scales every search (default: the suite's small budget);
``VMAPCLAN_FUZZ_TALLY=FILE`` appends each case's outcome to FILE as JSON lines.
"""

import json
import math
import os
import shutil
import warnings

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from vmapclan import Clan, Gene, load_checkpoint
from vmapclan.cli import EXIT_DIVERGED, EXIT_INPUT, EXIT_OK, main

SCALE = int(os.environ.get("VMAPCLAN_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    return settings(max_examples=SCALE or default, deadline=None, derandomize=not SCALE,
                    suppress_health_check=list(HealthCheck))


def tally(group: str, outcome: str, case) -> None:
    path = os.environ.get("VMAPCLAN_FUZZ_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"group": group, "outcome": outcome, "case": repr(case)[:300]}) + "\n")


def one_line_error(err: str) -> bool:
    """stderr of a refusal: one ``vmapclan:`` line (the clan's divergence warnings may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    final = [line for line in lines if line.startswith("vmapclan: ")]
    return bool(final) and "Traceback" not in err and lines[-1] == final[-1]


# -- configs through the command ----------------------------------------------------------------
numbers = st.sampled_from([0, -1, 0.5, 1, 1.0, 2, 3, 1e-3, 1e3, 1e9, 1e12, math.inf, -math.inf, math.nan, True,
                           "x", [1], {"a": 1}])
small_ints = st.one_of(st.integers(1, 6), st.sampled_from([0, -2, 1.5, "3", 10**6, True]))


def pick(draw, good, bad=numbers):
    """Mostly a sensible value, one time in six a hostile one: most configs get far enough to train."""
    return draw(bad) if draw(st.integers(0, 5)) == 5 else draw(good)


@st.composite
def configs(draw):
    config = {"task": pick(draw, st.just("digits-mlp"), st.sampled_from(["mnist", 3])),
              "total_steps": pick(draw, st.integers(1, 10), st.sampled_from([0, -5, 2.5, "9"])),
              "model": {"hidden": pick(draw, st.integers(2, 12), st.sampled_from([0, "big"]))},
              "data": {"batch_size": pick(draw, st.integers(1, 12), st.sampled_from([0, 200, 2000, 1.5])),
                       "eval_samples": pick(draw, st.sampled_from([16, 0, 32]), st.just(-1))}}
    clan = {}
    for key, good in (("population_size", st.integers(1, 6)), ("round_length", st.integers(1, 6)),
                      ("duty_cycle", st.sampled_from([0.25, 0.5, 1.0])),
                      ("selection", st.sampled_from(["winner", "winner", "truncation", "none"])),
                      ("init", st.sampled_from(["copy", "copy", "independent"]))):
        if draw(st.booleans()):
            clan[key] = pick(draw, good, st.one_of(numbers, st.sampled_from(["best", "clone"])))
    if draw(st.integers(0, 3)) == 3:
        gene = draw(st.sampled_from(["lr", "eps", "weight_decay", "dropout", "betas/0"]))
        clan["genes"] = {gene: {draw(st.sampled_from(["low", "high", "init", "scale", "factors", "bogus"])):
                                draw(st.one_of(numbers, st.sampled_from(["log", "linear", [1.0], [0.5, 2.0]])))}}
    if clan.get("selection") == "none" and draw(st.booleans()):
        clan["lr_grid"] = [pick(draw, st.sampled_from([1e-3, 1e-2, 1e9]))] * clan.get("population_size", 8)
    config["clan"] = clan
    if draw(st.integers(0, 3)) == 3:
        config["optimizer"] = {draw(st.sampled_from(["lr", "eps", "weight_decay", "betas"])):
                               pick(draw, st.sampled_from([1e-3, 1e-2, 1e4, 1e12]), st.one_of(numbers, st.just([0.9])))}
    if draw(st.booleans()):
        split = pick(draw, st.sampled_from([0.3, 0.5]), st.sampled_from([0.0, 1.0, -0.5]))
        first = {"name": "a", "start_t": 0.0, "end_t": split, "clan": {"competition": draw(st.booleans())}}
        second = {"name": "b", "start_t": split, "end_t": 1.0, "clan": {"competition": draw(st.booleans())}}
        for phase in (first, second):
            if draw(st.booleans()):
                phase["optimizer"] = {draw(st.sampled_from(["lr", "lr_scale", "eps", "betas/1"])):
                                      pick(draw, st.sampled_from([0.5, 1e-3, 1e9, 1e12]))}
            if draw(st.integers(0, 3)) == 3:
                phase["data"] = {"batch_size": pick(draw, st.sampled_from([1, 4]), st.sampled_from([200, 2000, 0]))}
            if draw(st.integers(0, 3)) == 3:
                phase["clan"]["duty_cycle"] = pick(draw, st.sampled_from([1.0, 0.5]), st.sampled_from([0.01, 2.0]))
        config["schedule"] = [first, second]
    return config


def finite_model(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in torch.load(path, weights_only=True).values())


@budget(20)
@given(config=configs())
def test_fuzzed_configs_refuse_cleanly_or_train_finite(config, tmp_path_factory):
    work = tmp_path_factory.mktemp("cfg")
    path = work / "c.toml"
    try:
        path.write_text(tomli_w.dumps(config))
    except (TypeError, ValueError):  # tomli_w cannot write it (a NaN in a list, say): not a config file
        tally("configs", "not writable as TOML", config)
        return
    out = work / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capture = _Capture()
        with capture:
            code = main(["train", str(path), "--out", str(out), "--no-progress", "--no-plots", "--threads", "1"])
    assert code in (EXIT_OK, EXIT_INPUT, EXIT_DIVERGED), capture.err
    if code == EXIT_OK:
        assert finite_model(out / "best_model.pt")
        tally("configs", "ran", config)
    else:
        assert one_line_error(capture.err), capture.err
        tally("configs", "refused", capture.err.strip().splitlines()[-1])


class _Capture:
    """stderr of an in-process command (capsys does not reset between hypothesis examples)."""

    def __enter__(self):
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self.err = self._buffer.getvalue()


# -- Clan(...) arguments ----------------------------------------------------------------------
junk = st.sampled_from([None, "x", "", -1, 0, 1, 2.5, math.nan, math.inf, True, [], ["adamw"], {}, {"lr": 1},
                        object(), 10**30, -(10**30), torch.tensor(3)])
ARGUMENTS = {
    "population_size": st.one_of(st.integers(1, 6), junk, st.sampled_from([2**40, 2**31])),
    "round_length": st.one_of(st.integers(1, 8), junk),
    "duty_cycle": st.one_of(st.sampled_from([0.25, 0.5, 1.0, 1]), junk),
    "autobind": st.one_of(st.sampled_from([["adamw"], "adamw", ["adamw", "gradient_accumulation"], (), ["sgd"]]),
                          junk),
    "genome_config": st.one_of(st.sampled_from([{"lr": {"low": 1e-5}}, {"dropout": Gene(0.0, 0.5, scale="linear")},
                                                {"lr": {"high": math.inf}}, {"x": {"low": 2, "high": 1}},
                                                {"lr": "fast"}, {"": Gene(1, 2)}, {3: Gene(1, 2)}]), junk),
    "selection": st.sampled_from(["winner", "truncation", None, "best", 1]),
    "truncation_fraction": st.one_of(st.sampled_from([0.25, 0.5]), junk),
    "init": st.sampled_from(["copy", "independent", "x", None]),
    "seed": st.one_of(st.integers(0, 99), junk, st.just(2**63)),
    "device": st.sampled_from([None, "cpu", "abacus", "cuda:99", 3, torch.device("meta")]),
    "max_grad_norm": st.one_of(st.sampled_from([None, 1.0]), junk),
    "on_divergence": st.sampled_from(["restore", "raise", "ignore", None]),
    "max_restores": st.one_of(st.integers(1, 3), junk),
}


@budget(120)
@given(data=st.data())
def test_fuzzed_clan_arguments_raise_only_value_or_type_errors(data):
    kwargs = {name: data.draw(strategy, label=name) for name, strategy in ARGUMENTS.items()
              if data.draw(st.booleans(), label=f"give {name}")}
    with_model = data.draw(st.booleans(), label="with a model")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) if with_model else None
    optimizer = torch.optim.AdamW(model.parameters()) if with_model else None
    try:
        clan = Clan(model, optimizer, **kwargs)
    except (ValueError, TypeError) as err:
        assert str(err), kwargs
        tally("clan arguments", "refused", kwargs)
        return
    tally("clan arguments", "ran", kwargs)
    if clan.population is not None:
        assert bool(torch.isfinite(clan.population.flat).all())
    for name, spec in clan.genes.items():
        assert bool(((clan.genomes[name] >= spec.low) & (clan.genomes[name] <= spec.high)).all())


# -- corrupted checkpoints ----------------------------------------------------------------------
CORRUPT_CONFIG = """
task = "digits-mlp"
total_steps = 24
seed = 1
checkpoint_every = 1
[model]
hidden = 8
[data]
batch_size = 8
eval_samples = 32
[clan]
population_size = 3
round_length = 6
duty_cycle = 0.5
[[schedule]]
name = "warmup"
start_t = 0.0
end_t = 0.25
clan = { competition = false }
[[schedule]]
name = "clan"
start_t = 0.25
end_t = 1.0
"""


@pytest.fixture(scope="module")
def clean_and_midrun(tmp_path_factory):
    """A finished run, and a copy of its run directory as it stood mid-run (after round 1)."""
    base = tmp_path_factory.mktemp("corrupt")
    config = base / "c.toml"
    config.write_text(CORRUPT_CONFIG)
    clean = base / "clean"
    snapshots = {}

    import vmapclan.machine as machine_module

    real = machine_module.save_run_checkpoint

    def keep_midrun(path, clan, state):
        real(path, clan, state)
        if clan.time_step == 12 and "mid" not in snapshots:
            snapshots["mid"] = base / "mid"
            shutil.copytree(clean, snapshots["mid"], ignore=shutil.ignore_patterns("run.lock"))

    machine_module.save_run_checkpoint = keep_midrun
    try:
        assert main(["train", str(config), "--out", str(clean), "--no-progress", "--no-plots", "--threads", "1"]) == 0
    finally:
        machine_module.save_run_checkpoint = real
    return clean, snapshots["mid"]


def run_result(run_dir):
    history = json.loads((run_dir / "history.json").read_text())
    weights = torch.load(run_dir / "best_model.pt", weights_only=True)
    return repr(history), {k: v.tolist() for k, v in weights.items()}


@budget(30)
@given(where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_a_flipped_byte_is_refused_or_changes_nothing(clean_and_midrun, tmp_path_factory, where, flip):
    clean, mid = clean_and_midrun
    run = tmp_path_factory.mktemp("flip") / "run"
    shutil.copytree(mid, run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    offset = int(where * len(data))
    data[offset] ^= flip
    (run / "checkpoint.pt").write_bytes(bytes(data))
    capture = _Capture()
    with capture:
        code = main(["train", "--resume", str(run), "--no-progress", "--no-plots", "--threads", "1"])
    assert code in (EXIT_OK, EXIT_INPUT), capture.err
    if code == EXIT_INPUT:
        assert one_line_error(capture.err) and "checkpoint" in capture.err, capture.err
        tally("corrupted checkpoints", "refused", (offset, flip))
    else:
        assert run_result(run) == run_result(clean)
        tally("corrupted checkpoints", "ran", (offset, flip))


def test_the_midrun_snapshot_resumes_to_the_clean_run(clean_and_midrun, tmp_path):
    """The corruption test's control: the unflipped snapshot resumes to the clean run's results."""
    clean, mid = clean_and_midrun
    run = tmp_path / "run"
    shutil.copytree(mid, run)
    assert load_checkpoint(run / "checkpoint.pt")["clan"]["time_step"] == 12
    assert main(["train", "--resume", str(run), "--no-progress", "--no-plots", "--threads", "1"]) == EXIT_OK
    assert run_result(run) == run_result(clean)
