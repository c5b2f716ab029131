"""One process against several at the same ``population_size``: what a clan across ranks costs on CPU.

For each world size ``W`` (default 1 and 2) the benchmark starts ``W`` processes (gloo over
loopback on this machine; ``W = 1`` is the plain one-process clan, no group), each training
``P / W`` members of an MLP clan with :class:`~vmapclan.FusedStep` and the clan's loader, and
reports rank 0's times over whole rounds after a warm-up round:

- **coop steps/s**: cooperative steps (one model trained data-parallel; across ranks, one
  all-reduce of its gradient per step);
- **comp steps/s**: competitive steps (each rank's members on their own; no communication);
- **selection ms**: ``clan.step(val_losses)`` (an all-gather of the ``P`` losses, ranking,
  the broadcast of the winner's state, mutation);
- the bytes of :func:`~vmapclan.distributed.communication_bytes` for the model.

On one machine's CPU cores the ranks share the cores a single process would use with threads,
so this measures the overhead of the collectives, not a speed-up; several GPUs or machines,
where each rank brings its own device, could not be measured here.

Run: ``python -m vmapclan.bench distributed [--worlds 1 2] [--population 8] [--hidden 256] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import socket
import sys
import time

import torch

__all__ = ["run_distributed", "format_distributed", "main"]


def _rank(rank: int, world: int, port: int, options: dict, results) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from .. import Clan, FusedStep, member_loss
    from ..distributed import communication_bytes

    torch.set_num_threads(options["threads"])
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    h, p, b, length = options["hidden"], options["population"], options["batch"], options["round_length"]
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), population_size=p, round_length=length,
                duty_cycle=options["duty_cycle"], autobind=["adamw"], seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(p * b * length, 64, generator=gen), torch.randint(10, (p * b * length,), generator=gen)
    x_val, y_val = torch.randn(256, 64, generator=gen), torch.randint(10, (256,), generator=gen)
    loader, step = clan.loader((x, y), batch_size=b), FusedStep(clan, F.cross_entropy)
    times = {"cooperative": 0.0, "competitive": 0.0, "selection": 0.0}
    counts = {"cooperative": 0, "competitive": 0, "selection": 0}

    def barrier():
        if world > 1:
            dist.barrier()

    batches = iter(())
    for round_index in range(options["rounds"] + 1):  # round 0 warms up
        measured = round_index > 0
        while not clan.round_done:
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            phase = clan.phase
            start = time.perf_counter()
            step(xb, yb)  # no barrier around it: a cooperative step waits for the others in its all-reduce
            if measured:
                times[phase] += time.perf_counter() - start
                counts[phase] += 1
        member = clan.round()
        with torch.no_grad():
            val = member_loss(F.cross_entropy, member.model(member.share(x_val)), member.share(y_val))
        barrier()  # the competitive steps of every rank are done: time selection alone
        start = time.perf_counter()
        clan.step(val)
        if measured:
            times["selection"] += time.perf_counter() - start
            counts["selection"] += 1
    if rank == 0:
        results.put({"world": world, "population": p, "hidden": h, "numel": clan.population.numel,
                     "coop_steps_s": counts["cooperative"] / times["cooperative"] if counts["cooperative"] else None,
                     "comp_steps_s": counts["competitive"] / times["competitive"] if counts["competitive"] else None,
                     "selection_ms": 1e3 * times["selection"] / max(counts["selection"], 1),
                     "bytes": communication_bytes(clan, max(world, 2))})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(worlds=(1, 2), *, population: int = 8, hidden: int = 256, batch: int = 32,
                    round_length: int = 50, duty_cycle: float = 0.2, rounds: int = 3, threads: int = 1,
                    timeout: float = 600.0) -> list[dict]:
    """Time the same clan on each number of processes in ``worlds``; one result per world size (rank 0's).

    Each rank runs ``threads`` torch threads; the ranks are spawned processes on this machine.

    Raises:
        ValueError: for a world size that does not divide ``population``.
        RuntimeError: if a rank fails or runs past ``timeout`` seconds.
    """
    for world in worlds:
        if world < 1 or population % world:
            raise ValueError(f"run_distributed: world size {world} must be positive and divide population={population}")
    options = {"population": population, "hidden": hidden, "batch": batch, "round_length": round_length,
               "duty_cycle": duty_cycle, "rounds": rounds, "threads": threads}
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for world in worlds:
        results, port = spawn.Queue(), _free_port()
        procs = [spawn.Process(target=_rank, args=(rank, world, port, options, results)) for rank in range(world)]
        for proc in procs:
            proc.start()
        try:
            row = results.get(timeout=timeout)
            for proc in procs:
                proc.join(timeout=timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
        if any(proc.exitcode for proc in procs):
            raise RuntimeError(f"run_distributed: a rank of world size {world} failed: exit codes "
                               f"{[proc.exitcode for proc in procs]}")
        rows.append(row)
    return rows


def format_distributed(rows: list[dict]) -> str:
    """The results as a text table, then the communication model of the benchmarked model."""
    lines = [f"{'processes':>9} {'P':>3} {'coop steps/s':>12} {'comp steps/s':>12} {'selection ms':>12}",
             "-" * 52]
    for r in rows:
        lines.append(f"{r['world']:>9} {r['population']:>3} {r['coop_steps_s']:>12.1f} {r['comp_steps_s']:>12.1f} "
                     f"{r['selection_ms']:>12.2f}")
    r = rows[-1]
    bytes_ = r["bytes"]
    lines += ["", f"model: MLP 64-{r['hidden']}-{r['hidden']}-10, N = {r['numel']} parameters (float32), "
                  f"P = {r['population']}",
              f"  cooperative step: all-reduce of one model's gradient, {bytes_['allreduce']} bytes "
              f"(a ring sends {bytes_['ring_allreduce_sent']} bytes from each of 2 ranks)",
              f"  selection: all-gather of {bytes_['gather']} bytes of losses + broadcast of the winner's state, "
              f"{bytes_['winner']} bytes"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench distributed``."""
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench distributed",
                                     description="One process against several at the same population size (CPU, gloo).")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = parser.parse_args(argv)
    rows = run_distributed(args.worlds, population=args.population, hidden=args.hidden, batch=args.batch,
                           rounds=args.rounds, threads=args.threads)
    print(format_distributed(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
