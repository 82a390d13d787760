"""`eval.select_by`: a dev split, the best-dev point kept and reported; KL drift; the report's view."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from gfo.run.config import ConfigError, RunConfig, from_dict, to_dict


def _config(tmp_path, **eval_section):
    return from_dict(RunConfig, {
        "name": "sel", "runs_dir": str(tmp_path), "steps": 6, "eval_every": 1, "log_every": 1, "checkpoint_every": 6,
        "model": {"family": "gpt2", "overrides": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 96}},
        "task": {"name": "prompt_classification", "batch_size": 8, "eval_size": 8, "options": {"k": 8}},
        "optimizer": {"method": "spsa", "eps": 1e-2, "lr": 3.0, "transform": "sgd"},
        "eval": eval_section})


@pytest.mark.slow
def test_select_by_dev_keeps_and_reports_the_best_dev_point(tmp_path):
    from gfo.run.report import compare
    from gfo.run.train import train

    cfg = _config(tmp_path, select_by="dev_cross_entropy", dev_size=8, kl_prompts=1)
    result = train(cfg)
    evals = [r for r in result["records"] if r["split"] == "eval"]
    assert len(evals) == 7 and all("dev_cross_entropy" in r and "kl_drift" in r for r in evals)
    best = min(evals, key=lambda r: (r["dev_cross_entropy"], r["step"]))
    assert result["selected"]["step"] == best["step"]
    assert evals[0]["kl_drift"] == pytest.approx(0.0, abs=1e-6)
    assert max(r["kl_drift"] for r in evals) > 1e-4  # lr 3: the model moves
    # The returned params are the selected point: its dev loss, recomputed, is the selected record's.
    import models
    from gfo.run.build import build_task

    task = build_task(cfg.task, cfg.seed)
    model = models.TransformerLM(models.tiny("gpt2", d_model=16, n_layers=1, n_heads=2, max_seq_len=96))
    dev = task.dev_batches(8)
    ce = np.mean([float(task.metrics(model, result["params"], b, jax.random.key(0))["cross_entropy"]) for b in dev])
    assert ce == pytest.approx(best["dev_cross_entropy"], rel=1e-4)
    summary = open(os.path.join(tmp_path, "sel", "summary.md")).read()
    assert f"**Selected by dev_cross_entropy** ({best['dev_cross_entropy']:.4f}): step {best['step']}" in summary
    table = compare([os.path.join(tmp_path, "sel")])
    assert f"| sel | {best['step']} |" in table  # the report shows the selected record, not the last


def test_select_by_needs_a_dev_split():
    with pytest.raises(ConfigError, match="needs eval.dev_size >= 1"):
        from_dict(RunConfig, {"eval": {"select_by": "dev_accuracy"}})
    with pytest.raises(ConfigError, match="expected 'dev_<metric>'"):
        from_dict(RunConfig, {"eval": {"select_by": "accuracy", "dev_size": 4}})


def test_dev_split_is_disjoint_from_train_and_eval(tmp_path):
    import json

    from gfo.tasks.classification import PromptClassification

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"example {i}", "label": i % 2}) + "\n" for i in range(60)))
    task = PromptClassification(n_train=20, data_path=str(path), eval_size=16, batch_size=8)
    assert len(task.train_set) == 20 and len(task.eval_set) == 16
    dev_texts = {t for t, _ in task._dev_pool[:16]}
    assert not dev_texts & {t for t, _ in task.train_set} and not dev_texts & {t for t, _ in task.eval_set}
    assert sum(b["label"].shape[0] for b in task.dev_batches(16)) == 16
    with pytest.raises(ValueError, match="dev_size=30 but only 24 examples remain"):
        task.dev_batches(30)


def test_pass_at_k_matches_its_combinatorial_definition():
    from math import comb

    import jax.numpy as jnp

    from gfo.diagnostics import pass_at_k

    correct = jnp.array([[1, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [1] * 8, [0, 0, 0, 0, 0, 0, 0, 1]])
    for k in (1, 2, 3, 8):
        expected = np.mean([1 - comb(8 - int(c), k) / comb(8, k) for c in correct.sum(1)])
        assert float(pass_at_k(correct, k)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_pass_at_k_is_logged_for_a_generation_task(tmp_path):
    from gfo.run.train import train

    cfg = from_dict(RunConfig, {
        "name": "pk", "runs_dir": str(tmp_path), "steps": 1, "eval_every": 1, "log_every": 1, "checkpoint_every": 1,
        "model": {"family": "gpt2", "overrides": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 256}},
        "task": {"name": "countdown", "batch_size": 2, "eval_size": 2, "options": {"n_numbers": 2, "max_number": 3}},
        "optimizer": {"method": "spsa", "eps": 1e-2, "lr": 1e-3, "transform": "sgd"},
        "eval": {"samples": 4, "temperature": 1.0}})
    evals = [r for r in train(cfg)["records"] if r["split"] == "eval"]
    assert all({"pass@1", "pass@2", "pass@4"} <= set(r) for r in evals)
    assert all(0.0 <= r["pass@1"] <= r["pass@2"] <= r["pass@4"] <= 1.0 for r in evals)


@pytest.mark.slow
def test_eval_metrics_are_means_over_examples_when_the_last_batch_is_short(tmp_path):
    from gfo.run import build

    cfg = from_dict(RunConfig, {**to_dict(_config(tmp_path)), "task": {"name": "prompt_classification",
                                                                       "batch_size": 4, "eval_size": 10,
                                                                       "options": {"k": 8}}})
    model, params = build.model_of(cfg)
    run = build.build_run(cfg, str(tmp_path / "sel"), model, params, build.build_mesh(cfg))
    assert [b["label"].shape[0] for b in run.task.eval_batches()] == [4, 4, 2]
    whole = run.task._batch(run.task.eval_set)  # the 10 examples as one batch: the reference
    reference = run.task.metrics(model, run.space.to_params(run.x0), whole, jax.random.key(0))
    row = run.evaluation.metrics(run.x0)
    for k in ("accuracy", "cross_entropy"):
        np.testing.assert_allclose(row[k], float(reference[k]), rtol=1e-5, atol=1e-6)
