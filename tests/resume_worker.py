"""A small clan run that checkpoints after every step and resumes from its run directory.

Used by ``test_resume.py``, which kills it with SIGKILL at random moments and checks that the
resumed run ends exactly where an uninterrupted one does. Not collected by pytest.

Usage: ``python resume_worker.py RUN_DIR TOTAL_STEPS [--crash-at STEP --crash-mode MODE]``
where MODE ``before-rename`` kills the process after the new checkpoint is written but before
it replaces the old one, and ``mid-write`` kills it halfway through writing the new checkpoint.
"""

import argparse
import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan
from vmapclan.checkpoint import load_checkpoint, save_checkpoint

from plain_loop import train_step, validation_losses


def build(run_dir):
    """The run: model with BatchNorm and Dropout, AdamW genes and gradient accumulation."""
    data_gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=data_gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    x_val, y_val = torch.randn(64, 8, generator=data_gen), None
    y_val = (x_val[:, :3].sum(1) > 0).long() + (x_val[:, 3] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clan = Clan(model, optimizer, population_size=4, round_length=6, duty_cycle=0.5,
                autobind=["adamw", "gradient_accumulation"], seed=0)
    checkpoint = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(checkpoint):
        clan.load_state_dict(load_checkpoint(checkpoint)["clan"])
    return clan, clan.loader((x, y), batch_size=8), (x_val, y_val), checkpoint


def crash_during_save(mode):
    """Make the next checkpoint write kill this process at the chosen moment."""
    if mode == "before-rename":
        def replace(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    else:
        real_save = torch.save

        def partial_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.flush()
            f.truncate(f.tell() // 2)  # half a file on disk, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = partial_save


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("total_steps", type=int)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--crash-mode", choices=["before-rename", "mid-write"], default="before-rename")
    args = parser.parse_args()
    torch.set_num_threads(1)  # bitwise reproducibility across processes
    clan, loader, (x_val, y_val), checkpoint = build(args.run_dir)
    print("ready", clan.global_step, flush=True)
    member = clan.round()
    while clan.global_step < args.total_steps:
        for x, y in loader:
            member.model.train()
            train_step(member, F.cross_entropy, x, y)
            if member.done:
                clan.step(validation_losses(member, F.cross_entropy, x_val, y_val))
                member = clan.round()
            if args.crash_at is not None and clan.global_step == args.crash_at:
                crash_during_save(args.crash_mode)
            save_checkpoint({"clan": clan.state_dict()}, checkpoint)
            if clan.global_step >= args.total_steps:
                break
    final = {"params": clan.population.flat, "buffers": clan.population.buffers,
             "genomes": clan.genomes, "history": clan.history}
    save_checkpoint(final, os.path.join(args.run_dir, "final.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
