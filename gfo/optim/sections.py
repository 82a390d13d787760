"""Typed config sections of the methods: a method's fields, defaults, ranges and docs, in one class.

A config's `optimizer:` section is read into the section class of its `method`, which the method's own file
declares next to its estimator and registers with it (`gfo.optim.registry.register`):

    @dataclasses.dataclass
    class SPSASection(TransformSection):
        eps: float = knob(1e-3, POSITIVE, "perturbation size ε: the loss is read at x ± ε z")
        n: int = knob(1, AT_LEAST_ONE, "queries (directions) per step")

Any field a method does not declare is an error naming the fields it has (nothing is silently ignored);
`sigma` is the search distribution's scale σ (ES, evosax, RandOpt), SPSA-family methods perturb by `eps`.
The shared parts are classes of their own: `TransformSection` (the optax transform that applies an
estimator's direction) and `PopulationSection` (an ES population: σ, size, shaping, chunk).

Light at import (no JAX): configs are read before any device exists.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

# (test, expected) pairs: a field's range, checked when a config is read.
AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
POSITIVE = (lambda v: v > 0, "a number > 0")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
UNIT_INTERVAL = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def knob(default, check: tuple | None = None, doc: str = ""):
    """A section field: its default, its range `check` (a `(test, expected)` pair or None) and its doc."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"check": check, "doc": doc})
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


@dataclasses.dataclass
class MethodSection:
    """The base of every method's section: `method`, the registered name it was read for."""

    method: str = "lowrank_es"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields a config may set besides `method`."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "method")

    @classmethod
    def describe(cls) -> dict[str, str]:
        """field → its doc (with the default), for `--help`-style listings and error messages."""
        return {f.name: f"{f.metadata.get('doc', '')} (default {f.default!r})".strip()
                for f in dataclasses.fields(cls) if f.name != "method"}

    def check_ranges(self, where: str = "optimizer") -> None:
        """Every field within its declared range; a `ConfigError` naming the key, the value and the range."""
        from gfo.errors import ConfigError

        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None and not check[0](value):
                raise ConfigError(f"config key '{where}.{f.name}' = {value!r} is invalid: expected {check[1]}")


# Transform fields that only one transform reads (setting them for another is an error).
TRANSFORM_ONLY = {"momentum": ("sgd",), "weight_decay": ("adamw", "adam_l2")}


@dataclasses.dataclass
class TransformSection(MethodSection):
    """An estimator's direction applied by an optax transform (every one of them elementwise, so the
    update runs leaf by leaf: `gfo.optim.update.leafwise_update`)."""

    transform: Literal["adam", "adamw", "adam_l2", "sgd"] = "adam"  # adam_l2: OpenAI-ES (coupled L2)
    lr: float = knob(1e-2, POSITIVE, "learning rate")
    momentum: float = knob(0.0, NON_NEGATIVE, "sgd momentum")
    weight_decay: float = knob(0.0, NON_NEGATIVE, "adamw decoupled decay / adam_l2 coupled L2")


@dataclasses.dataclass
class PopulationSection(TransformSection):
    """An ES population: members `x + σ ε_i`, fitness shaped across members, evaluated `eval_chunk` at once."""

    sigma: float = knob(1e-2, POSITIVE, "noise scale σ of the members x + σ ε")
    population: int = knob(16, AT_LEAST_ONE, "members per step (antithetic pairs count twice)")
    antithetic: bool = knob(True, None, "members in ± pairs")
    shaping: Literal["centered_ranks", "z_score", "z_score_var", "raw"] = "centered_ranks"  # z_score_var: EGGROLL
    groups: int = knob(1, AT_LEAST_ONE, "member groups, each on its own slice of the batch, shaped within")
    eval_chunk: Optional[int] = knob(None, AT_LEAST_ONE, "members evaluated at once (None: planned from memory)")


@dataclasses.dataclass
class EvosaxSection(MethodSection):
    """An evosax strategy (any name in its catalogue): `options` are the strategy's constructor arguments and
    `params` fields of its params dataclass — both checked against evosax's own signature when built."""

    sigma: float = knob(1e-2, POSITIVE, "initial search scale (evosax std_init)")
    population: int = knob(16, AT_LEAST_ONE, "population size")
    eval_chunk: Optional[int] = knob(None, AT_LEAST_ONE, "members evaluated at once (None: planned from memory)")
    options: dict = knob({}, None, "evosax constructor arguments, e.g. {elite_ratio: 0.5}")
    params: dict = knob({}, None, "evosax params fields, e.g. {c_mean: 1.0}")


# The flat `optimizer` section of configs written before the typed sections (every saved config.yaml spelled
# out all of these): a field the method does not read may still appear at this default (it changed nothing).
LEGACY_DEFAULTS = {"transform": "adam", "lr": 1e-2, "momentum": 0.0, "weight_decay": 0.0, "sigma": 1e-2,
                   "population": 16, "rank": 1, "antithetic": True, "shaping": "centered_ranks", "groups": 1,
                   "eval_chunk": None, "n": 1, "kl_coef": 0.0, "group_size": 4, "options": {}, "params": {}}
