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
| `LOZO` | low-rank `U Vᵀ` SPSA, `V` lazily resampled | Chen et al. 2024 | lozo.py |
| `HiZOO` | diagonal-Hessian-preconditioned SPSA (3 forwards) | Zhao et al. 2024 | hizoo.py |
| `MeZOSVRG` | SPSA with an SVRG full-batch anchor | Gautam et al. 2024 | mezo_svrg.py |
| `ZOSGDCons` (optimizer) | best of θ, θ ± ηg | Zhang et al. 2024 (ZO-Bench) | zo_cons.py |
| `RandOpt` (optimizer) | one round of N guesses, top-K majority vote | Gan & Isola 2026 | randopt.py |

`LOZO`, `HiZOO` and `MeZOSVRG` are stateful (`init(key, x0)`: their state rides in `OptState.est_state`);
`ZOSGDCons` and `RandOpt` are whole optimizers (`init`/`step`/`solution`), not estimators.
"""

from gfo.estimators.backprop import Backprop
from gfo.estimators.es import OpenES
from gfo.estimators.forward_grad import ForwardGrad
from gfo.estimators.lowrank_es import LowRankES
from gfo.estimators.policy_gradient import PolicyGradient, RewardObjective
from gfo.estimators.hizoo import HiZOO
from gfo.estimators.lozo import LOZO
from gfo.estimators.mezo_svrg import MeZOSVRG
from gfo.estimators.randopt import RandOpt
from gfo.estimators.spsa import SPSA
from gfo.estimators.zo_cons import ZOSGDCons

ESTIMATORS = {"backprop": Backprop, "spsa": SPSA, "es": OpenES, "lowrank_es": LowRankES,
              "forward_grad": ForwardGrad, "policy_gradient": PolicyGradient, "lozo": LOZO, "hizoo": HiZOO,
              "mezo_svrg": MeZOSVRG}

__all__ = ["Backprop", "SPSA", "OpenES", "LowRankES", "ForwardGrad", "PolicyGradient", "RewardObjective",
           "LOZO", "HiZOO", "MeZOSVRG", "RandOpt", "ZOSGDCons", "ESTIMATORS"]
