"""`gfo train`: one run = model × space × optimizer × task, with checkpoints, metrics and a summary.

A run directory `runs_dir/name/` holds `config.yaml` (the resolved config), `metrics.jsonl`,
TensorBoard events (`tb/`), orbax checkpoints (`checkpoints/`, the last `keep_checkpoints`), and at the
end `summary.md` and `curves.png`. Restarting the same command resumes from the latest checkpoint; the
data of step `t` is `task.train_batch(t)` and its key `fold_in(key, t)`, so a resumed run ends
bit-identical to an uninterrupted one. A `pretrain` stage runs first in `name/pretrain/` (reused when
complete) and the run starts from its parameters.

The run executes on the `(pop, data, model)` mesh of `cfg.mesh` (`gfo.distributed`); with several
processes every process runs this same function, all write the (sharded) checkpoints, and process 0
alone writes the logs and the summary. A checkpoint restores onto any mesh shape, so a run may resume
on other hardware (the `mesh` and `distributed` sections may change between restarts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import yaml

from gfo.run import build, stepplan

from gfo import distributed

from gfo.optim import protocol
from gfo.run.config import ConfigError, RunConfig, SpaceSection, StageSection, to_dict
from gfo.run import checkpoint
from gfo.run.checkpoint import RunCheckpointError  # noqa: F401 - re-exported: a user error of `gfo train`
from gfo.run.evaluation import Evaluation, print_eval
from gfo.run.loop import DivergenceError, Hooks, StepLoop, progress  # noqa: F401 - DivergenceError re-exported
from gfo.run.metrics_log import MetricsLog
from gfo.run.stepplan import StepMemoryError  # noqa: F401 - re-exported: a user error of `gfo train`
from gfo.streams import stream


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says the last step done and the checkpoint a rerun resumes from."""


