"""SPSA / MeZO: two forward passes along a random direction regenerated from the key.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), NeurIPS 2023,
arXiv 2305.17333; reference `princeton-nlp/MeZO`, `large_models/trainer.py` (`zo_step`).

For each of `n` queries, `z ~ N(0, I)` (or Rademacher) from `fold_in(key, k)`, and
`g = mean_k (L(x + εz_k) − L(x − εz_k)) / 2ε · z_k` on the same batch and objective key. Options:
`one_sided` (`(L(x+εz) − L(x)) / ε`), `sign` (ZO-SGD-Sign: the sign of the estimate), `sparsity`
(Sparse MeZO: perturb only the `1 − sparsity` smallest-magnitude entries of each leaf). Momentum and
Adam come from the optax transformation (ZO-SGD-MMT = `optax.sgd(momentum=0.9)`, ZO-Adam = `optax.adam`).
A query whose losses are not finite contributes nothing and is counted in `nonfinite`.
With `factored` (by default as the objective declares: an objective over a `Full` space), `x ± εz` reaches the model as
`models.linear.NoisyLeaf` leaves, so `z` is drawn inside the forward one (stacked) layer at a time and no
perturbed copy of the parameters exists; both signs share one draw. The estimate is handed to the step
as a `gfo.optim.update.Direction` (`direction`); with an elementwise optax transform (the default of
`gfo.Optimizer`, and every one `gfo train` builds) the step regenerates `z`, transforms and applies it one leaf — one block of rows of a large leaf — at
a time into the donated parameters: MeZO's in-place update, functionally. Diagnostics:
`loss_range` (mean |L₊ − L₋|, the fitness spread) and, with `n >= 2`, `snr_cosine` (cosine between the
estimates of the first ⌊n/2⌋ queries and of the rest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.update import Direction, LeafBlocks
from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.noise import DISTRIBUTIONS, KeyTable, MemberKeys, noise_like, perturbed_leaf, tree_axpy
from gfo.optim.population import leaf_noise_direction
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, UNIT_INTERVAL, TransformSection, knob


@dataclasses.dataclass(frozen=True)
class SPSA(PerturbingEstimator):
    eps: float = 1e-3
    n: int = 1
    distribution: str = "gaussian"
    one_sided: bool = False
    sign: bool = False
    sparsity: float = 0.0
    factored: bool | None = None  # hand `NoisyLeaf` leaves (z drawn in the forward); None: as the objective declares

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError(f"SPSA eps={self.eps} must be > 0")
        if self.n < 1:
            raise ValueError(f"SPSA n={self.n} must be >= 1")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"SPSA distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SPSA sparsity={self.sparsity} must be in [0, 1)")

    def _leaf_mask(self, w):
        """Sparse MeZO's mask of one leaf: 1 on the `1 − sparsity` smallest-magnitude entries (float32)."""
        a = jnp.abs(w.astype(jnp.float32))
        return (a <= jnp.quantile(a, 1.0 - self.sparsity)).astype(jnp.float32)

    def direction(self, objective, x, batch, key):
        """`(Direction, metrics)`: the queries evaluated, `g` described leaf by leaf (`gfo.optim.update`)."""
        noise_key, eval_key = jax.random.split(key)
        mask = None if self.sparsity == 0.0 else jax.tree.map(self._leaf_mask, x)
        in_forward = self.factored and mask is None

        tables = MemberKeys(noise_key, self.n, x)  # every query's leaf keys, drawn at once

        def perturb(query_key, scale):
            if in_forward:  # x + scale·z as NoisyLeaf leaves: z is drawn where the model reads each leaf
                return jax.tree_util.tree_map_with_path(
                    lambda p, w: perturbed_leaf(query_key, p, w, scale, self.distribution), x)
            z = noise_like(query_key, x, self.distribution)
            if mask is not None:
                z = jax.tree.map(jnp.multiply, z, mask)
            return tree_axpy(scale, z, x)

        base = objective(x, batch, eval_key) if self.one_sided else None

        def query(k):
            """`(projected gradient, mean loss, |L₊ − L₋|, ok)` of query `k`."""
            query_key = tables.member(k)  # as member_key(noise_key, k) would give each leaf
            if self.one_sided:
                plus, minus, denom = objective(perturb(query_key, self.eps), batch, eval_key), base, self.eps
            else:  # both signs in one vmap in which z is not batched: z is drawn once for the pair
                signs = jnp.array([self.eps, -self.eps], jnp.float32)
                plus, minus = jax.vmap(lambda s: objective(perturb(query_key, s), batch, eval_key))(signs)
                denom = 2 * self.eps
            ok = jnp.isfinite(plus) & jnp.isfinite(minus)
            return (jnp.where(ok, (plus - minus) / denom, 0.0), jnp.where(ok, (plus + minus) / 2, 0.0),
                    jnp.where(ok, jnp.abs(plus - minus), 0.0), ok)

        # One query (MeZO's setting) inline; more queries one at a time (memory of one query).
        ks = jnp.arange(self.n, dtype=jnp.int32)
        proj, losses, spread, ok = (jax.tree.map(lambda v: v[None], query(ks[0])) if self.n == 1
                                    else jax.lax.map(query, ks))

        # g = Σ_k proj_k z_k / n, z regenerated leaf by leaf (large leaves a block of rows at a time) and
        # masked like the queries (the mask is a function of the leaf); the SNR cosine compares the first
        # ⌊n/2⌋ queries' estimate with the rest's.
        def make(operands, path, w):
            weights, keys = operands
            made = leaf_noise_direction(weights, keys.member, path, w, self.distribution,
                                        None if mask is None else self._leaf_mask(w))
            if not self.sign:
                return made
            return made.map(jnp.sign) if isinstance(made, LeafBlocks) else (jnp.sign(made[0]), made[1])

        bad = jnp.sum(~ok, dtype=jnp.int32)
        n_ok = jnp.maximum(self.n - bad, 1)
        evaluations = self.n * (1 if self.one_sided else 2) + (1 if self.one_sided else 0)
        return (Direction(make, (proj / self.n, tables), snr=self.n >= 2),
                {"loss": jnp.sum(losses) / n_ok, "loss_range": jnp.sum(spread) / n_ok, "nonfinite": bad,
                 "evaluations": evaluations})


@dataclasses.dataclass
class SPSASection(TransformSection):
    """`optimizer: {method: spsa, eps: 1e-3, n: 1, transform: sgd, lr: 1e-6}` (MeZO: sgd; ZO-Adam: adam)."""

    eps: float = knob(1e-2, POSITIVE, "perturbation size ε: the loss is read at x ± ε z")
    n: int = knob(1, AT_LEAST_ONE, "queries (directions z) per step, averaged")
    distribution: str = knob("gaussian", None, "z's distribution: gaussian | rademacher | auto")
    one_sided: bool = knob(False, None, "(L(x + εz) − L(x)) / ε instead of the two-sided difference")
    sign: bool = knob(False, None, "ZO-SGD-Sign: the sign of the estimate")
    sparsity: float = knob(0.0, UNIT_INTERVAL, "Sparse MeZO: perturb only the 1 − sparsity smallest entries")


register(estimator_method("spsa", SPSA, SPSASection))
