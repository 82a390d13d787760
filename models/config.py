"""Model configuration: one decoder, configured into the GPT-2, OPT, Llama, Qwen2, Qwen3 and Gemma 3 families.

A `ModelConfig` is a frozen dataclass, hashable so that it can be a static argument of `jax.jit`.
`gpt2(...)`, `opt(...)`, `llama(...)`, `qwen2(...)`, `qwen3(...)` and `gemma3(...)` fill in the family's
architecture choices; `tiny(family)` gives the small random models used by tests and the quickstart.
The families differ only in flags (norm kind, biases, q/k norm, post-norms, embedding scale, sliding
windows, soft-capping), so one decoder implements them all.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["gpt2", "llama", "opt", "qwen2", "qwen3", "gemma3"]
_FAMILIES = ("gpt2", "llama", "opt", "qwen2", "qwen3", "gemma3")
_RMS_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")  # RMSNorm, RoPE, gated MLP, no position table
_ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_SCALINGS = (None, "linear", "llama3")
_ATTENTION_IMPLS = ("xla", "cudnn", "einsum")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only Transformer LM.

    Sizes are counts (tokens, features, heads); `dtype` is the compute dtype and `param_dtype` the
    storage dtype of freshly initialised parameters, both named as strings ("float32", "bfloat16").
    """

    family: Family = "gpt2"
    vocab_size: int = 259
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (multi-head)
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # None = 4 * d_model
    max_seq_len: int = 256  # learned-position table size; RoPE models accept any length
    position_offset: int = 0  # learned positions: row of position p is p + offset (OPT: 2)
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # e.g. (("rope_type", "llama3"), ...)
    tie_embeddings: bool = True
    attention_bias: bool = True  # bias on q, k, v (and o, unless attention_out_bias says otherwise)
    attention_out_bias: bool | None = None  # bias on o; None = attention_bias (Qwen2: q/k/v only)
    mlp_bias: bool = True
    qk_norm: bool = False  # RMSNorm over each head's features of q and k before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # also normalise attention and MLP outputs before the residual add (Gemma 3)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale), scale initialised to 0 (Gemma)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model), rounded to the dtype (Gemma)
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention"/"sliding_attention"; None = all full
    sliding_window: int | None = None  # sliding layers see keys at slots q - window < s <= q
    rope_local_theta: float | None = None  # RoPE base of sliding layers (unscaled); None = rope_theta
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2; None = head_dim
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    initializer_range: float = 0.02
    # Attention kernel: "xla" (jax.nn.dot_product_attention's XLA path, exact on CPU), "cudnn" (its cuDNN
    # flash attention: GPUs, bfloat16/float16) or "einsum" (the explicit reference; soft-capped models
    # always use it).
    attention_impl: str = "xla"
    remat: bool = False  # recompute each block in the backward pass (jax.checkpoint): memory O(1) in depth
    dtype: str = "float32"
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        _check(self.family in _FAMILIES, "family", self.family, f"one of {_FAMILIES}")
        _check(self.activation in _ACTIVATIONS, "activation", self.activation, f"one of {_ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0, name, value,
                   "a positive integer")
        for name in ("norm_eps", "rope_theta", "initializer_range"):  # (a YAML "1e-6" is a string)
            value = getattr(self, name)
            _check(isinstance(value, numbers.Real) and not isinstance(value, bool), name, value, "a number")
        _check(self.n_heads % self.kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"a divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                   f"a divisor of d_model={self.d_model} (or set head_dim)")
        _check(self.dim_per_head % 2 == 0 or not self.uses_rope, "head_dim", self.dim_per_head,
               "an even number (RoPE rotates pairs of features)")
        _check(self.attention_impl in _ATTENTION_IMPLS, "attention_impl", self.attention_impl,
               f"one of {_ATTENTION_IMPLS}")
        _check(self.attention_impl != "cudnn" or self.dtype in ("bfloat16", "float16"), "attention_impl",
               self.attention_impl, f"'xla' or 'einsum' for dtype={self.dtype!r} (cuDNN flash attention takes "
               "bfloat16/float16 only)")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {tuple(_DTYPES)}")
        _check(self.param_dtype in _DTYPES, "param_dtype", self.param_dtype, f"one of {tuple(_DTYPES)}")
        _check(self.rope_type in _ROPE_SCALINGS, "rope_scaling.rope_type", self.rope_type,
               f"one of {_ROPE_SCALINGS}")
        if self.layer_types is not None:
            _check(len(self.layer_types) == self.n_layers and all(t in _LAYER_TYPES for t in self.layer_types),
                   "layer_types", self.layer_types, f"{self.n_layers} entries, each one of {_LAYER_TYPES}")
            _check(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                   "sliding_window", self.sliding_window, "a positive integer when a layer is sliding_attention")
        _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window", self.sliding_window,
               "None or a positive integer")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, name, getattr(self, name),
                   "None or a positive number")
        if not self.uses_rope:
            for name in ("qk_norm", "post_norms", "norm_plus_one", "scale_embeddings"):
                _check(not getattr(self, name), name, getattr(self, name),
                       f"False for the LayerNorm family {self.family!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def uses_rope(self) -> bool:
        return self.family in _RMS_FAMILIES

    @property
    def gated_mlp(self) -> bool:
        return self.family in _RMS_FAMILIES

    @property
    def rms_norm(self) -> bool:
        return self.family in _RMS_FAMILIES

    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through a sliding window (and uses `rope_local_theta`)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    @property
    def has_sliding_layers(self) -> bool:
        """Whether any layer is sliding (the scanned decoder then selects masks and RoPE per layer)."""
        return self.layer_types is not None and "sliding_attention" in self.layer_types

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str | None:
        return self.rope_scaling_dict.get("rope_type")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{key}={value!r} is invalid: expected {expected}.")


def gpt2(**overrides) -> ModelConfig:
    """GPT-2 family: learned positions, pre-LayerNorm, GELU (tanh), biases, tied embeddings."""
    base = dict(family="gpt2", activation="gelu_new", tie_embeddings=True, attention_bias=True,
                mlp_bias=True, norm_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def opt(**overrides) -> ModelConfig:
    """OPT family (Zhang et al. 2022): GPT-2's layout with ReLU, learned positions offset by 2, pre-LN,
    biases and a tied head (the `do_layer_norm_before=True` variants: all sizes but 350M)."""
    base = dict(family="opt", activation="relu", tie_embeddings=True, attention_bias=True, mlp_bias=True,
                norm_eps=1e-5, position_offset=2)
    return ModelConfig(**{**base, **overrides})


def llama(**overrides) -> ModelConfig:
    """Llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head."""
    base = dict(family="llama", activation="silu", tie_embeddings=False, attention_bias=False,
                mlp_bias=False, norm_eps=1e-6)
    return ModelConfig(**{**base, **overrides})


def qwen2(**overrides) -> ModelConfig:
    """Qwen2 / Qwen2.5 family: Llama's layout with biases on q, k, v (not o); tied head in the small sizes."""
    base = dict(family="qwen2", activation="silu", tie_embeddings=False, attention_bias=True,
                attention_out_bias=False, mlp_bias=False, norm_eps=1e-6, rope_theta=1_000_000.0)
    return ModelConfig(**{**base, **overrides})


def qwen3(**overrides) -> ModelConfig:
    """Qwen3 family: Llama's layout plus an RMSNorm over each head of q and k (before RoPE)."""
    base = dict(family="qwen3", activation="silu", tie_embeddings=False, attention_bias=False,
                mlp_bias=False, norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True)
    return ModelConfig(**{**base, **overrides})


def gemma3(**overrides) -> ModelConfig:
    """Gemma 3 text family: embeddings scaled by sqrt(d), (1 + w) RMSNorms before and after attention
    and MLP, q/k norm, GeGLU (tanh GELU), five sliding-window layers (RoPE base 1e4) per global layer
    (base 1e6), scores scaled by `query_pre_attn_scalar ** -0.5`, tied head."""
    n_layers = overrides.get("n_layers", ModelConfig.n_layers)
    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers))
    base = dict(family="gemma3", activation="gelu_new", tie_embeddings=True, attention_bias=False,
                mlp_bias=False, norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                qk_norm=True, post_norms=True, norm_plus_one=True, scale_embeddings=True,
                layer_types=types, sliding_window=4096)
    return ModelConfig(**{**base, **overrides})


_CONSTRUCTORS = {"gpt2": gpt2, "opt": opt, "llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3}


def tiny(family: Family = "gpt2", **overrides) -> ModelConfig:
    """A small random model over the byte vocabulary: the default of tests and the quickstart."""
    from models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    base = dict(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if family not in _CONSTRUCTORS:
        raise ValueError(f"tiny(family={family!r}): expected one of {_FAMILIES}.")
    if family in _RMS_FAMILIES:
        base.update(n_kv_heads=2, d_ff=128)
    if family == "qwen2":
        base.update(tie_embeddings=True)  # as Qwen2.5-0.5B
    if family == "gemma3":  # sliding and global layers alternating, a window short enough to matter
        n = overrides.get("n_layers", base["n_layers"])
        base.update(layer_types=tuple(("sliding_attention", "full_attention")[i % 2] for i in range(n)),
                    sliding_window=8, query_pre_attn_scalar=16, head_dim=16)
    return _CONSTRUCTORS[family](**{**base, **overrides})
