"""gfo: gradient-free optimization of Transformer language models in JAX.

The four axes, as packages: a model (`models`, behind `gfo.LanguageModel`), a space (`gfo.spaces`), an
optimizer (`gfo.optim`: any `gfo.OptimizerProtocol` — `gfo.optim.estimators` + optax via `gfo.Optimizer`,
the searches of `gfo.optim.search`: `gfo.EvosaxStrategy`, `gfo.DiscreteSearch`, RandOpt, ZO-SGD-Cons; the
registry `gfo.optim.registry`), and a task (`gfo.tasks`: an objective `loss(x, batch, key)`, minimised,
or a `gfo.RewardObjective`); `gfo.run` turns a config into results (`gfo train`).

Attributes are imported on first use, so `import gfo.run.config` or `gfo.distributed` stays light: a
multi-process run must start `jax.distributed` before anything (evosax's import included) touches a
device.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "estimators": ("gfo.optim.estimators", None), "spaces": ("gfo.spaces", None), "optim": ("gfo.optim", None),
    "protocol": ("gfo.optim.protocol", None), "Estimator": ("gfo.optim.protocol", "Estimator"),
    "SPSA": ("gfo.optim.estimators", "SPSA"), "Backprop": ("gfo.optim.estimators", "Backprop"),
    "ForwardGrad": ("gfo.optim.estimators", "ForwardGrad"), "LowRankES": ("gfo.optim.estimators", "LowRankES"),
    "OpenES": ("gfo.optim.estimators", "OpenES"), "PolicyGradient": ("gfo.optim.estimators", "PolicyGradient"),
    "LOZO": ("gfo.optim.estimators", "LOZO"), "HiZOO": ("gfo.optim.estimators", "HiZOO"),
    "MeZOSVRG": ("gfo.optim.estimators", "MeZOSVRG"), "ZOSGDCons": ("gfo.optim.search.zo_cons", "ZOSGDCons"),
    "RandOpt": ("gfo.optim.search.randopt", "RandOpt"),
    "GeneticAlgorithm": ("gfo.optim.search.ga", "GeneticAlgorithm"),
    "MinimizeResult": ("gfo.optim.minimize", "MinimizeResult"),
    "make_optimizer": ("gfo.optim.minimize", "make_optimizer"), "minimize": ("gfo.optim.minimize", "minimize"),
    "Optimizer": ("gfo.optim.optimizer", "Optimizer"), "OptState": ("gfo.optim.optimizer", "OptState"),
    "STRATEGIES": ("gfo.optim.search.strategies", "STRATEGIES"),
    "EvosaxStrategy": ("gfo.optim.search.strategies", "EvosaxStrategy"),
    "StrategyMemoryError": ("gfo.optim.search.strategies", "StrategyMemoryError"),
    "OptimizerProtocol": ("gfo.optim.protocol", "OptimizerProtocol"), "methods": ("gfo.optim.registry", None),
    "evaluate_population": ("gfo.optim.evaluate", "evaluate_population"), "filter_jit": ("gfo.jitting", "filter_jit"),
    "RewardObjective": ("gfo.objectives", "RewardObjective"), "OnSpace": ("gfo.objectives", "OnSpace"),
    "LanguageModel": ("gfo.model_api", "LanguageModel"),
    "DiscreteSearch": ("gfo.optim.search.discrete", "DiscreteSearch"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gfo' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__():
    return sorted(list(globals()) + __all__)
