"""Perturbations regenerated from keys, never stored for a population.

Member `i`'s noise for the leaf at path `p` is a pure function of `(key, i, p)`: the leaf's key is
`fold_in(fold_in(key, i), crc32(p))`, so leaves of equal shape get independent noise (the bug of
reusing one seed per layer, ES-at-scale issue #46, cannot happen) and any device can regenerate any
member's noise from the step key alone. A *stacked* leaf (under the model's `layers/` subtree, leading
layer axis `[L, ...]`) draws layer `l`'s noise from `fold_in(leaf key, l)`, and a matrix draws its row `r`
from `fold_in(layer key, r)` (`models.noise.matrix_noise`), so the scanned forward can generate one
layer's noise at a time, an embedding lookup only the rows it reads, and an update any block of rows
(`leaf_noise_rows`), and all of them get exactly the same numbers (`leaf_noise_keys`,
`models.linear.NoisyLeaf`). Noise is drawn in float32 (drawing directly in bfloat16 loses precision).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from models.linear import NoisyLeaf, noise_block_elements, row_blocks
from models.noise import DISTRIBUTIONS, matrix_noise, row_noise, standard_noise
from models.tree import LAYERS, path_name  # noqa: F401 - path_name re-exported: key paths as names


def path_id(path) -> int:
    """A stable 31-bit id of a key path (crc32 of its name), for `fold_in`."""
    return zlib.crc32(path_name(path).encode()) & 0x7FFFFFFF


def leaf_key(key: jax.Array, path) -> jax.Array:
    return jax.random.fold_in(key, path_id(path))


# The subtree of the model whose leaves carry a leading layer axis (`models`' stacked layout).
STACKED_PREFIX = LAYERS + "/"


def n_stacked_layers(path, leaf) -> int | None:
    """`L` for a stacked leaf `[L, ...]` (its path is under `layers/`), else None."""
    name = path_name(path)
    shape = _shape(leaf)
    if (name.startswith(STACKED_PREFIX) or f"/{STACKED_PREFIX}" in name) and len(shape) >= 1:
        return int(shape[0])
    return None


def _shape(leaf) -> tuple:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else jnp.shape(leaf)


@jax.tree_util.register_pytree_node_class
class KeyTable:
    """Every leaf's noise keys under one key — exactly what `leaf_noise_keys(key, path, leaf)` gives each
    leaf of `tree` — drawn in two batched `fold_in`s for the whole tree (one over the leaves' path ids, one
    over the stacked leaves' layers) instead of two per leaf. On CPU every threefry call is a loop of its own
    in the compiled program; a step that perturbs a tree leaf by leaf made ~4 per leaf per query (a 2-layer
    GPT-2 SPSA step held 110 of them: most of its compile time). Pass a table where a key is expected by
    `perturbed_leaf`, `leaf_noise`, `leaf_noise_rows`, `leaf_noise_keys` (and so `lowrank_factors`): same
    numbers. `KeyTable.for_members(key, n, tree)` holds the tables of members `0..n-1` (`member_key`) at once,
    `.member(d)` one of them; a table is a pytree (its keys are its leaves), so it rides in a `Direction`."""

    def __init__(self, key: jax.Array, tree=None, _built=None):
        if _built is not None:
            self._names, self._keys, self._key = _built
            return
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        ids = jnp.asarray([path_id(p) for p, _ in flat], jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids) if flat else None  # [n leaves]
        layers = [n_stacked_layers(p, w) for p, w in flat]
        stacked = [(i, n) for i, n in enumerate(layers) if n is not None]
        if stacked:
            owner = jnp.asarray([i for i, n in stacked for _ in range(n)], jnp.int32)
            index = jnp.asarray([layer for _, n in stacked for layer in range(n)], jnp.uint32)
            layer_keys = jax.vmap(jax.random.fold_in)(keys[owner], index)  # [Σ L]
        out, offset = [], 0
        for i, n in enumerate(layers):
            out.append(keys[i] if n is None else layer_keys[offset:offset + n])
            offset += n or 0
        self._names, self._keys, self._key = tuple(path_name(p) for p, _ in flat), tuple(out), key

    @classmethod
    def for_members(cls, key: jax.Array, n: int, tree) -> "KeyTable":
        """The tables of members `0..n-1` (`KeyTable(member_key(key, d), tree)`), each key array `[n, ...]`."""
        return jax.vmap(lambda d: cls(member_key(key, d), tree))(jnp.arange(n, dtype=jnp.int32))

    def member(self, d) -> "KeyTable":
        """Member `d`'s table (an int or int32 scalar) of a `for_members` table."""
        return jax.tree.map(lambda k: k[d], self)

    def keys(self, path, leaf) -> jax.Array:
        """The leaf's key (or `[L]` layer keys), as `leaf_noise_keys(key, path, leaf)`."""
        name = path_name(path)
        if name in self._names:
            return self._keys[self._names.index(name)]
        return leaf_noise_keys(self._key, path, leaf)

    def tree_flatten(self):
        return (self._keys, self._key), self._names

    @classmethod
    def tree_unflatten(cls, names, children):
        keys, key = children
        return cls(None, _built=(names, tuple(keys), key))


# The most keys a table of every member's leaf keys may hold (2 MiB of key data); a larger population's
# members draw their tables one at a time (the same numbers, a loop more per leaf).
MEMBER_TABLE_KEYS = 1 << 18


@jax.tree_util.register_pytree_node_class
class MemberKeys:
    """The keys of members `0..n-1` under `key` (each member's as `member_key(key, d)` gives its leaves):
    `member(d)` is a `KeyTable` slice when the whole population's table (`KeyTable.for_members`) is at most
    `MEMBER_TABLE_KEYS` keys, else member `d`'s key (its table drawn where it is used). A pytree: it rides
    in a `Direction` from the evaluation of the members to the update."""

    def __init__(self, key: jax.Array, n: int, tree, _table=None, _built: bool = False):
        self.key, self.table = key, _table
        if not _built:
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            size = n * sum(1 + (n_stacked_layers(p, w) or 0) for p, w in flat)
            self.table = KeyTable.for_members(key, n, tree) if size <= MEMBER_TABLE_KEYS else None

    def member(self, d):
        return self.table.member(d) if self.table is not None else member_key(self.key, d)

    def tree_flatten(self):
        return (self.key, self.table), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        key, table = children
        return cls(key, 0, None, table, _built=True)


def leaf_noise_keys(key, path, leaf) -> jax.Array:
    """The noise key(s) of the leaf at `path`: one key, or `[L]` keys (one per layer) for a stacked leaf.
    `key` may be a `KeyTable` (the whole tree's keys, drawn at once)."""
    if isinstance(key, KeyTable):
        return key.keys(path, leaf)
    k = leaf_key(key, path)
    n = n_stacked_layers(path, leaf)
    if n is None:
        return k
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n, dtype=jnp.uint32))


