"""ZO-SGD-Cons, LOZO, HiZOO, MeZO-SVRG and RandOpt against their definitions (and grouped shaping,
per-leaf noise maps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfo
from gfo.optim import shaping
from gfo.optim.search.randopt import vote
from gfo.optim.noise import member_key, noise_like, tree_axpy
from gfo.optim.update import Direction

CENTER = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.5, -0.25, 1.0])}
CURV = {"w": jnp.linspace(0.5, 2.0, 12).reshape(4, 3), "b": jnp.array([1.0, 3.0, 0.5])}
X = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def quadratic(x, batch=None, key=None):
    """`½ Σ c (x − m − shift)²`; `batch["shift"]` `[B]` (optional) moves the centre per row (mean over rows)."""
    shift = jnp.zeros((1,)) if batch is None else batch["shift"]
    per_row = lambda s: 0.5 * sum(jnp.sum(CURV[k] * (x[k] - CENTER[k] - s) ** 2) for k in ("w", "b"))  # noqa: E731
    return jnp.mean(jax.vmap(per_row)(shift))


TRUE_GRAD = jax.grad(quadratic)(X)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k])) for k in ("w", "b")])


def _unbiased(samples, expected, limit=4.5):
    samples = np.asarray(samples)
    se = samples.std(0) / np.sqrt(len(samples))
    z = np.abs(samples.mean(0) - expected) / se
    assert np.all(z < limit), f"max |bias| / standard error = {z.max():.2f}"


# ---------------------------------------------------------------- ZO-SGD-Cons
def test_zo_sgd_cons_keeps_the_best_of_three_candidates_and_never_increases_the_loss():
    opt = gfo.ZOSGDCons(gfo.SPSA(eps=1e-3), lr=0.02)
    state = opt.init(jax.random.key(0), X)
    key = jax.random.key(1)
    new, metrics = opt.step(state, quadratic, None, key)
    g, _ = gfo.SPSA(eps=1e-3)(quadratic, X, None, jax.random.split(key)[0])
    candidates = [X, tree_axpy(-0.02, g, X), tree_axpy(0.02, g, X)]
    best = int(np.argmin([float(quadratic(c)) for c in candidates]))
    assert int(metrics["cons_choice"]) == best
    np.testing.assert_allclose(_flat(new.x), _flat(candidates[best]), atol=1e-6)
    losses = [float(quadratic(X))]
    state = opt.init(jax.random.key(0), X)  # the step donated the first state
    for t in range(60):
        state, _ = opt.step(state, quadratic, None, jax.random.key(t))
        losses.append(float(quadratic(state.x)))
    assert np.all(np.diff(losses) <= 1e-6) and losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- LOZO
def test_lozo_matrix_perturbation_has_rank_r_and_v_is_kept_for_nu_steps():
    est = gfo.LOZO(rank=2, nu=5)
    root = jax.random.wrap_key_data(est.init(jax.random.key(0), X))
    z = lambda u, t: est.perturbation(X, jax.random.key(u), jax.random.fold_in(root, t // 5))["w"]  # noqa: E731
    assert np.linalg.matrix_rank(np.asarray(z(1, 0))) == 2
    # same period: the column space (V's span) is shared; next period: it changes
    def row_space(m):
        return np.linalg.svd(np.asarray(m))[2][:2]
    same = np.linalg.svd(row_space(z(1, 0)) @ row_space(z(2, 4)).T, compute_uv=False)
    other = np.linalg.svd(row_space(z(1, 0)) @ row_space(z(2, 5)).T, compute_uv=False)
    np.testing.assert_allclose(same, 1.0, atol=1e-5)
    assert other.min() < 0.99


def test_lozo_is_unbiased_over_u_and_v():
    """`E[d · UVᵀ / r] = ∇` when V is redrawn (one sample per V period), vectors: ordinary SPSA."""
    est = gfo.LOZO(eps=1e-3, rank=2, nu=1)
    v_root = est.init(jax.random.key(0), X)
    one = jax.jit(jax.vmap(lambda k, t: _stack(_tree(est.estimate(quadratic, X, None, k, v_root, t)[0], X))))
    keys = jax.random.split(jax.random.key(1), 20000)
    samples = jnp.concatenate([one(keys[i:i + 2000], jnp.arange(i, i + 2000)) for i in range(0, 20000, 2000)])
    _unbiased(samples, _flat(TRUE_GRAD))


def _stack(tree):
    return jnp.concatenate([jnp.ravel(tree["w"]), jnp.ravel(tree["b"])])


def _tree(g, x):
    """An estimate as a tree: a `Direction` made whole (`gfo.optim.update.Direction.tree`), a tree as it is."""
    return g.tree(x)[0] if isinstance(g, Direction) else g


# ---------------------------------------------------------------- HiZOO
def test_hizoo_estimate_is_the_sigma_preconditioned_gradient():
    """With α = 0 the Hessian estimate h is fixed and E[g] = Σ ∇L = ∇L / h."""
    est = gfo.HiZOO(eps=1e-3, alpha=0.0)
    h = {"w": jnp.linspace(0.5, 4.0, 12).reshape(4, 3), "b": jnp.array([2.0, 0.25, 1.0])}
    one = jax.jit(jax.vmap(lambda k: _stack(_tree(est.estimate(quadratic, X, None, k, h, 0)[0], X))))
    keys = jax.random.split(jax.random.key(2), 20000)
    samples = jnp.concatenate([one(keys[i:i + 2000]) for i in range(0, 20000, 2000)])
    _unbiased(samples, _flat(jax.tree.map(jnp.divide, TRUE_GRAD, h)))


def test_hizoo_hessian_update_follows_its_definition_and_tracks_the_curvature():
    est = gfo.HiZOO(eps=1e-2, alpha=0.1)
    h0 = est.init(jax.random.key(0), X)
    key = jax.random.key(3)
    grad, metrics, h1 = est.estimate(quadratic, X, None, key, h0, 0)
    noise_key, _ = jax.random.split(key)
    z = noise_like(noise_key, jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), X))
    u = jax.tree.map(lambda zz, hh: zz / jnp.sqrt(hh), z, h0)
    lp, lm, l0 = quadratic(tree_axpy(1e-2, u, X)), quadratic(tree_axpy(-1e-2, u, X)), quadratic(X)
    c = (lp + lm - 2 * l0) / (2 * 1e-4)
    expected = jax.tree.map(lambda hh, zz: 0.9 * hh + 0.1 * jnp.abs(c * hh * (zz * zz - 1)), h0, z)
    np.testing.assert_allclose(_flat(h1), _flat(expected), rtol=1e-3)
    np.testing.assert_allclose(float(metrics["curvature"]), float(c), rtol=1e-3)
    # Its signed part is the Stein estimate of diag H under N(0, Σ): mean c·h(z² − 1) over draws ≈ curvature.
    def signed(k):
        nk, _ = jax.random.split(k)
        zz = noise_like(nk, jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), X))
        uu = jax.tree.map(lambda a, hh: a / jnp.sqrt(hh), zz, h1)
        cc = (quadratic(tree_axpy(1e-2, uu, X)) + quadratic(tree_axpy(-1e-2, uu, X)) - 2 * quadratic(X)) / 2e-4
        return _stack(jax.tree.map(lambda hh, a: cc * hh * (a * a - 1), h1, zz))

    samples = jax.jit(jax.vmap(signed))(jax.random.split(jax.random.key(4), 20000))
    _unbiased(samples, _flat(CURV))


@pytest.mark.parametrize("power", [pytest.param(1.0, marks=pytest.mark.slow), -0.5])
def test_a_noisy_leaf_multiplier_is_read_wherever_the_noise_is(power):
    """`NoisyLeaf(..., mul=m, mul_power=p)` is `w + s·ε ⊙ m^p` as every reader forms it: dense, the rows an
    embedding lookup reads, `noisy_linear` a block at a time (input and transposed output rows), a layer
    sliced as the scan slices it."""
    from models.linear import NoisyLeaf, embed_lookup, noisy_linear
    from gfo.optim.noise import leaf_noise_keys, perturbed_leaf

    w = jax.random.normal(jax.random.key(0), (7, 5))
    m = jnp.exp(jax.random.normal(jax.random.key(1), (7, 5)))
    key, s = jax.random.key(2), 0.3
    noisy = perturbed_leaf(key, (), w, s, mul=m, mul_power=power)
    eps = NoisyLeaf(w, leaf_noise_keys(key, (), w), jnp.float32(s)).noise()
    expected = w + s * eps * m ** power
    np.testing.assert_allclose(np.asarray(noisy.dense()), np.asarray(expected), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(perturbed_leaf(key, (), w, s, "gaussian", False, m, power)),
                               np.asarray(expected), rtol=1e-6, atol=1e-6)
    ids = jnp.array([[3, 0], [6, 3]])
    np.testing.assert_allclose(np.asarray(embed_lookup(noisy, ids, jnp.float32)), np.asarray(expected[ids]), rtol=1e-6,
                               atol=1e-6)
    x = jax.random.normal(jax.random.key(3), (4, 7))
    np.testing.assert_allclose(np.asarray(noisy_linear(x, noisy, jnp.float32, block_elements=10)),
                               np.asarray(x @ expected), rtol=1e-5, atol=1e-5)  # 2 rows a block, the last overlapping
    y = jax.random.normal(jax.random.key(4), (4, 5))
    np.testing.assert_allclose(np.asarray(noisy_linear(y, noisy.transpose(), jnp.float32, block_elements=10)),
                               np.asarray(y @ expected.T), rtol=1e-5, atol=1e-5)  # a tied head's blocks of columns
    np.testing.assert_allclose(np.asarray(noisy.transpose().dense()), np.asarray(expected.T), rtol=1e-6, atol=1e-6)
    path = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("fc"))  # stacked: one key per layer
    stacked_w, stacked_m = jnp.stack([w, 2 * w]), jnp.stack([m, m + 1])
    stacked = perturbed_leaf(key, path, stacked_w, s, mul=stacked_m, mul_power=power)
    layer = jax.tree.map(lambda t: t[1], stacked)  # what lax.scan over the layer axis hands layer 1
    np.testing.assert_allclose(np.asarray(layer.dense()), np.asarray(stacked.dense()[1]), rtol=1e-6, atol=1e-6)
    assert perturbed_leaf(key, (), w, s).mul is None  # every plain perturbation is as before
    with pytest.raises(ValueError, match="multiplier has shape"):
        perturbed_leaf(key, (), w, s, mul=m[:3])


@pytest.fixture(scope="module")
def tiny_script():
    """A loss through a tiny `models.TransformerLM` (tied head, blocked `token_logprobs`) over `gfo.spaces.Full`."""
    import models

    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=2, n_heads=2))
    space = gfo.spaces.Full(model.init(jax.random.key(0)))

    def loss(p, batch, key):
        del key
        return -model.token_logprobs(p, batch["tokens"][:, :-1], batch["tokens"][:, 1:]).mean()

    batch = {"tokens": jax.random.randint(jax.random.key(3), (2, 9), 0, model.config.vocab_size, jnp.int32)}
    return gfo.OnSpace(loss, space), space.init(jax.random.key(0)), batch


def _estimate_tree(est, objective, x, batch, key, state, step):
    g, metrics, state = est.estimate(objective, x, batch, key, state, step)
    g, stats = g.tree(x) if isinstance(g, Direction) else (g, {})
    return g, {**metrics, **stats}, state


def _assert_same_estimates(make, objective, x, batch, state, step, rtol):
    assert objective.leaf_descriptors and make(None).for_objective(objective).factored is True
    run = lambda f: jax.jit(lambda k: _estimate_tree(make(f), objective, x, batch, k, state, step))(  # noqa: E731
        jax.random.key(5))
    (g_in, m_in, s_in), (g_out, m_out, s_out) = run(True), run(False)
    for a, b in zip(jax.tree.leaves((g_in, s_in)), jax.tree.leaves((g_out, s_out))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))
    assert sorted(m_in) == sorted(m_out)
    for k in m_in:
        np.testing.assert_allclose(float(m_in[k]), float(m_out[k]), rtol=10 * rtol, atol=1e-7)
    assert float(m_in["grad_norm"]) > 0


def _step_temp_bytes(est, objective, x, batch, leafwise=None) -> int:
    """XLA's temporary bytes of one `gfo.Optimizer(est, sgd)` step (the state donated)."""
    opt = gfo.Optimizer(est, optax.sgd(1e-3), leafwise=leafwise)
    state = opt.init(jax.random.key(1), x)
    return opt.lower(state, objective, batch, jax.random.key(2)).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
