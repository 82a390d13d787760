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
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from gfo import build, distributed, protocol, stepplan
from gfo.config import PLACEMENT_KEYS, POSTHOC_KEYS, ConfigError, RunConfig, SpaceSection, StageSection, to_dict
from gfo.report import read_jsonl
from gfo.stepplan import StepMemoryError  # noqa: F401 - re-exported: a user error of `gfo train`
from gfo.streams import stream


class DivergenceError(RuntimeError):
    """The searched parameters became non-finite; the last good checkpoint is kept."""


class RunCheckpointError(RuntimeError):
    """A run's checkpoint that cannot be restored (corrupt, or written by an incompatible run). Not
    `models.CheckpointError`, which is about a model checkpoint (weights, config.json) that cannot be read."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says the last step done and the checkpoint a rerun resumes from."""


def _jsonable(metrics: dict) -> dict:
    return {k: float(v) for k, v in distributed.to_host(metrics).items()}


class Stage:
    """One optimisation stage over a task, with its own run directory."""

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
        task = self.task
        self.metrics_fn = _frozen_args(lambda space, x, batch, key: task.metrics(model, space.to_params(x), batch, key),
                                       self.space)
        self._setup_eval()
        if dry:
            return
        # The optimizer says how its state is sharded (parameter-shaped: model-axis path rules; populations:
        # replicated).
        state = self.optimizer.init(self.keys["optimizer"], self.x0)
        self.state = distributed.place_as(state, protocol.state_sharding(self.optimizer, state, mesh))

    def _plan_chunk(self, section):
        """`section` with `eval_chunk` from the memory budget when a population method leaves it unset
        (`gfo.stepplan.plan_eval_chunk`; `self.planned_chunk` is the choice, None when all fit at once)."""
        self.planned_chunk = stepplan.plan_eval_chunk(section, self.task.train_batch(0), self.model.config,
                                                      self.x0, self.param_bytes, self.mesh)
        return section if self.planned_chunk is None else dataclasses.replace(section, eval_chunk=self.planned_chunk)

    def eval_metric_names(self) -> list[str]:
        """The names `evaluate` reports, from tracing the metrics on the first eval batch (nothing runs)."""
        batch = distributed.place_batch(self.task.eval_batches()[0], self.mesh)
        names = set(jax.eval_shape(self.metrics_fn, self.x0, batch, self.keys["eval"]))
        if self.dev_batches is not None:
            names |= {f"dev_{k}" for k in names}
        if self.kl_fn is not None:
            names.add("kl_drift")
        if self.pass_fn is not None:
            names |= set(jax.eval_shape(self.pass_fn, self.x0, batch, self.keys["pass_at_k"]))
        return sorted(names)  # (a RandOpt ensemble vote adds its names only when it runs)

    # ------------------------------------------------------------------ checkpoints
    def _manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints, create=True)
        return ocp.CheckpointManager(os.path.abspath(os.path.join(self.run_dir, "checkpoints")), options=options)

    def restore(self, manager) -> int:
        import orbax.checkpoint as ocp

        step = manager.latest_step()
        if step is None:
            return 0
        # The shardings of the current mesh: a checkpoint written on another mesh is resharded on read.
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        try:
            self.state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for unreadable data
            manager.close()  # its background threads would otherwise report the failure again at exit
            first = " ".join(str(e).strip().splitlines()[:1])  # TensorStore errors carry a long spec after it
            raise RunCheckpointError(
                f"cannot restore checkpoint step {step} in {manager.directory} ({type(e).__name__}: "
                f"{first[:200]}): it is corrupt or was written by a different configuration; remove "
                f"{os.path.join(str(manager.directory), str(step))} to resume from an earlier step, or choose "
                f"another name (--set name=...)") from None
        return int(step)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, x) -> dict:
        totals: dict[str, float] = {}
        batches = self.task.eval_batches()
        for i, batch in enumerate(batches):
            m = self.metrics_fn(x, distributed.place_batch(batch, self.mesh), jax.random.fold_in(self.keys["eval"], i))
            for k, v in distributed.to_host(m).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        return totals

    def _setup_eval(self):
        """Dev batches for `eval.select_by`, the KL-drift function, the RandOpt vote (checked here, early)."""
        e = self.eval_section
        self.dev_batches = None
        if e is not None and e.select_by is not None:
            if not hasattr(self.task, "dev_batches"):
                raise ConfigError(f"eval.select_by={e.select_by!r}: task {self.task.name!r} has no dev split")
            try:
                self.dev_batches = self.task.dev_batches(e.dev_size)
            except (ValueError, NotImplementedError) as err:
                raise ConfigError(f"eval.select_by={e.select_by!r}: task {self.task.name!r}: {err}") from None
        self.kl_fn = None
        if e is not None and e.kl_prompts > 0:
            from gfo.diagnostics import drift_kl, input_tokens

            input_tokens(self.task.eval_batches()[0])  # fails early if the task has no token inputs
            model = self.model
            self.kl_fn = _frozen_args(lambda space, params0, x, tokens, mask: drift_kl(
                model, space.to_params(x), params0, tokens, mask), self.space, self.space.to_params(self.x0))
        self.pass_fn = None
        if e is not None and e.samples > 0:
            if not (hasattr(self.task, "generate") and hasattr(self.task, "completion_rewards")):
                raise ConfigError(f"eval.samples={e.samples}: pass@k needs a generation task with a reward "
                                  f"(countdown, gsm8k, …); task {self.task.name!r} is not one")
            from gfo.diagnostics import pass_at_k_metrics

            task, model = self.task, self.model
            self.pass_fn = _frozen_args(lambda space, x, batch, key: pass_at_k_metrics(
                task, model, space.to_params(x), batch, key, e.samples, e.temperature), self.space)
        self.vote_fn = None
        if hasattr(self.optimizer, "members") and hasattr(self.task, "class_scores"):
            from gfo.estimators.randopt import ensemble_metrics

            task, model = self.task, self.model
            self.vote_fn = _frozen_args(lambda space, members, batch: ensemble_metrics(task, model, space.to_params,
                                                                                        members, batch), self.space)

    def _mean_over(self, batches, fn) -> dict:
        totals: dict[str, float] = {}
        for i, batch in enumerate(batches):
            for k, v in distributed.to_host(fn(i, distributed.place_batch(batch, self.mesh))).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        return totals

    def eval_row(self) -> dict:
        """The eval metrics of the current solution, with the dev metrics (`dev_*`, for `select_by`), the
        KL drift from the start (`kl_drift`), pass@k of `eval.samples` samples at `eval.temperature`
        (generation tasks) and the RandOpt ensemble vote where configured."""
        x = self.optimizer.solution(self.state)
        row = self.evaluate(x)
        if self.dev_batches is not None:
            dev = self._mean_over(self.dev_batches,
                                  lambda i, b: self.metrics_fn(x, b, jax.random.fold_in(self.keys["dev"], i)))
            row.update({f"dev_{k}": v for k, v in dev.items()})
        if self.kl_fn is not None:
            from gfo.diagnostics import input_tokens

            batches = self.task.eval_batches()[: self.eval_section.kl_prompts]
            row.update(self._mean_over(batches, lambda i, b: {"kl_drift": self.kl_fn(x, *input_tokens(b))}))
        if self.pass_fn is not None:
            row.update(self._mean_over(self.task.eval_batches(),
                                       lambda i, b: self.pass_fn(x, b, jax.random.fold_in(self.keys["pass_at_k"], i))))
        if self.vote_fn is not None:
            members = self.optimizer.members(self.state)
            row.update(self._mean_over(self.task.eval_batches(), lambda i, b: self.vote_fn(members, b)))
        return row

    def _best_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        return ocp.CheckpointManager(os.path.abspath(os.path.join(self.run_dir, "best")), options=options)

    def _track_best(self, row: dict, records: list[dict]) -> None:
        """Save the solution when `row` is the best by `eval.select_by` so far (the selected checkpoint)."""
        from gfo.diagnostics import select

        e = self.eval_section
        if e is None or e.select_by is None:
            return
        if e.select_by not in row:
            raise ConfigError(f"eval.select_by={e.select_by!r}: the dev metrics are {sorted(k for k in row if k.startswith('dev_'))}")
        if select(records, e.select_by) is row:
            import orbax.checkpoint as ocp

            manager = self._best_manager()
            manager.save(row["step"], args=ocp.args.StandardSave(self.optimizer.solution(self.state)), force=True)
            manager.wait_until_finished()
            manager.close()

    def selected_params(self, records: list[dict]):
        """`(row, params)` of the point selected by `eval.select_by` (None, None without selection)."""
        from gfo.diagnostics import select

        e = self.eval_section
        if e is None or e.select_by is None:
            return None, None
        row = select(records, e.select_by)
        import orbax.checkpoint as ocp

        manager = self._best_manager()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.optimizer.solution(self.state))
        x = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
        manager.close()
        return row, self.space.to_params(x)

    # ------------------------------------------------------------------ the loop
    def run(self, label: str, on_eval=None) -> dict:
        """Optimise to `self.steps`; `on_eval(step, metrics)` is called after each evaluation (pruning)."""
        primary = distributed.is_primary()
        os.makedirs(self.run_dir, exist_ok=True)
        manager = self._manager()
        start = self.restore(manager)
        log_path = os.path.join(self.run_dir, "metrics.jsonl")
        records = _read_records(log_path, upto=start)
        if primary:
            with open(log_path, "w") as f:  # drop lines past the checkpoint we resume from
                f.writelines(json.dumps(r) + "\n" for r in records)
        writer = _tensorboard(self.run_dir) if primary else None
        self._log_path = log_path if primary else None
        if start == 0:
            first = {"step": 0, "split": "eval", "time_s": 0.0, **self.eval_row()}
            self._log(log_path, writer, first)
            records.append(first)
            self._track_best(first, records)
            _print_eval(print if primary else None, label, first)
        elif start >= self.steps:
            print(f"[{label}] complete at step {start}: reusing {self.run_dir}")
        else:
            print(f"[{label}] resuming {self.run_dir} from step {start}")
        if start < self.steps:
            line = self.compile_step(self.task.train_batch(start), jax.random.fold_in(self.k_step, start))
            if primary:
                print(f"[{label}] {line}")
        bar = _progress(total=self.steps, initial=start, label=label, disable=not primary)
        try:
            self._loop(start, label, on_eval, manager, log_path, writer, records, bar)
        except KeyboardInterrupt:
            bar.close()
            try:
                manager.wait_until_finished()  # a checkpoint being written completes
                manager.close()  # and orbax's background threads stop before the interpreter does
            except Exception:  # noqa: BLE001 - a save cut short by the interrupt: the previous step stands
                pass
            saved = manager.latest_step()
            raise RunInterrupted(
                f"[{label}] interrupted at step {self._done}; "
                + (f"checkpoint at step {saved} in {manager.directory}" if saved else "no checkpoint saved yet")
                + "; rerun the same command to resume") from None
        except BaseException:  # divergence, a pruned sweep trial: checkpoints being written complete first
            bar.close()
            manager.wait_until_finished()
            manager.close()
            raise
        bar.close()
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
        result = {"records": records, "params": self.space.to_params(self.optimizer.solution(self.state))}
        selected, params = self.selected_params(records)
        if selected is not None:  # the protocol's model is the dev-selected point; the final one stays available
            result.update(selected=selected, final_params=result["params"], params=params)
        return result

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
        return line

    def _loop(self, start, label, on_eval, manager, log_path, writer, records, bar):
        self._done = start
        t0, evals = time.perf_counter(), 0
        # `time_s`: optimisation wall time so far (steps only: no evaluation, no compilation — the first
        # step of a session counts as the second one did), carried over a resume.
        opt_time = records[-1].get("time_s", 0.0) if records else 0.0
        for step in range(start, self.steps):
            batch = distributed.place_batch(self.task.train_batch(step), self.mesh)
            t_step = time.perf_counter()
            new_state, metrics = self.optimizer.step(self.state, self.objective, batch,
                                                     jax.random.fold_in(self.k_step, step))
            finite = _all_finite(self.optimizer.solution(new_state))  # blocks on the step
            elapsed = time.perf_counter() - t_step
            if step > start:  # the session's first step includes compilation: the second counts twice
                opt_time += elapsed * (2 if step == start + 1 else 1)
            else:  # the progress bar's rate and ETA, and evals/s, too, start after compilation
                bar.initial, bar.start_t, t0 = bar.n, time.time(), time.perf_counter()  # tqdm's clock: time.time
            if not finite:
                manager.wait_until_finished()
                saved = manager.latest_step()
                kept = (f"the last good checkpoint is kept in {manager.directory} (step {saved})" if saved else
                        "no checkpoint had been saved yet")
                raise DivergenceError(f"[{label}] parameters became non-finite at step {step + 1} (loss "
                                      f"{float(metrics['loss'])}); {kept}. Lower the learning rate or sigma.")
            self.state = new_state
            evals += int(metrics.get("evaluations", 1)) if step > start else 0
            done = self._done = step + 1
            if done % self.cfg.log_every == 0 or done == self.steps:
                row = {"step": done, "split": "train", "time_s": opt_time, **_jsonable(metrics)}
                self._log(log_path, writer, row)
                records.append(row)
                rate = evals / max(time.perf_counter() - t0, 1e-9)  # after the session's first step
                bar.set_postfix(loss=f"{row['loss']:.4f}", evals_per_s=f"{rate:.0f}")
            if done % self.cfg.eval_every == 0 or done == self.steps:
                row = {"step": done, "split": "eval", "time_s": opt_time, **self.eval_row()}
                self._log(log_path, writer, row)
                records.append(row)
                self._track_best(row, records)
                _print_eval(None if bar.disable else bar.write, label, row)
                if on_eval is not None:
                    on_eval(done, row)
            if done % self.cfg.checkpoint_every == 0 or done == self.steps:
                import orbax.checkpoint as ocp

                manager.save(done, args=ocp.args.StandardSave(self.state))
            bar.update(1)

    def _log(self, path, writer, row):
        if self._log_path is None:  # not the primary process
            return
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "split"):
                    writer.add_scalar(f"{row['split']}/{k}", v, row["step"])


