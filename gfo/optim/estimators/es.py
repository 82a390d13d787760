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
With `factored` (by default as the objective declares: an objective over a `Full` space) a member's `x + s σ ε` reaches the
model as `models.linear.NoisyLeaf` leaves and the noise is drawn inside the forward, one (stacked) layer at
a time; an antithetic pair draws its direction once. The update regenerates `ε_p` direction by direction
into a float32 accumulator, leaf by leaf (a block of rows of a large leaf at a time), and is handed to the
step as a `gfo.optim.update.Direction`, which a leafwise step applies before making the next leaf's.
Diagnostics: `snr_cosine`, the cosine between the estimates of the two halves of the directions, and
the fitness spread (`loss_std`, `loss_range`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.update import Direction
from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.noise import DISTRIBUTIONS, KeyTable, MemberKeys, leaf_kind, member_key, perturbed_leaf
from gfo.optim.population import PopulationConfig, leaf_noise_direction
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import PopulationSection, knob

__all__ = ["OpenES", "PopulationConfig"]


@dataclasses.dataclass(frozen=True)
class OpenES(PerturbingEstimator, PopulationConfig):
    distribution: str = "gaussian"  # or "rademacher", or "auto" (rademacher on CPU: models.noise.resolve_distribution)

    def __post_init__(self):
        super().__post_init__()
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"OpenES distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}")

    def _frozen(self, path, w) -> bool:
        return leaf_kind(path, w, self.noise_map, lambda _: "full") == "frozen"

    def perturb(self, x, direction_key, scale):
        """`x + scale · ε(direction_key)`: `NoisyLeaf` leaves (drawn inside the forward) when `factored`;
        `direction_key` a key or a `KeyTable` of `x`'s leaves."""
        keys = direction_key if isinstance(direction_key, KeyTable) else KeyTable(direction_key, x)
        return jax.tree_util.tree_map_with_path(
            lambda p, w: w if self._frozen(p, w) else perturbed_leaf(keys, p, w, scale, self.distribution,
                                                                     self.factored), x)

    def direction(self, objective, x, batch, key):
        """`(Direction, metrics)`: the population evaluated, `g` described leaf by leaf (`gfo.optim.update`)."""
        noise_key, eval_key = jax.random.split(key)  # every member sees the same eval key

        tables = MemberKeys(noise_key, self.n_directions, x)  # every direction's leaf keys at once (if small)

        def member_loss(direction, sign, member):
            return objective(self.perturb(x, tables.member(direction), sign * self.sigma),
                             self.member_batch(batch, member), eval_key)

        _, shaped, metrics = self.evaluate(member_loss)
        weights = self.direction_weights(shaped) / (self.population * self.sigma)
        return Direction(self._leaf_direction, (weights, tables)), metrics

    def _leaf_direction(self, operands, path, w):
        """One leaf's `(Σ_p w_p ε_p, halves' dots)` — `LeafBlocks` for a large leaf — zero where frozen
        (`gfo.optim.population.leaf_noise_direction`)."""
        weights, tables = operands
        if self._frozen(path, w):
            return jnp.zeros(jnp.shape(w), jnp.result_type(w)), None
        return leaf_noise_direction(weights, tables.member, path, w, self.distribution,
                                    None, self.batch_size, self.pop_sharding)


@dataclasses.dataclass
class ESSection(PopulationSection):
    """`optimizer: {method: es, sigma: 1e-3, population: 32, transform: adam, lr: 1e-2}` (OpenAI-ES)."""

    distribution: str = knob("gaussian", None, "ε's distribution: gaussian | rademacher | auto")


register(estimator_method("es", OpenES, ESSection, splits_population=True))
