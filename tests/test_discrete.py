"""Discrete prompt search improves a task metric over the initial prompt on a tiny model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
from gfo.discrete import prompt_objective, search
from gfo.tasks import TASKS


@pytest.fixture(scope="module")
def problem():
    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=1, n_heads=2))
    params = model.init(jax.random.key(0))
    task = TASKS["prompt_classification"](k=4, batch_size=8, eval_size=8)
    loss = prompt_objective(task, model, params, task.train_batch(0))
    vocab = np.arange(97, 123)  # lower-case letters
    return loss, vocab


@pytest.mark.parametrize("method", ["annealing", "tabu", "aco"])
def test_each_search_improves_the_task_loss_over_the_initial_prompt(problem, method):
    loss, vocab = problem
    initial = np.array([ord(c) for c in "zqxj"], np.int32)
    start = float(loss(initial[None])[0])
    res = search(loss, initial, vocab, method=method, steps=15, proposals=8, ants=8, key=jax.random.key(1))
    print(f"{method}: task cross-entropy {start:.4f} -> {res.fun:.4f} with prompt {bytes(res.tokens.tolist())!r}")
    assert res.fun < start
    assert np.all(np.diff(res.history) <= 0) and res.history.shape == (15,)
    assert float(loss(res.tokens[None])[0]) == pytest.approx(res.fun, rel=1e-5)
    assert set(res.tokens.tolist()) <= set(vocab.tolist())


def test_search_errors(problem):
    loss, vocab = problem
    with pytest.raises(ValueError, match="method='genetic'"):
        search(loss, np.zeros(3, np.int32), vocab, method="genetic")
    with pytest.raises(ValueError, match="cooling"):
        search(loss, np.zeros(3, np.int32), vocab, cooling=1.5)
