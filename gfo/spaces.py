"""Search spaces: what is searched, and how a point of it becomes model parameters.

A space is built around base parameters and exposes

    x0 = space.init(key)          # the starting point, a pytree
    params = space.to_params(x)   # model parameters for `model.apply`
    space.dim                     # number of searched scalars
    space.lowrank_ok              # to_params accepts `LowRankKernel`/`NoisyLeaf` leaves in x (kernels: [d_in, d_out],
                                  # or [L, d_in, d_out] with per-layer factors under `layers/`)

Spaces: `Full` (all weights or a path-filtered subset), `LoRA`, `Prompt` (soft prompt), `HardPrompt`
(token ids, for the discrete searches of `gfo.optim.search.discrete`), and
`Subspace` (a fixed random projection of a small vector into any other space, Black-Box Tuning).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp

import models
from gfo.optim.noise import leaf_key, path_name, tree_size
from models.linear import embed_lookup, materialize
from models.tree import get_path, set_path


class Space:
    lowrank_ok: bool = False
    # Per-leaf noise kinds, `((regex on leaf paths, "lowrank" | "full" | "frozen"), ...)`, first match wins
    # (HyperscaleES's es_map); read by the ES estimators (`gfo.optim.noise.leaf_kind`). Set from `space.noise_map`.
    noise_map: tuple = ()

    def init(self, key: jax.Array):
        raise NotImplementedError

    def to_params(self, x):
        raise NotImplementedError

    @property
    def dim(self) -> int:
        return tree_size(self.init(jax.random.key(0)))


class Full(Space):
    """The model's weights themselves, optionally only those whose path matches `filter` / in `layers`.

    `x` is a flat dict `{"layers/attn/q/kernel": array, ...}` of the searched leaves; the others stay
    at their base values. `filter` is a regular expression searched in each leaf's path name, or a
    predicate `(path_name, leaf) -> bool`. The blocks are stacked: every leaf under `layers/` (the
    constant `models.LAYERS`) has a leading `[n_layers]` axis, so a path names one module in all layers.
    `layers=[0, 3]` searches those layers only: it selects the stacked leaves (still narrowed by
    `filter`), and `x` holds their rows `[len(layers), ...]`, written back into the stacked leaves by
    `to_params` (a `LowRankKernel`/`NoisyLeaf` given for such a leaf is materialised first).
    """

    lowrank_ok = True

    def __init__(self, params, filter: str | Callable[[str, jax.Array], bool] | None = None,
                 layers=None):
        self.base = params
        if filter is None:
            pred = lambda name, leaf: True  # noqa: E731
        elif isinstance(filter, str):
            if re.search(r"layers_\d", filter):
                raise ValueError(f"Full(filter={filter!r}) names a layer the old way ('layers_<i>'): layers are "
                                 f"stacked under {models.LAYERS + '/'!r} now (e.g. 'layers/attn/q/kernel'); select "
                                 f"layers with Full(params, filter=..., layers=[i, ...])")
            try:
                pattern = re.compile(filter)
            except re.error as e:
                raise ValueError(f"filter={filter!r} is not a valid regular expression: {e}") from None
            pred = lambda name, leaf: bool(pattern.search(name))  # noqa: E731
        else:
            pred = filter
        self.layers = None
        if layers is not None:
            n = _n_layers(params)
            self.layers = tuple(int(i) for i in layers)
            if not self.layers or len(set(self.layers)) != len(self.layers) or not all(0 <= i < n for i in self.layers):
                raise ValueError(f"Full(layers={list(layers)}): expected distinct layer indices in [0, {n})")
            inner = pred
            pred = lambda name, leaf: models.tree.is_stacked(name) and inner(name, leaf)  # noqa: E731
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        self._paths = {path_name(p): tuple(str(getattr(k, "key", k)) for k in p)
                       for p, leaf in leaves if pred(path_name(p), leaf)}
        if not self._paths:
            names = [path_name(p) for p, _ in leaves]
            raise ValueError(f"filter={filter!r}" + (f" with layers={list(layers)}" if layers is not None else "")
                             + f" selects no parameter; the {len(names)} parameter paths include {names[:5]}")
        if self.layers is None:
            # Searched leaves are replaced whole by `to_params`, so `base` keeps only their shapes: a jitted step
            # receives the unsearched weights as arguments, never a second copy of the searched ones.
            flat = {path_name(p): leaf for p, leaf in leaves}
            self._initial = _Held({name: flat[name] for name in self._paths})
            self.base = jax.tree.map(lambda v: v, params)
            for name, path in self._paths.items():
                set_path(self.base, path, jax.ShapeDtypeStruct(jnp.shape(flat[name]), jnp.result_type(flat[name])))

    def init(self, key: jax.Array) -> dict:
        del key
        if self.layers is None:
            return dict(self._initial.value)
        flat = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(self.base)[0]}
        rows = jnp.asarray(self.layers)
        return {name: flat[name][rows] for name in self._paths}

    def to_params(self, x: dict):
        params = jax.tree.map(lambda v: v, self.base)
        for name, value in x.items():
            if self.layers is not None:
                value = get_path(self.base, self._paths[name]).at[jnp.asarray(self.layers)].set(materialize(value))
            set_path(params, self._paths[name], value)
        return params


class _Held:
    """Arrays a space keeps for `init` only: opaque to pytree flattening, so never a step's argument."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _n_layers(params) -> int:
    if not isinstance(params, dict) or models.LAYERS not in params:
        raise ValueError(f"Full(layers=...) needs the stacked {models.LAYERS!r} subtree; the parameters have "
                         f"{sorted(params)[:6] if isinstance(params, dict) else type(params).__name__}")
    return int(jnp.shape(jax.tree.leaves(params[models.LAYERS])[0])[0])