class Stage:
    """One optimisation stage over a task, with its own run directory: built from its config sections,
    restored from its latest checkpoint, run through `gfo.run.loop.StepLoop`."""

    def __init__(self, run_dir: str, seed: int, steps: int, task_section, optimizer_section, space_section,
                 model, params, cfg: RunConfig, mesh, eval_section=None, dry: bool = False, name: str = "main"):
        """`dry`: build the task, space, optimizer, objective and eval setup (every error a config can
        cause) but no optimizer state; such a stage only answers `eval_metric_names`. `name` (pretrain |
        main) names the stage's key streams (`gfo.streams`): stages never share a key."""
        self.run_dir, self.steps, self.cfg, self.mesh = run_dir, steps, cfg, mesh
        self.eval_section = eval_section  # model selection and diagnostics (the main stage's `eval`)
        self.model = model
        self.keys = {k: stream(seed, name, k) for k in ("space", "init", "optimizer", "step", "eval", "dev",
                                                         "pass_at_k")}
        self.k_step = self.keys["step"]
        self.task = build.build_task(task_section, seed, build.build_tokenizer(cfg.model, model.config.vocab_size))
        params = distributed.place(params, mesh)  # frozen weights too are split over `model`
        self.param_bytes = stepplan.tree_bytes(params)
        self.space = build.build_space(space_section, params, self.keys["space"])
        self.x0 = self.space.init(self.keys["init"])
        optimizer_section = self._plan_chunk(optimizer_section)
        self.optimizer = build.build_optimizer_for(optimizer_section, self.space, self.x0,
                                                   distributed.pop_sharding(mesh))
        self.objective = build.build_objective(self.task, task_section, optimizer_section, model, self.space,
                                               self.x0)
        self.evaluation = Evaluation(self.task, model, self.space, self.x0, self.optimizer, mesh, self.keys,
                                     eval_section, run_dir)
        if dry:
            return
        # The optimizer says how its state is sharded (parameter-shaped: model-axis path rules; populations:
        # replicated).
        state = self.optimizer.init(self.keys["optimizer"], self.x0)
        self.state = distributed.place_as(state, self.optimizer.state_sharding(state, mesh))

    def _plan_chunk(self, section):
        """`section` with `eval_chunk` from the memory budget when a population method leaves it unset
        (`gfo.run.stepplan.plan_eval_chunk`; `self.planned_chunk` is the choice, None when all fit at once)."""
        self.planned_chunk = stepplan.plan_eval_chunk(section, self.task.train_batch(0), self.model.config,
                                                      self.x0, self.param_bytes, self.mesh)
        return section if self.planned_chunk is None else dataclasses.replace(section, eval_chunk=self.planned_chunk)

    def eval_metric_names(self) -> list[str]:
        """The names `eval_row` reports, from tracing the metrics on the first eval batch (nothing runs)."""
        return self.evaluation.metric_names()

    def eval_row(self) -> dict:
        """The eval metrics of the current solution (`gfo.run.evaluation.Evaluation.row`)."""
        return self.evaluation.row(self.state)

    def _manager(self):
        return checkpoint.manager(self.run_dir, self.cfg.keep_checkpoints)

    def restore(self, manager) -> int:
        """Restore the latest checkpoint of `manager` into `self.state`; its step (0: none)."""
        self.state, step = checkpoint.restore(manager, self.state)
        return step

    def _step(self, state, t: int):
        """Step `t` (dispatched, not waited for): its data and key are functions of the seed and `t`."""
        batch = distributed.place_batch(self.task.train_batch(t), self.mesh)
        return self.optimizer.step(state, self.objective, batch, jax.random.fold_in(self.k_step, t))

    def run(self, label: str, on_eval=None) -> dict:
        """Optimise to `self.steps`; `on_eval(step, metrics)` is called after each evaluation (pruning)."""
        primary = distributed.is_primary()
        os.makedirs(self.run_dir, exist_ok=True)
        manager = self._manager()
        start = self.restore(manager)
        log = MetricsLog(self.run_dir, start, primary)
        records = log.records
        if start == 0:
            self._evaluate(log, 0, self.state, 0.0, print if primary else None, label)
        elif start >= self.steps:
            print(f"[{label}] complete at step {start}: reusing {self.run_dir}")
        else:
            print(f"[{label}] resuming {self.run_dir} from step {start}")
        if start < self.steps:
            line = self.compile_step(self.task.train_batch(start), jax.random.fold_in(self.k_step, start))
            if primary:
                print(f"[{label}] {line}")
        bar = progress(total=self.steps, initial=start, label=label, disable=not primary)
        cfg = self.cfg
        loop = StepLoop(self._step, self.optimizer.solution, steps=self.steps, log_every=cfg.log_every,
                        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, label=label)

        def evaluate(step, state, time_s):
            row = self._evaluate(log, step, state, time_s, None if bar.disable else bar.write, label)
            if on_eval is not None:
                on_eval(step, row)

        hooks = Hooks(log=log.write, evaluate=evaluate, save=lambda step, state: checkpoint.save(manager, step, state),
                      kept=lambda: checkpoint.last_good(manager))
        time_s = records[-1].get("time_s", 0.0) if records else 0.0  # carried over a resume
        try:
            self.state = loop.run(self.state, start, time_s, bar, hooks)
        except KeyboardInterrupt:
            bar.close()
            try:
                checkpoint.finish(manager)  # a checkpoint being written completes, orbax's threads stop
            except Exception:  # noqa: BLE001 - a save cut short by the interrupt: the previous step stands
                pass
            saved = manager.latest_step()
            raise RunInterrupted(
                f"[{label}] interrupted at step {loop.done}; "
                + (f"checkpoint at step {saved} in {manager.directory}" if saved else "no checkpoint saved yet")
                + "; rerun the same command to resume") from None
        except BaseException:  # divergence, a pruned sweep trial: checkpoints being written complete first
            bar.close()
            checkpoint.finish(manager)
            raise
        bar.close()
        checkpoint.finish(manager)
        log.close()
        result = {"records": records, "params": self.space.to_params(self.optimizer.solution(self.state))}
        selected, params = self.evaluation.selected(records, self.state)
        if selected is not None:  # the protocol's model is the dev-selected point; the final one stays available
            result.update(selected=selected, final_params=result["params"], params=params)
        return result

    def _evaluate(self, log: MetricsLog, step: int, state, time_s: float, write, label: str) -> dict:
        """Evaluate `state` (after `step` steps): log the row, track the best point, print the line."""
        row = {"step": step, "split": "eval", "time_s": time_s, **self.evaluation.row(state)}
        log.write(row)
        self.evaluation.track_best(row, log.records, state)
        print_eval(write, label, row)
        return row

    def compile_step(self, batch, key) -> str:
        """Lower and compile the step ahead of time (the loop then reuses the executable); one line with
        XLA's memory analysis as multiples of the parameter bytes per device. Raises `StepMemoryError`
        when the step's peak (arguments + outputs − aliased (donated) + temporaries + code) exceeds the
        device's memory."""
        t0 = time.perf_counter()
        batch = distributed.place_batch(batch, self.mesh)
        compiled = protocol.lower_step(self.optimizer, self.state, self.objective, batch, key).compile()
        seconds = time.perf_counter() - t0
        analysis = compiled.memory_analysis()
        if analysis is None:  # a backend without the analysis
            return f"compiled step in {seconds:.1f} s (no memory analysis on this backend)"
        line = stepplan.step_memory_line(analysis, self.param_bytes, seconds,
                                         *stepplan.device_memory_limit(self.mesh))
        if self.planned_chunk is not None:
            line += f"; eval_chunk {self.planned_chunk} chosen from the memory budget"
        from gfo.optim.optimizer import Optimizer
        from gfo.optim.population import PopulationConfig

        if self.planned_chunk is None and isinstance(self.optimizer, Optimizer):  # the library's own plan
            estimator = self.optimizer.prepare(self.objective, self.state.x, batch, key)
            if isinstance(estimator, PopulationConfig) and estimator.batch_size is not None:
                line += (f"; {estimator.batch_size} members per chunk (the population's activations within the "
                         f"parameters' size: gfo.optim.plan)")
        return line


