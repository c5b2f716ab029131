"""The Lightning integration: a real Trainer on CPU reproduces the plain loop, resumes, and refuses bad setups.

The digits runs use examples/lightning_digits.py at a tiny size: 4 members, rounds of 8 steps
(6 cooperative, 2 competitive), 2 epochs (52 steps, 6 rounds, rounds crossing epochs).
"""

import csv
import importlib
import importlib.util
import pathlib
import sys

import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, Gene, member_loss
from vmapclan.lightning import ClanCallback, ClanModule, LookaheadLoader
from vmapclan.task import KeywordTensors
from vmapclan.tasks import load_digits

from plain_loop import train_step, validation_losses

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY = dict(epochs=2, population_size=4, batch_size=16, round_length=8, duty_cycle=0.25, hidden=16, lr=1e-2, seed=0)
RESUME_STEP = 30  # mid-round, mid-epoch, and the batch the Trainer prefetched there is the round's first competitive


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_digits", EXAMPLES / "lightning_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_loop(example, epochs, population_size, batch_size, round_length, duty_cycle, hidden, lr, seed,
               max_steps=None):
    """The README's loop, top to bottom, on the example's data, model and clan."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val) = load_digits(val_fraction=0.2, seed=seed)
    clan = example.make_clan(population_size, round_length, duty_cycle, hidden, lr, seed)
    loader = clan.loader((x_train, y_train), batch_size=batch_size)
    member = clan.round()
    for _ in range(epochs):
        for x, y in loader:
            train_step(member, F.cross_entropy, x, y)
            if member.done:
                clan.step(validation_losses(member, F.cross_entropy, x_val, y_val))
                member = clan.round()
            if clan.global_step == max_steps:
                return clan
    return clan


@pytest.fixture(scope="module")
def one_thread():
    """The module's runs on one thread, as each test runs (conftest): a matmul splits its sums by
    thread, so runs compared bit for bit must use the same number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain(example, one_thread):
    return plain_loop(example, **TINY)


@pytest.fixture(scope="module")
def run(example, tmp_path_factory, one_thread):
    """One uninterrupted Trainer run, logging to CSV and checkpointing at RESUME_STEP."""
    root = tmp_path_factory.mktemp("lightning_run")
    result = example.main(**TINY, progress=False, log_dir=str(root / "logs"), checkpoint_dir=str(root / "ckpt"),
                          checkpoint_every=RESUME_STEP)
    result["checkpoint"] = root / "ckpt" / f"step={RESUME_STEP}.ckpt"
    return result


def assert_same_history(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a["round"], a["step"], a["winner"]) == (b["round"], b["step"], b["winner"])
        assert a["genomes"] == b["genomes"]
        assert a["incumbent"] == b["incumbent"]
        assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-5, abs=1e-7)


def assert_same_weights(clan_a, clan_b):
    a, b = clan_a.best_model().state_dict(), clan_b.best_model().state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_resumed_exactly(resumed, whole):
    """A resumed run does the same float32 work as the uninterrupted one: bit for bit the same clan."""
    assert resumed.history == whole.history
    for name in ("flat", "grad_flat"):
        assert torch.equal(getattr(resumed.population, name), getattr(whole.population, name)), name
    for name, buffer in whole.population.buffers.items():
        assert torch.equal(resumed.population.buffers[name], buffer), name
    for name, t in whole.optimizer.adamw_state._asdict().items():
        assert torch.equal(getattr(resumed.optimizer.adamw_state, name), t), name
    assert all(torch.equal(resumed.genomes[n], v) for n, v in whole.genomes.items())


# -- a real Trainer against the plain loop ------------------------------------------------------
def test_trainer_run_equals_the_plain_loop(run, plain):
    history = run["history"]
    assert len(history) == 6 and run["steps"] == plain.global_step == 52
    assert_same_history(history, plain.history)
    assert_same_weights(run["clan"], plain)


