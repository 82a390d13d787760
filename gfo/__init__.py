"""gfo: gradient-free optimization of Transformer language models in JAX.

The four axes: a model (`models`), a space (`gfo.spaces`), an optimizer (`gfo.estimators` + optax via
`gfo.Optimizer`, or `gfo.EvosaxStrategy`), and a task (an objective `loss(x, batch, key)`, minimised).
"""

from gfo import estimators, spaces
from gfo.estimators import SPSA, Backprop, ForwardGrad, LowRankES, OpenES, PolicyGradient
from gfo.ga import GeneticAlgorithm
from gfo.minimize import MinimizeResult, make_optimizer, minimize
from gfo.optimizer import Optimizer, OptState
from gfo.strategies import STRATEGIES, EvosaxStrategy, StrategyMemoryError

__version__ = "0.1.0"

__all__ = ["estimators", "spaces", "SPSA", "Backprop", "ForwardGrad", "LowRankES", "OpenES", "PolicyGradient",
           "GeneticAlgorithm", "MinimizeResult", "make_optimizer", "minimize", "Optimizer", "OptState",
           "STRATEGIES", "EvosaxStrategy", "StrategyMemoryError"]
