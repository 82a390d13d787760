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

from gfo.noise import cosine, leaf_key, member_key, sample, tree_axpy, tree_dot


@dataclasses.dataclass(frozen=True)
class LOZO:
    eps: float = 1e-3
    rank: int = 2
    nu: int = 50  # steps between draws of V
    n: int = 1  # queries per step (each with its own U)

    def __post_init__(self):
        if self.eps <= 0 or self.rank < 1 or self.nu < 1 or self.n < 1:
            raise ValueError(f"LOZO eps={self.eps}, rank={self.rank}, nu={self.nu}, n={self.n}: expected eps > 0 "
                             f"and rank, nu, n >= 1")

    def init(self, key: jax.Array, x0) -> jax.Array:
        """The raw data (uint32) of the `V` factors' key; the V of period `t // nu` is drawn from
        `fold_in(key, t // nu)`. Raw data, not a typed key, so the state checkpoints as a plain array."""
        del x0
        return jax.random.key_data(jax.random.fold_in(key, 1070))

    def perturbation(self, x, u_key: jax.Array, v_key: jax.Array):
        """`Z`: `U Vᵀ` for 2-D leaves, Gaussian noise for the others (float32)."""
        def leaf(path, w):
            if jnp.ndim(w) == 2:
                u = sample(leaf_key(u_key, path), (w.shape[0], self.rank))
                v = sample(leaf_key(v_key, path), (w.shape[1], self.rank))
                return u @ v.T
            return sample(leaf_key(u_key, path), jnp.shape(w))

        return jax.tree_util.tree_map_with_path(leaf, x)

    def __call__(self, objective, x, batch, key, v_root, step):
        noise_key, eval_key = jax.random.split(key)
        v_key = jax.random.fold_in(jax.random.wrap_key_data(v_root), step // self.nu)
        scale = jax.tree.map(lambda w: 1.0 / self.rank if jnp.ndim(w) == 2 else 1.0, x)
        grads, losses, spreads = [], [], []
        for k in range(self.n):
            z = self.perturbation(x, member_key(noise_key, k), v_key)
            plus = objective(tree_axpy(self.eps, z, x), batch, eval_key)
            minus = objective(tree_axpy(-self.eps, z, x), batch, eval_key)
            ok = jnp.isfinite(plus) & jnp.isfinite(minus)
            d = jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0)
            grads.append(jax.tree.map(lambda zz, s: d * s * zz, z, scale))
            losses.append(jnp.where(ok, (plus + minus) / 2, jnp.nan))
            spreads.append(jnp.abs(plus - minus))
        total = jax.tree.map(lambda *g: sum(g) / self.n, *grads)
        grad = jax.tree.map(lambda t, w: t.astype(w.dtype), total, x)
        metrics = {"loss": jnp.nanmean(jnp.stack(losses)), "grad_norm": jnp.sqrt(tree_dot(grad, grad)),
                   "loss_range": jnp.mean(jnp.stack(spreads)), "evaluations": 2 * self.n}
        if self.n >= 2:
            h = self.n // 2
            first = jax.tree.map(lambda *g: sum(g), *grads[:h])
            second = jax.tree.map(lambda *g: sum(g), *grads[h:2 * h])
            metrics["snr_cosine"] = cosine(first, second)
        return grad, metrics, v_root
