"""Nothing silently wrong, nothing lost: divergence in every phase, run directories, checkpoint integrity, one exit path."""

import errno
import json
import os
import signal
import subprocess
import sys
import warnings

import optree
import pytest
import torch

import vmapclan.machine as machine_module
from vmapclan import Clan, RunConfig, TrainingMachine, load_checkpoint, save_checkpoint
from vmapclan.cli import EXIT_DIVERGED, EXIT_INPUT, EXIT_OK, EXIT_SIGNAL, EXIT_WRITE, main
from vmapclan.machine import TrainingStopped
from vmapclan.selection import rank, truncation_sources

from test_cli import TINY

ARGS = ["--no-progress", "--no-plots", "--threads", "1"]


def tiny(**changes):
    import tomllib

    data = tomllib.loads(TINY)
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return data


def write(tmp_path, data, name="c.toml"):
    import tomli_w

    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


def finite(tree):
    return all(bool(torch.isfinite(t).all()) for t in optree.tree_leaves(tree)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.fixture
def saved_states(monkeypatch):
    """Every state the machine writes as a checkpoint, as (step, every member tensor finite)."""
    saved = []
    real = machine_module.save_run_checkpoint

    def spy(path, clan, state):
        members = [t for t in torch.utils._pytree.tree_leaves(clan.member_state()) if t.is_floating_point()]
        saved.append((clan.time_step, all(bool(torch.isfinite(t).all()) for t in members)))
        real(path, clan, state)

    monkeypatch.setattr(machine_module, "save_run_checkpoint", spy)
    return saved


# -- divergence in every phase ------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_a_diverging_anneal_is_restored_and_no_nan_is_saved(tmp_path, saved_states, fused):
    data = tiny(total_steps=60)
    data["schedule"].append({"name": "anneal", "start_t": 0.8, "end_t": 1.0, "optimizer": {"lr_scale": 1e9},
                             "clan": {"competition": False}})
    data["schedule"][1]["end_t"] = 0.8
    with pytest.warns(RuntimeWarning, match="the whole population diverged"):
        results = TrainingMachine(data, out_dir=tmp_path, fused=fused).train()
    diverged = [r for r in results.history if r.get("event") == "diverged"]
    assert diverged and all(r["kind"] == "cooperative" and r["phase"] == "anneal" for r in diverged)
    assert finite(results.best_model.state_dict()) and results.final["val_loss"] < 10
    assert saved_states and all(ok for _, ok in saved_states)
    assert finite(load_checkpoint(tmp_path / "checkpoint.pt")["clan"]["model"])


def test_a_diverging_warmup_never_becomes_the_restore_point(tmp_path, saved_states):
    data = tiny(total_steps=60)
    data["schedule"][0]["optimizer"] = {"lr": 1e4}
    with pytest.warns(RuntimeWarning, match="restored the state of the start of round 0"):
        results = TrainingMachine(data, out_dir=tmp_path).train()
    assert [r.get("event") for r in results.history[:1]] == ["diverged"]
    assert finite(results.best_model.state_dict())
    assert all(ok for _, ok in saved_states) and saved_states[0][0] == 0


def test_a_population_that_cannot_recover_exits_4_keeping_the_good_checkpoint(tmp_path, capsys, saved_states):
    data = tiny(total_steps=120)  # checks at steps 25, 50, 75 and 100: the 4th divergence is fatal
    data["schedule"] = [{"name": "warmup", "start_t": 0.0, "end_t": 1.0, "optimizer": {"lr": 1e9},
                         "clan": {"competition": False}}]
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(["train", str(write(tmp_path, data)), "--out", str(out), *ARGS]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "vmapclan: training diverged: phase 'warmup' (cooperative, steps 0-120): the training loss or the " \
           "weights became NaN or infinite by step 100" in err
    assert "gave up after 3 consecutive restores; the last good checkpoint (step 0) is kept in" in err
    assert all(ok for _, ok in saved_states)
    assert finite(load_checkpoint(out / "checkpoint.pt")["clan"]["model"])


def test_a_run_never_ends_with_a_non_finite_model(tmp_path, monkeypatch, capsys):
    from vmapclan.tasks import DigitsTask

    monkeypatch.setattr(DigitsTask, "evaluate", lambda self, model, data, target=None: {"loss": float("nan"), "accuracy": 0.0})
    assert main(["train", str(write(tmp_path, tiny(total_steps=12))), "--out", str(tmp_path / "r"), *ARGS]) == 4
    assert "the run ends without a finite model: the best member's validation loss is nan" in capsys.readouterr().err


def test_truncation_replaces_every_non_finite_member():
    losses = torch.tensor([0.3, float("nan"), 0.1, float("inf"), 0.5, 0.2, float("nan"), 0.4])
    order = rank(losses)
    assert order.finite == 5
    sources = truncation_sources(order, 0.25, torch.Generator().manual_seed(0))
    for member in (1, 3, 6):
        assert sources[member] != member and torch.isfinite(losses[sources[member]])
    replaced = [i for i in range(8) if sources[i] != i]
    assert len(replaced) == 3  # the 2 of the bottom quarter would leave a NaN member
    # A plain list of finite members draws as it always did.
    assert torch.equal(truncation_sources(list(order), 0.25, torch.Generator().manual_seed(0))[[2, 5]],
                       torch.tensor([2, 5]))


def test_truncation_clan_step_leaves_no_nan_member():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=8, round_length=2, duty_cycle=1.0,
                selection="truncation", autobind=["adamw"])
    member = clan.round()
    member.step(), member.step()
    with torch.no_grad():
        clan.population.flat[[1, 3, 6]] = float("nan")
    clan.step(torch.tensor([0.3, float("nan"), 0.1, float("nan"), 0.5, 0.2, float("nan"), 0.4]))
    assert bool(torch.isfinite(clan.population.flat).all())


def test_a_phase_needing_more_samples_than_the_data_fails_before_training(tmp_path, capsys):
    data = tiny(total_steps=40)
    data["clan"].update(population_size=8, duty_cycle=1.0)
    data["data"]["batch_size"] = 200
    data["schedule"] = [{"name": "clan", "start_t": 0.0, "end_t": 0.5},
                        {"name": "anneal", "start_t": 0.5, "end_t": 1.0, "clan": {"competition": False}}]
    assert main(["train", str(write(tmp_path, data)), "--out", str(tmp_path / "r"), *ARGS]) == EXIT_INPUT
    assert ("vmapclan: error: schedule[1] ('anneal'): a cooperative step takes population_size x batch_size = "
            "8 x 200 = 1600 samples, but the training data has only 1438; lower data.batch_size or "
            "clan.population_size") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a refused run leaves no directory behind


# -- run directories ------------------------------------------------------------------------------
def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    config, out = write(tmp_path, tiny(total_steps=12)), tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_OK
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_INPUT
    assert (f"vmapclan: error: {out} already holds a run (checkpoint.pt, metrics.jsonl, history.json, schedule.json, "
            f"config.toml, best_model.pt); continue it with --resume {out}, or give --overwrite to replace it"
            ) in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", str(config), "--out", str(out), "--overwrite", *ARGS]) == EXIT_OK
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["event"] for m in metrics].count("final") == 1  # replaced, not appended to
    assert main(["train", "--resume", str(out), "--overwrite"]) == 2