def test_hizoo_in_the_forward_equals_hizoo_on_perturbed_weights(tiny_script, blocked, monkeypatch):
    """`z ⊙ h^{-1/2}` drawn inside the forward (`NoisyLeaf(..., mul=h, mul_power=−½)`) gives the estimate and
    Hessian update that the dense perturbed weights give; blocked: the embedding, the tied head and the
    layers' matrices read a block of rows at a time, and `h` and `g` are regenerated in blocks."""
    import importlib

    if blocked:
        monkeypatch.setattr(importlib.import_module("models.linear"), "NOISE_BLOCK_ELEMENTS", 1024)
    objective, x0, batch = tiny_script
    h = jax.tree.map(lambda w: jnp.exp(0.5 * jax.random.normal(jax.random.key(7), jnp.shape(w))), x0)
    _assert_same_estimates(lambda f: gfo.HiZOO(eps=1e-2, alpha=0.1, factored=f), objective, x0, batch, h, 0, 1e-5)


@pytest.mark.slow
def test_hizoo_in_the_forward_holds_no_perturbed_copy_of_the_parameters(tiny_script):
    objective, x0, batch = tiny_script
    temps = lambda f: _step_temp_bytes(gfo.HiZOO(eps=1e-3, alpha=1e-3, factored=f), objective, x0, batch)  # noqa: E731
    lean, dense = temps(None), temps(False)
    x_bytes = sum(v.nbytes for v in jax.tree.leaves(x0))
    assert lean + 0.9 * x_bytes <= dense  # neither the perturbed point nor z nor Σ^{1/2} z as a tree
    assert lean == temps(True)


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
def test_lozo_in_the_forward_equals_lozo_on_perturbed_weights(tiny_script, blocked, monkeypatch):
    """`LowRankKernel` / `NoisyLeaf` leaves give the estimate (three queries in a `lax.map`, made leaf by leaf)
    that dense perturbed weights give; blocked: matrices and vectors are made a block of rows at a time."""
    import importlib

    if blocked:
        monkeypatch.setattr(importlib.import_module("models.linear"), "NOISE_BLOCK_ELEMENTS", 64)
    objective, x0, batch = tiny_script
    est = gfo.LOZO(rank=2, nu=4)
    v_root = est.init(jax.random.key(6), x0)
    _assert_same_estimates(lambda f: gfo.LOZO(eps=0.05, rank=2, nu=4, n=3, factored=f), objective, x0, batch, v_root,
                           5, 1e-5)


