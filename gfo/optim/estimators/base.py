"""What every direction estimator shares: one calling convention, and the settings its objective decides.

    state = estimator.init(key, x0)                                     # None for a stateless estimator
    g, metrics, state = estimator.estimate(objective, x, batch, key, state, step)

`g` is a pseudo-gradient of the loss: a pytree shaped like `x`, or a `gfo.optim.update.Direction` (the
noise estimators: made one leaf at a time, so a leafwise step never holds the whole tree). This is the
`gfo.optim.protocol.Estimator` protocol; `gfo.Optimizer` calls nothing else. A stateless estimator writes
`direction(objective, x, batch, key) -> (g, metrics)`; a stateful one (LOZO, HiZOO, MeZO-SVRG)
overrides `init` and `estimate`. `estimator(objective, x, batch, key) -> (g_tree, metrics)` is the
convenience form of a stateless estimator (the whole tree, e.g. for a test against `jax.grad`).

`factored=None` (SPSA, OpenES, LowRankES, LOZO, HiZOO, MeZO-SVRG) means "as the objective declares"
(`gfo.objectives.accepts_descriptors`): an objective over a `Full` space takes perturbation descriptors,
so the noise is drawn inside the forward; a plain function gets perturbed arrays. `for_objective`
resolves it (at trace time: the objective's declaration is static).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from gfo.optim.update import Direction
from gfo.objectives import accepts_descriptors


class Estimator:
    """Base class of gfo's estimators (see the module doc). Subclasses are frozen dataclasses."""

    objective_kind = "loss"  # or "reward": the objective kind `estimate` takes (gfo.objectives)

    def init(self, key: jax.Array, x0) -> Any:
        """The estimator's own state at `x0`: None (stateless)."""
        del key, x0
        return None

    def for_objective(self, objective) -> "Estimator":
        """This estimator with the settings `objective` decides (none here; see `PerturbingEstimator`)."""
        del objective
        return self

    def direction(self, objective, x, batch, key) -> tuple[Any, dict]:
        """`(g, metrics)` of a stateless estimator: `g` a gradient tree or a `Direction`."""
        raise NotImplementedError(f"{type(self).__name__} defines neither direction nor estimate")

    def estimate(self, objective, x, batch, key, state, step) -> tuple[Any, dict, Any]:
        """`(g, metrics, state)`: the one calling convention (`gfo.optim.protocol.Estimator`)."""
        del step
        g, metrics = self.for_objective(objective).direction(objective, x, batch, key)
        return g, metrics, state

    def __call__(self, objective, x, batch, key) -> tuple[Any, dict]:
        """`(g, metrics)` with `g` the whole pseudo-gradient tree (a stateless estimator)."""
        g, metrics, _ = self.estimate(objective, x, batch, key, None, 0)
        if isinstance(g, Direction):
            g, stats = g.tree(x)
            metrics = {**metrics, **stats}
        return g, metrics


class PerturbingEstimator(Estimator):
    """An estimator that evaluates perturbed points, with a dataclass field `factored: bool | None`:
    None hands the objective descriptors exactly when it declares it accepts them."""

    factored: bool | None = None

    def for_objective(self, objective) -> "PerturbingEstimator":
        if self.factored is None:
            return dataclasses.replace(self, factored=accepts_descriptors(objective))
        return self
