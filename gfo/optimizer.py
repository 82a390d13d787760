"""One protocol for every optimizer, and its first family: a direction estimator + an optax transform.

    opt = Optimizer(SPSA(eps=1e-3), optax.sgd(1e-6))       # MeZO / ZO-SGD
    state = opt.init(key, x0)
    state, metrics = opt.step(state, objective, batch, key)  # jitted; objective(x, batch, key) -> loss
    x = opt.solution(state)                                  # the current point

This is `gfo.protocol.OptimizerProtocol`'s first family. The step is `gfo.jitting.filter_jit`: the
objective may be any callable (a closure, a bound method, a pytree object); its arrays — frozen base
weights of a space, a KL reference — are traced arguments, not constants baked into the executable.
`state` is donated: after `step` the old state's buffers may be gone, so keep only the returned one.

`objective(x, batch, key)` returns a scalar *loss* (minimised; rewards enter negated). The same
`step` drives `Backprop` (Adam/SGD baselines), `SPSA`, `OpenES`, `LowRankES`, `ForwardGrad` and
`PolicyGradient`; `gfo.strategies.EvosaxStrategy` implements the same protocol for evosax's algorithms.
An estimator with an `init(key, x0)` method is *stateful* (LOZO, HiZOO, MeZO-SVRG): its state lives in
`OptState.est_state` and it is called as `estimator(objective, x, batch, key, est_state, step)` returning
`(grad, metrics, est_state)`. `PolicyGradient` is the one estimator whose objective is a reward task
(`gfo.objectives.RewardObjective`); `objective_kind` says which kind a step expects.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from gfo.direction import leafwise_update, sq_norm
from gfo.jitting import filter_jit
from gfo.objectives import objective_kind_of
from gfo.protocol import fresh, parameter_sharding


@struct.dataclass
class OptState:
    x: Any  # the current point (a pytree in the space's coordinates)
    opt_state: Any  # the optax state
    step: jax.Array  # int32 number of completed steps
    est_state: Any = None  # a stateful estimator's own state (LOZO's V key, HiZOO's Hessian, SVRG's anchor)


class Optimizer:
    """`estimator` (a pseudo-gradient of the loss) followed by an optax `transform`.

    `leafwise=True` promises that `transform` is elementwise (sgd, momentum, adam, adamw, weight decay,
    schedules — not global-norm clipping nor trust ratios): the noise-based estimators (those
    with a `direction` method: SPSA, OpenES, LowRankES) then regenerate, transform and apply their
    pseudo-gradient one leaf — one block of rows of a large leaf — at a time
    (`gfo.direction.leafwise_update`), so the update needs one block's gradient beyond the parameters
    instead of a whole gradient tree. The result equals the whole-tree update; the optax state's layout
    is the same either way. `gfo train` and `gfo.minimize` set it.
    """

    def __init__(self, estimator, transform: optax.GradientTransformation, leafwise: bool = False):
        self.estimator = estimator
        self.transform = transform
        self.leafwise = bool(leafwise)

    def __repr__(self) -> str:
        return f"Optimizer({self.estimator!r}{', leafwise=True' if self.leafwise else ''})"

    @property
    def objective_kind(self) -> str:
        """"loss" (`f(x, batch, key) -> scalar`) or "reward" (a `RewardObjective`: policy gradient)."""
        return objective_kind_of(self.estimator)

    def init(self, key: jax.Array, x0) -> OptState:
        """The state at `x0` (copied: donating the state to `step` leaves the caller's `x0` intact)."""
        est_state = self.estimator.init(key, x0) if hasattr(self.estimator, "init") else None
        return fresh(OptState(x=x0, opt_state=self.transform.init(x0), step=jnp.zeros((), jnp.int32),
                              est_state=est_state))

    @functools.partial(filter_jit, donate=(1,))
    def step(self, state: OptState, objective: Callable, batch, key: jax.Array):
        """One estimate + update; `state` is donated (use the returned state only)."""
        est_state = state.est_state
        if self.leafwise and hasattr(self.estimator, "direction") and not hasattr(self.estimator, "init"):
            direction, metrics = self.estimator.direction(objective, state.x, batch, key)
            x, opt_state, stats = leafwise_update(self.transform, direction, state.x, state.opt_state)
            return (OptState(x=x, opt_state=opt_state, step=state.step + 1, est_state=est_state),
                    {**metrics, **stats})
        if hasattr(self.estimator, "init"):  # stateful: `(objective, x, batch, key, state, step)`
            grad, metrics, est_state = self.estimator(objective, state.x, batch, key, est_state, state.step)
        else:
            grad, metrics = self.estimator(objective, state.x, batch, key)
        updates, opt_state = self.transform.update(grad, state.opt_state, state.x)
        x = optax.apply_updates(state.x, updates)
        metrics = {**metrics, "update_norm": jnp.sqrt(sum(sq_norm(u) for u in jax.tree.leaves(updates)))}
        return OptState(x=x, opt_state=opt_state, step=state.step + 1, est_state=est_state), metrics

    def solution(self, state: OptState):
        """The current point."""
        return state.x

    def state_sharding(self, state: OptState, mesh):
        """The model-axis path rules: the point and the optax moments are parameter-shaped."""
        return parameter_sharding(state, mesh)
