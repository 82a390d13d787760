"""Direction estimators: each returns a pseudo-gradient pytree (of the loss) that any optax
transformation consumes, so ZO-SGD = `SPSA` + `optax.sgd`, ZO-Adam = `SPSA` + `optax.adam`, and the
Adam baseline = `Backprop` + `optax.adam`, all through the same `gfo.optim.optimizer.Optimizer` step.

| estimator | method | paper | file |
|---|---|---|---|
| `Backprop` | exact gradient | — | backprop.py |
| `SPSA` | two-point zeroth order (MeZO, ZO-SGD/Sign/Cons variants) | Malladi et al. 2023 | spsa.py |
| `OpenES` | antithetic ES, implicit population | Salimans et al. 2017 | es.py |
| `LowRankES` | rank-r perturbations (EGGROLL) | Sarkar et al. 2025 | lowrank_es.py |
| `ForwardGrad` | JVP along random directions | Baydin et al. 2022 | forward_grad.py |
| `PolicyGradient` | REINFORCE, group baseline (GRPO-style) | Shao et al. 2024 | policy_gradient.py |
| `LOZO` | low-rank `U Vᵀ` SPSA, `V` lazily resampled | Chen et al. 2024 | lozo.py |
| `HiZOO` | diagonal-Hessian-preconditioned SPSA (3 forwards) | Zhao et al. 2024 | hizoo.py |
| `MeZOSVRG` | SPSA with an SVRG full-batch anchor | Gautam et al. 2024 | mezo_svrg.py |

`LOZO`, `HiZOO` and `MeZOSVRG` are stateful (`init(key, x0)`: their state rides in `OptState.est_state`);
`ZOSGDCons` and `RandOpt` are whole optimizers with their own update: `gfo.optim.search`.
"""

from gfo.optim.estimators.backprop import Backprop
from gfo.optim.estimators.es import OpenES
from gfo.optim.estimators.forward_grad import ForwardGrad
from gfo.optim.estimators.lowrank_es import LowRankES
from gfo.optim.estimators.policy_gradient import PolicyGradient, RewardObjective
from gfo.optim.estimators.hizoo import HiZOO
from gfo.optim.estimators.lozo import LOZO
from gfo.optim.estimators.mezo_svrg import MeZOSVRG
from gfo.optim.estimators.spsa import SPSA

ESTIMATORS = {"backprop": Backprop, "spsa": SPSA, "es": OpenES, "lowrank_es": LowRankES,
              "forward_grad": ForwardGrad, "policy_gradient": PolicyGradient, "lozo": LOZO, "hizoo": HiZOO,
              "mezo_svrg": MeZOSVRG}

__all__ = ["Backprop", "SPSA", "OpenES", "LowRankES", "ForwardGrad", "PolicyGradient", "RewardObjective",
           "LOZO", "HiZOO", "MeZOSVRG", "ESTIMATORS"]
