"""The model interface gfo depends on: what an optimizer, a space, a task or a decoder may ask of a model.

gfo is model-agnostic: `models.TransformerLM` is one implementation (GPT-2, Llama, OPT, …), and any
object with these members works wherever gfo takes a `model` (type hints name `LanguageModel`).
Parameters are a plain pytree; every method is a pure function of them.

    logits = model.apply(params, tokens [B, T] int32, attention_mask [B, T] | None)   # [B, T, V] float32
    cache = model.init_cache(batch_size, size)                                       # an empty KV cache
    logits, cache = model.apply_with_cache(params, tokens, cache, attention_mask)    # incremental decoding
    model.config.vocab_size, .d_model, .n_layers, .n_heads                           # sizes (counts)

Optional: `model.token_logprobs(params, tokens, targets, attention_mask)` → `[B, T]` log-probabilities of
`targets` without the `[B, T, V]` logits (`models.TransformerLM` computes the head a vocabulary block at
a time); `token_logprobs(model, ...)` below uses it when present and the full logits otherwise.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class ModelConfigLike(Protocol):
    """The architecture sizes gfo reads (memory planning, tokenizer checks, prompt spaces)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM with a pure functional boundary over a parameter pytree (see the module doc)."""

    config: Any  # a `ModelConfigLike`

    def init(self, key: jax.Array) -> Any: ...

    def apply(self, params, tokens: jax.Array, attention_mask: jax.Array | None = None,
              positions: jax.Array | None = None, prompt: jax.Array | None = None) -> jax.Array: ...

    def init_cache(self, batch_size: int, size: int, dtype=None) -> Any: ...

    def apply_with_cache(self, params, tokens: jax.Array, cache, attention_mask: jax.Array | None = None,
                         prompt: jax.Array | None = None, last_only: bool = False) -> tuple[jax.Array, Any]: ...


def token_logprobs(model, params, tokens: jax.Array, targets: jax.Array,
                   attention_mask: jax.Array | None = None) -> jax.Array:
    """`log p(targets[b, t] | tokens[b, :t + 1])`, float32 `[B, T]`: the model's own `token_logprobs` (no
    `[B, T, V]` logits) when it has one, else the log-softmax of `model.apply`."""
    if hasattr(model, "token_logprobs"):
        return model.token_logprobs(params, tokens, targets, attention_mask)
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(model.apply(params, tokens, attention_mask).astype(jnp.float32))
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def check_model(model) -> LanguageModel:
    """`model`, or a TypeError naming what it lacks of `LanguageModel`."""
    missing = [m for m in ("config", "init", "apply", "init_cache", "apply_with_cache") if not hasattr(model, m)]
    missing += [f"config.{f}" for f in ("vocab_size", "d_model", "n_layers", "n_heads")
                if hasattr(model, "config") and not hasattr(model.config, f)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a gfo language model: it lacks {missing} "
                        f"(see gfo.model_api.LanguageModel)")
    return model
