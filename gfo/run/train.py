"""`gfo train`: one run = model × space × optimizer × task, with checkpoints, metrics and a summary.

A run directory `runs_dir/name/` holds `config.yaml` (the resolved config), `metrics.jsonl`,
TensorBoard events (`tb/`), orbax checkpoints (`checkpoints/`, the last `keep_checkpoints`), and at the
end `summary.md` and `curves.png`. Restarting the same command resumes from the latest checkpoint; the
data of step `t` is `task.train_batch(t)` and its key `fold_in(key, t)`, so a resumed run ends
bit-identical to an uninterrupted one. A `pretrain` stage runs first in `name/pretrain/` (reused when
complete) and the run starts from its parameters. Each stage is a `gfo.run.build.Run` (built once);
this module only orchestrates: the config check, the run directory, the stages in turn (each through
`gfo.run.stage.run_stage`: its checkpoints, metrics log and loop).

The run executes on the `(pop, data, model)` mesh of `cfg.mesh` (`gfo.distributed`); with several
processes every process runs this same function, all write the (sharded) checkpoints, and process 0
alone writes the logs and the summary. A checkpoint restores onto any mesh shape, so a run may resume
on other hardware (the `mesh` and `distributed` sections may change between restarts).
"""

from __future__ import annotations

import os
import time

import yaml

from gfo import distributed, errors, jitting
from gfo.run import checkpoint
from gfo.run.build import build_mesh, build_run, build_runs
from gfo.run.checkpoint import RunCheckpointError, RunDirectoryError, RunLockedError  # noqa: F401 - re-exported: user errors
from gfo.run.checkpoint import CheckpointSaveError  # noqa: F401 - re-exported: a storage fault of `gfo train` (exit 1)
from gfo.run.config import RunConfig, to_dict
from gfo.run.loop import DivergenceError  # noqa: F401 - re-exported: a run that diverged
from gfo.run.stage import RunInterrupted, run_stage  # noqa: F401 - RunInterrupted re-exported
from gfo.run.stepplan import StepMemoryError  # noqa: F401 - re-exported: a user error of `gfo train`


def check_config(cfg: RunConfig) -> list[str]:
    """Build everything `cfg` describes (model, every stage's space, optimizer, task, objective) without
    running or writing anything; returns the main stage's eval metric names. Raises what `train` would."""
    pre, main = build_runs(cfg, os.path.join(cfg.runs_dir, cfg.name), build_mesh(cfg))
    if pre is not None:
        pre.evaluation.metric_names()
    return main.evaluation.metric_names()


def train(cfg: RunConfig, on_eval=None, strict: bool = False) -> dict:
    """Run (or resume) `cfg`; returns `{"records": [...], "params": ..., "run_dir": ...}`.

    Every stage is built (and its metrics traced) before the run directory is created or written, so a
    config that cannot run leaves nothing behind. `on_eval(step, row)` is called after every evaluation
    of the main stage (a sweep's pruner hook). `strict`: a newest checkpoint that fails verification
    against its manifest stops the run (instead of resuming from the newest one that verifies).
    """
    mesh = build_mesh(cfg)
    jitting.enable_compilation_cache()
    jitting.release_compiled_programs()  # many runs in one process (a sweep) stay under the kernel's map limit
    run_dir = os.path.join(cfg.runs_dir, cfg.name)
    resolved = to_dict(cfg)
    # With several processes each step below ends at a barrier where every process learns whether it failed
    # on any (`distributed.checked`): a check that fails on one process (a file only it lacks, the lock that
    # only process 0 takes) stops every process there, in one line each, instead of leaving the others waiting.
    with distributed.checked("the config check"):  # and every process has read the old config.yaml
        checkpoint.check_resumable(run_dir, cfg, resolved)
        pre, run = build_runs(cfg, run_dir, mesh)  # with pretraining, `run` is rebuilt on its parameters below
        state = (pre or run).init_state()
        if pre is not None:
            pre.evaluation.metric_names()
        run.evaluation.metric_names()
    held = None
    try:
        with distributed.checked("the run directory"):  # created, locked, its config.yaml written whole
            try:
                os.makedirs(run_dir, exist_ok=True)
                errors.note_run_dir(run_dir)  # an unanticipated error's traceback goes to RUN/error.log
                if distributed.is_primary():
                    held = checkpoint.lock(run_dir)  # one writer per run directory
                    write_config(run_dir, resolved)
            except OSError as e:  # read-only, a full disk: said before anything of the run is written
                raise _unwritable(run_dir, e) from None
        if distributed.is_primary():
            print(f"run directory: {os.path.abspath(run_dir)}")
        return _train_locked(cfg, run_dir, mesh, pre, run, state, on_eval, strict)
    finally:
        if held is not None:
            checkpoint.unlock(held)


def _unwritable(run_dir: str, e: OSError) -> RunDirectoryError:
    why = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return RunDirectoryError(f"run directory {os.path.abspath(run_dir)} cannot be written ({why}"
                             + (f": {e.filename}" if e.filename else "") + "): choose a writable runs_dir "
                             "(--set runs_dir=...) or free space on its disk")


def write_config(run_dir: str, resolved: dict) -> None:
    """`run_dir/config.yaml`, written to a temporary name, fsynced and renamed: it is whole or absent
    (never empty); a write that fails leaves the previous one (and no temporary) behind."""
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _train_locked(cfg, run_dir, mesh, pre, run, state, on_eval, strict) -> dict:
    started = time.perf_counter()
    if pre is not None:
        run = build_run(cfg, run_dir, run.model, run_stage(pre, state, cfg, strict=strict)["params"], mesh)
        state = run.init_state()
    result = run_stage(run, state, cfg, on_eval, strict)
    result["run_dir"] = run_dir
    result["wall_s"] = time.perf_counter() - started
    if cfg.decode is not None:
        from gfo.run.evaluate import compare_decoders_of

        result["decode"] = compare_decoders_of(run, result.get("final_params", result["params"]), cfg)
    if distributed.is_primary():
        from gfo.run.report import write_summary

        write_summary(run_dir, cfg, result["records"])
    return result
