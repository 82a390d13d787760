"""Low-rank evolution strategies (EGGROLL): rank-r perturbations through the low-rank linear.

Sarkar et al., "Evolution Strategies at the Hyperscale" (EGGROLL), 2025, arXiv 2511.16652;
reference `ESHyperscale/HyperscaleES` (`src/hyperscalees/noiser/eggroll.py`).

For every 2-D leaf `W: [m, n]`, direction `p` draws `A_p: [m, r]`, `B_p: [n, r]` from
`(key, p, leaf path)` and member `i` uses `W + s_i σ A_p B_pᵀ / √r`. When the space accepts factored
kernels (`factored`: by default as the objective declares — an objective over `spaces.Full`), the member's leaf is the `LowRankKernel(W, s_i A_p, B_p,
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

import jax
import jax.numpy as jnp

from gfo.optim.update import Direction, halves_dots
from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.noise import KeyTable, MemberKeys, leaf_kind, leaf_noise, leaf_noise_keys, matrix_ndim, member_key, perturbed_leaf, sample
from gfo.optim.population import PopulationConfig, chunked_contraction, leaf_noise_direction, zeros_after
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, PopulationSection, knob
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


@dataclasses.dataclass(frozen=True)
class LowRankES(PerturbingEstimator, PopulationConfig):
    rank: int = 1
    _noise_kinds = ("lowrank", "full", "frozen")

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"LowRankES rank={self.rank} must be >= 1")

    def _kind(self, path, w) -> str:
        return leaf_kind(path, w, self.noise_map, lambda leaf: "lowrank" if matrix_ndim(path, leaf) == 2 else "full")

    def _perturb(self, x, direction_key, sign):
        scale = self.sigma / math.sqrt(self.rank)
        keys = direction_key if isinstance(direction_key, KeyTable) else KeyTable(direction_key, x)

        def leaf(path, w):
            kind = self._kind(path, w)
            if kind == "frozen":
                return w
            if kind == "lowrank":
                a, b = lowrank_factors(keys, path, w.shape, self.rank)
                lead = w.shape[:-2]
                kernel = LowRankKernel(w, (sign * a).astype(w.dtype), b.astype(w.dtype),
                                       jnp.full(lead, scale, jnp.float32) if lead else scale)
                return kernel if self.factored else kernel.dense()
            return perturbed_leaf(keys, path, w, sign * self.sigma, "gaussian", self.factored)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def direction(self, objective, x, batch, key):
        """`(Direction, metrics)`: the population evaluated, `g` described leaf by leaf (`gfo.optim.update`)."""
        noise_key, eval_key = jax.random.split(key)

        tables = MemberKeys(noise_key, self.n_directions, x)  # every direction's leaf keys at once (if small)

        def member_loss(direction, sign, member):
            return objective(self._perturb(x, tables.member(direction), sign),
                             self.member_batch(batch, member), eval_key)

        _, shaped, metrics = self.evaluate(member_loss)
        weights = self.direction_weights(shaped) / (self.population * self.sigma)
        return Direction(self._leaf_direction, (weights, tables)), metrics

    def _leaf_direction(self, operands, path, w):
        """One leaf's `(g, halves' dots)`: a matrix's `Σ_p w_p A_p B_pᵀ / √r` over each half of the
        directions, one contraction over (direction, rank) per chunk of directions, so the memory beyond
        `g` is the leaf's two float32 half-sums and the chunk's factors, whatever the population (with
        `pop_sharding` each chunk's directions split over the devices and the sums all-reduced); `full`
        leaves through `gfo.optim.population.leaf_noise_direction` (blocks of rows when large)."""
        weights, tables = operands
        kind = self._kind(path, w)
        if kind == "frozen":
            return jnp.zeros(jnp.shape(w), jnp.result_type(w)), None
        if kind == "full":
            return leaf_noise_direction(weights, tables.member, path, w, "gaussian", None,
                                        self.batch_size, self.pop_sharding)
        factors = lambda d: lowrank_factors(tables.member(d), path, w.shape, self.rank)  # noqa: E731
        if self.pop_sharding is None:
            # as many directions per contraction as keep their factors under NOISE_BLOCK_ELEMENTS (at least
            # `batch_size`): a loop (whose carry may be copied) only for very large populations
            per_direction = math.prod(w.shape[:-2]) * (w.shape[-2] + w.shape[-1]) * self.rank
            chunk = max(self.batch_size or 1, noise_block_elements() // per_direction)
            half_sum = lambda ws, offset: _factor_sum(ws, factors, offset, w.shape, chunk, self.rank)  # noqa: E731
        else:
            def half_sum(ws, offset):
                def contract(wc, ids):
                    a, b = jax.vmap(factors)(offset + ids)  # [c, ..., m, r], [c, ..., n, r]
                    return _contract(wc, a, b) / math.sqrt(self.rank)
                return chunked_contraction(ws, contract, self.batch_size, self.pop_sharding)
        n, h = weights.shape[0], weights.shape[0] // 2
        if n == 1:
            return half_sum(weights, 0).astype(w.dtype), None
        first, second = half_sum(weights[:h], 0), half_sum(weights[h:], h)
        return (first + second).astype(w.dtype), halves_dots(first, second)


def _contract(w, a, b) -> jax.Array:
    """`Σ_c w_c A_c B_cᵀ` for `A [c, ..., m, r]`, `B [c, ..., n, r]`: one contraction over (c, r)."""
    return jnp.einsum("c...mr,c...nr->...mn", a * w.reshape((-1,) + (1,) * (a.ndim - 1)), b)


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
        return acc + _contract(jax.lax.dynamic_slice_in_dim(padded, c * k, k), a, b)

    return jax.lax.fori_loop(0, n_chunks, body, zeros_after(padded, shape)) / math.sqrt(rank)


@dataclasses.dataclass
class LowRankESSection(PopulationSection):
    """`optimizer: {method: lowrank_es, rank: 1, sigma: 1e-3, population: 32}` (EGGROLL)."""

    rank: int = knob(1, AT_LEAST_ONE, "rank r of each matrix leaf's perturbation A Bᵀ / √r")


register(estimator_method("lowrank_es", LowRankES, LowRankESSection, splits_population=True, dense_members=False))
