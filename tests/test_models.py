"""Behaviour of the models: causality, padding, cache, LoRA, soft prompts, low-rank linear, sampling."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.generate import greedy_without_cache
from models.linear import LowRankKernel, linear


def _tokens(seed, shape, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


class TestForward(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_dtype(self):
        for family in ("gpt2", "llama"):
            model = models.TransformerLM(models.tiny(family))
            params = model.init(jax.random.key(0))
            logits = self.variant(model.apply)(params, _tokens(0, (3, 7)))
            chex.assert_shape(logits, (3, 7, model.config.vocab_size))
            chex.assert_type(logits, jnp.float32)
            chex.assert_tree_all_finite(logits)


def test_causal_later_tokens_never_change_earlier_logits(tiny_model):
    model, params = tiny_model
    tokens = _tokens(1, (2, 12))
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 17) % 256)
    a, b = model.apply(params, tokens), model.apply(params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :8]), np.asarray(b[:, :8]))
    assert np.max(np.abs(np.asarray(a[:, 8:] - b[:, 8:]))) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_gradient_of_early_logits_wrt_later_embeddings_is_zero(family):
    # untied head: with tied embeddings every row of the table feeds every logit through the head
    model = models.TransformerLM(models.tiny(family, tie_embeddings=False))
    params = model.init(jax.random.key(0))
    tokens = _tokens(2, (1, 10))

    def early_logit_sum(embed):
        return model.apply({**params, "embed": embed}, tokens)[0, :5].sum()

    grad = jax.grad(early_logit_sum)(params["embed"])
    later_only = set(np.asarray(tokens[0, 5:]).tolist()) - set(np.asarray(tokens[0, :5]).tolist())
    assert later_only, "test needs tokens that occur only after position 5"
    for tok in later_only:
        assert np.all(np.asarray(grad[tok]) == 0), f"early logits depend on later token {tok}"


def test_left_padding_does_not_change_real_token_logits(tiny_model):
    model, params = tiny_model
    tokens = _tokens(3, (1, 9))
    padded = jnp.concatenate([jnp.full((1, 4), 256), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 9), jnp.int32)], axis=1)
    np.testing.assert_allclose(model.apply(params, padded, mask)[:, 4:], model.apply(params, tokens),
                               rtol=1e-5, atol=1e-5)


def test_cached_forward_equals_full_forward(tiny_model):
    model, params = tiny_model
    tokens = _tokens(4, (2, 10))
    full = model.apply(params, tokens)
    cache = model.init_cache(2, 16)
    first, cache = model.apply_with_cache(params, tokens[:, :6], cache)
    rest = []
    for t in range(6, 10):
        logits, cache = model.apply_with_cache(params, tokens[:, t:t + 1], cache)
        rest.append(logits)
    incremental = jnp.concatenate([first] + rest, axis=1)
    np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_matches_uncached_decoding(tiny_model, byte_tokenizer):
    model, params = tiny_model
    ids, mask = byte_tokenizer.batch_encode(["The quick brown fox", "Hi", "jumps over"])
    out = models.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_without_cache(model, params, ids, mask, 12))
    np.testing.assert_array_equal(np.asarray(out.lengths), [12, 12, 12])


def test_stop_tokens_end_rows_and_pad_the_rest(tiny_model, byte_tokenizer):
    model, params = tiny_model
    ids, mask = byte_tokenizer.batch_encode(["abc", "defgh"])
    greedy = greedy_without_cache(model, params, ids, mask, 6)
    stop = int(greedy[0, 2])  # the third token generated for row 0 becomes a stop token
    out = models.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=6,
                          stop_tokens=(stop,), pad_id=byte_tokenizer.pad_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(2):
        hits = np.nonzero(greedy[row] == stop)[0]
        n = hits[0] + 1 if len(hits) else 6
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], greedy[row, :n])
        assert np.all(tokens[row, n:] == byte_tokenizer.pad_id)


def test_sampling_follows_softmax_and_truncations():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k, **kw: models.sample_logits(k, logits, **kw)[0], in_axes=(0,))

    def freqs(**kw):
        samples = jax.vmap(lambda k: models.sample_logits(k, logits, **kw)[0])(keys)
        return np.bincount(np.asarray(samples), minlength=4) / len(keys)

    del draw
    np.testing.assert_allclose(freqs(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(freqs(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.85), [0.5 / .95, 0.3 / .95, 0.15 / .95, 0],
                               atol=0.015)
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freqs(temperature=0.5), p / p.sum(), atol=0.015)
    assert int(models.sample_logits(keys[0], logits, temperature=0.0)[0]) == 0


def test_sampled_generation_is_reproducible_and_valid(tiny_model, byte_tokenizer):
    model, params = tiny_model
    ids, mask = byte_tokenizer.batch_encode(["a", "bb"])
    kw = dict(max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9)
    a = models.generate(model, params, ids, mask, jax.random.key(3), **kw)
    b = models.generate(model, params, ids, mask, jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.all(np.asarray(a.logprobs) <= 0)


@pytest.mark.parametrize("kw, message", [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                                         (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")])
def test_bad_sampling_arguments(tiny_model, kw, message):
    model, params = tiny_model
    args = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=message):
        models.generate(model, params, jnp.zeros((1, 2), jnp.int32), None, jax.random.key(0), **args)


def test_learned_positions_refuse_too_long_generation(byte_tokenizer):
    model = models.TransformerLM(models.tiny("gpt2", max_seq_len=16))
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        models.generate(model, params, jnp.zeros((1, 10), jnp.int32), None, jax.random.key(0), 8)


# ----------------------------------------------------------------------------- low-rank linear and LoRA
def test_lowrank_linear_equals_dense_kernel_also_under_vmap_with_shared_w():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (5, 3, 16))
    w = jax.random.normal(k[1], (16, 24))
    a = jax.random.normal(k[2], (7, 16, 2))  # a population of 7 rank-2 perturbations
    b = jax.random.normal(k[3], (7, 24, 2))
    bias = jnp.linspace(-1, 1, 24)
    dense = jnp.stack([linear(x, w + 0.3 * a[i] @ b[i].T, bias) for i in range(7)])
    pop = jax.vmap(lambda ai, bi: linear(x, LowRankKernel(w, ai, bi, 0.3), bias))(a, b)
    np.testing.assert_allclose(pop, dense, rtol=1e-5, atol=1e-4)
    kernel = LowRankKernel(w, a[0], b[0], 0.3)
    np.testing.assert_allclose(kernel.dense(), w + 0.3 * a[0] @ b[0].T, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(linear(x, kernel.transpose().transpose()), linear(x, kernel.dense()),
                               rtol=1e-5, atol=1e-4)


def test_stacked_lowrank_kernel_dense_and_transpose_act_per_layer():
    k = jax.random.split(jax.random.key(0), 4)
    w, a, b = (jax.random.normal(k[0], (3, 16, 24)), jax.random.normal(k[1], (3, 16, 2)),
               jax.random.normal(k[2], (3, 24, 2)))
    scale = jnp.array([0.1, -0.2, 0.3])
    kernel = LowRankKernel(w, a, b, scale)
    for i in range(3):
        np.testing.assert_allclose(kernel.dense()[i], w[i] + scale[i] * a[i] @ b[i].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel.transpose().dense(), jnp.swapaxes(kernel.dense(), -1, -2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(LowRankKernel(w, a, b, 0.5).dense(), w + 0.5 * jnp.einsum("lir,lor->lio", a, b),
                               rtol=1e-5, atol=1e-5)


def test_lowrank_perturbed_model_equals_dense_perturbed_model(tiny_model):
    model, params = tiny_model
    tokens = _tokens(5, (2, 6))
    L = model.config.n_layers
    name = "fc" if "fc" in params[models.LAYERS]["mlp"] else "up"
    w = params[models.LAYERS]["mlp"][name]["kernel"]  # [L, d_in, d_out]: one factor pair per layer
    a = jax.random.normal(jax.random.key(1), (L, w.shape[1], 1))
    b = jax.random.normal(jax.random.key(2), (L, w.shape[2], 1))
    scale = jnp.array([0.05, -0.03])
    emb_a = jax.random.normal(jax.random.key(3), (params["embed"].shape[0], 1))
    emb_b = jax.random.normal(jax.random.key(4), (params["embed"].shape[1], 1))

    def with_kernels(kernel, embed):
        p = jax.tree.map(lambda v: v, params)
        p[models.LAYERS]["mlp"][name]["kernel"] = kernel
        p["embed"] = embed
        return p

    low = with_kernels(LowRankKernel(w, a, b, scale), LowRankKernel(params["embed"], emb_a, emb_b, 0.01))
    dense = with_kernels(w + scale[:, None, None] * jnp.einsum("lir,lor->lio", a, b),
                         params["embed"] + 0.01 * emb_a @ emb_b.T)
    np.testing.assert_allclose(model.apply(params=low, tokens=tokens), model.apply(dense, tokens),
                               rtol=1e-4, atol=1e-4)
    # a scalar scale on a stacked kernel means the same scale in every layer
    same = with_kernels(LowRankKernel(w, a, b, 0.05), params["embed"])
    np.testing.assert_allclose(model.apply(same, tokens), model.apply(
        with_kernels(w + 0.05 * jnp.einsum("lir,lor->lio", a, b), params["embed"]), tokens), rtol=1e-4, atol=1e-4)


def test_zero_initialised_lora_leaves_logits_unchanged(tiny_model):
    model, params = tiny_model
    tokens = _tokens(6, (2, 8))
    lora = models.init_lora(jax.random.key(0), params, rank=4, targets=("q", "v", "o"))
    assert set(lora[models.LAYERS]["attn"]) == {"q", "v", "o"}
    L, D = model.config.n_layers, model.config.d_model
    assert lora[models.LAYERS]["attn"]["q"]["kernel"]["a"].shape == (L, D, 4)  # one pair per layer
    assert lora[models.LAYERS]["attn"]["q"]["kernel"]["b"].shape == (L, D, 4)
    merged = models.merge_lora(params, lora, alpha=8.0)
    q = merged[models.LAYERS]["attn"]["q"]["kernel"]
    assert isinstance(q, LowRankKernel) and q.scale.shape == (L,)
    np.testing.assert_array_equal(np.asarray(model.apply(merged, tokens)), np.asarray(model.apply(params, tokens)))


def test_trained_lora_factored_equals_dense_merge(tiny_model):
    model, params = tiny_model
    tokens = _tokens(7, (2, 8))
    lora = models.init_lora(jax.random.key(0), params, rank=2, targets=("q", "v", "lm_head")
                            if not model.config.tie_embeddings else ("k", "up" if model.config.gated_mlp else "fc"))
    lora = jax.tree.map(lambda v: v + 0.1, lora)  # make b non-zero
    factored = model.apply(models.merge_lora(params, lora, alpha=4.0), tokens)
    dense = model.apply(models.merge_lora(params, lora, alpha=4.0, dense=True), tokens)
    np.testing.assert_allclose(factored, dense, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(np.asarray(factored - model.apply(params, tokens)))) > 1e-3


def test_lora_errors():
    params = models.TransformerLM(models.tiny("gpt2")).init(jax.random.key(0))
    with pytest.raises(ValueError, match="'query'"):
        models.init_lora(jax.random.key(0), params, rank=2, targets=("query",))
    with pytest.raises(ValueError, match="rank=0"):
        models.init_lora(jax.random.key(0), params, rank=0)


# ----------------------------------------------------------------------------- soft prompts
def test_soft_prompt_equals_prepending_its_tokens(tiny_model):
    """A prompt made of token embeddings must act exactly like those tokens in the input."""
    model, params = tiny_model
    prefix, tokens = _tokens(8, (1, 4)), _tokens(9, (2, 6))
    prompt = models.init_prompt(jax.random.key(0), params, 4, from_tokens=prefix[0].tolist())
    with_prompt = model.apply(params, tokens, prompt=prompt)
    chex.assert_shape(with_prompt, (2, 6, model.config.vocab_size))
    full = model.apply(params, jnp.concatenate([jnp.repeat(prefix, 2, axis=0), tokens], axis=1))
    np.testing.assert_allclose(with_prompt, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_generation_with_soft_prompt_matches_prefix_tokens(tiny_model, byte_tokenizer):
    model, params = tiny_model
    prefix = [ord(c) for c in "Q: "]
    prompt = models.init_prompt(jax.random.key(0), params, 3, from_tokens=prefix)
    ids, mask = byte_tokenizer.batch_encode(["hi", "what"])
    soft = models.generate(model, params, ids, mask, jax.random.key(0), 6, soft_prompt=prompt)
    ids2, mask2 = byte_tokenizer.batch_encode(["Q: hi", "Q: what"])
    hard = models.generate(model, params, ids2, mask2, jax.random.key(0), 6)
    np.testing.assert_array_equal(np.asarray(soft.tokens), np.asarray(hard.tokens))


# ----------------------------------------------------------------------------- dtypes, config, tokenizers
def test_bfloat16_model_tracks_float32():
    cfg = models.tiny("llama")
    model32 = models.TransformerLM(cfg)
    params = model32.init(jax.random.key(0))
    model16 = models.TransformerLM(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tokens = _tokens(10, (2, 8))
    ref = model32.apply(params, tokens)
    out = model16.apply(params16, tokens)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 0.05


@pytest.mark.parametrize("kw, message", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
    (dict(family="bert"), "family='bert'"),
    (dict(d_model=30, n_heads=4), "n_heads=4"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(rope_scaling=(("rope_type", "yarn"),)), "yarn"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(attention_impl="cudnn"), "bfloat16/float16 only"),
])
def test_invalid_config_names_the_value(kw, message):
    with pytest.raises(ValueError, match=message):
        models.ModelConfig(**kw)


def test_byte_tokenizer_round_trip_and_left_padding(byte_tokenizer):
    text = "héllo, wörld ✓"
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text
    ids, mask = byte_tokenizer.batch_encode(["ab", "abcd"], add_bos=True)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert ids[0, 0] == byte_tokenizer.pad_id and ids[0, 2] == byte_tokenizer.bos_id


def test_checkpoint_tokenizer_json_is_used(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.eos_id == tok.token_to_id("<|endoftext|>") and loaded.pad_id == loaded.eos_id
    ids = loaded.encode("the cat sat")
    assert ids == tok.encode("the cat sat").ids and loaded.decode(ids) == "the cat sat"
    assert len(ids) < len("the cat sat")  # merges were applied
    from models.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="does not exist"):
        models.load_tokenizer(str(tmp_path / "missing"))
    from models.hf_config import CheckpointError

    for missing in ("missing", "model.Q4_1.gguf"):  # a path that is not there is named as such, whatever its name
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{tmp_path / missing}' does not exist")):
            models.from_pretrained(str(tmp_path / missing))
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        models.load_tokenizer(str(tmp_path))


def test_a_run_config_builds_a_random_model_of_every_family():
    """`model.family` accepts every family `models.tiny` builds (a random Qwen2/Qwen3/Gemma 3 needs no checkpoint)."""
    from gfo.run.build import build_model
    from gfo.run.config import ConfigError, load_config
    from models.config import _FAMILIES

    for family in _FAMILIES:
        assert load_config(None, [f"model.family={family}"]).model.family == family
    cfg = load_config(None, ["model.family=qwen2", "model.overrides={n_layers: 1}"])  # one built (a compile each)
    model, params = build_model(cfg.model, jax.random.key(0))
    assert model.config == models.tiny("qwen2", n_layers=1, dtype=cfg.model.dtype, param_dtype=cfg.model.dtype)
    assert params["layers"]["attn"]["q"]["bias"].shape == (1, 64) and "bias" not in params["layers"]["attn"]["o"]  # Qwen2
    with pytest.raises(ConfigError, match=r"'model.family' = 'mamba'.*'gemma3'"):
        load_config(None, ["model.family=mamba"])


def test_model_overrides_are_checked_against_the_config_field_types():
    """A YAML `1e-6` (read as a string) is the float it means; a wrong type names the field and its type."""
    from gfo.run.build import build_model
    from gfo.run.config import ConfigError, load_config

    cfg = load_config(None, ["model.family=llama", "model.overrides={norm_eps: 1e-6, layer_types: null}"])
    model, _ = build_model(cfg.model, jax.random.key(0))
    assert model.config.norm_eps == 1e-6 and isinstance(model.config.norm_eps, float)
    with pytest.raises(ConfigError, match=r"'model.overrides.d_model' = 'wide' has type str; expected int"):
        build_model(load_config(None, ["model.overrides.d_model=wide"]).model, jax.random.key(0))
    # the library door: the same field named by ModelConfig itself
    with pytest.raises(ValueError, match=r"ModelConfig.norm_eps='1e-6' is invalid: expected a number"):
        models.tiny("llama", norm_eps="1e-6")
