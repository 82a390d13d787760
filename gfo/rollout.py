"""Rewards on generated text: one objective that ES (as a loss) and policy gradient (as rollouts) share.

`GenerationReward` samples `group_size` completions per prompt with the KV-cache generator, scores
them with `reward_fn`, and offers
- `__call__(x, batch, key)`: the loss `−mean reward` (for ES, SPSA, evosax: any loss-minimiser);
- `sample` / `log_prob`: the `gfo.objectives.RewardObjective` protocol of `gfo.optim.estimators.PolicyGradient`.
It is a pytree (`gfo.jitting.register_object_pytree`): the space behind `to_params` (its frozen weights)
and the KL `reference` point reach a jitted step as traced arguments, not as constants.

Batch: a dict with `prompt` [B, T] and `prompt_mask` [B, T] (left-padded, `Tokenizer.batch_encode`)
and any per-prompt fields (e.g. countdown's `numbers`, `target_value`). `reward_fn(completions [N, L]
int32, lengths [N] int32, rows) -> [N] float32` is a JAX function, where `rows` holds the batch's
per-prompt fields repeated for each of the `G` completions (`N = B·G`); a reward written in Python on
decoded strings is wrapped with `host_reward` (a `jax.pure_callback`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import models
from gfo.jitting import register_object_pytree
from gfo.model_api import LanguageModel


class Rollout(NamedTuple):
    tokens: jax.Array  # [B, G, N] completions
    lengths: jax.Array  # [B, G]
    reward: jax.Array  # [B, G]


def host_reward(fn: Callable[..., np.ndarray]):
    """Wrap a NumPy/Python reward `(tokens [N, L], lengths [N], rows) -> [N]` as a jittable function."""

    def reward(tokens, lengths, rows):
        out = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
        host = lambda t, n, r: np.asarray(fn(np.asarray(t), np.asarray(n), jax.tree.map(np.asarray, r)),  # noqa
                                          np.float32)
        return jax.pure_callback(host, out, tokens, lengths, rows, vmap_method="sequential")

    return reward


@register_object_pytree
@dataclasses.dataclass(frozen=True, eq=False)
class GenerationReward:
    """Sampled completions of a prompt batch, scored by `reward_fn` (see the module doc)."""

    model: LanguageModel
    to_params: Callable[[Any], Any]  # the space's x -> model parameters
    reward_fn: Callable[[jax.Array, jax.Array, dict], jax.Array]
    max_new_tokens: int
    group_size: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    stop_strings: Any = None  # models.generate.StopStrings
    reference: Any = None  # x of the KL reference (policy gradient), e.g. the starting point
    # `to_params` passes perturbation descriptors through to the model (a `Full` space): ES and SPSA may
    # hand `x` as `NoisyLeaf` / `LowRankKernel` leaves (`gfo.objectives.accepts_descriptors`)
    leaf_descriptors: bool = False

    def sample(self, x, batch, key) -> Rollout:
        B, G = batch["prompt"].shape[0], self.group_size
        rows = jax.tree.map(lambda v: jnp.repeat(v, G, axis=0), batch)
        out = models.generate(self.model, self.to_params(x), rows["prompt"], rows["prompt_mask"], key,
                              self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.stop_tokens,
                              stop_strings=self.stop_strings)
        reward = self.reward_fn(out.tokens, out.lengths, rows)
        return Rollout(out.tokens.reshape(B, G, -1), out.lengths.reshape(B, G), reward.reshape(B, G))

    def log_prob(self, x, batch, rollout: Rollout) -> jax.Array:
        """Summed log-probabilities `[B, G]` of the completions (teacher forcing, differentiable)."""
        B, G, N = rollout.tokens.shape
        valid = (jnp.arange(N)[None, :] < rollout.lengths.reshape(B * G, 1)).astype(jnp.int32)
        logp = models.completion_logprobs(self.model, self.to_params(x), jnp.repeat(batch["prompt"], G, axis=0),
                                          jnp.repeat(batch["prompt_mask"], G, axis=0),
                                          rollout.tokens.reshape(B * G, N), valid)
        return jnp.sum(logp, axis=1).reshape(B, G)

    def __call__(self, x, batch, key) -> jax.Array:
        return -jnp.mean(self.sample(x, batch, key).reward)
