"""`gfo sweep`: hyperparameter search on optuna, with repeated seeds, pruning and resumable storage.

    gfo sweep CONFIG --param optimizer.sigma=loguniform(1e-4,1e-1) --param optimizer.lr=loguniform(1e-4,1e-2)
                     --trials 20 --seeds 3 --sampler tpe --metric reward

Each trial samples the `--param`s, runs `gfo train` once per seed (runs `SWEEP/trial_N_seed_S`, normal
run directories) and scores the mean of the final eval `--metric` over seeds (with std and a 95 %
confidence interval). Intermediate evaluations of the first seed feed a median pruner. The study lives
in `SWEEP/study.db` (SQLite), so a killed sweep resumes where it stopped; trials that were running when
it died are marked failed and do not count. At the end: `summary.md` (trials ranked by the objective),
`history.png`, `importance.png`, and `best.yaml`, the best trial's config runnable by `gfo train` as is.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import re
import shutil
from dataclasses import dataclass

import difflib

import numpy as np
import yaml

from gfo.run.config import ConfigError, RunConfig, from_dict, set_dotted, to_dict
from gfo.run.report import NOT_METRICS

PARAM_FORMS = ("KEY=uniform(LOW,HIGH)", "KEY=loguniform(LOW,HIGH)", "KEY=int(LOW,HIGH)", "KEY=choice(A,B,...)")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
_LOWER_IS_BETTER = ("loss", "cross_entropy", "perplexity")


@dataclass(frozen=True)
class ParamSpec:
    key: str
    kind: str  # uniform | loguniform | int | choice
    args: tuple


def parse_param(spec: str) -> ParamSpec:
    """`"optimizer.sigma=loguniform(1e-4,1e-1)"` → ParamSpec; anything else is a clear error."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*=\s*(uniform|loguniform|int|choice)\((.*)\)\s*", spec)
    if not match:
        raise ConfigError(f"--param {spec!r} is malformed: expected one of {', '.join(PARAM_FORMS)}")
    key, kind, body = match.groups()
    args = tuple(_scalar(a.strip()) for a in body.split(",")) if body.strip() else ()
    if kind == "choice":
        if not args:
            raise ConfigError(f"--param {spec!r}: choice() needs at least one value")
        return ParamSpec(key, kind, args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"--param {spec!r}: {kind}() takes two numbers LOW,HIGH")
    low, high = args
    if not low < high or (kind == "loguniform" and low <= 0) or (kind == "int" and not all(isinstance(a, int) for a in args)):
        raise ConfigError(f"--param {spec!r}: expected LOW < HIGH" + (" and LOW > 0" if kind == "loguniform" else "")
                          + (" as integers" if kind == "int" else ""))
    return ParamSpec(key, kind, (low, high))


def _scalar(text: str):
    """A number when `text` reads as one (YAML 1.1 would keep "1e-3" a string), else the YAML value."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _suggest(trial, p: ParamSpec):
    if p.kind == "uniform":
        return trial.suggest_float(p.key, *p.args)
    if p.kind == "loguniform":
        return trial.suggest_float(p.key, *p.args, log=True)
    if p.kind == "int":
        return trial.suggest_int(p.key, *p.args)
    return trial.suggest_categorical(p.key, list(p.args))


def make_sampler(name: str, params: list[ParamSpec], seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)  # Gaussian process, log expected improvement
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        not_choice = [p.key for p in params if p.kind != "choice"]
        if not_choice:
            raise ConfigError(f"--sampler grid needs choice(...) for every --param; not for {not_choice}")
        return optuna.samplers.GridSampler({p.key: list(p.args) for p in params}, seed=seed)
    raise ConfigError(f"--sampler {name!r} is unknown: expected one of {SAMPLERS}")


def _direction(metric: str, direction: str | None) -> str:
    if direction is None:
        return "minimize" if metric.endswith(_LOWER_IS_BETTER) else "maximize"
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"--direction {direction!r}: expected minimize or maximize")
    return direction


def trial_config(base: dict, name: str, runs_dir: str, values: dict, seed: int) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(data, key, value)
    data.update(name=name, runs_dir=runs_dir, seed=seed)
    return from_dict(RunConfig, data)


def _final_metric(records: list[dict], metric: str) -> float:
    evals = [r for r in records if r.get("split") == "eval"]
    if not evals or metric not in evals[-1]:
        names = sorted(k for k in (evals[-1] if evals else {}) if k not in NOT_METRICS)
        raise ConfigError(f"--metric {metric!r} is not an eval metric of this task: expected one of {names}")
    return float(evals[-1][metric])


def _check_metric(cfg: RunConfig, metric: str) -> None:
    """`metric` is one the config's evaluation reports (found by a dry build: nothing runs)."""
    from gfo.run.train import check_config

    names = check_config(cfg)
    if metric not in names:
        close = difflib.get_close_matches(metric, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--metric {metric!r} is not an eval metric of task {cfg.task.name!r}{hint}: expected "
                          f"one of {names}")


def _run_trial(cfg: RunConfig, on_eval):
    from gfo.run.train import train

    return train(cfg, on_eval=on_eval)


def _remove_trial_dirs(sweep_dir: str, number: int) -> None:
    """The run directories of trial `number` (one per seed): a failed or interrupted trial leaves none."""
    for d in glob.glob(os.path.join(sweep_dir, f"trial_{number}_seed_*")):
        shutil.rmtree(d, ignore_errors=True)


