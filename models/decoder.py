"""The decoder-only Transformer LM and its pure functional boundary.

    model = TransformerLM(config)
    params = model.init(key)                       # plain nested dict of arrays
    logits = model.apply(params, tokens)           # [B, T, vocab] float32

`params` is a plain pytree, so a population of parameter sets is a batch of pytrees under `vmap`, and
any kernel leaf may be replaced by a `LowRankKernel` (LoRA, EGGROLL perturbations).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig
from models.layers import MLP, Attention, Norm, softcap
from models.linear import embed_lookup, linear, transpose
from models.linear import LowRankKernel, NoisyLeaf
from models.tree import LAYERS, old_layer_keys


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots, filled left to right.

    Attributes:
      k, v: [L, B, S, K, E], stacked over the layers (scanned through them with the parameters).
      valid: [B, S] bool, slots holding a real (non-padding) token.
      index: int32 scalar, the next free slot (shared by the batch: prompts are left-padded).
      next_position: [B] int32, the position id the next real token of each row gets.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array

    @property
    def size(self) -> int:
        return self.valid.shape[1]


class Block(nn.Module):
    """Pre-norm residual block; with `post_norms` (Gemma 3) each branch output is normalised too.

    Written as a scan body: the carry is `x: [B, T, D]`; `layer = (sliding, kv)` are this layer's
    scanned inputs (a bool scalar, and `None` or its cache `(k, v)` `[B, S, K, E]`, of which attention reads
    the first `R` slots); `context = (positions, q_slots, valid, old)` is shared by every layer (`old`: `None`
    without a cache, else the cached slots `[R]` and their validity `[B, R]`, `R` possibly 0). Returns
    `(x, kv)`: with a cache, this call's keys and values `[B, T, K, E]` (stacked by the scan into
    `[L, B, T, K, E]`, written into the cache by the caller), else `None`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer, context):
        cfg = self.config
        sliding, kv = layer
        positions, q_slots, valid, old = context
        R = None if old is None else old[0].shape[0]
        cached = None if old is None or kv is None else (kv[0][:, :R], kv[1][:, :R], old[0], old[1])
        h, new_kv = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions, q_slots, valid, sliding, cached)
        if cfg.post_norms:
            h = Norm(cfg, name="attn_post_norm")(h)
        x = x + h
        h = MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        if cfg.post_norms:
            h = Norm(cfg, name="mlp_post_norm")(h)
        return x + h, (None if old is None else new_kv)


def scanned_blocks(config: ModelConfig):
    """The `Block` scanned over `config.n_layers` layers: parameters stacked under one `LAYERS` subtree
    (a leading `[L]` axis on every leaf, one independent initialisation per layer), traced once whatever
    the depth; with `config.remat` each block is recomputed in the backward pass."""
    block = nn.remat(Block, prevent_cse=False) if config.remat else Block
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast), length=config.n_layers)(config, name=LAYERS)