def _frozen_args(fn, *frozen):
    """`lambda *args: fn(*frozen, *args)`, jitted with `frozen` (a space with its base weights, reference
    parameters) as traced arguments rather than constants of the executable (`gfo.jitting.filter_jit`)."""
    from gfo.jitting import filter_jit

    jitted = filter_jit(fn)
    return lambda *args: jitted(*frozen, *args)


def _read_records(path: str, upto: int) -> list[dict]:
    if not os.path.isfile(path) or not upto:
        return []
    return [r for r in read_jsonl(path) if r["step"] <= upto]


@jax.jit
def _finite(tree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _all_finite(tree) -> bool:
    """Whether every float leaf is finite (one jitted reduction, not one op per leaf)."""
    return bool(distributed.to_host(_finite(tree)))


def _tensorboard(run_dir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))


def _print_eval(write, label: str, row: dict) -> None:
    """One line per evaluation through `write` (a progress bar's, above the bar; None: silent)."""
    if write is not None:
        write(f"[{label}] step {row['step']} eval: " + "  ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "split", "time_s")))


def _progress(total, initial, label, disable=False):
    from tqdm import tqdm

    # smoothing=0: the rate is steps done / time since the bar's start, which the loop moves past compilation
    return tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True, mininterval=1.0, smoothing=0,
                disable=disable)


def _saved_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints under `run_dir/checkpoints` (empty when none)."""
    directory = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _check_resumable(run_dir: str, cfg: RunConfig, resolved: dict) -> None:
    """A run directory with progress (a checkpoint) resumes only under the same config, and never
    shorter than it has run; one without (a start that failed) is simply started again."""
    path = os.path.join(run_dir, "config.yaml")
    stages = [run_dir, os.path.join(run_dir, "pretrain")]
    if not os.path.isfile(path) or not any(_saved_steps(d) for d in stages):
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
    done = max(_saved_steps(run_dir), default=0)
    if cfg.steps < done:
        raise ConfigError(f"steps={cfg.steps} is shorter than the {done} steps {run_dir} has already run: "
                          f"give steps >= {done} to resume it, or choose another name (--set name=...)")


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
    _check_resumable(run_dir, cfg, resolved)
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
        from gfo.report import write_summary

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
