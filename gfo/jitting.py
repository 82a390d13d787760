"""`filter_jit`: `jax.jit` whose arguments may be any Python objects; their arrays are traced.

    @functools.partial(filter_jit, donate=(1,))          # donate `state` (argument 1, after `self`)
    def step(self, state, objective, batch, key): ...

Every argument is split into its *array leaves* (jax and NumPy arrays: traced, so they reach the
executable as arguments, never as baked-in constants) and *everything else* (static: the tree structure,
Python scalars, strings, functions, models), which keys the compilation cache by equality — or by
identity for unhashable values. So any plain function works as an objective, and an objective or space
holding frozen weights (LoRA / prompt / subspace bases, a KL reference) passes them as arguments: an
executable is a few kilobytes of code whatever the model size, and a recreated object of the same
structure (equal static parts, same array shapes and dtypes) reuses the compiled step.

What is looked into: registered pytrees (dicts, lists, tuples, `flax.struct` dataclasses, classes
registered with `jax.tree_util.register_pytree_node_class` — the spaces of `gfo.spaces` and gfo's
objectives are), bound methods (their `self`, e.g. `space.to_params`) and `functools.partial` objects.
Anything else is one static leaf: a closure's captured arrays are constants of its executable (wrap
such arrays in a pytree object to trace them).

Donation (`donate`: positions of arguments): the array leaves of those arguments are donated to XLA,
which may reuse their buffers for the outputs. The caller must not use a donated argument after the
call (its arrays are deleted where the backend implements donation: GPU, TPU, and CPU for most ops).

The process's compiled programs: `enable_compilation_cache` (JAX's persistent cache under
`$GFO_CACHE_DIR/jax`, default `~/.cache/gfo/jax`; `GFO_COMPILATION_CACHE=0` turns it off) and
`release_compiled_programs` (drops JAX's in-memory programs when the process's memory maps near the
kernel's limit: on CPU a small executable holds ~10 maps, a `gfo train` run's step and evaluations ~2000;
past `vm.max_map_count`, 65530 by default, the next compile segfaults).
"""

from __future__ import annotations

import functools
import gc
import os
import types
from typing import Any, Callable, Sequence

import jax
import numpy as np

_ARRAY = object()  # marks where an array leaf was taken out


def is_array(v) -> bool:
    """Jax and NumPy arrays (and `jax.ShapeDtypeStruct`s, for lowering from shapes): the traced leaves."""
    return isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def holds_arrays(obj) -> bool:
    """Whether `partition(obj)` finds any array leaf (through pytrees, bound methods and partials)."""
    return bool(partition(obj)[1])


def register_object_pytree(cls: type) -> type:
    """Register `cls` (a class whose instances keep their state in `__dict__`) as a pytree: attributes
    holding arrays are children (traced by `filter_jit`, visible to `jax.tree` functions), the others
    static auxiliary data (compared by equality, or identity when unhashable). Returns `cls`."""

    def flatten(obj):
        attrs = vars(obj)
        names = sorted(attrs)
        dynamic = tuple(n for n in names if holds_arrays(attrs[n]))
        static = tuple((n, _Static(attrs[n])) for n in names if n not in dynamic)
        return tuple(attrs[n] for n in dynamic), (dynamic, static)

    def unflatten(aux, children):
        dynamic, static = aux
        obj = object.__new__(cls)
        obj.__dict__.update({n: s.value for n, s in static})
        obj.__dict__.update(zip(dynamic, children))
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


