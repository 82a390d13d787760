"""The `gfo` command line: `gfo [demo] [...]`."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "gfo.demo"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command not in COMMANDS:
        raise SystemExit(f"gfo: unknown command {command!r}; expected one of {sorted(COMMANDS)}")
    import importlib

    importlib.import_module(COMMANDS[command]).main(argv)


if __name__ == "__main__":
    main()
