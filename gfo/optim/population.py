"""An implicit population: its settings, chunked evaluation, and noise sums regenerated per direction.

Memory is set by `batch_size` (members evaluated at once), not by the population size: members are
indices, their perturbations are regenerated inside the mapped function (inside the model's forward,
layer by layer, when the objective accepts `models.linear.NoisyLeaf` / `LowRankKernel` leaves), and only
the per-member scalars are stacked. The two members of an antithetic pair are evaluated together and
share one draw of their direction's noise. `pop_sharding`, when given (the scale-out mesh's `pop` axis),
constrains the member indices and therefore the work and the fitness vector to be split over devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from gfo.optim import shaping
from gfo.optim.evaluate import constrain, map_members, population_metrics
from gfo.optim.update import LeafBlocks, exact_zero, halves_cosine, halves_dots, leaf_direction
from gfo.optim.noise import check_noise_map, leaf_noise, leaf_noise_rows, noise_blocks


def zeros_after(weights: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Zeros of `shape` that depend on `weights`: an accumulator XLA cannot allocate before its inputs
    exist. A constant-initialised loop carry is otherwise hoisted to the start of the step, and every
    leaf's accumulator would be live at once — defeating a leaf-by-leaf update (`gfo.optim.update`)."""
    return jnp.broadcast_to(jnp.abs(exact_zero(weights)).astype(dtype), shape)


def weighted_sum(weights: jax.Array, make: Callable[[jax.Array], object], batch_size: int | None = None,
                 pop_sharding=None):
    """`Σ_j weights[j] · make(j)` over `j < len(weights)` for pytree-valued `make`, in chunks."""

    def contract(w, j):
        parts = jax.vmap(make)(j)
        return jax.tree.map(lambda p: jnp.tensordot(w, p.astype(jnp.float32), axes=1), parts)

    return chunked_contraction(weights, contract, batch_size, pop_sharding)


