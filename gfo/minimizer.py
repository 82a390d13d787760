"""`gfo.minimize` (module `gfo.minimizer`): any gfo optimizer on any JAX function of a pytree, in one call.

    res = gfo.minimize(lambda x: jnp.sum((x - 3) ** 2), jnp.zeros(10), method="cma_es",
                       steps=300, key=jax.random.key(0), popsize=16, sigma=0.5)
    res.x, res.fun, res.history      # best point, its value, best-so-far value per step

Methods: "adam", "sgd" (exact gradient), "spsa"/"zo_sgd", "zo_adam", "forward_grad", "open_es"/"es",
"lowrank_es", "ga", and every evosax algorithm by name ("cma_es", "sep_cma_es", "snes", "pgpe", "de"
→ DifferentialEvolution, "pso", "simulated_annealing", …). `fun(x) -> scalar` is minimised.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gfo.estimators import SPSA, Backprop, ForwardGrad, LowRankES, OpenES
from gfo.optimizer import Optimizer
from gfo.strategies import EvosaxStrategy, resolve_name

ALIASES = {"de": "DifferentialEvolution", "ga": "GA", "simulated_annealing": "SimulatedAnnealing",
           "cma": "CMA_ES", "sep_cma": "Sep_CMA_ES"}


@dataclasses.dataclass
class MinimizeResult:
    x: Any  # best point found (same structure as x0)
    fun: float  # its value
    history: np.ndarray  # [steps] best value found up to and including each step
    nfev: int  # function evaluations used
    method: str


def make_optimizer(method: str, x0, lr: float = 1e-2, sigma: float = 0.1, popsize: int = 32,
                   batch_size: int | None = None, options: dict | None = None, **kwargs):
    """The gfo optimizer `minimize` uses for `method` (exposed for scripts that drive `step` themselves).

    Gradient-type methods take `lr`, `sigma` (perturbation size: SPSA's ε, the ES σ), `popsize`
    (ES population, SPSA/forward-gradient queries `n` = kwargs) and estimator fields as kwargs; evosax
    methods take `popsize`, `sigma` (as `std_init` where the algorithm has it), `options` (constructor)
    and `params` (its params dataclass) as kwargs.
    """
    m = method.lower()
    if m in ("adam", "sgd"):
        return Optimizer(Backprop(), optax.adam(lr) if m == "adam" else optax.sgd(lr))
    if m in ("spsa", "zo_sgd", "mezo", "zo_adam"):
        est = SPSA(eps=sigma, **kwargs)
        return Optimizer(est, optax.adam(lr) if m == "zo_adam" else optax.sgd(lr))
    if m == "forward_grad":
        return Optimizer(ForwardGrad(**kwargs), optax.sgd(lr))
    if m in ("open_es", "es"):
        return Optimizer(OpenES(population=popsize, sigma=sigma, batch_size=batch_size, **kwargs), optax.adam(lr))
    if m == "lowrank_es":
        kwargs.setdefault("factored", False)  # a generic function cannot take LowRankKernel leaves
        return Optimizer(LowRankES(population=popsize, sigma=sigma, batch_size=batch_size, **kwargs),
                         optax.adam(lr))
    name = resolve_name(ALIASES.get(m, method))
    params = kwargs.pop("params", None)
    if kwargs:
        raise ValueError(f"minimize(method={method!r}) got unexpected options {sorted(kwargs)}; pass the "
                         "algorithm's constructor arguments as options={...} and its params as params={...}")
    return EvosaxStrategy(name, popsize, x0, options=options, params=params, init_std=sigma,
                          batch_size=batch_size)


def minimize(fun: Callable[[Any], jax.Array], x0, method: str = "cma_es", steps: int = 100,
             key: jax.Array | None = None, **options) -> MinimizeResult:
    """Minimise `fun(x) -> scalar` from `x0` for `steps` steps of `method` (see the module doc).

    The whole run is one jitted `lax.scan`; the best point is tracked inside it (for gradient-type
    methods by evaluating `fun` at every iterate, one extra evaluation per step).
    """
    if steps < 1:
        raise ValueError(f"minimize steps={steps} must be >= 1")
    key = jax.random.key(0) if key is None else key
    x0 = jax.tree.map(jnp.asarray, x0)
    opt = make_optimizer(method, x0, **options)
    k_init, k_run = jax.random.split(key)
    state = opt.init(k_init, x0)
    best_x, best_f, history, nfev = _run(opt, _Objective(fun), state, x0, jax.random.split(k_run, steps))
    return MinimizeResult(x=best_x, fun=float(best_f), history=np.asarray(history), nfev=int(nfev),
                          method=method)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(opt, objective, state, x0, keys):
    is_strategy = isinstance(opt, EvosaxStrategy)
    f0 = objective(x0, None, None).astype(jnp.float32)

    def body(carry, key):
        state, best_x, best_f, nfev = carry
        state, metrics = opt.step(state, objective, None, key)
        cand = opt.best_solution(state) if is_strategy else opt.solution(state)
        if is_strategy:
            value, extra = metrics["best_loss"].astype(jnp.float32), 0
        else:
            value, extra = objective(cand, None, None).astype(jnp.float32), 1
        better = value < best_f
        best_x = jax.tree.map(lambda c, b: jnp.where(better, c, b), cand, best_x)
        best_f = jnp.where(better, value, best_f)
        return (state, best_x, best_f, nfev + metrics["evaluations"] + extra), best_f

    (_, best_x, best_f, nfev), history = jax.lax.scan(body, (state, x0, f0, jnp.int32(1)), keys)
    return best_x, best_f, history, nfev


@dataclasses.dataclass(frozen=True)
class _Objective:
    """`fun(x)` in the `objective(x, batch, key)` form; hashable by `fun` so that steps are jitted once."""

    fun: Callable

    def __call__(self, x, batch, key):
        del batch, key
        return self.fun(x)
