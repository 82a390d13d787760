"""gfo: gradient-free optimization of Transformer language models in JAX.

The four axes: a model (`models`, behind `gfo.LanguageModel`), a space (`gfo.spaces`), an optimizer (any
`gfo.OptimizerProtocol`: `gfo.estimators` + optax via `gfo.Optimizer`, `gfo.EvosaxStrategy`,
`gfo.DiscreteSearch`; the registry `gfo.methods`), and a task (an objective `loss(x, batch, key)`,
minimised, or a `gfo.RewardObjective`).

Attributes are imported on first use, so `import gfo.config` or `gfo.distributed` stays light: a
multi-process run must start `jax.distributed` before anything (evosax's import included) touches a
device.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "estimators": ("gfo.estimators", None), "spaces": ("gfo.spaces", None),
    "SPSA": ("gfo.estimators", "SPSA"), "Backprop": ("gfo.estimators", "Backprop"),
    "ForwardGrad": ("gfo.estimators", "ForwardGrad"), "LowRankES": ("gfo.estimators", "LowRankES"),
    "OpenES": ("gfo.estimators", "OpenES"), "PolicyGradient": ("gfo.estimators", "PolicyGradient"),
    "LOZO": ("gfo.estimators", "LOZO"), "HiZOO": ("gfo.estimators", "HiZOO"),
    "MeZOSVRG": ("gfo.estimators", "MeZOSVRG"), "ZOSGDCons": ("gfo.estimators", "ZOSGDCons"),
    "RandOpt": ("gfo.estimators", "RandOpt"),
    "GeneticAlgorithm": ("gfo.ga", "GeneticAlgorithm"), "MinimizeResult": ("gfo.minimizer", "MinimizeResult"),
    "make_optimizer": ("gfo.minimizer", "make_optimizer"), "minimize": ("gfo.minimizer", "minimize"),
    "Optimizer": ("gfo.optimizer", "Optimizer"), "OptState": ("gfo.optimizer", "OptState"),
    "STRATEGIES": ("gfo.strategies", "STRATEGIES"), "EvosaxStrategy": ("gfo.strategies", "EvosaxStrategy"),
    "StrategyMemoryError": ("gfo.strategies", "StrategyMemoryError"),
    "OptimizerProtocol": ("gfo.protocol", "OptimizerProtocol"), "methods": ("gfo.methods", None),
    "evaluate_population": ("gfo.fitness", "evaluate_population"), "filter_jit": ("gfo.jitting", "filter_jit"),
    "RewardObjective": ("gfo.objectives", "RewardObjective"), "OnSpace": ("gfo.objectives", "OnSpace"),
    "LanguageModel": ("gfo.model_api", "LanguageModel"), "DiscreteSearch": ("gfo.discrete", "DiscreteSearch"),
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