def test_the_lock_keeps_a_second_process_out_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    config, out = write(tmp_path, tiny(total_steps=8)), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vmapclan.rundir import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert f"vmapclan: error: run directory {out} is in use by pid {holder.pid} on host " in err
        assert "wait for that run to end or stop it" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid  # the dead holder's lock is left
    assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_OK
    assert not (out / "run.lock").exists()


def test_resume_refuses_an_edited_config(tmp_path, capsys):
    config, out = write(tmp_path, tiny(total_steps=12)), tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_OK
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text(text.replace("population_size = 3", "population_size = 4"))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *ARGS]) == EXIT_INPUT
    assert ("config.toml sets clan.population_size = 4, the checkpoint's run has 3; a resumed run keeps its "
            "settings: undo the edit, or start a new run") in capsys.readouterr().err
    assert "hidden = 16\n" in text
    (out / "config.toml").write_text(text.replace("hidden = 16\n", ""))  # a setting taken out
    assert main(["train", "--resume", str(out), *ARGS]) == EXIT_INPUT
    assert "config.toml has no model.hidden, the checkpoint's run has 16; a resumed run keeps" in \
        capsys.readouterr().err
    (out / "config.toml").write_text(text)
    assert main(["train", "--resume", str(out), *ARGS]) == EXIT_OK


