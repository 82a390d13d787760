"""Transformer building blocks (Flax Linen): linear, norms, rotary embeddings, attention, MLPs.

Every matmul goes through `models.linear.linear`, so each kernel may be a dense array or a
`LowRankKernel`. Shapes: B batch, T query positions, S key slots, D d_model, H heads, K kv heads,
G = H // K query heads per kv head, E head dim, F feed-forward width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.linear import linear, materialize

_NEG_INF = -1e30  # finite, so that fully-masked rows (left padding) stay NaN-free


class Linear(nn.Module):
    """`y = x @ kernel + bias` with `kernel: [d_in, features]`, through the shared linear primitive."""

    features: int
    use_bias: bool
    config: ModelConfig
    init_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        std = self.init_std if self.init_std is not None else cfg.initializer_range
        kernel = self.param("kernel", nn.initializers.normal(std), (x.shape[-1], self.features),
                            cfg.storage_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), cfg.storage_dtype)
                if self.use_bias else None)
        return linear(x, kernel, bias, dtype=cfg.compute_dtype)


class Norm(nn.Module):
    """LayerNorm (GPT-2, OPT: scale and bias) or RMSNorm (the others: scale only, times `1 + scale` in
    Gemma's convention), over the last axis of `x: [..., d]`, computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d = x.shape[-1]
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = self.param("scale", init, (d,), cfg.storage_dtype)
        h = x.astype(jnp.float32)
        if cfg.rms_norm:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
            gain = 1.0 + _row(scale, h) if cfg.norm_plus_one else _row(scale, h)
            return (gain * h).astype(cfg.compute_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), cfg.storage_dtype)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (h * _row(scale, h) + _row(bias, h)).astype(cfg.compute_dtype)


def _row(v: jax.Array, like: jax.Array) -> jax.Array:
    """A feature vector `[d]` as float32 `[1, ..., 1, d]`, broadcastable against `like: [..., d]`."""
    v = materialize(v)
    return v.astype(jnp.float32).reshape((1,) * (like.ndim - 1) + v.shape)


