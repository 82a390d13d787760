"""Forward gradient: `g = mean_k (∇L·v_k) v_k` with `v_k` random, one JVP each (no backward pass).

Baydin et al., "Gradients without Backpropagation", 2022 (arXiv 2202.08587); the JVP row of ZO-Bench.
Unbiased for Gaussian or Rademacher `v` (E[v vᵀ] = I).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import Estimator
from gfo.optim.noise import DISTRIBUTIONS, member_key, noise_like, tree_dot
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, TransformSection, knob


@dataclasses.dataclass(frozen=True)
class ForwardGrad(Estimator):
    n: int = 1
    distribution: str = "gaussian"

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"ForwardGrad n={self.n} must be >= 1")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"ForwardGrad distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}")

    def direction(self, objective, x, batch, key):
        noise_key, eval_key = jax.random.split(key)
        f = lambda y: objective(y, batch, eval_key)  # noqa: E731

        def one(k, total):
            v = noise_like(member_key(noise_key, k), x, self.distribution)
            loss, slope = jax.jvp(f, (x,), (v,))
            return jax.tree.map(lambda t, u: t + slope * u.astype(jnp.float32), total, v), loss

        zero = jax.tree.map(lambda u: jnp.zeros(u.shape, jnp.float32), x)
        total, loss = jax.lax.fori_loop(0, self.n, lambda k, c: one(k, c[0]), (zero, jnp.float32(0)))
        grad = jax.tree.map(lambda t, u: (t / self.n).astype(u.dtype), total, x)
        return grad, {"loss": loss, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "evaluations": self.n}


@dataclasses.dataclass
class ForwardGradSection(TransformSection):
    n: int = knob(1, AT_LEAST_ONE, "random tangent directions per step (one JVP each)")
    distribution: str = knob("gaussian", None, "the directions' distribution: gaussian | rademacher")


register(estimator_method("forward_grad", ForwardGrad, ForwardGradSection))
