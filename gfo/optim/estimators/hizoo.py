"""HiZOO: zeroth-order estimates preconditioned by a diagonal Hessian estimated from the same forwards.

Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
Optimizer" (HiZOO), ICLR 2025, arXiv 2402.15173; reference `Yanjun-Zhao/HiZOO`.

The state is `h`, a positive diagonal estimate of the Hessian (`Σ = h⁻¹`, `h₀ = 1`). Each step draws
`z ~ N(0, I)`, perturbs along `u = Σ^{1/2} z`, and takes three forwards on one batch and key:
`L₀ = L(θ)`, `L± = L(θ ± μ u)`. With `ΔL = L₊ + L₋ − 2L₀` (≈ μ² uᵀHu), the Hessian is updated by an EMA of
the Stein estimate of its diagonal under `N(0, Σ)`:

    h ← (1 − α) h + α |ΔL / (2μ²) · h ⊙ (z² − 1)|      (E[ΔL/(2μ²) · h(z² − 1)] = diag H, H diagonal)

and the pseudo-gradient is `g = (L₊ − L₋)/(2μ) · Σ^{1/2} z` with the updated `Σ`, whose expectation at
fixed `Σ` is `Σ ∇L` (a Newton-like step under plain `optax.sgd`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import Estimator
from gfo.optim.noise import noise_like, tree_dot


@dataclasses.dataclass(frozen=True)
class HiZOO(Estimator):
    eps: float = 1e-3  # μ
    alpha: float = 1e-6  # EMA rate of the Hessian estimate (the paper's α_t, 1e-6 … 1e-8 for LLMs)
    h_min: float = 1e-8  # floor on h (keeps Σ finite)

    def __post_init__(self):
        if self.eps <= 0 or not 0 <= self.alpha <= 1 or self.h_min <= 0:
            raise ValueError(f"HiZOO eps={self.eps}, alpha={self.alpha}, h_min={self.h_min}: expected eps > 0, "
                             f"0 <= alpha <= 1, h_min > 0")

    def init(self, key: jax.Array, x0):
        """`h₀ = 1` per parameter (float32, like `x0`'s structure)."""
        del key
        return jax.tree.map(lambda w: jnp.ones(jnp.shape(w), jnp.float32), x0)

    def estimate(self, objective, x, batch, key, h, step):
        del step
        noise_key, eval_key = jax.random.split(key)
        z = noise_like(noise_key, jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), x))
        u = jax.tree.map(lambda zz, hh: zz / jnp.sqrt(hh), z, h)  # Σ^{1/2} z

        def at(scale):
            return objective(jax.tree.map(lambda w, uu: (w.astype(jnp.float32) + scale * uu).astype(w.dtype), x, u),
                             batch, eval_key)

        base, plus, minus = objective(x, batch, eval_key), at(self.eps), at(-self.eps)
        ok = jnp.isfinite(base) & jnp.isfinite(plus) & jnp.isfinite(minus)
        curvature = jnp.where(ok, (plus + minus - 2 * base) / (2 * self.eps ** 2), 0.0)
        h_new = jax.tree.map(lambda hh, zz: jnp.where(
            ok, jnp.maximum((1 - self.alpha) * hh + self.alpha * jnp.abs(curvature * hh * (zz * zz - 1)), self.h_min),
            hh), h, z)
        slope = jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0)
        grad = jax.tree.map(lambda zz, hh, w: (slope * zz / jnp.sqrt(hh)).astype(w.dtype), z, h_new, x)
        metrics = {"loss": base, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "curvature": curvature,
                   "loss_range": jnp.abs(plus - minus), "nonfinite": (~ok).astype(jnp.int32), "evaluations": 3}
        return grad, metrics, h_new
