"""The two declared kinds of objective, and an objective over a space's points.

1. A **loss** (the default): any callable `f(x, batch, key) -> scalar` — minimised; rewards enter
   negated. A plain function or closure works; arrays it should receive as traced arguments rather
   than compile-time constants live in pytree objects (`OnSpace` below, the spaces of `gfo.spaces`).
2. A **reward task** (`RewardObjective`): offers `sample(x, batch, key)` (a rollout with a `reward`
   field `[B, G]`, higher is better) and `log_prob(x, batch, rollout) -> [B, G]`, and a `reference`
   point for a KL term; `gfo.rollout.GenerationReward` is one, and is also a loss (`−mean reward`).

An estimator declares the kind it takes with a class attribute `objective_kind` ("loss" by default;
`PolicyGradient`: "reward"); `gfo.run.build` builds the matching objective from the task, and a step
given the wrong kind fails at build time with the method's name.

An objective also declares whether a perturbed point may reach it as *descriptors*
(`leaf_descriptors`, `accepts_descriptors`): `models.linear.NoisyLeaf` / `LowRankKernel` leaves that the
model expands inside its forward, layer by layer, so that no perturbed copy of the parameters exists.
`OnSpace` over a space whose `to_params` passes leaves through (`Space.lowrank_ok`: `Full`) does — its
loss hands the parameters to a gfo model; a bare function does not (it may compute on the leaves), and
gets plain perturbed arrays. The zeroth-order and population estimators read it (their `factored=None`),
so a script gets the in-forward perturbation from what it built, not from a flag.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import jax

from gfo.jitting import register_object_pytree

KINDS = ("loss", "reward")


@runtime_checkable
class RewardObjective(Protocol):
    """What `PolicyGradient` needs of a task: sample, score, and re-score completions.

    `sample(x, batch, key)` returns a rollout (any pytree) with a `reward` field `[B, G]` (higher is
    better); `log_prob(x, batch, rollout)` returns the summed log-probabilities `[B, G]` of the sampled
    completions under `x`, differentiably; `reference` (may be None) is the parameter point of the KL term.
    """

    reference: Any

    def sample(self, x, batch, key) -> Any: ...

    def log_prob(self, x, batch, rollout) -> jax.Array: ...


def objective_kind_of(estimator) -> str:
    """The objective kind an estimator declares (`gfo.optim.protocol.Estimator.objective_kind`), checked."""
    kind = estimator.objective_kind
    if kind not in KINDS:
        raise ValueError(f"{estimator!r} declares objective_kind={kind!r}: expected one of {KINDS}")
    return kind


def accepts_descriptors(objective) -> bool:
    """Whether `objective` declares that its `x` may hold perturbation descriptors (`NoisyLeaf`,
    `LowRankKernel`) instead of arrays: its `leaf_descriptors` attribute (False when absent: a plain
    function of `x` gets plain arrays)."""
    return bool(getattr(objective, "leaf_descriptors", False))


def check_kind(objective, kind: str, who: str) -> None:
    """Raise when `objective` is not of `kind` (a reward method given a bare loss, or a non-callable)."""
    if kind == "reward" and not isinstance(objective, RewardObjective):
        raise TypeError(f"{who} needs a reward objective (sample / log_prob / reference, e.g. "
                        f"gfo.rollout.GenerationReward); got {type(objective).__name__}")
    if kind == "loss" and not callable(objective):
        raise TypeError(f"{who} needs a loss objective f(x, batch, key) -> scalar; got {type(objective).__name__}")


class OnSpace:
    """`loss(space.to_params(x), batch, key)`: a loss over model parameters as a loss over a space.

    A pytree: the space (with its frozen base weights, projections, keys) is a child, so a jitted step
    receives those weights as arguments; `loss` (a function of parameters) is static.

    `loss` is expected to read the parameters through a gfo model (`apply`, `token_logprobs`,
    `models.completion_logprobs`, a task's objective), which accepts perturbation descriptors as kernel
    leaves: so over a space that passes leaves through (`Full`) the objective declares
    `leaf_descriptors`, and ES / SPSA draw their noise inside the forward. A loss that computes on the
    parameter arrays itself (an L2 penalty, a norm) passes `descriptors=False`.
    """

    def __init__(self, loss: Callable, space, descriptors: bool = True):
        self.loss, self.space = loss, space
        self.leaf_descriptors = bool(descriptors and getattr(space, "lowrank_ok", False))

    def __call__(self, x, batch, key) -> jax.Array:
        return self.loss(self.space.to_params(x), batch, key)

    def __repr__(self) -> str:
        return f"OnSpace({self.loss!r}, {type(self.space).__name__})"


register_object_pytree(OnSpace)
