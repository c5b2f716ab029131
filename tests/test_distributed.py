"""A clan across processes (gloo over loopback) equals the same clan in one process.

Each multi-process test forks its ranks from the test process, with the environment ``torchrun``
would give them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), running
``dist_worker.py``, and bounds them with a wall-clock limit, so that a hang fails the test instead
of the suite. The one-process reference runs the same code without a group.
"""

import multiprocessing
import os
import re
import socket
import warnings

import optree
import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_worker
import vmapclan.clan as clan_module
import vmapclan.distributed as clan_module_distributed
from vmapclan import Clan
from vmapclan.distributed import ClanGroup, init_from_env, resolve_group

LIMIT = 120  # seconds any one group of ranks may run (a few seconds on an idle machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, out, scenario: str, limit: float = LIMIT, hung: int | None = None,
              **options) -> list[int]:
    """Run ``scenario`` of ``dist_worker.py`` as ``world`` ranks (one process without a group for ``world=0``).

    The ranks are forked from this process (torch is imported already) and killed if they run past
    ``limit`` seconds; rank ``hung`` is killed as soon as the others have ended. Returns their exit
    codes (``-9``: killed by SIGKILL).
    """
    return wait_ranks(start_ranks(world, out, scenario, **options), limit, hung)


def start_ranks(world: int, out, scenario: str, **options) -> list:
    """Fork the ranks of :func:`run_ranks` and return them running."""
    fork = multiprocessing.get_context("fork")
    port = free_port()
    procs = [fork.Process(target=dist_worker.rank_main, args=(scenario, str(out), world, rank, port), kwargs=options)
             for rank in range(max(world, 1))]
    for p in procs:
        p.start()
    return procs


def wait_ranks(procs: list, limit: float = LIMIT, hung: int | None = None) -> list[int]:
    """Wait for the ranks of :func:`start_ranks` as :func:`run_ranks` does; their exit codes."""
    try:
        for rank, p in enumerate(procs):
            if rank != hung:
                p.join(timeout=limit)
                assert p.exitcode is not None, f"rank {rank} ran past {limit} s"
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    return [p.exitcode for p in procs]


def result(out) -> dict:
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process clan of the same 6 members and seed (Member loop, 18 steps: 3 rounds)."""
    out = tmp_path_factory.mktemp("single")
    assert run_ranks(0, out, "train") == [0]
    return result(out)


def assert_same_run(ours: dict, reference: dict) -> None:
    """Same winners, genomes and incumbents; every member tensor within float32 rounding.

    The numbers differ by rounding only: one process sums the members' gradients in one
    backward (and one mean), several processes sum each rank's part and then the parts.
    """
    assert [r["winner"] for r in ours["history"]] == [r["winner"] for r in reference["history"]]
    assert [r["genomes"] for r in ours["history"]] == [r["genomes"] for r in reference["history"]]
    assert [r["incumbent"] for r in ours["history"]] == [r["incumbent"] for r in reference["history"]]
    for a, b in zip(ours["history"], reference["history"]):
        torch.testing.assert_close(torch.tensor(a["val_losses"]), torch.tensor(b["val_losses"]), rtol=1e-5, atol=1e-5)
    mine, theirs = ours["state"], reference["state"]
    for key in ("round", "round_step", "global_step"):
        assert mine[key] == theirs[key]
    for key in ("genomes", "incumbent", "loader", "generator"):  # exactly: drawn from the same generators
        for x, y in zip(optree.tree_leaves(mine[key], none_is_leaf=True),
                        optree.tree_leaves(theirs[key], none_is_leaf=True)):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    for x, y in zip(optree.tree_leaves((mine["model"], mine["optimizer"])),
                    optree.tree_leaves((theirs["model"], theirs["optimizer"]))):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)  # the [6, ...] rows of the whole clan
        else:
            assert x == y


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(tmp_path, single, world):
    assert run_ranks(world, tmp_path, "train") == [0] * world
    ours = result(tmp_path)
    assert ours["world_size"] == world and ours["state"]["world_size"] == world
    assert_same_run(ours, single)
    for name, value in ours["best"].items():
        torch.testing.assert_close(value, single["best"][name], rtol=1e-5, atol=1e-5)


def test_a_weight_term_across_ranks_equals_one_process(tmp_path, single):
    """A weight penalty from ``member.model.weight_term`` on 2 ranks (each a sub-population of 3,
    cooperating as one model, accumulating) trains as one process does, and it does train."""
    reference = tmp_path / "one"
    reference.mkdir()
    assert run_ranks(0, reference, "train", weight_term=True) == [0]
    assert run_ranks(2, tmp_path, "train", weight_term=True) == [0, 0]
    assert_same_run(result(tmp_path), result(reference))
    penalised, plain = result(reference)["best"], single["best"]
    assert not all(torch.equal(t, plain[name]) for name, t in penalised.items())  # the term did train


@pytest.mark.parametrize("backward", ["autograd", "vmap"])
def test_fused_step_across_ranks_equals_one_process(tmp_path, backward):
    """FusedStep's one-model cooperative step does its all-reduce too, with either backward (2 ranks against 1 process)."""
    reference = tmp_path / "one"
    reference.mkdir()
    assert run_ranks(0, reference, "train", fused=True, backward=backward, steps=12) == [0]
    assert run_ranks(2, tmp_path, "train", fused=True, backward=backward, steps=12) == [0, 0]
    assert_same_run(result(tmp_path), result(reference))


