"""A run's checkpoints on disk (orbax): the optimizer state of `run_dir/checkpoints/STEP` (the last
`keep_checkpoints`), the selected point of `run_dir/best/`, and whether a run directory may resume.

A checkpoint restores onto the shardings of the state it is restored like, so a run written on one mesh
resumes on another. Nothing here discards a checkpoint: a corrupt one stops the run, naming its directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import jax

from gfo.run.config import PLACEMENT_KEYS, POSTHOC_KEYS, ConfigError, RunConfig, from_dict, read_run_config, to_dict


class RunCheckpointError(RuntimeError):
    """A run's checkpoint that cannot be restored (corrupt, or written by an incompatible run). Not
    `models.CheckpointError`, which is about a model checkpoint (weights, config.json) that cannot be read."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, an I/O error): the run stops at once, naming the step,
    the directory and the last checkpoint that is safe (exit status 1; the earlier checkpoints are intact)."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be created or written at the start of a run (read-only, a full disk):
    a user error, reported before anything of the run is written."""


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


MANIFEST = "gfo_manifest.json"  # written last into each checkpoint step directory: what it holds, checksummed
_ORBAX_DATA = "_CHECKPOINT_METADATA"  # every step directory orbax finished writing has it
_CORRUPT = "corrupt_checkpoints"  # where a checkpoint that fails verification is moved (never deleted)


def manager(run_dir: str, keep: int, folder: str = "checkpoints", fingerprint: str | None = None):
    """An orbax `CheckpointManager` over `run_dir/folder` keeping the last `keep` steps (created if absent).
    With `fingerprint` (a `config_fingerprint`), each checkpoint it saves gets its `MANIFEST` (process 0)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, folder)), options=options)
    mgr._gfo_manifest = {"fingerprint": fingerprint, "pending": None} if fingerprint is not None else None
    return mgr


