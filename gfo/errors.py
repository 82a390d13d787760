"""The user-error type every config-reading module raises (its own module: `gfo.optim.registry` and
`gfo.run.config` both need it, and neither may import the other back), and where the command line
writes the traceback of an error nobody anticipated (`error_log`)."""

from __future__ import annotations

import codecs
import datetime
import os
import socket
import sys
import tempfile
import traceback


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used."""


def not_utf8(path: str) -> str:
    """Where file `path` stops being UTF-8 text — "byte 0xff at offset 14 (line 2)" — or "" when it is
    (read in chunks: the offset counts from the start of the file, whatever chunk a reader failed in)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = pending + chunk
                at = offset - len(pending) + e.start
                lines += data.count(b"\n", 0, e.start)
                return f"byte {data[e.start]:#04x} at offset {at} (line {lines})"
            if not chunk:
                return ""
            offset += len(chunk)
            lines += chunk.count(b"\n")


_log_dir: str | None = None  # the run directory of the command running now, once known


def note_run_dir(path: str | None) -> None:
    """Make `path` (a run directory that exists) where `error_log` writes; None forgets it."""
    global _log_dir
    _log_dir = None if path is None else os.path.abspath(path)


def _process_index() -> int:
    """This process's index in a multi-process run (0 otherwise), without starting a JAX backend."""
    state = getattr(sys.modules.get("jax._src.distributed"), "global_state", None)
    return getattr(state, "process_id", 0) or 0


def error_log(error: BaseException, argv: list[str]) -> str | None:
    """Append `error`'s full traceback (with the command line, host, pid, time) to the noted run
    directory's `error.log` (`error.N.log` on process N > 0), else to a new file in the temporary
    directory; returns its path (None when nothing could be written anywhere)."""
    index = _process_index()
    name = "error.log" if index == 0 else f"error.{index}.log"
    header = (f"==== {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
              f"gfo {' '.join(argv)} (host {socket.gethostname()}, pid {os.getpid()}, process {index})\n")
    text = header + "".join(traceback.format_exception(error)) + "\n"
    candidates = [os.path.join(_log_dir, name)] if _log_dir and os.path.isdir(_log_dir) else []
    for path in candidates:
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix="gfo-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:
        return None