def test_killed_and_resumed_on_other_ranks_ends_identical(tmp_path, single):
    """2 ranks save mid-round (step 9, competitive) and stop dead; 3 ranks resume: the run ends as one process's.

    The checkpoint holds the whole clan's rows, so another world size takes its own members from it.
    """
    assert run_ranks(2, tmp_path, "train", stop_at=9) == [0, 0]
    assert not os.path.exists(tmp_path / "result.pt")
    assert run_ranks(3, tmp_path, "train", resume=True) == [0, 0, 0]
    assert_same_run(result(tmp_path), single)


def test_killed_rank_fails_the_others_naming_it(tmp_path):
    """Rank 1 dies (SIGKILL) in the cooperative phase: ranks 0 and 2 fail with a message naming rank 1.

    Rank 0 hosts the rendezvous store the others ask who stopped answering: it stays until a
    rank that saw the failure later has read it (before, rank 2 sometimes found the store gone
    under load and could not name rank 1).
    """
    codes = run_ranks(3, tmp_path, "kill", limit=90, victim=1, at=1, timeout=15)
    assert codes[1] == -9
    assert codes[0] == codes[2] == 7
    prefix = "DistributedError: vmapclan: the cooperative gradient all-reduce failed on rank {} of 3 within the timeout " \
             "of 15 s: "
    named = "rank 1 stopped answering (died or hung)"
    for rank in (0, 2):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert message.startswith(prefix.format(rank) + named), message


def test_hung_rank_fails_the_others_within_the_timeout(tmp_path):
    """Rank 1 stops answering (it sleeps): rank 0 gives up after the group's timeout (3 s), naming rank 1."""
    codes = run_ranks(2, tmp_path, "hang", limit=90, hung=1, victim=1, at=1, timeout=3)
    assert codes == [7, -9]
    message = (tmp_path / "error-0.txt").read_text()
    assert message.startswith("DistributedError: vmapclan: the cooperative gradient all-reduce failed on rank 0 of 2 "
                              "within the timeout of 3 s: rank 1 stopped answering (died or hung)"), message


def test_mismatched_ranks_are_refused_at_start(tmp_path):
    assert run_ranks(2, tmp_path, "mismatch", limit=60) == [7, 7]
    message = (tmp_path / "error-0.txt").read_text()
    assert message.startswith("ValueError: Clan: the ranks disagree on the clan's settings, seed and model: rank 1 "
                              "differs from rank 0; every rank must run the same configuration and seed")


