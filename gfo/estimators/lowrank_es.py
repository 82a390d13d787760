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
from gfo.population import PopulationConfig, chunked_contraction, halves_cosine, halves_dots, noise_update_dots
from models.linear import LowRankKernel, noise_block_elements

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

        if self.pop_sharding is None:
            grad, snr = self._update(weights, noise_key, x)
            return grad, {**metrics, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "snr_cosine": snr}

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

        # Sharded over `pop`: Σ_p w_p A_p B_pᵀ per chunk of directions split over the devices, all-reduced.
        grad, snr = self.halves(weights, lambda w, offset: _lowrank_weighted_sum(
            w, lambda d: direction_update(d + offset), x, self.batch_size, self.rank, self.pop_sharding))
        return grad, {**metrics, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "snr_cosine": snr}

    def _update(self, weights, noise_key, x):
        """`(g, snr_cosine)` leaf by leaf: a matrix's `Σ_p w_p A_p B_pᵀ / √r` over each half of the
        directions in one contraction over (direction, rank) per chunk of directions, so the memory beyond
        `g` is that leaf's two float32 half-sums and the chunk's factors, whatever the population; `full`
        leaves through `noise_update_dots` (a block of rows at a time when large)."""
        g_full, dots = noise_update_dots(weights, lambda d: member_key(noise_key, d), x, "gaussian",
                                         lambda p, w: self._kind(p, w) != "full")
        dots = [] if dots is None else [dots]
        n, h = weights.shape[0], weights.shape[0] // 2

        def leaf(path, w, g):
            if self._kind(path, w) != "lowrank":
                return g
            # as many directions per contraction as keep their factors under NOISE_BLOCK_ELEMENTS (at least
            # `batch_size`): a loop (whose carry may be copied) only for very large populations
            per_direction = math.prod(w.shape[:-2]) * (w.shape[-2] + w.shape[-1]) * self.rank
            chunk = max(self.batch_size or 1, noise_block_elements() // per_direction)
            factors = lambda d: lowrank_factors(member_key(noise_key, d), path, w.shape, self.rank)  # noqa: E731
            if n == 1:
                return _factor_sum(weights, factors, 0, w.shape, chunk, self.rank).astype(w.dtype)
            first = _factor_sum(weights[:h], factors, 0, w.shape, chunk, self.rank)
            second = _factor_sum(weights[h:], factors, h, w.shape, chunk, self.rank)
            dots.append(halves_dots(first, second))
            return (first + second).astype(w.dtype)

        g = jax.tree_util.tree_map_with_path(leaf, x, g_full)
        return g, halves_cosine(sum(dots) if dots else None)


def _factor_sum(weights, factors, offset: int, shape, chunk: int, rank: int) -> jax.Array:
    """`Σ_j weights[j] A_{offset+j} B_{offset+j}ᵀ / √r` (float32 of `shape`) for `factors(d) -> (A, B)`, one
    contraction over (direction, rank) per chunk of `chunk` directions in a loop (zero-padded weights)."""
    m = weights.shape[0]
    k = max(1, min(int(chunk), m))
    n_chunks = -(-m // k)
    padded = jnp.zeros((n_chunks * k,), jnp.float32).at[:m].set(weights.astype(jnp.float32))

    def body(c, acc):
        ids = c * k + jnp.arange(k, dtype=jnp.int32)
        a, b = jax.vmap(factors)(offset + jnp.minimum(ids, m - 1))  # [k, ..., m, r], [k, ..., n, r]
        w = jax.lax.dynamic_slice_in_dim(padded, c * k, k)
        return acc + jnp.einsum("c...mr,c...nr->...mn", a * w.reshape((-1,) + (1,) * (a.ndim - 1)), b)

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(shape, jnp.float32)) / math.sqrt(rank)


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
