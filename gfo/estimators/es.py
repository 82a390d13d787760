"""OpenAI-ES with an implicit, seed-regenerated population.

Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning", 2017,
arXiv 1703.03864; reference `openai/evolution-strategies-starter` (`es_distributed/es.py`).

Member `i` of a population of `N` evaluates `x + s_i σ ε_{p(i)}` where, with antithetic sampling,
`p(i) = i // 2` and `s_i = ±1` by the parity of `i` (otherwise `p(i) = i`, `s_i = 1`); `ε_p` is
regenerated from `(key, p, leaf path)` and never stored for the population. With shaped losses `F`,
the pseudo-gradient of the loss is `g = Σ_i F_i s_i ε_{p(i)} / (N σ)` (antithetic: the pair sums
`(F_{2p} − F_{2p+1}) ε_p`), regenerated chunk by chunk, so memory is set by `batch_size`, not `N`.
Weight decay and the step rule come from the optax transformation (OpenAI-ES: Adam on `g + l2·x`,
i.e. `optax.adamw` or `optax.chain(optax.add_decayed_weights(l2), optax.adam(lr))`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo import shaping
from gfo.noise import member_key, noise_like, tree_axpy, tree_dot
from gfo.population import map_members, weighted_sum


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """Settings shared by the population estimators (validated once, here)."""

    population: int = 32
    sigma: float = 0.02
    antithetic: bool = True
    shaping: str = "centered_ranks"
    batch_size: int | None = None  # members evaluated at once (memory knob); None = all
    pop_sharding: object = None  # a `jax.sharding.Sharding` over the mesh's `pop` axis, or None

    def __post_init__(self):
        if self.population < 2 or (self.antithetic and self.population % 2):
            raise ValueError(f"population={self.population}: expected an integer >= 2"
                             + (", even with antithetic sampling" if self.antithetic else ""))
        if self.sigma <= 0:
            raise ValueError(f"sigma={self.sigma} must be > 0")
        if self.shaping not in shaping.SHAPINGS:
            raise ValueError(f"shaping={self.shaping!r}: expected one of {shaping.SHAPINGS}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 or None")

    @property
    def n_directions(self) -> int:
        return self.population // 2 if self.antithetic else self.population

    def direction_and_sign(self, member):
        if self.antithetic:
            return member // 2, 1.0 - 2.0 * (member % 2).astype(jnp.float32)
        return member, jnp.float32(1.0)

    def direction_weights(self, shaped: jax.Array) -> jax.Array:
        """Per-direction weights `Σ_{i: p(i)=p} F_i s_i`, shape `[n_directions]`."""
        if self.antithetic:
            return shaped[0::2] - shaped[1::2]
        return shaped

    def evaluate(self, evaluate_member, n: int) -> tuple[jax.Array, jax.Array, dict]:
        """Losses `[N]` of all members, their shaped values, and metrics."""
        losses = map_members(evaluate_member, n, self.batch_size, self.pop_sharding)
        clean, bad = shaping.sanitize(losses)
        shaped = shaping.shape(losses, self.shaping)
        metrics = {"loss": jnp.mean(clean), "loss_min": jnp.min(clean), "loss_std": jnp.std(clean),
                   "nonfinite": bad, "evaluations": n}
        return losses, shaped, metrics


@dataclasses.dataclass(frozen=True)
class OpenES(PopulationConfig):
    distribution: str = "gaussian"

    def __call__(self, objective, x, batch, key):
        noise_key, eval_key = jax.random.split(key)  # every member sees the same batch and eval key

        def evaluate(member):
            direction, sign = self.direction_and_sign(member)
            eps = noise_like(member_key(noise_key, direction), x, self.distribution)
            return objective(tree_axpy(sign * self.sigma, eps, x), batch, eval_key)

        _, shaped, metrics = self.evaluate(evaluate, self.population)
        weights = self.direction_weights(shaped) / (self.population * self.sigma)
        total = weighted_sum(weights, lambda d: noise_like(member_key(noise_key, d), x, self.distribution),
                             self.batch_size, self.pop_sharding)
        grad = jax.tree.map(lambda t, u: t.astype(u.dtype), total, x)
        return grad, {**metrics, "grad_norm": jnp.sqrt(tree_dot(grad, grad))}
