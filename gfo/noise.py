"""Perturbations regenerated from keys, never stored for a population.

Member `i`'s noise for the leaf at path `p` is a pure function of `(key, i, p)`: the leaf's key is
`fold_in(fold_in(key, i), crc32(p))`, so leaves of equal shape get independent noise (the bug of
reusing one seed per layer, ES-at-scale issue #46, cannot happen) and any device can regenerate any
member's noise from the step key alone. Noise is drawn in float32 and cast to the leaf's dtype
(drawing directly in bfloat16 loses precision).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

DISTRIBUTIONS = ("gaussian", "rademacher")


def path_name(path) -> str:
    """`"layers_0/attn/q/kernel"` for a `jax.tree_util` key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def path_id(path) -> int:
    """A stable 31-bit id of a key path (crc32 of its name), for `fold_in`."""
    return zlib.crc32(path_name(path).encode()) & 0x7FFFFFFF


def leaf_key(key: jax.Array, path) -> jax.Array:
    return jax.random.fold_in(key, path_id(path))


def member_key(key: jax.Array, member) -> jax.Array:
    """The key of population member (or antithetic pair) `member` (an int or int32 scalar)."""
    return jax.random.fold_in(key, member)


def sample(key: jax.Array, shape, dtype=jnp.float32, distribution: str = "gaussian") -> jax.Array:
    """Standard noise of `shape`: N(0, 1) or Rademacher ±1, drawn in float32, cast to `dtype`."""
    if distribution == "gaussian":
        z = jax.random.normal(key, shape, jnp.float32)
    elif distribution == "rademacher":
        z = jax.random.rademacher(key, shape, jnp.float32)
    else:
        raise ValueError(f"noise distribution {distribution!r}: expected one of {DISTRIBUTIONS}")
    return z.astype(dtype)


def noise_like(key: jax.Array, tree, distribution: str = "gaussian"):
    """A pytree like `tree` of standard noise, each leaf keyed by its path."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: sample(leaf_key(key, p), jnp.shape(x), jnp.result_type(x), distribution), tree)


def tree_axpy(a, x, y):
    """`a * x + y` leafwise, computed in float32 and cast to `y`'s dtypes."""
    return jax.tree.map(lambda u, v: (a * u.astype(jnp.float32) + v.astype(jnp.float32)).astype(v.dtype), x, y)


def tree_dot(x, y) -> jax.Array:
    """`Σ x·y` over all leaves, in float32."""
    return sum(jnp.vdot(u.astype(jnp.float32), v.astype(jnp.float32))
               for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def tree_size(tree) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))