def leaf_noise(key: jax.Array, path, leaf, distribution: str = "gaussian") -> jax.Array:
    """Float32 standard noise of `leaf`'s shape for the leaf at `path` (per-layer keys when stacked)."""
    keys = leaf_noise_keys(key, path, leaf)
    return NoisyLeaf(jax.ShapeDtypeStruct(_shape(leaf), jnp.float32), keys, jnp.float32(0.0), distribution).noise()


def layer_shape(path, leaf) -> tuple[int, ...]:
    """The shape of one layer's copy of the leaf (its shape without the stacked layer axis)."""
    shape = _shape(leaf)
    return shape[1:] if n_stacked_layers(path, leaf) is not None else shape


def leaf_noise_rows(key: jax.Array, path, leaf, layer, rows, distribution: str = "gaussian") -> jax.Array:
    """Rows `rows [n]` of layer `layer` (None for an unstacked leaf) of `leaf_noise(key, path, leaf)`:
    float32 `[n, *row shape]`, drawn alone (a matrix's rows are keyed independently); `rows=None` gives
    the whole layer."""
    if isinstance(key, KeyTable):
        k = key.keys(path, leaf)
        k = k[layer] if n_stacked_layers(path, leaf) is not None else k
    else:
        k = leaf_key(key, path)
        if n_stacked_layers(path, leaf) is not None:
            k = jax.random.fold_in(k, layer)
    shape = layer_shape(path, leaf)
    if rows is None or len(shape) < 2:
        return matrix_noise(k, shape, distribution)
    return row_noise(k, rows, shape[1:], distribution)