def config_fingerprint(resolved: dict) -> str:
    """sha256 of the resolved config's sections that decide what a run computes (not `steps`, where it
    runs, or post-hoc sections): a checkpoint's manifest records the config it was written under."""
    free = ("steps", "name", "runs_dir") + PLACEMENT_KEYS + POSTHOC_KEYS
    kept = {k: v for k, v in resolved.items() if k not in free}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir` but the manifest, as sorted relative paths."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str, step: int, fingerprint: str) -> None:
    """Write `step_dir/MANIFEST` (sha256 and size of every file, the config fingerprint): to a temporary
    name, fsynced, then renamed, so a manifest present is complete."""
    files = {rel: {"sha256": _sha256(os.path.join(step_dir, rel)), "size": os.path.getsize(os.path.join(step_dir, rel))}
             for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "config_fingerprint": fingerprint, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    fd = os.open(step_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(step_dir: str, fingerprint: str | None) -> str | None:
    """What is wrong with checkpoint `step_dir` against its manifest (naming the file), or None."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST}"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is not a gfo manifest"
    if fingerprint is not None and manifest.get("config_fingerprint") != fingerprint:
        return f"{path}: written under a different config"
    for rel, entry in sorted(files.items()):
        file = os.path.join(step_dir, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != entry.get("size") or _sha256(file) != entry.get("sha256"):
            return f"{file} does not match its sha256 in {MANIFEST}"
    extra = sorted(set(_files(step_dir)) - set(files))
    if extra:
        return f"{os.path.join(step_dir, extra[0])} is not in {MANIFEST}"
    return None


def select(run_dir: str, fingerprint: str | None, strict: bool = False, label: str = "") -> None:
    """Make the newest checkpoint of `run_dir/checkpoints` one that verifies against its manifest (process
    0, before the manager opens it). A directory there that is not a step orbax wrote is refused by name;
    newer checkpoints that fail verification are moved to `run_dir/corrupt_checkpoints/` (kept, never
    deleted), saying so; `strict` refuses instead. Checkpoints of an earlier gfo (no manifest in any)
    resume unverified, saying so once."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return
    steps = checked_steps(run_dir)
    steps.sort(reverse=True)
    tag = f"[{label}] " if label else ""
    if not steps:
        return
    if not any(os.path.isfile(os.path.join(directory, str(s), MANIFEST)) for s in steps):
        print(f"{tag}the checkpoints in {directory} have no {MANIFEST} (written by an earlier gfo): resuming "
              f"from step {steps[0]} unverified")
        return
    failed = []
    for step in steps:
        problem = verify(os.path.join(directory, str(step)), fingerprint)
        if problem is None:
            break
        if strict:
            raise RunCheckpointError(f"checkpoint step {step} in {directory} fails verification ({problem}); "
                                     f"--strict refuses it (without --strict the run resumes from the newest "
                                     f"checkpoint that verifies)")
        failed.append((step, problem))
    else:
        raise RunCheckpointError(f"no checkpoint in {directory} verifies (step {failed[0][0]}: {failed[0][1]}); "
                                 f"nothing was removed: move them aside to start again, or choose another name "
                                 f"(--set name=...)")
    for bad, problem in failed:
        dest = os.path.join(run_dir, _CORRUPT, str(bad))
        n = 1
        while os.path.exists(dest):
            dest, n = os.path.join(run_dir, _CORRUPT, f"{bad}.{n}"), n + 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(directory, str(bad)), dest)
        print(f"{tag}checkpoint step {bad} fails verification ({problem}): skipped, resuming from step {step}; "
              f"it is kept in {dest}")


def checked_steps(run_dir: str) -> list[int]:
    """The steps of `run_dir/checkpoints`; a directory there that is not a step orbax wrote (not an
    integer, or without orbax's data) is a `RunCheckpointError` naming it. orbax's temporary directories
    (a save cut short) are not checkpoints and are passed over."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path) or "orbax-checkpoint-tmp" in name:
            continue
        if not name.isdigit():
            raise RunCheckpointError(f"{path} is not a checkpoint step (an integer directory written by gfo "
                                     f"train): move it out of {directory} to resume")
        if not os.path.isfile(os.path.join(path, _ORBAX_DATA)):
            raise RunCheckpointError(f"{path} holds no orbax checkpoint (no {_ORBAX_DATA}): move it out of "
                                     f"{directory} to resume")
        steps.append(int(name))
    return sorted(steps)


def _manifest_pending(mgr) -> None:
    """Write the manifest of the checkpoint `mgr` saved last, once orbax has finished writing it."""
    info = getattr(mgr, "_gfo_manifest", None)
    if info is None or info["pending"] is None:
        return
    mgr.wait_until_finished()
    step, info["pending"] = info["pending"], None
    from gfo import distributed

    if distributed.is_primary():
        step_dir = os.path.join(str(mgr.directory), str(step))
        if os.path.isdir(step_dir):
            try:
                write_manifest(step_dir, step, info["fingerprint"])
            except OSError as e:  # `save_failed` names the checkpoint whose manifest this was
                e.gfo_manifest_step = step
                raise


def restore(mgr, like, step: int | None = None) -> tuple:
    """`(state, step)` of `mgr`'s latest checkpoint (or of checkpoint `step`), read with the shapes, dtypes
    and shardings of `like` (`(like, 0)` when there is none). Raises `RunCheckpointError` naming the step
    and what to remove, or the steps there are when `step` is not one of them."""
    import orbax.checkpoint as ocp

    if step is not None and step not in mgr.all_steps():
        mgr.close()
        raise RunCheckpointError(f"checkpoint step {step} is not in {mgr.directory}: it holds steps "
                                 f"{sorted(mgr.all_steps())}")
    step = mgr.latest_step() if step is None else step
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

    _manifest_pending(mgr)  # the previous checkpoint is complete before this one starts: its manifest
    mgr.save(step, args=ocp.args.StandardSave(state))
    if getattr(mgr, "_gfo_manifest", None) is not None:
        mgr._gfo_manifest["pending"] = step


def _safe_step(directory: str, fingerprint: str | None) -> int | None:
    """The newest checkpoint step in `directory` that verifies against its manifest (any complete orbax
    step when no manifest is there at all: an earlier gfo's), or None."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    steps = sorted((int(n) for n in names if n.isdigit()
                    and os.path.isfile(os.path.join(directory, n, _ORBAX_DATA))), reverse=True)
    if not any(os.path.isfile(os.path.join(directory, str(s), MANIFEST)) for s in steps):
        return steps[0] if steps else None
    for s in steps:
        if verify(os.path.join(directory, str(s)), fingerprint) is None:
            return s
    return None


def save_failed(mgr, step: int, error: BaseException) -> CheckpointSaveError:
    """The `CheckpointSaveError` for checkpoint `step` of `mgr` failing with `error`: the checkpoints
    already written are completed (their manifests) where the disk allows, the manager is closed, and the
    message names the newest checkpoint that verifies (what a rerun resumes from)."""
    try:
        finish(mgr)
    except Exception:  # noqa: BLE001 - the same fault again: what is on disk is judged below
        try:
            mgr.close()
        except Exception:  # noqa: BLE001
            pass
    directory = str(mgr.directory)
    info = getattr(mgr, "_gfo_manifest", None)
    safe = _safe_step(directory, info["fingerprint"] if info else None)
    what = f"{type(error).__name__}: {' '.join(str(error).split())}"
    kept = (f"the last safe checkpoint is step {safe} ({os.path.join(directory, str(safe))}); free space or fix "
            f"the fault and rerun the same command to resume from it" if safe is not None else
            "no checkpoint is safe yet; fix the fault and rerun the same command to start again")
    manifest_of = getattr(error, "gfo_manifest_step", None)
    failed = (f"writing the manifest of checkpoint step {manifest_of} in {directory}" if manifest_of is not None
              else f"saving checkpoint step {step} in {directory}")
    return CheckpointSaveError(f"{failed} failed ({what}); the run stopped at step {step}; {kept}")


def finish(mgr) -> None:
    """Wait for the checkpoints being written (and write the last one's manifest), then stop the
    manager's background threads."""
    mgr.wait_until_finished()
    _manifest_pending(mgr)
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
    mgr.save(step, args=ocp.args.StandardSave(_as_tree(solution)), force=True)
    finish(mgr)


def _as_tree(x):
    """`x` itself, or `{"point": x}` for a single array (a soft prompt, a subspace vector): orbax's
    standard handler saves trees only."""
    return {"point": x} if isinstance(x, jax.Array) else x


def restore_best(run_dir: str, like):
    """The selected point saved by `save_best`, read like `like`."""
    import orbax.checkpoint as ocp

    mgr = manager(run_dir, 1, "best")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like))
    x = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))
    mgr.close()
    return x["point"] if isinstance(like, jax.Array) else x


def saved_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints under `run_dir/checkpoints` (empty when none)."""
    directory = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def check_resumable(run_dir: str, cfg: RunConfig, resolved: dict) -> None:
    """A run directory with progress (a checkpoint) resumes only under the same config, and never
    shorter than it has run; one without (a start that failed) is simply started again."""
    path = os.path.join(run_dir, "config.yaml")
    stages = [run_dir, os.path.join(run_dir, "pretrain")]
    if not os.path.isfile(path) or not any(checked_steps(d) for d in stages):
        return
    saved = read_run_config(run_dir, "; restore it, or start afresh under another name (--set name=...)")
    free = ("steps",) + PLACEMENT_KEYS + POSTHOC_KEYS  # a longer run, or the same run on other devices, may resume
    saved = _as_current(saved, path)
    changed = sorted(k for k in set(saved) | set(resolved) if saved.get(k) != resolved.get(k) and k not in free)
    if changed:
        raise ConfigError(f"run directory {run_dir} holds a run with a different config (sections {changed} "
                          f"differ); resume it with the same config or choose another name (--set name=...)")
    done = max(checked_steps(run_dir), default=0)
    if cfg.steps < done:
        raise ConfigError(f"steps={cfg.steps} is shorter than the {done} steps {run_dir} has already run: "
                          f"give steps >= {done} to resume it, or choose another name (--set name=...)")


def _as_current(saved: dict, path: str) -> dict:
    """A saved config.yaml as this version resolves it (a config written before the typed optimizer
    sections reads into them), so that only a real change of config refuses a resume."""
    try:
        return to_dict(from_dict(RunConfig, saved))
    except ConfigError as e:
        raise ConfigError(f"{path} cannot be read by this version of gfo ({e}); resume it with the version that "
                          f"wrote it, or choose another name (--set name=...)") from None