class Decoder(nn.Module):
    """Token (+ soft-prompt) embeddings → blocks (one scan) → final norm → logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, prompt=None, cache=None, one_hot=None,
                 last_only=False, hidden_only=False, read=None):
        cfg = self.config
        B, T = tokens.shape
        emb = self.param("embed", nn.initializers.normal(cfg.initializer_range),
                         (cfg.vocab_size, cfg.d_model), cfg.storage_dtype)
        if one_hot is None:
            x = embed_lookup(emb, tokens, cfg.compute_dtype)
        else:  # a relaxed (soft) token distribution [B, T, vocab]: differentiable in the tokens
            x = linear(one_hot, emb, dtype=cfg.compute_dtype)
        if cfg.scale_embeddings:  # Gemma: the scale is rounded to the dtype first, as in its reference
            x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.compute_dtype)
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        n_prompt = 0
        if prompt is not None:  # soft prompt: [n, D] or [B, n, D], prepended, always attended
            prompt = jnp.broadcast_to(prompt, (B,) + prompt.shape[-2:]).astype(cfg.compute_dtype)
            n_prompt = prompt.shape[1]
            x = jnp.concatenate([prompt, x], axis=1)
            mask = jnp.concatenate([jnp.ones((B, n_prompt), bool), mask], axis=1)
        L = x.shape[1]
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.next_position
        if positions is None:
            positions = start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        elif n_prompt:
            positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(n_prompt), (B, n_prompt)), positions + n_prompt], axis=1)
        if not cfg.uses_rope:
            pos_table = self.param("pos_embed", nn.initializers.normal(cfg.initializer_range),
                                   (cfg.max_seq_len + cfg.position_offset, cfg.d_model), cfg.storage_dtype)
            x = x + embed_lookup(pos_table, positions + cfg.position_offset, cfg.compute_dtype)

        q_slots = jnp.arange(L) if cache is None else cache.index + jnp.arange(L)
        kv, old = None, None
        if cache is not None:  # attention reads the first `read` slots (the filled part) plus this call's keys
            R = cache.size if read is None else min(int(read), cache.size)
            old = (jnp.arange(R), cache.valid[:, :R])
            kv = (cache.k, cache.v) if R else None  # each layer slices its first R slots (`Block`)
        sliding = jnp.asarray([cfg.is_sliding(i) for i in range(cfg.n_layers)])
        x, new_kv = scanned_blocks(cfg)(x, (sliding, kv), (positions, q_slots, mask, old))
        x = Norm(cfg, name="final_norm")(x)[:, n_prompt:]
        if last_only:  # generation's prefill needs the next-token logits only: [B, 1, V], not [B, T, V]
            x = x[:, -1:]
        if hidden_only:  # the final hidden states [B, T, D]: the caller applies the head (models.head)
            return x, None
        if cfg.tie_embeddings:
            logits = linear(x, transpose(emb), dtype=cfg.compute_dtype)
        else:
            head = self.param("lm_head", nn.initializers.normal(cfg.initializer_range),
                              (cfg.d_model, cfg.vocab_size), cfg.storage_dtype)
            logits = linear(x, head, dtype=cfg.compute_dtype)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            logits = softcap(logits, cfg.final_logit_softcap)
        if cache is None:
            return logits, None
        # Only this call's keys and values are written (in place when the cache is a loop carry or donated).
        at = (0, 0, cache.index, 0, 0)
        new_cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, new_kv[0].astype(cache.k.dtype), at),
                            v=jax.lax.dynamic_update_slice(cache.v, new_kv[1].astype(cache.v.dtype), at),
                            valid=jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index)),
                            index=cache.index + L,
                            next_position=cache.next_position + jnp.sum(mask, axis=1, dtype=jnp.int32))
        return logits, new_cache


class TransformerLM:
    """A decoder LM with a pure functional boundary over a plain parameter pytree.

    Methods are pure functions of `params`, jitted (and inlined when called under an outer
    `jit`/`vmap`). Two models with equal configs are equal and hash alike, so a model can be a static
    argument of `jax.jit` without recompiling for every instance.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.module = Decoder(config)
        self._apply = jax.jit(self.module.apply, static_argnames=("last_only", "hidden_only", "read"))
        self._token_logprobs = jax.jit(self._blocked_logprobs, static_argnames=("block", "last"))

    def __repr__(self) -> str:
        return f"TransformerLM({self.config})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TransformerLM) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config)

    def init(self, key: jax.Array) -> dict:
        """Random parameters (normal(initializer_range) kernels, GPT-2-scaled residual projections)."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        return jax.jit(self.module.init)(key, tokens)["params"]

    def apply(self, params, tokens: jax.Array, attention_mask: jax.Array | None = None,
              positions: jax.Array | None = None, prompt: jax.Array | None = None) -> jax.Array:
        """Logits `[B, T, vocab]` float32 for `tokens: [B, T]` int.

        Args:
          attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right).
          positions: [B, T] position ids; default counts real tokens, so left padding is harmless.
          prompt: soft prompt `[n, D]` or `[B, n, D]` prepended to the token embeddings; the logits
            returned are those of `tokens` only. A `"soft_prompt"` entry of `params` is used the
            same way (so a prompt-tuning search space can return it as part of the parameters).
        """
        params, prompt = _split_soft_prompt(params, prompt)
        params = check_layout(params, self.config.n_layers)
        logits, _ = self._apply({"params": params}, tokens, attention_mask, positions, prompt)
        return logits

    def token_logprobs(self, params, tokens: jax.Array, targets: jax.Array, attention_mask: jax.Array | None = None,
                       prompt: jax.Array | None = None, block: int | None = None, last: int | None = None) -> jax.Array:
        """`log p(targets[b, t] | tokens[b, :t + 1])`: float32 `[B, T]`, equal to `log_softmax(apply(...))`
        at `targets`, without the `[B, T, vocab]` logits: the head is applied `block` vocabulary columns at a
        time (`models.head.token_logprobs`, default `models.head.VOCAB_BLOCK`). A next-token loss is
        `-model.token_logprobs(params, seq[:, :-1], seq[:, 1:]).mean()`. With `last`, only the last `last`
        positions go through the head: `targets` is `[B, last]` and so is the result (a completion's
        log-probabilities after a prompt)."""
        params, prompt = _split_soft_prompt(params, prompt)
        params = check_layout(params, self.config.n_layers)
        expected = jnp.shape(tokens) if last is None else (jnp.shape(tokens)[0], last)
        if last is not None and not 1 <= last <= jnp.shape(tokens)[1]:
            raise ValueError(f"token_logprobs: last={last} must be in [1, {jnp.shape(tokens)[1]}] (the tokens' length)")
        if jnp.shape(targets) != expected:
            raise ValueError(f"token_logprobs: targets {jnp.shape(targets)} must have shape {expected} (one target "
                             f"per {'position' if last is None else 'one of the last positions'})")
        return self._token_logprobs(params, tokens, targets, attention_mask, prompt, block=block, last=last)

    def _blocked_logprobs(self, params, tokens, targets, attention_mask, prompt, block, last):
        from models.head import token_logprobs

        cfg = self.config
        hidden, _ = self.module.apply({"params": params}, tokens, attention_mask, None, prompt, hidden_only=True)
        if last is not None:
            hidden = hidden[:, -last:]
        head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
        return token_logprobs(hidden, head, targets, cfg.compute_dtype, cfg.final_logit_softcap, block,
                              tied=cfg.tie_embeddings)

    def apply_one_hot(self, params, one_hot: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits `[B, T, V]` for a relaxed input `one_hot: [B, T, V]` (rows of token probabilities), whose
        embedding is `one_hot @ embed`; with exact one-hot rows it equals `apply` on their arg-max tokens."""
        params, prompt = _split_soft_prompt(params, None)
        params = check_layout(params, self.config.n_layers)
        tokens = jnp.zeros(one_hot.shape[:2], jnp.int32)
        logits, _ = self._apply({"params": params}, tokens, attention_mask, None, prompt, None, one_hot)
        return logits

    def init_cache(self, batch_size: int, size: int, dtype=None) -> KVCache:
        """An empty cache of `size` slots per row (prompt + soft prompt + generated tokens)."""
        cfg = self.config
        if not cfg.uses_rope and size > cfg.max_seq_len:
            raise ValueError(f"cache size {size} exceeds max_seq_len={cfg.max_seq_len} of this model's "
                             "learned position table")
        shape = (batch_size, size, cfg.kv_heads, cfg.dim_per_head)
        dtype = dtype or cfg.compute_dtype
        zeros = jnp.zeros((cfg.n_layers,) + shape, dtype)
        return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch_size, size), bool),
                       index=jnp.array(0, jnp.int32), next_position=jnp.zeros((batch_size,), jnp.int32))

    def apply_with_cache(self, params, tokens: jax.Array, cache: KVCache,
                         attention_mask: jax.Array | None = None,
                         prompt: jax.Array | None = None, last_only: bool = False,
                         read: int | None = None) -> tuple[jax.Array, KVCache]:
        """Run `tokens: [B, T]` after what `cache` holds; returns `(logits [B, T, V], cache)` (`[B, 1, V]`,
        the last position's, with `last_only`). `read` (a static int, default the whole cache): attention
        reads only the first `read` slots of the cache, which must hold every filled one (`cache.index <=
        read`); slots past `cache.index` are never attended either way, so the result does not depend on it
        (generation reads the filled part, in buckets: `models.generate`)."""
        params, prompt = _split_soft_prompt(params, prompt)
        params = check_layout(params, self.config.n_layers)
        return self._apply({"params": params}, tokens, attention_mask, None, prompt, cache, None,
                           last_only=last_only, read=read)

    def num_params(self, params) -> int:
        return sum(x.size for x in jax.tree.leaves(params))


