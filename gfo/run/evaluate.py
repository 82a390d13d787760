"""`gfo eval RUN_DIR`: rebuild a run from its saved config and evaluate its latest checkpoint."""

from __future__ import annotations

import dataclasses
import os

import yaml

from gfo.run.config import DistributedSection, MeshSection, RunConfig, SpaceSection, apply_override, from_dict


def restore_run(run_dir: str, overrides: list[str] = ()):
    """`(cfg, stage, step)`: a run rebuilt from its `config.yaml` (plus `a.b=v` overrides of sections that do
    not change the optimisation, e.g. `decode.*`) at its latest checkpoint, on this machine's devices."""
    from gfo.run import build
    from gfo.run.train import Stage, build_mesh

    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{run_dir!r} is not a gfo run directory: it has no config.yaml")
    with open(config_file) as f:
        data = yaml.safe_load(f)
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(RunConfig, data)
    import jax

    # Evaluation runs on this machine's devices, whatever mesh the run was trained on.
    mesh = build_mesh(dataclasses.replace(cfg, mesh=MeshSection(), distributed=DistributedSection()))
    from gfo.streams import stream

    model, params = build.build_model(cfg.model, stream(cfg.seed, "run", "model"))  # as `gfo train` built it
    if cfg.pretrain is not None:
        pre = Stage(os.path.join(run_dir, "pretrain"), cfg.seed, cfg.pretrain.steps, cfg.pretrain.task,
                    cfg.pretrain.optimizer, SpaceSection(kind="full"), model, params, cfg, mesh, name="pretrain")
        _restore_or_fail(pre)
        params = pre.space.to_params(pre.optimizer.solution(pre.state))
    stage = Stage(run_dir, cfg.seed, cfg.steps, cfg.task, cfg.optimizer, cfg.space, model, params, cfg, mesh,
                  eval_section=cfg.eval)
    return cfg, stage, _restore_or_fail(stage)


def evaluate_run(run_dir: str) -> dict:
    """`gfo eval`: the run's eval metrics at its latest checkpoint, printed as a table."""
    _, stage, step = restore_run(run_dir)
    metrics = stage.eval_row()
    print(f"{run_dir} @ step {step}:")
    print("| metric | value |\n|---|---|")
    for k, v in metrics.items():
        print(f"| {k} | {v:.4f} |")
    return {"step": step, **metrics}


def decode_run(run_dir: str, overrides: list[str] = ()) -> dict:
    """`gfo decode`: greedy vs beam search vs refinement at the run's latest checkpoint (`decode` section,
    defaults when the run has none); writes `decode.md`/`decode.json` into the run directory."""
    from gfo.run.config import ConfigError
    from gfo.run.train import compare_decoders_of

    bad = [o for o in overrides if not o.strip().startswith("decode.")]
    if bad:
        raise ConfigError(f"gfo decode --set {bad}: only decode.* keys can change (the run is fixed)")
    cfg, stage, step = restore_run(run_dir, list(overrides))
    if cfg.decode is None:
        from gfo.run.config import DecodeSection

        cfg = dataclasses.replace(cfg, decode=DecodeSection())
    print(f"{run_dir} @ step {step}:")
    return compare_decoders_of(stage, cfg)


def _restore_or_fail(stage) -> int:
    from gfo.run.train import RunCheckpointError

    directory = os.path.join(stage.run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise RunCheckpointError(f"no checkpoint directory {directory!r}: the run has not saved a checkpoint yet")
    manager = stage._manager()
    step = stage.restore(manager)
    manager.close()
    if step == 0:
        raise RunCheckpointError(f"{directory!r} holds no checkpoint")
    return step
