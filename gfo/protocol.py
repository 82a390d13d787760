"""The optimizer protocol every gfo method implements, and the sharding rules of its state.

    state = opt.init(key, x0)                                # x0: a point of the space (a pytree)
    state, metrics = opt.step(state, objective, batch, key)  # jitted; `state` is DONATED: use the new one
    x = opt.solution(state)                                  # the current point
    x = opt.best_solution(state)                             # methods with a best-so-far archive only
    shardings = opt.state_sharding(state, mesh)              # a tree of NamedSharding like `state`

Implemented by `gfo.optimizer.Optimizer` (estimator + optax: backprop, SPSA, ES, low-rank ES, policy
gradient, …), `gfo.strategies.EvosaxStrategy` (evosax algorithms and our GA) and
`gfo.discrete.DiscreteSearch`. `objective` is a loss `f(x, batch, key) -> scalar` (minimised) or, for
methods whose `objective_kind` is "reward", a `gfo.objectives.RewardObjective`. Metrics use the
vocabulary of `gfo.fitness`.

`solution` is the current point everywhere (the mean of a search distribution, the current sequence
of a local search); a method that also keeps the best point seen so far offers it as `best_solution`.
`step` takes its state donated (its buffers may be reused for the new state): a caller keeps only the
returned state. The state's sharding is the method's to say (`state_sharding`): parameter-shaped states
follow the model-axis path rules of `gfo.distributed`, dense population states stay replicated.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Protocol, runtime_checkable

import jax


@runtime_checkable
class OptimizerProtocol(Protocol):
    """What `gfo train`, `gfo.minimize` and the tests need of an optimizer (see the module doc)."""

    def init(self, key: jax.Array, x0) -> Any: ...

    def step(self, state, objective: Callable, batch, key: jax.Array) -> tuple[Any, dict]: ...

    def solution(self, state) -> Any: ...

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


def state_sharding(optimizer, state, mesh):
    """`optimizer.state_sharding(state, mesh)`; the path rules for optimizers that do not declare one
    (the estimator-family optimizers `RandOpt` and `ZOSGDCons`, whose states are parameter-shaped)."""
    declared = getattr(optimizer, "state_sharding", None)
    return declared(state, mesh) if declared is not None else parameter_sharding(state, mesh)


def best_solution(optimizer, state):
    """The best point seen so far where the method keeps one, else the current point."""
    best = getattr(optimizer, "best_solution", None)
    return best(state) if best is not None else optimizer.solution(state)


def fresh(tree):
    """A copy of every array leaf: an `init` returns buffers of its own, so that donating the state to
    `step` never deletes the caller's `x0` (or the space's base weights it may alias)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda v: jnp.array(v, copy=True) if isinstance(v, jax.Array) else v, tree)


def lower_step(optimizer, state, objective, batch, key) -> jax.stages.Lowered:
    """The lowered (not yet compiled) step of `optimizer` for these arguments, for ahead-of-time
    compilation and XLA's memory analysis: `.compile()` it; calling the step afterwards reuses it."""
    step = optimizer.step
    if inspect.ismethod(step):  # a `jax.jit(static_argnums=(0, 2))` method: its `.lower` is the unbound
        return step.__func__.lower(optimizer, state, objective, batch, key)  # function's, so pass `self`
    return step.lower(state, objective, batch, key)  # a `gfo.jitting.filter_jit` step (bound to the optimizer)
