"""The `gfo` command line.

    gfo train [CONFIG] [--variant smoke] [--set key=value ...]   run or resume (no CONFIG: the quickstart)
    gfo eval RUN_DIR                           evaluate a run's latest checkpoint
    gfo decode RUN_DIR [--set decode.k=v ...]  greedy vs beam search vs refinement at the latest checkpoint
    gfo report RUN_DIR... [--out DIR]          side-by-side table (and curves) of runs or sweeps
    gfo sweep [CONFIG] --param K=loguniform(a,b) ... --metric M   optuna search, seeds, pruning
    gfo demo                                   the model demo (train, save/load, generate)
"""

from __future__ import annotations

import argparse
import sys


def _train(argv):
    from gfo import distributed
    from gfo.config import load_config

    p = argparse.ArgumentParser(prog="gfo train")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", default=None, help="a named variant of the config file (e.g. smoke)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process: process 0's address (= --set distributed.coordinator_address=...)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    args = p.parse_args(argv)
    flags = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
             "process_id": args.process_id}
    overrides = args.overrides + [f"distributed.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides, args.variant)
    d = cfg.distributed
    try:  # before gfo.train is imported: evosax's import already touches a device
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    except distributed.DistributedError as e:
        raise SystemExit(f"gfo train: {e}") from None
    from gfo.train import train

    train(cfg)


def _eval(argv):
    from gfo.evaluate import evaluate_run

    p = argparse.ArgumentParser(prog="gfo eval")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    evaluate_run(args.run_dir)


def _decode(argv):
    from gfo.evaluate import decode_run

    p = argparse.ArgumentParser(prog="gfo decode")
    p.add_argument("run_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.KEY=VALUE")
    args = p.parse_args(argv)
    decode_run(args.run_dir, args.overrides)


def _report(argv):
    from gfo.report import compare

    p = argparse.ArgumentParser(prog="gfo report")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="directory for report.md and curves.png")
    args = p.parse_args(argv)
    print(compare(args.run_dirs, args.out))


def _sweep(argv):
    from gfo.sweep import main as sweep_main

    sweep_main(argv)


def _demo(argv):
    from gfo import demo

    demo.main(argv)


COMMANDS = {"train": _train, "eval": _eval, "decode": _decode, "report": _report, "sweep": _sweep, "demo": _demo}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    if command not in COMMANDS:
        raise SystemExit(f"gfo: unknown command {command!r}; expected one of {sorted(COMMANDS)}")
    from gfo.config import ConfigError
    from gfo.tasks.loaders import DataError
    from gfo.train import CheckpointError, DivergenceError

    try:
        COMMANDS[command](argv)
    except (ConfigError, DataError, CheckpointError, DivergenceError, FileNotFoundError) as e:
        raise SystemExit(f"gfo {command}: {e}") from None


if __name__ == "__main__":
    main()
