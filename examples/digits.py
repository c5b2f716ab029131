"""Population training on scikit-learn's bundled digits: the loop of the README, top to bottom.

An MLP is trained by a clan of P members over a horizon of ``steps`` steps. The clan follows its
default plan: a search over the learning rate for the first 10% (one round, every member its own
lr), then rounds that are mostly cooperative (data-parallel at batch P x B, gradients averaged)
and briefly competitive (each member tries its own mutated AdamW hyperparameters on the same
data), with the lr shaped by a warmup and a cosine over the horizon. After each round the
member with the lowest validation loss wins and everyone takes its weights, optimizer state and
genome; the clan keeps the best incumbent it has seen.

Run: ``python examples/digits.py`` (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vmapclan import Clan, member_loss
from vmapclan.tasks import digits_mlp, load_digits


def main(steps: int = 1500, population_size: int = 8, batch_size: int = 32, hidden: int = 128, seed: int = 0,
         progress: bool = True) -> dict:
    """Train a clan on digits for ``steps`` steps; return the model's validation loss, accuracy and the history."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val) = load_digits(val_fraction=0.2, seed=seed)  # scikit-learn's bundled digits
    model = digits_mlp(hidden)                                                     # 64 -> hidden -> hidden -> 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    clan = Clan(model, optimizer, population_size=population_size, autobind=["adamw"], total_steps=steps, seed=seed)
    loader = clan.loader((x_train, y_train), batch_size=batch_size)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="digits", unit="step")
        except ImportError:
            pass
    start = time.perf_counter()
    member = clan.round()
    while not clan.done:
        for x, y in loader:                                               # one epoch; the loop runs epochs
            loss = member_loss(F.cross_entropy, member.model(x), y)      # [P]
            with member.sync_context():                                   # cooperative: grads averaged
                loss.sum().backward()
            member.optimizer.step()
            member.optimizer.zero_grad()
            member.step()
            if bar is not None:
                bar.update(1)
            if member.done:
                member.model.eval()                                       # validation in eval mode
                with torch.no_grad():
                    val = member_loss(F.cross_entropy, member.model(member.share(x_val)), member.share(y_val))
                member.model.train()
                record = clan.step(val)                                   # selection + mutation
                member = clan.round()
                if bar is not None and "winner" in record:
                    bar.set_postfix(round=record["round"], best_val=f"{min(record['val_losses']):.4f}",
                                    lr=f"{clan.incumbent['lr'].item():.2e}")
                if clan.done:
                    break
    if bar is not None:
        bar.close()

    def scores(model):
        with torch.no_grad():
            logits = model.eval()(x_val)
        return F.cross_entropy(logits, y_val).item(), (logits.argmax(-1) == y_val).float().mean().item()

    # The last incumbent, or the best one the clan kept on the way when it scores better.
    last = scores(clan.best_model())
    kept = clan.kept_model()
    (val_loss, accuracy), kept_step = last, None
    if kept is not None and scores(kept)[0] < last[0]:
        (val_loss, accuracy), kept_step = scores(kept), clan.kept.step
    return {"val_loss": val_loss, "val_accuracy": accuracy, "kept_step": kept_step,
            "rounds": sum(r.get("kind") == "round" for r in clan.history), "steps": clan.time_step,
            "seconds": time.perf_counter() - start, "history": clan.history}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--population-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = main(steps=args.steps, population_size=args.population_size, seed=args.seed)
    print(f"rounds: {result['rounds']}  steps: {result['steps']}  time: {result['seconds']:.1f}s")
    for rec in [r for r in result["history"] if r.get("kind") == "round"][-5:]:
        inc = rec["incumbent"]
        print(f"round {rec['round']:3d}  winner {rec['winner']}  best val {min(rec['val_losses']):.4f}  "
              f"lr {inc['lr']:.2e}  wd {inc['weight_decay']:.2e}  betas ({inc['betas/0']:.3f}, {inc['betas/1']:.4f})")
    kept = f" (the incumbent kept at step {result['kept_step']})" if result["kept_step"] is not None else ""
    print(f"validation loss {result['val_loss']:.4f}  accuracy {result['val_accuracy']:.3f}{kept}")