COMMAND_STEPS = 60  # the digits config's warmup, one round and the anneal


@pytest.fixture(scope="module")
def command_ready():
    """The command and the digits imported and loaded once here, not in each forked rank."""
    import vmapclan.cli  # noqa: F401
    from vmapclan.tasks import _digits

    _digits()  # scikit-learn's import is most of a small run's time


@pytest.fixture(scope="module")
def command_one(tmp_path_factory, command_ready):
    """``vmapclan train`` of the digits config in one process: the run directory's parent."""
    one = tmp_path_factory.mktemp("command-one")
    assert run_ranks(0, one, "command", steps=COMMAND_STEPS) == [0]
    return one


def test_command_on_two_ranks_equals_one_process(tmp_path, command_one):
    """``vmapclan train`` on 2 ranks (the environment torchrun gives them) writes the run one process would."""
    import json

    one, two = command_one, tmp_path / "two"
    two.mkdir()
    assert run_ranks(2, two, "command", steps=COMMAND_STEPS) == [0, 0]
    finals = [json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two)]
    assert (finals[0]["world_size"], finals[1]["world_size"]) == (1, 2)
    assert finals[1]["val_loss"] == pytest.approx(finals[0]["val_loss"], rel=1e-5)
    winners = [[r["winner"] for r in json.loads((d / "run" / "history.json").read_text()) if r["kind"] == "round"]
               for d in (one, two)]
    assert winners[0] == winners[1]
    assert (two / "run" / "config.toml").read_text().startswith("# world_size = 2  (processes that trained this run)")


def test_command_stopped_and_resumed_on_ranks_equals_one_process(tmp_path, command_one):
    """SIGTERM stops both ranks at the same step with a checkpoint (exit 143); 2 ranks resume to one process's end."""
    import json
    import signal
    import time

    one, two = command_one, tmp_path / "two"
    two.mkdir()
    procs = start_ranks(2, two, "command", steps=COMMAND_STEPS)
    metrics = two / "run" / "metrics.jsonl"
    deadline = time.monotonic() + LIMIT
    # Early in the run: once training steps are recorded (the signal reaches the ranks at different
    # steps; they agree on one).
    while time.monotonic() < deadline and all(p.is_alive() for p in procs) and not (
            metrics.exists() and '"event": "train"' in metrics.read_text()):
        time.sleep(0.01)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    assert wait_ranks(procs) == [128 + signal.SIGTERM] * 2
    assert run_ranks(2, two, "command", resume=True) == [0, 0]
    finals = [json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two)]
    assert finals[1]["val_loss"] == pytest.approx(finals[0]["val_loss"], rel=1e-5)
    assert finals[1]["step"] == finals[0]["step"] == COMMAND_STEPS
    histories = [json.loads((d / "run" / "history.json").read_text()) for d in (one, two)]
    assert [r.get("winner") for r in histories[0]] == [r.get("winner") for r in histories[1]]


# -- without processes ---------------------------------------------------------------------------------
def test_group_without_torch_distributed_is_refused():
    assert not dist.is_initialized()
    assert resolve_group(None, 8) is None
    with pytest.raises(ValueError, match="Clan: process_group was given but torch.distributed is not initialised"):
        Clan(population_size=4, round_length=4, duty_cycle=0.5, autobind=["adamw"], process_group=object())


def test_population_must_split_equally(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match=r"Clan: population_size=6 must be a multiple of the world size 4 "
                                         r"\(each rank holds population_size / world_size members\)"):
        resolve_group(None, 6)


