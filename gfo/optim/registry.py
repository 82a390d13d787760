"""One registry of methods: name → optimizer constructor, the config fields it reads, its defaults.

    spec = methods.lookup("lowrank_es")           # a `Method`; any evosax algorithm name works too
    opt = spec.build(section, Context(x0=x0, pop_sharding=None))

`gfo.run.build` (from a config's `optimizer` section) and `gfo.minimize` (from keyword arguments, through
the same `OptimizerSection`) both construct optimizers here, and `gfo.run.config.OPTIMIZER_FIELDS` (which
optimizer fields a method reads; any other one set is an error) is derived from this table. A method's
defaults are the `OptimizerSection` field defaults.

Light at import (no JAX, no evosax): `gfo.run.config` reads the field table before any device exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_TRANSFORM_FIELDS = ("transform", "lr", "momentum", "weight_decay", "options")
_ES_FIELDS = ("sigma", "population", "antithetic", "shaping", "eval_chunk", "groups")
EVOSAX_FIELDS = ("sigma", "population", "eval_chunk", "options", "params")


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
    """A registry row. `family`: estimator (+ optax transform) | optimizer (its own update) | evosax |
    discrete. `objective`: the objective kind its step takes (loss | reward). `domain`: what it searches
    (continuous vectors | tokens: hard-prompt token ids). `splits_population`: members are split over the
    mesh's `pop` axis (so population and chunk should be multiples of it)."""

    name: str
    family: str
    fields: tuple[str, ...]
    make: Callable[[Any, Context], Any]
    objective: str = "loss"
    domain: str = "continuous"
    splits_population: bool = False

    def build(self, section, ctx: Context):
        """The optimizer for `section` (an `OptimizerSection` with `method == self.name`)."""
        return self.make(section, ctx)


def transform(section):
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


def _estimator(name, kwargs: Callable[[Any, Context], dict]):
    """A constructor: the estimator (`name` in `gfo.optim.estimators.ESTIMATORS`, or a class) built from the
    section's fields (`kwargs`) and `options`, followed by the section's optax transform."""
    def make(s, ctx: Context):
        from gfo.optim.estimators import ESTIMATORS
        from gfo.optim.optimizer import Optimizer

        cls = ESTIMATORS[name] if isinstance(name, str) else name
        estimator = cls(**{**kwargs(s, ctx), **s.options})
        return Optimizer(estimator, transform(s))  # every `transform` is elementwise: leaf by leaf

    return make


def estimator_method(name: str, estimator, fields: tuple[str, ...] = (),
                     kwargs: Callable[[Any, Context], dict] = lambda s, c: {}, **row) -> Method:
    """The registry row of a direction estimator class followed by the section's optax transform: it reads
    the transform fields plus `fields` (optimizer-section fields), which `kwargs(section, ctx)` maps to the
    estimator's constructor arguments; `row` sets `objective`, `splits_population`."""
    return Method(name, "estimator", _TRANSFORM_FIELDS + tuple(fields), _estimator(estimator, kwargs), **row)


def register(method: Method, replace: bool = False) -> Method:
    """Add `method` to the registry, so that `optimizer.method: NAME` (configs, `gfo train`, sweeps) and
    `gfo.minimize(method=NAME)` build it. A method defined in its own file registers itself on import;
    a config names such files in `plugins:`. A name already registered is refused (`replace=True`
    overrides it). Returns `method`."""
    if not isinstance(method, Method):
        raise TypeError(f"register: expected a gfo.optim.registry.Method, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is registered already ({METHODS[method.name].family}); "
                         f"choose another name or pass replace=True")
    METHODS[method.name] = method
    return method


def _population(s, ctx: Context) -> dict:
    return dict(population=s.population, sigma=s.sigma, antithetic=s.antithetic, shaping=s.shaping,
                batch_size=s.eval_chunk, pop_sharding=ctx.pop_sharding, groups=s.groups,
                noise_map=tuple(ctx.noise_map or ()))


def _zo_sgd_cons(s, ctx: Context):
    from gfo.optim.estimators import SPSA
    from gfo.optim.search.zo_cons import ZOSGDCons

    return ZOSGDCons(SPSA(**{"eps": s.sigma, "n": s.n, **s.options}), s.lr)


def _randopt(s, ctx: Context):
    from gfo.optim.search.randopt import RandOpt

    return RandOpt(**{"population": s.population, "sigma": s.sigma, "batch_size": s.eval_chunk,
                      "pop_sharding": ctx.pop_sharding, **s.options})


