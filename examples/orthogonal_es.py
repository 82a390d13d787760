"""A new estimator in one file, run through `gfo train` by its name: orthogonal ES.

Choromanski et al., "Structured Evolution with Compact Architectures for Scalable Policy Optimization",
ICML 2018 (arXiv 1804.02395): antithetic ES whose `n` directions are orthogonal (Gaussian directions
Gram–Schmidt-orthogonalised by a QR decomposition, each rescaled to a Gaussian vector's length), which
lowers the estimate's variance against i.i.d. directions. `g = Σ_k (L(x + σ u_k) − L(x − σ u_k)) u_k / (2 n σ)`
is an unbiased-in-expectation pseudo-gradient of the loss (`E[u uᵀ] = I`). For spaces of modest dimension
(`n ≤ dim`: a subspace, a soft prompt, LoRA on a few layers): the directions are held as an `[n, dim]` matrix.

    gfo train CONFIG --set plugins=[examples/orthogonal_es.py] --set optimizer.method=orthogonal_es

Its config section (`optimizer.sigma`, `optimizer.n`, with ranges and docs) and the registering line at the
end are all a method needs; any optax transform of the config applies the estimate.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gfo.optim import registry
from gfo.optim.estimators.base import Estimator
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, TransformSection, knob


@dataclasses.dataclass(frozen=True)
class OrthogonalES(Estimator):
    sigma: float = 0.01
    n: int = 8  # directions (antithetic pairs) per step, at most the space's dimension

    def direction(self, objective, x, batch, key):
        flat, unravel = ravel_pytree(x)
        if self.n > flat.size:
            raise ValueError(f"OrthogonalES n={self.n} exceeds the space's dimension {flat.size}")
        noise_key, eval_key = jax.random.split(key)
        gauss = jax.random.normal(noise_key, (flat.size, self.n), jnp.float32)
        q, _ = jnp.linalg.qr(gauss)  # orthonormal columns [dim, n]
        u = q.T * jnp.linalg.norm(gauss, axis=0)[:, None]  # [n, dim]: orthogonal, Gaussian lengths
        loss = lambda d: objective(unravel(flat + d.astype(flat.dtype)), batch, eval_key)  # noqa: E731
        plus = jax.lax.map(loss, self.sigma * u)
        minus = jax.lax.map(loss, -self.sigma * u)
        ok = jnp.isfinite(plus) & jnp.isfinite(minus)
        slopes = jnp.where(ok, (plus - minus) / (2 * self.sigma), 0.0)
        g = unravel((slopes @ u / self.n).astype(flat.dtype))
        both = jnp.concatenate([plus, minus])
        return g, {"loss": jnp.mean(jnp.where(jnp.isfinite(both), both, jnp.nan)), "nonfinite": jnp.sum(~ok),
                   "loss_range": jnp.mean(jnp.abs(plus - minus)), "evaluations": 2 * self.n}


@dataclasses.dataclass
class OrthogonalESSection(TransformSection):
    sigma: float = knob(0.01, POSITIVE, "noise scale σ of x ± σ u")
    n: int = knob(8, AT_LEAST_ONE, "orthogonal directions per step, at most the space's dimension")


registry.register(registry.estimator_method("orthogonal_es", OrthogonalES, OrthogonalESSection), replace=True)
