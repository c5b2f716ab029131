"""The ``vmapclan`` command: train from a TOML config, run the demo, replay an exported schedule.

Usage::

    vmapclan train configs/digits.toml [--out DIR] [--overwrite] [--steps N] [--device cuda --cuda-graph]
    vmapclan train configs/digits.toml --tensorboard
    vmapclan train --resume RUN_DIR
    torchrun --nproc-per-node N $(which vmapclan) train configs/digits.toml [--timeout SECONDS]
    vmapclan demo [--out DIR] [--overwrite] [--steps N]
    vmapclan replay runs/demo/schedule.json

A config's ``task`` is a built-in task's name or a task of your own, ``"package.module:ClassName"``
(a :class:`vmapclan.Task` subclass), imported with the current directory on ``sys.path`` as
``python -m`` has it; a task that cannot be imported is bad input (exit 3).

``train`` and ``demo`` show a progress bar (phase, round, step, best validation loss), print a
table of rounds at the end and write a run directory: ``metrics.jsonl``, ``history.json``,
``schedule.json``, ``config.toml``, ``best_model.pt``, ``checkpoint.pt`` and PNG plots. ``replay``
trains one plain model with ``torch.optim.AdamW`` on the exported schedule, prints its final
loss next to the clan's and writes ``replay.json`` (with its training loss of every step) beside
the schedule. With ``--tensorboard`` (the optional ``tensorboard`` extra) ``train`` also writes
TensorBoard scalars into ``RUN/tensorboard/train`` and ``replay`` its curve into
``RUN/tensorboard/replay`` (see :mod:`vmapclan.tensorboard_logger`); without TensorBoard installed the option
is bad input (exit 3), named in one line.

The run directory is never overwritten by accident: ``--out`` naming a directory that holds a
run is refused unless ``--resume`` continues it or ``--overwrite`` replaces it. While a run
trains it holds ``RUN_DIR/run.lock`` (naming its pid and host); a second run in the same
directory is refused, and the lock of a process that died is taken over. ``--resume`` reads
every setting from the checkpoint, verifies the checkpoint's hash and contents, and refuses a
``config.toml`` that was edited since. Ctrl-C or SIGTERM stops after the current step, saves a
checkpoint there and prints the command that resumes (a second Ctrl-C stops at once, keeping
the last checkpoint).

Exit codes: 0 success; 2 bad command line; 3 bad input (missing file, invalid config or
schedule, naming the bad field; a damaged or edited checkpoint; a run directory in use or
holding a run); 4 training diverged (the population's losses or weights turned NaN or infinite
and could not be restored; the last good checkpoint is kept); 5 the run directory could not be
written (disk full, read-only, no permission: the error is named); 6 another rank of a
``torchrun`` run failed (died or hung: the message names it; resumable from the last checkpoint);
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM) stopped by a signal, resumable.

Under ``torchrun`` each of the N ranks trains ``population_size / N`` members (see
:mod:`vmapclan.distributed`); rank 0 holds the run directory's lock, writes its files and shows
the progress bar and the table. ``--resume`` works on any number of ranks that divides
``population_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["main", "DEMO_CONFIG", "EXIT_OK", "EXIT_USAGE", "EXIT_INPUT", "EXIT_DIVERGED", "EXIT_WRITE",
           "EXIT_RANK", "EXIT_SIGNAL"]

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_DIVERGED, EXIT_WRITE, EXIT_RANK = 0, 2, 3, 4, 5, 6
#: A run stopped by signal ``n`` exits with ``EXIT_SIGNAL + n`` (130 for Ctrl-C), as shells report it.
EXIT_SIGNAL = 128

#: The demo: a clan of 8 MLPs on scikit-learn's digits with the default schedule (a search over the
#: learning rate, then clan rounds: see ``vmapclan.schedule.default_schedule``), seconds on 2 CPU cores.
DEMO_CONFIG = {
    "task": "digits-mlp",
    "total_steps": 1500,
    "seed": 0,
    "model": {"hidden": 128},
    "data": {"batch_size": 32, "eval_samples": 0},
    "optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
    "clan": {"population_size": 8, "round_length": 50, "duty_cycle": 0.2},
}


class _InputError(Exception):
    """Bad input from the command line's files: reported with exit code 3."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmapclan", description="Population training with vmapclan.",
        epilog="exit codes: 0 success, 2 bad command line, 3 bad input file, config, checkpoint or run directory, "
               "4 training diverged, 5 the run directory cannot be written, 6 another torchrun rank failed, "
               "128+N stopped by signal N (resumable)")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p, threads=None):
        p.add_argument("--out", type=Path, help="run directory (default: runs/<task>-<time>)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (without it an existing run is refused)")
        p.add_argument("--steps", type=int, help="total steps (overrides the config's total_steps)")
        p.add_argument("--threads", type=int, default=threads,
                       help=f"torch CPU threads (default: {threads or 'torch' + chr(39) + 's choice'})")
        p.add_argument("--device", default="cpu", help="where the population trains, e.g. cuda (default: cpu)")
        p.add_argument("--cuda-graph", action="store_true",
                       help="capture each clan round step in a CUDA graph (CUDA only; see BENCHMARKS.md)")
        p.add_argument("--compile", choices=["optimizer", "step"],
                       help="torch.compile the optimizer update or the whole clan round step")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        p.add_argument("--rows", type=int, default=40, help="rounds shown in the final table (default 40)")
        p.add_argument("--tensorboard", action="store_true",
                       help="write TensorBoard scalars into RUN/tensorboard/train (needs vmapclan[tensorboard])")
        p.add_argument("--timeout", type=float,
                       help="under torchrun: seconds a rank waits for the others before failing "
                            "(default: VMAPCLAN_TIMEOUT, else 300)")

    train = sub.add_parser("train", help="train a clan from a TOML config, or resume a run")
    train.add_argument("config", type=Path, nargs="?", help="a TOML config (see configs/)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its last checkpoint (same numbers as without the stop)")
    run_options(train)
    demo = sub.add_parser("demo", help="the digits demo (about 10 seconds on 2 CPU cores)")
    # The demo's MLP is small: one thread is as fast as two, and on shared cores it avoids the
    # stalls of oversubscribed threads (measured: 25 s with one thread against 168 s with two).
    run_options(demo, threads=1)
    replay = sub.add_parser("replay", help="train one plain model on an exported schedule.json")
    replay.add_argument("schedule", type=Path, help="schedule.json from a run directory")
    replay.add_argument("--out", type=Path, help="the directory to write replay.json in (default: the schedule's)")
    replay.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.add_argument("--tensorboard", action="store_true",
                        help="write the replay's curve into tensorboard/replay beside the schedule "
                             "(needs vmapclan[tensorboard])")
    return parser


