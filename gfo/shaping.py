"""Fitness shaping for population estimators. Fitness is a *loss*: lower is better.

Every function maps raw losses `[N]` to shaped values `[N]` that preserve order (a higher loss gets
a higher shaped value), so `Σ shaped_i ε_i / (N σ)` estimates the gradient of the loss and an optax
transformation descends it, exactly as with a backprop gradient. Non-finite losses (NaN, ±Inf) are
ranked worst and never reach the update as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SHAPINGS = ("centered_ranks", "z_score", "raw")


def sanitize(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(losses with non-finite entries set to the worst finite loss, count of non-finite)`.

    With every loss non-finite the result is all zeros (no information, no update).
    """
    finite = jnp.isfinite(losses)
    worst = jnp.max(jnp.where(finite, losses, -jnp.inf))
    worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
    return jnp.where(finite, losses, worst), jnp.sum(~finite)


def centered_ranks(losses: jax.Array) -> jax.Array:
    """Ranks scaled to [-0.5, 0.5] (Salimans et al. 2017); non-finite losses rank last."""
    n = losses.shape[0]
    order_key = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    ranks = jnp.empty(n, jnp.float32).at[jnp.argsort(order_key)].set(jnp.arange(n, dtype=jnp.float32))
    return ranks / max(n - 1, 1) - 0.5


def z_score(losses: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`(L − mean) / (std + eps)` (ES at scale, Qiu et al. 2025)."""
    clean, _ = sanitize(losses)
    return (clean - clean.mean()) / (clean.std() + eps)


def raw(losses: jax.Array) -> jax.Array:
    """The (sanitised) losses themselves, minus their mean as a baseline."""
    clean, _ = sanitize(losses)
    return clean - clean.mean()


def shape(losses: jax.Array, method: str) -> jax.Array:
    if method == "centered_ranks":
        return centered_ranks(losses)
    if method == "z_score":
        return z_score(losses)
    if method == "raw":
        return raw(losses)
    raise ValueError(f"fitness shaping {method!r}: expected one of {SHAPINGS}")
