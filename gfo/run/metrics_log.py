"""A stage's metrics log: the rows of `metrics.jsonl` (one JSON object per line: `step`, `split` = train
| eval, `time_s`, metrics) and their TensorBoard scalars (`tb/`, when tensorboardX is installed).

On resume the log is cut back to the rows up to the restored step (a last line cut short by a kill is
dropped), so the rows past the checkpoint a run resumes from are written again, once. The cut file
replaces the old one atomically; every row appended is flushed, and the file is fsynced before each
checkpoint is saved, so a checkpoint never has rows missing before it. Every process keeps the rows;
process 0 alone writes them.
"""

from __future__ import annotations

import json
import os

from gfo.run.report import read_jsonl


class MetricsLog:
    """`records`: the rows so far (those read back up to `upto`, then every `write`)."""

    def __init__(self, run_dir: str, upto: int, primary: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records = read_records(self.path, upto)
        self.primary = primary
        if primary:  # drop lines past the checkpoint we resume from (and a partial last line)
            os.makedirs(run_dir, exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self.writer = tensorboard(run_dir) if primary else None

    def write(self, row: dict) -> None:
        """Keep `row`, and on process 0 append it to the file and to TensorBoard as `split/name`."""
        self.records.append(row)
        if not self.primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "split"):
                    self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def has(self, step: int, split: str) -> bool:
        """Whether a row of `split` at `step` is in the log."""
        return any(r["step"] == step and r["split"] == split for r in self.records)

    def sync(self) -> None:
        """fsync the file (before a checkpoint is saved: the rows up to it are on disk first)."""
        if self.primary and os.path.isfile(self.path):
            with open(self.path, "a") as f:
                os.fsync(f.fileno())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: str, upto: int) -> list[dict]:
    """The rows of `path` with `step <= upto` (none when `upto` is 0 or the file is absent)."""
    if not os.path.isfile(path) or not upto:
        return []
    return [r for r in read_jsonl(path) if r["step"] <= upto]


def tensorboard(run_dir: str):
    """A tensorboardX writer into `run_dir/tb`, or None without tensorboardX (metrics.jsonl has everything)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))
