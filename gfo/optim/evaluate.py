"""The one population-evaluation path, and the metrics vocabulary every gfo optimizer reports.

    losses, metrics = evaluate_population(lambda i: objective(member(i), batch, key), n,
                                          batch_size=chunk, pop_sharding=pop_sharding)

`evaluate_member(i)` (`i` an int32 scalar, traced) returns member `i`'s scalar loss; the `n` members are
evaluated in `vmap`ped chunks of `batch_size` under `lax.map` (`map_members` below), split over
the mesh's `pop` axis when `pop_sharding` is given. `losses` `[n]` float32 come back as evaluated (raw:
non-finite values stay, so ranking can put them last); the metrics are those of the *sanitised* losses,
where each non-finite loss is replaced by the worst finite one (`gfo.optim.shaping.sanitize`) and counted.

Metrics vocabulary (every step's `metrics` dict uses these names with these meanings; a method reports
the subset that applies). Losses are minimised everywhere; rewards enter negated.

| name | meaning |
|---|---|
| `loss` | the step's loss on its batch. Population methods (ES, low-rank ES, evosax, GA, discrete search, RandOpt): the mean of the members' sanitised losses — at the *perturbed* points, not at the current point (NaN when every member is non-finite). SPSA-type estimators: the mean of their sanitised query losses `f(x ± εz)`. Backprop / forward gradient: the loss at the current point. Policy gradient: `−mean reward` of the sampled completions. |
| `loss_min`, `loss_std`, `loss_range` | minimum, standard deviation and max − min of the sanitised member (or query) losses |
| `nonfinite` | how many member (or query) losses were NaN or ±Inf this step |
| `evaluations` | objective evaluations this step (members, queries, or 1 for a gradient) |
| `best_loss` | methods that keep a best-so-far point (`best_solution`): its loss |
| `update_norm`, `grad_norm` | norm of the applied update / of the pseudo-gradient (estimator methods) |
| `snr_cosine` | cosine between the two halves' gradient estimates (ES diagnostics) |
| `reward` | mean reward (reward objectives) |
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gfo.optim import shaping


def _sub_sharding(pop_sharding, spec):
    """A sharding on `pop_sharding`'s mesh with another `PartitionSpec`."""
    from jax.sharding import NamedSharding

    return NamedSharding(pop_sharding.mesh, spec)


def constrain(tree, sharding):
    """`tree` with every leaf constrained to `sharding` (unchanged when None)."""
    return tree if sharding is None else jax.tree.map(lambda y: jax.lax.with_sharding_constraint(y, sharding), tree)


def map_members(fn: Callable[[jax.Array], jax.Array], n: int, batch_size: int | None = None,
                pop_sharding=None) -> jax.Array:
    """`stack([fn(i) for i in range(n)])` as `lax.map` over `vmap`ped chunks of `batch_size` members.

    With `pop_sharding` (a `NamedSharding` with spec `P("pop")`), every chunk's members are split over
    the `pop` axis, so each device evaluates `chunk / |pop|` members per step and the result `[n]` is
    sharded over `pop`: only the per-member scalars ever exist outside the device that made them.
    """
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    n_chunks = -(-n // chunk)
    # Padded ids repeat the last member; their results are dropped.
    ids = jnp.minimum(jnp.arange(n_chunks * chunk, dtype=jnp.int32), n - 1).reshape(n_chunks, chunk)
    if pop_sharding is not None:
        from jax.sharding import PartitionSpec as P

        ids = jax.lax.with_sharding_constraint(ids, _sub_sharding(pop_sharding, P(None, *pop_sharding.spec)))

    def run_chunk(members):
        return constrain(jax.vmap(fn)(constrain(members, pop_sharding)), pop_sharding)

    out = run_chunk(ids[0]) if n_chunks == 1 else jax.lax.map(run_chunk, ids)
    out = jax.tree.map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2 if n_chunks > 1 else 1:])[:n], out)
    return constrain(out, pop_sharding)


METRICS = ("loss", "loss_min", "loss_std", "loss_range", "nonfinite", "evaluations", "best_loss", "update_norm",
           "grad_norm", "snr_cosine", "reward")


def population_metrics(losses: jax.Array) -> dict:
    """The vocabulary's loss statistics of raw losses `[n]` (see the module doc)."""
    clean, bad = shaping.sanitize(losses)
    none = bad == losses.shape[0]  # every member non-finite: report NaN, not the sanitised zeros
    return {"loss": jnp.where(none, jnp.nan, jnp.mean(clean)),
            "loss_min": jnp.where(none, jnp.nan, jnp.min(clean)),
            "loss_std": jnp.sqrt(shaping.centered(losses)[1]),
            "loss_range": jnp.max(clean) - jnp.min(clean),
            "nonfinite": bad, "evaluations": losses.shape[0]}


def evaluate_population(evaluate_member: Callable[[jax.Array], jax.Array], n: int, *, batch_size: int | None = None,
                        pop_sharding=None) -> tuple[jax.Array, dict]:
    """`(losses [n] float32 as evaluated, metrics)` of members `0..n-1` (see the module doc).

    `batch_size`: members evaluated at once (memory ∝ one chunk; None: all `n`); `pop_sharding`: a
    `NamedSharding` over the mesh's `pop` axis, or None.
    """
    if n < 1:
        raise ValueError(f"evaluate_population: n={n} must be >= 1")
    losses = map_members(evaluate_member, n, batch_size, pop_sharding).astype(jnp.float32)
    return losses, population_metrics(losses)


# ----------------------------------------------------------------------------- the default chunk
def activation_bytes(tokens: int, batch: int, seq_len: int, d_model: int, n_heads: int, vocab_size: int) -> int:
    """Bytes one member's forward pass holds at its peak, in float32: per token one layer's activations
    (residual, q/k/v, attention output, the 4·d MLP hidden: ≈ 16·d_model values) and the logits with
    their softmax (2·vocab), plus one layer's attention scores (batch · heads · T²). Layers run one at a
    time (no backward pass keeps them), so depth does not enter."""
    return 4 * (tokens * (16 * d_model + 2 * vocab_size) + batch * n_heads * seq_len * seq_len)


def default_chunk(population: int, member_bytes: int, budget_bytes: int, multiple: int = 1) -> int | None:
    """Members to evaluate at once so that `chunk × member_bytes ≤ budget_bytes`: None (the whole
    population at once) when it all fits, else `⌊budget / member_bytes⌋` rounded down to a multiple of
    `multiple` (the mesh's `pop` size) when at least that, and at least 1.

    `gfo train` calls it (`gfo.run.stepplan.plan_eval_chunk`) for a population method without
    `optimizer.eval_chunk` with `budget = device memory / 2 − (parameter bytes + 4 × searched bytes)` (the
    frozen weights, the point, two optax moments and the update) and `member_bytes = activation_bytes(...)`
    for the task's batch (+ the searched bytes for full-rank methods, whose member holds a perturbed copy
    of the point).
    """
    if population < 1 or member_bytes < 0 or multiple < 1:
        raise ValueError(f"default_chunk: population={population}, member_bytes={member_bytes}, "
                         f"multiple={multiple}: expected population >= 1, member_bytes >= 0, multiple >= 1")
    if member_bytes == 0 or population * member_bytes <= budget_bytes:
        return None
    chunk = max(1, int(budget_bytes // member_bytes))
    if chunk >= multiple:
        chunk -= chunk % multiple
    return min(chunk, population)
