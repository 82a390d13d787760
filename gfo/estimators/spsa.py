"""SPSA / MeZO: two forward passes along a random direction regenerated from the key.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), NeurIPS 2023,
arXiv 2305.17333; reference `princeton-nlp/MeZO`, `large_models/trainer.py` (`zo_step`).

For each of `n` queries, `z ~ N(0, I)` (or Rademacher) from `fold_in(key, k)`, and
`g = mean_k (L(x + εz_k) − L(x − εz_k)) / 2ε · z_k` on the same batch and objective key. Options:
`one_sided` (`(L(x+εz) − L(x)) / ε`), `sign` (ZO-SGD-Sign: the sign of the estimate), `sparsity`
(Sparse MeZO: perturb only the `1 − sparsity` smallest-magnitude entries of each leaf). Momentum and
Adam come from the optax transformation (ZO-SGD-MMT = `optax.sgd(momentum=0.9)`, ZO-Adam = `optax.adam`).
A query whose losses are not finite contributes nothing and is counted in `nonfinite`. Diagnostics:
`loss_range` (mean |L₊ − L₋|, the fitness spread) and, with `n >= 2`, `snr_cosine` (cosine between the
estimates of the first ⌊n/2⌋ queries and of the rest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.noise import DISTRIBUTIONS, cosine, member_key, noise_like, tree_axpy, tree_dot


@dataclasses.dataclass(frozen=True)
class SPSA:
    eps: float = 1e-3
    n: int = 1
    distribution: str = "gaussian"
    one_sided: bool = False
    sign: bool = False
    sparsity: float = 0.0

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError(f"SPSA eps={self.eps} must be > 0")
        if self.n < 1:
            raise ValueError(f"SPSA n={self.n} must be >= 1")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"SPSA distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SPSA sparsity={self.sparsity} must be in [0, 1)")

    def _mask(self, x):
        if self.sparsity == 0.0:
            return None
        def leaf_mask(v):
            a = jnp.abs(v.astype(jnp.float32))
            return (a <= jnp.quantile(a, 1.0 - self.sparsity)).astype(v.dtype)
        return jax.tree.map(leaf_mask, x)

    def __call__(self, objective, x, batch, key):
        noise_key, eval_key = jax.random.split(key)
        mask = self._mask(x)
        base = objective(x, batch, eval_key) if self.one_sided else None

        half = self.n // 2  # queries k < half sum into `first` (the SNR diagnostic's two halves)

        def query(k, carry):
            (total, first), loss_sum, bad, spread = carry
            z = noise_like(member_key(noise_key, k), x, self.distribution)
            if mask is not None:
                z = jax.tree.map(jnp.multiply, z, mask)
            plus = objective(tree_axpy(self.eps, z, x), batch, eval_key)
            if self.one_sided:
                minus, denom = base, self.eps
            else:
                minus, denom = objective(tree_axpy(-self.eps, z, x), batch, eval_key), 2 * self.eps
            ok = jnp.isfinite(plus) & jnp.isfinite(minus)
            proj = jnp.where(ok, (plus - minus) / denom, 0.0)
            total = jax.tree.map(lambda t, u: t + proj * u.astype(jnp.float32), total, z)
            if first is not None:
                first = jax.tree.map(lambda t, u: t + jnp.where(k < half, proj, 0.0) * u.astype(jnp.float32), first, z)
            loss = jnp.where(ok, (plus + minus) / 2, 0.0)
            spread = spread + jnp.where(ok, jnp.abs(plus - minus), 0.0)
            return (total, first), loss_sum + loss, bad + (~ok).astype(jnp.int32), spread

        zero = jax.tree.map(lambda u: jnp.zeros(u.shape, jnp.float32), x)
        init = ((zero, zero if self.n >= 2 else None), jnp.float32(0), jnp.int32(0), jnp.float32(0))
        # One query (MeZO's setting) inline: no loop boundary between the two forwards and the update.
        (total, first), loss_sum, bad, spread = (query(0, init) if self.n == 1
                                                 else jax.lax.fori_loop(0, self.n, query, init))
        extra = {}
        if first is not None:  # cosine between the estimates of the first and the last ⌊n/2⌋ queries
            second = jax.tree.map(jnp.subtract, total, first)
            extra["snr_cosine"] = cosine(first, second)
        grad = jax.tree.map(lambda t: t / self.n, total)
        if self.sign:
            grad = jax.tree.map(jnp.sign, grad)
        grad = jax.tree.map(lambda t, u: t.astype(u.dtype), grad, x)
        n_ok = jnp.maximum(self.n - bad, 1)
        evaluations = self.n * (1 if self.one_sided else 2) + (1 if self.one_sided else 0)
        return grad, {"loss": loss_sum / n_ok, "grad_norm": jnp.sqrt(tree_dot(grad, grad)),
                      "loss_range": spread / n_ok, "nonfinite": bad, "evaluations": evaluations, **extra}
