"""Train a clan with a real ``lightning.Trainer`` (``pip install "vmapclan[lightning]"``).

Three pieces make the seed's Lightning pattern work with the vectorized clan:

- :class:`ClanModule`, a ``LightningModule`` that holds the clan and the current member,
  returns the clan's batched AdamW from ``configure_optimizers`` and wraps ``backward`` in
  ``member.sync_context()``;
- :class:`LookaheadLoader`, the clan's loader for the Trainer (``module.clan_loader(...)``);
- :class:`ClanCallback`, which advances the round clock after every batch, computes every
  member's validation loss when the round is done, calls ``clan.step``, swaps in the new
  member, logs losses and genes, and puts the clan into Lightning checkpoints.

Example::

    class Digits(ClanModule):
        def training_step(self, batch, batch_idx):
            x, y = batch                                              # [P, B, ...]
            return member_loss(F.cross_entropy, self.member.model(x), y).sum()

        def member_validation_step(self, batch, batch_idx):
            x, y = self.member.share(batch)                           # every member sees it
            return member_loss(F.cross_entropy, self.member.model(x), y)   # [P]

        def train_dataloader(self):
            return self.clan_loader(train_set, batch_size=32)

    trainer = lightning.Trainer(max_epochs=10, callbacks=[ClanCallback(val_loader)])
    trainer.fit(Digits(clan))

The seed's pattern (``seeds/clan_training_api.md``, "Lightning Integration")::

    def backward(self, loss, *args, **kwargs):
        self._require_callback()
        with self.member.sync_context():
            super().backward(loss, *args, **kwargs)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.member.step()
        if self.member.done:
            val_loss = self.trainer.validate(self)[0]['val_loss']
            self.clan.step(val_loss)
            self.member = self.clan.round()

``backward`` is kept as is. The rest differs, for these reasons:

- **No** ``trainer.validate`` **inside a training hook.** It starts a second run of the
  Trainer inside the first. With Lightning 2.6 it returns, but ``fit`` then stops with an
  ``AssertionError`` in the logger connector, whose state the nested run replaced. It also
  returns one scalar per logged name, while selection needs a loss per member. Lightning's own
  scheduled validation (``val_check_interval``) does not help either. It counts batches since
  ``fit`` began, not the clan's round clock, so it drifts from the rounds after
  ``clan.reconfigure``; and it also runs at times of its own (the sanity check, early stopping). So
  :class:`ClanCallback` evaluates the members itself. This happens in ``on_train_batch_end``,
  right after the ``member.step()`` that ends the round, which is where the plain loop does
  it. It calls ``member_validation_step`` on each batch of a validation loader given to the
  callback (eval mode, ``torch.no_grad()``) and averages the ``[P]`` results weighted by batch
  size. Then it calls ``clan.step``.
- **The round clock is advanced in the callback**, not in the module: it steps the member after
  every training batch (one batch is one round step) and swaps ``module.member`` after
  selection, so the module only wraps ``backward``.
- **Data comes through** :class:`LookaheadLoader`, **not** ``clan.loader``. When the train
  loader has no length, Lightning's training loop fetches one batch ahead (``_PrefetchDataFetcher``),
  and a clan loader has no fixed length, because a cooperative step takes ``P x B`` samples
  and a competitive one ``B``. So batch ``k + 1`` is requested before step ``k`` runs. A plain
  ``ClanLoader`` decides the phase when a batch is requested. It would give the first
  competitive step ``P`` disjoint shards instead of one common window, and the first step of
  the next round a common window instead of shards. Nothing would fail; the data would just be
  wrong. :class:`LookaheadLoader` draws each batch for the phase of the step it will feed,
  read off the round clock. It checks that phase when the step comes. It also keeps the
  loader's position from before every batch that is fetched but not yet trained on. A
  checkpoint, or a new pass over the loader, then starts from the first batch not trained on,
  so a prefetched batch is never skipped.
- **The optimizer is the clan's.** ``configure_optimizers`` returns ``clan.optimizer`` (the
  batched AdamW over the stacked members), not the ``torch.optim.AdamW`` the clan was built
  from.

Limits: one device (the clan's tensors live on ``clan.device``; build the ``Clan`` with the
Trainer's device), ``accumulate_grad_batches=1`` (use the ``gradient_accumulation`` gene), no
``gradient_clip_val`` (use ``Clan(max_grad_norm=...)``, which clips each member on its own) and
no gradient scaler (``precision="16-mixed"`` on a GPU: one member's overflow would skip every
member's step). The callback checks all of these when ``fit`` starts. The equivalence with the
plain loop is tested at ``precision="32-true"``; ``"bf16-mixed"`` runs but is not compared.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError as err:  # pragma: no cover - the extra is installed in CI
    raise ImportError(
        "vmapclan.lightning needs the lightning package: pip install 'vmapclan[lightning]'"
    ) from err

from .clan import Clan
from .data import ClanLoader
from .population import score_members

__all__ = ["ClanModule", "ClanCallback", "LookaheadLoader"]

STATE_VERSION = 1  # format of ClanCallback.state_dict()


# -- batches in flight ------------------------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    """A batch handed out and not yet trained on."""

    step: int  # the clan's time step it feeds
    phase: str  # the phase it was drawn for
    loader_state: dict  # the clan's loader state before it was drawn


class _InFlight:
    """The batches of one clan that a loader handed out and the round clock has not reached.

    Shared by every :class:`LookaheadLoader` of the clan, as the clan's loader state is. It holds
    no reference to the clan (it is the value of a weak-keyed map from the clan).
    """

    def __init__(self):
        self.pending: list[_Pending] = []
        self.ahead: int | None = None  # how far past the clan's next step the batch being drawn right now lies
        self.generation = 0  # bumped when in-flight batches are abandoned; older iterations stop

    def prune(self, clan: Clan) -> None:
        """Forget the batches the clan has already stepped past."""
        self.pending = [b for b in self.pending if b.step >= clan.time_step]

    def check(self, clan: Clan) -> None:
        """Check that the batch for the clan's next step was drawn for that step's phase."""
        self.prune(clan)
        if self.pending and self.pending[0].step == clan.time_step:
            batch, now = self.pending[0], clan.phase_ahead(0)
            if batch.phase != now:
                raise RuntimeError(
                    f"LookaheadLoader: the batch for step {batch.step} was drawn for the {batch.phase} phase "
                    f"but the step is {now}: the round settings changed (clan.reconfigure, clan.cooperate) while the Trainer "
                    "held a prefetched batch; change them before fit, or between fits"
                )

    def next_step(self, clan: Clan) -> int:
        """The time step the next batch drawn will feed."""
        return self.pending[-1].step + 1 if self.pending else clan.time_step

    def loader_state(self, clan: Clan) -> dict:
        """The loader state as of the clan's round clock: before the first batch not yet trained on."""
        self.prune(clan)
        return self.pending[0].loader_state if self.pending else clan.loader_state.state_dict()

    def abandon(self, clan: Clan, *, rewind: bool = True) -> None:
        """Drop the batches in flight; with ``rewind`` the loader draws them again next time."""
        if rewind:
            self.prune(clan)
            if self.pending:
                clan.loader_state.load_state_dict(self.pending[0].loader_state)
        self.pending = []
        self.generation += 1


