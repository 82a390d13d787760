"""The stacked-layer decoder: one scan over `layers`, attention kernels, perturbation descriptors, bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.linear import LowRankKernel, NoisyLeaf

FAMILIES = ("gpt2", "opt", "llama", "qwen2", "qwen3", "gemma3")


def _tokens(seed, shape, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _padded_batch():
    tokens = _tokens(0, (3, 12))
    mask = jnp.ones((3, 12), jnp.int32).at[1, :5].set(0).at[2, :9].set(0)  # left padding
    return tokens, mask


def _cached_logits(model, params, tokens, mask, split):
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 2)
    first, cache = model.apply_with_cache(params, tokens[:, :split], cache, mask[:, :split])
    rest = [first]
    for t in range(split, tokens.shape[1]):
        logits, cache = model.apply_with_cache(params, tokens[:, t:t + 1], cache, mask[:, t:t + 1])
        rest.append(logits)
    return jnp.concatenate(rest, axis=1)


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f == "llama" else pytest.mark.slow) for f in FAMILIES]
    + [pytest.param("gemma3-softcap", marks=pytest.mark.slow)])
def test_dot_product_attention_equals_einsum_reference(family):
    """`jax.nn.dot_product_attention` (attention_impl="xla") against the einsum reference: every family
    (GQA, sliding windows, Gemma's local RoPE), left padding and a KV cache; float32 to 1e-5."""
    extra = dict(attn_logit_softcap=2.0) if family == "gemma3-softcap" else {}
    cfg = models.tiny(family.split("-")[0], **extra)
    assert cfg.attention_impl == "xla"  # the default
    fast, ref = models.TransformerLM(cfg), models.TransformerLM(cfg.replace(attention_impl="einsum"))
    params = fast.init(jax.random.key(1))
    tokens, mask = _padded_batch()
    real = np.asarray(mask, bool)
    expected = ref.apply(params, tokens, mask)
    np.testing.assert_allclose(np.asarray(fast.apply(params, tokens, mask))[real], np.asarray(expected)[real],
                               rtol=1e-5, atol=1e-5)
    cached = _cached_logits(fast, params, tokens, mask, split=7)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(expected)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_noisy_leaves_everywhere_equal_their_dense_tree():
    """Every leaf a `NoisyLeaf` (stacked leaves with one key per layer) gives the logits of the tree of
    `.dense()` leaves: each layer's noise is drawn inside the scan from its own key."""
    model = models.TransformerLM(models.tiny("gemma3"))
    params = model.init(jax.random.key(0))
    L = model.config.n_layers
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    noisy = []
    for i, (path, w) in enumerate(flat):
        key = jax.random.fold_in(jax.random.key(7), i)
        stacked = models.tree.is_stacked(tuple(k.key for k in path))
        keys, scale = (jax.random.split(key, L), jnp.linspace(0.01, 0.02, L)) if stacked else (key, jnp.float32(0.01))
        noisy.append(NoisyLeaf(w, keys, scale))
    noisy = jax.tree_util.tree_unflatten(treedef, noisy)
    dense = jax.tree.map(lambda n: n.dense(), noisy, is_leaf=lambda n: isinstance(n, NoisyLeaf))
    tokens = _tokens(2, (2, 9))
    out = model.apply(noisy, tokens)
    np.testing.assert_allclose(out, model.apply(dense, tokens), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out - model.apply(params, tokens)))) > 1e-3  # the noise did something
    # a layer's noise differs from its neighbour's: the keys are per layer
    q = dense[models.LAYERS]["attn"]["q"]["kernel"] - params[models.LAYERS]["attn"]["q"]["kernel"]
    assert float(jnp.max(jnp.abs(q[0] / 0.01 - q[1] / 0.02))) > 0.1


