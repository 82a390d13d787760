"""The leaf-by-leaf update (`gfo.optim.update`): equal to the whole-tree update for every noise estimator and
elementwise transform, blocked leaves included; one leaf's gradient in memory instead of the tree's;
transforms whose state is not per-leaf refused."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfo
from gfo.optim.update import Direction, leafwise_update
from gfo.jitting import register_object_pytree
from gfo.optim.noise import member_key
from gfo.optim.population import leaf_noise_direction


class Quadratic:
    """`Σ_leaves Σ (x − c)² · s`, a loss over a dict of leaves (one stacked under `layers/`)."""

    def __init__(self, c):
        self.c = c

    def __call__(self, x, batch, key):
        return sum(jnp.sum((x[k] - self.c[k]) ** 2 * (1.0 + 0.1 * i)) for i, k in enumerate(sorted(x)))


register_object_pytree(Quadratic)


def _tree(key, scale=1.0, sizes=((37, 8), (3, 6, 5), (7,))):
    names = ("embed", "layers/mlp/fc/kernel", "final_norm/scale")
    keys = jax.random.split(key, len(names))
    return {n: scale * jax.random.normal(k, s) for n, k, s in zip(names, keys, sizes)}


ESTIMATORS = {
    "spsa": lambda: gfo.SPSA(eps=1e-2, n=3),
    "spsa_sparse_sign": lambda: gfo.SPSA(eps=1e-2, n=2, sparsity=0.5, sign=True),
    "es": lambda: gfo.OpenES(population=8, sigma=0.05, batch_size=4, noise_map=(("scale$", "frozen"),)),
    # the embedding full-rank, so that its update is made in blocks too
    "lowrank_es": lambda: gfo.LowRankES(population=8, sigma=0.05, rank=2, batch_size=4, factored=False,
                                        noise_map=(("^embed$", "full"),)),
}
TRANSFORMS = {
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    # a chain, Adam's moments and counts, and a schedule's count (a state of scalars only)
    "adam_l2": lambda: optax.chain(optax.add_decayed_weights(1e-2),
                                   optax.adam(optax.linear_schedule(1e-2, 1e-3, 10))),
}


# Every estimator × transform, with blocks of 16 elements (the vector leaf stays whole, the others are
# made in blocks); one case in the fast tier.
FAST = {("es", "sgd_momentum")}
CASES = [pytest.param(e, t, id=f"{e}-{t}", marks=() if (e, t) in FAST else pytest.mark.slow)
         for e in sorted(ESTIMATORS) for t in sorted(TRANSFORMS)]


@pytest.mark.parametrize("estimator,transform", CASES)
def test_leafwise_update_equals_the_whole_tree_update(estimator, transform, monkeypatch):
    monkeypatch.setattr(importlib.import_module("models.linear"), "NOISE_BLOCK_ELEMENTS", 16)
    x0, c = _tree(jax.random.key(0)), _tree(jax.random.key(1), 0.5)
    results = []
    for leafwise in (False, True):
        opt = gfo.Optimizer(ESTIMATORS[estimator](), TRANSFORMS[transform](), leafwise=leafwise)
        state = opt.init(jax.random.key(2), x0)
        for step in range(2):  # the second step reads the first one's optax state (moments, count)
            state, metrics = opt.step(state, Quadratic(c), None, jax.random.key(10 + step))
        results.append((state, metrics))
    (whole, m_whole), (leafwise, m_leaf) = results
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(leafwise)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert sorted(m_whole) == sorted(m_leaf)
    for k in ("grad_norm", "update_norm", "snr_cosine"):
        if k in m_whole:
            np.testing.assert_allclose(float(m_leaf[k]), float(m_whole[k]), rtol=1e-4)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(whole.x), jax.tree.leaves(x0)))
    assert moved > 1e-4  # the steps did update the point


def _update_temp_bytes(leafwise: bool, x, transform, n_directions: int) -> int:
    """XLA's temporary bytes of one donated update of `x` along `n_directions` noise directions."""
    def make(operands, path, w):
        weights, key = operands
        return leaf_noise_direction(weights, lambda d: member_key(key, d), path, w)

    def update(x, opt_state, weights, key):
        direction = Direction(make, (weights, key))
        if leafwise:
            return leafwise_update(transform, direction, x, opt_state)[:2]
        g, _ = direction.tree(x)
        u, opt_state = transform.update(g, opt_state, x)
        return optax.apply_updates(x, u), opt_state

    lowered = jax.jit(update, donate_argnums=(0, 1)).lower(x, transform.init(x), jnp.ones((n_directions,)),
                                                           jax.random.key(0))
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [False, True],
                         ids=["whole leaves", "blocked leaves"])
