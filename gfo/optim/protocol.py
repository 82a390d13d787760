"""The optimizer protocol every gfo method implements, and the sharding rules of its state.

    state = opt.init(key, x0)                                # x0: a point of the space (a pytree)
    state, metrics = opt.step(state, objective, batch, key)  # jitted; `state` is DONATED: use the new one
    x = opt.solution(state)                                  # the current point
    x = opt.best_solution(state)                             # the best-so-far point (the current one where none is kept)
    lowered = opt.lower(state, objective, batch, key)        # the step lowered ahead of time (.compile())
    shardings = opt.state_sharding(state, mesh)              # a tree of NamedSharding like `state`

Implemented by `gfo.optim.optimizer.Optimizer` (estimator + optax: backprop, SPSA, ES, low-rank ES, policy
gradient, …), `gfo.optim.search.strategies.EvosaxStrategy` (evosax algorithms and our GA) and
`gfo.optim.search.discrete.DiscreteSearch`. `objective` is a loss `f(x, batch, key) -> scalar` (minimised) or, for
methods whose `objective_kind` is "reward", a `gfo.objectives.RewardObjective`. Metrics use the
vocabulary of `gfo.optim.evaluate`.

`solution` is the current point everywhere (the mean of a search distribution, the current sequence
of a local search); `best_solution` is the best point seen so far where a method keeps one (its step
then reports `best_loss`), else the current point. Every method is required: no caller asks an
optimizer what it has. Estimators have one protocol too (`Estimator`, below).
`step` takes its state donated (its buffers may be reused for the new state): a caller keeps only the
returned state. The state's sharding is the method's to say (`state_sharding`): parameter-shaped states
follow the model-axis path rules of `gfo.distributed`, dense population states stay replicated.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import jax


@runtime_checkable
class Estimator(Protocol):
    """A pseudo-gradient of the loss, in one calling convention (`gfo.optim.estimators.base.Estimator` is the
    base class every gfo estimator derives from).

    `init(key, x0)` is the estimator's own state (None when stateless); `estimate(objective, x, batch,
    key, state, step)` returns `(g, metrics, state)`, `g` a pytree like `x` or a `gfo.optim.update.Direction`;
    `for_objective(objective)` is the estimator with the settings the objective decides (descriptors);
    `objective_kind` is "loss" or "reward"."""

    objective_kind: str

    def init(self, key: jax.Array, x0) -> Any: ...

    def for_objective(self, objective) -> Any: ...

    def estimate(self, objective, x, batch, key: jax.Array, state, step) -> tuple[Any, dict, Any]: ...


@runtime_checkable
class OptimizerProtocol(Protocol):
    """What `gfo train`, `gfo.minimize` and the tests need of an optimizer (see the module doc); every
    method is required."""

    def init(self, key: jax.Array, x0) -> Any: ...

    def step(self, state, objective: Callable, batch, key: jax.Array) -> tuple[Any, dict]: ...

    def lower(self, state, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered: ...

    def solution(self, state) -> Any: ...

    def best_solution(self, state) -> Any: ...

    def state_sharding(self, state, mesh) -> Any: ...


def replicated_sharding(state, mesh):
    """Every leaf of `state` replicated over `mesh`."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.tree.map(lambda _: NamedSharding(mesh, P()), state)


def parameter_sharding(state, mesh):
    """The model-axis path rules of `gfo.distributed` (`DEFAULT_RULES`): parameter-shaped leaves (the
    point, Adam's moments — their paths end in the parameter's) split over `model`, others replicated."""
    from gfo import distributed

    return distributed.shardings(state, mesh, distributed.DEFAULT_RULES)


class PointOptimizer:
    """The accessors of an optimizer whose state holds its one current point as `state.x` (parameter-shaped,
    like its optax moments): `solution` and `best_solution` are that point (no separate archive), the state
    shards by the model-axis path rules. `gfo.Optimizer` and ZO-SGD-Cons use it."""

    def solution(self, state):
        """The current point."""
        return state.x

    def best_solution(self, state):
        """The current point (no best-so-far archive is kept)."""
        return state.x

    def state_sharding(self, state, mesh):
        """The model-axis path rules: the point and any optax moments are parameter-shaped."""
        return parameter_sharding(state, mesh)


def fresh(tree):
    """A copy of every array leaf: an `init` returns buffers of its own, so that donating the state to
    `step` never deletes the caller's `x0` (or the space's base weights it may alias)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda v: jnp.array(v, copy=True) if isinstance(v, jax.Array) else v, tree)


def lower_step(optimizer, state, objective, batch, key) -> jax.stages.Lowered:
    """The lowered (not yet compiled) step of `optimizer` for these arguments, for ahead-of-time
    compilation and XLA's memory analysis: `.compile()` it; calling the step afterwards reuses it."""
    return optimizer.lower(state, objective, batch, key)
