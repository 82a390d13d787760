"""A stage's evaluations: the eval metrics of a point, the dev metrics `eval.select_by` selects on, the
KL drift from the start, pass@k of sampled generations, the RandOpt ensemble vote; the tracking of the
best point by `select_by` (saved to `run_dir/best/`) and its selection at the end of a run.

Every metric is a mean over examples (batches weighted by their rows) of host floats; what a config
asks for that the task cannot give (no dev split, no token inputs, no reward) is a `ConfigError` when
the `Evaluation` is built.
"""

from __future__ import annotations

import jax
import numpy as np

from gfo import distributed
from gfo.run.config import ConfigError
from gfo.run import checkpoint


def frozen_args(fn, *frozen):
    """`lambda *args: fn(*frozen, *args)`, jitted with `frozen` (a space with its base weights, reference
    parameters) as traced arguments rather than constants of the executable (`gfo.jitting.filter_jit`)."""
    from gfo.jitting import filter_jit

    jitted = filter_jit(fn)
    return lambda *args: jitted(*frozen, *args)


def print_eval(write, label: str, row: dict) -> None:
    """One line per evaluation through `write` (a progress bar's, above the bar; None: silent)."""
    if write is not None:
        write(f"[{label}] step {row['step']} eval: " + "  ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "split", "time_s")))


def _rows(batch) -> int:
    """The examples in `batch`: the leading dimension of its arrays (1 for a batch of scalars)."""
    leaves = [leaf for leaf in jax.tree.leaves(batch) if np.ndim(leaf)]
    return int(np.shape(leaves[0])[0]) if leaves else 1


class Evaluation:
    """The evaluations of one stage: `row(state)` for the metrics, `track_best`/`selected` for `select_by`.

    `keys`: the stage's key streams (`eval`, `dev`, `pass_at_k` are read); `section`: the `eval` section
    (None: the task's eval metrics only); `run_dir`: where the selected point is saved."""

    def __init__(self, task, model, space, x0, optimizer, mesh, keys: dict, section, run_dir: str):
        self.task, self.model, self.space, self.x0, self.optimizer = task, model, space, x0, optimizer
        self.mesh, self.keys, self.section, self.run_dir = mesh, keys, section, run_dir
        self.metrics_fn = frozen_args(lambda space, x, batch, key: task.metrics(model, space.to_params(x), batch, key),
                                      space)
        e = section
        self.dev_batches = None
        if e is not None and e.select_by is not None:
            if not hasattr(task, "dev_batches"):
                raise ConfigError(f"eval.select_by={e.select_by!r}: task {task.name!r} has no dev split")
            try:
                self.dev_batches = task.dev_batches(e.dev_size)
            except (ValueError, NotImplementedError) as err:
                raise ConfigError(f"eval.select_by={e.select_by!r}: task {task.name!r}: {err}") from None
        self.kl_fn = None
        if e is not None and e.kl_prompts > 0:
            from gfo.diagnostics import drift_kl, input_tokens

            input_tokens(task.eval_batches()[0])  # fails early if the task has no token inputs
            self.kl_fn = frozen_args(lambda space, params0, x, tokens, mask: drift_kl(
                model, space.to_params(x), params0, tokens, mask), space, space.to_params(x0))
        self.pass_fn = None
        if e is not None and e.samples > 0:
            if not (hasattr(task, "generate") and hasattr(task, "completion_rewards")):
                raise ConfigError(f"eval.samples={e.samples}: pass@k needs a generation task with a reward "
                                  f"(countdown, gsm8k, …); task {task.name!r} is not one")
            from gfo.diagnostics import pass_at_k_metrics

            self.pass_fn = frozen_args(lambda space, x, batch, key: pass_at_k_metrics(
                task, model, space.to_params(x), batch, key, e.samples, e.temperature), space)
        self.vote_fn = None
        from gfo.optim.search.randopt import RandOpt, ensemble_metrics

        if isinstance(optimizer, RandOpt) and hasattr(task, "class_scores"):  # its kept members vote

            self.vote_fn = frozen_args(lambda space, members, batch: ensemble_metrics(task, model, space.to_params,
                                                                                       members, batch), space)

    def metric_names(self) -> list[str]:
        """The names `row` reports, from tracing the metrics on the first eval batch (nothing runs)."""
        batch = distributed.place_batch(self.task.eval_batches()[0], self.mesh)
        names = set(jax.eval_shape(self.metrics_fn, self.x0, batch, self.keys["eval"]))
        if self.dev_batches is not None:
            names |= {f"dev_{k}" for k in names}
        if self.kl_fn is not None:
            names.add("kl_drift")
        if self.pass_fn is not None:
            names |= set(jax.eval_shape(self.pass_fn, self.x0, batch, self.keys["pass_at_k"]))
        return sorted(names)  # (a RandOpt ensemble vote adds its names only when it runs)

    def _mean_over(self, batches, fn) -> dict:
        """`{name: mean over examples}` of the host values of `fn(i, placed batch i)`, each a mean over its
        batch's rows: batches are weighted by their rows, so a shorter last batch (200 examples in batches
        of 16) counts for what it holds."""
        rows = [_rows(b) for b in batches]
        weights = [n / sum(rows) for n in rows]
        totals: dict[str, float] = {}
        for i, batch in enumerate(batches):
            for k, v in distributed.to_host(fn(i, distributed.place_batch(batch, self.mesh))).items():
                totals[k] = totals.get(k, 0.0) + float(v) * weights[i]
        return totals

    def metrics(self, x) -> dict:
        """The task's eval metrics at the point `x`, means over its eval examples (`_mean_over`)."""
        return self._mean_over(self.task.eval_batches(),
                               lambda i, b: self.metrics_fn(x, b, jax.random.fold_in(self.keys["eval"], i)))

    def row(self, state) -> dict:
        """The eval metrics of `state`'s solution, with the dev metrics (`dev_*`, for `select_by`), the
        KL drift from the start (`kl_drift`), pass@k of `eval.samples` samples at `eval.temperature`
        (generation tasks) and the RandOpt ensemble vote where configured."""
        x = self.optimizer.solution(state)
        row = self.metrics(x)
        if self.dev_batches is not None:
            row.update({f"dev_{k}": v for k, v in self._mean_over(
                self.dev_batches, lambda i, b: self.metrics_fn(x, b, jax.random.fold_in(self.keys["dev"], i))).items()})
        if self.kl_fn is not None:
            from gfo.diagnostics import input_tokens

            batches = self.task.eval_batches()[: self.section.kl_prompts]
            row.update(self._mean_over(batches, lambda i, b: {"kl_drift": self.kl_fn(x, *input_tokens(b))}))
        if self.pass_fn is not None:
            row.update(self._mean_over(self.task.eval_batches(),
                                       lambda i, b: self.pass_fn(x, b, jax.random.fold_in(self.keys["pass_at_k"], i))))
        if self.vote_fn is not None:
            members = self.optimizer.members(state)
            row.update(self._mean_over(self.task.eval_batches(), lambda i, b: self.vote_fn(members, b)))
        return row

    def record(self, log, step: int, state, time_s: float, write, label: str) -> dict:
        """Evaluate `state` (after `step` steps): write the row to `log` (a `gfo.run.metrics_log.MetricsLog`),
        track the best point, print the line through `write` (`print_eval`); the row."""
        row = {"step": step, "split": "eval", "time_s": time_s, **self.row(state)}
        log.write(row)
        self.track_best(row, log.records, state)
        print_eval(write, label, row)
        return row

    def _selecting(self) -> bool:
        return self.section is not None and self.section.select_by is not None

    def track_best(self, row: dict, records: list[dict], state) -> None:
        """Save `state`'s solution when `row` is the best by `eval.select_by` so far (the selected point)."""
        from gfo.diagnostics import select

        if not self._selecting():
            return
        by = self.section.select_by
        if by not in row:
            raise ConfigError(f"eval.select_by={by!r}: the dev metrics are {sorted(k for k in row if k.startswith('dev_'))}")
        if select(records, by) is row:
            checkpoint.save_best(self.run_dir, row["step"], self.optimizer.solution(state))

    def selected(self, records: list[dict], state) -> tuple:
        """`(row, params)` of the point selected by `eval.select_by` (None, None without selection);
        `state` gives the solution's shapes and shardings."""
        from gfo.diagnostics import select

        if not self._selecting():
            return None, None
        x = checkpoint.restore_best(self.run_dir, self.optimizer.solution(state))
        return select(records, self.section.select_by), self.space.to_params(x)
