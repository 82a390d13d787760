"""evosax strategies and our GA through gfo's protocol; the memory guard; gfo.minimize."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfo
from gfo.ga import polynomial_mutation, sbx, tournament
from gfo.minimizer import _Objective
from gfo.strategies import STRATEGIES, EvosaxStrategy, StrategyMemoryError

ALLOW_RANK_PROMOTION = True  # evosax's internals broadcast implicitly

SPHERE = _Objective(lambda x: jnp.sum((x["a"] - 0.5) ** 2) + jnp.sum((x["b"] + 0.25) ** 2))
X0 = {"a": jnp.zeros(4), "b": jnp.zeros((2,))}
NEEDS = {"RandomSearch": {"sampling_fn": lambda key: jax.random.normal(key, (6,))},
         "SV_CMA_ES": {"num_populations": 2}, "SV_Open_ES": {"num_populations": 2}}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_steps_under_scan_with_a_stable_state(name):
    """Two steps inside `lax.scan`: the state is a fixed-type carry and the best loss is the running min."""
    opt = EvosaxStrategy(name, 8, X0, options=NEEDS.get(name))
    keys = jax.random.split(jax.random.key(0), 2)
    state, metrics = jax.lax.scan(lambda s, k: opt.step(s, SPHERE, None, k), opt.init(jax.random.key(1), X0), keys)
    best = np.asarray(metrics["best_loss"])
    assert np.all(np.isfinite(best)) and best[1] <= best[0] + 1e-6
    assert best[1] <= float(np.max(metrics["loss_min"])) + 1e-6
    assert int(state.step) == 2
    chex.assert_trees_all_equal_structs(opt.solution(state), X0)
    chex.assert_tree_all_finite(opt.solution(state))


def test_cma_es_solves_rosenbrock_10d():
    """Reference: pycma reaches ~1e-18 (float64), evosax CMA_ES ~1e-12 (float32) in 8,000 evaluations."""
    def rosenbrock(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    best = [gfo.minimize(rosenbrock, jnp.zeros(10), method="cma_es", steps=500, popsize=16, sigma=0.5,
                         key=jax.random.key(seed)).fun for seed in range(5)]
    print("CMA-ES 10-D Rosenbrock best values:", best)
    assert np.median(best) < 1e-8


@pytest.mark.parametrize("method", ["adam", "sgd", "spsa", "zo_adam", "forward_grad", "open_es", "lowrank_es",
                                    "ga", "cma_es", "sep_cma_es", "snes", "pgpe", "de", "pso"])
def test_minimize_improves_on_a_quadratic(method):
    res = gfo.minimize(lambda x: jnp.sum((x - 0.5) ** 2), jnp.zeros(6), method=method, steps=60, lr=0.05,
                       sigma=0.1, popsize=16, key=jax.random.key(0))
    assert res.history.shape == (60,)
    assert np.all(np.diff(res.history) <= 0)  # best-so-far never rises
    assert res.fun < 0.2 * 1.5  # from 1.5 at x0 = 0
    assert res.nfev > 60


def test_minimize_errors():
    with pytest.raises(ValueError, match="Did you mean 'CMA_ES'"):
        gfo.minimize(lambda x: jnp.sum(x ** 2), jnp.zeros(3), method="cmaes")
    with pytest.raises(ValueError, match="options \\['num_populations'\\]"):
        gfo.minimize(lambda x: jnp.sum(x ** 2), jnp.zeros(3), method="sv_cma_es")
    with pytest.raises(ValueError, match="no params \\['stdinit'\\]"):
        EvosaxStrategy("CMA_ES", 8, jnp.zeros(3), params={"stdinit": 1.0})
    with pytest.raises(ValueError, match="does not accept options \\['optimiser'\\]"):
        EvosaxStrategy("Open_ES", 8, jnp.zeros(3), options={"optimiser": optax.adam(1e-2)})


def test_memory_guard_refuses_oversized_requests_with_the_numbers():
    x0 = jax.ShapeDtypeStruct((200_000,), jnp.float32)  # never allocated
    with pytest.raises(StrategyMemoryError, match=r"dim² = 40,000,000,000.*Subspace.*lowrank_es"):
        EvosaxStrategy("CMA_ES", 16, x0, memory_limit=8 * 2**30)
    with pytest.raises(StrategyMemoryError, match=r"population × dim = 100000 × 200,000"):
        EvosaxStrategy("Sep_CMA_ES", 100_000, x0, memory_limit=8 * 2**30)
    EvosaxStrategy("Sep_CMA_ES", 16, jnp.zeros(200_000), memory_limit=8 * 2**30)  # diagonal: fits


def test_ga_operators():
    key = jax.random.key(0)
    fitness = jnp.array([3.0, 1.0, 2.0, 0.5])
    winners = tournament(key, fitness, 1000, size=4)
    assert np.mean(np.asarray(winners) == 3) > 0.6  # the best member wins most 4-way tournaments
    p1, p2 = jnp.full(50, -1.0), jnp.full(50, 1.0)
    c1, c2 = sbx(key, p1, p2, eta=15.0, rate=1.0, lower=-2.0, upper=2.0)
    np.testing.assert_allclose(c1 + c2, p1 + p2, atol=1e-5)  # SBX preserves the parents' mean
    assert np.all(np.abs(np.asarray(c1)) <= 2.0)
    x = jnp.linspace(-0.9, 0.9, 1000)
    y = polynomial_mutation(key, x, eta=20.0, rate=1.0, lower=-1.0, upper=1.0)
    assert np.all(np.abs(np.asarray(y)) <= 1.0) and np.all(np.asarray(y) != np.asarray(x))
    assert float(jnp.mean(jnp.abs(y - x))) < 0.1  # η = 20 keeps children near their parent


def test_ga_minimises_rastrigin_better_than_its_start():
    def rastrigin(x):
        return 10 * x.shape[0] + jnp.sum(x ** 2 - 10 * jnp.cos(2 * jnp.pi * x))

    res = gfo.minimize(rastrigin, jnp.full(5, 2.5), method="ga", steps=150, popsize=40, sigma=1.0,
                       params={"lower": -5.12, "upper": 5.12}, key=jax.random.key(0))
    assert res.fun < 5.0 < float(rastrigin(jnp.full(5, 2.5)))
