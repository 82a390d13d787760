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


def _sub_sharding(pop_sharding, spec):
    """A sharding on `pop_sharding`'s mesh with another `PartitionSpec`."""
    from jax.sharding import NamedSharding

    return NamedSharding(pop_sharding.mesh, spec)


def _constrain(tree, sharding):
    return tree if sharding is None else jax.tree.map(lambda y: jax.lax.with_sharding_constraint(y, sharding), tree)


def map_members(fn: Callable[[jax.Array], jax.Array], n: int, batch_size: int | None = None,
                pop_sharding=None) -> jax.Array:
    """`stack([fn(i) for i in range(n)])` as `lax.map` over `vmap`ped chunks of `batch_size` members.

    With `pop_sharding` (a `NamedSharding` with spec `P("pop")`), every chunk's members are split over
    the `pop` axis, so each device evaluates `chunk / |pop|` members per step and the result `[n]` is
    sharded over `pop`: only the per-member scalars ever exist outside the device that made them.
    """
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    n_chunks = -(-n // chunk)
    # Padded ids repeat the last member; their results are dropped.
    ids = jnp.minimum(jnp.arange(n_chunks * chunk, dtype=jnp.int32), n - 1).reshape(n_chunks, chunk)
    if pop_sharding is not None:
        from jax.sharding import PartitionSpec as P

        ids = jax.lax.with_sharding_constraint(ids, _sub_sharding(pop_sharding, P(None, *pop_sharding.spec)))

    def run_chunk(members):
        return _constrain(jax.vmap(fn)(_constrain(members, pop_sharding)), pop_sharding)

    out = run_chunk(ids[0]) if n_chunks == 1 else jax.lax.map(run_chunk, ids)
    out = jax.tree.map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2 if n_chunks > 1 else 1:])[:n], out)
    return _constrain(out, pop_sharding)


def weighted_sum(weights: jax.Array, make: Callable[[jax.Array], object], batch_size: int | None = None,
                 pop_sharding=None):
    """`Σ_j weights[j] · make(j)` over `j < len(weights)` for pytree-valued `make`, in chunks."""

    def contract(w, j):
        parts = jax.vmap(make)(j)
        return jax.tree.map(lambda p: jnp.tensordot(w, p.astype(jnp.float32), axes=1), parts)

    return chunked_contraction(weights, contract, batch_size, pop_sharding)


def chunked_contraction(weights: jax.Array, contract: Callable[[jax.Array, jax.Array], object],
                        batch_size: int | None = None, pop_sharding=None):
    """`Σ_chunks contract(weights[chunk], ids[chunk])` with a `lax.scan` carrying a float32 sum.

    `contract(w [c], j [c] int32)` regenerates whatever the members `j` need and contracts it with
    their weights `w`, returning a pytree; a partial last chunk is padded with zero weights. Memory is
    that of one chunk. With `pop_sharding` each chunk's members are split over the `pop` axis: every
    device regenerates and contracts its own members, and the partial sums are all-reduced.
    """
    inner = contract
    if pop_sharding is not None:
        contract = lambda w, j: inner(*_constrain((w, j), pop_sharding))  # noqa: E731
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
