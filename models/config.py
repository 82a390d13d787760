"""Model configuration: one decoder, configured into the GPT-2 and Llama families.

A `ModelConfig` is a frozen dataclass, hashable so that it can be a static argument of `jax.jit`.
`gpt2(...)`, `llama(...)` and `opt(...)` fill in the family's architecture choices; `tiny(family)` gives the
small random models used by tests and the quickstart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["gpt2", "llama", "opt"]
_FAMILIES = ("gpt2", "llama", "opt")
_ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
_ROPE_SCALINGS = (None, "linear", "llama3")
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
    attention_bias: bool = True  # bias on q, k, v, o projections
    mlp_bias: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        _check(self.family in _FAMILIES, "family", self.family, f"one of {_FAMILIES}")
        _check(self.activation in _ACTIVATIONS, "activation", self.activation, f"one of {_ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _check(self.n_heads % self.kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"a divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                   f"a divisor of d_model={self.d_model} (or set head_dim)")
        _check(self.dim_per_head % 2 == 0 or self.family != "llama", "head_dim", self.dim_per_head,
               "an even number (RoPE rotates pairs of features)")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {tuple(_DTYPES)}")
        _check(self.param_dtype in _DTYPES, "param_dtype", self.param_dtype, f"one of {tuple(_DTYPES)}")
        _check(self.rope_type in _ROPE_SCALINGS, "rope_scaling.rope_type", self.rope_type,
               f"one of {_ROPE_SCALINGS}")

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
        return self.family == "llama"

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

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


def tiny(family: Family = "gpt2", **overrides) -> ModelConfig:
    """A small random model over the byte vocabulary: the default of tests and the quickstart."""
    from models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    base = dict(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if family == "llama":
        base.update(n_kv_heads=2, d_ff=128)
        return llama(**{**base, **overrides})
    if family == "opt":
        return opt(**{**base, **overrides})
    if family == "gpt2":
        return gpt2(**{**base, **overrides})
    raise ValueError(f"tiny(family={family!r}): expected one of {_FAMILIES}.")
