"""Discrete prompt search improves a task metric over the initial prompt on a tiny model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
from gfo.optim.search.discrete import prompt_objective, search
from gfo.tasks import TASKS


@pytest.fixture(scope="module")
def problem():
    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=1, n_heads=2))
    params = model.init(jax.random.key(0))
    task = TASKS["prompt_classification"](k=4, batch_size=8, eval_size=8)
    loss = prompt_objective(task, model, params, task.train_batch(0))
    vocab = np.arange(97, 123)  # lower-case letters
    return loss, vocab


@pytest.mark.parametrize("method", [pytest.param("annealing", marks=pytest.mark.slow), "tabu", pytest.param("aco", marks=pytest.mark.slow)])
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


@pytest.mark.slow
def test_hard_prompt_search_runs_through_gfo_train_and_resumes(tmp_path):
    """`space.kind: hard_prompt` + `optimizer.method: tabu`: checkpoints, resume, tokens from the vocab."""
    from gfo.run.config import load_config
    from gfo.run.train import train

    letters = list(range(97, 123))
    args = ["pretrain=null", f"runs_dir={tmp_path}", "task.name=prompt_classification", "task.options={k: 2}",
            "task.batch_size=8", "task.eval_size=8", "model.overrides={d_model: 32, n_layers: 1, n_heads: 2}",
            "space.kind=hard_prompt", "space.n_tokens=3", f"space.vocab={letters}", "optimizer.method=tabu",
            "optimizer.population=6", "optimizer.tenure=2", "eval_every=2", "checkpoint_every=2"]
    first = train(load_config(None, [*args, "steps=2"]))
    resumed = train(load_config(None, [*args, "steps=4"]))
    prompt = np.asarray(resumed["params"]["soft_prompt"])
    assert prompt.shape == (3, 32)
    train_rows = [r for r in resumed["records"] if r["split"] == "train"]
    assert [r["step"] for r in train_rows][-1] == 4 and all(r["evaluations"] == 8 for r in train_rows)
    assert resumed["records"][: len(first["records"])] == first["records"]
    with pytest.raises(Exception, match="needs space.kind='hard_prompt'"):
        train(load_config(None, [*args, "name=other", "space.kind=prompt"]))
