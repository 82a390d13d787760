"""`gfo.minimize` (module `gfo.optim.minimize`): any gfo optimizer on any JAX function of a pytree, in one call.

    res = gfo.minimize(lambda x: jnp.sum((x - 3) ** 2), jnp.zeros(10), method="cma_es",
                       steps=300, key=jax.random.key(0), popsize=16, sigma=0.5)
    res.x, res.fun, res.history      # best point, its value, best-so-far value per step

Methods: "adam", "sgd" (exact gradient), "spsa"/"zo_sgd", "zo_adam", "forward_grad", "open_es"/"es",
"lowrank_es", every method of the registry `gfo.optim.registry` by its config name ("lozo", "hizoo", …; with
Adam), "ga", and every evosax algorithm by name ("cma_es", "sep_cma_es", "snes", "pgpe", "de"
→ DifferentialEvolution, "pso", "simulated_annealing", …). `fun(x) -> scalar` is minimised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gfo.optim import registry as methods

from gfo import jitting
from gfo.jitting import filter_jit

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

    Built by the method registry (`gfo.optim.registry`), as `gfo train` builds it, from the method's own
    config section (`gfo.optim.sections`) with `lr`, `sigma` (the method's perturbation scale: the ES / evosax
    σ, SPSA's `eps`), `popsize` (`population`) and `batch_size` (`eval_chunk`) where the section has them; the
    defaults here suit functions of unit scale. Any other field of the section (`n`, `rank`, `antithetic`,
    `shaping`, …) is a keyword argument; evosax methods take `options` (constructor) and `params` (its
    params dataclass). A generic function cannot take low-rank kernel leaves, so `lowrank_es` is dense here.
    """
    name, transform = methods.MINIMIZE_ALIASES.get(method.lower(), (method.lower(), "adam"))
    spec = methods.lookup(name)
    declared = set(spec.fields)
    if spec.family != "evosax" and options:
        kwargs = {**options, **kwargs}
        options = None
    given = {"lr": lr, "population": popsize, "eval_chunk": batch_size, "transform": transform,
             "sigma" if "sigma" in declared else "eps": sigma, "options": dict(options or {}),
             "params": dict(kwargs.pop("params", None) or {})}
    unknown = sorted(set(kwargs) - declared)
    if unknown:
        raise ValueError(f"minimize(method={method!r}) got unexpected options {unknown}: the method has "
                         f"{sorted(declared)}" + ("; pass the algorithm's constructor arguments as options={...} "
                                                  "and its params as params={...}" if spec.family == "evosax" else ""))
    fields = {**{k: v for k, v in given.items() if k in declared}, **kwargs}
    section = spec.section(method=spec.name, **fields)
    section.check_ranges("minimize")
    return spec.build(section, methods.Context(x0=x0))


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
    jitting.release_compiled_programs()  # every call compiles a new run: a loop of calls stays under the map limit
    k_init, k_run = jax.random.split(key)
    state = opt.init(k_init, x0)
    best_x, best_f, history, nfev = _run(opt, _Objective(fun), state, x0, jax.random.split(k_run, steps))
    return MinimizeResult(x=best_x, fun=float(best_f), history=np.asarray(history), nfev=int(nfev),
                          method=method)


@filter_jit  # (no donation: the run's outputs are the best point and history, not the state)
def _run(opt, objective, state, x0, keys):
    f0 = objective(x0, None, None).astype(jnp.float32)

    def body(carry, key):
        state, best_x, best_f, nfev = carry
        state, metrics = opt.step(state, objective, None, key)
        cand = opt.best_solution(state)
        if "best_loss" in metrics:  # a best-so-far archive whose loss the step reports
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
    """`fun(x)` in the `objective(x, batch, key)` form."""

    fun: Callable

    def __call__(self, x, batch, key):
        del batch, key
        return self.fun(x)