def test_trainer_run_selects_and_evolves_genes(run):
    history = run["history"]
    assert {rec["winner"] for rec in history} - {0}, "some round must be won by a challenger"
    assert history[-1]["incumbent"]["lr"] != pytest.approx(TINY["lr"])
    for rec in history:  # the members competed with different genes
        assert len(set(rec["genomes"]["lr"])) > 1
        winner = rec["winner"]
        assert rec["incumbent"] == {name: values[winner] for name, values in rec["genomes"].items()}
    assert run["val_accuracy"] > 0.5  # chance is 0.1


def test_logger_gets_every_members_loss_and_genes(run):
    with open(run["metrics_file"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("clan/round")]
    history = run["history"]
    assert len(rows) == len(history)
    for row, rec in zip(rows, history):
        assert int(float(row["clan/round"])) == rec["round"] and int(row["step"]) == rec["step"]
        assert int(float(row["clan/winner"])) == rec["winner"]
        for i in range(TINY["population_size"]):
            assert float(row[f"clan/member_{i}/val_loss"]) == pytest.approx(rec["val_losses"][i], rel=1e-6)
            for gene, values in rec["genomes"].items():
                assert float(row[f"clan/member_{i}/{gene}"]) == pytest.approx(values[i], rel=1e-9)
        assert float(row["clan/incumbent/lr"]) == pytest.approx(rec["incumbent"]["lr"], rel=1e-9)


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_saves_the_loader_before_the_prefetched_batch(run, example):
    state = torch.load(run["checkpoint"], weights_only=False)["callbacks"]["ClanCallback"]["clan"]
    assert state["global_step"] == RESUME_STEP and state["round_step"] == 6  # next: the first competitive step
    reference = plain_loop(example, **TINY, max_steps=RESUME_STEP)
    expected = reference._loader_state
    assert (state["loader"]["epoch"], state["loader"]["position"]) == (expected.epoch, expected.position)
    assert torch.equal(state["loader"]["perm"], expected.perm)
    assert torch.equal(state["loader"]["generator"], expected.generator.get_state())


def test_fit_from_checkpoint_resumes_to_the_same_history(run, example):
    resumed = example.main(**TINY, progress=False, resume=str(run["checkpoint"]))
    assert len(torch.load(run["checkpoint"], weights_only=False)["callbacks"]["ClanCallback"]["clan"]["history"]) == 3
    assert resumed["clan"].global_step == run["clan"].global_step == 52
    assert_resumed_exactly(resumed["clan"], run["clan"])


# -- the loader under Lightning's fetch order (no Trainer needed) ---------------------------------
def one_ahead(iterable):
    """Lightning's fetch order for a loader without a length: batch k + 1 is drawn before step k runs."""
    it = iter(iterable)
    try:
        ahead = next(it)
    except StopIteration:
        return
    while True:
        current = ahead
        try:
            ahead = next(it)
        except StopIteration:
            yield current
            return
        yield current


def small_clan(round_length=5, duty_cycle=0.4, autobind=("adamw",), **settings):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3,
                round_length=round_length, duty_cycle=duty_cycle, autobind=list(autobind), seed=0, **settings)


DATA = (torch.arange(80.0).reshape(20, 4), torch.arange(20) % 3)  # sample i is row i: batches are traceable


def drive(clan, batches, steps=None):
    """Step the clan once per batch (selection on fixed losses); record each batch and the step's phase."""
    seen = []
    for x, _ in batches:
        seen.append((clan.phase, x.clone()))
        member = clan.round()
        member.step()
        if member.done:
            clan.step(torch.tensor([3.0, 1.0, 2.0]))
        if len(seen) == steps:
            break
    return seen


def plain_batches(epochs, **kw):
    clan = small_clan(**kw)
    loader = clan.loader(DATA, batch_size=2)
    return [b for _ in range(epochs) for b in drive(clan, loader)]


