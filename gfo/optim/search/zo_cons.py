"""ZO-SGD-Cons: zeroth-order SGD that only moves when the move helps.

Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark"
(ZO-Bench), ICML 2024, arXiv 2402.11592, the "ZO-SGD-Cons" row; after Kim et al., "Curvature-Aware
Derivative-Free Optimization", 2021, arXiv 2109.13391. Reference: `ZO-Bench/ZO-LLM` (`zo_conserv_step`).

With `g` the estimator's pseudo-gradient at `θ` (SPSA by default), the step evaluates the three candidates
`θ`, `θ − η g`, `θ + η g` on the same batch and key and keeps the one with the lowest loss: a conservative
update that never increases the mini-batch loss (3 forwards on top of the estimator's).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from gfo.optim.estimators.spsa import SPSA
from gfo.jitting import filter_jit
from gfo.optim.noise import tree_axpy
from gfo.optim.optimizer import OptState
from gfo.optim.protocol import PointOptimizer, fresh
import dataclasses

from gfo.optim.registry import Method, register
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, MethodSection, knob


class ZOSGDCons(PointOptimizer):
    """The optimizer protocol (`gfo.optim.protocol.OptimizerProtocol`) around a stateless `estimator` (SPSA by
    default) with learning rate `lr`."""

    def __init__(self, estimator=None, lr: float = 1e-6):
        if lr <= 0:
            raise ValueError(f"ZO-SGD-Cons lr={lr} must be > 0")
        self.estimator = estimator if estimator is not None else SPSA()
        self.lr = float(lr)

    def __repr__(self) -> str:
        return f"ZOSGDCons({self.estimator!r}, lr={self.lr})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ZOSGDCons) and (self.estimator, self.lr) == (other.estimator, other.lr)

    def __hash__(self) -> int:
        return hash((ZOSGDCons, self.estimator, self.lr))

    def init(self, key: jax.Array, x0) -> OptState:
        del key
        return fresh(OptState(x=x0, opt_state=None, step=jnp.zeros((), jnp.int32)))  # own buffers: donated

    @functools.partial(filter_jit, donate=(1,))
    def step(self, state: OptState, objective: Callable, batch, key: jax.Array):
        """One estimate and the best of three candidates; `state` is donated."""
        k_est, k_eval = jax.random.split(key)
        grad, metrics = self.estimator(objective, state.x, batch, k_est)
        candidates = (state.x, tree_axpy(-self.lr, grad, state.x), tree_axpy(self.lr, grad, state.x))
        losses = jnp.stack([objective(c, batch, k_eval) for c in candidates])
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        choice = jnp.argmin(losses)  # ties keep θ (index 0)
        x = jax.tree.map(lambda a, b, c: jnp.select([choice == 0, choice == 1], [a, b], c), *candidates)
        metrics = {**metrics, "evaluations": metrics["evaluations"] + 3, "cons_choice": choice,
                   "loss_selected": losses[choice],
                   "update_norm": jnp.where(choice == 0, 0.0, self.lr * metrics["grad_norm"])}
        return OptState(x=x, opt_state=None, step=state.step + 1), metrics

    def lower(self, state: OptState, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered:
        """The lowered step for these arguments (ahead-of-time compilation, XLA's memory analysis)."""
        return self.step.lower(state, objective, batch, key)


@dataclasses.dataclass
class ZOSGDConsSection(MethodSection):
    """`optimizer: {method: zo_sgd_cons, eps: 1e-3, n: 1, lr: 1e-6}`: a step kept only if it lowers the loss."""

    eps: float = knob(1e-2, POSITIVE, "SPSA's perturbation size ε")
    n: int = knob(1, AT_LEAST_ONE, "SPSA queries per step")
    lr: float = knob(1e-2, POSITIVE, "learning rate of the conservative step")
    distribution: str = knob("gaussian", None, "z's distribution: gaussian | rademacher | auto")


def _build(s: ZOSGDConsSection, ctx):
    return ZOSGDCons(SPSA(eps=s.eps, n=s.n, distribution=s.distribution), s.lr)


register(Method("zo_sgd_cons", "optimizer", ZOSGDConsSection, _build))
