"""A pseudo-gradient made one leaf at a time, and an optax transform applied one leaf at a time.

The noise-based estimators (SPSA, OpenES, LowRankES) never hold their perturbations: a leaf's
pseudo-gradient `g = Σ_d w_d ε_d` is regenerated from the directions' weights and the noise key. They
describe it as a `Direction` — `make(operands, path, leaf) -> (g_leaf, dots)`, or `LeafBlocks` (blocks
of rows of one layer) for a leaf over `models.linear.NOISE_BLOCK_ELEMENTS` — and the step either builds
the whole tree (`Direction.tree`, then any optax transform) or, for an *elementwise* transform, runs
`leafwise_update`: regenerate leaf `i`'s `g` (block `b`'s), apply the transform to it, write it into the
donated parameters, then go on. The leaves are ordered by a data dependency, so the update's memory is
the parameters (updated in place) plus what one leaf (one block) needs — its `g` and float32 half-sums
— instead of the parameters plus the whole gradient tree: MeZO's in-place update, functionally.
(LowRankES's low-rank leaves are made whole; with a sharded population there are no blocks.)

`leafwise_update` is exact for every *elementwise* transform — `sgd` (with momentum), `adam`, `adamw`,
`add_decayed_weights`, learning-rate schedules, … Its state must be made of subtrees shaped like the
parameters (moments) and scalars (step counts); any other state is refused with a clear error. A
transform that reduces over a leaf or over the tree (`clip_by_global_norm`, trust ratios as in LAMB /
LARS, block RMS clipping) cannot be detected from its state and must not be applied leaf by leaf:
`gfo.Optimizer` only does so when told (`leafwise=True`; every transform `gfo train` builds qualifies).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def halves_dots(first, second, fresh=None) -> jax.Array:
    """`[first·second, first·first, second·second]` (over the rows where `fresh`, when given)."""
    if fresh is not None:
        first = jnp.where(fresh, first, 0.0)
    return jnp.stack([jnp.vdot(first, second), jnp.vdot(first, first),
                      jnp.vdot(second, second) if fresh is None else jnp.vdot(jnp.where(fresh, second, 0.0), second)])


def halves_cosine(dots) -> jax.Array:
    """The cosine of `[first·second, first·first, second·second]` summed over leaves (NaN for None)."""
    if dots is None:
        return jnp.float32(jnp.nan)
    ab, aa, bb = dots
    return ab / jnp.maximum(jnp.sqrt(aa) * jnp.sqrt(bb), 1e-30)


@dataclasses.dataclass(frozen=True)
class Direction:
    """A pseudo-gradient tree described leaf by leaf.

    `make(operands, path, leaf)` returns `(g, dots)` — the leaf's pseudo-gradient (shape and dtype of
    `leaf`) and `[first·second, first·first, second·second]` (float32 `[3]`) of its sums over the two
    halves of the directions, or None — or, for a large leaf, `LeafBlocks`: then `leafwise_update`
    updates the leaf a block at a time and never holds its whole `g`. `operands` is the pytree of arrays
    `g` is made from (direction weights, noise key): passed explicitly so that an update can order the
    leaves. `snr`: report `snr_cosine`, the cosine of the halves summed over the leaves.
    """

    make: Callable
    operands: Any
    snr: bool = True

    def tree(self, x) -> tuple[Any, dict]:
        """`(g, metrics)`: the whole pseudo-gradient (a pytree like `x`) and its `grad_norm` (and
        `snr_cosine`)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(x)
        outs = [leaf_direction(self.make(self.operands, p, w), lambda w=w: jnp.zeros_like(w)) for p, w in flat]
        g = [o[0] for o in outs]
        return treedef.unflatten(g), self.metrics(sum(sq_norm(v) for v in g), [o[1] for o in outs])

    def metrics(self, grad_sq_norm, dots: list) -> dict:
        """`grad_norm` from the summed squared norm, `snr_cosine` from the leaves' dots (None ones skipped)."""
        out = {"grad_norm": jnp.sqrt(grad_sq_norm)}
        if self.snr:
            dots = [d for d in dots if d is not None]
            out["snr_cosine"] = halves_cosine(sum(dots) if dots else None)
        return out