class FakeGroup(ClanGroup):
    """Two ranks, without the processes: this is rank 0."""

    def __init__(self, population_size):
        self.group, self.rank, self.world_size, self.timeout, self.backend = None, 0, 2, None, "gloo"
        self.local_size, self.offset = population_size // 2, 0

    def check_same(self, text, what, who="Clan"):
        pass


@pytest.mark.parametrize("settings, message", [
    ({"selection": "truncation", "duty_cycle": 1.0},
     "Clan: selection='truncation' is not supported across 2 ranks .a member may copy one held by another rank.; "
     "use selection='winner' or None"),
    ({"init": "independent", "duty_cycle": 1.0}, "Clan: init='independent' is not supported across 2 ranks; use "
                                                  "init='copy'"),
])
def test_what_ranks_cannot_share_is_refused(monkeypatch, settings, message):
    monkeypatch.setattr(clan_module, "resolve_group", lambda group, p: FakeGroup(p))
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=4, round_length=4,
             autobind=["adamw"], **settings)


def test_local_shapes_of_a_rank(monkeypatch):
    """Rank 0 of 2 holds members 0 and 1 of 4: its loader, genes and losses are theirs; genomes are everyone's."""
    monkeypatch.setattr(clan_module, "resolve_group", lambda group, p: FakeGroup(p))
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=4, round_length=4, duty_cycle=0.5,
                autobind=["adamw"])
    assert (clan.local_size, clan.member_offset, clan.world_size) == (2, 0, 2)
    assert clan.population.population_size == 2 and clan.genomes["lr"].shape == (4,)
    x = torch.arange(40.0).view(20, 2).repeat(1, 1)[:, :1].expand(20, 3).contiguous()
    first = next(iter(clan.loader((x,), batch_size=2)))[0]
    assert first.shape == (2, 2, 3)
    member = clan.round()
    assert member.get_gene("lr").shape == (2,)
    with pytest.raises(ValueError, match=r"clan.step: val_losses must have shape \[2\] or \[2, K\] \(one loss per "
                                         r"member, or K per member; this rank's members: 2 of 4\), got \[4\]"):
        while not member.done:
            member.step()
        clan.step(torch.zeros(4))  # the whole clan's losses where this rank's are due


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_warns_of_the_data_plan(monkeypatch, rank):
    """Every rank follows the same plan on the same data: one warning for the run, not one a rank."""
    def group(p):
        fake = FakeGroup(p)
        fake.rank, fake.offset = rank, rank * fake.local_size
        return fake

    monkeypatch.setattr(clan_module, "resolve_group", lambda group_, p: group(p))
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=4, total_steps=100, autobind=["adamw"])
    loader = clan.loader((torch.randn(100, 3),), batch_size=8)  # 32 of 100 samples a cooperative step: scarce
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(loader))
    assert [str(w.message).split(" (")[0] for w in caught if "clan.loader" in str(w.message)] == (
        ["clan.loader: for 100 training samples at batch_size=8"] if rank == 0 else [])