class LoRA(Space):
    """LoRA factors of the `targets` projections: `W + (alpha/rank)·a bᵀ` (see `models.lora`)."""

    def __init__(self, params, rank: int = 8, targets=("q", "v"), alpha: float | None = None):
        self.base, self.rank, self.targets = params, rank, tuple(targets)
        self.alpha = float(alpha if alpha is not None else 2 * rank)
        try:
            models.lora.lora_target_paths(params, self.targets)  # validate early
        except ValueError as e:
            if "match no kernel" not in str(e):
                raise
            names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            kernels = [n for n in names if n.endswith("kernel") or n.endswith("lm_head")] or names
            raise ValueError(f"targets={list(self.targets)} match no kernel of this model; its kernel paths "
                             f"include {kernels[:5]}") from None

    def init(self, key: jax.Array) -> dict:
        return models.init_lora(key, self.base, self.rank, self.targets)

    def to_params(self, x: dict):
        return models.merge_lora(self.base, x, self.alpha)


class Prompt(Space):
    """A soft prompt `[n_tokens, d_model]`, returned as `params["soft_prompt"]`."""

    def __init__(self, params, n_tokens: int, from_tokens=None):
        self.base, self.n_tokens, self.from_tokens = params, n_tokens, from_tokens

    def init(self, key: jax.Array) -> jax.Array:
        return models.init_prompt(key, self.base, self.n_tokens, self.from_tokens)

    def to_params(self, x: jax.Array):
        return {**self.base, "soft_prompt": x}


class HardPrompt(Space):
    """A hard prompt: `n_tokens` token ids (int32 `[n]`) drawn from `vocab`, prepended to every input.

    `to_params` returns `params["soft_prompt"] = embed[x]`, which the model reads exactly as if the
    tokens were prepended (positions `0..n-1`, the input shifted by `n`). Searched by the discrete
    optimizers of `gfo.optim.search.discrete` (annealing, tabu search, ant colony), not by continuous ones.
    """

    def __init__(self, params, n_tokens: int, vocab=None, initial=None):
        vocab_size = params["embed"].shape[0]
        self.base, self.n_tokens = params, int(n_tokens)
        self.vocab = tuple(range(vocab_size)) if vocab is None or len(vocab) == 0 else tuple(int(v) for v in vocab)
        bad = [v for v in self.vocab if not 0 <= v < vocab_size]
        if bad or self.n_tokens < 1:
            raise ValueError(f"HardPrompt: n_tokens={n_tokens} must be >= 1 and vocab ids in [0, {vocab_size}) "
                             f"(out of range: {bad[:5]})")
        self.initial = None if initial is None else tuple(int(t) for t in initial)
        if self.initial is not None and (len(self.initial) != self.n_tokens
                                         or not set(self.initial) <= set(self.vocab)):
            raise ValueError(f"HardPrompt initial={list(self.initial)}: expected {self.n_tokens} ids from vocab")

    def init(self, key: jax.Array) -> jax.Array:
        if self.initial is not None:
            return jnp.asarray(self.initial, jnp.int32)
        return jnp.asarray(self.vocab, jnp.int32)[jax.random.randint(key, (self.n_tokens,), 0, len(self.vocab))]

    def to_params(self, x: jax.Array):
        table = self.base["embed"]
        return {**self.base, "soft_prompt": embed_lookup(table, x, table.dtype)}

    @property
    def dim(self) -> int:
        return self.n_tokens


