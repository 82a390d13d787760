"""One protocol for every optimizer, and its first family: a direction estimator + an optax transform.

    opt = Optimizer(SPSA(eps=1e-3), optax.sgd(1e-6))       # MeZO / ZO-SGD
    state = opt.init(key, x0)
    state, metrics = opt.step(state, objective, batch, key)  # jitted; objective(x, batch, key) -> loss
    x = opt.solution(state)                                  # the current point

This is `gfo.optim.protocol.OptimizerProtocol`'s first family. The step is `gfo.jitting.filter_jit`: the
objective may be any callable (a closure, a bound method, a pytree object); its arrays — frozen base
weights of a space, a KL reference — are traced arguments, not constants baked into the executable.
`state` is donated: after `step` the old state's buffers may be gone, so keep only the returned one.

`objective(x, batch, key)` returns a scalar *loss* (minimised; rewards enter negated). The same
`step` drives every estimator through its one calling convention (`gfo.optim.protocol.Estimator`:
`estimate(objective, x, batch, key, est_state, step) -> (g, metrics, est_state)`; stateless estimators
keep `est_state = None`): `Backprop` (Adam/SGD baselines), `SPSA`, `OpenES`, `LowRankES`,
`ForwardGrad`, `PolicyGradient` (whose objective is a reward task, `objective_kind`), LOZO, HiZOO,
MeZO-SVRG. `gfo.optim.search.strategies.EvosaxStrategy` implements the same protocol for evosax's algorithms.

The lean step is the default, decided from what the step is given (no flags to know):
- the perturbation reaches the model as descriptors (drawn inside the forward) when the objective
  declares it accepts them (`gfo.objectives.accepts_descriptors`: `OnSpace` over a `Full` space);
- the update is made leaf by leaf when the transform is elementwise (`gfo.optim.update.is_elementwise`,
  checked once by running it on a probe), else on the whole tree, said once in a warning;
- a population estimator without a chunk gets one from the memory budget (`gfo.optim.plan`).
`prepare(objective, x, batch, key)` returns the estimator as the step will run it (cached).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from gfo.optim.update import Direction, is_elementwise, leafwise_update, sq_norm
from gfo.jitting import filter_jit, partition
from gfo.objectives import objective_kind_of
from gfo.optim.plan import plan_chunk
from gfo.optim.protocol import Estimator, PointOptimizer, fresh

_WARNED: set = set()  # transforms already reported as applied to the whole tree


@struct.dataclass
class OptState:
    x: Any  # the current point (a pytree in the space's coordinates)
    opt_state: Any  # the optax state
    step: jax.Array  # int32 number of completed steps
    est_state: Any = None  # a stateful estimator's own state (LOZO's V key, HiZOO's Hessian, SVRG's anchor)


class Optimizer(PointOptimizer):
    """`estimator` (a pseudo-gradient of the loss, `gfo.optim.protocol.Estimator`) followed by an optax `transform`.

    `leafwise` (default None: `gfo.optim.update.is_elementwise(transform)`): when the estimator describes its
    pseudo-gradient as a `gfo.optim.update.Direction` (SPSA, OpenES, LowRankES), regenerate, transform and
    apply it one leaf — one block of rows of a large leaf — at a time (`gfo.optim.update.leafwise_update`),
    so the update needs one block's gradient beyond the parameters instead of a whole gradient tree. The
    result equals the whole-tree update; the optax state's layout is the same either way. A transform
    that reduces over leaves (global-norm clipping, trust ratios) is applied to the whole tree, with one
    warning; `leafwise=True` with such a transform is an error, `False` forces the whole tree.
    """

    def __init__(self, estimator, transform: optax.GradientTransformation, leafwise: bool | None = None):
        if not isinstance(estimator, Estimator):
            raise TypeError(f"Optimizer: {estimator!r} is not a gfo estimator: it needs init(key, x0) and "
                            f"estimate(objective, x, batch, key, state, step) (gfo.optim.protocol.Estimator; subclass "
                            f"gfo.optim.estimators.base.Estimator)")
        self.estimator = estimator
        self.transform = transform
        elementwise = is_elementwise(transform)
        if leafwise and not elementwise:
            raise ValueError(f"Optimizer(leafwise=True): the transform {transform!r} does not act on each "
                             f"entry on its own (it reduces over leaves or blocks: global-norm clipping, trust "
                             f"ratios, factored moments), so it cannot be applied leaf by leaf; leave "
                             f"leafwise unset")
        if leafwise is None and not elementwise and id(transform) not in _WARNED:
            _WARNED.add(id(transform))
            warnings.warn("gfo.Optimizer: the optax transform does not act on each entry on its own, so the "
                          "update is made on the whole pseudo-gradient tree (one extra parameter-sized tree "
                          "of memory) instead of leaf by leaf", stacklevel=2)
        self.leafwise = elementwise if leafwise is None else bool(leafwise)
        self._prepared: dict = {}

    def __repr__(self) -> str:
        return f"Optimizer({self.estimator!r}{'' if self.leafwise else ', leafwise=False'})"

    @property
    def objective_kind(self) -> str:
        """"loss" (`f(x, batch, key) -> scalar`) or "reward" (a `RewardObjective`: policy gradient)."""
        return objective_kind_of(self.estimator)

    def init(self, key: jax.Array, x0) -> OptState:
        """The state at `x0` (copied: donating the state to `step` leaves the caller's `x0` intact)."""
        return fresh(OptState(x=x0, opt_state=self.transform.init(x0), step=jnp.zeros((), jnp.int32),
                              est_state=self.estimator.init(key, x0)))

    def prepare(self, objective, x, batch, key):
        """The estimator as the step runs it for these arguments: `factored` from the objective's
        declaration, a population's chunk from the memory budget (`gfo.optim.plan`). Cached per
        objective structure and argument shapes."""
        shapes = lambda t: tuple((jnp.shape(v), jnp.result_type(v)) for v in jax.tree.leaves(t))  # noqa: E731
        cache_key = (partition(objective)[0], jax.tree.structure(x), shapes(x), jax.tree.structure(batch),
                     shapes(batch))
        try:
            return self._prepared[cache_key]
        except (KeyError, TypeError):
            pass
        estimator = plan_chunk(self.estimator.for_objective(objective), objective, x, batch, key)
        try:
            self._prepared[cache_key] = estimator
        except TypeError:  # an unhashable static part of the objective: plan on every call
            pass
        return estimator

    def step(self, state: OptState, objective: Callable, batch, key: jax.Array):
        """One estimate + update; `state` is donated (use the returned state only)."""
        return self._step(self.prepare(objective, state.x, batch, key), state, objective, batch, key)

    def lower(self, state: OptState, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered:
        """The lowered step for these arguments (`.compile()` it: calling `step` afterwards reuses it)."""
        return self._step.lower(self.prepare(objective, state.x, batch, key), state, objective, batch, key)

    @functools.partial(filter_jit, donate=(2,))
    def _step(self, estimator, state: OptState, objective: Callable, batch, key: jax.Array):
        grad, metrics, est_state = estimator.estimate(objective, state.x, batch, key, state.est_state, state.step)
        if isinstance(grad, Direction):
            if self.leafwise:
                x, opt_state, stats = leafwise_update(self.transform, grad, state.x, state.opt_state)
                return (OptState(x=x, opt_state=opt_state, step=state.step + 1, est_state=est_state),
                        {**metrics, **stats})
            grad, stats = grad.tree(state.x)
            metrics = {**metrics, **stats}
        updates, opt_state = self.transform.update(grad, state.opt_state, state.x)
        x = optax.apply_updates(state.x, updates)
        metrics = {**metrics, "update_norm": jnp.sqrt(sum(sq_norm(u) for u in jax.tree.leaves(updates)))}
        return OptState(x=x, opt_state=opt_state, step=state.step + 1, est_state=est_state), metrics
