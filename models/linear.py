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

A `NoisyLeaf` is read the same way without ever forming `W + scale · ε` for a large matrix: an embedding
lookup draws only the rows it reads, and `linear` multiplies one block of at most `NOISE_BLOCK_ELEMENTS`
rows at a time (`noisy_linear`; `row_blocks` cuts the blocks). The noise itself, float32 from a key
(`standard_noise`, `row_noise`, `matrix_noise`, `DISTRIBUTIONS`), is drawn by `models.noise`; this module
only decides which rows to draw and where they are added.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from flax import struct

from models.noise import matrix_noise, row_noise


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
    """`w + scale · ε(key)` (`⊙ mul ** mul_power` with a multiplier): a parameter perturbed by noise
    that is generated where the model reads it.

    A population member's full-rank perturbation travels to the model as this descriptor, and the noise
    is drawn inside the layer that uses the leaf, so no perturbed copy of the whole parameter tree ever
    exists. Leading "layer" axes are allowed: with `lead = key.shape`,

    Attributes:
      w: [*lead, *shape] base parameter (shared across a population).
      key: typed PRNG key array of shape `lead` (`()` for an unstacked leaf, `[L]` for a stacked one);
        the noise of layer `l` is `matrix_noise(key[l], shape)` (row `r` of a matrix from
        `fold_in(key[l], r)`), so slicing the descriptor along the layer axis (as `lax.scan` over layers
        does) gives the noise of that layer, and any block of rows can be drawn alone.
      scale: float32 `[*lead]` multiplier (a member's `sign · σ`).
      distribution: one of `models.noise.DISTRIBUTIONS` (`models.noise.standard_noise`), drawn in float32.
      transposed: `w` is the transpose of the leaf the noise was keyed for (a tied embedding read as the
        output head): the noise rows are `w`'s columns.
      mul: None (every plain perturbation), or an array shaped like `w` (its layer axes included, so the
        scan slices it with `w`): the perturbed leaf is then `w + scale · ε ⊙ mul ** mul_power`, the
        multiplier read with `w` wherever the noise is added (a dense leaf, the rows an embedding lookup
        reads, a block of `noisy_linear`, a tied head's vocabulary block). HiZOO passes its Hessian
        estimate `h` with `mul_power = −½`: `Σ^{1/2} z`, `Σ = h⁻¹`, formed where the leaf is read, so
        neither `h^{-1/2}` nor the perturbed point exists as a tree.
      mul_power: the power the multiplier is read with (1 or −½, `lax.rsqrt`; any other float works).

    Readers never build `w + scale · ε` whole for a large matrix: an embedding lookup draws the rows it
    reads (`embed_lookup`), and `linear` multiplies by `w + scale · ε` one block of at most
    `NOISE_BLOCK_ELEMENTS` rows at a time (`noisy_linear`); smaller leaves are materialised (`dense`).
    """

    w: jax.Array
    key: jax.Array
    scale: jax.Array
    distribution: str = struct.field(pytree_node=False, default="gaussian")
    transposed: bool = struct.field(pytree_node=False, default=False)
    mul: jax.Array | None = None
    mul_power: float = struct.field(pytree_node=False, default=1.0)

    def multiplier(self, mul: jax.Array | None = None) -> jax.Array | None:
        """The noise's elementwise multiplier `mul ** mul_power` in float32 (of `self.mul`, or of the
        slice `mul` of it a reader cut), or None without one."""
        m = self.mul if mul is None else mul
        if m is None:
            return None
        m = jnp.asarray(m).astype(jnp.float32)
        if self.mul_power == 1.0:
            return m
        if self.mul_power == -0.5:
            return jax.lax.rsqrt(m)
        return m ** jnp.float32(self.mul_power)

    def scaled_noise(self, eps: jax.Array, mul: jax.Array | None = None) -> jax.Array:
        """`eps ⊙ mul ** mul_power` for noise `eps` (float32) read with the matching slice `mul` of `self.mul`
        (the whole of it when None); `eps` itself without a multiplier."""
        m = self.multiplier(mul)
        return eps if m is None else eps * m

    def noise_shape(self) -> tuple[int, ...]:
        """One layer's shape in the orientation the noise is keyed in (rows first)."""
        shape = self.w.shape[jnp.ndim(self.key):]
        return shape[:-2] + (shape[-1], shape[-2]) if self.transposed else shape

    def noise(self) -> jax.Array:
        """ε, float32 of `w`'s shape."""
        draw = lambda k: matrix_noise(k, self.noise_shape(), self.distribution)  # noqa: E731
        for _ in jnp.shape(self.key):
            draw = jax.vmap(draw)
        eps = draw(self.key)
        return jnp.swapaxes(eps, -1, -2) if self.transposed else eps

    def dense(self) -> jax.Array:
        lead = jnp.shape(self.key)
        scale = jnp.asarray(self.scale, jnp.float32).reshape(lead + (1,) * (self.w.ndim - len(lead)))
        return (self.w.astype(jnp.float32) + scale * self.scaled_noise(self.noise())).astype(self.w.dtype)

    def transpose(self) -> "NoisyLeaf":
        """The same perturbed matrix transposed (last two axes), noise (and multiplier) unchanged."""
        mul = None if self.mul is None else jnp.swapaxes(self.mul, -1, -2)
        return NoisyLeaf(jnp.swapaxes(self.w, -1, -2), self.key, self.scale, self.distribution, not self.transposed,
                         mul, self.mul_power)

    def reads_rows(self) -> bool:
        """Whether rows of the perturbed matrix can be drawn alone (`rows`): one unstacked, untransposed
        matrix, whose noise row `r` is drawn from `fold_in(key, r)`."""
        return jnp.ndim(self.key) == 0 and self.w.ndim == 2 and not self.transposed

    def rows(self, ids: jax.Array, base: jax.Array | None = None) -> jax.Array:
        """Rows `ids [...]` of `w + scale · ε` in `w`'s dtype (`[..., d]`), drawing only those rows of the
        noise (`reads_rows` must hold); `base` is `w[ids]` when the caller already has it (a slice)."""
        base = self.w[ids] if base is None else base
        noise = row_noise(self.key, ids, self.w.shape[1:], self.distribution)
        if self.mul is not None:
            noise = self.scaled_noise(noise, self.mul[ids])
        return (base.astype(jnp.float32) + jnp.asarray(self.scale, jnp.float32) * noise).astype(self.w.dtype)

    def is_blocked(self) -> bool:
        """Whether readers draw this leaf's noise in row blocks rather than materialising it: one
        unstacked matrix of more than `NOISE_BLOCK_ELEMENTS` elements."""
        return jnp.ndim(self.key) == 0 and self.w.ndim == 2 and self.w.size > NOISE_BLOCK_ELEMENTS


