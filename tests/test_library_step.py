"""The library door: every registered method honours the whole protocol, and a script gets the lean step
(descriptors from the objective, the leafwise update, a planned chunk) with no extra arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfo
import models
from gfo.optim import registry as methods
from gfo.run.config import OptimizerSection
from gfo.optim.evaluate import METRICS
from gfo.jitting import register_object_pytree
from gfo.optim.protocol import Estimator, OptimizerProtocol
from gfo.rollout import Rollout

ALLOW_RANK_PROMOTION = True  # evosax internals
N = 1 << 20  # a 4 MiB frozen array: the objective's, traced (not baked into the executable)


class Frozen:
    """`Σ (x − c[:4])² + 0·Σc`: a loss with a large frozen array `c` (a pytree child)."""

    def __init__(self, c):
        self.c = c

    def __call__(self, x, batch, key):
        del batch, key
        w = x if not isinstance(x, dict) else x["w"]
        return jnp.sum((w.astype(jnp.float32) - self.c[: w.shape[0]]) ** 2) + 0.0 * self.c[-1]


class ToyReward:
    """A reward task for policy gradient: reward `[1, 2]` from the key, `log π = Σ x · c[:4]` (differentiable)."""

    def __init__(self, c):
        self.c, self.reference = c, None

    def sample(self, x, batch, key):
        reward = jax.random.normal(key, (1, 2))
        return Rollout(jnp.zeros((1, 2, 1), jnp.int32), jnp.ones((1, 2), jnp.int32), reward)

    def log_prob(self, x, batch, rollout):
        return jnp.broadcast_to(jnp.sum(x * self.c[:4]), (1, 2)) * jnp.array([[1.0, -1.0]])

    def __call__(self, x, batch, key):
        return -jnp.mean(self.sample(x, batch, key).reward)


register_object_pytree(Frozen)
register_object_pytree(ToyReward)

# every method of the registry, and evosax strategies by name (in the slow tier: the slowest to compile;
# tests/test_strategies.py steps every evosax strategy in the fast one)
REGISTERED = sorted(methods.METHODS) + [pytest.param("CMA_ES", marks=pytest.mark.slow),
                                       pytest.param("SNES", marks=pytest.mark.slow),
                                       pytest.param("ga", marks=pytest.mark.slow)]


def _built(name: str):
    spec = methods.lookup(name)
    common = dict(population=8, sigma=0.05, eps=0.05, lr=0.01, n=2)  # each where the method's section has it
    section = OptimizerSection(method=name, **{k: v for k, v in common.items() if k in spec.fields})
    if spec.domain == "tokens":
        x0 = jnp.array([3, 1, 4, 1], jnp.int32)
        return spec, spec.build(section, methods.Context(x0=x0, vocab=tuple(range(8)))), x0
    x0 = jnp.ones(4)
    return spec, spec.build(section, methods.Context(x0=x0)), x0


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_method_honours_the_whole_protocol(name):
    spec, opt, x0 = _built(name)
    assert isinstance(opt, OptimizerProtocol)
    if spec.family == "estimator":
        assert isinstance(opt.estimator, Estimator)
    c = jax.random.normal(jax.random.key(1), (N,))
    objective = ToyReward(c) if spec.objective == "reward" else Frozen(c)
    state = opt.init(jax.random.key(0), x0)
    key, batch = jax.random.key(2), {"rows": jnp.zeros((8, 1))}  # (MeZO-SVRG draws mini-batches of rows)
    # frozen weights are arguments, not constants: the program is far smaller than the 4 MiB array (8 MB as text)
    assert len(opt.lower(state, objective, batch, key).as_text()) < N // 4
    kept = jax.tree.map(lambda v: np.array(v, copy=True), state)  # a host copy: what a checkpoint holds
    one, metrics = opt.step(state, objective, batch, key)
    donated = [v for v in jax.tree.leaves(state) if isinstance(v, jax.Array)]
    assert donated and any(v.is_deleted() for v in donated)  # the state is donated
    assert {"loss", "evaluations"} <= set(metrics)
    vocabulary = set(METRICS)
    assert all(np.all(np.isfinite(np.asarray(metrics[k]))) for k in ("loss",) if k in vocabulary)
    two, _ = opt.step(one, objective, batch, jax.random.key(3))
    # resume: the host copy restored and stepped twice gives the same state bit for bit
    restored = jax.tree.map(jnp.asarray, kept)
    again, _ = opt.step(opt.step(restored, objective, batch, key)[0], objective, batch, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(opt.solution(two)) == jax.tree.structure(x0)
    assert jax.tree.structure(opt.best_solution(two)) == jax.tree.structure(x0)
    shardings = opt.state_sharding(two, jax.make_mesh((1,), ("model",)))
    assert jax.tree.structure(shardings) == jax.tree.structure(two)


# ---------------------------------------------------------------- the lean step, decided by the library
@pytest.fixture(scope="module")
def script():
    """What a research script writes (README): a loss through the blocked `token_logprobs`, over `Full`."""
    model = models.TransformerLM(models.tiny("gpt2", d_model=64, n_layers=2, n_heads=4))
    params = model.init(jax.random.key(0))
    space = gfo.spaces.Full(params)

    def loss(p, batch, key):
        del key
        return -model.token_logprobs(p, batch["tokens"][:, :-1], batch["tokens"][:, 1:]).mean()

    batch = {"tokens": jax.random.randint(jax.random.key(3), (2, 17), 0, model.config.vocab_size, jnp.int32)}
    return space, loss, batch


def _temp_bytes(opt, objective, x0, batch):
    state = opt.init(jax.random.key(1), x0)
    return opt.lower(state, objective, batch, jax.random.key(2)).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("make", [pytest.param(lambda f: gfo.SPSA(eps=1e-3, factored=f), id="spsa", marks=pytest.mark.slow),
                                  pytest.param(lambda f: gfo.OpenES(population=8, sigma=1e-3, factored=f), id="openes",
                                               marks=pytest.mark.slow)])
def test_a_script_gets_the_in_forward_perturbation_from_its_objective(script, make):
    space, loss, batch = script
    x0 = space.init(jax.random.key(0))
    objective = gfo.OnSpace(loss, space)
    assert objective.leaf_descriptors and not gfo.OnSpace(loss, space, descriptors=False).leaf_descriptors
    default = gfo.Optimizer(make(None), optax.sgd(1e-3))
    assert default.leafwise and default.prepare(objective, x0, batch, jax.random.key(2)).factored is True
    plain = lambda x, b, k: objective(x, b, k)  # noqa: E731 - a bare function: perturbed arrays
    assert default.prepare(plain, x0, batch, jax.random.key(2)).factored is False
    lean, dense = (_temp_bytes(gfo.Optimizer(make(None), optax.sgd(1e-3)), objective, x0, batch),
                   _temp_bytes(gfo.Optimizer(make(False), optax.sgd(1e-3)), objective, x0, batch))
    x_bytes = sum(v.nbytes for v in jax.tree.leaves(x0))
    assert lean + 0.9 * x_bytes <= dense  # no perturbed copy of the parameters in the default step
    assert lean == _temp_bytes(gfo.Optimizer(make(True), optax.sgd(1e-3), leafwise=True), objective, x0, batch)


@pytest.mark.slow
def test_a_population_without_a_chunk_gets_one_from_the_budget_and_the_same_numbers(script, monkeypatch):
    from gfo.optim import plan

    space, loss, batch = script
    x0 = space.init(jax.random.key(0))
    objective = gfo.OnSpace(loss, space)
    member = plan.member_bytes(objective, x0, batch, jax.random.key(2))
    assert member > 0
    whole = gfo.Optimizer(gfo.OpenES(population=8, sigma=1e-2), optax.sgd(1e-2))
    assert whole.prepare(objective, x0, batch, jax.random.key(2)).batch_size is None  # all 8 fit the floor
    monkeypatch.setattr(plan, "FLOOR_BYTES", 3 * member)  # now only 3 members' activations fit
    monkeypatch.setattr(plan, "device_memory_limit", lambda mesh=None: (2**40, "test"))
    chunked = gfo.Optimizer(gfo.OpenES(population=8, sigma=1e-2), optax.sgd(1e-2))
    estimator = chunked.prepare(objective, x0, batch, jax.random.key(2))
    assert estimator.batch_size == 3  # ⌊3·member / member⌋ (the parameters are smaller than the floor)
    results = []
    for opt in (whole, chunked):
        state, metrics = opt.step(opt.init(jax.random.key(1), x0), objective, batch, jax.random.key(2))
        results.append((state.x, metrics["loss"]))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
