"""Research diagnostics logged with the evaluations: drift of the model from its start, and selection.

`drift_kl` is the KL divergence `KL(π_θ ‖ π_θ₀)` of the current model's next-token distributions from the
starting model's, averaged over the (unpadded) positions of held-out inputs — the measure by which ES and
RL solutions are compared (how far a fine-tune moved the model). The per-step estimator diagnostics
(`snr_cosine`: cosine between the estimates of two halves of the population or queries; `loss_std` /
`loss_range`: the fitness spread) come from the estimators themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOWER_IS_BETTER = ("loss", "cross_entropy", "perplexity", "kl")


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


def input_tokens(batch: dict):
    """`(tokens [B, T] int32, mask [B, T] or None)`: the inputs of a task's batch (prompt, or tokens)."""
    for key, mask in (("prompt", "prompt_mask"), ("tokens", "mask"), ("input_ids", "attention_mask")):
        if key in batch:
            return batch[key], batch.get(mask)
    raise ValueError(f"eval.kl_prompts: the task's batches have no prompt/tokens field (keys {sorted(batch)})")


def drift_kl(model, params, params0, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over valid positions of `KL(softmax(f_θ) ‖ softmax(f_θ₀))` (nats), float32."""
    logp = jax.nn.log_softmax(model.apply(params, tokens, mask).astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(model.apply(params0, tokens, mask).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)  # [B, T]
    weight = jnp.ones(kl.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(kl * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def select(records: list[dict], select_by: str) -> dict | None:
    """The eval record with the best `select_by` value (first on ties), or None if none has it."""
    rows = [r for r in records if r.get("split") == "eval" and select_by in r]
    if not rows:
        return None
    sign = 1.0 if lower_is_better(select_by) else -1.0
    return min(rows, key=lambda r: (sign * r[select_by], r["step"]))


def pass_at_k(correct: jax.Array, k: int) -> jax.Array:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv
    2107.03374): `mean_prompts 1 − C(n − c, k) / C(n, k)` for `correct` `[B, n]` (0/1) with `c` correct of
    `n` samples per prompt, computed as `1 − Π_{i=n−c+1}^{n} (1 − k / i)` (stable, no factorials)."""
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be in [1, n={n}]")
    c = jnp.sum(correct > 0, axis=1)  # [B]
    i = jnp.arange(1, n + 1, dtype=jnp.float32)  # [n]
    factors = jnp.where(i[None, :] >= (n - c + 1)[:, None], 1.0 - k / i[None, :], 1.0)  # [B, n]
    return jnp.mean(1.0 - jnp.prod(factors, axis=1))


def pass_at_k_metrics(task, model, params, batch: dict, key: jax.Array, samples: int, temperature: float) -> dict:
    """`pass@1`, `pass@n` (and powers of two between) of `samples` completions per prompt at `temperature`,
    for a generation task (`task.generate`, `task.completion_rewards(..., with_correct=True)`)."""
    rows = jax.tree.map(lambda v: jnp.repeat(v, samples, axis=0), batch)
    out = task.generate(model, params, rows, key, temperature=temperature)
    _, correct = task.completion_rewards(out.tokens, out.lengths, rows, with_correct=True)
    correct = correct.reshape(-1, samples)
    ks = sorted({1, samples} | {2 ** j for j in range(1, 16) if 2 ** j < samples})
    return {f"pass@{k}": pass_at_k(correct, k) for k in ks}
