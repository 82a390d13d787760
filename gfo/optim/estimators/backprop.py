"""The exact gradient (`jax.value_and_grad`): the first-order baselines (Adam, SGD)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import Estimator
from gfo.optim.noise import tree_dot
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import TransformSection


@dataclasses.dataclass(frozen=True)
class Backprop(Estimator):
    """Objective must be differentiable. Metrics: `loss` at x, `evaluations` (1 forward+backward)."""

    def direction(self, objective, x, batch, key):
        loss, grad = jax.value_and_grad(objective)(x, batch, key)
        return grad, {"loss": loss, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "evaluations": 1}


register(estimator_method("backprop", Backprop, TransformSection))