def chunked_contraction(weights: jax.Array, contract: Callable[[jax.Array, jax.Array], object],
                        batch_size: int | None = None, pop_sharding=None):
    """`Σ_chunks contract(weights[chunk], ids[chunk])` with a `lax.scan` carrying a float32 sum.

    `contract(w [c], j [c] int32)` regenerates whatever the members `j` need and contracts it with
    their weights `w`, returning a pytree; a partial last chunk is padded with zero weights. Memory is
    that of one chunk. With `pop_sharding` each chunk's members are split over the `pop` axis: every
    device regenerates and contracts its own members, and the partial sums are all-reduced.
    """
    inner = contract
    if pop_sharding is not None:
        contract = lambda w, j: inner(*constrain((w, j), pop_sharding))  # noqa: E731
    n = weights.shape[0]
    chunk = n if batch_size is None else max(1, min(int(batch_size), n))
    n_chunks = -(-n // chunk)
    padded = jnp.zeros((n_chunks * chunk,), jnp.float32).at[:n].set(weights.astype(jnp.float32))
    ids = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    if n_chunks == 1:
        return contract(padded, ids)
    template = jax.eval_shape(lambda: contract(padded[:chunk], ids[:chunk]))
    zero = jax.tree.map(lambda s: zeros_after(padded, s.shape), template)

    def body(total, c):
        w = jax.lax.dynamic_slice_in_dim(padded, c * chunk, chunk)
        j = jax.lax.dynamic_slice_in_dim(ids, c * chunk, chunk)
        return jax.tree.map(jnp.add, total, contract(w, j)), None

    total, _ = jax.lax.scan(body, zero, jnp.arange(n_chunks))
    return total


def noise_sum(weights: jax.Array, noise_of: Callable[[jax.Array], jax.Array], shape, batch_size: int | None = None,
              pop_sharding=None) -> jax.Array:
    """`Σ_d weights[d] · noise_of(d)` for one leaf: `noise_of(d)` is float32 of `shape`.

    Unsharded, a `fori_loop` over the directions adds one direction's noise at a time into a float32
    accumulator, so the only memory beyond the result is one direction's noise of this leaf (which XLA
    fuses into the accumulation). With `pop_sharding` the directions are split over devices in chunks of
    `batch_size` (`chunked_contraction`) and the partial sums all-reduced.
    """
    if pop_sharding is not None:
        return weighted_sum(weights, noise_of, batch_size, pop_sharding)
    weights = weights.astype(jnp.float32)
    return jax.lax.fori_loop(0, weights.shape[0], lambda d, acc: acc + weights[d] * noise_of(d),
                             zeros_after(weights, shape))


def _direction_sums(weights: jax.Array, noise_of: Callable[[jax.Array], jax.Array], shape):
    """`(Σ_{d<h} w_d ε_d, Σ_{d>=h} w_d ε_d)` with `h = ⌊D/2⌋` in one loop over the directions (direction
    `d` and `d + h` together), float32 of `shape`; `(w_0 ε_0, None)` for one direction."""
    n = weights.shape[0]
    if n == 1:
        return weights[0] * noise_of(jnp.int32(0)), None
    h = n // 2

    def body(d, halves):
        first, second = halves
        return first + weights[d] * noise_of(d), second + weights[d + h] * noise_of(d + h)

    last = weights[n - 1] * noise_of(jnp.int32(n - 1)) if n % 2 else zeros_after(weights, shape)
    return jax.lax.fori_loop(0, h, body, (zeros_after(weights, shape), last))


def leaf_noise_sum(weights: jax.Array, direction_key: Callable[[jax.Array], jax.Array], path, w,
                   distribution: str = "gaussian", mask=None, batch_size: int | None = None, pop_sharding=None,
                   block_elements: int | None = None):
    """`(g, dots)` for one leaf `w` at `path`: `g = Σ_d weights[d] · ε_d` (cast to `w`'s dtype), `ε_d` being
    `gfo.optim.noise.leaf_noise(direction_key(d), path, w, distribution)` times `mask` (like `w`) when given, and
    `dots` the `[first·second, first·first, second·second]` of the sums over the first ⌊D/2⌋ and the
    remaining directions (None for one direction). A large leaf is made a block at a time
    (`leaf_noise_direction`) and written into `g`."""
    made = leaf_noise_direction(weights, direction_key, path, w, distribution, mask, batch_size, pop_sharding,
                                block_elements)
    return leaf_direction(made, lambda: zeros_after(weights, jnp.shape(w), jnp.result_type(w)))


def leaf_noise_direction(weights: jax.Array, direction_key: Callable[[jax.Array], jax.Array], path, w,
                         distribution: str = "gaussian", mask=None, batch_size: int | None = None,
                         pop_sharding=None, block_elements: int | None = None):
    """`leaf_noise_sum`'s leaf as a `gfo.optim.update.Direction` leaf: `(g, dots)`, or `LeafBlocks` for a leaf
    over `NOISE_BLOCK_ELEMENTS`.

    A small leaf is summed whole: one loop over the directions carrying its two half-sums. A larger one
    is regenerated a block of rows of one layer at a time (`gfo.optim.noise.noise_blocks`): each block is a loop
    over the directions, so the memory of a block is two blocks of float32 half-sums and one block of
    noise — MeZO's in-place regeneration, functionally (`gfo.optim.update.leafwise_update` applies each block
    to the leaf as it is made). With `pop_sharding` the directions are split over the devices instead
    (`noise_sum`), the leaf whole.
    """
    n = weights.shape[0]
    h = n // 2
    weights = weights.astype(jnp.float32)
    shape, dtype = jnp.shape(w), jnp.result_type(w)
    plan = None if pop_sharding is not None else noise_blocks(path, w, block_elements)

    if plan is None:  # the leaf whole
        def noise_of(d):
            z = leaf_noise(direction_key(d), path, w, distribution)
            return z if mask is None else z * mask.astype(jnp.float32)

        if pop_sharding is not None and n > 1:
            first = noise_sum(weights[:h], noise_of, shape, batch_size, pop_sharding)
            second = noise_sum(weights[h:], lambda d: noise_of(d + h), shape, batch_size, pop_sharding)
        else:
            first, second = _direction_sums(weights, noise_of, shape)
        if second is None:
            return first.astype(dtype), None
        return (first + second).astype(dtype), halves_dots(first, second)

    n_layers, rows, per, n_blocks = plan
    stacked = n_layers is not None
    per_layer = shape[1:] if stacked else shape
    block_shape = per_layer if rows is None else (per,) + tuple(per_layer[1:])
    lead = (1,) if stacked else ()

    def block(t):
        layer, b = t // n_blocks, t % n_blocks
        start = 0 if rows is None else jnp.minimum(b * per, rows - per)  # the last block may overlap
        ids = None if rows is None else start + jnp.arange(per, dtype=jnp.int32)
        corner = ((layer,) if stacked else ()) + (start,) + (0,) * (len(per_layer) - 1)
        corner = tuple(jnp.asarray(c, jnp.int32) for c in corner[:len(shape)])

        def noise_of(d):
            z = leaf_noise_rows(direction_key(d), path, w, layer if stacked else None, ids, distribution)
            if mask is None:
                return z
            return z * jax.lax.dynamic_slice(mask, corner, lead + block_shape).reshape(block_shape).astype(jnp.float32)

        first, second = _direction_sums(weights, noise_of, block_shape)
        total = first if second is None else first + second
        fresh = None if rows is None else (ids >= b * per).reshape((per,) + (1,) * (len(block_shape) - 1))
        dots = None if second is None else halves_dots(first, second, fresh)  # rows of an earlier block skipped
        fresh = None if fresh is None else fresh.reshape(lead + fresh.shape)
        return corner, total.reshape(lead + block_shape), fresh, dots

    return LeafBlocks((n_layers or 1) * n_blocks, lead + block_shape, block, halves=n > 1)


def noise_update(weights: jax.Array, direction_key: Callable[[jax.Array], jax.Array], x,
                 distribution: str = "gaussian", frozen: Callable = lambda path, leaf: False, mask=None,
                 batch_size: int | None = None, pop_sharding=None, block_elements: int | None = None):
    """`(g, snr_cosine)` for a whole tree `x`: `leaf_noise_sum` of every leaf (times `mask`'s leaf, a
    pytree like `x`, when given; zero where `frozen(path, leaf)`), and the cosine between the sums over
    the first ⌊D/2⌋ and the remaining directions (NaN for one direction). The estimators hand the same
    per-leaf sums to the step as a `gfo.optim.update.Direction`, which an update may consume leaf by leaf."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(x)
    masks = [None] * len(flat) if mask is None else treedef.flatten_up_to(mask)
    outs = [(jnp.zeros(jnp.shape(w), jnp.result_type(w)), None) if frozen(p, w) else
            leaf_noise_sum(weights, direction_key, p, w, distribution, m, batch_size, pop_sharding, block_elements)
            for (p, w), m in zip(flat, masks)]
    dots = [d for _, d in outs if d is not None]
    return treedef.unflatten([g for g, _ in outs]), halves_cosine(sum(dots) if dots else None)


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """Settings shared by the population estimators (validated once, here).

    `factored`: hand the objective perturbation descriptors as leaves of `x`
    (`models.linear.NoisyLeaf` for full-rank noise, `LowRankKernel` for low-rank), so a member's noise is
    generated inside the model's forward where each (stacked) layer uses it and no perturbed copy of the
    parameters exists; `False` hands the objective plain perturbed arrays (any function of `x` works);
    None (the default) decides by the objective's declaration (`gfo.objectives.accepts_descriptors`: an
    objective over a space whose `to_params` passes leaves through, `Space.lowrank_ok`).
    `batch_size` None: `gfo.Optimizer` plans a chunk from the memory budget (`gfo.optim.plan`).
    """

    population: int = 32
    sigma: float = 0.02
    antithetic: bool = True
    shaping: str = "centered_ranks"
    batch_size: int | None = None  # members evaluated at once (memory knob); None = all
    pop_sharding: object = None  # a `jax.sharding.Sharding` over the mesh's `pop` axis, or None
    groups: int = 1  # blocks of members, each on its own part of the batch, shaped within the block
    noise_map: tuple = ()  # ((regex, kind), ...): per-leaf noise kind, first match wins
    factored: bool | None = None

    def __post_init__(self):
        if self.population < 2 or (self.antithetic and self.population % 2):
            raise ValueError(f"population={self.population}: expected an integer >= 2"
                             + (", even with antithetic sampling" if self.antithetic else ""))
        if self.sigma <= 0:
            raise ValueError(f"sigma={self.sigma} must be > 0")
        if self.shaping not in shaping.SHAPINGS:
            raise ValueError(f"shaping={self.shaping!r}: expected one of {shaping.SHAPINGS}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 or None")
        per = self.population // max(self.groups, 1)
        if self.groups < 1 or self.population % self.groups or (self.antithetic and per % 2):
            raise ValueError(f"groups={self.groups} must divide population={self.population} into blocks of "
                             f"equal size" + (" holding whole antithetic pairs" if self.antithetic else ""))
        object.__setattr__(self, "noise_map", check_noise_map(self.noise_map, self._noise_kinds))

    _noise_kinds = ("full", "frozen")

    @property
    def n_directions(self) -> int:
        return self.population // 2 if self.antithetic else self.population

    def direction_and_sign(self, member):
        if self.antithetic:
            return member // 2, 1.0 - 2.0 * (member % 2).astype(jnp.float32)
        return member, jnp.float32(1.0)

    def direction_weights(self, shaped: jax.Array) -> jax.Array:
        """Per-direction weights `Σ_{i: p(i)=p} F_i s_i`, shape `[n_directions]`."""
        if self.antithetic:
            return shaped[0::2] - shaped[1::2]
        return shaped

    def member_batch(self, batch, member):
        """The part of `batch` that `member` evaluates: all of it, or its group's `1/groups` slice."""
        if self.groups == 1:
            return batch
        group = member // (self.population // self.groups)

        def part(b):
            if b.shape[0] % self.groups:
                raise ValueError(f"groups={self.groups}: the batch's leading axis {b.shape[0]} (shape {b.shape}) "
                                 f"must be a multiple of the number of groups")
            return b.reshape((self.groups, b.shape[0] // self.groups) + b.shape[1:])[group]

        return jax.tree.map(part, batch)

    def member_losses(self, member_loss: Callable) -> jax.Array:
        """Losses `[N]` of all members, `member_loss(direction, sign, member) -> scalar`.

        With antithetic sampling the members `2p` (sign +1) and `2p + 1` (sign −1) are evaluated in one
        `vmap` over the sign in which the direction is not batched, so the direction's noise is drawn once
        for both; chunks hold `batch_size // 2` pairs.
        """
        if not self.antithetic:
            return map_members(lambda m: member_loss(m, jnp.float32(1.0), m), self.population,
                               self.batch_size, self.pop_sharding)
        signs = jnp.array([1.0, -1.0], jnp.float32)

        def pair(d):
            return jax.vmap(lambda s, m: member_loss(d, s, m))(signs, 2 * d + jnp.arange(2, dtype=d.dtype))

        chunk = None if self.batch_size is None else max(1, self.batch_size // 2)
        return map_members(pair, self.n_directions, chunk, self.pop_sharding).reshape(self.population)

    def evaluate(self, member_loss: Callable) -> tuple[jax.Array, jax.Array, dict]:
        """Losses `[N]` of all members (`member_loss(direction, sign, member)`), shaped values, metrics."""

        losses = self.member_losses(member_loss)
        return losses, shaping.shape(losses, self.shaping, self.groups), population_metrics(losses)
