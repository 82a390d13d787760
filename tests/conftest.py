"""Shared fixtures: tiny models built once per session, tiny Hugging Face checkpoints on disk."""

from __future__ import annotations

import os

# Eight fake CPU devices for the whole session (read when the backend starts, before any test runs):
# scale-out tests shard over them, and every `gfo train` test runs on the default all-device mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest

import models  # noqa: E402


@pytest.fixture(autouse=True)
def _strict_rank_promotion(request):
    """Implicit rank promotion is an error in our code; modules that drive evosax (whose internals
    rely on it) opt out with `ALLOW_RANK_PROMOTION = True`."""
    if getattr(request.module, "ALLOW_RANK_PROMOTION", False):
        yield
        return
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request):
    """`(model, params)` of a tiny random model of each family (byte vocabulary)."""
    model = models.TransformerLM(models.tiny(request.param))
    return model, model.init(jax.random.key(0))


@pytest.fixture(scope="session")
def byte_tokenizer():
    return models.ByteTokenizer()


class LMObjective:
    """Next-token cross-entropy of a batch `[B, T+1]` of token ids at `to_params(x)` (a loss)."""

    def __init__(self, model, to_params):
        self.model, self.to_params = model, to_params

    def __call__(self, x, batch, key):
        import optax

        logits = self.model.apply(self.to_params(x), batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.fixture(scope="session")
def lm_problem():
    """A 1-layer byte-level GPT-2 and a small fixed batch `[4, 17]` of text."""
    import jax.numpy as jnp

    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    params = model.init(jax.random.key(0))
    tok = models.ByteTokenizer()
    text = "the cat sat on the mat. " * 4
    batch = jnp.asarray([tok.encode(text[i:i + 17]) for i in range(0, 32, 8)])
    return model, params, batch
