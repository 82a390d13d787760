"""`gfo sweep`: a resumable optuna search whose best config reproduces its trial."""

from __future__ import annotations

import os

import optuna
import pytest

import gfo.sweep as sweep_module
from gfo import cli
from gfo.config import ConfigError, load_config
from gfo.sweep import parse_param, sweep
from gfo.train import train
from tests.test_train import _config

TINY_RUN = {"steps": 4, "eval_every": 2, "checkpoint_every": 4,
            "optimizer": {"method": "backprop", "transform": "sgd", "lr": 0.01}}
PARAMS = ["optimizer.lr=loguniform(1e-3,3e-1)", "optimizer.momentum=uniform(0.0,0.9)"]


def test_sweep_resumes_after_a_kill_and_its_best_yaml_reproduces_the_trial(tmp_path, monkeypatch):
    base = _config(tmp_path / "runs", **TINY_RUN)
    params = [parse_param(p) for p in PARAMS]
    sweep_dir = str(tmp_path / "sweep")
    real, calls = sweep_module._run_trial, {"n": 0}

    def dies_on_the_fourth_trial(cfg, on_eval):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the sweep process is killed mid-trial
        return real(cfg, on_eval)

    with monkeypatch.context() as m:
        m.setattr(sweep_module, "_run_trial", dies_on_the_fourth_trial)
        with pytest.raises(KeyboardInterrupt):
            sweep(base, params, sweep_dir, trials=6, metric="cross_entropy")
    study = optuna.load_study(study_name="gfo", storage=f"sqlite:///{sweep_dir}/study.db")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3

    result = sweep(base, params, sweep_dir, trials=6, metric="cross_entropy")
    study = result["study"]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 6
    for f in ("summary.md", "best.yaml", "history.png", "importance.png"):
        assert os.path.isfile(os.path.join(sweep_dir, f)), f
    assert "| rank | trial |" in open(os.path.join(sweep_dir, "summary.md")).read()

    rerun = train(load_config(os.path.join(sweep_dir, "best.yaml")))
    final = [r for r in rerun["records"] if r["split"] == "eval"][-1]["cross_entropy"]
    assert final == pytest.approx(result["best"]["value"], rel=1e-6)
    cli.main(["report", sweep_dir, rerun["run_dir"]])  # a sweep (its best trial) beside a run


@pytest.mark.parametrize("spec", ["optimizer.lr=logunif(1e-3,1e-1)", "optimizer.lr", "optimizer.lr=uniform(1)",
                                  "optimizer.lr=loguniform(0,1)", "optimizer.lr=uniform(2,1)", "=choice(1,2)"])
def test_malformed_param_spec_names_the_accepted_forms(spec):
    with pytest.raises(ConfigError, match=r"--param"):
        parse_param(spec)


def test_param_spec_forms_and_unknown_keys(tmp_path):
    assert parse_param("optimizer.population=int(8,64)").args == (8, 64)
    assert parse_param("optimizer.method=choice(es,lowrank_es)").args == ("es", "lowrank_es")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.sigm'"):
        sweep(_config(tmp_path, **TINY_RUN), [parse_param("optimizer.sigm=uniform(0,1)")], str(tmp_path / "s"), 1)
    with pytest.raises(ConfigError, match="grid needs choice"):
        sweep(_config(tmp_path, **TINY_RUN), [parse_param(PARAMS[0])], str(tmp_path / "g"), 1, sampler="grid")


def test_repeated_seeds_give_mean_std_and_confidence_interval(tmp_path):
    result = sweep(_config(tmp_path / "runs", **TINY_RUN), [parse_param("optimizer.lr=choice(0.05)")],
                   str(tmp_path / "seeds"), trials=1, seeds=2, metric="cross_entropy", prune=False)
    (trial,) = result["study"].get_trials()
    scores = trial.user_attrs["scores"]
    assert len(scores) == 2 and scores[0] != scores[1]  # seeds differ
    assert trial.value == pytest.approx(sum(scores) / 2)
    assert trial.user_attrs["ci95"] == pytest.approx(1.96 * trial.user_attrs["std"] / 2 ** 0.5)
    assert "±95% CI" in result["table"]


@pytest.mark.parametrize("name", ["tpe", "gp", "cmaes", "random"])
def test_every_sampler_is_available(name):
    assert sweep_module.make_sampler(name, [parse_param(PARAMS[0])], seed=0) is not None
