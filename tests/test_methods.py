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
    one = jax.jit(jax.vmap(lambda k, t: _stack(est.estimate(quadratic, X, None, k, v_root, t)[0])))
    keys = jax.random.split(jax.random.key(1), 20000)
    samples = jnp.concatenate([one(keys[i:i + 2000], jnp.arange(i, i + 2000)) for i in range(0, 20000, 2000)])
    _unbiased(samples, _flat(TRUE_GRAD))


def _stack(tree):
    return jnp.concatenate([jnp.ravel(tree["w"]), jnp.ravel(tree["b"])])


# ---------------------------------------------------------------- HiZOO
def test_hizoo_estimate_is_the_sigma_preconditioned_gradient():
    """With α = 0 the Hessian estimate h is fixed and E[g] = Σ ∇L = ∇L / h."""
    est = gfo.HiZOO(eps=1e-3, alpha=0.0)
    h = {"w": jnp.linspace(0.5, 4.0, 12).reshape(4, 3), "b": jnp.array([2.0, 0.25, 1.0])}
    one = jax.jit(jax.vmap(lambda k: _stack(est.estimate(quadratic, X, None, k, h, 0)[0])))
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
    from gfo.run.config import OptimizerSection

    section = OptimizerSection(method=method, sigma=1e-2, lr=1e-2, transform="sgd", population=8, options=options)
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