def update_block_elements() -> int:
    """Values an update regenerates at once for one leaf: a quarter of `models.linear.NOISE_BLOCK_ELEMENTS`
    (1 M). A block's Gaussian is made through the inverse normal CDF, whose intermediates XLA keeps as
    a few float32 buffers of the block's size: at 4 M values they were 3 × 16 MiB, two thirds of a GPT-2
    (d 256, vocab 50257) SPSA step's temporaries; at 1 M the step's temporaries fall from 0.66 to 0.23 ×
    the parameters (`benchmarks/library_step.py`). The forward's blocks keep the full size."""
    return max(1, noise_block_elements() // 4)


def noise_blocks(path, leaf, block_elements: int | None = None):
    """How an update regenerates the leaf's noise: None (the whole leaf at once, for a leaf of at most
    `update_block_elements()`), else `(n_layers or None, rows, rows per block, blocks per layer)` — blocks of
    rows of one layer (`rows` None: whole layers of a vector leaf)."""
    limit = update_block_elements() if block_elements is None else block_elements
    size = math.prod(_shape(leaf))
    if size <= limit:
        return None
    lead = n_stacked_layers(path, leaf)
    per_layer = layer_shape(path, leaf)
    if len(per_layer) < 2:
        return (lead, None, None, 1) if lead is not None else None
    row = size // (lead or 1) // int(per_layer[0])
    per, n_blocks = row_blocks(int(per_layer[0]), row, limit)
    return lead, int(per_layer[0]), per, n_blocks


def perturbed_leaf(key: jax.Array, path, leaf, scale, distribution: str = "gaussian",
                   factored: bool = True, mul=None, mul_power: float = 1.0):
    """`leaf + scale · ε(key, path)`: a `NoisyLeaf` drawn inside the forward (`factored`), else dense.

    `mul` (an array shaped like `leaf`, or None): `leaf + scale · ε ⊙ mul ** mul_power`, the multiplier
    applied where the noise is read (HiZOO's `Σ^{1/2} z`: `mul = h`, `mul_power = −½`)."""
    keys = leaf_noise_keys(key, path, leaf)
    if mul is not None and tuple(jnp.shape(mul)) != _shape(leaf):
        raise ValueError(f"perturbed_leaf at {path_name(path)!r}: the multiplier has shape {jnp.shape(mul)}, "
                         f"expected the leaf's {_shape(leaf)}")
    noisy = NoisyLeaf(leaf, keys, jnp.broadcast_to(jnp.asarray(scale, jnp.float32), jnp.shape(keys)), distribution,
                      mul=mul, mul_power=float(mul_power))
    return noisy if factored else noisy.dense()


def member_key(key: jax.Array, member) -> jax.Array:
    """The key of population member (or antithetic pair) `member` (an int or int32 scalar)."""
    return jax.random.fold_in(key, member)


def sample(key: jax.Array, shape, dtype=jnp.float32, distribution: str = "gaussian") -> jax.Array:
    """Standard noise of `shape`: N(0, 1), Rademacher ±1 or `"auto"`, drawn in float32, cast to `dtype`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"noise distribution {distribution!r}: expected one of {DISTRIBUTIONS}")
    return standard_noise(key, shape, distribution).astype(dtype)


def noise_like(key: jax.Array, tree, distribution: str = "gaussian"):
    """A pytree like `tree` of standard noise (each leaf keyed by its path, per layer when stacked), in
    the leaves' dtypes."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_noise(key, p, x, distribution).astype(jnp.result_type(x)), tree)


def tree_axpy(a, x, y):
    """`a * x + y` leafwise, computed in float32 and cast to `y`'s dtypes."""
    return jax.tree.map(lambda u, v: (a * u.astype(jnp.float32) + v.astype(jnp.float32)).astype(v.dtype), x, y)


def tree_dot(x, y) -> jax.Array:
    """`Σ x·y` over all leaves, in float32."""
    return sum(jnp.vdot(u.astype(jnp.float32), v.astype(jnp.float32))
               for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def tree_size(tree) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


NOISE_KINDS = ("lowrank", "full", "frozen")


def check_noise_map(noise_map, allowed=NOISE_KINDS) -> tuple[tuple[str, str], ...]:
    """`noise_map` (a mapping or pairs `regex → kind`) as a tuple of pairs, validated.

    The first pattern that `re.search`es a leaf's path name decides its kind: `lowrank` (EGGROLL's
    factored `A Bᵀ`, matrices: 2-D, or 3-D stacked over layers), `full` (i.i.d. noise) or `frozen` (no noise, no update)
    — HyperscaleES's per-leaf map.
    """
    import re

    pairs = tuple(noise_map.items()) if isinstance(noise_map, dict) else tuple(tuple(p) for p in noise_map or ())
    for pattern, kind in pairs:
        if kind not in allowed:
            raise ValueError(f"noise_map {pattern!r}: {kind!r} is not a noise kind; expected one of {allowed}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"noise_map pattern {pattern!r} is not a regular expression: {e}") from None
    return pairs


def matrix_ndim(path, leaf) -> int:
    """The number of axes of one layer's copy of the leaf (its ndim without the stacked layer axis)."""
    return len(layer_shape(path, leaf))


def leaf_kind(path, leaf, noise_map, default) -> str:
    """The noise kind of the leaf at `path`: the first matching pattern of `noise_map`, else `default(leaf)`."""
    import re

    name = path_name(path)
    for pattern, kind in noise_map:
        if re.search(pattern, name):
            if kind == "lowrank" and matrix_ndim(path, leaf) != 2:
                raise ValueError(f"noise_map gives {name!r} (shape {jnp.shape(leaf)}) 'lowrank' noise, which "
                                 f"needs a matrix (2-D, or 3-D stacked over layers); use 'full' or 'frozen' for it")
            return kind
    return default(leaf)


def unmatched_patterns(noise_map, tree) -> list[str]:
    """The patterns of `noise_map` that match no leaf path of `tree` (a typo in a config)."""
    import re

    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return [p for p, _ in noise_map if not any(re.search(p, n) for n in names)]


def mapped_noise_like(key: jax.Array, tree, noise_map=(), distribution: str = "gaussian"):
    """`noise_like` with `frozen` leaves of `noise_map` set to zero (no noise, hence no update)."""
    def leaf(p, x):
        if leaf_kind(p, x, noise_map, lambda _: "full") == "frozen":
            return jnp.zeros(jnp.shape(x), jnp.result_type(x))
        return leaf_noise(key, p, x, distribution).astype(jnp.result_type(x))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def cosine(a, b) -> jax.Array:
    """Cosine between two pytrees (0 where either is zero)."""
    na, nb = jnp.sqrt(tree_dot(a, a)), jnp.sqrt(tree_dot(b, b))
    return tree_dot(a, b) / jnp.maximum(na * nb, 1e-30)
