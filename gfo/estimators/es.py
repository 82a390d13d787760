"""OpenAI-ES with an implicit, seed-regenerated population.

Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning", 2017,
arXiv 1703.03864; reference `openai/evolution-strategies-starter` (`es_distributed/es.py`).

Member `i` of a population of `N` evaluates `x + s_i σ ε_{p(i)}` where, with antithetic sampling,
`p(i) = i // 2` and `s_i = ±1` by the parity of `i` (otherwise `p(i) = i`, `s_i = 1`); `ε_p` is
regenerated from `(key, p, leaf path)` and never stored for the population. With shaped losses `F`,
the pseudo-gradient of the loss is `g = Σ_i F_i s_i ε_{p(i)} / (N σ)` (antithetic: the pair sums
`(F_{2p} − F_{2p+1}) ε_p`), regenerated chunk by chunk, so memory is set by `batch_size`, not `N`.
Weight decay and the step rule come from the optax transformation. Note the `1/σ`: the reference's
update is `g_ref = Σ F ε / N = σ g`, so its coupled L2 `l2·θ` is `(l2/σ)·θ` on gfo's scale (see
`paper_configs/openai_es.yaml`).

`groups > 1` splits the population into `groups` blocks of consecutive members and the batch's leading
axis into `groups` parts: block `k` evaluates part `k` and is shaped on its own (EGGROLL / GRPO-style:
each prompt is answered by a group of members). `noise_map` (regex → `full` | `frozen`) freezes leaves.
Diagnostics: `snr_cosine`, the cosine between the estimates of the two halves of the directions, and the
fitness spread (`loss_std`, `loss_range`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo import shaping
from gfo.noise import check_noise_map, cosine, mapped_noise_like, member_key, tree_axpy, tree_dot
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
    groups: int = 1  # blocks of members, each on its own part of the batch, shaped within the block
    noise_map: tuple = ()  # ((regex, kind), ...): per-leaf noise kind, first match wins

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
        per = self.population // max(self.groups, 1)
        if self.groups < 1 or self.population % self.groups or (self.antithetic and per % 2):
            raise ValueError(f"groups={self.groups} must divide population={self.population} into blocks of "
                             f"equal size" + (" holding whole antithetic pairs" if self.antithetic else ""))
        object.__setattr__(self, "noise_map", check_noise_map(self.noise_map, self._noise_kinds))

    _noise_kinds = ("full", "frozen")

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

    def member_batch(self, batch, member):
        """The part of `batch` that `member` evaluates: all of it, or its group's `1/groups` slice."""
        if self.groups == 1:
            return batch
        group = member // (self.population // self.groups)

        def part(b):
            if b.shape[0] % self.groups:
                raise ValueError(f"groups={self.groups}: the batch's leading axis {b.shape[0]} (shape {b.shape}) "
                                 f"must be a multiple of the number of groups")
            return b.reshape((self.groups, b.shape[0] // self.groups) + b.shape[1:])[group]

        return jax.tree.map(part, batch)

    def evaluate(self, evaluate_member, n: int) -> tuple[jax.Array, jax.Array, dict]:
        """Losses `[N]` of all members, their shaped values, and metrics."""
        losses = map_members(evaluate_member, n, self.batch_size, self.pop_sharding)
        clean, bad = shaping.sanitize(losses)
        shaped = shaping.shape(losses, self.shaping, self.groups)
        metrics = {"loss": jnp.mean(clean), "loss_min": jnp.min(clean), "loss_std": jnp.sqrt(shaping.centered(losses)[1]),
                   "loss_range": jnp.max(clean) - jnp.min(clean), "nonfinite": bad, "evaluations": n}
        return losses, shaped, metrics

    def halves(self, weights: jax.Array, contract):
        """`(g, snr_cosine)`: `g = contract(w[:h], 0) + contract(w[h:], h)` over the two halves of the
        directions, and the cosine between the halves' estimates — one pass over the directions."""
        h = weights.shape[0] // 2
        if h == 0:  # one direction: no halves to compare
            return contract(weights, 0), jnp.float32(jnp.nan)
        first = contract(weights[:h], 0)
        second = contract(weights[h:], h)
        return jax.tree.map(jnp.add, first, second), cosine(first, second)


@dataclasses.dataclass(frozen=True)
class OpenES(PopulationConfig):
    distribution: str = "gaussian"

    def _noise(self, key, x):
        return mapped_noise_like(key, x, self.noise_map, self.distribution)

    def __call__(self, objective, x, batch, key):
        noise_key, eval_key = jax.random.split(key)  # every member sees the same eval key

        def evaluate(member):
            direction, sign = self.direction_and_sign(member)
            eps = self._noise(member_key(noise_key, direction), x)
            return objective(tree_axpy(sign * self.sigma, eps, x), self.member_batch(batch, member), eval_key)

        _, shaped, metrics = self.evaluate(evaluate, self.population)
        weights = self.direction_weights(shaped) / (self.population * self.sigma)
        total, snr = self.halves(weights, lambda w, offset: weighted_sum(
            w, lambda d: self._noise(member_key(noise_key, d + offset), x), self.batch_size, self.pop_sharding))
        grad = jax.tree.map(lambda t, u: t.astype(u.dtype), total, x)
        return grad, {**metrics, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "snr_cosine": snr}
