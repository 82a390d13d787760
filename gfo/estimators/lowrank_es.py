"""Low-rank evolution strategies (EGGROLL): rank-r perturbations through the low-rank linear.

Sarkar et al., "Evolution Strategies at the Hyperscale" (EGGROLL), 2025, arXiv 2511.16652;
reference `ESHyperscale/HyperscaleES` (`src/hyperscalees/noiser/eggroll.py`).

For every 2-D leaf `W: [m, n]`, direction `p` draws `A_p: [m, r]`, `B_p: [n, r]` from
`(key, p, leaf path)` and member `i` uses `W + s_i σ A_p B_pᵀ / √r`. When the space accepts factored
kernels (`factored=True`, e.g. `spaces.Full`), the member's leaf is the `LowRankKernel(W, s_i A_p, B_p,
σ/√r)`, so the model computes `x@W + …` with `W` shared across the population — one big matmul; other
spaces get the dense `W + …`. `noise_map` (regex on leaf paths → `lowrank` | `full` | `frozen`, first
match wins, as HyperscaleES decides per leaf) overrides the default, which is `lowrank` for matrices and
`full` for other leaves; EGGROLL's own default freezes non-matrix leaves and embeddings
(`EGGROLL_NOISE_MAP`). The pseudo-gradient of a matrix is `Σ_p w_p A_p B_pᵀ / (N σ √r)` with direction weights `w_p`
from the shaped losses, contracted chunk by chunk (`einsum('pmr,pnr->mn')`), never forming per-member
matrices; its expectation over directions is the full-rank ES gradient (variance-matched: each entry
of `A Bᵀ/√r` has unit variance).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gfo.noise import leaf_kind, leaf_noise, leaf_noise_keys, matrix_ndim, member_key, perturbed_leaf, sample, tree_dot
from gfo.population import PopulationConfig, chunked_contraction
from models.linear import LowRankKernel

# EGGROLL's defaults (HyperscaleES): matrices low-rank; embeddings, norms, biases and other vectors frozen.
# In gfo's models every non-matrix leaf is a `bias` or a norm `scale`.
EGGROLL_NOISE_MAP = (("^(embed|pos_embed)$", "frozen"), ("(bias|scale)$", "frozen"))


def lowrank_factors(key: jax.Array, path, shape, rank: int):
    """`(A [..., m, r], B [..., n, r])` standard normal factors of one direction for a matrix leaf of
    `shape` (`[m, n]`, or `[L, m, n]` stacked over layers: then layer `l` draws from its own key)."""

    def draw(k):
        ka, kb = jax.random.split(k)
        return sample(ka, (shape[-2], rank)), sample(kb, (shape[-1], rank))

    keys = leaf_noise_keys(key, path, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    return draw(keys) if keys.ndim == 0 else jax.vmap(draw)(keys)


def dense_noise(key: jax.Array, path, shape):
    return leaf_noise(key, path, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))


class _Factors(NamedTuple):
    a: jax.Array  # [c, ..., m, r]
    b: jax.Array  # [c, ..., n, r]


class _Dense(NamedTuple):
    e: jax.Array


@dataclasses.dataclass(frozen=True)
class LowRankES(PopulationConfig):
    rank: int = 1
    factored: bool = True  # hand factored LowRankKernel / NoisyLeaf leaves to the objective
    _noise_kinds = ("lowrank", "full", "frozen")

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"LowRankES rank={self.rank} must be >= 1")

    def _kind(self, path, w) -> str:
        return leaf_kind(path, w, self.noise_map, lambda leaf: "lowrank" if matrix_ndim(path, leaf) == 2 else "full")

    def _perturb(self, x, direction_key, sign):
        scale = self.sigma / math.sqrt(self.rank)

        def leaf(path, w):
            kind = self._kind(path, w)
            if kind == "frozen":
                return w
            if kind == "lowrank":
                a, b = lowrank_factors(direction_key, path, w.shape, self.rank)
                lead = w.shape[:-2]
                kernel = LowRankKernel(w, (sign * a).astype(w.dtype), b.astype(w.dtype),
                                       jnp.full(lead, scale, jnp.float32) if lead else scale)
                return kernel if self.factored else kernel.dense()
            return perturbed_leaf(direction_key, path, w, sign * self.sigma, "gaussian", self.factored)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def __call__(self, objective, x, batch, key):
        noise_key, eval_key = jax.random.split(key)

        def member_loss(direction, sign, member):
            return objective(self._perturb(x, member_key(noise_key, direction), sign),
                             self.member_batch(batch, member), eval_key)

        _, shaped, metrics = self.evaluate(member_loss)
        weights = self.direction_weights(shaped) / (self.population * self.sigma)

        def direction_update(d):
            k = member_key(noise_key, d)

            def leaf(path, w):
                kind = self._kind(path, w)
                if kind == "lowrank":
                    a, b = lowrank_factors(k, path, w.shape, self.rank)
                    return _Factors(a, b)
                if kind == "frozen":
                    return _Dense(jnp.zeros(w.shape, jnp.float32))
                return _Dense(leaf_noise(k, path, w))

            return jax.tree_util.tree_map_with_path(leaf, x)

        # Σ_p w_p A_p B_pᵀ: per chunk one contraction over (direction, rank), no per-member matrices.
        grad, snr = self.halves(weights, lambda w, offset: _lowrank_weighted_sum(
            w, lambda d: direction_update(d + offset), x, self.batch_size, self.rank, self.pop_sharding))
        return grad, {**metrics, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "snr_cosine": snr}


def _lowrank_weighted_sum(weights, direction_update, x, batch_size, rank, pop_sharding=None):
    inv_sqrt_r = 1.0 / math.sqrt(rank)

    def contract(w, j):
        parts = jax.vmap(direction_update)(j)

        def leaf(p):
            if isinstance(p, _Factors):  # Σ_c w_c A_c B_cᵀ, A: [c, ..., m, r], B: [c, ..., n, r]: one contraction
                return jnp.einsum("c...mr,c...nr->...mn", p.a * w.reshape((-1,) + (1,) * (p.a.ndim - 1)), p.b) * inv_sqrt_r
            return jnp.tensordot(w, p.e, axes=1)

        return jax.tree.map(leaf, parts, is_leaf=lambda t: isinstance(t, (_Factors, _Dense)))

    total = chunked_contraction(weights, contract, batch_size, pop_sharding)
    return jax.tree.map(lambda t, u: t.astype(u.dtype), total, x)