# The most noise drawn at once for one matrix (16 MiB of float32): a larger matrix's noise is drawn in
# blocks of rows, both inside the forward (`noisy_linear`) and where an update regenerates it.
NOISE_BLOCK_ELEMENTS = 1 << 22


def noise_block_elements() -> int:
    """The current `NOISE_BLOCK_ELEMENTS` (read at trace time, so tests may lower it)."""
    return NOISE_BLOCK_ELEMENTS


def row_blocks(n_rows: int, row_size: int, block_elements: int | None = None) -> tuple[int, int]:
    """`(rows per block, number of blocks)` covering `n_rows` rows of `row_size` elements with at most
    `block_elements` (default `NOISE_BLOCK_ELEMENTS`) elements per block (at least one row)."""
    limit = NOISE_BLOCK_ELEMENTS if block_elements is None else block_elements
    per = max(1, min(n_rows, limit // max(row_size, 1)))
    return per, -(-n_rows // per)


def noisy_linear(x: jax.Array, kernel: NoisyLeaf, dtype, block_elements: int | None = None) -> jax.Array:
    """`x @ (w + scale · ε)` for a 2-D `NoisyLeaf` without forming the whole perturbed matrix: a block of
    rows of `ε` is drawn at a time, added to the same rows of `w` and multiplied in, so the product costs
    one matmul (not `x @ w` plus `x @ ε`). The rows are `w`'s input axis (the blocks' products are summed
    in float32) or, `transposed`, its output axis (each block gives `per` columns of the output: a block of
    the vocabulary's logits for a tied head). A partial last block overlaps the one before it: an input
    block counts only its new rows; an output block rewrites its overlapping columns with the same values.
    The perturbed block is rounded to `w`'s dtype as `NoisyLeaf.dense` does. Memory: one block of noise
    and one perturbed block per (vmapped) member."""
    rows, cols = kernel.noise_shape()
    per, n_blocks = row_blocks(rows, cols, block_elements)
    scale = jnp.asarray(kernel.scale, jnp.float32)
    axis = 1 if kernel.transposed else 0  # the axis of `w` that the noise rows run along

    def perturbed_block(b):  # rows start ... start + per − 1; the last block ends at the last row (it may overlap)
        start = jnp.minimum(b * per, rows - per)
        ids = start + jnp.arange(per, dtype=jnp.int32)
        eps = row_noise(kernel.key, ids, (cols,), kernel.distribution)  # [per, cols], float32
        eps = eps.T if kernel.transposed else eps
        if kernel.mul is not None:  # the multiplier's block, cut like w's
            eps = kernel.scaled_noise(eps, jax.lax.dynamic_slice_in_dim(kernel.mul, start, per, axis=axis))
        w_b = jax.lax.dynamic_slice_in_dim(kernel.w, start, per, axis=axis).astype(jnp.float32)
        w_b = w_b + scale * eps
        return start, ids >= b * per, w_b.astype(kernel.w.dtype).astype(dtype)

    if kernel.transposed:  # x [..., cols] @ (w + ε)ᵀ-block: `per` output columns per block, written in place
        def write_block(b, y):
            start, _, w_b = perturbed_block(b)
            return jax.lax.dynamic_update_slice_in_dim(y, x @ w_b, start, axis=-1)

        return jax.lax.fori_loop(0, n_blocks, write_block, jnp.zeros(x.shape[:-1] + (rows,), dtype))

    def add_rows(b, acc):  # x [..., rows] @ (w + ε): each block contracts `per` input features
        start, fresh, w_b = perturbed_block(b)
        xb = jnp.where(fresh, jax.lax.dynamic_slice_in_dim(x, start, per, axis=-1), 0)
        return acc + (xb @ w_b).astype(jnp.float32)

    return jax.lax.fori_loop(0, n_blocks, add_rows, jnp.zeros(x.shape[:-1] + (cols,), jnp.float32)).astype(dtype)


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
    if bias is not None:
        bias = materialize(bias)
    if isinstance(kernel, NoisyLeaf) and kernel.is_blocked():
        y = noisy_linear(x, kernel, dtype)
    else:
        if isinstance(kernel, NoisyLeaf):
            kernel = kernel.dense()
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
    if isinstance(table, NoisyLeaf) and table.reads_rows():  # only the rows read
        return table.rows(ids).astype(dtype)
    if isinstance(table, NoisyLeaf):
        table = table.dense()
    if isinstance(table, LowRankKernel):
        rows = table.w[ids].astype(dtype)
        return rows + jnp.asarray(table.scale, dtype) * (table.a[ids].astype(dtype) @ table.b.astype(dtype).T)
    return table[ids].astype(dtype)


def transpose(kernel: Kernel) -> Kernel:
    """The transpose (last two axes) of a kernel; descriptors stay descriptors."""
    return kernel.transpose() if isinstance(kernel, (LowRankKernel, NoisyLeaf)) else jnp.swapaxes(kernel, -1, -2)
