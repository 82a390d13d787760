"""A run's checkpoints on disk (orbax): the optimizer state of `run_dir/checkpoints/STEP` (the last
`keep_checkpoints`), the selected point of `run_dir/best/`, and whether a run directory may resume.

A checkpoint restores onto the shardings of the state it is restored like, so a run written on one mesh
resumes on another. Nothing here discards a checkpoint: a corrupt one stops the run, naming its directory.
"""

from __future__ import annotations

import os
import socket

import jax
import yaml

from gfo.run.config import PLACEMENT_KEYS, POSTHOC_KEYS, ConfigError, RunConfig


class RunCheckpointError(RuntimeError):
    """A run's checkpoint that cannot be restored (corrupt, or written by an incompatible run). Not
    `models.CheckpointError`, which is about a model checkpoint (weights, config.json) that cannot be read."""


class RunLockedError(RuntimeError):
    """Another `gfo train` holds the run directory's lock (`RUN/.lock`): one writer per run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def lock(run_dir: str) -> str:
    """Take the exclusive lock `run_dir/.lock` (created atomically, holding `host pid`); returns its path.
    A lock whose pid is not alive on this host is stale and taken over (saying so); a live holder raises
    `RunLockedError` naming it. Release with `unlock`."""
    path = os.path.join(run_dir, ".lock")
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue  # released meanwhile
            h, p = holder
            if h == host and p is not None and not _alive(p):
                print(f"taking over the stale lock {path} of {h} pid {p} (not running)")
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            raise RunLockedError(f"run directory {run_dir} is in use by another gfo train (host {h}, pid {p}; "
                                 f"lock {path}): wait for it to finish, or remove the lock if that process is gone")
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {pid}\n")
            f.flush()
            os.fsync(f.fileno())
        return path
    raise RunLockedError(f"cannot take the lock {path} of run directory {run_dir}: it keeps changing hands")


def _holder(path: str):
    """`(host, pid)` written in lock file `path` (pid None when unreadable), or None when it is gone."""
    try:
        with open(path) as f:
            parts = f.read().split()
    except FileNotFoundError:
        return None
    host = parts[0] if parts else "?"
    pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return host, pid


def unlock(path: str) -> None:
    """Release a lock taken by `lock` (only if this process still holds it)."""
    if _holder(path) == (socket.gethostname(), os.getpid()):
        os.remove(path)


def manager(run_dir: str, keep: int, folder: str = "checkpoints"):
    """An orbax `CheckpointManager` over `run_dir/folder` keeping the last `keep` steps (created if absent)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, folder)), options=options)


def restore(mgr, like) -> tuple:
    """`(state, step)` of `mgr`'s latest checkpoint, read with the shapes, dtypes and shardings of `like`
    (`(like, 0)` when there is none). Raises `RunCheckpointError` naming the step and what to remove."""
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return like, 0
    # The shardings of the current mesh: a checkpoint written on another mesh is resharded on read.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable data
        mgr.close()  # its background threads would otherwise report the failure again at exit
        first = " ".join(str(e).strip().splitlines()[:1])  # TensorStore errors carry a long spec after it
        raise RunCheckpointError(
            f"cannot restore checkpoint step {step} in {mgr.directory} ({type(e).__name__}: "
            f"{first[:200]}): it is corrupt or was written by a different configuration; remove "
            f"{os.path.join(str(mgr.directory), str(step))} to resume from an earlier step, or choose "
            f"another name (--set name=...)") from None
    return state, int(step)


def save(mgr, step: int, state) -> None:
    """Start writing `state` as checkpoint `step`: orbax copies it to the host before returning (as it
    does without `device_host_max_bytes`), so the caller may donate `state` to the next step; the write
    to disk completes in the background."""
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.StandardSave(state))


def finish(mgr) -> None:
    """Wait for the checkpoints being written, then stop the manager's background threads."""
    mgr.wait_until_finished()
    mgr.close()


def last_good(mgr) -> str:
    """Where a stopped run's checkpoint is, for a divergence message (waits for writes in flight)."""
    mgr.wait_until_finished()
    saved = mgr.latest_step()
    return (f"the last good checkpoint is kept in {mgr.directory} (step {saved})" if saved else
            "no checkpoint had been saved yet")


def save_best(run_dir: str, step: int, solution) -> None:
    """Write `solution` as the selected point `run_dir/best/step` (the one kept), synchronously."""
    import orbax.checkpoint as ocp

    mgr = manager(run_dir, 1, "best")
    mgr.save(step, args=ocp.args.StandardSave(solution), force=True)
    finish(mgr)


def restore_best(run_dir: str, like):
    """The selected point saved by `save_best`, read like `like`."""
    import orbax.checkpoint as ocp

    mgr = manager(run_dir, 1, "best")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    x = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))
    mgr.close()
    return x


def saved_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints under `run_dir/checkpoints` (empty when none)."""
    directory = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def check_resumable(run_dir: str, cfg: RunConfig, resolved: dict) -> None:
    """A run directory with progress (a checkpoint) resumes only under the same config, and never
    shorter than it has run; one without (a start that failed) is simply started again."""
    path = os.path.join(run_dir, "config.yaml")
    stages = [run_dir, os.path.join(run_dir, "pretrain")]
    if not os.path.isfile(path) or not any(saved_steps(d) for d in stages):
        return
    with open(path) as f:
        saved = yaml.safe_load(f)
    free = ("steps",) + PLACEMENT_KEYS + POSTHOC_KEYS  # a longer run, or the same run on other devices, may resume
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a gfo config (a {type(saved).__name__}); choose another name (--set name=...)")
    changed = sorted(k for k in set(saved) | set(resolved) if saved.get(k) != resolved.get(k) and k not in free)
    if changed:
        raise ConfigError(f"run directory {run_dir} holds a run with a different config (sections {changed} "
                          f"differ); resume it with the same config or choose another name (--set name=...)")
    done = max(saved_steps(run_dir), default=0)
    if cfg.steps < done:
        raise ConfigError(f"steps={cfg.steps} is shorter than the {done} steps {run_dir} has already run: "
                          f"give steps >= {done} to resume it, or choose another name (--set name=...)")