def test_lookahead_loader_under_prefetch_gives_the_plain_loop_batches():
    expected = plain_batches(3)
    clan = small_clan()
    loader = LookaheadLoader(clan, DATA, batch_size=2)
    got = [b for _ in range(3) for b in drive(clan, one_ahead(loader))]
    assert [phase for phase, _ in got] == [phase for phase, _ in expected]
    for (phase, x), (_, want) in zip(got, expected):
        assert torch.equal(x, want)
        rows_equal = all(torch.equal(x[i], x[0]) for i in range(len(x)))
        assert rows_equal == (phase == "competitive")  # shards differ; a competitive window is common

    # The hazard is real: the plain ClanLoader, fetched one ahead, serves wrong phases.
    raw_clan = small_clan()
    raw = [b for _ in range(3) for b in drive(raw_clan, one_ahead(raw_clan.loader(DATA, batch_size=2)))]
    assert any(not torch.equal(x, want) for (_, x), (_, want) in zip(raw, expected))


def test_a_new_pass_draws_the_abandoned_prefetched_batch_again():
    expected = plain_batches(1)
    clan = small_clan()
    loader = LookaheadLoader(clan, DATA, batch_size=2)
    first = drive(clan, one_ahead(loader), steps=2)  # a third batch was fetched, never trained on
    rest = drive(clan, one_ahead(loader))
    got = first + rest
    assert len(expected) == 4 and len(got) == 4
    assert all(torch.equal(x, want) for (_, x), (_, want) in zip(got, expected))
    with pytest.raises(RuntimeError, match="ended by a newer pass"):
        stale = iter(loader)
        next(stale)
        next(iter(loader))
        next(stale)


def test_round_settings_changed_with_a_batch_in_flight_is_an_error():
    clan = small_clan(round_length=2, duty_cycle=0.5)
    batches = one_ahead(LookaheadLoader(clan, DATA, batch_size=2))
    drive(clan, batches, steps=2)  # the round ended; the next round's first batch was drawn as cooperative
    assert clan.round_index == 1 and clan.step_in_round == 0
    clan.reconfigure(duty_cycle=1.0)  # now every step competes
    with pytest.raises(RuntimeError, match="drawn for the cooperative phase but the step is competitive"):
        next(batches)


def test_lookahead_loader_refuses_what_is_not_a_clan():
    with pytest.raises(TypeError, match="expected a vmapclan.Clan, got Linear"):
        LookaheadLoader(nn.Linear(2, 2), DATA, batch_size=2)


# -- bad setups with a real Trainer fail before training -----------------------------------------
class Tiny(ClanModule):
    """Three members of a linear model on 20 random samples."""

    def __init__(self, clan=None, loader="lookahead"):
        super().__init__(clan or small_clan(round_length=2, duty_cycle=0.5))
        self.loader_kind = loader

    def training_step(self, batch, batch_idx):
        x, y = batch
        return member_loss(F.cross_entropy, self.member.model(x), y).sum()

    def member_validation_step(self, batch, batch_idx):
        x, y = self.member.share(batch)
        return member_loss(F.cross_entropy, self.member.model(x), y)

    def train_dataloader(self):
        if self.loader_kind == "clan":
            return self.clan.loader(DATA, batch_size=2)
        return self.clan_loader(DATA, batch_size=2)


def fit(module, max_steps=4, **trainer_kwargs):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ClanCallback([DATA])], **trainer_kwargs)
    trainer.fit(module)
    return trainer


def test_tiny_trainer_fit_runs_rounds():
    module = Tiny()
    fit(module, max_steps=6)
    assert [rec["step"] for rec in module.clan.history] == [2, 4, 6]
    assert module.member.round_index == 3
    assert module.clan.population.training