def _split_soft_prompt(params: dict, prompt):
    if isinstance(params, dict) and "soft_prompt" in params:
        if prompt is not None:
            raise ValueError("a soft prompt was given both as params['soft_prompt'] and as prompt=")
        params = dict(params)
        prompt = params.pop("soft_prompt")
    return params, prompt


def check_layout(params, n_layers: int):
    """`params` ready for the scanned decoder.

    Refuses the old per-layer layout (`layers_0`, ...) and stacked leaves whose layer axis is not
    `n_layers` long, naming them. A `LowRankKernel`/`NoisyLeaf` under `LAYERS` is either *stacked* — every
    leaf with the layer axis (`w [L, m, n]`, `a [L, m, r]`, `b [L, n, r]`; `key [L]`), sliced by the scan
    and applied one layer at a time; a scalar `scale` is broadcast to `[L]` — or describes the whole
    stacked array at once (`a`, `b` the factors of a 2-D `w [L, D]`, or one `key` for all of `w`), which
    is materialised here, before the scan (exact, but the perturbed leaf then exists in full).
    """
    if not isinstance(params, dict):
        return params
    old = old_layer_keys(params)
    if old:
        raise ValueError(f"parameters hold per-layer subtrees {old[:3]}{'...' if len(old) > 3 else ''}: this "
                         f"model stores its {n_layers} layers stacked in one {LAYERS!r} subtree with a leading "
                         f"[n_layers] axis on every leaf; convert with models.stack_layers(params)")
    if LAYERS not in params:
        return params

    def leaf(path, p):
        name = LAYERS + "/" + "/".join(str(getattr(k, "key", k)) for k in path)
        if isinstance(p, (LowRankKernel, NoisyLeaf)):
            p = _stacked_descriptor(p, n_layers, name)
        if jnp.shape(p)[:1] != (n_layers,):
            raise ValueError(f"parameter {name} has shape {jnp.shape(p)}: expected a leading layer axis of "
                             f"{n_layers} (the stacked {LAYERS!r} layout)")
        return p

    is_desc = lambda p: isinstance(p, (LowRankKernel, NoisyLeaf))  # noqa: E731
    return {**params, LAYERS: jax.tree_util.tree_map_with_path(leaf, params[LAYERS], is_leaf=is_desc)}