def test_init_from_env_checks_its_timeout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("VMAPCLAN_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VMAPCLAN_TIMEOUT must be a number of seconds, got 'soon'"):
        init_from_env()
    with pytest.raises(ValueError, match="init_from_env: timeout must be a positive number of seconds, got 0"):
        init_from_env(timeout=0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is False


class FakeStore:
    """The rendezvous store, as far as a failed collective's report uses it."""

    def __init__(self, keys=()):
        self.keys = set(keys)

    def set(self, key, value):
        self.keys.add(key)

    def check(self, keys):
        return all(k in self.keys for k in keys)


@pytest.mark.parametrize("store, who", [
    (FakeStore({"vmapclan/failed/1"}), "every rank saw it fail (a rank ran different steps, or the network failed)"),
    (None, "another rank stopped answering, and the rendezvous store is unreachable too"),
])
def test_failed_collective_reports(monkeypatch, store, who):
    def get_store():
        if store is None:
            raise RuntimeError("connection refused")
        return store

    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", get_store)
    group = FakeGroup(4)
    group.timeout = 7.0

    def broken():
        raise RuntimeError("Connection closed by peer\nmore detail")

    with pytest.raises(clan_module_distributed.DistributedError, match=(
            f"vmapclan: the test collective failed on rank 0 of 2 within the timeout of 7 s: {re.escape(who)} "
            r"\(Connection closed by peer\)$")):
        group._collective("the test collective", broken)


def test_communication_model_counts_one_model_and_one_member():
    """The cooperative all-reduce moves one model's gradient (not P); selection, P losses and one member's state."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=6, round_length=4, duty_cycle=0.5,
                autobind=["adamw"])
    n = sum(p.numel() for p in model.parameters())
    model_bytes = clan_module_distributed.communication_bytes(clan, world_size=4)
    # params, grads and two moments in float32; BatchNorm's running stats (float32) and count (int64);
    # AdamW's step (float64), accumulation count (int64) and the updates each of the 6 parameters
    # sat out (float64): each padded to 8 bytes.
    pad = clan_module_distributed._padded
    winner = 4 * pad(4 * n) + 2 * pad(4 * 4) + 8 + 8 + 8 + 8 * 6
    assert model_bytes == {"allreduce": 4 * n, "ring_allreduce_sent": int(1.5 * 4 * n), "gather": 48,
                           "winner": winner}


def test_distributed_bench_checks_world_sizes():
    from vmapclan.bench.distributed import format_distributed, run_distributed

    with pytest.raises(ValueError, match="run_distributed: world size 3 must be positive and divide population=8"):
        run_distributed((1, 3), population=8)
    row = {"world": 2, "population": 8, "hidden": 16, "numel": 100, "coop_steps_s": 10.0, "comp_steps_s": 5.0,
           "selection_ms": 1.5, "bytes": {"allreduce": 400, "ring_allreduce_sent": 400, "gather": 64, "winner": 1632}}
    text = format_distributed([row])
    assert "all-reduce of one model's gradient, 400 bytes" in text and "1632 bytes" in text


def test_cuda_graph_across_ranks_is_refused(monkeypatch):
    from vmapclan import FusedStep

    monkeypatch.setattr(clan_module, "resolve_group", lambda group, p: FakeGroup(p))
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=4, round_length=4, duty_cycle=0.5,
                autobind=["adamw"])
    with pytest.raises(ValueError, match=r"FusedStep: cuda_graph=True is not supported for a clan across ranks"):
        FusedStep(clan, torch.nn.functional.cross_entropy, cuda_graph=True)


def test_machine_compares_its_whole_config_across_ranks(monkeypatch):
    """Beyond the clan's settings, the machine has every rank compare the whole run config (total steps, data...)."""
    from vmapclan import TrainingMachine

    class Disagreeing(FakeGroup):
        def check_same(self, text, what, who="Clan"):
            if what == "the run's config":
                raise ValueError(f"{who}: the ranks disagree on {what}: rank 1 differs from rank 0; every rank must "
                                 "run the same configuration and seed")

    monkeypatch.setattr(clan_module, "resolve_group", lambda group, p: Disagreeing(p))
    machine = TrainingMachine({"task": "digits-mlp", "clan": {"population_size": 4}}, 20)
    with pytest.raises(ValueError, match=r"TrainingMachine: the ranks disagree on the run's config: rank 1 differs"):
        machine.prepare()


def test_the_command_takes_down_the_process_group_it_made(tmp_path, command_ready):
    """Under torchrun the command makes the process group; it ends with the command, so nothing of it
    is alive when the interpreter exits (a gloo group left there made 1 run in 5 abort at exit)."""
    assert run_ranks(2, tmp_path, "command", steps=COMMAND_STEPS, own_group=True) == [0, 0]
    assert [(tmp_path / f"group-{rank}.txt").read_text() for rank in (0, 1)] == ["False\n", "False\n"]
