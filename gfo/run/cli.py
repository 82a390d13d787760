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

With no COMMAND (or only options) `gfo` runs `gfo train`. Every command ends an error the same way
(`main`): a user error (a bad config value, a missing, unreadable or non-UTF-8 file, an unreadable
checkpoint) prints one line naming it and exits with status 2; a run that failed (diverged, a checkpoint
not written) one line, status 1; Ctrl-C during a run says where it stopped and exits with status 130
(rerunning the same command resumes it); an unanticipated error prints its type and message and the file
holding its traceback (RUN/error.log once the run directory is known, else a temporary file), status 1.
`--debug` anywhere on the command line (or GFO_DEBUG=1) re-raises every error with its traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gfo import errors

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
    distributed.initialize(d.coordinator_address, d.num_processes, d.process_id, d.initialization_timeout)
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


# The exceptions that mean bad input (exit 2, one line), by module and name: config, data, checkpoint,
# memory plan. Looked up among the modules already imported, never importing one: an error raised before its
# module was imported cannot be one of them, and the error path must not touch a device (importing evosax
# does; with a multi-process start that timed out, JAX's half-started runtime would abort the process).
USER_ERRORS = (("gfo.errors", "ConfigError"), ("gfo.tasks.loaders", "DataError"),
               ("gfo.run.checkpoint", "RunCheckpointError"), ("gfo.run.checkpoint", "RunDirectoryError"),
               ("gfo.run.checkpoint", "RunLockedError"), ("models.hf_config", "CheckpointError"),
               ("gfo.optim.search.strategies", "StrategyMemoryError"), ("gfo.run.report", "MetricsError"),
               ("gfo.distributed", "DistributedError"))


def _loaded(names) -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(kind for kind in found if isinstance(kind, type))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2, one line): `USER_ERRORS` (those imported), and every
    operating-system error (a missing, unreadable or unwritable file: it names the file)."""
    return _loaded(USER_ERRORS) + (OSError, UnicodeDecodeError, json.JSONDecodeError, _Usage)


def _anticipated(e: BaseException) -> bool:
    """A user error by type, or an error of a reader gfo hands user files to (YAML, safetensors)."""
    if type(e).__module__.split(".")[0] in ("yaml", "safetensors", "safetensors_rust"):
        return True
    return isinstance(e, user_errors())


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # "[Errno 2] ...: 'x'" -> "x: ..."
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{where}: {e.strerror}"
    if isinstance(e, UnicodeDecodeError):  # the reader that knew the file would have named it
        return (f"a file is not {e.encoding} text: byte {e.object[e.start]:#04x} at offset {e.start} "
                f"({e.reason})")
    return " ".join(str(e).split()) or type(e).__name__


# A run that failed on its own (diverged) or whose storage failed: exit 1, one line (looked up as USER_ERRORS).
FAILED_RUN = (("gfo.run.loop", "DivergenceError"), ("gfo.run.checkpoint", "CheckpointSaveError"))


DEBUG_ENV = "GFO_DEBUG"  # set (not "" or "0"), or `--debug` anywhere on the command line: errors re-raise


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Run one command. Every error ends in one line on stderr (two for an unanticipated one), the same
    for every command in `COMMANDS`: bad input exits 2, a run that failed 1, Ctrl-C 130; an unanticipated
    error says its type and message and where its full traceback was written (the run directory's
    `error.log` once known, else a temporary file), exit 1. `--debug` or GFO_DEBUG=1 re-raises instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full = list(argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        argv[0] = "help"
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    if command not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(command[:2])]
        print(f"gfo: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; expected one of {sorted(COMMANDS)} (gfo help lists them)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    errors.note_run_dir(None)
    try:
        COMMANDS[command](argv)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error becomes its line and exit status here
        if debug:
            raise
        code, text = _describe(command, e, full)
        print(text, file=sys.stderr)
        _exit(code, e)


def _describe(command: str, e: BaseException, argv: list[str]) -> tuple[int, str]:
    """`(exit status, what to print)` for an error that ended `gfo COMMAND`."""
    if isinstance(e, KeyboardInterrupt):  # a run's RunInterrupted says where it stopped and how to resume
        return EXIT_INTERRUPTED, f"\ngfo {command}: {_one_line(e) if str(e) else 'interrupted'}"
    if not isinstance(e, Exception):
        return EXIT_FAILED, f"gfo {command}: {type(e).__name__}: {_one_line(e)}"
    try:
        if isinstance(e, _loaded(FAILED_RUN)):
            return EXIT_FAILED, f"gfo {command}: {_one_line(e)}"
        if _anticipated(e):
            return EXIT_USAGE, f"gfo {command}: error: {_one_line(e)}"
    except Exception:  # noqa: BLE001 - a failure to classify (an import error) is itself unanticipated
        pass
    message = _one_line(e)
    message = message if len(message) <= 300 else message[:297] + "..."
    log = errors.error_log(e, argv)
    where = (f"the full traceback is in {log}" if log else "no traceback could be written")
    return EXIT_FAILED, (f"gfo {command}: internal error: {type(e).__name__}: {message}\n"
                         f"gfo {command}: {where} (rerun with --debug or {DEBUG_ENV}=1 to see it here)")


def _exit(code: int, e: BaseException) -> None:
    """Exit with `code`; at once (no interpreter shutdown) when `e` left a thread that cannot be stopped
    (a multi-process start still waiting for its peers: JAX's shutdown would wait for them, and log)."""
    if getattr(e, "abandon_process", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code) from None


if __name__ == "__main__":
    main()
