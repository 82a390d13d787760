"""How a key becomes numbers: the standard noise a perturbation draws, from one JAX PRNG key.

`standard_noise(key, shape, distribution)` gives float32 noise of `shape`: N(0, 1) from a counter hash
of the key (`hashed_bits`: uint32 `[n]` words, lowbias32 twice, then the inverse normal CDF,
`_normal_from_bits`), Rademacher ±1 unpacked 32 signs to a threefry word, or `"gaussian_threefry"`
(`jax.random.normal`, kept as the reference); `DISTRIBUTIONS` names them and `resolve_distribution`
turns `"auto"` into the fastest for the backend. A matrix's noise is drawn row by row: row `r` of a
`[rows, *row_shape]` leaf comes from `fold_in(key, r)` (`row_noise` gives rows `[*n, *row_shape]`,
`matrix_noise` one layer's whole leaf), so any block of rows can be regenerated alone and equals the
same rows of the whole draw. Keys stay JAX's typed keys (threefry by default); only the expansion of
one key into at most one row's words uses the hash. No parameters live here: `models.linear` reads
these draws inside the forward (`NoisyLeaf`), `gfo.optim.noise` derives the per-member, per-leaf keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


# The standard noises a perturbation may draw (`standard_noise`); "auto" resolves per backend.
DISTRIBUTIONS = ("gaussian", "rademacher", "auto", "gaussian_threefry")


def resolve_distribution(distribution: str) -> str:
    """`"auto"` as the noise this backend draws fastest — `"rademacher"` on CPU (packed signs cost about
    0.4 of a hashed Gaussian draw there, `benchmarks/results/noise_cost.md`), `"gaussian"` on accelerators
    — resolved when traced; any other name as given. Opt-in: the default everywhere is `"gaussian"`, as
    the published methods use."""
    if distribution == "auto":
        return "rademacher" if jax.default_backend() == "cpu" else "gaussian"
    return distribution


# lowbias32 (C. Wellons' hash prospector): an invertible 32-bit mixer with near-ideal avalanche.
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_GOLDEN = 0x9E3779B9  # odd: `i · _GOLDEN` spreads consecutive counters before the first mix
_OFFSET = 0x5851F42D  # lowbias32 maps 0 to 0: without it the all-zero key (`key(0)`) would start at −5.42


def _mix32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MIX_MULTIPLIERS[1])
    return x ^ (x >> 16)


def hashed_bits(key: jax.Array, n: int) -> jax.Array:
    """`n` random 32-bit words (uint32 `[n]`) expanded from one PRNG key by a counter hash:
    word `i` is `mix(mix(i · φ + k₀ + c) ^ k₁)` with `(k₀, k₁)` the key's first two data words, `mix` the
    lowbias32 integer hash and `c` a constant (so that no common key, such as `key(0)`, is special).

    Keys stay JAX's (threefry by default): every leaf, layer and matrix row of a noise tree has its own
    key derived by `fold_in`, and only the expansion of one key into at most one row's (or one vector
    leaf's) words uses the hash. For a fixed key the words are a permutation of distinct 32-bit values;
    two different keys give unrelated streams unless their `k₁` coincide (probability 2⁻³²) *and* their
    `k₀` differ by a multiple of φ smaller than the row. On CPU this costs about 1/8 of threefry's bits
    (`benchmarks/noise_cost.py`), which is what makes Gaussian full-rank ES and SPSA steps affordable.
    """
    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    counter = jnp.arange(n, dtype=jnp.uint32)
    return _mix32(_mix32(counter * jnp.uint32(_GOLDEN) + words[0] + jnp.uint32(_OFFSET)) ^ words[1])


def _normal_from_bits(bits: jax.Array) -> jax.Array:
    """N(0, 1) float32 from uniform 32-bit words, by inverse CDF like `jax.random.normal`: the top 23 bits
    give `u` uniform on `(-1, 1)` (2²³ levels), and `z = √2 · erfinv(u)` lies in `[−5.42, 5.17]`."""
    unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
    lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    u = jnp.maximum(lowest, unit * 2.0 - 1.0)
    return jnp.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)


def standard_noise(key: jax.Array, shape, distribution: str = "gaussian") -> jax.Array:
    """Float32 standard noise of `shape` from `key`: N(0, 1), Rademacher ±1, or `"auto"`
    (`resolve_distribution`).

    Both draw their random words cheaply, because on CPU generating them dominates a full-rank ES or
    SPSA step: a Gaussian expands `key` with a counter hash (`hashed_bits`, one word per value), and
    Rademacher signs are unpacked 32 to a threefry word (`jax.random.bits`). `"gaussian_threefry"` is the
    Gaussian drawn by `jax.random.normal` itself (threefry for every word, about 4 × the cost), kept as a
    reference.
    """
    distribution = resolve_distribution(distribution)
    n = math.prod(shape)
    if distribution == "gaussian":
        return _normal_from_bits(hashed_bits(key, n)).reshape(shape)
    if distribution == "rademacher":
        words = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
        signs = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
        return (signs.reshape(-1)[:n].astype(jnp.float32) * 2.0 - 1.0).reshape(shape)
    if distribution == "gaussian_threefry":
        return jax.random.normal(key, shape, jnp.float32)
    raise ValueError(f"noise distribution {distribution!r}: expected one of {DISTRIBUTIONS}")


def row_noise(key: jax.Array, rows: jax.Array, row_shape, distribution: str = "gaussian") -> jax.Array:
    """Rows `rows [*n]` (int) of a noise matrix whose row `r` is drawn from `fold_in(key, r)`: float32
    `[*n, *row_shape]`."""
    draw = lambda r: standard_noise(jax.random.fold_in(key, r), row_shape, distribution)  # noqa: E731
    flat = jax.vmap(draw)(jnp.reshape(rows, (-1,)).astype(jnp.uint32))
    return flat.reshape(jnp.shape(rows) + tuple(row_shape))


def matrix_noise(key: jax.Array, shape, distribution: str = "gaussian") -> jax.Array:
    """Float32 standard noise of one layer's leaf: row by row for two or more axes (`row_noise`, so any
    block of rows can be regenerated alone at the same cost), in one draw for a vector or scalar."""
    shape = tuple(shape)
    if len(shape) < 2:
        return standard_noise(key, shape, distribution)
    return row_noise(key, jnp.arange(shape[0], dtype=jnp.uint32), shape[1:], distribution)
