"""RandOpt: one round of random guessing around the pretrained weights, and a vote of the best guesses.

Gan & Isola, "Neural Thickets: Diverse Task Experts Are Dense Around Pretrained Weights" (RandOpt),
2026, arXiv 2603.12228 — the baseline that recent ES papers compare with.

One round: sample `N` perturbations `θ_i = θ₀ + σ ε_i` (`ε_i` regenerated from `(key, i)`, never
stored), score each on the step's batch by the task's loss (a negated reward), keep the top-`K` (lowest
losses), and predict by the majority vote of the `K` members — an ensemble at inference. `step` performs
the round at step 0 and leaves the state unchanged afterwards (run it for 1 step). `solution(state)` is
the best single member; `members(state)` stacks all `K`; `vote(predictions)` is the majority vote (ties
go to the smallest label) used by `ensemble_metrics` for tasks that score classes (`class_scores`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from gfo.optim import shaping
from gfo.optim.evaluate import map_members
from gfo.jitting import filter_jit
from gfo.optim.noise import KeyTable, member_key, perturbed_leaf
from gfo.objectives import accepts_descriptors
from gfo.optim.protocol import fresh, parameter_sharding
import dataclasses

from gfo.optim.registry import Method, register
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, MethodSection, knob


@struct.dataclass
class RandOptState:
    x0: object  # the pretrained point θ₀
    noise_key: jax.Array  # uint32 key data of the round's perturbations
    top: jax.Array  # int32 [K] kept member ids, best first
    top_losses: jax.Array  # float32 [K]
    step: jax.Array


class RandOpt:
    def __init__(self, population: int = 64, sigma: float = 1e-3, top_k: int = 8, batch_size: int | None = None,
                 pop_sharding=None, distribution: str = "gaussian", factored: bool | None = None):
        if population < 1 or not 1 <= top_k <= population or sigma <= 0:
            raise ValueError(f"RandOpt population={population}, top_k={top_k}, sigma={sigma}: expected "
                             f"1 <= top_k <= population and sigma > 0")
        self.population, self.sigma, self.top_k = int(population), float(sigma), int(top_k)
        self.batch_size, self.pop_sharding, self.distribution = batch_size, pop_sharding, distribution
        # hand the objective NoisyLeaf leaves (members drawn inside the forward); None: as the objective declares
        self.factored = None if factored is None else bool(factored)

    def _id(self):
        return (self.population, self.sigma, self.top_k, self.batch_size, self.pop_sharding, self.distribution,
                self.factored)

    def __eq__(self, other) -> bool:
        return isinstance(other, RandOpt) and self._id() == other._id()

    def __hash__(self) -> int:
        return hash((RandOpt,) + self._id())

    def __repr__(self) -> str:
        return f"RandOpt(population={self.population}, top_k={self.top_k}, sigma={self.sigma})"

    def member(self, state: RandOptState, i):
        """`θ₀ + σ ε_i`, dense: the point `evaluated_member` evaluated (same float32 noise, same rounding)."""
        return self._perturbed(state, i, factored=False)

    def evaluated_member(self, state: RandOptState, i, objective=None):
        """`θ₀ + σ ε_i` as `objective` receives it: `NoisyLeaf` leaves (noise drawn in the forward) when
        `factored` (None: when the objective accepts descriptors), else dense."""
        factored = accepts_descriptors(objective) if self.factored is None else self.factored
        return self._perturbed(state, i, factored)

    def _perturbed(self, state: RandOptState, i, factored: bool):
        keys = KeyTable(member_key(jax.random.wrap_key_data(state.noise_key), i), state.x0)  # one draw
        return jax.tree_util.tree_map_with_path(
            lambda p, w: perturbed_leaf(keys, p, w, self.sigma, self.distribution, factored), state.x0)

    def init(self, key: jax.Array, x0) -> RandOptState:
        return fresh(RandOptState(x0=x0, noise_key=jax.random.key_data(key), top=jnp.full((self.top_k,), -1, jnp.int32),
                                  top_losses=jnp.full((self.top_k,), jnp.inf, jnp.float32),
                                  step=jnp.zeros((), jnp.int32)))  # own buffers: the step donates them

    @functools.partial(filter_jit, donate=(1,))
    def step(self, state: RandOptState, objective: Callable, batch, key: jax.Array):
        """The round at step 0, nothing afterwards; `state` is donated."""
        def round_(s):
            losses = map_members(lambda i: objective(self.evaluated_member(s, i, objective), batch, key),
                                 self.population,
                                 self.batch_size, self.pop_sharding)
            ranked = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
            order = jnp.argsort(ranked)[: self.top_k].astype(jnp.int32)
            clean, _ = shaping.sanitize(losses)
            return s.replace(top=order, top_losses=ranked[order]), {
                "loss": jnp.mean(clean), "loss_min": jnp.min(clean), "loss_std": jnp.sqrt(shaping.centered(losses)[1]),
                "loss_range": jnp.max(clean) - jnp.min(clean), "loss_top_k": jnp.mean(ranked[order]),
                "evaluations": jnp.int32(self.population)}

        def idle(s):
            zero = jnp.float32(0)
            return s, {"loss": jnp.mean(s.top_losses), "loss_min": s.top_losses[0], "loss_std": zero,
                       "loss_range": zero, "loss_top_k": jnp.mean(s.top_losses), "evaluations": jnp.int32(0)}

        new, metrics = jax.lax.cond(state.step == 0, round_, idle, state)
        return new.replace(step=state.step + 1), metrics

    def lower(self, state: RandOptState, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered:
        """The lowered step for these arguments (ahead-of-time compilation, XLA's memory analysis)."""
        return self.step.lower(state, objective, batch, key)

    def state_sharding(self, state: RandOptState, mesh):
        """The model-axis path rules: θ₀ is parameter-shaped; the ids and losses replicated."""
        return parameter_sharding(state, mesh)

    def best_solution(self, state: RandOptState):
        """The best member (the round's archive): the same point as `solution`."""
        return self.solution(state)

    def solution(self, state: RandOptState):
        """The best member (θ₀ before the round)."""
        best = self.member(state, jnp.maximum(state.top[0], 0))
        return jax.tree.map(lambda b, x: jnp.where(state.top[0] < 0, x, b), best, state.x0)

    def members(self, state: RandOptState):
        """The `K` kept members stacked on a leading axis `[K, ...]` (`K` copies of θ₀ before the round)."""
        members = jax.vmap(lambda i: self.member(state, i))(jnp.maximum(state.top, 0))
        return jax.tree.map(lambda m, x: jnp.where(state.top[0] < 0, jnp.broadcast_to(x, m.shape), m),
                            members, state.x0)


def vote(predictions: jax.Array, n_classes: int) -> jax.Array:
    """Majority vote over members: `predictions` int `[K, B]` → `[B]` (ties: the smallest label)."""
    counts = jax.nn.one_hot(predictions, n_classes, dtype=jnp.int32).sum(axis=0)  # [B, C]
    return jnp.argmax(counts, axis=-1)


def ensemble_metrics(task, model, to_params, members, batch) -> dict:
    """`vote_accuracy` of the members' majority vote on a batch of a task with `class_scores`."""
    scores = jax.vmap(lambda m: task.class_scores(model, to_params(m), batch))(members)  # [K, B, C]
    predicted = vote(jnp.argmax(scores, axis=-1), scores.shape[-1])
    return {"vote_accuracy": jnp.mean((predicted == batch["label"]).astype(jnp.float32))}


@dataclasses.dataclass
class RandOptSection(MethodSection):
    """`optimizer: {method: randopt, sigma: 1e-3, population: 64, top_k: 8}`."""

    sigma: float = knob(1e-2, POSITIVE, "noise scale σ of the candidates θ₀ + σ ε")
    population: int = knob(16, AT_LEAST_ONE, "candidates evaluated per step")
    top_k: int = knob(8, AT_LEAST_ONE, "best candidates kept (their ensemble votes at evaluation)")
    eval_chunk: int | None = knob(None, AT_LEAST_ONE, "candidates evaluated at once (None: planned from memory)")
    distribution: str = knob("gaussian", None, "ε's distribution: gaussian | rademacher | auto")


def _build(s: RandOptSection, ctx):
    return RandOpt(population=s.population, sigma=s.sigma, top_k=s.top_k, batch_size=s.eval_chunk,
                   pop_sharding=ctx.pop_sharding, distribution=s.distribution)


register(Method("randopt", "optimizer", RandOptSection, _build, splits_population=True))
