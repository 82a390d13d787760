"""Noise drawn a block of rows at a time: the embedding lookup, the blocked `linear` (input rows and the
tied head's vocabulary rows) and the blocked update regenerate exactly the numbers of the whole leaf."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from gfo.optim.noise import leaf_noise, member_key, noise_blocks, noise_like
from gfo.optim.population import noise_update
from models.linear import NoisyLeaf, embed_lookup, noisy_linear, transpose
from models.noise import hashed_bits, matrix_noise, resolve_distribution, standard_noise

model_linear = importlib.import_module("models.linear")  # the module (`models.linear` is also a function)
TABLE = jax.random.normal(jax.random.key(1), (37, 16))  # 37 rows: no block size divides it


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_lookup_draws_only_its_rows_and_equals_the_dense_table(dtype):
    table = NoisyLeaf(TABLE.astype(dtype), jax.random.key(5), jnp.float32(0.3), "gaussian")
    ids = jnp.array([[0, 3, 36], [5, 5, 1]])
    got = embed_lookup(table, ids, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table.dense()[ids].astype(jnp.float32)))
    assert float(jnp.abs(got[1, 0] - TABLE[5]).max()) > 0.1  # the rows are perturbed


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("block_elements", [16, 50, 10_000])  # one row per block, a partial last block, one block
def test_blocked_noisy_linear_equals_the_dense_matmul_in_both_orientations(distribution, block_elements):
    kernel = NoisyLeaf(TABLE, jax.random.key(5), jnp.float32(0.3), distribution)
    x_out = jax.random.normal(jax.random.key(2), (2, 3, 16))  # the tied head: x @ tableᵀ, blocks of vocabulary rows
    np.testing.assert_allclose(np.asarray(noisy_linear(x_out, transpose(kernel), jnp.float32, block_elements)),
                               np.asarray(x_out @ kernel.dense().T), rtol=1e-5, atol=1e-5)
    x_in = jax.random.normal(jax.random.key(3), (2, 3, 37))  # x @ table: blocks of input rows
    np.testing.assert_allclose(np.asarray(noisy_linear(x_in, kernel, jnp.float32, block_elements)),
                               np.asarray(x_in @ kernel.dense()), rtol=1e-5, atol=1e-5)


def test_blocks_of_a_stacked_leaf_are_rows_of_one_layer():
    path = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("mlp"), jax.tree_util.DictKey("kernel"))
    w = jnp.zeros((3, 10, 7))
    assert noise_blocks(path, w, block_elements=1000) is None  # small: the whole leaf at once
    assert noise_blocks(path, w, block_elements=70) == (3, 10, 10, 1)  # one layer per block
    assert noise_blocks(path, w, block_elements=30) == (3, 10, 4, 3)  # 4 + 4 + 2 (overlapping) rows per layer
    assert noise_blocks((jax.tree_util.DictKey("embed"),), TABLE, block_elements=100) == (None, 37, 6, 7)


@pytest.mark.slow
@pytest.mark.parametrize("n, masked", [(1, True), (2, False), (5, True)])
def test_blocked_update_equals_the_sum_of_whole_noise_trees(n, masked):
    tree = {"embed": TABLE, "layers": {"k": jax.random.normal(jax.random.key(0), (3, 10, 7)), "b": jnp.ones((3, 5))},
            "v": jnp.ones(4)}
    mask = jax.tree.map(lambda v: (jax.random.uniform(jax.random.key(9), v.shape) > 0.3).astype(jnp.float32), tree)
    mask = mask if masked else None
    weights = jnp.arange(1, n + 1, dtype=jnp.float32) * jnp.array([1.0, -1.0] * 3)[:n]
    key = jax.random.key(4)
    direction_key = lambda d: member_key(key, d)  # noqa: E731
    noise = [jax.jit(noise_like)(direction_key(d), tree) for d in range(n)]
    if mask is not None:
        noise = [jax.tree.map(jnp.multiply, z, mask) for z in noise]
    expected = jax.tree.map(lambda *zs: sum(w * z for w, z in zip(weights, zs)), *noise)
    update = jax.jit(lambda blocks: noise_update(weights, direction_key, tree, mask=mask, block_elements=blocks),
                     static_argnums=0)
    (whole, snr_whole), (blocked, snr_blocked) = update(10**9), update(20)
    for got in (whole, blocked):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    if n == 1:
        assert np.isnan(float(snr_whole)) and np.isnan(float(snr_blocked))
    else:
        h = n // 2
        first = jax.tree.map(lambda *zs: sum(w * z for w, z in zip(weights[:h], zs)), *noise[:h])
        second = jax.tree.map(lambda *zs: sum(w * z for w, z in zip(weights[h:], zs)), *noise[h:])
        dot = lambda a, b: sum(float(jnp.vdot(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
        cosine = dot(first, second) / np.sqrt(dot(first, first) * dot(second, second))
        np.testing.assert_allclose([float(snr_whole), float(snr_blocked)], [cosine, cosine], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tied_model_with_blocked_noise_gives_the_loss_of_its_dense_tree(monkeypatch):
    """A GPT-2-layout model whose (tied) embedding and kernels are `NoisyLeaf`s read in blocks (the block
    size forced small) gives the logits of the materialised tree."""
    monkeypatch.setattr(model_linear, "NOISE_BLOCK_ELEMENTS", 200)
    model = models.TransformerLM(models.tiny("gpt2", d_model=16, n_layers=2, n_heads=2, vocab_size=61))
    params = model.init(jax.random.key(0))
    key = jax.random.key(3)
    noisy = jax.tree_util.tree_map_with_path(
        lambda p, w: NoisyLeaf(w, _keys(key, p, w), jnp.full(_keys(key, p, w).shape, 0.05, jnp.float32)), params)
    dense = jax.tree.map(lambda n: n.dense(), noisy, is_leaf=lambda n: isinstance(n, NoisyLeaf))
    assert noisy["embed"].is_blocked()
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 61)
    got, want = model.apply(noisy, tokens), model.apply(dense, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(want - model.apply(params, tokens)).max()) > 1e-3  # the perturbation matters


def _keys(key, path, w):
    from gfo.optim.noise import leaf_noise_keys

    return leaf_noise_keys(key, path, w)


def test_leaf_noise_of_a_matrix_is_keyed_by_row():
    """Row r of an unstacked matrix leaf's noise is `standard_noise(fold_in(leaf key, r), row shape)`."""
    from gfo.optim.noise import leaf_key

    path = (jax.tree_util.DictKey("embed"),)
    key = jax.random.key(11)
    eps = leaf_noise(key, path, TABLE)
    for r in (0, 17, 36):
        np.testing.assert_array_equal(np.asarray(eps[r]),
                                      np.asarray(standard_noise(jax.random.fold_in(leaf_key(key, path), r), (16,))))


