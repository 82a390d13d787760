"""MeZO-SVRG: variance-reduced SPSA with a periodic full-batch anchor.

Gautam et al., "Variance-reduced Zeroth-Order Methods for Fine-Tuning Language Models" (MeZO-SVRG),
ICML 2024, arXiv 2404.08080.

The state holds an anchor `θ̃` and its full-batch SPSA estimate `g̃ = ĝ(θ̃; full batch)`. Every `q` steps
(and at step 0) the anchor is reset to the current point and `g̃` recomputed on the step's whole batch
(the "full batch": set `task.batch_size` to the training set). Every step draws a mini-batch of
`minibatch` rows of the batch and one direction `z`, and returns

    g = ĝ(θ; mb, z) − ĝ(θ̃; mb, z) + g̃,   ĝ(y; b, z) = (L(y + εz; b) − L(y − εz; b)) / 2ε · z

— the SVRG control variate with the same `z` and mini-batch at both points, so their noise cancels as
`θ → θ̃`. Memory: two extra parameter-sized buffers (`θ̃`, `g̃`), as in the paper.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.noise import KeyTable, leaf_noise, member_key, perturbed_leaf, tree_dot
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, TransformSection, knob


@dataclasses.dataclass(frozen=True)
class MeZOSVRG(PerturbingEstimator):
    eps: float = 1e-3
    q: int = 10  # steps between full-batch anchors
    minibatch: int = 4  # rows of the batch per mini-batch estimate
    factored: bool | None = None  # hand NoisyLeaf leaves (z drawn in the forward); None: as the objective declares

    def __post_init__(self):
        if self.eps <= 0 or self.q < 1 or self.minibatch < 1:
            raise ValueError(f"MeZO-SVRG eps={self.eps}, q={self.q}, minibatch={self.minibatch}: expected eps > 0, "
                             f"q >= 1 and minibatch >= 1")

    def init(self, key: jax.Array, x0):
        del key
        zeros = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), x0)
        return {"anchor": jax.tree.map(lambda w: w, x0), "anchor_grad": zeros}

    def spsa(self, objective, y, batch, z_key, eval_key):
        """`(ĝ, (L₊ + L₋)/2)` at `y` along `z = noise(z_key)` on `batch`; a non-finite pair gives zero.
        Both signs run in one vmap that shares the draw of `z`; `ĝ` regenerates `z` leaf by leaf."""
        keys = KeyTable(z_key, y)  # every leaf's keys in one draw

        def loss(scale):
            return objective(jax.tree_util.tree_map_with_path(
                lambda p, w: perturbed_leaf(keys, p, w, scale, "gaussian", self.factored), y), batch, eval_key)

        plus, minus = jax.vmap(loss)(jnp.array([self.eps, -self.eps], jnp.float32))
        ok = jnp.isfinite(plus) & jnp.isfinite(minus)
        d = jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0)
        return jax.tree_util.tree_map_with_path(lambda p, w: d * leaf_noise(z_key, p, w), y), (plus + minus) / 2

    def estimate(self, objective, x, batch, key, state, step):
        self = self.for_objective(objective)
        k_full, k_mb, k_rows, eval_key = jax.random.split(key, 4)
        refresh = jnp.asarray(step) % self.q == 0

        def new_anchor(_):
            g, _ = self.spsa(objective, x, batch, member_key(k_full, 0), eval_key)
            return {"anchor": x, "anchor_grad": g}

        state = jax.lax.cond(refresh, new_anchor, lambda s: s, state)
        rows = jax.tree.leaves(batch)[0].shape[0]
        if self.minibatch > rows:
            raise ValueError(f"MeZO-SVRG minibatch={self.minibatch} is larger than the batch ({rows} rows)")
        idx = jax.random.choice(k_rows, rows, (self.minibatch,), replace=False)
        mb = jax.tree.map(lambda b: b[idx], batch)
        z_key = member_key(k_mb, 1)
        g_x, loss = self.spsa(objective, x, mb, z_key, eval_key)
        g_a, _ = self.spsa(objective, state["anchor"], mb, z_key, eval_key)
        grad = jax.tree.map(lambda a, b, c, w: (a - b + c).astype(w.dtype), g_x, g_a, state["anchor_grad"], x)
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(tree_dot(grad, grad)), "anchor_refresh": refresh,
                   "evaluations": 4 + 2 * refresh.astype(jnp.int32) * rows // self.minibatch}
        return grad, metrics, state


@dataclasses.dataclass
class MeZOSVRGSection(TransformSection):
    """`optimizer: {method: mezo_svrg, eps: 1e-3, q: 10, minibatch: 4, transform: sgd}`."""

    eps: float = knob(1e-2, POSITIVE, "perturbation size ε")
    q: int = knob(10, AT_LEAST_ONE, "steps between full-batch anchors")
    minibatch: int = knob(4, AT_LEAST_ONE, "rows of the batch per mini-batch estimate")


register(estimator_method("mezo_svrg", MeZOSVRG, MeZOSVRGSection))