def _discrete(s, ctx: Context):
    from gfo.optim.search.discrete import DiscreteSearch

    return DiscreteSearch(s.method, ctx.vocab, population=s.population, batch_size=s.eval_chunk,
                          pop_sharding=ctx.pop_sharding, **s.options)


def _evosax(name: str):
    def make(s, ctx: Context):
        from gfo.optim.search.strategies import EvosaxStrategy

        return EvosaxStrategy(name, s.population, ctx.x0, options=s.options, params=s.params, init_std=s.sigma,
                              batch_size=s.eval_chunk, pop_sharding=ctx.pop_sharding)

    return make


_ROWS = (
    Method("backprop", "estimator", _TRANSFORM_FIELDS, _estimator("backprop", lambda s, c: {})),
    Method("spsa", "estimator", _TRANSFORM_FIELDS + ("sigma", "n"),
           _estimator("spsa", lambda s, c: dict(eps=s.sigma, n=s.n))),
    Method("forward_grad", "estimator", _TRANSFORM_FIELDS + ("n",), _estimator("forward_grad", lambda s, c: dict(n=s.n))),
    Method("es", "estimator", _TRANSFORM_FIELDS + _ES_FIELDS, _estimator("es", _population), splits_population=True),
    Method("lowrank_es", "estimator", _TRANSFORM_FIELDS + _ES_FIELDS + ("rank",),
           _estimator("lowrank_es", lambda s, c: dict(_population(s, c), rank=s.rank)),
           splits_population=True),
    Method("policy_gradient", "estimator", _TRANSFORM_FIELDS + ("kl_coef", "group_size"),
           _estimator("policy_gradient", lambda s, c: dict(kl_coef=s.kl_coef)), objective="reward"),
    Method("lozo", "estimator", _TRANSFORM_FIELDS + ("sigma", "n", "rank"),
           _estimator("lozo", lambda s, c: dict(eps=s.sigma, n=s.n, rank=s.rank))),
    Method("hizoo", "estimator", _TRANSFORM_FIELDS + ("sigma",), _estimator("hizoo", lambda s, c: dict(eps=s.sigma))),
    Method("mezo_svrg", "estimator", _TRANSFORM_FIELDS + ("sigma",),
           _estimator("mezo_svrg", lambda s, c: dict(eps=s.sigma))),
    Method("zo_sgd_cons", "optimizer", ("sigma", "n", "lr", "options"), _zo_sgd_cons),
    Method("randopt", "optimizer", ("sigma", "population", "eval_chunk", "options"), _randopt, splits_population=True),
    *(Method(m, "discrete", ("population", "eval_chunk", "options"), _discrete, domain="tokens",
             splits_population=True) for m in ("annealing", "tabu", "aco")),
)
METHODS: dict[str, Method] = {m.name: m for m in _ROWS}
DISCRETE = tuple(m.name for m in _ROWS if m.domain == "tokens")
# `gfo.minimize` names: (registry method, transform) — the optax baselines and zeroth-order variants.
MINIMIZE_ALIASES: dict[str, tuple[str, str]] = {
    "adam": ("backprop", "adam"), "sgd": ("backprop", "sgd"), "spsa": ("spsa", "sgd"), "zo_sgd": ("spsa", "sgd"),
    "mezo": ("spsa", "sgd"), "zo_adam": ("spsa", "adam"), "forward_grad": ("forward_grad", "sgd"),
    "es": ("es", "adam"), "open_es": ("es", "adam"), "lowrank_es": ("lowrank_es", "adam"),
}
# Short evosax names accepted by `gfo.minimize` and configs.
EVOSAX_ALIASES = {"de": "DifferentialEvolution", "ga": "GA", "simulated_annealing": "SimulatedAnnealing",
                  "cma": "CMA_ES", "sep_cma": "Sep_CMA_ES"}


def fields(method: str) -> tuple[str, ...]:
    """The optimizer fields `method` reads (a method not in the table is an evosax strategy)."""
    row = METHODS.get(method)
    return row.fields if row is not None else EVOSAX_FIELDS


def lookup(method: str) -> Method:
    """The registry row of `method`: a listed method, or an evosax algorithm by (case-insensitive) name.
    Unknown names raise `ValueError` listing both."""
    if method in METHODS:
        return METHODS[method]
    from gfo.optim.search.strategies import resolve_name

    try:
        name = resolve_name(EVOSAX_ALIASES.get(method.lower(), method))
    except ValueError as e:
        raise ValueError(f"optimizer.method={method!r}: not a gfo method ({sorted(METHODS)}) nor an evosax "
                         f"strategy. {e}") from None
    return Method(name, "evosax", EVOSAX_FIELDS, _evosax(name), splits_population=True)
