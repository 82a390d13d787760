"""The research scripts of `examples/`, run at toy size as a user runs them, and the estimator written in
one file (`examples/orthogonal_es.py`) checked against the true gradient and run through `gfo train`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tests.test_checkpoint_tasks import checkpoint  # noqa: F401 - a tiny Llama checkpoint with its tokenizer
from tests.test_text import tokenizer_dir  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_mezo_on_a_checkpoint_directory_in_under_40_lines(checkpoint):  # noqa: F811
    assert len(open(os.path.join(ROOT, "examples", "mezo_hf.py")).read().splitlines()) <= 40
    out = _run("examples/mezo_hf.py", str(checkpoint), "--steps", "3", "--lr", "1e-3")
    assert len(re.findall(r"^step \d+: loss at x ± εz \d+\.\d+$", out, re.M)) == 3
    start, end = map(float, re.search(r"cross-entropy (\S+) -> (\S+)", out).groups())
    assert np.isfinite(end) and abs(end - start) < 0.5 and start > 1.0  # a random model: ≈ log(vocab)


@pytest.mark.slow
def test_es_on_a_custom_python_reward_of_generated_text():
    out = _run("examples/es_custom_reward.py", "--steps", "2", "--population", "4")
    rewards = [float(r) for r in re.findall(r"^step \d+: mean member reward (\S+)$", out, re.M)]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    start, end = map(float, re.search(r"reward (\S+) -> (\S+)", out).groups())
    assert 0.0 <= start <= 1.0 and 0.0 <= end <= 1.0


def _orthogonal_es():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import orthogonal_es
    finally:
        sys.path.pop(0)
    return orthogonal_es.OrthogonalES


def test_the_one_file_estimator_is_unbiased_and_its_directions_orthogonal():
    OrthogonalES = _orthogonal_es()
    a = jnp.linspace(0.5, 2.0, 12)
    loss = lambda x, b, k: jnp.sum(a * (x - 1.0) ** 2)  # noqa: E731 - gradient 2a(x - 1)
    x = jnp.zeros(12)
    est = OrthogonalES(sigma=1e-2, n=6)
    grads = jax.jit(jax.vmap(lambda k: est(loss, x, None, k)[0]))(jax.random.split(jax.random.key(0), 4000))
    truth = 2 * a * (x - 1.0)
    # E[g] = (1/n) Σ E[u uᵀ] ∇ = ∇ (each u_k has E[u uᵀ] = I); 4000 samples: a few % of |∇|
    np.testing.assert_allclose(np.asarray(grads.mean(0)), np.asarray(truth), atol=0.06 * float(jnp.abs(truth).max()))
    cosine = np.asarray(grads @ truth) / (np.linalg.norm(np.asarray(grads), axis=1) * float(jnp.linalg.norm(truth)))
    assert cosine.mean() > 0.5  # 6 of 12 directions: the estimate points along the gradient


@pytest.mark.slow
def test_the_one_file_estimator_runs_through_gfo_train_by_its_name(tmp_path):
    from gfo.run.config import load_config
    from gfo.run.train import train

    path = tmp_path / "orthogonal.yaml"
    path.write_text(yaml.safe_dump({
        "name": "orth", "runs_dir": str(tmp_path / "runs"), "steps": 4, "eval_every": 2, "log_every": 1,
        "plugins": [os.path.join(ROOT, "examples", "orthogonal_es.py")],
        "model": {"family": "gpt2", "overrides": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}},
        "task": {"name": "grammar_lm", "batch_size": 4, "eval_size": 4, "options": {"seq_len": 16}},
        "space": {"kind": "subspace", "dim": 16},
        "optimizer": {"method": "orthogonal_es", "sigma": 0.05, "n": 8, "transform": "sgd", "lr": 0.5}}))
    result = train(load_config(str(path)))
    train_rows = [r for r in result["records"] if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["evaluations"] == 16 for r in train_rows)
    from gfo.run.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.rank does not apply to method 'orthogonal_es'"):
        load_config(str(path), ["optimizer.rank=3"])


def test_a_module_plugin_of_the_working_directory_imports_from_the_gfo_command(tmp_path, monkeypatch):
    """`plugins: [mylab.methods]` resolves from the working directory, as `python -m` would, though the
    console script does not put it on sys.path; a missing one names the module and where it looked."""
    import sys

    from gfo.run.config import ConfigError, import_plugins

    (tmp_path / "mylab_plugin_pkg").mkdir()
    (tmp_path / "mylab_plugin_pkg" / "__init__.py").write_text("")
    (tmp_path / "mylab_plugin_pkg" / "tasks.py").write_text("ANSWER = 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (module,) = import_plugins(["mylab_plugin_pkg.tasks"])
    assert module.ANSWER == 42 and sys.path[-1] == str(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_lab\.x'.*working directory"):
        import_plugins(["no_such_lab.x"])
