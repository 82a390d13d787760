"""HiZOO: zeroth-order estimates preconditioned by a diagonal Hessian estimated from the same forwards.

Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
Optimizer" (HiZOO), ICLR 2025, arXiv 2402.15173; reference `Yanjun-Zhao/HiZOO`.

The state is `h`, a positive diagonal estimate of the Hessian (`Σ = h⁻¹`, `h₀ = 1`). Each step draws
`z ~ N(0, I)`, perturbs along `u = Σ^{1/2} z`, and takes three forwards on one batch and key:
`L₀ = L(θ)`, `L± = L(θ ± μ u)`. With `ΔL = L₊ + L₋ − 2L₀` (≈ μ² uᵀHu), the Hessian is updated by an EMA of
the Stein estimate of its diagonal under `N(0, Σ)`:

    h ← (1 − α) h + α |ΔL / (2μ²) · h ⊙ (z² − 1)|      (E[ΔL/(2μ²) · h(z² − 1)] = diag H, H diagonal)

and the pseudo-gradient is `g = (L₊ − L₋)/(2μ) · Σ^{1/2} z` with the updated `Σ`, whose expectation at
fixed `Σ` is `Σ ∇L` (a Newton-like step under plain `optax.sgd`).

`z` is never held as a tree. With `factored` (by default as the objective declares: an objective over a
`Full` space) `θ ± μ u` reaches the model as `models.linear.NoisyLeaf(θ, key, ±μ, mul=h, mul_power=−½)`
leaves: `z` is drawn inside the forward where each (stacked) layer reads its leaf and multiplied there by
`h^{-1/2}`, both signs share one draw, and no perturbed copy of the parameters exists; otherwise the same
descriptors are made dense (a plain function gets perturbed arrays, the same numbers). The Hessian update
and the pseudo-gradient regenerate `z` leaf by leaf from the same keys (`gfo.optim.noise.leaf_noise`; a
leaf over `models.linear.NOISE_BLOCK_ELEMENTS` a block of rows at a time, updated in place), and the
estimate is a `gfo.optim.update.Direction`, which `gfo.Optimizer` applies one leaf (one block) at a time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.noise import KeyTable, leaf_noise, leaf_noise_rows, noise_blocks, perturbed_leaf
from gfo.optim.update import Direction, LeafBlocks, exact_zero
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import POSITIVE, TransformSection, knob


@dataclasses.dataclass(frozen=True)
class HiZOO(PerturbingEstimator):
    eps: float = 1e-3  # μ
    alpha: float = 1e-6  # EMA rate of the Hessian estimate (the paper's α_t, 1e-6 … 1e-8 for LLMs)
    h_min: float = 1e-8  # floor on h (keeps Σ finite)
    factored: bool | None = None  # NoisyLeaf leaves (z ⊙ h^{-1/2} drawn in the forward); None: as the objective says

    def __post_init__(self):
        if self.eps <= 0 or not 0 <= self.alpha <= 1 or self.h_min <= 0:
            raise ValueError(f"HiZOO eps={self.eps}, alpha={self.alpha}, h_min={self.h_min}: expected eps > 0, "
                             f"0 <= alpha <= 1, h_min > 0")

    def init(self, key: jax.Array, x0):
        """`h₀ = 1` per parameter (float32, like `x0`'s structure)."""
        del key
        return jax.tree.map(lambda w: jnp.ones(jnp.shape(w), jnp.float32), x0)

    def perturbed(self, x, h, noise_key: jax.Array, scale):
        """`x + scale · Σ^{1/2} z`: `NoisyLeaf` leaves carrying `h` (drawn inside the forward) when `factored`,
        else the same leaves made dense."""
        keys = KeyTable(noise_key, x)  # every leaf's keys in one draw
        return jax.tree_util.tree_map_with_path(
            lambda p, w, hh: perturbed_leaf(keys, p, w, scale, "gaussian", bool(self.factored), hh, -0.5), x, h)

    def estimate(self, objective, x, batch, key, h, step):
        """`(Direction, metrics, h_new)`: three forwards, the Hessian updated and `g` described leaf by leaf."""
        del step
        self = self.for_objective(objective)
        noise_key, eval_key = jax.random.split(key)
        base = objective(x, batch, eval_key)
        if self.factored:  # both signs in one vmap in which z is not batched: z is drawn once for the pair
            plus, minus = jax.vmap(lambda s: objective(self.perturbed(x, h, noise_key, s), batch, eval_key))(
                jnp.array([self.eps, -self.eps], jnp.float32))
        else:  # `u = Σ^{1/2} z` drawn once, then one perturbed copy `x ± μ u` at a time
            u = jax.tree_util.tree_map_with_path(  # the noise NoisyLeaf draws, times h^{-1/2} as it multiplies
                lambda p, w, hh: leaf_noise(noise_key, p, w) * jax.lax.rsqrt(hh.astype(jnp.float32)), x, h)
            at = lambda s: objective(jax.tree.map(  # noqa: E731 - rounded as NoisyLeaf.dense rounds it
                lambda w, uu: (w.astype(jnp.float32) + s * uu).astype(w.dtype), x, u), batch, eval_key)
            plus, minus = at(self.eps), at(-self.eps)
        ok = jnp.isfinite(base) & jnp.isfinite(plus) & jnp.isfinite(minus)
        curvature = jnp.where(ok, (plus + minus - 2 * base) / (2 * self.eps ** 2), 0.0)
        slope = jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0)

        def update(hh, z):  # the EMA of the Stein estimate, floored; h kept where a loss was not finite
            stein = jnp.abs(curvature * hh * (z * z - 1))
            return jnp.where(ok, jnp.maximum((1 - self.alpha) * hh + self.alpha * stein, self.h_min), hh)

        z_key = _key_after(noise_key, slope)  # z regenerated after the forwards, not kept from them
        h_new = jax.tree_util.tree_map_with_path(
            lambda p, w, hh: _new_h(z_key, p, w, hh.astype(jnp.float32), update), x, h)
        h_of = {p: hh for p, hh in jax.tree_util.tree_flatten_with_path(h_new)[0]}

        def make(operands, path, w):  # g = slope · z ⊙ h_new^{-1/2}, z regenerated from the forwards' keys
            slope, noise_key = operands
            return _leaf_grad(slope, noise_key, path, w, h_of[path])

        metrics = {"loss": base, "curvature": curvature, "loss_range": jnp.abs(plus - minus),
                   "nonfinite": (~ok).astype(jnp.int32), "evaluations": 3}
        return Direction(make, (slope, noise_key), snr=False), metrics, h_new


