"""`gfo eval RUN_DIR` and `gfo decode RUN_DIR`: rebuild a run from its saved config (`gfo.run.build`, as
`gfo train` built it) and evaluate, or compare decoders at, its latest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from gfo import errors
from gfo.run.config import (DistributedSection, MeshSection, RunConfig, apply_override, from_dict,
                            read_run_config)


def restore_run(run_dir: str, overrides: list[str] = (), step: int | None = None) -> tuple[RunConfig, Any, Any, int]:
    """`(cfg, run, state, step)`: a run rebuilt from its `config.yaml` (plus `a.b=v` overrides of sections
    that do not change the optimisation, e.g. `decode.*`) — a `gfo.run.build.Run` — and its optimizer
    state at the latest checkpoint `step` (or at checkpoint `step` when given), on this machine's devices."""
    from gfo.run import build

    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{run_dir!r} is not a gfo run directory: it has no config.yaml")
    errors.note_run_dir(run_dir)  # an unanticipated error's traceback goes to RUN/error.log
    data = read_run_config(run_dir)
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(RunConfig, data)
    # Evaluation runs on this machine's devices, whatever mesh the run was trained on.
    mesh = build.build_mesh(dataclasses.replace(cfg, mesh=MeshSection(), distributed=DistributedSection()))
    model, params = build.model_of(cfg)  # as `gfo train` built it
    if cfg.pretrain is not None:
        pre = build.build_run(cfg, run_dir, model, params, mesh, "pretrain")
        params = pre.params(_restore_or_fail(pre, cfg.keep_checkpoints)[0])
    run = build.build_run(cfg, run_dir, model, params, mesh)
    state, step = _restore_or_fail(run, cfg.keep_checkpoints, step)
    return cfg, run, state, step


def evaluate_run(run_dir: str) -> dict:
    """`gfo eval`: the run's eval metrics at its latest checkpoint, printed as a table."""
    _, run, state, step = restore_run(run_dir)
    metrics = run.evaluation.row(state)
    print(f"{run_dir} @ step {step}:")
    print("| metric | value |\n|---|---|")
    for k, v in metrics.items():
        print(f"| {k} | {v:.4f} |")
    return {"step": step, **metrics}


def decode_run(run_dir: str, overrides: list[str] = ()) -> dict:
    """`gfo decode`: greedy vs beam search vs refinement at the run's latest checkpoint (`decode` section,
    defaults when the run has none); writes `decode.md`/`decode.json` into the run directory."""
    from gfo.run.config import ConfigError

    bad = [o for o in overrides if not o.strip().startswith("decode.")]
    if bad:
        raise ConfigError(f"gfo decode --set {bad}: only decode.* keys can change (the run is fixed)")
    cfg, run, state, step = restore_run(run_dir, list(overrides))
    if cfg.decode is None:
        from gfo.run.config import DecodeSection

        cfg = dataclasses.replace(cfg, decode=DecodeSection())
    print(f"{run_dir} @ step {step}:")
    return compare_decoders_of(run, run.params(state), cfg)


def compare_decoders_of(run, params, cfg: RunConfig) -> dict:
    """`gfo.decode.compare_decoders` of `run` (a `gfo.run.build.Run`) at `params`, on its eval prompts, with
    `cfg.decode`; process 0 writes `decode.md` and `decode.json` into the run directory and prints the table."""
    from gfo import distributed
    from gfo.decode import compare_decoders, format_decoders
    from gfo.run.config import ConfigError

    d = cfg.decode
    try:
        results = compare_decoders(run.model, params, run.task, run.task.eval_batches(), d.beam_width,
                                   d.sweeps, d.top_k, d.proposals, d.length_penalty)
    except ValueError as e:
        raise ConfigError(f"decode: {e}") from None
    if distributed.is_primary():
        table = format_decoders(results)
        with open(os.path.join(run.run_dir, "decode.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(run.run_dir, "decode.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(table)
    return results


def _restore_or_fail(run, keep: int, step: int | None = None) -> tuple:
    """`(state, step)` of `run`'s latest checkpoint, or of checkpoint `step` (restored like a fresh state);
    an error when it has none."""
    from gfo.run import checkpoint
    from gfo.run.checkpoint import RunCheckpointError

    directory = os.path.join(run.run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise RunCheckpointError(f"no checkpoint directory {directory!r}: the run has not saved a checkpoint yet")
    manager = checkpoint.manager(run.run_dir, keep)
    state, step = checkpoint.restore(manager, run.init_state(), step)
    manager.close()
    if step == 0:
        raise RunCheckpointError(f"{directory!r} holds no checkpoint")
    return state, step