def test_leafwise_update_holds_one_leafs_gradient_not_the_trees(blocked, monkeypatch):
    leaf = 1 << 18  # 1 MiB of float32 per leaf
    if blocked:  # each leaf regenerated and updated in blocks of 1/8 of it (a quarter of the forward's block)
        monkeypatch.setattr(importlib.import_module("models.linear"), "NOISE_BLOCK_ELEMENTS", leaf // 2)

    def tree(n_leaves):
        return {f"w{i:02d}": jnp.full((leaf // 512, 512), 0.1 * i, jnp.float32) for i in range(n_leaves)}

    transform = optax.adam(1e-3)  # its moments are sliced per leaf (and per block)
    whole = [_update_temp_bytes(False, tree(n), transform, 4) for n in (2, 8)]
    leafwise = [_update_temp_bytes(True, tree(n), transform, 4) for n in (2, 8)]
    assert whole[1] - whole[0] >= 6 * leaf * 4  # a leaf more of gradient per leaf: the tree is built, then transformed
    assert leafwise[1] <= 1.05 * leafwise[0]  # one leaf at a time: the same memory for 8 leaves as for 2
    # one leaf's two half-sums, g, its update and its noise's random bits — a few leaves' worth whatever the
    # size of the tree; with blocks, the same of one block (a block is 1/8 of a leaf)
    assert leafwise[1] <= (10 * leaf // 8 if blocked else 9 * leaf) * 4


@pytest.mark.slow
def test_a_transform_whose_state_is_not_per_leaf_is_refused():
    def init(params):
        return jnp.zeros((2,))  # neither parameter-shaped nor a scalar

    def update(updates, state, params=None):
        return updates, state

    transform = optax.GradientTransformation(init, update)
    with pytest.raises(ValueError, match=r"leafwise=True.*cannot be applied leaf by leaf"):
        gfo.Optimizer(gfo.SPSA(eps=1e-2), transform, leafwise=True)
    x0, c = _tree(jax.random.key(0)), _tree(jax.random.key(1))
    with pytest.warns(UserWarning, match="whole pseudo-gradient tree"):  # the default falls back, saying so
        opt = gfo.Optimizer(gfo.SPSA(eps=1e-2), transform)
    assert not opt.leafwise
    state, _ = opt.step(opt.init(jax.random.key(0), x0), Quadratic(c), None, jax.random.key(1))
    with pytest.raises(ValueError, match=r"shape \(2,\).*leafwise=False"):  # forced, the update refuses it
        leafwise_update(transform, gfo.SPSA(eps=1e-2).direction(Quadratic(c), x0, None, jax.random.key(1))[0], x0,
                        init(x0))


@pytest.mark.parametrize("transform, elementwise", [
    (lambda: optax.sgd(1e-2, momentum=0.9), True), (lambda: optax.adam(1e-3), True),
    (lambda: optax.adamw(1e-3, weight_decay=0.1), True),
    (lambda: optax.chain(optax.add_decayed_weights(0.01), optax.adam(1e-2)), True),
    (lambda: optax.adam(optax.linear_schedule(1e-3, 0.0, 100)), True),
    (lambda: optax.chain(optax.clip(1.0), optax.sgd(1e-2)), True),
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), False),
    (lambda: optax.lamb(1e-3), False), (lambda: optax.lars(1e-2), False), (lambda: optax.adafactor(1e-3), False),
    (lambda: optax.chain(optax.add_noise(0.1, 0.5, 0), optax.sgd(1e-2)), False)])
def test_the_leafwise_default_is_decided_by_running_the_transform(transform, elementwise):
    from gfo.optim.update import is_elementwise

    assert is_elementwise(transform()) is elementwise


def test_gfo_train_builds_leafwise_optimizers_for_the_noise_estimators():
    from gfo.optim import registry as methods
    from gfo.run.config import OptimizerSection

    for method in ("spsa", "es", "lowrank_es"):
        section = OptimizerSection(method=method, transform="adam", lr=1e-3)
        opt = methods.lookup(method).build(section, methods.Context(x0=None))
        assert opt.leafwise and hasattr(opt.estimator, "direction")
