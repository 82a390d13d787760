"""The one linear primitive every matmul of the models goes through.

A kernel is either a dense array `W: [d_in, d_out]` or a `LowRankKernel` meaning `W + scale · A Bᵀ`
with `A: [d_in, r]`, `B: [d_out, r]`. The low-rank form is applied as `x@W + scale·(x@A)@Bᵀ`, never
forming the sum: under `vmap` over a population whose members differ only in `(A, B)` while `W` is
shared (`in_axes=None`), `x@W` is one large matmul over all members, and each member adds an
`O(r·(d_in + d_out))` correction. This is what lets low-rank evolution strategies (EGGROLL) and LoRA run
at inference speed through the same code.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LowRankKernel:
    """`w + scale · a @ b.T` kept factored.

    Attributes:
      w: [d_in, d_out] base kernel (shared across a population).
      a: [d_in, r] left factor.
      b: [d_out, r] right factor.
      scale: scalar multiplier (e.g. σ/√r for EGGROLL, α/r for LoRA).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: jax.Array | float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def dense(self) -> jax.Array:
        """The materialised `[d_in, d_out]` kernel (for tests and export, not for the hot path)."""
        delta = jnp.einsum("ir,or->io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.w.astype(jnp.float32) + self.scale * delta).astype(self.w.dtype)

    def transpose(self) -> "LowRankKernel":
        """`(W + s A Bᵀ)ᵀ = Wᵀ + s B Aᵀ`."""
        return LowRankKernel(self.w.T, self.b, self.a, self.scale)


Kernel = Union[jax.Array, LowRankKernel]


def linear(x: jax.Array, kernel: Kernel, bias: jax.Array | None = None, dtype=None) -> jax.Array:
    """`x @ kernel (+ bias)` for `x: [..., d_in]`, returning `[..., d_out]` in `dtype` (default x's)."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
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
    if isinstance(table, LowRankKernel):
        rows = table.w[ids].astype(dtype)
        return rows + jnp.asarray(table.scale, dtype) * (table.a[ids].astype(dtype) @ table.b.astype(dtype).T)
    return table[ids].astype(dtype)


def transpose(kernel: Kernel) -> Kernel:
    return kernel.transpose() if isinstance(kernel, LowRankKernel) else kernel.T
