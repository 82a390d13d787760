"""The step loop of a stage, pipelined as nanodo's: step t+1 is dispatched before step t's finiteness
and metrics are downloaded, so the device always has the next step queued while the host checks, logs
and counts the previous one.

The optimizer's step donates its state, so whatever must read the state of step t (an evaluation, a
checkpoint) happens before step t+1 is dispatched; such a step is checked first (it blocks), so a
non-finite state is never evaluated or saved. Every other step t is checked one step late, from a
finiteness flag (one jitted reduction, a device scalar) dispatched right after it. A non-finite step
raises `DivergenceError` naming that step, and its metrics are never logged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gfo import distributed


class DivergenceError(RuntimeError):
    """The searched parameters became non-finite; the last good checkpoint is kept."""


@jax.jit
def finite_flag(tree) -> jax.Array:
    """A device boolean scalar: whether every float leaf of `tree` is finite (one reduction, not one op
    per leaf). Dispatched, not waited for."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def fetch_finite(flag: jax.Array) -> bool:
    """The host value of a `finite_flag`: blocks until the step it checks has run."""
    return bool(distributed.to_host(flag))


def progress(total: int, initial: int, label: str, disable: bool = False):
    """A tqdm bar over the steps; `StepLoop` moves its start past the session's first step."""
    from tqdm import tqdm

    # smoothing=0: the rate is steps done / time since the bar's start, which the loop moves past compilation
    return tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True, mininterval=1.0, smoothing=0,
                disable=disable)


@dataclasses.dataclass
class Hooks:
    """What the loop calls. `log(row)`: a train row (`step`, `split`, `time_s`, the step's metrics);
    `evaluate(step, state, time_s)` and `save(step, state)`: at eval and checkpoint steps, with the
    checked state after `step` steps (before it is donated); `kept()`: where the last good checkpoint
    is, for a divergence message."""

    log: Callable[[dict], None]
    evaluate: Callable[[int, Any, float], None]
    save: Callable[[int, Any], None]
    kept: Callable[[], str]


class StepLoop:
    """Steps `start..steps-1` of `step(state, t) -> (state, metrics)` (which donates `state`).

    `solution(state)`: the point whose finiteness is checked. Train rows every `log_every` steps, eval
    every `eval_every`, checkpoint every `checkpoint_every`, and all three after the last step. `done`:
    steps checked so far (what an interrupted run reports). `time_s` of a row: optimisation wall time
    (the steps, without evaluations, checkpoints or the session's first step, which includes compilation
    and counts as the second one did), carried over a resume.
    """

    def __init__(self, step: Callable, solution: Callable, *, steps: int, log_every: int, eval_every: int,
                 checkpoint_every: int, label: str):
        self.step, self.solution, self.steps, self.label = step, solution, steps, label
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.done = 0

    def _reads_state(self, done: int) -> bool:
        """Whether the state after `done` steps is evaluated or saved (so checked before the next step)."""
        return done % self.eval_every == 0 or done % self.checkpoint_every == 0 or done == self.steps

    def run(self, state, start: int, time_s: float, bar, hooks: Hooks):
        """Run from the state after `start` steps; returns the state after `self.steps` steps."""
        self.done, self._start, self._time_s, self._bar, self._hooks = start, start, time_s, bar, hooks
        self._mark = self._t0 = time.perf_counter()  # `_mark`: where the next step's wall time starts
        self._evals = 0
        pending = None  # (t, finite flag, metrics) of a step dispatched but not yet checked
        for t in range(start, self.steps):
            state, metrics = self.step(state, t)  # the previous state's buffers are donated here
            flag = finite_flag(self.solution(state))
            if pending is not None:  # the previous step is checked while this one runs
                self._check(*pending)
                bar.update(1)
                pending = None
            done = t + 1
            if not self._reads_state(done):
                pending = (t, flag, metrics)
                continue
            self._check(t, flag, metrics)
            if done % self.eval_every == 0 or done == self.steps:
                hooks.evaluate(done, state, self._time_s)
            if done % self.checkpoint_every == 0 or done == self.steps:
                hooks.save(done, state)
            self._mark = time.perf_counter()  # the evaluation and the save are not optimisation time
            bar.update(1)
        return state

    def _check(self, t: int, flag, metrics: dict) -> None:
        """Wait for step `t`, count its wall time, raise if it diverged, and log its train row."""
        finite = fetch_finite(flag)
        now = time.perf_counter()
        if t > self._start:  # the session's first step includes compilation: the second counts twice
            self._time_s += (now - self._mark) * (2 if t == self._start + 1 else 1)
            self._evals += int(metrics.get("evaluations", 1))
        else:  # the progress bar's rate and ETA, and evals/s, too, start after compilation
            bar = self._bar
            bar.initial, bar.start_t, self._t0 = bar.n, time.time(), now  # tqdm's clock: time.time
        self._mark = now
        if not finite:
            raise DivergenceError(f"[{self.label}] parameters became non-finite at step {t + 1} (loss "
                                  f"{float(metrics['loss'])}); {self._hooks.kept()}. Lower the learning rate or "
                                  f"the perturbation scale (sigma / eps).")
        self.done = done = t + 1
        if done % self.log_every == 0 or done == self.steps:
            row = {"step": done, "split": "train", "time_s": self._time_s,
                   **{k: float(v) for k, v in distributed.to_host(metrics).items()}}
            self._hooks.log(row)
            rate = self._evals / max(time.perf_counter() - self._t0, 1e-9)  # after the session's first step
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", evals_per_s=f"{rate:.0f}")
