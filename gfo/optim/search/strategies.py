"""evosax strategies (and our GA) behind gfo's optimizer protocol, with a memory guard.

    opt = EvosaxStrategy("CMA_ES", population=16, x0_template=x0, params={"std_init": 0.5})
    state = opt.init(key, x0)
    state, metrics = opt.step(state, objective, batch, key)   # ask → evaluate (chunked) → tell
    x = opt.solution(state)                                   # the current point (the mean; x0 before a tell)
    x = opt.best_solution(state)                              # the best point evaluated so far
    (`step` takes its state donated: keep only the returned state)

Any algorithm of `evosax.algorithms` by name (case-insensitive), plus "GA" (`gfo.optim.search.ga`). `options` go
to the algorithm's constructor, `params` replace fields of its `default_params`; unknown names are
errors that list what the algorithm accepts. `init_std` (σ) reaches every algorithm through the field
that sets its scale: the constructor's `std_schedule` (a constant σ: Open_ES, ARS, SimpleGA, …), else
the params' `std_init` (CMA-ES, SNES, …); for population-based algorithms it is also the spread of the
first generation around `x0`. A distribution-based algorithm with neither field refuses a σ.
`solution(state)` is the current point for every algorithm: the search distribution's mean
(distribution-based; `x0` before the first `tell`) or the best member of the current population
(population-based; `x0` before the first `tell`), never evosax's NaN-initialised archive. These algorithms hold a dense `[population, dim]`
population and some a `[dim, dim]` covariance, so they are for modest spaces (LoRA on a few layers,
soft prompts, subspaces): before anything is allocated the guard compares their footprint with
`memory_limit` bytes and refuses with the numbers and a smaller space or estimator to use instead.
Losses are minimised; non-finite losses are ranked worst (set to the worst finite loss) and counted.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from evosax import algorithms as evosax_algorithms
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from evosax.core.fitness_shaping import standardize_fitness_shaping_fn
from flax import struct
from jax.flatten_util import ravel_pytree

from gfo.optim import shaping
from gfo.optim.search.ga import GeneticAlgorithm
from gfo.optim.evaluate import evaluate_population
from gfo.jitting import filter_jit
from gfo.optim.protocol import fresh, replicated_sharding

STRATEGIES: dict[str, type] = {**evosax_algorithms.algorithms, "GA": GeneticAlgorithm}
# Algorithms whose state holds dim × dim matrices (covariance, its eigenbasis, or a transform).
# Algorithms whose initial spread is their covariance `C` (std_schedule is only a floor added to it).
INITIAL_COVARIANCE = {"iAMaLGaM_Full", "iAMaLGaM_Univariate"}
FULL_MATRIX = {"CMA_ES", "SV_CMA_ES", "xNES", "MA_ES", "iAMaLGaM_Full", "CMAAnchoredLES"}


class StrategyMemoryError(MemoryError):
    """An evosax strategy whose population or covariance would not fit in memory."""


def resolve_name(name: str) -> str:
    by_lower = {k.lower(): k for k in STRATEGIES}
    key = name.lower().replace("-", "_")
    if key in by_lower:
        return by_lower[key]
    close = difflib.get_close_matches(key, list(by_lower), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else ""
    raise ValueError(f"unknown evosax strategy {name!r}.{hint} Available: {sorted(STRATEGIES)}")


def default_memory_limit() -> int:
    """Half of the first device's memory (accelerators) or of the machine's RAM (CPU), in bytes."""
    device = jax.local_devices()[0]  # only this process's devices report their memory
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def required_bytes(name: str, population: int, dim: int, itemsize: int = 4) -> int:
    """Rough footprint of a strategy: ~3 population-sized buffers and, for full-matrix methods, ~4
    `dim²` matrices (covariance, eigenvectors, the eigendecomposition's workspace)."""
    return itemsize * (3 * population * dim + (4 * dim * dim if name in FULL_MATRIX else 0))


def check_memory(name: str, population: int, dim: int, limit: int) -> None:
    need = required_bytes(name, population, dim)
    if need > limit:
        detail = f"population × dim = {population} × {dim:,}"
        if name in FULL_MATRIX:
            detail += f" and dim² = {dim * dim:,} (its {dim:,} × {dim:,} matrices)"
        raise StrategyMemoryError(
            f"evosax strategy {name!r} needs about {need / 2**30:.2f} GiB for {detail}, over the limit of "
            f"{limit / 2**30:.2f} GiB. Search a smaller space (spaces.LoRA with a low rank on a few "
            f"layers, spaces.Prompt, or spaces.Subspace(dim=...)), a diagonal method (Sep_CMA_ES, SNES), "
            f"or use the implicit-population estimators 'es' / 'lowrank_es', whose memory does not grow "
            f"with the population.")


@struct.dataclass
class StrategyState:
    es_state: Any
    es_params: Any
    initial_population: Any  # population-based algorithms: evaluated at step 0 instead of ask
    step: jax.Array
    x0: Any = None  # the starting point: the solution before the first tell


def _accepted(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "population_size",
                                                                                "solution")}