_IN_FLIGHT: weakref.WeakKeyDictionary[Clan, _InFlight] = weakref.WeakKeyDictionary()


def _in_flight(clan: Clan) -> _InFlight:
    if clan not in _IN_FLIGHT:
        _IN_FLIGHT[clan] = _InFlight()
    return _IN_FLIGHT[clan]


class _ClanAhead:
    """The clan as the inner :class:`ClanLoader` sees it: the clan's own attributes, except whether it cooperates.

    ``ClanLoader`` reads ``clan.cooperating`` when it draws a batch; here the answer is that of
    the step the batch will feed, ``ahead`` steps after the clan's next one, which
    :class:`LookaheadLoader` sets before each draw.
    """

    def __init__(self, clan: Clan, in_flight: _InFlight):
        self._clan, self._in_flight = clan, in_flight

    def __getattr__(self, name):  # only reached for names not set in __init__
        if name in ("_clan", "_in_flight"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._clan, name)

    @property
    def cooperating(self) -> bool:
        ahead = self._in_flight.ahead
        return self._clan.cooperating if ahead is None else self._clan.cooperating_ahead(ahead)


class LookaheadLoader:
    """The clan's loader for a Lightning ``Trainer``: each batch is drawn for the step it will feed.

    It yields what :class:`~vmapclan.ClanLoader` yields (``[P, B, ...]``: disjoint shards when
    cooperating, one common window when competing), in the same order as a plain loop over
    ``clan.loader(...)``, even though the Trainer fetches a batch before the previous step has
    run. The phase of a batch is that of the clan's step plus the number of batches handed out
    and not yet trained on, read off the round clock; when that step comes, the next fetch
    checks it. The loader's position before every batch in flight is kept. That gives three
    things: :meth:`ClanCallback.state_dict` saves a position from which a resumed run draws the
    same batches; a new pass over the loader (a new epoch, a reloaded loader, a second ``fit``)
    first draws again the batches an earlier pass fetched and never trained on; and
    ``ClanCallback`` rewinds the clan's own loader state when ``fit`` ends.

    One pass is one epoch of the clan loader. The clan's position and generator carry across
    passes and loaders, as with :meth:`Clan.loader`. Iterate one pass at a time. Starting a new
    pass ends the previous one.

    Args:
        clan: The clan (with a model) whose batches to draw.
        dataset: A map-style dataset or a tuple of tensors (as :meth:`Clan.loader`).
        batch_size: B, samples per member per step.
        device: Where batches go (default: the clan's device).

    Raises:
        TypeError: if ``clan`` is not a :class:`~vmapclan.Clan`, or for a dataset
            :class:`~vmapclan.ClanLoader` refuses.
        ValueError: for a bad ``batch_size`` or a dataset smaller than one step.

    Example:
        >>> def train_dataloader(self):  # in a ClanModule  # doctest: +SKIP
        ...     return self.clan_loader(train_set, batch_size=32)
    """

    def __init__(self, clan: Clan, dataset, batch_size: int, *, device: torch.device | str | None = None):
        if not isinstance(clan, Clan):
            raise TypeError(f"LookaheadLoader: expected a vmapclan.Clan, got {type(clan).__name__}")
        self.clan = clan
        self._in_flight = _in_flight(clan)
        self._loader = ClanLoader(_ClanAhead(clan, self._in_flight), dataset, batch_size, device=device)

    @property
    def dataset(self):
        """The dataset batches are drawn from."""
        return self._loader.dataset

    @property
    def batch_size(self) -> int:
        """B, samples per member per step."""
        return self._loader.batch_size

    def __iter__(self) -> Iterator:
        clan, in_flight = self.clan, self._in_flight
        in_flight.abandon(clan)  # an earlier pass's fetched-but-untrained batches are drawn again
        generation = in_flight.generation
        inner = iter(self._loader)
        while True:
            if in_flight.generation != generation:
                raise RuntimeError("LookaheadLoader: this pass was ended by a newer pass over the clan's loader")
            in_flight.check(clan)
            step = in_flight.next_step(clan)
            phase = clan.phase_ahead(step - clan.time_step)
            before = clan.loader_state.state_dict()
            in_flight.ahead = step - clan.time_step
            try:
                batch = next(inner)
            except StopIteration:
                return
            finally:
                in_flight.ahead = None
            in_flight.pending.append(_Pending(step, phase, before))
            yield batch