def test_trainer_with_evolving_gradient_accumulation_equals_the_plain_loop():
    # Lightning zeroes gradients before the backward, the plain loop after the step: with members
    # accumulating different numbers of micro-batches the two orders must still agree.
    def clan():
        return small_clan(round_length=4, duty_cycle=0.5, autobind=("adamw", "gradient_accumulation"))

    module = Tiny(clan())
    fit(module, max_steps=12)
    plain = clan()
    loader = plain.loader(DATA, batch_size=2)
    member = plain.round()
    while plain.global_step < 12:
        for x, y in loader:
            train_step(member, F.cross_entropy, x, y)
            if member.done:
                member.model.eval()
                with torch.no_grad():
                    x_val, y_val = member.share(DATA)
                    plain.step(member_loss(F.cross_entropy, member.model(x_val), y_val))
                member = plain.round()
                member.model.train()
    assert len(plain.history) == 3
    assert any(max(rec["genomes"]["num_grad_accum"]) > 1 for rec in plain.history)
    assert_same_history(module.clan.history, plain.history)
    assert_same_weights(module.clan, plain)


def test_plain_clan_loader_is_refused():
    with pytest.raises(TypeError, match="fetches each batch one step early"):
        fit(Tiny(loader="clan"))


def test_train_loader_of_another_clan_is_refused():
    class OtherClansLoader(Tiny):
        def train_dataloader(self):
            return LookaheadLoader(small_clan(round_length=2, duty_cycle=0.5), DATA, batch_size=2)

    with pytest.raises(ValueError, match="ClanCallback: the train loader belongs to another clan than the module's"):
        fit(OtherClansLoader())


def test_train_loader_that_is_not_the_clans_is_refused():
    class PlainLoader(Tiny):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*DATA), batch_size=2)

    with pytest.raises(TypeError, match=r"ClanCallback: the train loader must be the clan's LookaheadLoader "
                                        r"\(module.clan_loader\(...\)\), got DataLoader"):
        fit(PlainLoader())


def test_clan_on_another_device_than_the_trainer_is_refused():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3, round_length=2,
                duty_cycle=0.5, autobind=["adamw"], seed=0, device="meta")
    with pytest.raises(ValueError, match="ClanCallback: the clan's members are on meta but the Trainer runs on cpu; "
                                         "build the Clan with device='cpu'"):
        fit(Tiny(clan))
    assert clan.global_step == 0  # refused before training


def test_empty_validation_loader_is_an_error_at_the_first_selection():
    module = Tiny()
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ClanCallback([])])
    with pytest.raises(ValueError, match="ClanCallback: val_dataloader yielded no batches; selection needs a "
                                         "validation loss"):
        trainer.fit(module)
    assert module.clan.global_step == 2 and module.clan.history == []  # the first round ran, no selection


def test_a_fit_without_the_clan_callback_is_an_error():
    """Without a ClanCallback the optimizer would step while the clan never moves: refused at the start."""
    module = Tiny()
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"ClanModule: the Trainer has no ClanCallback, so the clan would never step "
                                         r"\(no rounds, selection or lr shape\); pass callbacks=\[ClanCallback"):
        trainer.fit(module)
    assert module.clan.global_step == 0


def test_a_fit_without_the_clan_callback_is_an_error_also_when_on_fit_start_is_the_users_own():
    """A module's own ``on_fit_start`` (Lightning's hooks are empty, so few call ``super()``) does not
    lose the check: the first backward makes it, before any update."""
    class Own(Tiny):
        def on_fit_start(self):
            self.started = True

    module = Own()
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"ClanModule: the Trainer has no ClanCallback"):
        trainer.fit(module)
    assert module.started and module.clan.global_step == 0


def test_a_second_fit_without_the_clan_callback_is_refused_too():
    module = Tiny()
    fit(module, max_steps=2)
    steps = module.clan.global_step
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"ClanModule: the Trainer has no ClanCallback"):
        trainer.fit(module)
    assert module.clan.global_step == steps


