"""LOZO: zeroth-order estimates along low-rank perturbations `U Vᵀ`, with `V` kept for `nu` steps.

Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures" (LOZO),
ICLR 2025, arXiv 2410.07698; reference `optsuite/LOZO`.

For a 2-D leaf `W: [m, n]` the perturbation is `Z = U Vᵀ` with `U: [m, r]` drawn afresh every step and
`V: [n, r]` drawn from the estimator's own key once every `nu` steps (the lazy sampling that lets the
update stay in one subspace for a while); other leaves get ordinary Gaussian noise `Z`. With
`d = (L(θ + εZ) − L(θ − εZ)) / 2ε` on one batch and key, the estimate is `g = d · Z / r` for matrices
(`E_U[⟨∇, UVᵀ⟩ UVᵀ] = ∇ V Vᵀ` and `E[V Vᵀ] = r I`, so averaged over `V` it is the gradient) and `d · Z`
for other leaves. LOZO-M is this estimator with `optax.sgd(momentum=β)`.

With `factored` (by default as the objective declares: an objective over a `Full` space) `θ ± εZ` reaches
the model as `LowRankKernel(W, U, V, ±ε)` / `models.linear.NoisyLeaf` leaves, formed inside the forward;
both signs share one draw. The `n` queries (each with its own `U`, all with the step's `V`) run one at a
time (`lax.map`; one query inline), and the estimate is a `gfo.optim.update.Direction`: a matrix's
`Σ_k d_k U_k Vᵀ / (n r)` is one contraction over (query, rank) — `(Σ_k d_k U_k) Vᵀ` — and the other leaves
regenerate their noise sum (a block of rows at a time for a leaf over `models.linear.NOISE_BLOCK_ELEMENTS`,
matrices too), so `gfo.Optimizer` applies it one leaf (one block) at a time and no gradient tree exists.
Diagnostics: `loss_range` (mean |L₊ − L₋|) and, with `n >= 2`, `snr_cosine` (the cosine between the
estimates of the first ⌊n/2⌋ queries and of the rest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gfo.optim.estimators.base import PerturbingEstimator
from gfo.optim.estimators.lowrank_es import lowrank_factors
from gfo.optim.noise import KeyTable, leaf_noise, matrix_ndim, member_key, noise_blocks, perturbed_leaf
from gfo.optim.population import leaf_noise_direction, zeros_after
from gfo.optim.update import Direction, LeafBlocks
from gfo.optim.registry import estimator_method, register
from gfo.optim.sections import AT_LEAST_ONE, POSITIVE, TransformSection, knob
from models.linear import LowRankKernel


@dataclasses.dataclass(frozen=True)
class LOZO(PerturbingEstimator):
    eps: float = 1e-3
    rank: int = 2
    nu: int = 50  # steps between draws of V
    n: int = 1  # queries per step (each with its own U)
    factored: bool | None = None  # hand LowRankKernel / NoisyLeaf leaves (drawn in the forward); None: as the objective declares

    def __post_init__(self):
        if self.eps <= 0 or self.rank < 1 or self.nu < 1 or self.n < 1:
            raise ValueError(f"LOZO eps={self.eps}, rank={self.rank}, nu={self.nu}, n={self.n}: expected eps > 0 "
                             f"and rank, nu, n >= 1")

    def init(self, key: jax.Array, x0) -> jax.Array:
        """The raw data (uint32) of the `V` factors' key; the V of period `t // nu` is drawn from
        `fold_in(key, t // nu)`. Raw data, not a typed key, so the state checkpoints as a plain array."""
        del x0
        return jax.random.key_data(jax.random.fold_in(key, 1070))

    def _factors(self, path, w, u_key, v_key):
        u, _ = lowrank_factors(u_key, path, w.shape, self.rank)
        _, v = lowrank_factors(v_key, path, w.shape, self.rank)
        return u, v  # [..., m, r], [..., n, r] (per layer for stacked matrices)

    def perturbation(self, x, u_key: jax.Array, v_key: jax.Array):
        """`Z`: `U Vᵀ` for matrices (2-D, or 3-D stacked over layers), Gaussian noise for the others (float32)."""
        def leaf(path, w):
            if matrix_ndim(path, w) == 2:
                u, v = self._factors(path, w, u_key, v_key)
                return jnp.einsum("...mr,...nr->...mn", u, v)
            return leaf_noise(u_key, path, w)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def _perturbed(self, x, u_key, v_key, scale):
        """`x + scale · Z`, factored (`LowRankKernel` / `NoisyLeaf`, formed inside the forward) or dense."""
        u_key, v_key = KeyTable(u_key, x), KeyTable(v_key, x)  # every leaf's keys in one draw each

        def leaf(path, w):
            if matrix_ndim(path, w) == 2:
                u, v = self._factors(path, w, u_key, v_key)
                lead = w.shape[:-2]
                kernel = LowRankKernel(w, u.astype(w.dtype), v.astype(w.dtype), jnp.broadcast_to(scale, lead))
                return kernel if self.factored else kernel.dense()
            return perturbed_leaf(u_key, path, w, scale, "gaussian", self.factored)

        return jax.tree_util.tree_map_with_path(leaf, x)

    def estimate(self, objective, x, batch, key, v_root, step):
        """`(Direction, metrics, v_root)`: the `n` queries (one inline, more in a `lax.map`: the memory of one
        query), `g` described leaf by leaf."""
        self = self.for_objective(objective)
        noise_key, eval_key = jax.random.split(key)
        v_key = jax.random.fold_in(jax.random.wrap_key_data(v_root), step // self.nu)

        def query(k):
            """`(d, mean loss (NaN when not finite), |L₊ − L₋|)` of query `k`."""
            u_key = member_key(noise_key, k)
            signs = jnp.array([self.eps, -self.eps], jnp.float32)  # both in one vmap: Z drawn once for the pair
            plus, minus = jax.vmap(lambda s: objective(self._perturbed(x, u_key, v_key, s), batch, eval_key))(signs)
            ok = jnp.isfinite(plus) & jnp.isfinite(minus)
            return (jnp.where(ok, (plus - minus) / (2 * self.eps), 0.0), jnp.where(ok, (plus + minus) / 2, jnp.nan),
                    jnp.abs(plus - minus))

        ks = jnp.arange(self.n, dtype=jnp.int32)
        ds, losses, spreads = (jax.tree.map(lambda v: v[None], query(ks[0])) if self.n == 1
                               else jax.lax.map(query, ks))
        metrics = {"loss": jnp.nanmean(losses), "loss_range": jnp.mean(spreads), "evaluations": 2 * self.n}
        return Direction(self._leaf_direction, (ds / self.n, noise_key, v_key), snr=self.n >= 2), metrics, v_root

    def _leaf_direction(self, operands, path, w):
        """One leaf's `(g, halves' dots)`, or `LeafBlocks` of it for a leaf over `NOISE_BLOCK_ELEMENTS`.

        A matrix's `g = Σ_k w_k U_k Vᵀ / r = (Σ_k w_k U_k) Vᵀ / r` (`w_k = d_k / n`; `V` is the step's, shared
        by the queries): the `U` factors are summed over each half of the queries (one `[..., m, r]` at a
        time), then contracted with `V` over the rank — no per-query matrix — and the halves' dots come from
        the `r × r` Gram matrices (`⟨A Vᵀ, B Vᵀ⟩ = tr(AᵀB · VᵀV)`). Other leaves: the regenerated noise sum
        `Σ_k w_k ε_k` (`gfo.optim.population.leaf_noise_direction`)."""
        weights, noise_key, v_key = operands
        if matrix_ndim(path, w) != 2:
            return leaf_noise_direction(weights, lambda k: member_key(noise_key, k), path, w, "gaussian")
        shape, dtype, r = jnp.shape(w), jnp.result_type(w), self.rank
        _, v = lowrank_factors(v_key, path, shape, r)  # [..., n, r]
        first, second = _u_sums(weights, lambda k: lowrank_factors(member_key(noise_key, k), path, shape, r)[0])
        total = first if second is None else first + second  # [..., m, r]
        dots = None
        if second is not None:
            gram_v = jnp.einsum("...nr,...ns->...rs", v, v)
            tr = lambda a, b: jnp.sum(jnp.einsum("...mr,...ms->...rs", a, b) * gram_v)  # noqa: E731
            dots = jnp.stack([tr(first, second), tr(first, first), tr(second, second)]) / r ** 2
        plan = noise_blocks(path, w)
        if plan is None:
            return (jnp.einsum("...mr,...nr->...mn", total, v) / r).astype(dtype), dots

        n_layers, rows, per, n_blocks = plan  # blocks of `per` rows of one layer (the last may overlap)
        stacked = n_layers is not None
        lead = (1,) if stacked else ()

        def block(t):
            layer, b = t // n_blocks, t % n_blocks
            start = jnp.minimum(b * per, rows - per)
            u_b = jax.lax.dynamic_slice_in_dim(total[layer] if stacked else total, start, per, axis=0)
            g_b = (u_b @ (v[layer] if stacked else v).T / r).reshape(lead + (per, shape[-1]))
            corner = tuple(jnp.asarray(c, jnp.int32) for c in (((layer,) if stacked else ()) + (start, 0)))
            fresh = (start + jnp.arange(per) >= b * per).reshape(lead + (per, 1))
            return corner, g_b, fresh, (None if dots is None else jnp.where(t == 0, dots, 0.0))

        return LeafBlocks((n_layers or 1) * n_blocks, lead + (per, shape[-1]), block, halves=dots is not None)


def _u_sums(weights: jax.Array, u_of):
    """`(Σ_{k<h} w_k U_k, Σ_{k>=h} w_k U_k)` with `h = ⌊n/2⌋` (float32), in one loop over the queries
    (query `k` and `k + h` together); `(w_0 U_0, None)` for one query."""
    n = weights.shape[0]
    weights = weights.astype(jnp.float32)
    if n == 1:
        return weights[0] * u_of(jnp.int32(0)), None
    h = n // 2
    template = jax.eval_shape(u_of, jnp.int32(0))
    zero = zeros_after(weights, template.shape)
    last = weights[n - 1] * u_of(jnp.int32(n - 1)) if n % 2 else zero

    def body(k, halves):
        first, second = halves
        return first + weights[k] * u_of(k), second + weights[k + h] * u_of(k + h)

    return jax.lax.fori_loop(0, h, body, (zero, last))


@dataclasses.dataclass
class LOZOSection(TransformSection):
    """`optimizer: {method: lozo, eps: 1e-3, rank: 2, nu: 50, transform: sgd}`."""

    eps: float = knob(1e-2, POSITIVE, "perturbation size ε of x ± ε U Vᵀ")
    rank: int = knob(1, AT_LEAST_ONE, "rank of the perturbation U Vᵀ")
    nu: int = knob(50, AT_LEAST_ONE, "steps between draws of V")
    n: int = knob(1, AT_LEAST_ONE, "queries per step (each with its own U)")


register(estimator_method("lozo", LOZO, LOZOSection))
