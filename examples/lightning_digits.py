"""Population training on scikit-learn's digits with a Lightning Trainer.

This is examples/digits.py written as a ``LightningModule``. :class:`~vmapclan.lightning.ClanModule`
hands the Trainer the clan's batched AdamW and wraps ``backward`` in ``member.sync_context()``.
:class:`~vmapclan.lightning.ClanCallback` steps the round clock after each batch. At the end of
each round it scores every member on the validation set, selects the winner and logs every
member's loss and genes. With the same seed, the run has the same history as the plain loop.

Run: ``python examples/lightning_digits.py`` (under a minute on 2 CPU cores). Add
``--checkpoint-dir ckpts`` to save a checkpoint every round, and ``--resume ckpts/step=80.ckpt``
to continue from one.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from vmapclan import Clan, member_loss
from vmapclan.lightning import ClanCallback, ClanModule
from vmapclan.tasks import digits_mlp, load_digits


def make_clan(population_size: int = 8, round_length: int = 40, duty_cycle: float = 0.25, hidden: int = 256,
              lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> Clan:
    """The clan: an MLP and an AdamW whose lr, weight decay, betas and eps evolve.

    Args:
        population_size: P.
        round_length: Steps per round.
        duty_cycle: Competitive fraction of each round.
        hidden: Width of the MLP's hidden layers.
        lr: The incumbent's starting learning rate.
        seed: The clan's seed (mutations, loader permutations).
        device: Where the members live.

    Returns:
        A :class:`~vmapclan.Clan` (the model's initial weights come from torch's global RNG).
    """
    model = digits_mlp(hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    return Clan(model, optimizer, population_size=population_size, round_length=round_length,
                duty_cycle=duty_cycle, autobind=["adamw"], seed=seed, device=device)


class DigitsClan(ClanModule):
    """The digits clan as a LightningModule.

    Args:
        clan: The clan from :func:`make_clan`.
        train_data: ``(x, y)`` training tensors.
        batch_size: B, samples per member per step.
    """

    def __init__(self, clan: Clan, train_data: tuple[torch.Tensor, torch.Tensor], batch_size: int):
        super().__init__(clan)
        self.train_data, self.batch_size = train_data, batch_size

    def training_step(self, batch, batch_idx):
        """Every member's loss on its batch; their sum gives each member the gradient of its own loss."""
        x, y = batch                                                   # [P, B, 64], [P, B]
        losses = member_loss(F.cross_entropy, self.member.model(x), y)  # [P]
        self.log("train_loss", losses.mean())
        return losses.sum()

    def member_validation_step(self, batch, batch_idx):
        """Every member's loss on one validation batch, which every member sees."""
        x, y = self.member.share(batch)                                # [B, ...] -> [P, B, ...] views
        return member_loss(F.cross_entropy, self.member.model(x), y)   # [P]

    def train_dataloader(self):
        """Shards when cooperating, one common window when competing, drawn for the right step."""
        return self.clan_loader(self.train_data, batch_size=self.batch_size)


def main(epochs: int = 30, population_size: int = 8, batch_size: int = 32, round_length: int = 40,
         duty_cycle: float = 0.25, hidden: int = 256, lr: float = 1e-3, seed: int = 0, progress: bool = True,
         device: str = "cpu", log_dir: str | None = None, checkpoint_dir: str | None = None,
         checkpoint_every: int | None = None, resume: str | None = None) -> dict:
    """Train a clan on digits with a Lightning Trainer.

    Args:
        epochs: Passes over the training data (the size knob, with ``hidden``).
        population_size: P.
        batch_size: B, samples per member per step.
        round_length: Steps per round.
        duty_cycle: Competitive fraction of each round.
        hidden: Width of the MLP's hidden layers.
        lr: The starting learning rate.
        seed: Seeds the model's initial weights, the data split and the clan.
        progress: Show Lightning's progress bar.
        device: ``"cpu"`` or ``"cuda"``.
        log_dir: If given, log metrics (each member's validation loss and genes) to CSV files there.
        checkpoint_dir: If given, save checkpoints there, named ``step=N.ckpt``.
        checkpoint_every: Steps between checkpoints (default: one round).
        resume: A checkpoint to continue from (same settings as the run that saved it).

    Returns:
        The final validation loss and accuracy of the winner's weights, the number of rounds and
        steps, the time taken, the clan's history, the clan itself and the metrics file.
    """
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val) = load_digits(val_fraction=0.2, seed=seed)
    clan = make_clan(population_size, round_length, duty_cycle, hidden, lr, seed, device)
    module = DigitsClan(clan, (x_train, y_train), batch_size)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))  # the whole set, one batch
    callbacks: list[pl.Callback] = [ClanCallback(val_loader)]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", save_top_k=-1,
                                         every_n_train_steps=checkpoint_every or round_length))
    logger = CSVLogger(log_dir, name="lightning_digits") if log_dir is not None else False
    trainer = pl.Trainer(max_epochs=epochs, accelerator=torch.device(device).type, devices=1, logger=logger,
                         callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None,
                         enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=round_length)
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=resume)
    seconds = time.perf_counter() - start

    best = clan.best_model().eval()
    with torch.no_grad():
        logits = best(x_val.to(clan.device))
        val_loss = F.cross_entropy(logits, y_val.to(clan.device)).item()
        accuracy = (logits.argmax(-1).cpu() == y_val).float().mean().item()
    return {"val_loss": val_loss, "val_accuracy": accuracy, "rounds": len(clan.history), "steps": clan.global_step,
            "seconds": seconds, "history": clan.history, "clan": clan,
            "metrics_file": f"{logger.log_dir}/metrics.csv" if logger else None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--population-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    result = main(epochs=args.epochs, population_size=args.population_size, seed=args.seed, device=args.device,
                  log_dir=args.log_dir, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    print(f"rounds: {result['rounds']}  steps: {result['steps']}  time: {result['seconds']:.1f}s")
    for rec in result["history"][-5:]:
        inc = rec["incumbent"]
        print(f"round {rec['round']:3d}  winner {rec['winner']}  best val {min(rec['val_losses']):.4f}  "
              f"lr {inc['lr']:.2e}  wd {inc['weight_decay']:.2e}  betas ({inc['betas/0']:.3f}, {inc['betas/1']:.4f})")
    print(f"validation loss {result['val_loss']:.4f}  accuracy {result['val_accuracy']:.3f}")
