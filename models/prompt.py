"""Soft prompts: learned embeddings prepended to the input (prompt tuning).

A soft prompt is an array `[n_tokens, d_model]` passed as `model.apply(params, tokens, prompt=P)`; the
model prepends it to the token embeddings, attends to it from every position and returns the logits of
the real tokens only.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def init_prompt(key: jax.Array, params: dict, n_tokens: int, from_tokens: Sequence[int] | None = None,
                dtype=jnp.float32) -> jax.Array:
    """A `[n_tokens, d_model]` soft prompt initialised from token embeddings.

    With `from_tokens` (e.g. the ids of a task instruction) the prompt starts as their embeddings;
    otherwise as the embeddings of `n_tokens` random vocabulary entries (Lester et al., 2021).
    """
    if n_tokens < 1:
        raise ValueError(f"soft prompt n_tokens={n_tokens} must be >= 1")
    table = params["embed"]
    if from_tokens is not None:
        ids = jnp.asarray(list(from_tokens), jnp.int32)
        if ids.shape[0] != n_tokens:
            raise ValueError(f"from_tokens has {ids.shape[0]} ids; expected n_tokens={n_tokens}")
    else:
        ids = jax.random.randint(key, (n_tokens,), 0, table.shape[0])
    return table[ids].astype(dtype)
