"""One rank of a small clan across processes (gloo over loopback), for ``test_distributed.py``. Not collected.

Usage: ``python dist_worker.py SCENARIO OUT_DIR [options]`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment, as ``torchrun`` sets them (without them,
the same run in one process: the reference). Rank 0 (or the single process) writes
``OUT_DIR/result.pt``; a rank that fails writes its error to ``OUT_DIR/error-RANK.txt``.

Scenarios: ``train`` (the run to compare), ``command`` (``vmapclan train`` of a small digits run
into ``OUT_DIR/run``, as ``torchrun`` would start it on each rank), ``kill`` (rank ``--victim`` kills itself with
SIGKILL at step ``--at``), ``hang`` (it sleeps there instead), ``mismatch`` (rank 1 builds its clan with another seed).
With ``--stop-at STEP`` the run saves its state (rank 0 writes ``OUT_DIR/ckpt.pt``) at that
global step and exits at once, as if killed; with ``--resume`` it starts from that file.
"""

import argparse
import datetime
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, FusedStep, member_loss

from plain_loop import train_step, validation_losses


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(360, 8, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    x_val = torch.randn(48, 8, generator=gen)
    y_val = (x_val[:, :3].sum(1) > 0).long() + (x_val[:, 3] > 1).long()
    return (x, y), (x_val, y_val)


def build(seed: int = 0) -> Clan:
    """A clan of 6 members with BatchNorm (per-member buffers), AdamW genes and gradient accumulation."""
    torch.manual_seed(0)
    # No bias before the BatchNorm: its true gradient is zero, and Adam would blow the rounding noise of
    # the two sums (one process, several) up to whole steps (the known trap), hiding real differences.
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # The incumbent accumulates 2 micro-batches, so cooperative steps carry pending sums (summed over ranks once).
    return Clan(model, optimizer, population_size=6, round_length=6, duty_cycle=0.5,
                autobind=["adamw", "gradient_accumulation"], genome_config={"num_grad_accum": {"init": 2}}, seed=seed)


def penalised_step(member, x, y) -> None:
    """The plain loop's step with a weight penalty from ``member.model.weight_term``."""
    losses = member_loss(F.cross_entropy, member.model(x), y)
    with member.sync_context():
        (losses.sum() + member.model.weight_term(lambda w: 1e-2 * sum((t ** 2).sum() for t in w.values()))).backward()
    member.optimizer.step()
    member.optimizer.zero_grad()
    member.step()


def train(args, rank: int) -> None:
    clan = build(seed=1 if args.scenario == "mismatch" and rank == 1 else 0)
    if args.resume:
        clan.load_state_dict(torch.load(os.path.join(args.out, "ckpt.pt"), weights_only=False))
    (x, y), (x_val, y_val) = data()
    loader = clan.loader((x, y), batch_size=5)
    fused = FusedStep(clan, F.cross_entropy, backward=args.backward) if args.fused else None
    member = clan.round()
    while clan.global_step < args.steps:
        for xb, yb in loader:
            if clan.global_step >= args.steps:
                break
            if args.scenario == "kill" and rank == args.victim and clan.global_step == args.at:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.scenario == "hang" and rank == args.victim and clan.global_step == args.at:
                time.sleep(3600)  # the test kills it once the others have given up
            if fused is not None:
                fused(xb, yb)
            elif args.weight_term:
                penalised_step(member, xb, yb)
            else:
                train_step(member, F.cross_entropy, xb, yb)
            if member.done:
                clan.step(validation_losses(member, F.cross_entropy, x_val, y_val))
                member = clan.round()
            if args.stop_at is not None and clan.global_step == args.stop_at:
                state = clan.state_dict()  # a collective: every rank takes part
                if rank == 0:
                    torch.save(state, os.path.join(args.out, "ckpt.pt"))
                if dist.is_initialized():
                    dist.barrier()
                os._exit(0)  # as if killed: no clean shutdown
    state = clan.state_dict()
    if rank == 0:
        torch.save({"state": state, "history": clan.history, "world_size": clan.world_size,
                    "best": clan.best_model().state_dict()}, os.path.join(args.out, "result.pt"))


def rank_main(scenario: str, out, world: int = 0, rank: int = 0, port: int = 0, **options) -> None:
    """One rank (``world=0``: the one process) of ``scenario``, as the command line below runs it.

    ``test_distributed.py`` forks the ranks from its own process with this (no second import of torch).
    """
    if world:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          LOCAL_RANK=str(rank))
    else:
        for name in ("RANK", "WORLD_SIZE"):
            os.environ.pop(name, None)
    argv = [scenario, str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [] if value is False or value is None else [flag, str(value)]
    os._exit(main(argv))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["train", "kill", "hang", "mismatch", "command"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--backward", default="auto", help="FusedStep's backward")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--weight-term", action="store_true", help="train with a weight penalty (weight_term)")
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--at", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--own-group", action="store_true", help="the command makes the process group, as under torchrun")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if "WORLD_SIZE" in os.environ and not args.own_group:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    if args.scenario == "command":
        from vmapclan.cli import main as command

        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.toml")
        run = os.path.join(args.out, "run")
        where = ["--resume", run] if args.resume else [config, "--steps", str(args.steps), "--out", run]
        code = command(["train", *where, "--no-plots", "--no-progress", "--timeout", str(args.timeout)])
        if args.own_group:  # what the interpreter's exit would find
            with open(os.path.join(args.out, f"group-{rank}.txt"), "w") as f:
                f.write(f"{dist.is_initialized()}\n")
        return code
    try:
        train(args, rank)
    except Exception as err:  # noqa: BLE001 - the test reads the message
        with open(os.path.join(args.out, f"error-{rank}.txt"), "w") as f:
            f.write(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        os._exit(7)  # no clean shutdown of a broken group (it could wait for the lost rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