def _stacked_descriptor(p, n_layers: int, name: str):
    """`p` in the stacked form the scan slices (scale broadcast to `[L]`), or materialised (see check_layout)."""
    w_shape, scale_shape = jnp.shape(p.w), jnp.shape(p.scale)
    if isinstance(p, LowRankKernel):
        a, b = jnp.shape(p.a), jnp.shape(p.b)
        if len(w_shape) >= 3 and len(a) == len(b) == len(w_shape) and {w_shape[0], a[0], b[0]} == {n_layers}:
            stacked = a[1:-1] == w_shape[1:-1] and b[1:-1] == w_shape[-1:] and a[-1] == b[-1]
            form = "stacked"
        else:
            stacked = a[:-1] == w_shape[:-1] and b[:-1] == w_shape[-1:] and a[-1] == b[-1] and len(a) == 2
            form = "whole-leaf"
        ok = stacked and scale_shape in ((), (n_layers,) if form == "stacked" else ())
        if not ok:
            raise ValueError(f"LowRankKernel at {name}: w {w_shape}, a {a}, b {b}, scale {scale_shape} fit neither "
                             f"the stacked form (w [L, m, n], a [L, m, r], b [L, n, r], scale [] or [L], L = "
                             f"{n_layers}) nor factors of the whole leaf (a [{w_shape[0] if w_shape else '?'}, r], "
                             f"b [{w_shape[-1] if w_shape else '?'}, r], a scalar scale)")
    else:
        key = jnp.shape(p.key)
        form = "stacked" if key == (n_layers,) else ("whole-leaf" if key == () else "bad")
        if form == "bad" or scale_shape not in ((), key):
            raise ValueError(f"NoisyLeaf at {name}: key {key}, scale {scale_shape}: expected one key per layer "
                             f"([{n_layers}], scale [] or [{n_layers}]) or one key for the whole leaf (scalar scale)")
    if form == "whole-leaf":
        return p.dense()
    if scale_shape == ():
        p = p.replace(scale=jnp.broadcast_to(jnp.asarray(p.scale, jnp.float32), (n_layers,)))
    return p


def stack_layers(params: dict) -> dict:
    """Convert a parameter tree of the old per-layer layout (`layers_0`, `layers_1`, ...) to the stacked
    one (`LAYERS` with a leading layer axis on every leaf)."""
    old = old_layer_keys(params)
    if not old:
        raise ValueError(f"stack_layers: no 'layers_<i>' subtrees among {sorted(params)[:6]}")
    rest = {k: v for k, v in params.items() if k not in old}
    return {**rest, LAYERS: jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in old))}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: `layers_{i}` subtrees sliced out of the stacked `LAYERS` subtree."""
    n = jax.tree.leaves(params[LAYERS])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != LAYERS}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params[LAYERS]) for i in range(n)}}