class Subspace(Space):
    """`z ∈ R^dim` mapped into `inner` as `x = x0 + P z` by a fixed random projection (BBT).

    `P` has i.i.d. `N(0, scale²)` entries (default `scale = 1/√dim`), generated per inner leaf in
    row blocks of `block` rows from `key`. When the inner space has more than `max_stored` scalars
    times `dim`, `P` is regenerated block by block at each use instead of being stored; both modes give
    the same numbers.
    """

    def __init__(self, inner: Space, dim: int, key: jax.Array, scale: float | None = None,
                 max_stored: int = 2**26, block: int = 4096):
        if dim < 1:
            raise ValueError(f"Subspace dim={dim} must be >= 1")
        self.inner, self._dim, self.key = inner, int(dim), key
        self.scale = float(scale if scale is not None else dim ** -0.5)
        self.block = int(block)
        self.x0_inner = inner.init(jax.random.fold_in(key, 0))
        self.stored = tree_size(self.x0_inner) * dim <= max_stored
        self._proj = ({path_name(p): self._leaf_projection(p, v.size)
                       for p, v in jax.tree_util.tree_flatten_with_path(self.x0_inner)[0]}
                      if self.stored else None)

    @property
    def dim(self) -> int:
        return self._dim

    def _block_rows(self, key, block_index):
        return self.scale * jax.random.normal(jax.random.fold_in(key, block_index), (self.block, self._dim))

    def _leaf_projection(self, path, size: int) -> jax.Array:
        key = leaf_key(self.key, path)
        n_blocks = -(-size // self.block)
        rows = jax.vmap(lambda b: self._block_rows(key, b))(jnp.arange(n_blocks))
        return rows.reshape(-1, self._dim)[:size]

    def _project_leaf(self, path, x0, z):
        if self.stored:
            delta = self._proj[path_name(path)] @ z
        else:
            key = leaf_key(self.key, path)
            n_blocks = -(-x0.size // self.block)
            delta = jax.lax.map(lambda b: self._block_rows(key, b) @ z, jnp.arange(n_blocks)).reshape(-1)[:x0.size]
        return (x0.astype(jnp.float32) + delta.reshape(x0.shape)).astype(x0.dtype)

    def init(self, key: jax.Array) -> jax.Array:
        del key
        return jnp.zeros((self._dim,), jnp.float32)

    def inner_point(self, z: jax.Array):
        """The point `x0 + P z` of the inner space (what `to_params` hands to `inner.to_params`)."""
        return jax.tree_util.tree_map_with_path(lambda p, v: self._project_leaf(p, v, z), self.x0_inner)

    def to_params(self, z: jax.Array):
        return self.inner.to_params(self.inner_point(z))




# Spaces are pytrees: the attributes that hold arrays (base weights, projections, keys) are children, so a
# jitted step that takes an objective built on a space receives them as arguments (`gfo.jitting`).
def _register_spaces():
    from gfo.jitting import register_object_pytree

    for cls in (Full, LoRA, Prompt, HardPrompt, Subspace):
        register_object_pytree(cls)


_register_spaces()
Space.domain = "continuous"  # what the optimizer searches: real vectors, or token ids
HardPrompt.domain = "tokens"
