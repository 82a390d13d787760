"""`gfo eval RUN_DIR`: rebuild a run from its saved config and evaluate its latest checkpoint."""

from __future__ import annotations

import dataclasses
import os

import yaml

from gfo.config import DistributedSection, MeshSection, RunConfig, from_dict


def evaluate_run(run_dir: str) -> dict:
    from gfo import build
    from gfo.train import Stage, build_mesh

    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{run_dir!r} is not a gfo run directory: it has no config.yaml")
    with open(config_file) as f:
        cfg = from_dict(RunConfig, yaml.safe_load(f))
    import jax

    # Evaluation runs on this machine's devices, whatever mesh the run was trained on.
    mesh = build_mesh(dataclasses.replace(cfg, mesh=MeshSection(), distributed=DistributedSection()))
    model, params = build.build_model(cfg.model, jax.random.fold_in(jax.random.key(cfg.seed), 0))
    if cfg.pretrain is not None:
        from gfo.config import SpaceSection

        pre = Stage(os.path.join(run_dir, "pretrain"), cfg.seed, cfg.pretrain.steps, cfg.pretrain.task,
                    cfg.pretrain.optimizer, SpaceSection(kind="full"), model, params, cfg, mesh)
        _restore_or_fail(pre)
        params = pre.space.to_params(pre.optimizer.solution(pre.state))
    stage = Stage(run_dir, cfg.seed, cfg.steps, cfg.task, cfg.optimizer, cfg.space, model, params, cfg, mesh)
    step = _restore_or_fail(stage)
    metrics = stage.evaluate(stage.optimizer.solution(stage.state))
    print(f"{run_dir} @ step {step}:")
    print("| metric | value |\n|---|---|")
    for k, v in metrics.items():
        print(f"| {k} | {v:.4f} |")
    return {"step": step, **metrics}


def _restore_or_fail(stage) -> int:
    from gfo.train import CheckpointError

    directory = os.path.join(stage.run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory!r}: the run has not saved a checkpoint yet")
    manager = stage._manager()
    step = stage.restore(manager)
    manager.close()
    if step == 0:
        raise CheckpointError(f"{directory!r} holds no checkpoint")
    return step