def test_base_member_validation_step_is_abstract():
    with pytest.raises(NotImplementedError, match=r"ClanModule must implement member_validation_step\(batch, batch_idx\)"):
        ClanModule(small_clan()).member_validation_step(DATA, 0)


def test_import_without_lightning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # a missing package: import raises ImportError
    monkeypatch.delitem(sys.modules, "vmapclan.lightning")
    with pytest.raises(ImportError, match=r"vmapclan.lightning needs the lightning package: "
                                          r"pip install 'vmapclan\[lightning\]'"):
        importlib.import_module("vmapclan.lightning")


def test_trainer_gradient_accumulation_is_refused():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2\) is not supported"):
        fit(Tiny(), accumulate_grad_batches=2)


def test_trainer_on_several_processes_is_refused():
    """A DDP Trainer (faked here: starting one would spawn processes) is refused before anything runs."""
    import types

    class DDPStrategy:
        pass

    trainer = types.SimpleNamespace(world_size=2, strategy=DDPStrategy())
    with pytest.raises(ValueError, match=r"ClanCallback: a Trainer on several processes \(DDPStrategy, world size 2\) "
                                         r"is not supported; use one process and device per Trainer"):
        ClanCallback([DATA]).setup(trainer, Tiny(), "fit")


def test_trainer_gradient_clipping_is_refused():
    with pytest.raises(ValueError, match="use Clan\\(max_grad_norm=...\\)"):
        fit(Tiny(), gradient_clip_val=1.0)


def test_gradient_scaler_is_refused():
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="skips every member's step when any member's gradients overflow"):
        fit(Tiny(), plugins=[scaler])


def test_module_without_member_validation_step_is_refused():
    class NoValidation(Tiny):
        member_validation_step = ClanModule.member_validation_step

    with pytest.raises(TypeError, match="must implement member_validation_step"):
        fit(NoValidation())


def test_member_validation_step_of_wrong_shape_is_an_error():
    class MeanLoss(Tiny):
        def member_validation_step(self, batch, batch_idx):
            return super().member_validation_step(batch, batch_idx).mean()

    with pytest.raises(ValueError, match=r"must return every member's loss, shape \[3\], got \[\]"):
        fit(MeanLoss())


def test_another_optimizer_is_refused():
    class OwnOptimizer(Tiny):
        def configure_optimizers(self):
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(TypeError, match="must return the clan's batched optimizer"):
        fit(OwnOptimizer())


def test_module_and_callback_refuse_bad_arguments():
    with pytest.raises(TypeError, match="ClanModule: expected a vmapclan.Clan, got str"):
        ClanModule("clan")
    with pytest.raises(ValueError, match="genome-only clan"):
        ClanModule(Clan(population_size=2, round_length=4, genome_config={"lr": Gene(1e-5, 1e-1, init=1e-3)}))
    with pytest.raises(TypeError, match="re-iterable .* which is an iterator"):
        ClanCallback(iter([DATA]))
    with pytest.raises(TypeError, match="re-iterable .* which is not iterable"):
        ClanCallback(3)
    with pytest.raises(ValueError, match="format version 99"):
        ClanCallback([DATA]).load_state_dict({"format_version": 99, "clan": {}})
    with pytest.raises(ValueError, match="not a ClanCallback state"):
        ClanCallback([DATA]).load_state_dict({"format_version": 1})


def test_module_train_and_eval_reach_the_members():
    module = Tiny()
    module.eval()
    assert not module.clan.population.training
    module.train()
    assert module.clan.population.training