class _Static:
    """A static leaf keyed by equality (by identity when it is unhashable or compares ambiguously)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        try:
            self._hash = hash((type(value), value))
        except TypeError:
            self._hash = id(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Static):
            return False
        a, b = self.value, other.value
        if a is b:
            return True
        if type(a) is not type(b) or self._hash != other._hash:
            return False
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - arrays inside, or an __eq__ that refuses: identity only
            return False

    def __repr__(self) -> str:
        return f"static({self.value!r})"


def _split(obj, arrays: list):
    """A hashable description of `obj` with its array leaves appended to `arrays` (in order)."""
    if is_array(obj):
        arrays.append(obj)
        return _ARRAY
    if isinstance(obj, types.MethodType):
        return ("method", _Static(obj.__func__), _split(obj.__self__, arrays))
    if isinstance(obj, functools.partial):
        return ("partial", _split(obj.func, arrays), _split(obj.args, arrays), _split(dict(obj.keywords), arrays))
    leaves, treedef = jax.tree_util.tree_flatten(obj)
    if jax.tree_util.treedef_is_leaf(treedef) and len(leaves) == 1 and leaves[0] is obj:
        return _Static(obj)
    return ("tree", treedef, tuple(_split(leaf, arrays) for leaf in leaves))


def _merge(desc, arrays) -> Any:
    """The inverse of `_split`: rebuild from a description and an iterator over (traced) arrays."""
    if desc is _ARRAY:
        return next(arrays)
    if isinstance(desc, _Static):
        return desc.value
    kind = desc[0]
    if kind == "method":
        return types.MethodType(desc[1].value, _merge(desc[2], arrays))
    if kind == "partial":
        return functools.partial(_merge(desc[1], arrays), *_merge(desc[2], arrays), **_merge(desc[3], arrays))
    return jax.tree_util.tree_unflatten(desc[1], [_merge(d, arrays) for d in desc[2]])


def partition(obj) -> tuple[Any, list]:
    """`(static description, array leaves)` of any object (see the module doc)."""
    arrays: list = []
    return _split(obj, arrays), arrays


def combine(desc, arrays: Sequence) -> Any:
    """The object `partition` split (with `arrays` in place of its array leaves)."""
    return _merge(desc, iter(arrays))


class filter_jit:  # noqa: N801 - used as a decorator, like jax.jit
    """`jax.jit(fn)` over arbitrary arguments: arrays traced, the rest static (see the module doc).

    `donate`: positional indices of arguments whose arrays are donated. As a method decorator the
    index counts `self` (argument 0). Keyword arguments are not supported (every argument positional).
    `.lower(*args)` gives the `jax.stages.Lowered` of a call (for ahead-of-time compilation and XLA's
    memory analysis); `.traces` counts how many times `fn` was traced (a new compilation each).
    """

    def __init__(self, fn: Callable, donate: Sequence[int] = ()):
        self.fn = fn
        self.donate = tuple(int(i) for i in donate)
        self.traces = 0
        functools.update_wrapper(self, fn)

        def inner(descs, *arrays):
            self.traces += 1
            args = [combine(d, a) for d, a in zip(descs, arrays)]
            return self.fn(*args)

        self._jitted = jax.jit(inner, static_argnums=0, donate_argnums=tuple(1 + i for i in self.donate))

    def _parts(self, args):
        descs, arrays = zip(*(partition(a) for a in args)) if args else ((), ())
        return tuple(descs), arrays

    def __call__(self, *args):
        descs, arrays = self._parts(args)
        return self._jitted(descs, *arrays)

    def lower(self, *args) -> jax.stages.Lowered:
        descs, arrays = self._parts(args)
        return self._jitted.lower(descs, *arrays)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return _Bound(self, instance)


class _Bound:
    """`filter_jit` bound to an instance (argument 0)."""

    __slots__ = ("jitted", "instance", "__weakref__")  # weak-referenceable: `jax.jit(opt.step)` works

    def __init__(self, jitted: filter_jit, instance):
        self.jitted, self.instance = jitted, instance

    def __call__(self, *args):
        return self.jitted(self.instance, *args)

    def lower(self, *args) -> jax.stages.Lowered:
        return self.jitted.lower(self.instance, *args)

    @property
    def traces(self) -> int:
        return self.jitted.traces


# ----------------------------------------------------------------------------- the process's compiled programs
def memory_maps() -> tuple[int, int] | None:
    """`(memory maps of this process, the kernel's per-process limit vm.max_map_count)`, None off Linux."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except (OSError, ValueError):
        return None


def release_compiled_programs(fraction: float = 0.5, note=print) -> bool:
    """`jax.clear_caches()` when this process holds over `fraction` of the kernel's memory-map limit.

    JAX keeps every program it compiled for the life of the process, and each CPU executable keeps its
    JIT-ed code in memory maps of its own (~2000 for a `gfo train` step and its evaluations). A process
    that runs many trials (a sweep, a notebook, a test session) would pass `vm.max_map_count` and crash
    inside XLA at its next compile (SIGSEGV: the mapping fails). Dropping the caches costs a re-trace and
    re-compile of what is used again (the persistent compilation cache, when on, serves those). Returns
    whether it cleared; `note(message)` is told why."""
    maps = memory_maps()
    if maps is None or maps[0] <= fraction * maps[1]:
        return False
    jax.clear_caches()
    gc.collect()
    after = memory_maps()
    if note is not None:
        note(f"released JAX's compiled programs: this process held {maps[0]} memory maps of the kernel's "
             f"limit {maps[1]} (vm.max_map_count); {after[0] if after else '?'} after")
    return True


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache under `$GFO_CACHE_DIR/jax` (default `~/.cache/gfo/jax`),
    so a restarted or repeated run skips compilation; `GFO_COMPILATION_CACHE=0` turns it off. Returns
    the directory (None when off)."""
    if os.environ.get("GFO_COMPILATION_CACHE", "1").lower() in ("0", "false", "off", "no"):
        return None
    root = os.environ.get("GFO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gfo")
    path = os.path.join(root, "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every step, even a tiny model's
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
