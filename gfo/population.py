"""Chunked evaluation over an implicit population, and noise sums regenerated chunk by chunk.

Memory is set by `batch_size` (members evaluated at once), not by the population size: members are
indices, their perturbations are regenerated inside the mapped function, and only the per-member
scalars are stacked. `pop_sharding`, when given (the scale-out mesh's `pop` axis), constrains the
member indices and therefore the work and the fitness vector to be split over devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def map_members(fn: Callable[[jax.Array], jax.Array], n: int, batch_size: int | None = None,
                pop_sharding=None) -> jax.Array:
    """`stack([fn(i) for i in range(n)])` as `lax.map` over `vmap`ped chunks of `batch_size` members."""
    members = jnp.arange(n, dtype=jnp.int32)
    if pop_sharding is not None:
        members = jax.lax.with_sharding_constraint(members, pop_sharding)
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    if chunk >= n:
        out = jax.vmap(fn)(members)
    else:
        out = jax.lax.map(fn, members, batch_size=chunk)
    if pop_sharding is not None:
        out = jax.tree.map(lambda y: jax.lax.with_sharding_constraint(y, pop_sharding), out)
    return out


def weighted_sum(weights: jax.Array, make: Callable[[jax.Array], object], batch_size: int | None = None):
    """`Σ_j weights[j] · make(j)` over `j < len(weights)` for pytree-valued `make`, in chunks."""

    def contract(w, j):
        parts = jax.vmap(make)(j)
        return jax.tree.map(lambda p: jnp.tensordot(w, p.astype(jnp.float32), axes=1), parts)

    return chunked_contraction(weights, contract, batch_size)


def chunked_contraction(weights: jax.Array, contract: Callable[[jax.Array, jax.Array], object],
                        batch_size: int | None = None):
    """`Σ_chunks contract(weights[chunk], ids[chunk])` with a `lax.scan` carrying a float32 sum.

    `contract(w [c], j [c] int32)` regenerates whatever the members `j` need and contracts it with
    their weights `w`, returning a pytree; a partial last chunk is padded with zero weights. Memory is
    that of one chunk.
    """
    n = weights.shape[0]
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    n_chunks = -(-n // chunk)
    padded = jnp.zeros((n_chunks * chunk,), jnp.float32).at[:n].set(weights.astype(jnp.float32))
    ids = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    if n_chunks == 1:
        return contract(padded, ids)
    template = jax.eval_shape(lambda: contract(padded[:chunk], ids[:chunk]))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), template)

    def body(total, c):
        w = jax.lax.dynamic_slice_in_dim(padded, c * chunk, chunk)
        j = jax.lax.dynamic_slice_in_dim(ids, c * chunk, chunk)
        return jax.tree.map(jnp.add, total, contract(w, j)), None

    total, _ = jax.lax.scan(body, zero, jnp.arange(n_chunks))
    return total