@dataclasses.dataclass(frozen=True)
class LeafBlocks:
    """A leaf's pseudo-gradient as `count` blocks of `shape` (the leaf's rank), for a leaf too large to
    hold a second time: `make(t) -> (corner, g, fresh, dots)` gives block `t`'s start index per axis
    (int32 scalars), its float32 `g` of `shape`, `fresh` — a bool array broadcastable to `shape` that marks
    the entries no earlier block covered (blocks may overlap), or None — and its halves' dots over the
    fresh entries (None when the direction has no halves)."""

    count: int
    shape: tuple
    make: Callable
    halves: bool = False  # the blocks report dots

    def map(self, fn: Callable) -> "LeafBlocks":
        """The blocks with `fn` (elementwise) applied to every block's `g`."""
        def make(t):
            corner, g, fresh, dots = self.make(t)
            return corner, fn(g), fresh, dots

        return LeafBlocks(self.count, self.shape, make, self.halves)

    def assemble(self, init: jax.Array) -> tuple[jax.Array, Any]:
        """`(g, dots)`: the blocks written into `init` (the leaf's shape and dtype), their dots summed."""
        def body(t, carry):
            g, acc = carry
            corner, block, _, dots = self.make(t)
            g = jax.lax.dynamic_update_slice(g, block.astype(g.dtype), corner)
            return g, acc if dots is None else acc + dots

        g, acc = jax.lax.fori_loop(0, self.count, body, (init, jnp.zeros((3,), jnp.float32)))
        return g, (acc if self.halves else None)


def leaf_direction(made, init: Callable[[], jax.Array]):
    """`(g, dots)` of one leaf from what a `Direction.make` returned (blocks assembled into `init()`)."""
    return made.assemble(init()) if isinstance(made, LeafBlocks) else made


def sq_norm(v) -> jax.Array:
    """`Σ v²`, accumulated in float32 whatever `v`'s dtype."""
    v = v.astype(jnp.float32)
    return jnp.sum(v * v)


def exact_zero(value: jax.Array) -> jax.Array:
    """A float32 `-0.0` computed from one element of `value` (whatever that element is, NaN and inf
    included): XLA cannot fold it, so whatever uses it depends on `value`; `y + exact_zero(v) == y`."""
    v = value[(0,) * jnp.ndim(value)].astype(jnp.float32)
    return -(jnp.where(jnp.isfinite(v), jnp.abs(v), 0.0) * 0.0)


