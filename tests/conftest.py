"""Shared fixtures: tiny models built once per session, tiny Hugging Face checkpoints on disk."""

from __future__ import annotations

import jax
import pytest

import models

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request):
    """`(model, params)` of a tiny random model of each family (byte vocabulary)."""
    model = models.TransformerLM(models.tiny(request.param))
    return model, model.init(jax.random.key(0))


@pytest.fixture(scope="session")
def byte_tokenizer():
    return models.ByteTokenizer()