def _progress(total: int, enabled: bool, desc: str):
    """A plain tqdm bar for the replay (``None`` when not enabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def _step_options(args) -> dict | bool:
    """The clan round step's options from ``--cuda-graph`` and ``--compile`` (``True``: defaults)."""
    options = {"cuda_graph": True} if args.cuda_graph else {}
    if args.compile is not None:
        options["compile"] = args.compile
    return options or True


def _write_error(err: OSError, out: Path) -> int:
    """Report a failed write into the run directory in one line, naming the errno (ENOSPC, EROFS, ...)."""
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    what = f"{err.strerror or err}{f' ({code})' if code else ''}"
    where = f" ({err.filename})" if err.filename else ""
    print(f"vmapclan: error: cannot write the run directory {out}{where}: {what}; "
          f"an existing checkpoint.pt there is intact", file=sys.stderr)
    return EXIT_WRITE


@contextlib.contextmanager
def _stop_on_signals(machine):
    """Turn SIGINT and SIGTERM into ``machine.request_stop()``; a second signal interrupts at once."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return

    def on_signal(signum, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        machine.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _from_rank0(value):
    """Rank 0's ``value`` on every rank of a ``torchrun`` run (``value`` itself in one process).

    What concerns the run directory is decided by rank 0, which owns it, and shared, so that every
    rank goes on or stops alike.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _run_dir_lock(out: Path):
    """The run directory's lock, held by rank 0 alone under ``torchrun``; every rank learns whether it got it."""
    from .distributed import current_rank
    from .rundir import RunDirectoryBusy, run_lock

    if current_rank() != 0:
        refused = _from_rank0(None)
        if refused is not None:
            raise RunDirectoryBusy(refused)
        yield
        return
    told = False
    try:
        with run_lock(out):
            told = _from_rank0(None) is None
            yield
    except RunDirectoryBusy as err:
        if not told:
            _from_rank0(str(err))
        raise