def test_auto_distribution_is_the_backends_fast_noise_and_bad_names_are_refused():
    """`"auto"` draws exactly the Rademacher signs on CPU (Gaussian elsewhere); unknown names are refused
    when an estimator is built, naming the value."""
    import gfo

    key = jax.random.key(3)
    expected = "rademacher" if jax.default_backend() == "cpu" else "gaussian"
    assert resolve_distribution("auto") == expected and resolve_distribution("gaussian") == "gaussian"
    np.testing.assert_array_equal(np.asarray(standard_noise(key, (5, 7), "auto")),
                                  np.asarray(standard_noise(key, (5, 7), expected)))
    gfo.OpenES(population=4, distribution="auto")
    with pytest.raises(ValueError, match=r"OpenES distribution='uniform': expected one of"):
        gfo.OpenES(population=4, distribution="uniform")
    with pytest.raises(ValueError, match=r"SPSA distribution='uniform'"):
        gfo.SPSA(distribution="uniform")


def test_hashed_gaussian_has_the_moments_and_distribution_of_a_standard_normal():
    """gfo's `gaussian` (counter-hashed words through the inverse CDF) over 2²⁰ values from 256 row keys:
    mean, variance, skewness and kurtosis within 5 standard errors of N(0, 1)'s, and the Kolmogorov–Smirnov
    distance to its CDF below the 0.1 % critical value."""
    from scipy.special import ndtr

    z = np.asarray(matrix_noise(jax.random.key(5), (256, 4096)), np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 5 * np.sqrt(15 / n)
    assert abs((z ** 4).mean() - 3) < 5 * np.sqrt(96 / n)
    z.sort()
    ks = np.max(np.abs(ndtr(z) - np.arange(1, n + 1) / n))
    assert ks < 1.95 / np.sqrt(n)


def test_hashed_words_are_uniform_bit_by_bit_and_uncorrelated_along_rows_and_across_keys():
    """The words behind the Gaussian (`hashed_bits`): every one of the 32 bit positions is set half the
    time, and neither consecutive words of one key nor the same counter under neighbouring keys (members
    `0, 1, …` of a population, rows of a matrix) are correlated — the failures of a weak counter mix (an
    unmixed `i + k` has serial correlation 1)."""
    keys = jax.vmap(lambda i: member_key(jax.random.key(8), i))(jnp.arange(512, dtype=jnp.uint32))
    words = np.asarray(jax.vmap(lambda k: hashed_bits(k, 2048))(keys))  # [512 keys, 2048 counters]
    n = words.size
    frequency = ((words.ravel()[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
    assert np.max(np.abs(frequency - 0.5)) < 5 * 0.5 / np.sqrt(n)
    u = words.astype(np.float64) / 2.0 ** 32 - 0.5
    bound = 5 / np.sqrt(u[:, 1:].size)  # the correlation of independent uniforms has sd 1/√n
    along = np.mean(u[:, 1:] * u[:, :-1]) * 12
    across = np.mean(u[1:] * u[:-1]) * 12
    assert abs(along) < bound and abs(across) < bound, (along, across)
    # the low bytes of consecutive words, as pairs: 65 536 cells, chi-square within 5 sd of its mean
    pairs = (words[:, :-1] & 0xFF).astype(np.int64) * 256 + (words[:, 1:] & 0xFF)
    counts = np.bincount(pairs.ravel(), minlength=65536)
    expected = pairs.size / 65536
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert abs(chi2 - 65535) < 5 * np.sqrt(2 * 65535)


def test_threefry_gaussian_is_jax_random_normal():
    """`gaussian_threefry` (the reference generator) is `jax.random.normal` of the same key, and `gaussian`
    is not a copy of it (it hashes the key's words instead)."""

    key = jax.random.key(4)
    np.testing.assert_array_equal(np.asarray(standard_noise(key, (3, 5), "gaussian_threefry")),
                                  np.asarray(jax.random.normal(key, (3, 5))))
    assert float(jnp.abs(standard_noise(key, (3, 5)) - jax.random.normal(key, (3, 5))).max()) > 0.5


def test_blocked_noisy_linear_costs_one_matmul_not_two():
    """The blocked product multiplies by `w + scale · ε` block by block: XLA counts about the FLOPs of
    `x @ w` alone (`x @ w + scale · x @ ε` would count twice as many), in both orientations."""
    kernel = NoisyLeaf(jnp.zeros((256, 128)), jax.random.key(5), jnp.float32(0.3))
    x_in, x_out = jnp.ones((8, 128, 256)), jnp.ones((8, 128, 128))  # 1024 rows: the noise is ~3 % of the FLOPs

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    for x, k in ((x_in, kernel), (x_out, transpose(kernel))):
        plain = flops(lambda x, w: x @ w, x, k.w)
        blocked = flops(lambda x, k: noisy_linear(x, k, jnp.float32, block_elements=1 << 20), x, k)
        assert plain * 0.99 < blocked < plain * 1.25, (blocked / plain)


def test_the_all_zero_key_is_not_special():
    """`key(0)` has data words (0, 0), and lowbias32 maps 0 to 0: without the hash's offset its first
    Gaussian would be the extreme −5.42 (the word 0). Its first words are ordinary."""
    assert np.all(np.asarray(hashed_bits(jax.random.key(0), 8)) != 0)
    assert float(jnp.abs(standard_noise(jax.random.key(0), (8,))).max()) < 4.0


@pytest.mark.slow
def test_key_tables_give_every_leaf_and_member_the_keys_drawn_one_by_one(monkeypatch):
    import gfo.optim.noise as noise
    from gfo.optim.noise import KeyTable, MemberKeys, leaf_noise_keys, leaf_noise_rows

    params = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=3, n_heads=2)).init(jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    key = jax.random.key(5)
    data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    table = KeyTable(key, params)
    assert sum(np.array_equal(data(table.keys(p, w)), data(leaf_noise_keys(key, p, w))) for p, w in flat) == len(flat)
    for small in (True, False):  # the whole population's table, or a member's drawn where it is used
        monkeypatch.setattr(noise, "MEMBER_TABLE_KEYS", 1 << 18 if small else 1)
        members = MemberKeys(key, 4, params)
        assert (members.table is not None) == small
        for d in (3,):
            for p, w in flat:
                layer = 1 if noise.n_stacked_layers(p, w) is not None else None
                got = leaf_noise_rows(members.member(d), p, w, layer, jnp.arange(2), "gaussian")
                want = leaf_noise_rows(member_key(key, d), p, w, layer, jnp.arange(2), "gaussian")
                np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_an_spsa_step_draws_its_keys_in_a_few_loops_not_several_per_leaf():
    # On CPU every threefry call compiles to a loop of its own; the keys of every leaf come from one table
    # (`KeyTable`), so a 2-layer GPT-2 step holds a few dozen loops (117 when each leaf drew its own keys).
    import optax

    import gfo

    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=2, n_heads=2))
    params = model.init(jax.random.key(0))
    space = gfo.spaces.Full(params)
    loss = lambda p, batch, key: -model.token_logprobs(p, batch[:, :-1], batch[:, 1:]).mean()  # noqa: E731
    opt = gfo.Optimizer(gfo.SPSA(eps=1e-3), optax.sgd(1e-3))
    state = opt.init(jax.random.key(1), space.init(jax.random.key(0)))
    batch = jnp.zeros((2, 9), jnp.int32)
    text = opt.lower(state, gfo.OnSpace(loss, space), batch, jax.random.key(2)).compile().as_text()
    assert text.count(" while(") <= 40