def _after(operands, value):
    """`operands` unchanged, but made to depend on `value`: an exact zero computed from one element of
    `value` is added to every leaf (to a PRNG key's data). A data dependency, unlike an optimization
    barrier, survives XLA's common-subexpression elimination, so it orders the leaves of
    `leafwise_update`: no noise of leaf `i + 1` is drawn, and no accumulator allocated, before leaf `i`
    is written."""
    zero = exact_zero(value)

    def tie(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(a)
            return jax.random.wrap_key_data(data + (zero != 0).astype(data.dtype), impl=jax.random.key_impl(a))
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a + zero.astype(a.dtype)
        return a + (zero != 0).astype(a.dtype)

    return jax.tree.map(tie, operands)


def _is_like(x, treedef):
    """Whether a node of an optax state is shaped like `x`: `x`'s tree structure and leaf shapes."""
    shapes = [jnp.shape(v) for v in jax.tree.leaves(x)]

    def like(node) -> bool:
        if node is None or jax.tree.structure(node) != treedef:
            return False
        return [jnp.shape(v) for v in jax.tree.leaves(node)] == shapes

    return like


def leafwise_update(transform: optax.GradientTransformation, direction: Direction, x, opt_state):
    """`(x_new, opt_state_new, metrics)`: `transform` applied to `direction` one leaf of `x` at a time.

    Leaf `i`'s `g` is made, transformed with leaf `i`'s slice of `opt_state` and added to the leaf before
    leaf `i + 1`'s `g` is made (a data dependency between them), so only one leaf's `g` lives at a
    time. `opt_state` keeps `transform.init(x)`'s layout: its parameter-shaped subtrees are split by leaf
    and its scalars (step counts) shared, so the same state serves the whole-tree update and checkpoints
    do not change. Equal to `transform.update` on the whole tree for transforms that treat every leaf on
    its own; a state leaf that is neither parameter-shaped nor a scalar is refused. Metrics:
    `grad_norm`, `snr_cosine` (when the direction reports it) and `update_norm`.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(x)
    like_x = _is_like(x, treedef)
    parts, state_def = jax.tree_util.tree_flatten(opt_state, is_leaf=like_x)
    shaped = [like_x(p) for p in parts]
    for p, is_shaped in zip(parts, shaped):
        if not is_shaped and jnp.ndim(p) != 0:
            raise ValueError(f"leafwise update: the transform's state has a leaf of shape {jnp.shape(p)} that is "
                             f"neither parameter-shaped nor a scalar, so the transform cannot be applied one "
                             f"parameter leaf at a time; build the optimizer with leafwise=False")
    by_leaf = [treedef.flatten_up_to(p) if s else None for p, s in zip(parts, shaped)]
    shared = [p for p, s in zip(parts, shaped) if not s]

    def join(shaped_values, shared_values):
        it_a, it_b = iter(shaped_values), iter(shared_values)
        return state_def.unflatten([next(it_a) if s else next(it_b) for s in shaped])

    def split(state):
        leaves = jax.tree.leaves(state)
        if len(leaves) != len(parts):
            raise ValueError(f"leafwise update: the transform's state for one leaf has {len(leaves)} leaves, "
                             f"expected {len(parts)}; build the optimizer with leafwise=False")
        return [v for v, s in zip(leaves, shaped) if s], [v for v, s in zip(leaves, shaped) if not s]

    operands, new_leaves, new_shaped = direction.operands, [], []
    totals, dots = (jnp.float32(0.0), jnp.float32(0.0)), []
    for i, (path, w) in enumerate(flat):
        if new_leaves:  # leaf i's g is made only after leaf i-1 is written
            operands = _after(operands, new_leaves[-1])
        leaf_state = [b[i] for b in by_leaf if b is not None]
        made = direction.make(operands, path, w)
        if isinstance(made, LeafBlocks):
            w, leaf_state, shared_out, sums, d = _blocked_update(transform, made, w, leaf_state, shared, join, split)
        else:
            g, d = made
            u, state = transform.update(g, join(leaf_state, shared), w)
            w = optax.apply_updates(w, u)
            leaf_state, shared_out = split(state)
            sums = (sq_norm(g), sq_norm(u))
        new_leaves.append(w)
        new_shaped.append(leaf_state)
        totals = (totals[0] + sums[0], totals[1] + sums[1])
        dots.append(d)
    # every leaf's copy of a shared scalar (a step count) is the same: keep the last leaf's
    per_part = iter(zip(*new_shaped)) if new_shaped and new_shaped[0] else iter(())
    new_state = join([treedef.unflatten(list(values)) for values in per_part], shared_out)
    metrics = {**direction.metrics(totals[0], dots), "update_norm": jnp.sqrt(totals[1])}
    return treedef.unflatten(new_leaves), new_state, metrics


def _blocked_update(transform, blocks: LeafBlocks, w, leaf_state: list, shared: list, join, split):
    """One leaf updated a block at a time in place (a loop carrying the leaf and its state slices):
    `(w, leaf_state, shared_out, (Σ g², Σ u²), dots)`. Entries that an earlier (overlapping) block
    already updated keep that update."""

    def body(t, carry):
        w, leaf_state, shared_out, g_sq, u_sq, acc = carry
        corner, g, fresh, dots = blocks.make(t)
        w_b = jax.lax.dynamic_slice(w, corner, blocks.shape)
        state_b = [jax.lax.dynamic_slice(v, corner, blocks.shape) for v in leaf_state]
        g = g.astype(w.dtype)
        u, new_state = transform.update(g, join(state_b, shared), w_b)
        new_w_b = optax.apply_updates(w_b, u)
        new_state_b, shared_out = split(new_state)
        if fresh is not None:
            new_w_b = jnp.where(fresh, new_w_b, w_b)
            new_state_b = [jnp.where(fresh, new, old) for new, old in zip(new_state_b, state_b)]
            g, u = jnp.where(fresh, g, 0), jnp.where(fresh, u, 0)
        w = jax.lax.dynamic_update_slice(w, new_w_b, corner)
        # the state's slices are written after the leaf's (which reads them), so both update in place
        new_state_b = _after(new_state_b, w)
        leaf_state = [jax.lax.dynamic_update_slice(v, b, corner) for v, b in zip(leaf_state, new_state_b)]
        return (w, leaf_state, shared_out, g_sq + sq_norm(g), u_sq + sq_norm(u),
                acc if dots is None else acc + dots)

    zero = jnp.float32(0.0)
    w, leaf_state, shared_out, g_sq, u_sq, acc = jax.lax.fori_loop(
        0, blocks.count, body, (w, leaf_state, list(shared), zero, zero, jnp.zeros((3,), jnp.float32)))
    return w, leaf_state, shared_out, (g_sq, u_sq), (acc if blocks.halves else None)


def is_elementwise(transform: optax.GradientTransformation) -> bool:
    """Whether `transform` may be applied one leaf — one block of rows of a leaf — at a time.

    Decided by running it on a probe: three updates (gradients from 1e-3 to 1e3, so that clipping and
    trust ratios act) of a tree `{a: [6, 4], b: [5]}` must equal, to float32 rounding, the updates of its
    pieces `a[:4]`, `a[4:]` and `b` each transformed on its own; and the state must be made of
    parameter-shaped subtrees and scalars (what `leafwise_update` splits). `sgd`, `adam`, `adamw`, weight
    decay, elementwise clipping and schedules pass; `clip_by_global_norm`, LAMB/LARS trust ratios,
    Adafactor's factored moments, random noise (`add_noise`) and a transform whose masks are made for
    another tree fail. A few dozen small host operations, cached per transform."""
    try:
        return _is_elementwise_cached(transform)
    except TypeError:  # an unhashable transform: decide afresh
        return _is_elementwise(transform)


@functools.lru_cache(maxsize=256)
def _is_elementwise_cached(transform) -> bool:
    return _is_elementwise(transform)


def _is_elementwise(transform) -> bool:
    key_a, key_b = jax.random.split(jax.random.key(20231))
    x = {"a": jax.random.normal(key_a, (6, 4)), "b": jax.random.normal(key_b, (5,))}
    pieces = [{"p": x["a"][:4]}, {"p": x["a"][4:]}, {"p": x["b"]}]
    try:
        state = transform.init(x)
        treedef = jax.tree.structure(x)
        for part in jax.tree_util.tree_flatten(state, is_leaf=_is_like(x, treedef))[0]:
            if not _is_like(x, treedef)(part) and jnp.ndim(part) != 0:
                return False  # neither parameter-shaped nor a scalar: leafwise_update cannot split it
        states = [transform.init(p) for p in pieces]
        for i, scale in enumerate((1e-3, 1.0, 1e3)):
            g = jax.tree.map(lambda v: scale * jnp.cos(v * (i + 1) + i), x)
            u, state = transform.update(g, state, x)
            x = optax.apply_updates(x, u)
            g_pieces = [{"p": g["a"][:4]}, {"p": g["a"][4:]}, {"p": g["b"]}]
            for k, (p, gp) in enumerate(zip(pieces, g_pieces)):
                u, states[k] = transform.update(gp, states[k], p)
                pieces[k] = optax.apply_updates(p, u)
    except Exception:  # noqa: BLE001 - a transform that cannot run on the probe's pieces cannot run leafwise
        return False
    joined = {"a": jnp.concatenate([pieces[0]["p"], pieces[1]["p"]]), "b": pieces[2]["p"]}
    return all(bool(jnp.allclose(x[k], joined[k], rtol=1e-5, atol=1e-6)) for k in x)
