"""A real-coded genetic algorithm, evosax-compatible: tournament selection, SBX, polynomial mutation.

Deb & Agrawal, "Simulated Binary Crossover for Continuous Search Space", Complex Systems 9, 1995 (SBX);
Deb & Goyal 1996 (bounded polynomial mutation); the operators as in NSGA-II (Deb et al. 2002) and
pymoo. Elitism keeps the `num_elites` best members unchanged. Fitness is a loss: lower is better.

Subclasses evosax's `PopulationBasedAlgorithm`, so `init/ask/tell` and the state/params dataclasses
behave like every evosax algorithm (and `gfo.optim.search.strategies.EvosaxStrategy` drives it by name, "GA").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
    PopulationBasedAlgorithm,
    State as BaseState,
    metrics_fn,
)
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct


@struct.dataclass
class State(BaseState):
    population: jax.Array  # [P, D]
    fitness: jax.Array  # [P]


@struct.dataclass
class Params(BaseParams):
    crossover_rate: float  # probability that a pair of parents is recombined
    eta_crossover: float  # SBX distribution index η_c (larger: children closer to parents)
    eta_mutation: float  # polynomial-mutation distribution index η_m
    mutation_rate: float  # per-gene mutation probability; < 0 means 1 / D
    lower: jax.Array  # lower bound(s) of the genes
    upper: jax.Array  # upper bound(s)


def tournament(key: jax.Array, fitness: jax.Array, n: int, size: int) -> jax.Array:
    """Indices `[n]` of the winners (lowest loss) of `n` tournaments of `size` random members."""
    entrants = jax.random.randint(key, (n, size), 0, fitness.shape[0])
    return jnp.take_along_axis(entrants, jnp.argmin(fitness[entrants], axis=1)[:, None], axis=1)[:, 0]


def sbx(key: jax.Array, p1: jax.Array, p2: jax.Array, eta: float, rate: float, lower, upper):
    """Simulated binary crossover of two parents `[D]`: two children, genes swapped w.p. 1/2."""
    k_u, k_do, k_swap = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, p1.shape)
    beta = jnp.where(u <= 0.5, (2 * u) ** (1 / (eta + 1)), (1 / (2 * (1 - u) + 1e-12)) ** (1 / (eta + 1)))
    c1 = 0.5 * ((1 + beta) * p1 + (1 - beta) * p2)
    c2 = 0.5 * ((1 - beta) * p1 + (1 + beta) * p2)
    swap = jax.random.bernoulli(k_swap, 0.5, p1.shape)
    c1, c2 = jnp.where(swap, c2, c1), jnp.where(swap, c1, c2)
    do = jax.random.bernoulli(k_do, rate)
    c1, c2 = jnp.where(do, c1, p1), jnp.where(do, c2, p2)
    return jnp.clip(c1, lower, upper), jnp.clip(c2, lower, upper)


def polynomial_mutation(key: jax.Array, x: jax.Array, eta: float, rate: float, lower, upper):
    """Deb's bounded polynomial mutation of `x: [D]`, each gene w.p. `rate`."""
    k_u, k_do = jax.random.split(key)
    span = upper - lower
    d1, d2 = (x - lower) / span, (upper - x) / span
    u = jax.random.uniform(k_u, x.shape)
    power = 1.0 / (eta + 1.0)
    left = (2 * u + (1 - 2 * u) * (1 - d1) ** (eta + 1)) ** power - 1
    right = 1 - (2 * (1 - u) + 2 * (u - 0.5) * (1 - d2) ** (eta + 1)) ** power
    delta = jnp.where(u < 0.5, left, right)
    mutate = jax.random.bernoulli(k_do, rate, x.shape)
    return jnp.clip(jnp.where(mutate, x + delta * span, x), lower, upper)


class GeneticAlgorithm(PopulationBasedAlgorithm):
    """Elitist real-coded GA with tournament selection, SBX crossover and polynomial mutation."""

    def __init__(self, population_size: int, solution, tournament_size: int = 2, num_elites: int = 1,
                 fitness_shaping_fn: Callable = identity_fitness_shaping_fn, metrics_fn: Callable = metrics_fn):
        super().__init__(population_size, solution, fitness_shaping_fn, metrics_fn)
        if not 0 <= num_elites < population_size:
            raise ValueError(f"GA num_elites={num_elites}: expected 0 <= num_elites < population_size="
                             f"{population_size}")
        if tournament_size < 1:
            raise ValueError(f"GA tournament_size={tournament_size} must be >= 1")
        self.tournament_size = tournament_size
        self.n_elites = num_elites

    @property
    def _default_params(self) -> Params:
        return Params(crossover_rate=0.9, eta_crossover=15.0, eta_mutation=20.0, mutation_rate=-1.0,
                      lower=jnp.asarray(-5.0), upper=jnp.asarray(5.0))

    def _init(self, key: jax.Array, params: Params) -> State:
        return State(population=jnp.full((self.population_size, self.num_dims), jnp.nan),
                     fitness=jnp.full((self.population_size,), jnp.inf),
                     best_solution=jnp.full((self.num_dims,), jnp.nan), best_fitness=jnp.inf,
                     generation_counter=0)

    def _ask(self, key: jax.Array, state: State, params: Params):
        P, E = self.population_size, self.n_elites
        n_pairs = -(-(P - E) // 2)
        k_sel, k_x, k_m = jax.random.split(key, 3)
        fitness = jnp.where(jnp.isnan(state.fitness), jnp.inf, state.fitness)
        parents = tournament(k_sel, fitness, 2 * n_pairs, self.tournament_size)
        p1, p2 = state.population[parents[0::2]], state.population[parents[1::2]]
        cross = lambda k, a, b: sbx(k, a, b, params.eta_crossover, params.crossover_rate,  # noqa: E731
                                    params.lower, params.upper)
        c1, c2 = jax.vmap(cross)(jax.random.split(k_x, n_pairs), p1, p2)
        children = jnp.concatenate([c1, c2], axis=0)[: P - E]
        rate = jnp.where(params.mutation_rate < 0, 1.0 / self.num_dims, params.mutation_rate)
        mutate = lambda k, c: polynomial_mutation(k, c, params.eta_mutation, rate,  # noqa: E731
                                                  params.lower, params.upper)
        children = jax.vmap(mutate)(jax.random.split(k_m, P - E), children)
        elites = state.population[jnp.argsort(fitness)[:E]]
        return jnp.concatenate([elites, children], axis=0), state

    def _tell(self, key: jax.Array, population, fitness, state: State, params: Params) -> State:
        return state.replace(population=population, fitness=fitness)
