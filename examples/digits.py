"""Population training on scikit-learn's bundled digits: the loop of the README, top to bottom.

An MLP is trained by a clan of P members. Each round is mostly cooperative (data-parallel at
batch P x B, gradients averaged), then briefly competitive (each member tries its own mutated
AdamW hyperparameters on the same data); the member with the lowest validation loss wins and
everyone takes its weights, optimizer state and genome.

Run: ``python examples/digits.py`` (about ten seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vmapclan import Clan, member_loss
from vmapclan.tasks import digits_mlp, load_digits


def main(epochs: int = 100, population_size: int = 8, batch_size: int = 32, round_length: int = 40,
         duty_cycle: float = 0.25, hidden: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Train a clan on digits and return the final validation loss, accuracy and history."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val) = load_digits(val_fraction=0.2, seed=seed)  # scikit-learn's bundled digits
    model = digits_mlp(hidden)                                                     # 64 -> hidden -> hidden -> 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    clan = Clan(model, optimizer, population_size=population_size, round_length=round_length,
                duty_cycle=duty_cycle, autobind=["adamw"], seed=seed)
    loader = clan.loader((x_train, y_train), batch_size=batch_size)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc="epochs", unit="epoch")
        except ImportError:
            pass
    start = time.perf_counter()
    member = clan.round()
    for _ in range(epochs):
        member.model.train()
        for x, y in loader:
            loss = member_loss(F.cross_entropy, member.model(x), y)      # [P]
            with member.sync_context():                                   # cooperative: grads averaged
                loss.sum().backward()
            member.optimizer.step()
            member.optimizer.zero_grad()
            member.step()
            if member.done:
                member.model.eval()
                with torch.no_grad():
                    val = member_loss(F.cross_entropy, member.model(member.share(x_val)), member.share(y_val))
                record = clan.step(val)                                   # selection + mutation
                member = clan.round()
                member.model.train()
                if bar is not None:
                    bar.set_postfix(round=record["round"], best_val=f"{min(record['val_losses']):.4f}",
                                    lr=f"{record['incumbent']['lr']:.2e}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    best = clan.best_model().eval()
    with torch.no_grad():
        logits = best(x_val)
        val_loss = F.cross_entropy(logits, y_val).item()
        accuracy = (logits.argmax(-1) == y_val).float().mean().item()
    return {"val_loss": val_loss, "val_accuracy": accuracy, "rounds": len(clan.history),
            "steps": clan.global_step, "seconds": time.perf_counter() - start, "history": clan.history}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--population-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = main(epochs=args.epochs, population_size=args.population_size, seed=args.seed)
    print(f"rounds: {result['rounds']}  steps: {result['steps']}  time: {result['seconds']:.1f}s")
    for rec in result["history"][-5:]:
        inc = rec["incumbent"]
        print(f"round {rec['round']:3d}  winner {rec['winner']}  best val {min(rec['val_losses']):.4f}  "
              f"lr {inc['lr']:.2e}  wd {inc['weight_decay']:.2e}  betas ({inc['betas/0']:.3f}, {inc['betas/1']:.4f})")
    print(f"validation loss {result['val_loss']:.4f}  accuracy {result['val_accuracy']:.3f}")
