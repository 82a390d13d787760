"""Log-probabilities of given tokens without the `[B, T, vocab]` logits.

A next-token loss needs, per position, the target's logit and the log-sum-exp over the vocabulary.
`token_logprobs` computes both a block of vocabulary columns at a time (an online log-sum-exp), so the
largest activation is `[B, T, block]` rather than `[B, T, V]`: at GPT-2's 50k vocabulary and 256 tokens
the full float32 logits of one population member are 51 MB, as much as 10% of the parameters. Any kernel
the models use can be the head: a plain `[D, V]` array, a `LowRankKernel` (LoRA, EGGROLL) or a `NoisyLeaf`
read as the tied embedding's transpose, whose noise rows are exactly the vocabulary block's
(`models.noise.row_noise`); a head whose block cannot be cut alone (an untied `NoisyLeaf` keyed by its
input rows) falls back to the full logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.linear import Kernel, LowRankKernel, NoisyLeaf, linear, row_blocks, transpose

VOCAB_BLOCK = 8192  # vocabulary columns per block


def vocab_block(head: Kernel, start: jax.Array, width: int, tied: bool) -> Kernel | None:
    """Vocabulary entries `start ... start + width − 1` of the head as a `[D, width]` kernel, or None when
    they cannot be cut alone. `tied`: `head` is the embedding table `[V, D]` (its rows are cut, so the
    table is never transposed whole); else the head kernel `[D, V]` (its columns are cut)."""
    cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, width, axis=axis)  # noqa: E731
    if isinstance(head, LowRankKernel):  # w + s a bᵀ
        if tied:  # rows of w and a: the block of the table, then transposed
            return LowRankKernel(cut(head.w, 0), cut(head.a, 0), head.b, head.scale).transpose()
        return LowRankKernel(cut(head.w, -1), head.a, cut(head.b, 0), head.scale)
    if isinstance(head, NoisyLeaf):  # only a table keyed by its (vocabulary) rows can be cut
        if not (tied and head.reads_rows()):
            return None
        return head.rows(start + jnp.arange(width, dtype=jnp.int32), cut(head.w, 0)).T
    return cut(head, 0).T if tied else cut(head, -1)


def token_logprobs(hidden: jax.Array, head: Kernel, targets: jax.Array, dtype, cap: float | None = None,
                   block: int | None = None, tied: bool = False) -> jax.Array:
    """`log softmax(hidden @ head)[..., targets]`: float32 `[B, T]` for `hidden [B, T, D]`, a head kernel
    `[D, V]` (or, `tied`, the embedding table `[V, D]` whose transpose is the head) and `targets [B, T]`
    int, computed a block of `block` (default `VOCAB_BLOCK`) vocabulary entries at a time; `cap` soft-caps
    the logits (`cap · tanh(logit / cap)`) first, as the model does."""
    vocab = head.shape[0] if tied else head.shape[-1]
    width = min(vocab, VOCAB_BLOCK if block is None else int(block))
    if isinstance(head, NoisyLeaf) and block is None:  # a block's noise: at most NOISE_BLOCK_ELEMENTS
        width = min(width, row_blocks(vocab, head.shape[-1])[0])
    n_blocks = -(-vocab // width)

    def finish(logits):
        logits = logits.astype(jnp.float32)
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    if vocab_block(head, jnp.int32(0), width, tied) is None:  # the full logits
        logits = finish(linear(hidden, transpose(head) if tied else head, dtype=dtype))
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]

    def add_block(b, carry):
        top, total, target = carry
        start = jnp.minimum(b * width, vocab - width)  # the last block ends at the last column (it may overlap)
        cols = start + jnp.arange(width, dtype=jnp.int32)
        logits = finish(linear(hidden, vocab_block(head, start, width, tied), dtype=dtype))  # [B, T, width]
        logits = jnp.where(cols >= b * width, logits, -jnp.inf)  # columns of an earlier block count once
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[..., None]), axis=-1)
        inside = (targets >= start) & (targets < start + width)
        picked = jnp.take_along_axis(logits, jnp.clip(targets - start, 0, width - 1)[..., None], axis=-1)[..., 0]
        target = jnp.where(inside & (targets >= b * width), picked, target)
        return new_top, total, target

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    top, total, target = jax.lax.fori_loop(0, n_blocks, add_block, init)
    return target - (top + jnp.log(total))