def test_second_fit_continues_like_one_fit():
    whole = Tiny()
    fit(whole, max_steps=9)
    split = Tiny()
    fit(split, max_steps=5)  # stops with a prefetched batch in flight
    fit(split, max_steps=4)  # a new Trainer counts from 0
    assert split.clan.global_step == whole.clan.global_step == 9
    assert_resumed_exactly(split.clan, whole.clan)
    # After fit, the batch the Trainer fetched last and never trained on is back in the clan's loader:
    # its state is that of a plain loop after the same 9 steps.
    reference = small_clan(round_length=2, duty_cycle=0.5)
    loader = reference.loader(DATA, batch_size=2)
    while reference.global_step < 9:
        drive(reference, loader, steps=9 - reference.global_step)
    expected = reference._loader_state
    for clan in (whole.clan, split.clan):
        assert (clan.loader_state.epoch, clan.loader_state.position) == (expected.epoch, expected.position)
        assert torch.equal(clan.loader_state.perm, expected.perm)


def test_a_clan_with_a_plan_fits_as_the_plain_loop_and_stops_at_its_horizon(tmp_path):
    """A cooperative warmup, then rounds, over a horizon of 14 steps: the Trainer (with a logger, and
    more steps allowed than the horizon) stops at the plan's end with the plain loop's history."""
    from lightning.pytorch.loggers import CSVLogger

    schedule = [{"name": "warm", "start_t": 0.0, "end_t": 0.3, "clan": {"competition": False}},
                {"name": "rounds", "start_t": 0.3, "end_t": 1.0}]

    def clan():
        return small_clan(round_length=5, duty_cycle=0.4, total_steps=14, schedule=schedule)

    module = Tiny(clan())
    logger = CSVLogger(tmp_path, name="plan")
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ClanCallback([DATA])])
    trainer.fit(module)
    assert module.clan.done and module.clan.time_step == 14 and trainer.global_step == 14
    plain = clan()
    loader = plain.loader(DATA, batch_size=2)
    member = plain.round()
    while not plain.done:
        for x, y in loader:
            train_step(member, F.cross_entropy, x, y)
            if member.done:
                plain.step(validation_losses(member, F.cross_entropy, *DATA))
                member = plain.round()
                if plain.done:
                    break
    assert [r.get("kind") for r in module.clan.history] == [r.get("kind") for r in plain.history] == \
        ["cooperative", "round", "round"]
    assert module.clan.history[0]["val_loss"] == pytest.approx(plain.history[0]["val_loss"], rel=1e-6)
    assert_same_history(module.clan.history[1:], plain.history[1:])
    assert_same_weights(module.clan, plain)
    logged = (pathlib.Path(logger.log_dir) / "metrics.csv").read_text()
    assert "clan/val_loss" in logged and "clan/winner" in logged


class KeywordNet(nn.Module):
    """A linear model called with keyword inputs (``features=``, ``scale=``), as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, features, scale):
        return self.lin(features * scale)


class KeywordTiny(ClanModule):
    """Tiny's run with samples ``({"features", "scale"}, target)``: the loader batches each input per member."""

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        return member_loss(F.cross_entropy, self.member.model(**inputs), y).sum()

    def member_validation_step(self, batch, batch_idx):
        inputs, y = self.member.share(batch)
        return member_loss(F.cross_entropy, self.member.model(**inputs), y)

    def train_dataloader(self):
        return self.clan_loader(KEYWORD_DATA, batch_size=2)


KEYWORD_DATA = KeywordTensors({"features": DATA[0], "scale": torch.ones(20, 1)}, DATA[1])


def test_keyword_inputs_train_through_the_trainer_as_positional_ones_do():
    def keyword_clan():
        torch.manual_seed(0)
        model = KeywordNet()
        return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3, round_length=2,
                    duty_cycle=0.5, autobind=["adamw"], seed=0)

    module, plain = KeywordTiny(keyword_clan()), Tiny()
    keyword_val = ({"features": DATA[0], "scale": torch.ones(20, 1)}, DATA[1])
    for m, val in ((module, keyword_val), (plain, DATA)):
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[ClanCallback([val])])
        trainer.fit(m)
    assert [r["winner"] for r in module.clan.history] == [r["winner"] for r in plain.clan.history]
    assert torch.allclose(module.clan.population.flat, plain.clan.population.flat, atol=1e-6)
