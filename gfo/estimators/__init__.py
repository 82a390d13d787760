"""Direction estimators: each returns a pseudo-gradient pytree (of the loss) that any optax
transformation consumes, so ZO-SGD = `SPSA` + `optax.sgd`, ZO-Adam = `SPSA` + `optax.adam`, and the
Adam baseline = `Backprop` + `optax.adam`, all through the same `gfo.optimizer.Optimizer` step.

| estimator | method | paper | file |
|---|---|---|---|
| `Backprop` | exact gradient | — | backprop.py |
| `SPSA` | two-point zeroth order (MeZO, ZO-SGD/Sign/Cons variants) | Malladi et al. 2023 | spsa.py |
| `OpenES` | antithetic ES, implicit population | Salimans et al. 2017 | es.py |
| `LowRankES` | rank-r perturbations (EGGROLL) | Sarkar et al. 2025 | lowrank_es.py |
| `ForwardGrad` | JVP along random directions | Baydin et al. 2022 | forward_grad.py |
| `PolicyGradient` | REINFORCE, group baseline (GRPO-style) | Shao et al. 2024 | policy_gradient.py |
"""

from gfo.estimators.backprop import Backprop
from gfo.estimators.es import OpenES
from gfo.estimators.forward_grad import ForwardGrad
from gfo.estimators.lowrank_es import LowRankES
from gfo.estimators.policy_gradient import PolicyGradient, RewardObjective
from gfo.estimators.spsa import SPSA

ESTIMATORS = {"backprop": Backprop, "spsa": SPSA, "es": OpenES, "lowrank_es": LowRankES,
              "forward_grad": ForwardGrad, "policy_gradient": PolicyGradient}

__all__ = ["Backprop", "SPSA", "OpenES", "LowRankES", "ForwardGrad", "PolicyGradient", "RewardObjective",
           "ESTIMATORS"]
