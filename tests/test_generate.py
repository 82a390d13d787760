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
