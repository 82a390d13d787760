"""`gfo train` end to end: every optimizer family, exact resume, and clear errors for bad input."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml

from gfo import cli
from gfo.config import ConfigError, from_dict, load_config, RunConfig
from gfo.train import CheckpointError, DivergenceError, train

ALLOW_RANK_PROMOTION = True  # evosax runs here

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}


def _config(tmp_path, **sections) -> RunConfig:
    base = {"name": "run", "runs_dir": str(tmp_path), "steps": 4, "eval_every": 2, "log_every": 1,
            "checkpoint_every": 2, "model": {"family": "gpt2", "overrides": TINY},
            "task": {"name": "grammar_lm", "batch_size": 4, "eval_size": 4, "options": {"seq_len": 16}},
            "space": {"kind": "full"}, "optimizer": {"method": "backprop", "lr": 0.01}}
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(RunConfig, base)


FAMILIES = {
    "backprop+adam": {"optimizer": {"method": "backprop", "transform": "adam", "lr": 0.01}},
    "spsa+sgd": {"optimizer": {"method": "spsa", "transform": "sgd", "lr": 0.01, "sigma": 1e-3, "n": 2}},
    "es": {"optimizer": {"method": "es", "population": 8, "sigma": 0.01, "eval_chunk": 4}},
    "lowrank_es": {"optimizer": {"method": "lowrank_es", "population": 8, "sigma": 0.01, "rank": 2}},
    "cma_es on subspace": {"space": {"kind": "subspace", "dim": 8}, "optimizer": {"method": "CMA_ES", "population": 6,
                                                                                 "sigma": 0.05}},
    "sep_cma_es on lora": {"space": {"kind": "lora", "rank": 1, "targets": ["q", "v"]},
                           "optimizer": {"method": "Sep_CMA_ES", "population": 6, "sigma": 0.05}},
    "policy_gradient": {"task": {"name": "countdown", "batch_size": 4, "eval_size": 4,
                                 "options": {"n_numbers": 2, "max_number": 4}},
                        "optimizer": {"method": "policy_gradient", "group_size": 2, "kl_coef": 0.01}},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_optimizer_family_runs_through_gfo_train(name, tmp_path):
    cfg = _config(tmp_path, **FAMILIES[name])
    result = train(cfg)
    run_dir = result["run_dir"]
    for f in ("config.yaml", "metrics.jsonl", "summary.md", "curves.png"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    assert os.listdir(os.path.join(run_dir, "tb"))
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")


def _interrupt_at(monkeypatch, n_calls):
    import gfo.train as train_module

    real, calls = train_module._all_finite, {"n": 0}

    def interrupting(tree):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt
        return real(tree)

    monkeypatch.setattr(train_module, "_all_finite", interrupting)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    # low-rank ES with Adam: parameters, optimizer moments, RNG (derived from the step) and data position
    sections = {**FAMILIES["lowrank_es"], "steps": 6}
    full = train(_config(tmp_path / "a", **sections))
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)  # dies during step 4; the last checkpoint is step 2
        with pytest.raises(KeyboardInterrupt):
            train(_config(tmp_path / "b", **sections))
    resumed = train(_config(tmp_path / "b", **sections))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 full["params"], resumed["params"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731 - wall time varies
    assert strip(full["records"]) == strip(resumed["records"])


def test_unknown_key_wrong_type_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.sigmaa'; did you mean 'optimizer.sigma'"):
        load_config(None, ["optimizer.sigmaa=0.1"])
    with pytest.raises(ConfigError, match=r"'steps' = 'many' has type str; expected int"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"steps=0 is invalid"):
        load_config(None, ["steps=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"task.name='countdwn' is unknown"):
        train(_config(tmp_path, task={"name": "countdwn"}))
    with pytest.raises(ConfigError, match=r"Did you mean 'CMA_ES'"):
        train(_config(tmp_path, name="x", optimizer={"method": "cma-es2"}))


def test_malformed_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": 1,}\n')
    with pytest.raises(SystemExit, match=r"data.jsonl:2: not valid JSON"):
        cli.main(["train", "--set", f"runs_dir={tmp_path}", "--set", "pretrain=null", "--set", "task.name=prompt_classification",
                  "--set", f"task.options={{data_path: {data}, k: 1}}", "--set", "optimizer.method=spsa"])


def test_eval_and_report_and_checkpoint_errors(tmp_path, capsys):
    cfg = _config(tmp_path)
    result = train(cfg)
    cli.main(["eval", result["run_dir"]])
    assert "perplexity" in capsys.readouterr().out
    cli.main(["report", result["run_dir"], result["run_dir"], "--out", str(tmp_path / "report")])
    assert "| run | step |" in capsys.readouterr().out and os.path.isfile(tmp_path / "report" / "curves.png")
    with pytest.raises(SystemExit, match="no config.yaml"):
        cli.main(["eval", str(tmp_path / "nothing")])
    missing = tmp_path / "fresh"
    os.makedirs(missing)
    (missing / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(open(os.path.join(result["run_dir"], "config.yaml")))))
    with pytest.raises(SystemExit, match="no checkpoint directory"):
        cli.main(["eval", str(missing)])
    # corrupt the latest checkpoint: resuming must fail loudly, never restart from scratch
    ckpt = os.path.join(result["run_dir"], "checkpoints", "4")
    for root, _, files in os.walk(ckpt):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 4"):
        train(cfg)
    with pytest.raises(ConfigError, match="different config"):
        train(_config(tmp_path, optimizer={"lr": 0.5}))


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _config(tmp_path, steps=6, optimizer={"method": "backprop", "transform": "sgd", "lr": 1e30},
                  checkpoint_every=1)
    with pytest.raises(DivergenceError, match="non-finite") as err:
        train(cfg)
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(tmp_path, "run", "checkpoints")) if d.isdigit())
    assert ckpts and "last good checkpoint" in str(err.value)


def test_embedded_quickstart_and_its_yaml_agree():
    embedded = load_config(None)
    on_disk = load_config(os.path.join(os.path.dirname(__file__), "..", "paper_configs", "quickstart.yaml"))
    assert embedded == on_disk
    assert embedded.pretrain is not None and embedded.optimizer.method == "lowrank_es"
