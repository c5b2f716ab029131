"""A clan of Hugging Face GPT-2 models trained on the CPython standard library's own sources.

The model is ``transformers.GPT2LMHeadModel`` built from a config (no download) and called as
one calls it anywhere: ``member.model(input_ids=x)``, returning a ``CausalLMOutput`` whose
``logits`` ``member_loss(..., key="logits")`` picks. The population runs it with eager attention
and drops its cache from the vectorized output (see the README's "What models work"). The text
is the standard library's ``.py`` files, one character per token.

Run: ``python examples/hf_gpt2.py`` (a few minutes on 2 CPU cores; ``--size 1`` for a tiny run).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from vmapclan import Clan, member_loss
from vmapclan.tasks import stdlib_corpus


def windows(tokens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(input, next-character target)`` windows ``[n, length]`` of a token stream."""
    n = (len(tokens) - 1) // length
    x = tokens[: n * length].long().view(n, length)
    y = tokens[1: n * length + 1].long().view(n, length)
    return x, y


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy over ``[B, T, vocab]`` logits."""
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def main(size: int = 4, population_size: int = 4, steps: int = 300, batch_size: int = 16, context: int = 64,
         round_length: int = 50, duty_cycle: float = 0.2, seed: int = 0, max_chars: int | None = None) -> dict:
    """Train a clan of GPT-2s on the standard library's sources; return the validation losses and history.

    Args:
        size: Width knob: ``n_embd = 16 * size``, ``n_layer = max(1, size // 2)``, ``n_head = 2``.
        population_size: P.
        steps: Training steps (``member.step()`` calls).
        batch_size: Windows per member per step.
        context: Characters per window.
        round_length, duty_cycle, seed: As for :class:`~vmapclan.Clan`.
        max_chars: Characters of source read (default: enough for ``steps`` steps of every member).

    Returns:
        ``{"initial_val_loss", "val_loss", "history", "model"}``: the best member's validation loss
        before and after training, the clan's history and the best member as a plain GPT-2.

    Example:
        >>> result = main(size=1, steps=20)  # doctest: +SKIP
    """
    import transformers

    torch.manual_seed(seed)
    max_chars = max_chars or (steps * batch_size * population_size * context + 20_000)
    train_tokens, val_tokens = stdlib_corpus(0.1, max_chars)
    x_train, y_train = windows(train_tokens, context)
    x_val, y_val = (t[:64] for t in windows(val_tokens, context))
    config = transformers.GPT2Config(vocab_size=128, n_positions=context, n_embd=16 * size,
                                     n_layer=max(1, size // 2), n_head=2, bos_token_id=10, eos_token_id=10)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    clan = Clan(model, optimizer, population_size=population_size, round_length=round_length,
                duty_cycle=duty_cycle, autobind=["adamw"], seed=seed)
    loader = clan.loader(TensorDataset(x_train, y_train), batch_size=batch_size)

    def validate(member) -> torch.Tensor:
        member.model.eval()  # no dropout while scoring: identical members score alike
        with torch.no_grad():
            out = member.model(input_ids=member.share(x_val))
            losses = member_loss(lm_loss, out, member.share(y_val), key="logits")
        member.model.train()
        return losses

    member = clan.round()
    initial = float(validate(member).min())
    step = 0
    while step < steps:
        for x, y in loader:
            loss = member_loss(lm_loss, member.model(input_ids=x), y, key="logits")
            with member.sync_context():
                loss.sum().backward()
            member.optimizer.step()
            member.optimizer.zero_grad()
            member.step()
            step += 1
            if member.done:
                clan.step(validate(member))
                member = clan.round()
            if step >= steps:
                break
    final = validate(member)
    return {"initial_val_loss": initial, "val_loss": float(final.min()), "history": clan.history,
            "model": clan.best_model()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--population-size", type=int, default=4)
    args = parser.parse_args()
    result = main(size=args.size, steps=args.steps, population_size=args.population_size)
    print(f"validation loss {result['initial_val_loss']:.3f} -> {result['val_loss']:.3f} "
          f"(nats per character) after {len(result['history'])} rounds")