# -- the module ---------------------------------------------------------------------------------
def _check_clan(clan, who: str) -> Clan:
    if not isinstance(clan, Clan):
        raise TypeError(f"{who}: expected a vmapclan.Clan, got {type(clan).__name__}")
    if clan.population is None:
        raise ValueError(f"{who}: the clan has no model (a genome-only clan); Lightning trains a clan with a model")
    return clan


class ClanModule(pl.LightningModule):
    """A ``LightningModule`` that trains a clan: the seed's pattern with the batched optimizer.

    Subclass it and write ``training_step`` (return the sum of the ``[P]`` member losses: each
    member's gradient is then that of its own loss), ``member_validation_step`` (the ``[P]``
    losses on one validation batch, for selection) and ``train_dataloader`` (return
    ``self.clan_loader(...)``). Train it with a :class:`ClanCallback` among the Trainer's
    callbacks: the callback steps ``self.member`` after every batch and swaps it after selection.

    The members are not submodules: their weights are the clan's stacked tensors, saved in
    checkpoints by the callback, so ``self.parameters()`` is empty. ``clan.best_model()`` gives
    the winner as a plain module.

    Args:
        clan: The clan to train (it must have a model).

    Attributes:
        clan: The :class:`~vmapclan.Clan`.
        member: This round's :class:`~vmapclan.Member` (use ``self.member.model`` in steps).

    Raises:
        TypeError: if ``clan`` is not a :class:`~vmapclan.Clan`.
        ValueError: for a genome-only clan.

    Example:
        >>> class Digits(ClanModule):  # doctest: +SKIP
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return member_loss(F.cross_entropy, self.member.model(x), y).sum()
    """

    def __init__(self, clan: Clan):
        super().__init__()
        self.clan = _check_clan(clan, "ClanModule")
        self.member = clan.round()

    def on_fit_start(self) -> None:
        """Refuse a fit without a :class:`ClanCallback`: without one the clan's clock never moves
        (no rounds, no selection, no lr shape over its horizon), while the optimizer still steps.
        (:meth:`backward` checks it too, for a module whose own ``on_fit_start`` does not call this one.)

        Raises:
            ValueError: if none of the Trainer's callbacks is a :class:`ClanCallback`.
        """
        self._require_callback()

    def _require_callback(self) -> None:
        trainer = self.trainer
        checked = getattr(self, "_checked_trainer", None)  # a weak reference: the module must not hold its Trainer
        if checked is not None and checked() is trainer:  # once per Trainer: a later fit may have none
            return
        if not any(isinstance(callback, ClanCallback) for callback in trainer.callbacks):
            raise ValueError("ClanModule: the Trainer has no ClanCallback, so the clan would never step (no rounds, "
                             "selection or lr shape); pass callbacks=[ClanCallback(val_loader)] to the Trainer")
        self._checked_trainer = weakref.ref(trainer)

    def configure_optimizers(self):
        """The clan's batched AdamW (per-member hyperparameters, over the stacked members).

        Returns:
            ``clan.optimizer``.
        """
        return self.clan.optimizer

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Backward inside ``member.sync_context()``: in the cooperative phase gradients are averaged.

        Args:
            loss: The scalar loss from ``training_step``.
            *args: Passed to ``LightningModule.backward``.
            **kwargs: Passed to ``LightningModule.backward``.
        """
        self._require_callback()
        with self.member.sync_context():
            super().backward(loss, *args, **kwargs)

    def clan_loader(self, dataset, batch_size: int, *, device: torch.device | str | None = None) -> LookaheadLoader:
        """The clan's train loader for the Trainer (see :class:`LookaheadLoader`).

        Args:
            dataset: A map-style dataset or a tuple of tensors.
            batch_size: B, samples per member per step.
            device: Where batches go (default: the clan's device).

        Returns:
            A :class:`LookaheadLoader` yielding ``[P, B, ...]`` batches.
        """
        return LookaheadLoader(self.clan, dataset, batch_size, device=device)

    def member_validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Every member's mean loss on one validation batch, ``[P]``; lower is better.

        Called by :class:`ClanCallback` at the end of each round, in eval mode under
        ``torch.no_grad()``. Batches are the validation loader's own (``[B, ...]``, on the clan's
        device): pass them through ``self.member.share(...)`` so every member sees the same data.

        Args:
            batch: One batch of the validation loader.
            batch_idx: Its index in the loader.

        Returns:
            ``[P]`` losses.

        Raises:
            NotImplementedError: unless a subclass implements it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement member_validation_step(batch, batch_idx)")

    def train(self, mode: bool = True) -> ClanModule:
        """Set training mode, for the members too (they are not submodules).

        Args:
            mode: Training (``True``) or evaluation (``False``) mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if getattr(self, "clan", None) is not None:  # nn.Module.__init__ runs before the clan is set
            self.clan.population.train(mode)
        return self


# -- the callback -------------------------------------------------------------------------------
def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class ClanCallback(pl.Callback):
    """Runs the clan's rounds inside ``Trainer.fit``: round clock, validation, selection, checkpoints.

    After every training batch it calls ``member.step()``. When the round is done, it does the
    following, in the same hook (``on_train_batch_end``) and so at the same point as the plain
    loop: computes each member's validation loss with the module's ``member_validation_step``
    over ``val_dataloader`` (eval mode, no grad; batch results averaged weighted by batch size),
    calls ``clan.step(losses)``, sets ``module.member = clan.round()``, and logs the round to the
    Trainer's loggers. The logged metrics are ``clan/member_{i}/val_loss``,
    ``clan/member_{i}/{gene}`` (the genes member ``i`` competed with), ``clan/incumbent/{gene}``,
    ``clan/winner``, ``clan/best_val_loss`` and ``clan/round``, at step ``record["step"]``.
    (``self.log`` would drop them unless a round ended on a ``log_every_n_steps`` step.)

    Its ``state_dict`` is the clan's (weights, optimizer, genomes, history, generators, and the
    loader position before any batch the Trainer prefetched), so ``Trainer.fit(ckpt_path=...)``
    with a freshly built module of the same configuration resumes the run exactly.

    The module must have ``clan`` (a :class:`~vmapclan.Clan` with a model), ``member`` and
    ``member_validation_step(batch, batch_idx) -> [P]``. :class:`ClanModule` has all three. It
    must return ``clan.optimizer`` from ``configure_optimizers`` and train from a
    :class:`LookaheadLoader`. Module hooks run after callback hooks, so in the module's own
    ``on_train_batch_end`` the member has already been stepped (and swapped).

    Args:
        val_dataloader: The validation batches, re-iterable (a ``DataLoader``, or a list of
            batches), iterated once per round.
        log_members: Log every member's loss and genes each round (not only the incumbent's).

    Raises:
        TypeError: if ``val_dataloader`` is not iterable, or is an iterator (it would be used up
            by the first round).

    Example:
        >>> val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)  # doctest: +SKIP
        >>> trainer = Trainer(max_epochs=10, callbacks=[ClanCallback(val)])  # doctest: +SKIP
    """

    def __init__(self, val_dataloader: Iterable, *, log_members: bool = True):
        if isinstance(val_dataloader, Iterator) or not isinstance(val_dataloader, Iterable):
            kind = "an iterator (used up after one round)" if isinstance(val_dataloader, Iterator) else "not iterable"
            raise TypeError(
                "ClanCallback: val_dataloader must be re-iterable (a DataLoader or a list of batches); "
                f"got {type(val_dataloader).__name__}, which is {kind}"
            )
        self.val_dataloader = val_dataloader
        self.log_members = log_members
        self._clan: Clan | None = None
        self._module: pl.LightningModule | None = None
        self._loaded: Mapping | None = None

    # -- checks at the start of fit --------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach to the module's clan and check the Trainer's settings (for ``fit``).

        Raises:
            TypeError: if the module has no clan or no ``member_validation_step``.
            ValueError: for a genome-only clan, ``accumulate_grad_batches != 1``, gradient
                clipping by the Trainer or a gradient scaler (``precision="16-mixed"`` on a GPU), a
                Trainer on several processes (DDP) or a clan across ranks (``process_group``).
        """
        if stage != "fit":
            return
        clan = _check_clan(getattr(pl_module, "clan", None), "ClanCallback: the LightningModule's `clan` attribute")
        if getattr(trainer, "world_size", 1) > 1 or clan.group is not None:
            # DDP would average every member's gradients across the ranks at each backward (members
            # of different ranks differ in the competitive phase), and would not select across ranks.
            raise ValueError(
                f"ClanCallback: a Trainer on several processes ({type(trainer.strategy).__name__}, world size "
                f"{max(getattr(trainer, 'world_size', 1), clan.world_size)}) is not supported; use one process and "
                "device per Trainer, or train the clan across ranks without Lightning (Clan(process_group=...), "
                "vmapclan train under torchrun)"
            )
        validate = getattr(type(pl_module), "member_validation_step", None)
        if not callable(validate) or validate is ClanModule.member_validation_step:
            raise TypeError(
                f"ClanCallback: {type(pl_module).__name__} must implement member_validation_step(batch, batch_idx) "
                "returning every member's validation loss, shape [P]"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"ClanCallback: Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported: "
                "each batch is one round step; evolve accumulation with autobind=['adamw', 'gradient_accumulation']"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"ClanCallback: precision={trainer.precision!r} with a gradient scaler is not supported: the scaler "
                "skips every member's step when any member's gradients overflow; use '32-true' or 'bf16-mixed'"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"ClanCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the norm of all "
                "members together; use Clan(max_grad_norm=...), which clips each member on its own"
            )
        self._clan, self._module = clan, pl_module
        if self._loaded is not None:
            self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that the Trainer uses the clan's optimizer, device and a :class:`LookaheadLoader`.

        Raises:
            TypeError: for another optimizer or train loader.
            ValueError: if the clan is on another device than the Trainer.
        """
        clan = self._clan
        optimizers = trainer.optimizers
        if len(optimizers) != 1 or optimizers[0] is not clan.optimizer:
            got = [type(o).__name__ for o in optimizers]
            raise TypeError(
                "ClanCallback: configure_optimizers must return the clan's batched optimizer (clan.optimizer), "
                f"got {got}"
            )
        root = trainer.strategy.root_device
        if not _same_device(clan.device, root):
            raise ValueError(
                f"ClanCallback: the clan's members are on {clan.device} but the Trainer runs on {root}; "
                f"build the Clan with device={str(root)!r}"
            )
        self._check_loader(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the train loader again (``reload_dataloaders_every_n_epochs`` may replace it)."""
        self._check_loader(trainer)

    def _check_loader(self, trainer: pl.Trainer) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, LookaheadLoader) and loader.clan is self._clan:
            return
        if isinstance(loader, LookaheadLoader):
            raise ValueError("ClanCallback: the train loader belongs to another clan than the module's")
        if isinstance(loader, ClanLoader):
            raise TypeError(
                "ClanCallback: the Trainer fetches each batch one step early, so clan.loader(...) would draw the "
                "first batch of each phase for the previous phase; return module.clan_loader(...) "
                "(a vmapclan.lightning.LookaheadLoader) from train_dataloader"
            )
        raise TypeError(
            "ClanCallback: the train loader must be the clan's LookaheadLoader (module.clan_loader(...)), "
            f"got {type(loader).__name__}"
        )

    # -- the round clock ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Let the members follow the module's training mode.

        Lightning's evaluation loops restore the module's mode by setting flags, which the
        members (not submodules) would miss.
        """
        population = self._clan.population
        if population.training != pl_module.training:
            population.train(pl_module.training)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """Step the round clock; at the end of a round validate, select and swap in the new member."""
        member = pl_module.member
        member.step()
        if member.done:
            losses = self._validate(pl_module)
            record = self._clan.step(losses)
            pl_module.member = self._clan.round()
            self._log(trainer, record)
            if self._clan.done:  # a clan with a horizon: its plan is over, and so is the fit
                trainer.should_stop = True

    def _validate(self, pl_module: pl.LightningModule) -> torch.Tensor:
        clan = self._clan
        batches = (move_data_to_device(batch, clan.device) for batch in self.val_dataloader)
        losses = score_members(clan.population, batches, pl_module.member_validation_step, size_of=extract_batch_size,
                               who="ClanCallback: member_validation_step")
        if losses is None:
            raise ValueError("ClanCallback: val_dataloader yielded no batches; selection needs a validation loss")
        return losses

    def _log(self, trainer: pl.Trainer, record: dict) -> None:
        if not trainer.loggers:
            return
        if record.get("kind") == "cooperative":  # a cooperative stretch of the plan: one model, no selection
            metrics = {"clan/val_loss": record["val_loss"],
                       **{f"clan/incumbent/{name}": float(v) for name, v in record["hyper"].items()}}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=record["end_step"])
            return
        winner = record["winner"]  # None when the whole population diverged and the clan restored
        metrics = {
            "clan/round": float(record["round"]),
            "clan/winner": float("nan") if winner is None else float(winner),
            "clan/best_val_loss": float("nan") if winner is None else record["val_losses"][winner],
        }
        metrics.update({f"clan/incumbent/{name}": float(v) for name, v in record["incumbent"].items()})
        if self.log_members:
            for i, loss in enumerate(record["val_losses"]):
                metrics[f"clan/member_{i}/val_loss"] = loss
            for name, values in record["genomes"].items():
                for i, v in enumerate(values):
                    metrics[f"clan/member_{i}/{name}"] = float(v)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.get("end_step", record["step"]))  # the time, with a plan

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After ``fit``: give back to the clan's loader the batches fetched but never trained on."""
        if stage == "fit" and self._clan is not None:
            _in_flight(self._clan).abandon(self._clan)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The clan's state, with the loader position before any batch still in flight.

        Returns:
            ``{"format_version": 1, "clan": clan.state_dict()}``, or ``{}`` before ``fit`` began.
        """
        if self._clan is None:
            return {}
        state = self._clan.state_dict()
        state["loader"] = _in_flight(self._clan).loader_state(self._clan)
        return {"format_version": STATE_VERSION, "clan": state}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the clan from :meth:`state_dict` (now, or at ``setup`` if not attached yet).

        Args:
            state_dict: A state from :meth:`state_dict`.

        Raises:
            ValueError: if it is not one (or of another format version).
        """
        if not isinstance(state_dict, Mapping) or "clan" not in state_dict:
            raise ValueError("ClanCallback.load_state_dict: not a ClanCallback state (no 'clan' entry)")
        if state_dict.get("format_version") != STATE_VERSION:
            raise ValueError(
                f"ClanCallback.load_state_dict: format version {state_dict.get('format_version')!r}, "
                f"this vmapclan reads version {STATE_VERSION}"
            )
        self._loaded = state_dict
        if self._clan is not None:
            self._restore()

    def _restore(self) -> None:
        clan = self._clan
        clan.load_state_dict(self._loaded["clan"])
        # The loaded position is after the last batch trained on; whatever is in flight is stale.
        _in_flight(clan).abandon(clan, rewind=False)
        self._module.member = clan.round()
        self._loaded = None