def _train(config, args) -> int:
    import torch.distributed as dist

    owned = dist.is_available() and not dist.is_initialized()
    code = None
    try:
        code = _train_in_group(config, args)
        return code
    finally:
        # A process group the command made ends with it: one left alive until the interpreter
        # exits can abort the process there (a gloo thread still joinable: SIGABRT, exit 1 from
        # torchrun after a run that succeeded). After a success every rank is here; after a
        # failure a barrier could wait for a lost rank, so the group is only taken down.
        if owned and dist.is_initialized():
            if code == EXIT_OK:
                with contextlib.suppress(RuntimeError):
                    dist.barrier()
            dist.destroy_process_group()


def _train_in_group(config, args) -> int:
    from .distributed import DistributedError, init_from_env
    from .rundir import RunDirectoryBusy

    try:
        init_from_env(timeout=args.timeout)
    except ValueError as err:
        raise _InputError(f"--timeout: {err}") from None
    if config is None:  # --resume
        out = args.resume
        if not out.is_dir():
            raise _InputError(f"--resume: no run directory at {out}")
    else:
        # The default name holds the time: rank 0's, so that every rank names the same directory.
        out = _from_rank0(args.out or Path("runs") / f"{config.task.rpartition(':')[2]}-"
                                                     f"{time.strftime('%Y%m%d-%H%M%S')}")
        if out.exists() and not out.is_dir():
            raise _InputError(f"--out {out} is a file, not a run directory")
    created = not out.exists()
    try:
        with _run_dir_lock(out):
            return _train_locked(config, args, out)
    except DistributedError as err:
        print(f"{err}; the checkpoint in {out} is kept; resume with: vmapclan train --resume {out}", file=sys.stderr)
        return EXIT_RANK
    except RunDirectoryBusy as err:
        raise _InputError(str(err)) from None
    except _InputError:
        if created:  # leave no empty directory behind a refused run
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    except OSError as err:
        return _write_error(err, out)


def _watchers(machine, args, out: Path, writer: bool, resumed: bool):
    """``(progress bar, TensorBoard writer, the callback that feeds both)``; each ``None`` where not asked for."""
    from .progress import ProgressBar

    bar = ProgressBar(machine.total_steps, machine.config.task, start=machine.step) \
        if not args.no_progress and writer else None
    board = None
    if args.tensorboard and writer:  # rank 0 writes the run directory
        from .tensorboard_logger import TensorBoardLogger

        board = TensorBoardLogger(out / "tensorboard" / "train", [p.name for p in machine.schedule],
                                  machine.clan.population_size, purge_step=machine.step + 1 if resumed else None)
    watchers = [w for w in (bar, board) if w is not None]

    def on_event(event):
        for watch in watchers:
            watch(event)

    return bar, board, on_event


