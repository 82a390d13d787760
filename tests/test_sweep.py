"""`gfo sweep`: a resumable optuna search whose best config reproduces its trial."""

from __future__ import annotations

import os

import optuna
import pytest

import gfo.run.sweep as sweep_module
from gfo.run import cli
from gfo.run.config import ConfigError, load_config
from gfo.run.sweep import parse_param, sweep
from gfo.run.train import train
from tests.test_train import _config

TINY_RUN = {"steps": 4, "eval_every": 2, "checkpoint_every": 4,
            "optimizer": {"method": "backprop", "transform": "sgd", "lr": 0.01}}
PARAMS = ["optimizer.lr=loguniform(1e-3,3e-1)", "optimizer.momentum=uniform(0.0,0.9)"]


@pytest.mark.slow
def test_sweep_resumes_after_a_kill_and_its_best_yaml_reproduces_the_trial(tmp_path, monkeypatch):
    base = _config(tmp_path / "runs", **TINY_RUN)
    params = [parse_param(p) for p in PARAMS]
    sweep_dir = str(tmp_path / "sweep")
    real, calls = sweep_module._run_trial, {"n": 0}

    def dies_on_the_fourth_trial(cfg, on_eval):
        calls["n"] += 1
        if calls["n"] == 4:  # the sweep process is killed mid-trial, after its first evaluation

            def killed(step, row):
                raise KeyboardInterrupt

            return real(cfg, killed)
        return real(cfg, on_eval)

    with monkeypatch.context() as m:
        m.setattr(sweep_module, "_run_trial", dies_on_the_fourth_trial)
        with pytest.raises(KeyboardInterrupt, match=r"interrupted during trial 3 \(its run directories removed\); "
                                                     r"3 of 6 trials finished; rerun the same command"):
            sweep(base, params, sweep_dir, trials=6, metric="cross_entropy")
    study = optuna.load_study(study_name="gfo", storage=f"sqlite:///{sweep_dir}/study.db")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3
    assert not os.path.exists(os.path.join(sweep_dir, "trial_3_seed_0"))  # the killed trial left nothing
    assert os.path.isdir(os.path.join(sweep_dir, "trial_2_seed_0"))

    result = sweep(base, params, sweep_dir, trials=6, metric="cross_entropy")
    study = result["study"]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 6
    sampled = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(sampled)) == len(sampled), sampled  # the resumed sampler does not replay earlier values
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


def test_metric_and_choices_are_checked_before_any_trial_runs(tmp_path):
    base = _config(tmp_path / "runs", **TINY_RUN)
    with pytest.raises(ConfigError, match=r"--metric 'cros_entropy' is not an eval metric of task 'grammar_lm' "
                                          r"\(did you mean 'cross_entropy'\?\): expected one of \['cross_entropy', "
                                          r"'perplexity'\]"):
        sweep(base, [parse_param(PARAMS[0])], str(tmp_path / "s"), 1, metric="cros_entropy")
    with pytest.raises(ConfigError, match=r"'optimizer.transform' = 'adamm' is not a valid choice"):
        sweep(base, [parse_param("optimizer.transform=choice(sgd,adamm)")], str(tmp_path / "s"), 1)
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "runs")


def test_sweep_command_takes_a_variant(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(sweep_module, "sweep", lambda base, *a, **k: seen.setdefault("cfg", base))
    config = os.path.join(os.path.dirname(__file__), "..", "paper_configs", "es_countdown.yaml")
    cli.main(["sweep", config, "--variant", "smoke", "--param", PARAMS[0], "--metric", "reward"])
    assert seen["cfg"] == load_config(config, variant="smoke") and seen["cfg"].steps == 2


def test_param_spec_forms_and_unknown_keys(tmp_path):
    assert parse_param("optimizer.population=int(8,64)").args == (8, 64)
    assert parse_param("optimizer.method=choice(es,lowrank_es)").args == ("es", "lowrank_es")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.sigm'"):
        sweep(_config(tmp_path, **TINY_RUN), [parse_param("optimizer.sigm=uniform(0,1)")], str(tmp_path / "s"), 1)
    with pytest.raises(ConfigError, match="grid needs choice"):
        sweep(_config(tmp_path, **TINY_RUN), [parse_param(PARAMS[0])], str(tmp_path / "g"), 1, sampler="grid")


@pytest.mark.slow
def test_repeated_seeds_give_mean_std_and_confidence_interval(tmp_path):
    result = sweep(_config(tmp_path / "runs", **TINY_RUN), [parse_param("optimizer.lr=choice(0.05)")],
                   str(tmp_path / "seeds"), trials=1, seeds=2, metric="cross_entropy", prune=False)
    (trial,) = result["study"].get_trials()
    scores = trial.user_attrs["scores"]
    assert len(scores) == 2 and scores[0] != scores[1]  # seeds differ
    assert trial.value == pytest.approx(sum(scores) / 2)
    assert trial.user_attrs["ci95"] == pytest.approx(1.96 * trial.user_attrs["std"] / 2 ** 0.5)
    assert "±95% CI" in result["table"]


@pytest.mark.parametrize("name,kind", [("tpe", optuna.samplers.TPESampler), ("gp", optuna.samplers.GPSampler),
                                       ("cmaes", optuna.samplers.CmaEsSampler), ("random", optuna.samplers.RandomSampler),
                                       ("grid", optuna.samplers.GridSampler)])
def test_every_sampler_is_available_and_samples_inside_the_range(name, kind):
    params = [parse_param("optimizer.lr=choice(0.1,0.2)" if name == "grid" else PARAMS[0])]
    sampler = sweep_module.make_sampler(name, params, seed=0)
    assert isinstance(sampler, kind)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: sweep_module._suggest(trial, params[0]), n_trials=2)  # the grid has two points
    values = [t.value for t in study.trials]
    assert len(values) == 2 and all(v in (0.1, 0.2) if name == "grid" else 1e-3 <= v <= 3e-1 for v in values), values