def _build_model(cfg: RunConfig):
    """`build.build_model`, with a checkpoint that cannot be read named (its JSON files name themselves:
    `models.jsonfile.read_json_object`)."""
    try:
        return build.build_model(cfg.model, stream(cfg.seed, "run", "model"))
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: cannot read the checkpoint: {e}") from None


def _stages(cfg: RunConfig, run_dir: str, model, params, mesh) -> tuple[Stage | None, Stage]:
    """The pretrain stage (or None) and the main stage; with a pretrain stage the main one is a dry build
    on the initial parameters (its real start point is known only after pretraining)."""
    pre = None
    if cfg.pretrain is not None:
        p: StageSection = cfg.pretrain
        pre = Stage(os.path.join(run_dir, "pretrain"), cfg.seed, p.steps, p.task, p.optimizer,
                    SpaceSection(kind="full"), model, params, cfg, mesh, name="pretrain")
    main = Stage(run_dir, cfg.seed, cfg.steps, cfg.task, cfg.optimizer, cfg.space, model, params, cfg, mesh,
                 eval_section=cfg.eval, dry=pre is not None)
    return pre, main


def check_config(cfg: RunConfig) -> list[str]:
    """Build everything `cfg` describes (model, every stage's space, optimizer, task, objective) without
    running or writing anything; returns the main stage's eval metric names. Raises what `train` would."""
    mesh = build_mesh(cfg)
    model, params = _build_model(cfg)
    pre, main = _stages(cfg, os.path.join(cfg.runs_dir, cfg.name), model, params, mesh)
    if pre is not None:
        pre.eval_metric_names()
    return main.eval_metric_names()


def train(cfg: RunConfig, on_eval=None) -> dict:
    """Run (or resume) `cfg`; returns `{"records": [...], "params": ..., "run_dir": ...}`.

    Every stage is built (and its metrics traced) before the run directory is created or written, so a
    config that cannot run leaves nothing behind. `on_eval(step, row)` is called after every evaluation
    of the main stage (a sweep's pruner hook).
    """
    mesh = build_mesh(cfg)
    stepplan.enable_compilation_cache()
    stepplan.release_compiled_programs()  # many runs in one process (a sweep) stay under the kernel's map limit
    run_dir = os.path.join(cfg.runs_dir, cfg.name)
    resolved = to_dict(cfg)
    checkpoint.check_resumable(run_dir, cfg, resolved)
    model, params = _build_model(cfg)
    pre, stage = _stages(cfg, run_dir, model, params, mesh)
    if pre is not None:
        pre.eval_metric_names()
    stage.eval_metric_names()
    distributed.barrier("gfo:checked")  # every process has read the old config.yaml before it is rewritten
    os.makedirs(run_dir, exist_ok=True)
    if distributed.is_primary():
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
        print(f"run directory: {os.path.abspath(run_dir)}")
    distributed.barrier("gfo:config")  # no process reads a half-written config.yaml on resume
    started = time.perf_counter()
    if pre is not None:
        params = pre.run("pretrain")["params"]
        stage = Stage(run_dir, cfg.seed, cfg.steps, cfg.task, cfg.optimizer, cfg.space, model, params, cfg, mesh,
                      eval_section=cfg.eval)
    result = stage.run(cfg.optimizer.method, on_eval)
    result["run_dir"] = run_dir
    result["wall_s"] = time.perf_counter() - started
    if cfg.decode is not None:
        result["decode"] = compare_decoders_of(stage, cfg)
    if distributed.is_primary():
        from gfo.run.report import write_summary

        write_summary(run_dir, cfg, result["records"])
    return result


def compare_decoders_of(stage: Stage, cfg: RunConfig) -> dict:
    """`gfo.decode.compare_decoders` at the stage's current parameters, on its eval prompts; process 0
    writes `decode.md` and `decode.json` into the run directory and prints the table."""
    from gfo.decode import compare_decoders, format_decoders

    d = cfg.decode
    params = stage.space.to_params(stage.optimizer.solution(stage.state))
    try:
        results = compare_decoders(stage.model, params, stage.task, stage.task.eval_batches(), d.beam_width,
                                   d.sweeps, d.top_k, d.proposals, d.length_penalty)
    except ValueError as e:
        raise ConfigError(f"decode: {e}") from None
    if distributed.is_primary():
        table = format_decoders(results)
        with open(os.path.join(stage.run_dir, "decode.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(stage.run_dir, "decode.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(table)
    return results


def build_mesh(cfg: RunConfig):
    """Start multi-process JAX if `cfg.distributed` (or the environment) asks for it; the run's mesh."""
    d = cfg.distributed
    try:
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
        return distributed.make_mesh(cfg.mesh.pop, cfg.mesh.data, cfg.mesh.model)
    except distributed.DistributedError as e:
        raise ConfigError(str(e)) from None
