"""One registry of methods: name → its typed config section and the constructor that builds it.

    spec = registry.lookup("lowrank_es")          # a `Method`; any evosax algorithm name works too
    opt = spec.build(section, Context(x0=x0, pop_sharding=None))

A method is one file: its estimator (or optimizer), its config section (`gfo.optim.sections`: fields,
defaults, ranges, docs) and the line that registers both (`register(estimator_method(NAME, Cls, Section))`).
The in-tree methods register exactly as a plugin does, from their own modules (`BUILTIN_MODULES`, imported on
the first lookup); a config names its own files in `plugins:`. `gfo.run.build` (from a config's `optimizer`
section) and `gfo.minimize` (from keyword arguments) both construct optimizers here, and `gfo.run.config`
reads each `optimizer:` section into its method's section class.

Light at import (no JAX): `gfo.run.config` imports it before any device exists; the method modules are
imported (JAX, no device) at the first lookup, evosax only when an evosax strategy is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, Callable

from gfo.optim.sections import EvosaxSection, MethodSection, TransformSection

# The modules that register gfo's own methods (each file registers the methods it defines).
BUILTIN_MODULES = ("gfo.optim.estimators", "gfo.optim.search.randopt", "gfo.optim.search.zo_cons",
                   "gfo.optim.search.discrete")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a constructor may need beyond the config section: the start point `x0` (a pytree), the
    mesh's `pop` sharding, the space's token vocabulary (token-domain methods) and its per-leaf noise map.
    (Whether a perturbation reaches the model as descriptors is the objective's to declare, not the
    constructor's: `gfo.objectives.accepts_descriptors`.)"""

    x0: Any
    pop_sharding: Any = None
    vocab: tuple | None = None
    noise_map: tuple = ()


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry row. `section`: its config section class (a `gfo.optim.sections.MethodSection`).
    `family`: estimator (+ optax transform) | optimizer (its own update) | evosax | discrete. `objective`: the
    objective kind its step takes (loss | reward). `domain`: what it searches (continuous vectors | tokens:
    hard-prompt token ids). `splits_population`: members are split over the mesh's `pop` axis (so population
    and chunk should be multiples of it). `reads_noise_map`: it perturbs per leaf kind (`space.noise_map`).
    `dense_members`: a member holds a perturbed copy of the searched point (low-rank ES holds factors), which
    the chunk planner counts."""

    name: str
    family: str
    section: type
    make: Callable[[Any, Context], Any]
    objective: str = "loss"
    domain: str = "continuous"
    splits_population: bool = False
    reads_noise_map: bool = False
    dense_members: bool = True

    def __post_init__(self):
        if not (isinstance(self.section, type) and issubclass(self.section, MethodSection)):
            raise TypeError(f"method {self.name!r}: section must be a gfo.optim.sections.MethodSection subclass, "
                            f"got {self.section!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        """The optimizer fields a config may set for this method (besides `method`)."""
        return self.section.field_names()

    def build(self, section, ctx: Context):
        """The optimizer for `section` (an instance of `self.section` with `method == self.name`)."""
        return self.make(section, ctx)


def transform(section: TransformSection):
    """The optax transformation of an estimator method's section. Every one of them is elementwise, so the
    noise estimators' updates may run leaf by leaf (`gfo.optim.update.leafwise_update`)."""
    import optax

    from gfo.errors import ConfigError

    s = section
    if s.transform == "adam":
        return optax.adam(s.lr)
    if s.transform == "adamw":
        return optax.adamw(s.lr, weight_decay=s.weight_decay)
    if s.transform == "adam_l2":  # OpenAI-ES: Adam on g + l2·x (coupled L2, not AdamW's decoupled decay)
        return optax.chain(optax.add_decayed_weights(s.weight_decay), optax.adam(s.lr))
    if s.transform == "sgd":
        return optax.sgd(s.lr, momentum=s.momentum or None)
    raise ConfigError(f"optimizer.transform={s.transform!r} is unknown: expected adam, adamw, adam_l2 or sgd")


# Section fields whose estimator argument has another name (the section says what the field means).
_ESTIMATOR_NAMES = {"eval_chunk": "batch_size"}