def sweep(base: RunConfig, params: list[ParamSpec], sweep_dir: str, trials: int, seeds: int = 1,
          sampler: str = "tpe", metric: str = "cross_entropy", direction: str | None = None,
          prune: bool = True) -> dict:
    """Run (or resume) a sweep; returns `{"best": {...}, "table": str, "study": optuna.Study}`."""
    import optuna

    if trials < 1 or seeds < 1:
        raise ConfigError(f"--trials {trials} and --seeds {seeds} must be >= 1")
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys) or not params:
        raise ConfigError(f"--param keys must be given once each and at least one; got {keys}")
    direction = _direction(metric, direction)
    base_dict = to_dict(base)
    for p in params:  # validate keys, types and choices before any trial runs
        for value in (p.args if p.kind == "choice" else p.args[:1]):
            trial_config(base_dict, "probe", sweep_dir, {p.key: value}, base.seed)
    make_sampler(sampler, params, base.seed)  # a bad --sampler fails before the dry build below
    _check_metric(trial_config(base_dict, "probe", sweep_dir, {p.key: p.args[0] for p in params}, base.seed),
                  metric)
    os.makedirs(sweep_dir, exist_ok=True)
    storage = f"sqlite:///{os.path.abspath(os.path.join(sweep_dir, 'study.db'))}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="gfo", direction=direction, load_if_exists=True,
                                pruner=pruner)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # died with the previous process
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        _remove_trial_dirs(sweep_dir, t.number)
    # A resumed sweep continues the sampler's stream instead of replaying it: a sampler seeded as before
    # would propose the earlier trials' values again (random, and TPE/GP's random start-up trials).
    study.sampler = make_sampler(sampler, params, base.seed + len(study.trials))

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)))

    while done() < trials:
        trial = study.ask()
        values = {p.key: _suggest(trial, p) for p in params}
        scores = []
        try:
            for s in range(seeds):
                cfg = trial_config(base_dict, f"trial_{trial.number}_seed_{s}", sweep_dir, values, base.seed + s)

                def report(step, row, trial=trial, first=(s == 0)):
                    if first and metric in row:
                        trial.report(float(row[metric]), step)
                        if trial.should_prune():
                            raise optuna.TrialPruned()

                scores.append(_final_metric(_run_trial(cfg, report)["records"], metric))
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except KeyboardInterrupt:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _remove_trial_dirs(sweep_dir, trial.number)
            raise KeyboardInterrupt(f"interrupted during trial {trial.number} (its run directories removed); "
                                    f"{done()} of {trials} trials finished; rerun the same command to resume "
                                    f"the sweep") from None
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _remove_trial_dirs(sweep_dir, trial.number)
            raise
        mean = float(np.mean(scores))
        std = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("std", std)
        trial.set_user_attr("ci95", 1.96 * std / math.sqrt(len(scores)))
        study.tell(trial, mean)
    return finish(study, base_dict, sweep_dir, params, metric)


def finish(study, base_dict, sweep_dir, params, metric) -> dict:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)
    keys = [p.key for p in params]
    lines = [f"| rank | trial | {metric} (mean) | std | ±95% CI | seeds | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(keys)]
    for i, t in enumerate(ranked, 1):
        cells = " | ".join(f"{t.params[k]:.4g}" if isinstance(t.params[k], float) else str(t.params[k]) for k in keys)
        lines.append(f"| {i} | {t.number} | {t.value:.4f} | {t.user_attrs.get('std', 0):.4f} | "
                     f"{t.user_attrs.get('ci95', 0):.4f} | {len(t.user_attrs.get('scores', []))} | {cells} |")
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    table = "\n".join(lines) + f"\n\n{len(complete)} complete, {pruned} pruned trials.\n"
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write(f"# sweep {os.path.basename(os.path.normpath(sweep_dir))}\n\n" + table)
    best = ranked[0]
    best_cfg = trial_config(base_dict, f"{os.path.basename(os.path.normpath(sweep_dir))}_best",
                            base_dict["runs_dir"], best.params, base_dict["seed"])
    with open(os.path.join(sweep_dir, "best.yaml"), "w") as f:
        f.write(f"# best trial {best.number}: {metric} = {best.value:.6g} (mean over seeds)\n")
        yaml.safe_dump(to_dict(best_cfg), f, sort_keys=False)
    _plots(study, sweep_dir)
    print(table)
    return {"best": {"trial": best.number, "value": best.value, "params": best.params}, "table": table,
            "study": study}


def _plots(study, sweep_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    for name, plot in (("history.png", vis.plot_optimization_history), ("importance.png", vis.plot_param_importances)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            print(f"sweep: no {name}: {e}")
            continue
        ax.figure.tight_layout()
        ax.figure.savefig(os.path.join(sweep_dir, name), dpi=90)
        plt.close(ax.figure)


def main(argv: list[str]) -> None:
    import argparse

    from gfo.run.config import load_config

    p = argparse.ArgumentParser(prog="gfo sweep", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded quickstart)")
    p.add_argument("--param", action="append", default=[], required=True, help=" | ".join(PARAM_FORMS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", default=None, help="a named variant of the config file (e.g. smoke)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS)
    p.add_argument("--metric", required=True, help="final eval metric to optimise (e.g. reward, accuracy, cross_entropy)")
    p.add_argument("--direction", default=None, choices=("minimize", "maximize"))
    p.add_argument("--no-prune", action="store_true")
    p.add_argument("--dir", default=None, help="sweep directory (default: RUNS_DIR/NAME_sweep)")
    args = p.parse_args(argv)
    base = load_config(args.config, args.overrides, args.variant)
    params = [parse_param(s) for s in args.param]
    sweep_dir = args.dir or os.path.join(base.runs_dir, f"{base.name}_sweep")
    sweep(base, params, sweep_dir, args.trials, args.seeds, args.sampler, args.metric, args.direction,
          prune=not args.no_prune)


__all__ = ["ParamSpec", "parse_param", "sweep", "main", "SAMPLERS"]
