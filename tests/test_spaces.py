"""Search spaces map points to model parameters and know their dimension."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from gfo import spaces
from models.linear import LowRankKernel


def test_full_space_round_trips_and_filters(tiny_model):
    model, params = tiny_model
    full = spaces.Full(params)
    x = full.init(jax.random.key(0))
    assert full.dim == model.num_params(params)
    jax.tree.map(np.testing.assert_array_equal, full.to_params(x), params)
    attn = spaces.Full(params, filter=r"attn/(q|v)/kernel")
    x = attn.init(None)
    assert sorted(x) == ["layers/attn/q/kernel", "layers/attn/v/kernel"]  # stacked: [n_layers, d_in, d_out]
    assert x["layers/attn/q/kernel"].shape[0] == model.config.n_layers
    moved = attn.to_params({k: v + 1.0 for k, v in x.items()})
    np.testing.assert_array_equal(moved["layers"]["attn"]["q"]["kernel"], params["layers"]["attn"]["q"]["kernel"] + 1)
    np.testing.assert_array_equal(moved["layers"]["attn"]["k"]["kernel"], params["layers"]["attn"]["k"]["kernel"])
    with pytest.raises(ValueError, match="selects no parameter"):
        spaces.Full(params, filter="no_such_layer")
    with pytest.raises(ValueError, match=r"old way \('layers_<i>'\).*layers=\[i, ...\]"):
        spaces.Full(params, filter="layers_0/attn")


def test_full_space_selects_single_layers(tiny_model):
    model, params = tiny_model
    one = spaces.Full(params, filter="attn/q/kernel", layers=[1])
    x = one.init(None)
    w = params["layers"]["attn"]["q"]["kernel"]
    assert list(x) == ["layers/attn/q/kernel"] and x["layers/attn/q/kernel"].shape == (1,) + w.shape[1:]
    assert one.dim == w[1].size
    moved = one.to_params({"layers/attn/q/kernel": x["layers/attn/q/kernel"] + 1.0})["layers"]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(moved[1], w[1] + 1)
    np.testing.assert_array_equal(moved[0], w[0])  # the other layer is untouched
    a, b = jnp.ones((1,) + w.shape[1:2] + (1,)), jnp.ones((1,) + w.shape[2:] + (1,))
    low = one.to_params({"layers/attn/q/kernel": LowRankKernel(x["layers/attn/q/kernel"], a, b, jnp.full((1,), 0.5))})
    np.testing.assert_allclose(low["layers"]["attn"]["q"]["kernel"][1], w[1] + 0.5, rtol=1e-6)
    every = spaces.Full(params, layers=[0])  # all of layer 0's leaves, no unstacked ones
    assert all(k.startswith("layers/") for k in every.init(None)) and "embed" not in every.init(None)
    with pytest.raises(ValueError, match=r"layers=\[2\]\): expected distinct layer indices in \[0, 2\)"):
        spaces.Full(params, layers=[2])


def test_full_space_accepts_lowrank_leaves(tiny_model):
    model, params = tiny_model
    full = spaces.Full(params, filter="mlp")
    x = full.init(None)
    name = next(k for k in x if k.endswith("kernel"))
    L, d_in, d_out = x[name].shape  # a stacked kernel: one factor pair per layer
    kernel = LowRankKernel(x[name], jnp.ones((L, d_in, 1)), jnp.ones((L, d_out, 1)), jnp.full((L,), 0.01))
    tokens = jnp.arange(8)[None]
    low = model.apply(full.to_params({**x, name: kernel}), tokens)
    dense = model.apply(full.to_params({**x, name: kernel.dense()}), tokens)
    np.testing.assert_allclose(low, dense, rtol=1e-4, atol=1e-4)


def test_lora_and_prompt_spaces(tiny_model):
    model, params = tiny_model
    tokens = jnp.arange(6)[None]
    lora = spaces.LoRA(params, rank=2, targets=("q", "v"))
    x = lora.init(jax.random.key(0))
    d = model.config.d_model
    kv = model.config.kv_heads * model.config.dim_per_head
    assert lora.dim == model.config.n_layers * (2 * d * 2 + (d + kv) * 2)  # a: d×r, b: d_out×r for q and v
    np.testing.assert_array_equal(model.apply(lora.to_params(x), tokens), model.apply(params, tokens))
    prompt = spaces.Prompt(params, n_tokens=3)
    p = prompt.init(jax.random.key(1))
    assert prompt.dim == 3 * d
    assert model.apply(prompt.to_params(p), tokens).shape == (1, 6, model.config.vocab_size)


def test_subspace_stored_and_regenerated_projections_agree(tiny_model):
    model, params = tiny_model
    inner = spaces.Full(params, layers=[0])
    stored = spaces.Subspace(inner, dim=8, key=jax.random.key(3), block=1000)
    regenerated = spaces.Subspace(inner, dim=8, key=jax.random.key(3), block=1000, max_stored=0)
    assert stored.stored and not regenerated.stored and stored.dim == 8
    z = jax.random.normal(jax.random.key(4), (8,))
    a, b = stored.to_params(z), jax.jit(regenerated.to_params)(z)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
    jax.tree.map(np.testing.assert_array_equal, stored.to_params(stored.init(None)), params)  # z = 0 is x0
    # the projection has the documented scale: entries N(0, 1/dim)
    delta = np.concatenate([np.ravel(v - w) for v, w in zip(jax.tree.leaves(stored.to_params(jnp.eye(8)[0])),
                                                             jax.tree.leaves(params))])
    moved = delta[delta != 0]
    assert abs(moved.std() - 8 ** -0.5) < 0.02


def test_subspace_of_a_prompt_space(tiny_model):
    model, params = tiny_model
    sub = spaces.Subspace(spaces.Prompt(params, 4), dim=5, key=jax.random.key(0))
    out = sub.to_params(jnp.ones(5))
    assert out["soft_prompt"].shape == (4, model.config.d_model)


def test_space_owns_the_noise_map_and_the_optimizer_checks_it():
    import models
    from gfo.run.build import build_optimizer, build_space
    from gfo.run.config import ConfigError, OptimizerSection, SpaceSection
    from gfo.optim.estimators.lowrank_es import EGGROLL_NOISE_MAP
    from gfo.optim.noise import leaf_kind, path_name

    model = models.TransformerLM(models.tiny("gpt2", d_model=16, n_layers=1, n_heads=2))
    params = model.init(jax.random.key(0))
    space = build_space(SpaceSection(kind="full", noise_map=dict(EGGROLL_NOISE_MAP)), params, jax.random.key(0))
    assert space.noise_map == EGGROLL_NOISE_MAP
    x0 = space.init(jax.random.key(0))
    opt = build_optimizer(OptimizerSection(method="lowrank_es", population=4), x0, noise_map=space.noise_map)
    kinds = {path_name(p): leaf_kind(p, v, opt.estimator.noise_map, lambda w: "lowrank" if w.ndim == 2 else "full")
             for p, v in jax.tree_util.tree_flatten_with_path(x0)[0]}
    # EGGROLL's defaults: only the 2-D kernels (and the untied head, if any) move, through low-rank noise.
    assert {k for k, v in kinds.items() if v != "frozen"} == {k for k in kinds if k.endswith("kernel")}
    assert kinds["embed"] == "frozen" and kinds["final_norm/scale"] == "frozen"
    with pytest.raises(ConfigError, match=r"patterns \['attn_typo'\] match no searched leaf"):
        build_optimizer(OptimizerSection(method="es", population=4), x0, noise_map=(("attn_typo", "frozen"),))
    with pytest.raises(ConfigError, match="does not read it"):
        build_optimizer(OptimizerSection(method="spsa"), x0, noise_map=space.noise_map)
    with pytest.raises(ConfigError, match="'sparse' is not a noise kind"):
        build_space(SpaceSection(kind="full", noise_map={"embed": "sparse"}), params, jax.random.key(0))