def _parameters(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    import inspect

    return set(inspect.signature(cls).parameters)


def estimator_method(name: str, estimator, section: type = TransformSection, read_elsewhere: tuple[str, ...] = (),
                     **row) -> Method:
    """The registry row of direction estimator class `estimator` followed by the section's optax transform.
    Every field `section` adds to `TransformSection` is passed to the estimator's argument of that name
    (`eval_chunk` → `batch_size`), except those in `read_elsewhere` (e.g. policy gradient's `group_size`, read
    by the objective); the mesh's `pop_sharding` and the space's `noise_map` are passed to an estimator that
    takes them. A section field the estimator does not take is a `TypeError` here, at registration.
    `row` sets `objective`, `splits_population`."""
    own = [f for f in section.field_names() if f not in TransformSection.field_names() and f not in read_elsewhere]
    accepted = _parameters(estimator)
    missing = [f for f in own if _ESTIMATOR_NAMES.get(f, f) not in accepted]
    if missing:
        raise TypeError(f"method {name!r}: section {section.__name__} fields {missing} are not arguments of "
                        f"{getattr(estimator, '__name__', estimator)} (list them in read_elsewhere if read elsewhere)")
    context = [k for k in ("pop_sharding", "noise_map") if k in accepted]

    def make(s, ctx: Context):
        from gfo.optim.optimizer import Optimizer

        kwargs = {_ESTIMATOR_NAMES.get(f, f): getattr(s, f) for f in own}
        kwargs.update({k: (tuple(ctx.noise_map or ()) if k == "noise_map" else ctx.pop_sharding) for k in context})
        return Optimizer(estimator(**kwargs), transform(s))  # every `transform` is elementwise: leaf by leaf

    return Method(name, "estimator", section, make, **{"reads_noise_map": "noise_map" in accepted, **row})


_TABLE: dict[str, Method] = {}
_LOADED: list[bool] = [False]


def _load_builtins() -> None:
    """Import the in-tree method modules once (they register themselves)."""
    if not _LOADED[0]:
        _LOADED[0] = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


class _Methods(Mapping):
    """name → `Method`, the in-tree methods loaded on first use, plugins as they register."""

    def __getitem__(self, name: str) -> Method:
        _load_builtins()
        return _TABLE[name]

    def __iter__(self):
        _load_builtins()
        return iter(dict(_TABLE))

    def __len__(self) -> int:
        _load_builtins()
        return len(_TABLE)


METHODS: Mapping[str, Method] = _Methods()


def register(method: Method, replace: bool = False) -> Method:
    """Add `method` to the registry, so that `optimizer.method: NAME` (configs, `gfo train`, sweeps) and
    `gfo.minimize(method=NAME)` build it. A method defined in its own file registers itself on import;
    a config names such files in `plugins:`. A name already registered is refused (`replace=True`
    overrides it). Returns `method`."""
    if not isinstance(method, Method):
        raise TypeError(f"register: expected a gfo.optim.registry.Method, got {type(method).__name__}")
    if method.name in _TABLE and not replace:
        raise ValueError(f"method {method.name!r} is registered already ({_TABLE[method.name].family}); "
                         f"choose another name or pass replace=True")
    _TABLE[method.name] = method
    return method


def discrete_methods() -> tuple[str, ...]:
    """The registered methods that search token ids (a `hard_prompt` space)."""
    return tuple(m.name for m in METHODS.values() if m.domain == "tokens")


# `gfo.minimize` names: (registry method, transform) — the optax baselines and zeroth-order variants.
MINIMIZE_ALIASES: dict[str, tuple[str, str]] = {
    "adam": ("backprop", "adam"), "sgd": ("backprop", "sgd"), "spsa": ("spsa", "sgd"), "zo_sgd": ("spsa", "sgd"),
    "mezo": ("spsa", "sgd"), "zo_adam": ("spsa", "adam"), "forward_grad": ("forward_grad", "sgd"),
    "es": ("es", "adam"), "open_es": ("es", "adam"), "lowrank_es": ("lowrank_es", "adam"),
}
# Short evosax names accepted by `gfo.minimize` and configs.
EVOSAX_ALIASES = {"de": "DifferentialEvolution", "ga": "GA", "simulated_annealing": "SimulatedAnnealing",
                  "cma": "CMA_ES", "sep_cma": "Sep_CMA_ES"}


def _evosax(name: str):
    def make(s, ctx: Context):
        from gfo.optim.search.strategies import EvosaxStrategy

        return EvosaxStrategy(name, s.population, ctx.x0, options=s.options, params=s.params, init_std=s.sigma,
                              batch_size=s.eval_chunk, pop_sharding=ctx.pop_sharding)

    return make


def section_of(method: str) -> type:
    """The config section class of `method` (a registered method or an evosax strategy name)."""
    return lookup(method).section


def lookup(method: str) -> Method:
    """The registry row of `method`: a listed method, or an evosax algorithm by (case-insensitive) name.
    Unknown names raise `ValueError` listing both."""
    if method in METHODS:
        return METHODS[method]
    if not isinstance(method, str):
        raise ValueError(f"optimizer.method={method!r}: expected a method name (a string)")
    from gfo.optim.search.strategies import resolve_name

    try:
        name = resolve_name(EVOSAX_ALIASES.get(method.lower(), method))
    except ValueError as e:
        raise ValueError(f"optimizer.method={method!r}: not a gfo method ({sorted(METHODS)}) nor an evosax "
                         f"strategy. {e}") from None
    return Method(name, "evosax", EvosaxSection, _evosax(name), splits_population=True)