def _key_after(key: jax.Array, value: jax.Array) -> jax.Array:
    """`key` unchanged but made to depend on `value` (an exact zero from it added to the key's data), so
    what is drawn from it is drawn after `value` exists and is not merged (CSE) with an earlier draw from
    `key`: the dense path's `z` is not kept alive from the forwards to the Hessian update."""
    data = jax.random.key_data(key)
    return jax.random.wrap_key_data(data + (exact_zero(value) != 0).astype(data.dtype), impl=jax.random.key_impl(key))


def _blocks(path, w):
    """How a leaf's `z` is regenerated: None (whole), else `(count, shape, at)` with `at(t) -> (corner,
    layer, rows, fresh)` for block `t` of `shape` (the leaf's rank), as `gfo.optim.population.leaf_noise_direction`
    cuts them (`gfo.optim.noise.noise_blocks`: rows of one layer; a partial last block overlaps the one before
    it and `fresh` marks its rows no earlier block covered)."""
    plan = noise_blocks(path, w)
    if plan is None:
        return None
    n_layers, rows, per, n_blocks = plan
    shape = jnp.shape(w)
    stacked = n_layers is not None
    per_layer = shape[1:] if stacked else shape
    block_shape = tuple(per_layer) if rows is None else (per,) + tuple(per_layer[1:])
    lead = (1,) if stacked else ()

    def at(t):
        layer, b = t // n_blocks, t % n_blocks
        start = 0 if rows is None else jnp.minimum(b * per, rows - per)
        ids = None if rows is None else start + jnp.arange(per, dtype=jnp.int32)
        corner = ((layer,) if stacked else ()) + (start,) + (0,) * (len(per_layer) - 1)
        corner = tuple(jnp.asarray(c, jnp.int32) for c in corner[:len(shape)])
        fresh = None if rows is None else (ids >= b * per).reshape(lead + (per,) + (1,) * (len(block_shape) - 1))
        return corner, (layer if stacked else None), ids, fresh

    return (n_layers or 1) * n_blocks, lead + block_shape, at


def _block_noise(noise_key, path, w, layer, ids, shape):
    return leaf_noise_rows(noise_key, path, w, layer, ids).reshape(shape)


def _new_h(noise_key, path, w, h, update):
    """One leaf's updated Hessian estimate `update(h, z)`, `z` regenerated (a block of rows at a time in
    place for a large leaf)."""
    blocks = _blocks(path, w)
    if blocks is None:
        return update(h, leaf_noise(noise_key, path, w))
    count, shape, at = blocks

    def body(t, h):
        corner, layer, ids, fresh = at(t)
        old = jax.lax.dynamic_slice(h, corner, shape)
        new = update(old, _block_noise(noise_key, path, w, layer, ids, shape))
        if fresh is not None:  # rows an earlier block already updated keep their update
            new = jnp.where(fresh, new, old)
        return jax.lax.dynamic_update_slice(h, new, corner)

    return jax.lax.fori_loop(0, count, body, h)


def _leaf_grad(slope, noise_key, path, w, h):
    """One leaf's `slope · z ⊙ h^{-1/2}` (`w`'s dtype), or `LeafBlocks` of it for a large leaf."""
    blocks = _blocks(path, w)
    if blocks is None:
        return (slope * leaf_noise(noise_key, path, w) * jax.lax.rsqrt(h)).astype(jnp.result_type(w)), None
    count, shape, at = blocks

    def block(t):
        corner, layer, ids, fresh = at(t)
        z = _block_noise(noise_key, path, w, layer, ids, shape)
        return corner, slope * z * jax.lax.rsqrt(jax.lax.dynamic_slice(h, corner, shape)), fresh, None

    return LeafBlocks(count, shape, block)


@dataclasses.dataclass
class HiZOOSection(TransformSection):
    """`optimizer: {method: hizoo, eps: 1e-3, alpha: 1e-6, transform: sgd}`."""

    eps: float = knob(1e-2, POSITIVE, "perturbation size (the paper's μ) of x ± μ Σ^{1/2} z")
    alpha: float = knob(1e-6, POSITIVE, "EMA rate of the diagonal Hessian estimate (α_t; 1e-6 … 1e-8 for LLMs)")
    h_min: float = knob(1e-8, POSITIVE, "floor on the Hessian estimate (keeps Σ finite)")


register(estimator_method("hizoo", HiZOO, HiZOOSection))