@pytest.mark.slow
def test_lozo_leafwise_step_holds_no_gradient_tree(tiny_script):
    objective, x0, batch = tiny_script
    make = lambda f=None: gfo.LOZO(eps=1e-3, rank=2, factored=f)  # noqa: E731
    lean = _step_temp_bytes(make(), objective, x0, batch)
    whole = _step_temp_bytes(make(), objective, x0, batch, leafwise=False)
    dense = _step_temp_bytes(make(False), objective, x0, batch)
    x_bytes = sum(v.nbytes for v in jax.tree.leaves(x0))
    assert lean + 0.4 * x_bytes <= whole  # the whole-tree update builds g (a parameter-sized tree)
    assert lean < x_bytes and lean + 0.9 * x_bytes <= dense  # and no perturbed copy of the parameters


# ---------------------------------------------------------------- MeZO-SVRG
BATCH = {"shift": jnp.linspace(-0.5, 0.5, 8)}


def test_mezo_svrg_estimate_is_the_control_variate_of_its_definition():
    est = gfo.MeZOSVRG(eps=1e-3, q=5, minibatch=2)
    s0 = est.init(jax.random.key(0), X)
    g0, m0, s1 = est.estimate(quadratic, X, BATCH, jax.random.key(1), s0, 0)  # anchor step: θ = θ̃, g = g̃
    np.testing.assert_allclose(_flat(g0), _flat(s1["anchor_grad"]), atol=1e-6)
    assert bool(m0["anchor_refresh"])
    x1 = tree_axpy(-0.05, g0, X)
    key = jax.random.key(2)
    g1, m1, s2 = est.estimate(quadratic, x1, BATCH, key, s1, 1)
    assert not bool(m1["anchor_refresh"])
    _, k_mb, k_rows, eval_key = jax.random.split(key, 4)
    idx = jax.random.choice(k_rows, 8, (2,), replace=False)
    mb = {"shift": BATCH["shift"][idx]}
    z = noise_like(member_key(k_mb, 1), X)
    spsa = lambda y: jax.tree.map(  # noqa: E731
        lambda zz: (quadratic(tree_axpy(1e-3, z, y), mb) - quadratic(tree_axpy(-1e-3, z, y), mb)) / 2e-3 * zz, z)
    expected = jax.tree.map(lambda a, b, c: a - b + c, spsa(x1), spsa(X), s1["anchor_grad"])
    np.testing.assert_allclose(_flat(g1), _flat(expected), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_mezo_svrg_is_unbiased_and_reduces_variance_near_the_anchor():
    est = gfo.MeZOSVRG(eps=1e-3, q=1000, minibatch=2)
    s = est.init(jax.random.key(0), X)
    _, _, s = est.estimate(quadratic, X, BATCH, jax.random.key(1), s, 0)
    x = tree_axpy(0.01, {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, X)  # near the anchor
    keys = jax.random.split(jax.random.key(5), 8000)
    svrg = jax.jit(jax.vmap(lambda k: _stack(est.estimate(quadratic, x, BATCH, k, s, 1)[0])))(keys)
    plain = jax.jit(jax.vmap(lambda k: _stack(gfo.SPSA(eps=1e-3)(
        lambda y, b, kk: quadratic(y, {"shift": BATCH["shift"][jax.random.choice(kk, 8, (2,), replace=False)]}),
        x, None, k)[0])))(keys)
    # Unbiased for the gradient of the anchor-batch estimate's mean: the full-batch gradient at x, up to the
    # anchor's own single-z noise (fixed here), so compare the *difference* to its expectation instead.
    exact = _flat(jax.grad(quadratic)(x, BATCH)) - _flat(jax.grad(quadratic)(X, BATCH)) + np.asarray(_stack(s["anchor_grad"]))
    _unbiased(svrg, exact)
    assert float(jnp.mean(jnp.var(svrg, 0))) < 0.05 * float(jnp.mean(jnp.var(plain, 0)))


# ---------------------------------------------------------------- RandOpt
def test_randopt_keeps_the_top_k_of_one_round_and_votes():
    opt = gfo.RandOpt(population=32, sigma=0.5, top_k=5)
    state = opt.init(jax.random.key(0), X)
    chex_equal = lambda a, b: np.testing.assert_allclose(_flat(a), _flat(b), atol=1e-6)  # noqa: E731
    chex_equal(opt.solution(state), X)  # θ₀ before the round
    new, metrics = opt.step(state, quadratic, None, jax.random.key(1))
    losses = np.array([float(quadratic(opt.member(new, i))) for i in range(32)])  # (`state` was donated)
    np.testing.assert_array_equal(np.asarray(new.top), np.argsort(losses)[:5])
    np.testing.assert_allclose(np.asarray(new.top_losses), np.sort(losses)[:5], rtol=1e-5)
    chex_equal(opt.solution(new), opt.member(new, int(np.argmin(losses))))
    assert int(metrics["evaluations"]) == 32
    top, members = np.asarray(new.top), opt.members(new)
    assert members["w"].shape == (5, 4, 3)
    again, m2 = opt.step(new, quadratic, None, jax.random.key(2))  # one round only (`new` is donated)
    np.testing.assert_array_equal(np.asarray(again.top), top)
    assert int(m2["evaluations"]) == 0
    predictions = jnp.array([[0, 1, 2, 1], [0, 2, 2, 0], [1, 1, 0, 0]])  # 3 members × 4 examples
    np.testing.assert_array_equal(np.asarray(vote(predictions, 3)), [0, 1, 2, 0])


# ---------------------------------------------------------------- groups and noise maps
def test_grouped_shaping_shapes_each_group_on_its_own():
    losses = jnp.array([3.0, 1.0, 2.0, 4.0, 10.0, 30.0, 20.0, 40.0])
    for method in ("centered_ranks", "z_score", "z_score_var"):
        grouped = shaping.shape(losses, method, groups=2)
        np.testing.assert_allclose(grouped[:4], shaping.shape(losses[:4], method), atol=1e-6)
        np.testing.assert_allclose(grouped[4:], shaping.shape(losses[4:], method), atol=1e-6)
    x = np.asarray(losses[:4], np.float64)
    np.testing.assert_allclose(shaping.z_score_var(losses[:4]), (x - x.mean()) / np.sqrt(x.var() + 1e-5), rtol=1e-5)


def test_z_score_is_stable_for_tightly_spread_losses():
    losses = (6.0 + 1e-6 * jax.random.normal(jax.random.key(0), (64,))).astype(jnp.float32)
    x = np.asarray(losses, np.float64)
    np.testing.assert_allclose(shaping.z_score(losses), (x - x.mean()) / (x.std() + 1e-8), atol=2e-3)


def test_groups_evaluate_their_own_slice_of_the_batch():
    est = gfo.LowRankES(population=8, sigma=0.1, groups=2, factored=False)
    batch = {"shift": jnp.array([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])}
    for member in range(8):
        part = est.member_batch(batch, jnp.int32(member))
        np.testing.assert_array_equal(part["shift"], batch["shift"][:3] if member < 4 else batch["shift"][3:])
    grad, metrics = est(quadratic, X, batch, jax.random.key(0))
    assert np.all(np.isfinite(_flat(grad)))
    with pytest.raises(ValueError, match="groups=3 must divide population=8"):
        gfo.OpenES(population=8, groups=3)


def test_noise_map_freezes_and_chooses_noise_per_leaf():
    est = gfo.LowRankES(population=8, sigma=0.1, factored=False, noise_map=(("^b$", "frozen"),))
    grad, _ = est(quadratic, X, None, jax.random.key(0))
    assert float(jnp.abs(grad["b"]).max()) == 0.0 and float(jnp.abs(grad["w"]).max()) > 0
    es = gfo.OpenES(population=8, sigma=0.1, noise_map={"w": "frozen"})
    grad, _ = es(quadratic, X, None, jax.random.key(0))
    assert float(jnp.abs(grad["w"]).max()) == 0.0 and float(jnp.abs(grad["b"]).max()) > 0
    full = gfo.LowRankES(population=8, sigma=0.1, factored=False, noise_map=(("w", "full"),))
    assert np.linalg.matrix_rank(np.asarray(full._perturb(X, jax.random.key(1), 1.0)["w"])) == 3  # not rank 1
    with pytest.raises(ValueError, match="'lowrank' noise, which needs a matrix"):
        gfo.LowRankES(population=8, noise_map=(("b", "lowrank"),))(quadratic, X, None, jax.random.key(0))
    with pytest.raises(ValueError, match="'sparse' is not a noise kind"):
        gfo.OpenES(noise_map={"w": "sparse"})


def test_stateful_estimators_run_through_the_optimizer_protocol():
    for est in (gfo.LOZO(eps=1e-3, rank=1, nu=3), gfo.HiZOO(eps=1e-3, alpha=1e-3),
                gfo.MeZOSVRG(eps=1e-3, q=3, minibatch=2)):
        opt = gfo.Optimizer(est, optax.sgd(0.02))
        state = opt.init(jax.random.key(0), X)
        start = float(quadratic(X, BATCH))
        for t in range(100):
            state, metrics = opt.step(state, quadratic, BATCH, jax.random.key(t))
        assert float(quadratic(state.x, BATCH)) < 0.5 * start, est
        assert int(state.step) == 100


@pytest.mark.parametrize("method, options", [("zo_sgd_cons", {}), ("lozo", {"nu": 2}), ("hizoo", {"alpha": 1e-3}),
                                             ("mezo_svrg", {"q": 2, "minibatch": 2}), ("randopt", {"top_k": 2})])
def test_config_methods_build_and_step(method, options):
    from gfo.run.build import build_optimizer
    from gfo.optim.registry import section_of
    from gfo.run.config import OptimizerSection

    common = dict(sigma=1e-2, eps=1e-2, lr=1e-2, transform="sgd", population=8)  # each where the method has it
    declared = section_of(method).field_names()
    section = OptimizerSection(method=method, **{k: v for k, v in common.items() if k in declared}, **options)
    opt = build_optimizer(section, X)
    state = opt.init(jax.random.key(0), X)
    for t in range(3):
        state, metrics = opt.step(state, quadratic, BATCH, jax.random.key(t))
    assert float(quadratic(opt.solution(state), BATCH)) < float(quadratic(X, BATCH))
    assert int(metrics["evaluations"]) >= 0 and np.isfinite(float(metrics["loss"]))
    # compiled ahead as `gfo train` does (`jax.jit` methods and `filter_jit` steps alike): the state is
    # among the traced arguments, not hashed as a static one
    from gfo.optim.protocol import lower_step

    executable = lower_step(opt, state, quadratic, BATCH, jax.random.key(9)).compile()
    state_bytes = sum(v.nbytes for v in jax.tree.leaves(state) if hasattr(v, "nbytes"))
    assert executable.memory_analysis().argument_size_in_bytes >= state_bytes