def test_whole_leaf_descriptors_are_materialised_and_bad_ones_refused():
    """Under `layers` a descriptor is per layer (sliced by the scan) or describes the whole stacked array
    (a `NoisyLeaf` with one key, factors of a stacked `[L, D]` vector leaf): the latter means its `.dense()`."""
    model = models.TransformerLM(models.tiny("llama"))
    params = model.init(jax.random.key(0))
    tokens = _tokens(0, (1, 4))
    w = params[models.LAYERS]["attn"]["q"]["kernel"]
    s = params[models.LAYERS]["mlp_norm"]["scale"]  # [L, D]
    noisy = NoisyLeaf(w, jax.random.key(0), jnp.float32(0.1))
    low = LowRankKernel(s, jnp.ones((s.shape[0], 1)), jnp.linspace(-1, 1, s.shape[1])[:, None], 0.3)

    def swap(q, scale):
        p = jax.tree.map(lambda v: v, params)
        p[models.LAYERS]["attn"]["q"]["kernel"], p[models.LAYERS]["mlp_norm"]["scale"] = q, scale
        return p

    np.testing.assert_allclose(model.apply(swap(noisy, low), tokens), model.apply(swap(noisy.dense(), low.dense()),
                                                                                  tokens), rtol=1e-5, atol=1e-5)
    bad = LowRankKernel(w, jnp.ones(w.shape[1:2] + (1,)), jnp.ones(w.shape[2:] + (2,)), 0.1)
    with pytest.raises(ValueError, match=r"LowRankKernel at layers/attn/q/kernel.*fit neither the stacked form"):
        model.apply(swap(bad, s), tokens)
    with pytest.raises(ValueError, match=r"NoisyLeaf at layers/attn/q/kernel: key \(3,\)"):
        model.apply(swap(NoisyLeaf(w, jax.random.split(jax.random.key(0), 3), jnp.float32(0.1)), s), tokens)


def test_old_per_layer_layout_is_a_clear_error_and_converts():
    model = models.TransformerLM(models.tiny("gpt2"))
    params = model.init(jax.random.key(0))
    old = models.unstack_layers(params)
    assert sorted(k for k in old if k.startswith("layers_")) == ["layers_0", "layers_1"]
    np.testing.assert_array_equal(old["layers_1"]["mlp"]["fc"]["kernel"], params["layers"]["mlp"]["fc"]["kernel"][1])
    with pytest.raises(ValueError, match=r"per-layer subtrees \['layers_0', 'layers_1'\].*models.stack_layers"):
        model.apply(old, _tokens(0, (1, 4)))
    tokens = _tokens(1, (2, 5))
    np.testing.assert_array_equal(model.apply(models.stack_layers(old), tokens), model.apply(params, tokens))
    short = {**params, "layers": jax.tree.map(lambda x: x[:1], params["layers"])}
    with pytest.raises(ValueError, match=r"leading layer axis of 2"):
        model.apply(short, tokens)


@pytest.mark.slow
def test_remat_gradient_equals_plain_gradient():
    cfg = models.tiny("gemma3")
    params = models.TransformerLM(cfg).init(jax.random.key(0))
    tokens = _tokens(3, (2, 8))

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply(p, tokens))[..., 0])

    plain = jax.grad(lambda p: loss(models.TransformerLM(cfg), p))(params)
    remat = jax.grad(lambda p: loss(models.TransformerLM(cfg.replace(remat=True)), p))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_traced_program_size_is_independent_of_depth():
    """One scan over the layers: the forward's jaxpr has the same number of equations at 2 and 12 layers
    (plain and with LowRankKernel leaves), so compile time does not grow with depth."""
    def size(n_layers, lowrank):
        model = models.TransformerLM(models.tiny("gemma3", n_layers=n_layers))
        params = jax.eval_shape(model.init, jax.random.key(0))
        if lowrank:
            params = models.merge_lora(params, models.init_lora(jax.random.key(0), params, 2, ("q", "up")), 4.0)
        jaxpr = jax.make_jaxpr(lambda p, t: model.apply(p, t))(params, jnp.zeros((1, 4), jnp.int32))
        return len(jaxpr.jaxpr.eqns), str(jaxpr).count("scan[")

    for lowrank in (False, True):
        (small, scans), (deep, _) = size(2, lowrank), size(12, lowrank)
        assert small == deep and scans >= 1


@pytest.mark.slow
def test_bfloat16_model_with_cache_tracks_its_float32_twin():
    """bf16 storage and compute (norms, softmax, logits in float32): the scanned forward, with and without a
    KV cache, stays within bf16 rounding of the float32 model."""
    cfg = models.tiny("gemma3")
    model32 = models.TransformerLM(cfg)
    params = model32.init(jax.random.key(0))
    model16 = models.TransformerLM(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
    tokens, mask = _padded_batch()
    real = np.asarray(mask, bool)
    ref = np.asarray(model32.apply(params, tokens, mask))[real]
    full = model16.apply(params16, tokens, mask)
    cached = _cached_logits(model16, params16, tokens, mask, split=7)
    assert full.dtype == cached.dtype == jnp.float32
    assert model16.init_cache(1, 4).k.dtype == jnp.bfloat16
    for out in (full, cached):
        err = np.max(np.abs(np.asarray(out)[real] - ref)) / np.max(np.abs(ref))
        assert err < 0.05, err
