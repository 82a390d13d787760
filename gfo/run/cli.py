"""The `gfo` command line.

usage: gfo [COMMAND] [ARGS...]        `gfo help COMMAND` (or `gfo COMMAND --help`) shows a command's options

commands:
  train [CONFIG] [--variant smoke] [--set key=value ...]   run or resume a run (no CONFIG: the quickstart)
  eval RUN_DIR                           evaluate a run's latest checkpoint
  decode RUN_DIR [--set decode.k=v ...]  greedy vs beam search vs refinement at the latest checkpoint
  report RUN_DIR... [--out DIR]          side-by-side table (and curves) of runs or sweeps
  export RUN_DIR OUT [--format hf|peft|gguf] [--checkpoint latest|best|STEP] [--dtype D] [--force]
                                         a checkpoint as a Hugging Face model, PEFT adapter or GGUF file
  sweep [CONFIG] --param K=loguniform(a,b) ... --metric M   optuna search over seeds, with pruning
  demo [--family gpt2|llama|opt]         the model demo (train, save/load, generate)
  help [COMMAND]                         this text, or a command's options

With no COMMAND (or only options) `gfo` runs `gfo train`. A user error (a bad config value, a missing
file, an unreadable checkpoint) prints one line and exits with status 2; Ctrl-C during a run says where
it stopped and exits with status 130; rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2  # a bad config, file or argument: the user can fix it
EXIT_FAILED = 1  # a run that failed on its own (diverged) or whose storage failed (a checkpoint not written)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def _train(argv):
    from gfo import distributed
    from gfo.run.config import load_config

    p = argparse.ArgumentParser(prog="gfo train", description="Run a config, or resume it: rerunning the same "
                                "command continues from the latest checkpoint in RUNS_DIR/NAME.")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded quickstart); its run is named "
                   "after the file unless it sets name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.sigma=0.01 (repeatable)")
    p.add_argument("--variant", default=None, help="a named variant of the config file (e.g. smoke)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process: process 0's address (= --set distributed.coordinator_address=...)")
    p.add_argument("--strict", action="store_true", help="refuse to resume when the newest checkpoint fails "
                   "verification against its manifest (default: resume from the newest one that verifies)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    args = p.parse_args(argv)
    flags = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
             "process_id": args.process_id}
    overrides = args.overrides + [f"distributed.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides, args.variant)
    d = cfg.distributed
    # before gfo.run.train is imported: evosax's import already touches a device
    distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    from gfo.run.train import train

    train(cfg, strict=args.strict)


def _eval(argv):
    from gfo.run.evaluate import evaluate_run

    p = argparse.ArgumentParser(prog="gfo eval", description="Evaluate a run's latest checkpoint.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    evaluate_run(args.run_dir)


def _decode(argv):
    from gfo.run.evaluate import decode_run

    p = argparse.ArgumentParser(prog="gfo decode", description="Compare greedy, beam search and refinement "
                                "decoding at a run's latest checkpoint (completion tasks).")
    p.add_argument("run_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.KEY=VALUE")
    args = p.parse_args(argv)
    decode_run(args.run_dir, args.overrides)


def _report(argv):
    from gfo.run.report import compare

    p = argparse.ArgumentParser(prog="gfo report", description="Side-by-side final metrics (and curves) of "
                                "runs, or of sweeps (their best trial).")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="directory for report.md and curves.png")
    args = p.parse_args(argv)
    print(compare(args.run_dirs, args.out))


def _export(argv):
    from gfo.run.export import DTYPES, FORMATS, export_run

    p = argparse.ArgumentParser(prog="gfo export", description="Write a run's checkpoint as a Hugging Face model "
                                "directory (hf), a PEFT adapter (peft: LoRA or soft prompt) or a GGUF file (gguf).")
    p.add_argument("run_dir")
    p.add_argument("out", help="the directory (hf, peft) or .gguf file to write; refused if it exists")
    p.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)} (default hf)")
    p.add_argument("--checkpoint", default="latest", help="latest (default), best (the dev-selected point in "
                   "RUN/best/) or a step number")
    p.add_argument("--dtype", default="float32", help=f"dtype of the written tensors: one of {', '.join(DTYPES)}")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = p.parse_args(argv)
    export_run(args.run_dir, args.out, args.format, args.checkpoint, args.dtype, args.force)


def _sweep(argv):
    from gfo.run.sweep import main as sweep_main

    sweep_main(argv)


def _demo(argv):
    from gfo.run import demo

    demo.main(argv)


def _help(argv):
    if argv and argv[0] in COMMANDS and argv[0] != "help":
        COMMANDS[argv[0]](["--help"])
    elif argv:
        raise _Usage(f"no command {argv[0]!r}: expected one of {sorted(COMMANDS)}")
    print(__doc__.split("\n", 2)[2].strip())


COMMANDS = {"train": _train, "eval": _eval, "decode": _decode, "report": _report, "export": _export, "sweep": _sweep,
            "demo": _demo, "help": _help}


class _Usage(Exception):
    """A bad command line (the message is the whole report)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2, one line): config, data, checkpoint, memory plan."""
    from models.hf import CheckpointError

    from gfo.run.config import ConfigError
    from gfo.distributed import DistributedError
    from gfo.run.report import MetricsError
    from gfo.optim.search.strategies import StrategyMemoryError
    from gfo.tasks.loaders import DataError
    from gfo.run.train import RunCheckpointError, RunDirectoryError, RunLockedError

    return (ConfigError, DataError, RunCheckpointError, RunDirectoryError, RunLockedError, CheckpointError, StrategyMemoryError, MetricsError,
            DistributedError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            json.JSONDecodeError, _Usage)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        argv[0] = "help"
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    if command not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(command[:2])]
        print(f"gfo: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; expected one of {sorted(COMMANDS)} (gfo help lists them)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        COMMANDS[command](argv)
    except KeyboardInterrupt as e:  # a run's RunInterrupted says where it stopped and how to resume
        print(f"\ngfo {command}: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        from gfo.run.train import CheckpointSaveError, DivergenceError  # imported late: `gfo train` starts
        # JAX's distributed runtime first

        if isinstance(e, (DivergenceError, CheckpointSaveError)):
            print(f"gfo {command}: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_FAILED) from None
        if isinstance(e, user_errors()):
            print(f"gfo {command}: error: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        raise

if __name__ == "__main__":
    main()
