"""`TransformerLM.token_logprobs` (the head a block of vocabulary columns at a time) against the log-softmax
of the full logits, for every kind of head kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from gfo.optim.noise import leaf_noise_keys
from models.linear import LowRankKernel, NoisyLeaf

VOCAB = 61  # prime: no block width divides it


def _reference(model, params, tokens, targets):
    logp = jax.nn.log_softmax(model.apply(params, tokens))
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def batch():
    seq = jax.random.randint(jax.random.key(1), (2, 8), 0, VOCAB)
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("family, overrides", [
    ("gpt2", {}),  # tied embedding
    ("llama", {"tie_embeddings": False}),  # its own lm_head
    ("gemma3", {"final_logit_softcap": 5.0}),  # soft-capped logits
])
@pytest.mark.parametrize("block", [7, pytest.param(None, marks=pytest.mark.slow)])  # partial last block; default
def test_token_logprobs_equal_the_log_softmax_of_the_logits(family, overrides, block, batch):
    model = models.TransformerLM(models.tiny(family, d_model=16, n_layers=1, n_heads=2, vocab_size=VOCAB,
                                             **overrides))
    params = model.init(jax.random.key(0))
    tokens, targets = batch
    got = model.token_logprobs(params, tokens, targets, block=block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(model, params, tokens, targets)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_descriptor_heads_and_the_gradient(batch):
    """A LoRA-like `LowRankKernel` and a `NoisyLeaf` tied embedding give the reference values (blocked), an
    untied `NoisyLeaf` head falls back to the full logits, and the gradient equals the full loss's."""
    tokens, targets = batch
    tied = models.TransformerLM(models.tiny("gpt2", d_model=16, n_layers=1, n_heads=2, vocab_size=VOCAB))
    params = tied.init(jax.random.key(0))
    a = 0.1 * jax.random.normal(jax.random.key(2), (VOCAB, 3))
    b = 0.1 * jax.random.normal(jax.random.key(3), (16, 3))
    path = (jax.tree_util.DictKey("embed"),)
    for embed in (LowRankKernel(params["embed"], a, b, 0.5),
                  NoisyLeaf(params["embed"], leaf_noise_keys(jax.random.key(4), path, params["embed"]), jnp.float32(0.1))):
        p = {**params, "embed": embed}
        np.testing.assert_allclose(np.asarray(tied.token_logprobs(p, tokens, targets, block=9)),
                                   np.asarray(_reference(tied, p, tokens, targets)), rtol=1e-5, atol=1e-5)
    untied = models.TransformerLM(models.tiny("llama", d_model=16, n_layers=1, n_heads=2, vocab_size=VOCAB,
                                              tie_embeddings=False))
    q = untied.init(jax.random.key(0))
    q = {**q, "lm_head": NoisyLeaf(q["lm_head"], jax.random.key(5), jnp.float32(0.1))}
    np.testing.assert_allclose(np.asarray(untied.token_logprobs(q, tokens, targets, block=9)),
                               np.asarray(_reference(untied, q, tokens, targets)), rtol=1e-5, atol=1e-5)

    grad = jax.grad(lambda p: -tied.token_logprobs(p, tokens, targets, block=9).mean())(params)
    want = jax.grad(lambda p: -_reference(tied, p, tokens, targets).mean())(params)
    for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_targets_of_another_shape_are_refused(batch):
    model = models.TransformerLM(models.tiny("gpt2", d_model=16, n_layers=1, n_heads=2, vocab_size=VOCAB))
    tokens, targets = batch
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"targets \(2, 6\) must have shape \(2, 7\)"):
        model.token_logprobs(params, tokens, targets[:, 1:])
    with pytest.raises(ValueError, match=r"targets \(2, 7\) must have shape \(2, 3\)"):
        model.token_logprobs(params, tokens, targets, last=3)
    with pytest.raises(ValueError, match=r"last=8 must be in \[1, 7\]"):
        model.token_logprobs(params, tokens, targets, last=8)


@pytest.mark.slow
def test_completion_logprobs_put_only_the_completion_through_the_head():
    """A left-padded prompt and a right-padded completion: the blocked head over the last positions
    gives the log-softmax of the full logits at the completion's tokens (0 where masked)."""
    model = models.TransformerLM(models.tiny("llama", d_model=16, n_layers=1, n_heads=2, vocab_size=VOCAB))
    params = model.init(jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, VOCAB)
    prompt_mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    completion = jax.random.randint(jax.random.key(3), (2, 3), 0, VOCAB)
    completion_mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    got = models.completion_logprobs(model, params, prompt, prompt_mask, completion, completion_mask)
    seq, mask = jnp.concatenate([prompt, completion], 1), jnp.concatenate([prompt_mask, completion_mask], 1)
    logits = model.apply(params, seq[:, :-1], mask[:, :-1])[:, 4:]
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), completion[..., None], -1)[..., 0] * completion_mask
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(got[0, 2]) == 0.0 and float(jnp.min(got[1])) < -1.0  # masked entry, real log-probabilities