def rope_frequencies(config: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies `[E/2]` of rotary embeddings, with Hugging Face's `rope_scaling` rules;
    `local=True`: those of sliding-window layers (base `rope_local_theta`, never scaled, as Gemma 3)."""
    dim = config.dim_per_head
    theta = config.rope_local_theta if local and config.rope_local_theta is not None else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = {} if local and config.rope_local_theta is not None else config.rope_scaling_dict
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate `x: [B, T, heads, E]` by `positions: [B, T]` (rotate-half convention, as in HF Llama)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, E/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def layer_rope_frequencies(config: ModelConfig, sliding: jax.Array | bool) -> jax.Array:
    """The RoPE inverse frequencies `[E/2]` of one layer, `sliding` a Python or traced bool: both sets
    are computed and one selected, so the decoder's scan over layers needs no Python branch."""
    if config.has_sliding_layers and config.rope_local_theta is not None:
        return jnp.where(sliding, rope_frequencies(config, local=True), rope_frequencies(config))
    return rope_frequencies(config)


def attention_mask(config: ModelConfig, q_slots, k_slots, key_valid, sliding: jax.Array | bool) -> jax.Array:
    """`[B, T, S]` bool: the query at slot q may see the valid keys at slots s <= q (and, in a sliding
    layer, s > q - window); `sliding` may be traced (one scanned flag per layer)."""
    allowed = k_slots[None, :] <= q_slots[:, None]  # [T, S]
    if config.has_sliding_layers:
        in_window = k_slots[None, :] > q_slots[:, None] - config.sliding_window
        allowed &= in_window | ~jnp.asarray(sliding)
    return allowed[None] & key_valid[:, None, :]


class Attention(nn.Module):
    """Causal multi-head / grouped-query self-attention, optionally after cached keys.

    Call with `x: [B, T, D]`, `positions: [B, T]` (rotary positions), `q_slots: [T]` (this call's slots in
    the sequence, for the causal mask), `valid: [B, T]` (this call's padding mask), `sliding` (bool scalar,
    possibly traced: a sliding layer lets the query at slot q see keys at slots q - window < s <= q, and uses
    `rope_local_theta`), and optionally `old = (k, v, slots, key_valid)`: keys and values already cached
    (`k, v: [B, R, K, E]` at `slots: [R]`, `key_valid: [B, R]`), read up to `R` — the filled part of a
    cache, not its whole length. Returns `(y: [B, T, D], (k, v))` with this call's keys and values
    `[B, T, K, E]` (after RoPE), for the caller to write into its cache.

    `config.attention_impl` picks the kernel: "xla" / "cudnn" call `jax.nn.dot_product_attention`
    (cuDNN flash attention on GPUs, bfloat16/float16 only), "einsum" the explicit reference below. A
    model with `attn_logit_softcap` always takes "einsum": `dot_product_attention` has no soft-capping.
    After cached keys ("xla", "einsum") the scores against the cache and against this call's keys are
    computed apart and share one softmax (`_split_attention`), so the cache is never concatenated.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, q_slots, valid, sliding=False, old=None):
        cfg = self.config
        H, K, E = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        B, T, _ = x.shape
        out_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layers)
        q = Linear(H * E, cfg.attention_bias, cfg, name="q")(x).reshape(B, T, H, E)
        k = Linear(K * E, cfg.attention_bias, cfg, name="k")(x).reshape(B, T, K, E)
        v = Linear(K * E, cfg.attention_bias, cfg, name="v")(x).reshape(B, T, K, E)
        if cfg.qk_norm:
            q = Norm(cfg, name="q_norm")(q)
            k = Norm(cfg, name="k_norm")(k)
        if cfg.uses_rope:
            inv_freq = layer_rope_frequencies(cfg, sliding)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        scale = (cfg.query_pre_attn_scalar or E) ** -0.5
        allowed = attention_mask(cfg, q_slots, q_slots, valid, sliding)
        einsum = cfg.attention_impl == "einsum" or cfg.attn_logit_softcap is not None
        if old is not None:
            k_old, v_old, old_slots, old_valid = old
            k_new, v_new = k.astype(k_old.dtype), v.astype(v_old.dtype)
            allowed_old = attention_mask(cfg, q_slots, old_slots, old_valid, sliding)
            if cfg.attention_impl == "cudnn":
                k, v = jnp.concatenate([k_old, k_new], axis=1), jnp.concatenate([v_old, v_new], axis=1)
                allowed = jnp.concatenate([allowed_old, allowed], axis=-1)
            else:
                y = _split_attention(cfg, q, (k_old, k_new), (v_old, v_new), (allowed_old, allowed), scale)
        if old is None or cfg.attention_impl == "cudnn":
            if einsum:
                y = _einsum_attention(cfg, q, k, v, allowed, scale)
            else:
                dt = cfg.compute_dtype
                y = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt), mask=allowed[:, None],
                                                 scale=scale, implementation=cfg.attention_impl)
            k_new, v_new = k[:, -T:], v[:, -T:]
        y = Linear(cfg.d_model, cfg.out_bias, cfg, init_std=out_std, name="o")(y.reshape(B, T, H * E))
        return y, (k_new, v_new)


def _einsum_attention(cfg: ModelConfig, q, k, v, allowed, scale) -> jax.Array:
    """The reference attention: `q: [B, T, H, E]`, `k, v: [B, S, K, E]`, `allowed: [B, T, S]` →
    `[B, T, H, E]`; scores and softmax in float32, soft-capped before masking (Gemma 2)."""
    return _split_attention(cfg, q, (k,), (v,), (allowed,), scale)


def _split_attention(cfg: ModelConfig, q, ks, vs, alloweds, scale) -> jax.Array:
    """Attention over keys given in parts (a cache's filled slots, this call's keys): `q: [B, T, H, E]`, each
    `ks[i], vs[i]: [B, S_i, K, E]` with `alloweds[i]: [B, T, S_i]`; one softmax over all the parts' scores
    (float32, soft-capped before masking), each part's values weighted apart → `[B, T, H, E]`."""
    B, T, H, E = q.shape
    K = ks[0].shape[2]
    q = q.reshape(B, T, K, H // K, E)
    scores = [jnp.einsum("btkge,bske->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
              for k in ks]
    sizes = [s.shape[-1] for s in scores]
    scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)
    if cfg.attn_logit_softcap is not None:
        scores = softcap(scores, cfg.attn_logit_softcap)
    allowed = alloweds[0] if len(alloweds) == 1 else jnp.concatenate(alloweds, axis=-1)
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
    out, start = None, 0
    for v, n in zip(vs, sizes):
        p = probs if len(vs) == 1 else probs[..., start:start + n]
        part = jnp.einsum("bkgts,bske->btkge", p, v.astype(cfg.compute_dtype))
        out, start = part if out is None else out + part, start + n
    return out.reshape(B, T, H, E)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """`cap * tanh(x / cap)`: a smooth clip of `x` (float32) to (-cap, cap) (Gemma's soft-capping)."""
    return cap * jnp.tanh(x / cap)


def _activation(name: str):
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return {"relu": jax.nn.relu, "silu": jax.nn.silu}[name]


class MLP(nn.Module):
    """GPT-2: `proj(act(fc(x)))`; Llama: `down(act(gate(x)) * up(x))` (SwiGLU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _activation(cfg.activation)
        out_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layers)
        if cfg.gated_mlp:
            h = act(Linear(cfg.ff_dim, cfg.mlp_bias, cfg, name="gate")(x))
            h = h * Linear(cfg.ff_dim, cfg.mlp_bias, cfg, name="up")(x)
            return Linear(cfg.d_model, cfg.mlp_bias, cfg, init_std=out_std, name="down")(h)
        h = act(Linear(cfg.ff_dim, cfg.mlp_bias, cfg, name="fc")(x))
        return Linear(cfg.d_model, cfg.mlp_bias, cfg, init_std=out_std, name="proj")(h)