class EvosaxStrategy:
    """An evosax algorithm (or "GA") as a gfo optimizer over the raveled space."""

    def __init__(self, name: str, population: int, x0_template, options: dict | None = None,
                 params: dict | None = None, init_std: float | None = None, batch_size: int | None = None,
                 memory_limit: int | None = None, pop_sharding=None):
        self.name = resolve_name(name)
        cls = STRATEGIES[self.name]
        options = dict(options or {})
        if options.get("fitness_shaping_fn") is standardize_fitness_shaping_fn:
            # evosax's standardize computes E[x²] − E[x]²: wrong for tightly spread losses. Same map, stable.
            options["fitness_shaping_fn"] = shaping.stable_standardize
        unknown = set(options) - _accepted(cls)
        if unknown:
            raise ValueError(f"{self.name} does not accept options {sorted(unknown)}; its constructor takes "
                             f"{sorted(_accepted(cls))}")
        required = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
                    and name not in ("self", "population_size", "solution")} - set(options)
        if required:
            raise ValueError(f"{self.name} needs options {sorted(required)} (constructor arguments without "
                             f"defaults); pass them as options={{...}}")
        self.dim = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(x0_template))
        if population < 2:
            raise ValueError(f"{self.name} population={population} must be >= 2")
        check_memory(self.name, population, self.dim, memory_limit or default_memory_limit())
        self.population = population
        self.options = options
        self.algorithm = cls(population_size=population, solution=x0_template, **options)
        fields = {f.name for f in dataclasses.fields(self.algorithm.default_params)}
        unknown = set(params or {}) - fields
        if unknown:
            raise ValueError(f"{self.name} has no params {sorted(unknown)}; its params are {sorted(fields)}")
        self.params_overrides = dict(params or {})
        self.distribution_based = isinstance(self.algorithm, DistributionBasedAlgorithm)
        self.scale_field = self._route_scale(cls, init_std, fields, x0_template, population, options)
        self.init_std = 1.0 if init_std is None else float(init_std)
        self.batch_size = batch_size
        self.pop_sharding = pop_sharding
        # SV_* algorithms run `num_populations` particles of `population` members each.
        self.n_particles = getattr(self.algorithm, "num_populations", 0)
        self.n_evaluations = getattr(self.algorithm, "total_population_size", population)

    def _route_scale(self, cls, init_std, fields, x0_template, population, options) -> str | None:
        """Give σ to the field the algorithm samples with; the name of that field (None: no σ given)."""
        if init_std is None:
            return None
        import optax

        takes_schedule = "std_schedule" in inspect.signature(cls.__init__).parameters
        if self.name in INITIAL_COVARIANCE and "std_schedule" not in options:
            # iAMaLGaM samples from N(m, C + std²I) with C = I at the start: σ sets C, the floor is 0.
            self.algorithm = cls(population_size=population, solution=x0_template,
                                 std_schedule=optax.constant_schedule(0.0), **options)
            return "C (initial covariance σ²I)"
        if takes_schedule and "std_schedule" not in options:  # Open_ES & co. sample with std_schedule(t)
            self.algorithm = cls(population_size=population, solution=x0_template,
                                 std_schedule=optax.constant_schedule(float(init_std)), **options)
            return "std_schedule"
        if self.name == "GradientlessDescent":  # samples radii in [radius_min, radius_max]
            self.params_overrides.setdefault("radius_max", init_std)
            return "radius_max"
        if takes_schedule:
            return "std_schedule (options)"
        if "std_init" in fields:
            self.params_overrides.setdefault("std_init", init_std)
            return "std_init"
        if self.distribution_based:
            raise ValueError(f"{self.name} has no scale field (neither a std_schedule option nor a std_init "
                             f"param) to receive sigma={init_std}; set its own params instead "
                             f"({sorted(fields)}) and leave sigma unset")
        return "initial population"

    def __repr__(self) -> str:
        return f"EvosaxStrategy({self.name!r}, population={self.population}, dim={self.dim})"

    def _identity(self):
        leaves = jax.tree_util.tree_flatten_with_path(self.algorithm.solution)[0]
        template = tuple((jax.tree_util.keystr(p), tuple(v.shape), str(v.dtype)) for p, v in leaves)
        return (self.name, self.population, template, tuple(sorted(self.options.items(), key=str)),
                repr(sorted(self.params_overrides.items())), self.init_std, self.batch_size, self.pop_sharding)

    # Equal configurations compare and hash equal, so jitted steps compile once per configuration.
    def __eq__(self, other) -> bool:
        return isinstance(other, EvosaxStrategy) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def _es_params(self):
        overrides = {k: (jnp.asarray(v) if isinstance(v, (int, float, list, tuple)) else v)
                     for k, v in self.params_overrides.items()}
        return self.algorithm.default_params.replace(**overrides)

    def init(self, key: jax.Array, x0) -> StrategyState:
        es_params = self._es_params()
        k_init, k_pop = jax.random.split(key)
        if self.distribution_based and self.n_particles:  # Stein variational: one mean per particle
            means = jax.tree.map(lambda v: v[None] + self.init_std * jax.random.normal(
                k_pop, (self.n_particles,) + v.shape, v.dtype), x0)
            es_state = self.algorithm.init(k_init, means, es_params)
            initial = None
        elif self.distribution_based:
            es_state = self.algorithm.init(k_init, x0, es_params)
            initial = None
            if self.name == "xNES":  # evosax samples mean + std·z@B with B = std_init·I: σ² without this
                es_state = es_state.replace(B=jnp.eye(self.dim, dtype=es_state.B.dtype))
            if self.scale_field and self.scale_field.startswith("C ("):
                c = es_state.C
                es_state = es_state.replace(C=jnp.asarray(self.init_std ** 2, c.dtype) * c)
        else:
            flat, unravel = ravel_pytree(x0)
            noise = jax.random.normal(k_pop, (self.population, self.dim), flat.dtype)
            pop = flat[None, :] + self.init_std * noise
            if hasattr(es_params, "lower"):
                pop = jnp.clip(pop, es_params.lower, es_params.upper)
            initial = jax.vmap(unravel)(pop)
            es_state = self.algorithm.init(k_init, initial, jnp.full((self.population,), jnp.inf), es_params)
        return fresh(StrategyState(es_state=es_state, es_params=es_params, initial_population=initial,
                                   step=jnp.zeros((), jnp.int32), x0=x0))

    @functools.partial(filter_jit, donate=(1,))
    def step(self, state: StrategyState, objective: Callable, batch, key: jax.Array):
        """ask → evaluate (`gfo.optim.evaluate.evaluate_population`) → tell. `state` is donated: do not reuse it."""
        k_ask, k_tell, k_eval = jax.random.split(key, 3)
        population, es_state = self.algorithm.ask(k_ask, state.es_state, state.es_params)
        if state.initial_population is not None:  # generation 0 of a population-based algorithm
            population = jax.tree.map(lambda a, b: jnp.where(state.step == 0, b, a),
                                      population, state.initial_population)
        losses, metrics = evaluate_population(
            lambda i: objective(jax.tree.map(lambda p: p[i], population), batch, k_eval), self.n_evaluations,
            batch_size=self.batch_size, pop_sharding=self.pop_sharding)
        clean, bad = shaping.sanitize(losses)
        if self.n_particles:  # SV_* `ask` returns [total, ...] but `tell` wants [particles, members, ...]
            population = jax.tree.map(lambda p: p.reshape((self.n_particles, -1) + p.shape[1:]), population)
        told, _ = self.algorithm.tell(k_tell, population, clean, es_state, state.es_params)
        # Every member non-finite: no information (and `clean` is all zeros, which evosax would archive as
        # a perfect loss): keep the state as it was.
        es_state = jax.tree.map(lambda new, old: jnp.where(bad == losses.shape[0], old, new), told, es_state)
        metrics = {**metrics, "best_loss": jnp.min(es_state.best_fitness)}
        return state.replace(es_state=es_state, step=state.step + 1), metrics

    def lower(self, state: StrategyState, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered:
        """The lowered step for these arguments (ahead-of-time compilation, XLA's memory analysis)."""
        return self.step.lower(state, objective, batch, key)

    def state_sharding(self, state: StrategyState, mesh):
        """Replicated: the state holds dense populations and covariances over the raveled space, whose
        axes are not parameter axes (the model-axis path rules do not apply)."""
        return replicated_sharding(state, mesh)

    def solution(self, state: StrategyState):
        """The current point: the mean (distribution-based; the first particle's for SV_*) or the best
        member of the current population (population-based); `x0` before the first `tell`."""
        if self.distribution_based:
            current = self.algorithm.get_mean(state.es_state)
            if self.n_particles:
                current = jax.tree.map(lambda v: v[0], current)
        else:
            pop, fit = state.es_state.population, state.es_state.fitness
            current = self.algorithm._unravel_solution(pop[jnp.argmin(jnp.where(jnp.isfinite(fit), fit, jnp.inf))])
        if state.x0 is None:
            return current
        return jax.tree.map(lambda c, x: jnp.where(state.step == 0, x.astype(c.dtype), c), current, state.x0)

    def best_solution(self, state: StrategyState):
        """The best point evaluated so far (evosax's archive; NaN before the first `tell`)."""
        best = state.es_state.best_solution
        if self.n_particles:  # one archive per particle
            best = best[jnp.argmin(state.es_state.best_fitness)]
        return self.algorithm._unravel_solution(best)

    def mean(self, state: StrategyState):
        """The search distribution's mean (distribution-based algorithms; one per particle for SV_*)."""
        return self.algorithm.get_mean(state.es_state)