def _train_locked(config, args, out: Path) -> int:
    from .clan import DivergenceError
    from .distributed import DistributedError, current_rank
    from .machine import TrainingMachine, TrainingStopped
    from .rundir import remove_run_files, run_files_in

    writer = current_rank() == 0  # under torchrun: the rank that writes and shows the run

    fused = _step_options(args)
    existing = []
    resumed = config is None
    try:
        if config is None:  # --resume
            machine = TrainingMachine.resume(out, device=args.device, fused=fused)
        else:
            existing = run_files_in(out) if writer else []
            refused = (f"{out} already holds a run ({', '.join(existing)}); continue it with --resume {out}, or give "
                       f"--overwrite to replace it") if existing and not args.overwrite else None
            refused = _from_rank0(refused)
            if refused is not None:
                raise _InputError(refused)
            steps = args.steps if args.steps is not None else config.total_steps
            machine = TrainingMachine(config, steps, out_dir=out, device=args.device, fused=fused)
        machine.prepare()  # data, model, clan and a resumed state: every error here is bad input
    except FileNotFoundError as err:
        raise _InputError(str(err)) from None
    except DistributedError:
        raise  # another rank failed: not this run's input (exit 6, see _train)
    except (ValueError, TypeError, RuntimeError) as err:  # torch.device() raises RuntimeError for a bad name
        raise _InputError(str(err)) from None
    if existing:
        remove_run_files(out)  # --overwrite: the old run goes only once the new one can start
    config = machine.config
    bar, board, on_event = _watchers(machine, args, out, writer, resumed)
    machine.callback = on_event
    resume = f"vmapclan train --resume {out}"
    try:
        with _stop_on_signals(machine) as received:
            results = machine.train()
    except DivergenceError as err:
        kept = machine.checkpoint_step
        print(f"vmapclan: training diverged: {err}" + (f"; the last good checkpoint (step {kept}) is kept in {out}"
                                                       if kept is not None else ""), file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingStopped as err:
        name = signal.Signals(received[0]).name if received else "a stop request"
        print(f"vmapclan: {name}: {err}; resume with: {resume}", file=sys.stderr)
        return EXIT_SIGNAL + (received[0] if received else signal.SIGINT)
    except KeyboardInterrupt:
        kept = machine.checkpoint_step
        print(f"vmapclan: interrupted at step {machine.step}; the checkpoint of step {kept} is kept; "
              f"resume with: {resume}", file=sys.stderr)
        return EXIT_SIGNAL + signal.SIGINT
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    if not writer:
        return EXIT_OK
    results.save(out, plots=not args.no_plots)
    print(results.rounds_table(max_rows=args.rows))
    print(f"run directory: {out}")
    return EXIT_OK


def _replay(args) -> int:
    from .replay import read_schedule, replay
    from .tasks import resolve_task

    if args.out is not None and not args.out.is_dir() and (args.out.suffix == ".json" or args.out.exists()):
        print(f"vmapclan: error: replay --out is a directory (it gets replay.json, and tensorboard/ with "
              f"--tensorboard), got {str(args.out)!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        schedule, config, clan = read_schedule(args.schedule)
        task = resolve_task(config.task, config.task_args)
        task.model_settings(config.model)
    except FileNotFoundError:
        raise _InputError(f"no such file: {args.schedule}") from None
    except (ValueError, TypeError) as err:
        raise _InputError(str(err)) from None
    bar = _progress(config.total_steps, not args.no_progress, "replay")

    def on_step(step, phase):
        if bar is not None:
            bar.update(1)

    start = time.perf_counter()
    try:
        result = replay(schedule, config, callback=on_step, task=task, keep_step=clan.get("kept_step"))
    except (ValueError, TypeError) as err:
        if not str(err).startswith("replay: "):
            raise  # not the replay's refusal of its input (a bug in a model's code, say): its traceback
        raise _InputError(str(err)) from None  # a schedule.json edited into settings the replay refuses
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    tested = "test_loss" in result.final
    print(f"{'':<34} {'val loss':>9} {'val acc':>8}" + (f" {'test loss':>9} {'test acc':>8}" if tested else ""))
    for name, final in (("clan (best model, P members)", clan), ("replay (one model, torch AdamW)", result.final)):
        if final:
            test = f" {final.get('test_loss', math.nan):>9.4f} {final.get('test_accuracy', math.nan):>8.3f}"
            print(f"{name:<34} {final['val_loss']:>9.4f} {final['val_accuracy']:>8.3f}" + (test if tested else ""))
    out = args.out or args.schedule.parent
    out.mkdir(parents=True, exist_ok=True)
    report = {"schedule": str(args.schedule), "total_steps": config.total_steps, "seconds": seconds,
              "replay": result.final, "clan": clan, "losses": result.losses}
    (out / "replay.json").write_text(json.dumps(report, indent=2))
    if args.tensorboard:
        from .tensorboard_logger import write_replay_curve

        write_replay_curve(out / "tensorboard" / "replay", result.losses, result.final)
    print(f"{config.total_steps} steps in {seconds:.1f}s; wrote {out / 'replay.json'}")
    return EXIT_OK


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``vmapclan: warning: ...``, without the source line under it."""
    text = str(message).removeprefix("vmapclan: ")
    return f"vmapclan: warning: {text}" + ("" if category is RuntimeWarning else f" ({category.__name__})") + "\n"


def main(argv=None) -> int:
    """Entry point of the ``vmapclan`` command.

    Every warning it shows is one line (``vmapclan: warning: ...``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad command line, 3 bad input, 4 training diverged, 5 the run
        directory cannot be written, 128 + N stopped by signal N (see the module docstring).
    """
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = shown


def _main(argv) -> int:
    parser = _parser()
    # A config's task "module:Class" is found from where the command runs, as with python -m.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage and 0 on --help
        return int(exit_.code or 0)
    if getattr(args, "tensorboard", False):
        from .tensorboard_logger import require_tensorboard

        try:
            require_tensorboard()
        except ImportError as err:
            print(f"vmapclan: error: {err}", file=sys.stderr)
            return EXIT_INPUT
    options = _step_options(args) if args.command in ("train", "demo") else True
    if isinstance(options, dict):
        # --cuda-graph without a CUDA --device, say, is a bad command line (a bad device name
        # itself is reported by the machine, as without these options).
        from .step import check_options

        try:
            check_options(args.device, **options)
        except (ValueError, TypeError) as err:
            print(f"vmapclan: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except RuntimeError:
            pass
    for option in ("threads", "steps", "rows"):  # bad command lines, like argparse's own refusals
        value = getattr(args, option, None)
        if value is not None and value < 1:
            print(f"vmapclan: error: --{option} must be a positive int, got {value}", file=sys.stderr)
            return EXIT_USAGE
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "replay":
            return _replay(args)
        from .config import RunConfig

        if args.command == "demo":
            config = RunConfig.from_dict(DEMO_CONFIG)
            if args.out is None:
                args.out = Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        elif args.resume is not None:
            if args.config is not None or args.steps is not None or args.out is not None or args.overwrite:
                print("vmapclan: error: --resume takes its config, steps and run directory from the checkpoint; "
                      "give no CONFIG, --steps, --out or --overwrite with it", file=sys.stderr)
                return EXIT_USAGE
            config = None
        elif args.config is None:
            print("vmapclan: error: train needs a CONFIG (a TOML file) or --resume RUN_DIR", file=sys.stderr)
            return EXIT_USAGE
        else:
            try:
                config = RunConfig.from_toml(args.config)
            except FileNotFoundError:
                raise _InputError(f"no such file: {args.config}") from None
            except (ValueError, TypeError) as err:  # named by the path (once: a file it cannot read says it already)
                text = str(err)
                raise _InputError(text if text.startswith(str(args.config)) else f"{args.config}: {text}") from None
        return _train(config, args)
    except _InputError as err:
        print(f"vmapclan: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:  # before training started (reading data, building): nothing to save yet
        print("vmapclan: interrupted", file=sys.stderr)
        return EXIT_SIGNAL + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
