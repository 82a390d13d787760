"""The one linear primitive every matmul of the models goes through.

A kernel is either a dense array `W: [d_in, d_out]` or a `LowRankKernel` meaning `W + scale · A Bᵀ`
with `A: [d_in, r]`, `B: [d_out, r]` (or a `NoisyLeaf`, `W + scale · ε(key)`, drawn where it is read).
Descriptors may carry leading "layer" axes on every leaf (the stacked layer layout: `w [L, d_in, d_out]`,
`a [L, d_in, r]`, `b [L, d_out, r]`, `scale [L]`); the decoder's scan slices them one layer at a time,
so `linear` itself sees 2-D kernels. The low-rank form is applied as `x@W + scale·(x@A)@Bᵀ`, never
forming the sum: under `vmap` over a population whose members differ only in `(A, B)` while `W` is
shared (`in_axes=None`), `x@W` is one large matmul over all members, and each member adds an
`O(r·(d_in + d_out))` correction. This is what lets low-rank evolution strategies (EGGROLL) and LoRA run
at inference speed through the same code.
"""

from __future__ import annotations

import math
from typing import Union

import jax
import jax.numpy as jnp
from flax import struct


class _OverBase:
    """Shape, dtype and rank of a perturbation descriptor: those of its base parameter `w`."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return self.w.ndim


@struct.dataclass
class LowRankKernel(_OverBase):
    """`w + scale · a @ b.T` kept factored.

    Attributes:
      w: [*lead, d_in, d_out] base kernel (shared across a population).
      a: [*lead, d_in, r] left factor.
      b: [*lead, d_out, r] right factor.
      scale: multiplier of shape `lead` or a scalar (e.g. σ/√r for EGGROLL, α/r for LoRA).

    `lead` is `()` for a plain kernel and `(L,)` for a kernel of the stacked `layers` subtree, where every
    leaf, `scale` included, must carry the layer axis (the decoder's scan slices each leaf along it).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: jax.Array | float = 1.0


    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def dense(self) -> jax.Array:
        """The materialised `[*lead, d_in, d_out]` kernel (for tests and export, not for the hot path)."""
        delta = jnp.einsum("...ir,...or->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        scale = jnp.asarray(self.scale, jnp.float32)
        scale = scale.reshape(scale.shape + (1, 1)) if scale.ndim else scale
        return (self.w.astype(jnp.float32) + scale * delta).astype(self.w.dtype)

    def transpose(self) -> "LowRankKernel":
        """`(W + s A Bᵀ)ᵀ = Wᵀ + s B Aᵀ` (the last two axes of `w` swapped; leading axes kept)."""
        return LowRankKernel(jnp.swapaxes(self.w, -1, -2), self.b, self.a, self.scale)


@struct.dataclass
class NoisyLeaf(_OverBase):
    """`w + scale · ε(key)`: a parameter perturbed by noise that is generated where the model reads it.

    A population member's full-rank perturbation travels to the model as this descriptor, and the noise
    is drawn inside the layer that uses the leaf (`materialize`), so no perturbed copy of the whole
    parameter tree ever exists. Leading "layer" axes are allowed: with `lead = key.shape`,

    Attributes:
      w: [*lead, *shape] base parameter (shared across a population).
      key: typed PRNG key array of shape `lead` (`()` for an unstacked leaf, `[L]` for a stacked one);
        the noise of layer `l` is `sample(key[l], shape)`, so slicing the descriptor along the layer
        axis (as `lax.scan` over layers does) gives the noise of that layer.
      scale: float32 `[*lead]` multiplier (a member's `sign · σ`).
      distribution: "gaussian" (N(0, 1)) or "rademacher" (±1), drawn in float32.
    """

    w: jax.Array
    key: jax.Array
    scale: jax.Array
    distribution: str = struct.field(pytree_node=False, default="gaussian")



    def noise(self) -> jax.Array:
        """ε, float32 of `w`'s shape."""
        lead = jnp.shape(self.key)
        shape = self.w.shape[len(lead):]
        draw = lambda k: standard_noise(k, shape, self.distribution)  # noqa: E731
        for _ in lead:
            draw = jax.vmap(draw)
        return draw(self.key)

    def dense(self) -> jax.Array:
        lead = jnp.shape(self.key)
        scale = jnp.asarray(self.scale, jnp.float32).reshape(lead + (1,) * (self.w.ndim - len(lead)))
        return (self.w.astype(jnp.float32) + scale * self.noise()).astype(self.w.dtype)


def standard_noise(key: jax.Array, shape, distribution: str = "gaussian") -> jax.Array:
    """Float32 standard noise of `shape` from `key`: N(0, 1), or Rademacher ±1.

    Rademacher signs are unpacked 32 to a random word (`jax.random.bits`), so they cost 1/32 of the
    random bits of a Gaussian draw: on CPU, where counter-based generation dominates a full-rank ES or
    SPSA step, drawing ±1 noise is about as cheap as one pass over the weights
    (`benchmarks/noise_cost.py`).
    """
    if distribution == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    if distribution == "rademacher":
        n = math.prod(shape)
        words = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
        signs = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
        return (signs.reshape(-1)[:n].astype(jnp.float32) * 2.0 - 1.0).reshape(shape)
    raise ValueError(f"noise distribution {distribution!r}: expected 'gaussian' or 'rademacher'")


def materialize(p):
    """A parameter as a plain array: dense for `LowRankKernel` and `NoisyLeaf`, `p` itself otherwise.

    Every parameter the model reads that is not a matmul kernel (norm scales, biases, embeddings read
    densely) goes through this, so any leaf of the tree may be a perturbation descriptor.
    """
    return p.dense() if isinstance(p, (LowRankKernel, NoisyLeaf)) else p


Kernel = Union[jax.Array, LowRankKernel, NoisyLeaf]


def linear(x: jax.Array, kernel: Kernel, bias: jax.Array | None = None, dtype=None) -> jax.Array:
    """`x @ kernel (+ bias)` for `x: [..., d_in]`, returning `[..., d_out]` in `dtype` (default x's)."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    if isinstance(kernel, NoisyLeaf):
        kernel = kernel.dense()
    if bias is not None:
        bias = materialize(bias)
    if isinstance(kernel, LowRankKernel):
        y = x @ kernel.w.astype(dtype)
        correction = (x @ kernel.a.astype(dtype)) @ kernel.b.astype(dtype).T
        y = y + jnp.asarray(kernel.scale, dtype) * correction
    else:
        y = x @ kernel.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + bias.shape)
    return y


def embed_lookup(table: Kernel, ids: jax.Array, dtype) -> jax.Array:
    """Rows `table[ids]` for `table: [vocab, d]`, `ids: [...]` → `[..., d]`, low-rank aware."""
    if isinstance(table, NoisyLeaf):
        table = table.dense()
    if isinstance(table, LowRankKernel):
        rows = table.w[ids].astype(dtype)
        return rows + jnp.asarray(table.scale, dtype) * (table.a[ids].astype(dtype) @ table.b.astype(dtype).T)
    return table[ids].astype(dtype)


def transpose(kernel: Kernel) -> Kernel:
    if isinstance(kernel, NoisyLeaf):
        kernel = kernel.dense()
    return kernel.transpose() if isinstance(kernel, LowRankKernel) else jnp.swapaxes(kernel, -1, -2)
