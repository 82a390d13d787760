"""One protocol for every optimizer, and its first family: a direction estimator + an optax transform.

    opt = Optimizer(SPSA(eps=1e-3), optax.sgd(1e-6))       # MeZO / ZO-SGD
    state = opt.init(key, x0)
    state, metrics = opt.step(state, objective, batch, key)  # jitted; objective(x, batch, key) -> loss
    x = opt.solution(state)

`objective(x, batch, key)` returns a scalar *loss* (minimised; rewards enter negated). The same
`step` drives `Backprop` (Adam/SGD baselines), `SPSA`, `OpenES`, `LowRankES`, `ForwardGrad` and
`PolicyGradient`; `gfo.strategies.EvosaxStrategy` implements the same protocol for evosax's algorithms.
An estimator with an `init(key, x0)` method is *stateful* (LOZO, HiZOO, MeZO-SVRG): its state lives in
`OptState.est_state` and it is called as `estimator(objective, x, batch, key, est_state, step)` returning
`(grad, metrics, est_state)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class OptState:
    x: Any  # the current point (a pytree in the space's coordinates)
    opt_state: Any  # the optax state
    step: jax.Array  # int32 number of completed steps
    est_state: Any = None  # a stateful estimator's own state (LOZO's V key, HiZOO's Hessian, SVRG's anchor)


class Optimizer:
    """`estimator` (a pseudo-gradient of the loss) followed by an optax `transform`."""

    def __init__(self, estimator, transform: optax.GradientTransformation):
        self.estimator = estimator
        self.transform = transform

    def __repr__(self) -> str:
        return f"Optimizer({self.estimator!r})"

    def init(self, key: jax.Array, x0) -> OptState:
        est_state = self.estimator.init(key, x0) if hasattr(self.estimator, "init") else None
        return OptState(x=x0, opt_state=self.transform.init(x0), step=jnp.zeros((), jnp.int32),
                        est_state=est_state)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def step(self, state: OptState, objective: Callable, batch, key: jax.Array):
        est_state = state.est_state
        if hasattr(self.estimator, "init"):  # stateful: `(objective, x, batch, key, state, step)`
            grad, metrics, est_state = self.estimator(objective, state.x, batch, key, est_state, state.step)
        else:
            grad, metrics = self.estimator(objective, state.x, batch, key)
        updates, opt_state = self.transform.update(grad, state.opt_state, state.x)
        x = optax.apply_updates(state.x, updates)
        metrics = {**metrics, "update_norm": optax.tree.norm(updates)}
        return OptState(x=x, opt_state=opt_state, step=state.step + 1, est_state=est_state), metrics

    def solution(self, state: OptState):
        return state.x
