"""Policy gradient on sampled generations: REINFORCE with a group-mean baseline (GRPO-style).

Williams 1992 (REINFORCE); Shao et al., "DeepSeekMath" (GRPO), 2024, arXiv 2402.03300: for each
prompt a group of `G` completions is sampled; the advantage of completion `j` is
`(r_j − mean_group r) / (std_group r + 1e-6)` (or without the division, `normalize=False`), and the
pseudo-gradient is that of `−mean(A · log π(y|x)) + β · KL(π ‖ π_ref)` with the `k3` KL estimator
`exp(q) − q − 1`, `q = log π_ref − log π`. This is the RL baseline that ES is compared with; like every
gfo estimator it returns a gradient of a *loss* (negated reward) for an optax transformation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import Estimator
from gfo.optim.noise import tree_dot
from gfo.objectives import RewardObjective
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, NON_NEGATIVE, TransformSection, knob

__all__ = ["PolicyGradient", "RewardObjective"]


@dataclasses.dataclass(frozen=True)
class PolicyGradient(Estimator):
    """Takes a `gfo.objectives.RewardObjective` (objective kind "reward"), not a loss."""

    kl_coef: float = 0.0
    normalize: bool = True
    objective_kind = "reward"  # a class attribute, not a field

    def direction(self, objective: RewardObjective, x, batch, key):
        rollout = objective.sample(jax.lax.stop_gradient(x), batch, key)
        reward = jax.lax.stop_gradient(rollout.reward.astype(jnp.float32))  # [B, G]
        advantage = reward - reward.mean(axis=1, keepdims=True)
        if self.normalize:
            advantage = advantage / (reward.std(axis=1, keepdims=True) + 1e-6)
        ref = (jax.lax.stop_gradient(objective.log_prob(objective.reference, batch, rollout))
               if self.kl_coef > 0 else None)

        def surrogate(y):
            logp = objective.log_prob(y, batch, rollout)
            loss = -jnp.mean(advantage * logp)
            if ref is not None:
                q = ref - logp
                loss = loss + self.kl_coef * jnp.mean(jnp.exp(q) - q - 1.0)
            return loss

        grad = jax.grad(surrogate)(x)
        return grad, {"loss": -jnp.mean(reward), "reward": jnp.mean(reward),
                      "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "evaluations": reward.size}


@dataclasses.dataclass
class PolicyGradientSection(TransformSection):
    """`optimizer: {method: policy_gradient, group_size: 4, kl_coef: 0.0}` (GRPO-style REINFORCE)."""

    kl_coef: float = knob(0.0, NON_NEGATIVE, "weight of the KL penalty to the starting policy")
    group_size: int = knob(4, AT_LEAST_ONE, "completions sampled per prompt (the group baseline's group)")
    normalize: bool = knob(True, None, "divide each group's advantages by its reward std")


register(estimator_method("policy_gradient", PolicyGradient, PolicyGradientSection, read_elsewhere=("group_size",),
                          objective="reward"))
