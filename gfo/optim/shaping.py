"""Fitness shaping for population estimators. Fitness is a *loss*: lower is better.

Every function maps raw losses `[N]` to shaped values `[N]` that preserve order (a higher loss gets
a higher shaped value), so `Σ shaped_i ε_i / (N σ)` estimates the gradient of the loss and an optax
transformation descends it, exactly as with a backprop gradient. Non-finite losses (NaN, ±Inf) are
ranked worst and never reach the update as NaN.

Moments are computed stably: the losses are first shifted by one of them (exact in floating point for
losses close to each other, Sterbenz), then centred before squaring, so losses that differ by 1e-6 around
6 are standardised to float32 accuracy (`E[x²] − E[x]²` loses all digits there). `grouped` shapes within
groups of consecutive members (EGGROLL / GRPO: the members of a group answered the same prompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SHAPINGS = ("centered_ranks", "z_score", "z_score_var", "raw")


def sanitize(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(losses with non-finite entries set to the worst finite loss, count of non-finite)`.

    With every loss non-finite the result is all zeros (no information, no update).
    """
    finite = jnp.isfinite(losses)
    worst = jnp.max(jnp.where(finite, losses, -jnp.inf))
    worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
    return jnp.where(finite, losses, worst), jnp.sum(~finite)


def centered_ranks(losses: jax.Array) -> jax.Array:
    """Ranks `[N]` of `losses: [N]` scaled to [-0.5, 0.5] (Salimans et al. 2017); non-finite losses rank last.

    Tied losses share their average rank (`scipy.stats.rankdata(..., "average")`), so members with equal
    losses get equal weights: a population whose members all score the same (common with 0/1 rewards on
    generated text) gives a zero update, not one made of its noise alone, and an antithetic pair that ties
    cancels. OpenAI-ES's `compute_ranks` breaks ties by member index; with distinct losses the ranks are its.
    """
    n = losses.shape[0]
    order_key = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    ordered = jnp.sort(order_key)
    below = jnp.searchsorted(ordered, order_key, side="left")  # members strictly better
    not_above = jnp.searchsorted(ordered, order_key, side="right")  # … and those tied with it
    ranks = (below + not_above - 1).astype(jnp.float32) / 2
    return ranks / max(n - 1, 1) - 0.5


def centered(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(L − mean(L), var(L))` of sanitised float32 losses, computed by shift-then-centre (stable)."""
    clean, _ = sanitize(losses.astype(jnp.float32))
    shifted = clean - jax.lax.stop_gradient(clean[0])  # exact for close values; mean(shifted) is then precise
    d = shifted - jnp.mean(shifted)
    d = d - jnp.mean(d)  # a second pass removes the mean's own rounding
    return d, jnp.mean(d * d)


def z_score(losses: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`(L − mean) / (std + eps)` (ES at scale, Qiu et al. 2025)."""
    d, var = centered(losses)
    return d / (jnp.sqrt(var) + eps)


def z_score_var(losses: jax.Array, eps: float = 1e-5) -> jax.Array:
    """`(L − mean) / √(var + eps)` (EGGROLL's normalisation, Sarkar et al. 2025)."""
    d, var = centered(losses)
    return d / jnp.sqrt(var + eps)


def raw(losses: jax.Array) -> jax.Array:
    """The (sanitised) losses themselves, minus their mean as a baseline."""
    return centered(losses)[0]


def shape(losses: jax.Array, method: str, groups: int = 1) -> jax.Array:
    """Shaped `[N]` losses; with `groups > 1` each of `groups` consecutive blocks of `N / groups`
    members is shaped on its own (its own ranks, mean and spread)."""
    fn = {"centered_ranks": centered_ranks, "z_score": z_score, "z_score_var": z_score_var, "raw": raw}.get(method)
    if fn is None:
        raise ValueError(f"fitness shaping {method!r}: expected one of {SHAPINGS}")
    if groups == 1:
        return fn(losses)
    n = losses.shape[0]
    if n % groups:
        raise ValueError(f"{n} losses cannot be split into groups={groups} of equal size")
    return jax.vmap(fn)(losses.reshape(groups, n // groups)).reshape(n)


def stable_standardize(population, fitness, state, params):
    """evosax's `standardize_fitness_shaping_fn` signature with gfo's stable z-score (std + 1e-8)."""
    del population, state, params
    return z_score(fitness)