def test_a_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "checkpoint.pt")
    # In a subprocess with a timeout: a regression would block on the FIFO rather than fail.
    done = subprocess.run([sys.executable, "-m", "vmapclan.cli", "train", "--resume", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_INPUT
    assert "checkpoint.pt is not a regular file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["train", "replay"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_config_or_schedule_that_is_no_file_is_refused_in_one_line_without_blocking(tmp_path, command, kind):
    path = tmp_path / ("config.toml" if command == "train" else "schedule.json")
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    args = [str(path), "--out", str(tmp_path / "run")] if command == "train" else [str(path)]
    done = subprocess.run([sys.executable, "-m", "vmapclan.cli", command, *args, "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_INPUT and "Traceback" not in done.stderr
    said = "is a directory, not a file" if kind == "directory" else "is not a regular file"
    assert done.stderr.count("\n") == 1 and f"{path} {said}" in done.stderr and done.stderr.count(str(path)) == 1


def test_a_schedule_edited_into_settings_the_replay_refuses_is_one_line(tmp_path, capsys):
    from vmapclan.cli import main

    config = write(tmp_path, tiny(total_steps=20))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots"]) == EXIT_OK
    capsys.readouterr()
    saved = json.loads((tmp_path / "run" / "schedule.json").read_text())
    saved["clan"]["kept_step"] = 99999
    (tmp_path / "edited.json").write_text(json.dumps(saved))
    assert main(["replay", str(tmp_path / "edited.json"), "--no-progress", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    assert capsys.readouterr().err == "vmapclan: error: replay: keep_step must be an int in [0, 20], got 99999\n"


def test_an_error_in_the_replay_that_is_not_its_input_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only the replay's own refusals of its input are one line: a bug elsewhere is not hidden as exit 3."""
    from vmapclan.cli import main

    replay_module = sys.modules["vmapclan.replay"]  # the module: vmapclan.replay is also the function's name

    config = write(tmp_path, tiny(total_steps=20))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots"]) == EXIT_OK

    def broken(*args, **kwargs):
        raise ValueError("a model's own bug")

    monkeypatch.setattr(replay_module, "replay", broken)
    with pytest.raises(ValueError, match="a model's own bug"):
        main(["replay", str(tmp_path / "run" / "schedule.json"), "--no-progress"])


@pytest.mark.parametrize("code, name", [(errno.ENOSPC, "No space left on device (ENOSPC)"),
                                        (errno.EROFS, "Read-only file system (EROFS)")])
def test_a_write_error_is_named_in_one_line_and_the_old_checkpoint_stays(tmp_path, monkeypatch, capsys, code,
                                                                         name):
    config, out = write(tmp_path, tiny(total_steps=40, checkpoint_every=1)), tmp_path / "run"
    real, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 6:  # a few checkpoints in
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert main(["train", str(config), "--out", str(out), *ARGS]) == EXIT_WRITE
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vmapclan: error: cannot write the run directory {out}: ") and name in err
    assert "\n" not in err and err.endswith("an existing checkpoint.pt there is intact")
    assert load_checkpoint(out / "checkpoint.pt")["clan"]["time_step"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="a CUDA build")
def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    assert main(["train", str(write(tmp_path, tiny())), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 3
    assert "vmapclan: error: TrainingMachine: device 'cuda' cannot be used: this torch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Clan: device 'cuda' cannot be used: this torch .* is built without CUDA"):
        model = torch.nn.Linear(2, 2)
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, device="cuda")


# -- stopping ----------------------------------------------------------------------------------
RESUME_CONFIG = tiny(total_steps=60, seed=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return TrainingMachine(RESUME_CONFIG, out_dir=tmp_path_factory.mktemp("full")).train()


@pytest.mark.parametrize("stop_at", [5, 23, 43])  # warmup, a round's cooperative part, its competitive part
def test_a_stop_saves_at_that_step_and_resumes_to_the_same_run(uninterrupted, tmp_path, stop_at):
    def stop(event):
        if event["event"] == "step" and event["step"] == stop_at:
            machine.request_stop()

    machine = TrainingMachine(RESUME_CONFIG, out_dir=tmp_path, callback=stop)
    with pytest.raises(TrainingStopped, match=f"stopped at step {stop_at}; checkpoint saved at step {stop_at}"):
        machine.train()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["clan"]["time_step"] == stop_at
    results = TrainingMachine.resume(tmp_path).train()
    strip = lambda r: repr([{k: v for k, v in m.items() if not k.startswith("seconds")} for m in r.metrics])  # noqa: E731
    assert repr(results.history) == repr(uninterrupted.history) and strip(results) == strip(uninterrupted)
    for name, tensor in uninterrupted.best_model.state_dict().items():
        assert torch.equal(results.best_model.state_dict()[name], tensor), name


def test_sigterm_stops_with_a_checkpoint_and_the_command_to_resume(tmp_path):
    config, out = write(tmp_path, tiny(total_steps=150)), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vmapclan.cli", "train", str(config), "--out", str(out), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        os.sched_yield() if hasattr(os, "sched_yield") else None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == EXIT_OK:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == EXIT_SIGNAL + signal.SIGTERM, err
    assert "vmapclan: SIGTERM: stopped at step" in err and f"resume with: vmapclan train --resume {out}" in err
    assert "Traceback" not in err
    assert main(["train", "--resume", str(out), *ARGS]) == EXIT_OK


# -- checkpoint integrity --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def midrun(tmp_path_factory):
    """A run directory stopped in the middle of a round (step 23)."""
    out = tmp_path_factory.mktemp("mid")

    def stop(event):
        if event["event"] == "step" and event["step"] == 23:
            machine.request_stop()

    machine = TrainingMachine(RESUME_CONFIG, out_dir=out, callback=stop)
    with pytest.raises(TrainingStopped):
        machine.train()
    return out


def edited(state, edit):
    edit(state)
    return state


EDITS = {
    "negative loss_count": (lambda s: s["machine"].update(loss_count=-4),
                            r"machine/loss_count must be 0 \(steps since the last training-loss record at step 23\), got -4"),
    "loader position 1e9": (lambda s: s["clan"]["loader"].update(position=10**9),
                            r"loader/position must be an int in \[0, 1438\], got 1000000000"),
    "5-element permutation": (lambda s: s["clan"]["loader"].update(perm=torch.arange(5)),
                              "the checkpoint's loader permutation is \\[5\\], the training data has 1438 samples"),
    "not a permutation": (lambda s: s["clan"]["loader"]["perm"].__setitem__(0, 1),
                          "loader/perm is not a permutation of 1438 samples"),
    "NaN weights": (lambda s: s["clan"]["model"]["params"].fill_(float("nan")),
                    "holds NaN or infinite values in every member"),
    "gene out of bounds": (lambda s: s["clan"]["genomes"]["lr"].fill_(5.0),
                           "the checkpoint's genomes: gene 'lr': values .* leave the bounds"),
    "incumbent out of bounds": (lambda s: s["clan"]["incumbent"]["eps"].fill_(1.0),
                                "the checkpoint's incumbent: gene 'eps'"),
    "round_step past the round": (lambda s: s["clan"].update(round_step=99),
                                  r"round_step must be an int in \[0, 10\], got 99"),
    "clock past the end": (lambda s: s["clan"].update(time_step=999), r"time_step must be an int in \[0, 60\]"),
    "no machine": (lambda s: s.pop("machine"), "has no 'machine' table; it is not a run checkpoint"),
    "history not a list": (lambda s: s["machine"].update(history=3), "machine/history must be a list of records"),
    "weights of another size": (lambda s: s["clan"]["model"].update(params=torch.zeros(3, 7)),
                                r"the checkpoint's params is torch.float32 \[3, 7\], expected torch.float32"),
    "optimizer moments of another dtype": (
        lambda s: s["clan"]["optimizer"].update(exp_avg=s["clan"]["optimizer"]["exp_avg"].double()),
        "the checkpoint's optimizer/exp_avg is torch.float64"),
    "generator state": (lambda s: s["clan"].update(generator=torch.zeros(3, dtype=torch.uint8)),
                        "the checkpoint's generator is torch.uint8 \\[3\\], expected a generator state"),
    "config edited inside": (lambda s: s["machine"]["config"].update(total_steps=70),
                             r"the checkpoint's total_steps is 60, this clan's is 70"),
    "round length edited inside": (lambda s: s["machine"]["config"]["clan"].update(round_length=7),
                                   "at step 23 the plan has a round of"),
    "population edited inside": (lambda s: s["machine"]["config"]["clan"].update(population_size=4),
                                 "the checkpoint's population_size is 3, this clan's is 4"),
    "restore point of another size": (lambda s: s["clan"]["last_good"].update(params=torch.zeros(2)),
                                      "the checkpoint's last_good/params is torch.float32 \\[2\\]"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_hand_edited_checkpoint_is_refused_in_one_line(midrun, tmp_path, capsys, name):
    edit, message = EDITS[name]
    import shutil

    run = tmp_path / "run"
    shutil.copytree(midrun, run)
    (run / "config.toml").unlink()  # the edits are inside the checkpoint (an edited config.toml: see above)
    save_checkpoint(edited(load_checkpoint(run / "checkpoint.pt"), edit), run / "checkpoint.pt")
    assert main(["train", "--resume", str(run), *ARGS]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("vmapclan: error: ") and "\n" not in err, err
    import re

    assert re.search(message, err), err


def test_damaged_files_are_refused_before_torch_reads_them(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.arange(4)}, path)
    good = path.read_bytes()
    header_end = good.index(b"\n") + 1
    cases = {
        "payload byte": (good[:header_end + 40] + bytes([good[header_end + 40] ^ 1]) + good[header_end + 41:],
                         "is damaged: its contents do not match their sha256 hash"),
        "truncated": (good[:-10], "holds .* bytes after its header, its header says .*: the file is truncated"),
        "header": (good.replace(b"sha256=", b"sha257="), "has a damaged header"),
        "future version": (good.replace(b"checkpoint 2 ", b"checkpoint 3 "),
                           "has checkpoint format 3, this vmapclan reads format 2"),
    }
    for name, (data, message) in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path)
    path.write_bytes(good)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(4))


def test_stale_temporary_files_are_removed(tmp_path):
    mine = tmp_path / f".tmp-c.pt-{os.getpid()}-abc"  # a live writer's (this process): kept
    dead = tmp_path / ".tmp-c.pt-999999999-xyz"  # no such pid
    old = tmp_path / ".tmp-c.pt-k2j_3l"  # an older writer's name, without a pid
    other = tmp_path / ".tmp-d.pt-999999999-xyz"  # another file's
    for p in (mine, dead, old, other):
        p.write_bytes(b"")
    save_checkpoint({"x": torch.zeros(1)}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.pt", mine.name, other.name])


def test_a_refused_state_leaves_the_clan_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    make = lambda seed: Clan(model, torch.optim.AdamW(model.parameters()), population_size=3,  # noqa: E731
                             round_length=4, duty_cycle=0.5, autobind=["adamw"], seed=seed)
    state, clan = make(1).state_dict(), make(2)
    before = {k: v.clone() for k, v in clan.genomes.items()}, clan.population.flat.clone()
    state["loader"]["position"] = -1
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's loader/position must be an int"):
        clan.load_state_dict(state)
    assert all(torch.equal(clan.genomes[k], v) for k, v in before[0].items())
    assert torch.equal(clan.population.flat, before[1])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"genome_config": "lr"}, TypeError, "Clan: genome_config must be a dict {gene name: Gene or dict}, got 'lr'"),
    ({"autobind": None}, TypeError, "Clan: autobind must be 'adamw', 'gradient_accumulation' or a list of them, "
                                    "got None"),
    ({"truncation_fraction": "x"}, ValueError, r"Clan: truncation_fraction must be in \(0, 0.5\], got 'x'"),
    ({"population_size": 2**40}, ValueError, "Clan: population_size=1099511627776 needs about .* GiB on cpu, more "
                                             "than its"),
    ({"init": "clone"}, ValueError, "Clan: init must be 'copy' or 'independent', got 'clone'"),
    ({"seed": 2**64}, ValueError, r"Clan: seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"),
    ({"device": "abacus"}, ValueError, "Clan: device must be a device such as 'cpu' or 'cuda', got 'abacus'"),
])
def test_clan_arguments_are_refused_with_value_or_type_errors(kwargs, error, message):
    model = torch.nn.Linear(3, 2)
    settings = dict(population_size=3, round_length=4, duty_cycle=0.5, autobind=["adamw"])
    settings.update(kwargs)
    with pytest.raises(error, match=message):
        Clan(model, torch.optim.AdamW(model.parameters()), **settings)
