"""Generation's fast paths against their references: top-k/top-p among candidates vs the full sort, the
cache read up to its filled slots vs the whole cache, early exit vs running every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.generate import _sorted_sample, truncation_candidates


def _reference_support(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """NumPy top-k then top-p (the smallest prefix of the sorted tokens whose mass reaches p, ties kept)."""
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p < 1:
            s = np.sort(row)[::-1]
            p = np.exp(s - s.max())
            p /= p.sum()
            before = np.cumsum(p) - p
            row[row < s[before < top_p].min()] = -np.inf
    return out


def _scatter(inside, ids, V):
    full = np.full((inside.shape[0], V), -np.inf)
    np.put_along_axis(full, np.asarray(ids), np.asarray(inside), axis=1)
    return full


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.5), (20, 1.0), (20, 0.8), (0, 0.999)])
def test_top_p_among_candidates_equals_the_full_sort(top_k, top_p):
    logits = 2.0 * jax.random.normal(jax.random.key(0), (8, 300))
    inside, ids, fits, _ = truncation_candidates(logits, top_k, top_p, candidates=64)
    ref = _reference_support(np.asarray(logits), top_k, top_p)
    got = _scatter(inside, ids, 300)
    fits = np.asarray(fits)
    assert fits.any() or top_p == 0.999
    np.testing.assert_array_equal(np.isfinite(got[fits]), np.isfinite(ref[fits]))
    np.testing.assert_allclose(got[fits][np.isfinite(got[fits])], ref[fits][np.isfinite(ref[fits])], rtol=1e-6)
    if top_p == 0.999:  # the nucleus of these rows does not fit among 64 candidates: the fallback's case
        assert not fits.all()


@pytest.mark.parametrize("candidates", [2, 256])
def test_sampling_among_candidates_or_by_the_fallback_follows_the_reference(candidates):
    """Frequencies of 20000 draws against the exact top-p distribution, with a nucleus of 3 tokens that fits
    among 256 candidates and not among 2 (the full-sort fallback)."""
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda k: models.sample_logits(k, logits, 1.0, 0, 0.85, candidates)[0]))
    freqs = np.bincount(np.asarray(draw(keys)), minlength=5) / len(keys)
    np.testing.assert_allclose(freqs, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0], atol=0.015)
    reference = jax.jit(jax.vmap(lambda k: _sorted_sample(k, logits, 0.85)[0]))(keys)
    np.testing.assert_allclose(freqs, np.bincount(np.asarray(reference), minlength=5) / len(keys), atol=0.02)


@pytest.mark.parametrize("peaked", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_sampling_under_vmap_equals_each_member_and_runs_the_fallback_only_when_needed(peaked, nested):
    """`sample_logits` vmapped over members (each its own key and rows) draws each member's own tokens, with
    every nucleus among the 64 candidates (`peaked`) or not (the fallback's bisection), and the compiled
    program draws random bits over the whole vocabulary only inside the fallback's branch (a while loop on
    a batched "all fit" had XLA hoist them, and the vocabulary's softmax, out of the loop: computed at every
    decode step whether needed or not, ≈ 10× the rest of the sampling on SmolLM2's vocabulary). `nested`:
    the 8 members as two vmaps, 4 directions × 2 signs, as an ES population evaluates them (the fallback's
    test was once unbatched under the inner vmap only, so the `cond` ran both branches at every step)."""
    import re

    from models.generate import truncation_candidates

    V = 4096
    logits = jax.random.normal(jax.random.key(0), (8, 4, V))
    if peaked:  # nuclei of one or two tokens: they fit among 64 candidates
        logits = logits.at[..., :2].add(40.0)
    keys = jax.random.split(jax.random.key(1), 8)
    fits = np.asarray(jax.vmap(lambda x: truncation_candidates(x / 0.7, 0, 0.9, 64)[2])(logits))
    assert fits.all() == peaked
    one = lambda k, x: models.sample_logits(k, x, 0.7, 0, 0.9, 64)  # noqa: E731
    lead = (4, 2) if nested else (8,)
    draw = jax.jit(jax.vmap(jax.vmap(one)) if nested else jax.vmap(one))
    args = keys.reshape(lead), logits.reshape(lead + (4, V))
    together = np.asarray(draw(*args)).reshape(8, 4)
    for m in range(8):
        np.testing.assert_array_equal(together[m], np.asarray(one(keys[m], logits[m])))
    main = draw.lower(*args).compile().as_text().split("ENTRY")[1].split("\n}")[0]
    shape = ",".join(map(str, lead + (4,)))
    assert re.search(rf"u32\[{shape},64\]", main) and not re.search(rf"u32\[{shape},4096\]", main)  # bits for 64, not V


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attention_over_the_filled_cache_equals_the_whole_cache(family):
    """`read` slots (the filled part) vs the whole cache: logits within 1e-5, prefill and decode steps,
    with left padding and (gemma3) sliding-window layers. (A padding position's own outputs are arbitrary —
    its query sees no key — and never read: compared at real tokens only.)"""
    model = models.TransformerLM(models.tiny(family))
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, 256)
    mask = jnp.ones((2, 14), jnp.int32).at[1, :3].set(0)
    full, part = model.init_cache(2, 32), model.init_cache(2, 32)
    a, full = model.apply_with_cache(params, tokens[:, :6], full, mask[:, :6])
    b, part = model.apply_with_cache(params, tokens[:, :6], part, mask[:, :6], read=0)
    real = np.asarray(mask[:, :6], bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], rtol=1e-5, atol=1e-5)
    for t in range(6, 14):  # one read length (one compilation) holding every filled slot
        a, full = model.apply_with_cache(params, tokens[:, t:t + 1], full, mask[:, t:t + 1])
        b, part = model.apply_with_cache(params, tokens[:, t:t + 1], part, mask[:, t:t + 1], read=14)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    filled = np.asarray(full.valid)
    np.testing.assert_array_equal(filled, np.asarray(part.valid))
    np.testing.assert_allclose(np.asarray(full.k)[:, filled], np.asarray(part.k)[:, filled], rtol=1e-5, atol=1e-5)


def test_generation_across_read_buckets_matches_uncached_greedy(tiny_model, byte_tokenizer):
    from models.generate import greedy_without_cache

    model, params = tiny_model
    ids, mask = byte_tokenizer.batch_encode(["The quick brown fox", "Hi"])
    out = models.generate(model, params, ids, mask, jax.random.key(0), 11, read_bucket=2)  # buckets 2, 4, 8, 11
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_without_cache(model, params, ids, mask, 11))


@pytest.mark.slow
def test_early_exit_gives_the_tokens_of_running_every_step(byte_tokenizer, temperature=0.9):
    model = models.TransformerLM(models.tiny("llama"))
    params = model.init(jax.random.key(0))
    ids, mask = byte_tokenizer.batch_encode(["abc", "defgh", "x"])
    kw = dict(temperature=temperature, top_p=0.9, pad_id=byte_tokenizer.pad_id, read_bucket=4)  # buckets 4, 8
    free = models.generate(model, params, ids, mask, jax.random.key(2), 8, **kw)
    stops = tuple(int(t) for t in np.asarray(free.tokens)[:, 2])  # every row stops by its third token
    exits = models.generate(model, params, ids, mask, jax.random.key(2), 8, stop_tokens=stops, **kw)
    every = models.generate(model, params, ids, mask, jax.random.key(2), 8, stop_tokens=stops, early_exit=False, **kw)
    for field in ("tokens", "lengths", "logprobs"):
        np.testing.assert_array_equal(np.asarray(getattr(exits, field)), np.asarray(getattr(every, field)))
    assert np.all(np.asarray(exits.lengths) <= 3)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_threshold_by_bisection_equals_the_sort(top_p):
    from models.generate import nucleus_threshold

    logits = 2.0 * jax.random.normal(jax.random.key(3), (6, 500))
    logits = logits.at[0, :10].set(logits[0, 0])  # ties
    logits = logits.at[1, 250:].set(-jnp.inf)  # a top-k-masked row
    ref = _reference_support(np.asarray(logits), 0, top_p)
    got = np.where(np.asarray(logits) < np.asarray(nucleus_threshold(logits, top_p)), -np.inf, np.asarray(logits))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))


@pytest.mark.slow
def test_the_kv_cache_is_updated_in_place_across_read_buckets():
    """One compiled generation holds its cache once: XLA's temporaries stay within the cache plus about one
    layer's slice of it (the layer being written; 1/L) over four read buckets (four while loops), where a copy
    per bucket or per step would be >= 2 x the cache."""
    from benchmarks.rollouts import cache_memory

    L = 8
    model = models.TransformerLM(models.tiny("llama", n_layers=L, max_seq_len=512))
    params = jax.eval_shape(model.init, jax.random.key(0))
    m = cache_memory(model, params, rows=8, prompt_len=16, new_tokens=256)
    assert m["cache_bytes"] == 2 * L * 8 * 272 * 2 * 16 * 4 + 8 * 272 + 4 + 8 * 4  # k, v, valid, index, next_position
    assert 1.0 <= m["temp_x_cache"] <= 1.0 + 2.0 / L, m


@pytest.mark.slow
def test_members_under_vmap_exit_together_and_write_the_cache_in_place():
    """Generation vmapped over members (a population) equals each member's own generation with its early
    exit, and its loop stays unbatched: the cache is written by dynamic-update-slice, never by a scatter at
    per-member slots (which a batched loop condition would force)."""
    import re

    model = models.TransformerLM(models.tiny("llama", n_layers=2, max_seq_len=256))
    params = model.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(3, 10)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    kw = dict(temperature=0.8, top_p=0.9, stop_tokens=(5, 17, 99))
    keys = jax.random.split(jax.random.key(1), 4)
    members = jax.jit(jax.vmap(lambda k: models.generate(model, params, ids, mask, k, 48, **kw)))
    together = members(keys)
    for i, key in enumerate(keys):
        alone = models.generate(model, params, ids, mask, key, 48, **kw)
        np.testing.assert_array_equal(np.asarray(together.tokens[i]), np.asarray(alone.tokens))
        np.testing.assert_array_equal(np.asarray(together.lengths[i]), np.asarray(alone.lengths))
    assert len(set(np.asarray(together.lengths).ravel().tolist())) > 1  # rows and members stop at different steps
    hlo = members.lower(keys).compile().as_text()
    assert not re.search(r"= \S+ scatter\(", hlo) and re.search(r"= \S+ dynamic-update-slice\(", hlo)
