"""LOZO: zeroth-order estimates along low-rank perturbations `U Vᵀ`, with `V` kept for `nu` steps.

Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures" (LOZO),
ICLR 2025, arXiv 2410.07698; reference `optsuite/LOZO`.

For a 2-D leaf `W: [m, n]` the perturbation is `Z = U Vᵀ` with `U: [m, r]` drawn afresh every step and
`V: [n, r]` drawn from the estimator's own key once every `nu` steps (the lazy sampling that lets the
update stay in one subspace for a while); other leaves get ordinary Gaussian noise `Z`. With
`d = (L(θ + εZ) − L(θ − εZ)) / 2ε` on one batch and key, the estimate is `g = d · Z / r` for matrices
(`E_U[⟨∇, UVᵀ⟩ UVᵀ] = ∇ V Vᵀ` and `E[V Vᵀ] = r I`, so averaged over `V` it is the gradient) and `d · Z`
for other leaves. LOZO-M is this estimator with `optax.sgd(momentum=β)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.estimators.lowrank_es import lowrank_factors
from gfo.optim.noise import cosine, leaf_noise, matrix_ndim, member_key, perturbed_leaf, tree_dot
from models.linear import LowRankKernel


@dataclasses.dataclass(frozen=True)
class LOZO(PerturbingEstimator):
    eps: float = 1e-3
    rank: int = 2
    nu: int = 50  # steps between draws of V
    n: int = 1  # queries per step (each with its own U)
    factored: bool | None = None  # hand LowRankKernel / NoisyLeaf leaves (drawn in the forward); None: as the objective declares

    def __post_init__(self):
        if self.eps <= 0 or self.rank < 1 or self.nu < 1 or self.n < 1:
            raise ValueError(f"LOZO eps={self.eps}, rank={self.rank}, nu={self.nu}, n={self.n}: expected eps > 0 "
                             f"and rank, nu, n >= 1")

    def init(self, key: jax.Array, x0) -> jax.Array:
        """The raw data (uint32) of the `V` factors' key; the V of period `t // nu` is drawn from
        `fold_in(key, t // nu)`. Raw data, not a typed key, so the state checkpoints as a plain array."""
        del x0
        return jax.random.key_data(jax.random.fold_in(key, 1070))

    def _factors(self, path, w, u_key, v_key):
        u, _ = lowrank_factors(u_key, path, w.shape, self.rank)
        _, v = lowrank_factors(v_key, path, w.shape, self.rank)
        return u, v  # [..., m, r], [..., n, r] (per layer for stacked matrices)

    def perturbation(self, x, u_key: jax.Array, v_key: jax.Array):
        """`Z`: `U Vᵀ` for matrices (2-D, or 3-D stacked over layers), Gaussian noise for the others (float32)."""
        def leaf(path, w):
            if matrix_ndim(path, w) == 2:
                u, v = self._factors(path, w, u_key, v_key)
                return jnp.einsum("...mr,...nr->...mn", u, v)
            return leaf_noise(u_key, path, w)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def _perturbed(self, x, u_key, v_key, scale):
        """`x + scale · Z`, factored (`LowRankKernel` / `NoisyLeaf`, formed inside the forward) or dense."""
        def leaf(path, w):
            if matrix_ndim(path, w) == 2:
                u, v = self._factors(path, w, u_key, v_key)
                lead = w.shape[:-2]
                kernel = LowRankKernel(w, u.astype(w.dtype), v.astype(w.dtype), jnp.broadcast_to(scale, lead))
                return kernel if self.factored else kernel.dense()
            return perturbed_leaf(u_key, path, w, scale, "gaussian", self.factored)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def estimate(self, objective, x, batch, key, v_root, step):
        self = self.for_objective(objective)
        noise_key, eval_key = jax.random.split(key)
        v_key = jax.random.fold_in(jax.random.wrap_key_data(v_root), step // self.nu)
        ds, losses, spreads = [], [], []
        for k in range(self.n):
            u_key = member_key(noise_key, k)
            signs = jnp.array([self.eps, -self.eps], jnp.float32)  # both in one vmap: Z drawn once for the pair
            plus, minus = jax.vmap(lambda s: objective(self._perturbed(x, u_key, v_key, s), batch, eval_key))(signs)
            ok = jnp.isfinite(plus) & jnp.isfinite(minus)
            ds.append(jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0))
            losses.append(jnp.where(ok, (plus + minus) / 2, jnp.nan))
            spreads.append(jnp.abs(plus - minus))

        def estimate(queries):  # Σ_k d_k Z_k (/ r for matrices), regenerated
            def leaf(path, w):
                total = jnp.zeros(jnp.shape(w), jnp.float32)
                for k in queries:
                    u_key = member_key(noise_key, k)
                    if matrix_ndim(path, w) == 2:
                        u, v = self._factors(path, w, u_key, v_key)
                        total = total + ds[k] / self.rank * jnp.einsum("...mr,...nr->...mn", u, v)
                    else:
                        total = total + ds[k] * leaf_noise(u_key, path, w)
                return total
            return jax.tree_util.tree_map_with_path(leaf, x)

        h = self.n // 2
        total = estimate(range(self.n))
        grad = jax.tree.map(lambda t, w: (t / self.n).astype(w.dtype), total, x)
        metrics = {"loss": jnp.nanmean(jnp.stack(losses)), "grad_norm": jnp.sqrt(tree_dot(grad, grad)),
                   "loss_range": jnp.mean(jnp.stack(spreads)), "evaluations": 2 * self.n}
        if self.n >= 2:
            metrics["snr_cosine"] = cosine(estimate(range(h)), estimate(range(h, 2 * h)))
        return grad, metrics, v_root
