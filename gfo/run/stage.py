"""One stage of a run: resumed from its newest verified checkpoint, optimised through the step loop with
its metrics log, evaluations and checkpoints, and stopped cleanly (Ctrl-C, a failed save, divergence).

    result = run_stage(run, run.init_state(), cfg)     # {"records", "params"} (+ "selected", "final_params")

`gfo.run.train` runs the stages of a config in turn (a `pretrain` stage, then the main one) through it.
"""

from __future__ import annotations

import os

from gfo import distributed
from gfo.run import checkpoint, stepplan
from gfo.run.build import Run
from gfo.run.checkpoint import CheckpointSaveError
from gfo.run.config import RunConfig, to_dict
from gfo.run.loop import Hooks, StepLoop, progress
from gfo.run.metrics_log import MetricsLog


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says the last step done and the checkpoint a rerun resumes from."""


def run_stage(run: Run, state, cfg: RunConfig, on_eval=None, strict: bool = False) -> dict:
    """Optimise `run` from its latest checkpoint (else from `state`, a fresh state) to `run.steps` through
    `gfo.run.loop.StepLoop`, with `cfg`'s log, eval and checkpoint periods; `on_eval(step, row)` is called
    after each evaluation (pruning). Returns `{"records", "params"}` (and `selected`, `final_params` when
    `eval.select_by` selects the returned `params`)."""
    primary, label = distributed.is_primary(), run.label
    fingerprint = checkpoint.config_fingerprint(to_dict(cfg))
    with distributed.checked("the checkpoint check"):  # process 0's refusal (--strict) stops every process
        os.makedirs(run.run_dir, exist_ok=True)
        if primary:  # the newest checkpoint is one that verifies (or the run stops, naming what fails)
            checkpoint.select(run.run_dir, fingerprint, strict, label)
    manager = checkpoint.manager(run.run_dir, cfg.keep_checkpoints, fingerprint=fingerprint)
    state, start = checkpoint.restore(manager, state)
    log = MetricsLog(run.run_dir, start, primary)
    records = log.records
    if start == 0:
        run.evaluation.record(log, 0, state, 0.0, print if primary else None, label)
    elif start >= run.steps:
        print(f"[{label}] complete at step {start}: reusing {run.run_dir}")
    else:
        print(f"[{label}] resuming {run.run_dir} from step {start}")
    evaluated = start % cfg.eval_every == 0 or start % cfg.checkpoint_every != 0 or start == run.steps
    if start and evaluated and not log.has(start, "eval"):
        # the restored step was evaluated (an eval step, or a run's last step: the only checkpoint off the
        # checkpoint period) but the log lost its row (cut short by a kill): the same state evaluates it again
        time_s0 = records[-1].get("time_s", 0.0) if records else 0.0
        run.evaluation.record(log, start, state, time_s0, print if primary else None, label)
    if start < run.steps:
        line = stepplan.compile_step(run, state, start)
        if primary:
            print(f"[{label}] {line}")
    bar = progress(total=run.steps, initial=start, label=label, disable=not primary)
    loop = StepLoop(run.step, run.optimizer.solution, steps=run.steps, log_every=cfg.log_every,
                    eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, label=label)

    def evaluate(step, state, time_s):
        row = run.evaluation.record(log, step, state, time_s, None if bar.disable else bar.write, label)
        if on_eval is not None:
            on_eval(step, row)

    def save(step, state):
        try:
            log.sync()  # the rows up to the checkpoint are on disk before it is
            checkpoint.save(manager, step, state)
        except OSError as e:  # a full disk, an I/O error: stop now, naming the checkpoint that is safe
            raise checkpoint.save_failed(manager, step, e) from None

    hooks = Hooks(log=log.write, evaluate=evaluate, save=save, kept=lambda: checkpoint.last_good(manager))
    time_s = records[-1].get("time_s", 0.0) if records else 0.0  # carried over a resume
    try:
        state = loop.run(state, start, time_s, bar, hooks)
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
    except CheckpointSaveError:  # the manager is already closed
        bar.close()
        raise
    except BaseException:  # divergence, a pruned sweep trial: checkpoints being written complete first
        bar.close()
        checkpoint.finish(manager)
        raise
    bar.close()
    try:
        checkpoint.finish(manager)
    except OSError as e:  # the last checkpoint (or its manifest) could not be written
        raise checkpoint.save_failed(manager, loop.done, e) from None
    log.close()
    result = {"records": records, "params": run.params(state)}
    selected, params = run.evaluation.selected(records, state)
    if selected is not None:  # the protocol's model is the dev-selected point; the final one stays available
        result.update(selected=selected, final_params=result["params"], params=params)
    return result
