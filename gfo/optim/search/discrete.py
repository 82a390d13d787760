"""Discrete search over token sequences (hard prompts): simulated annealing, tabu search, ant colony.

Two ways in:

    opt = DiscreteSearch("tabu", vocab, proposals=16)        # the gfo optimizer protocol, jitted:
    state = opt.init(key, x0)                                # x0: int32 [L] token ids from `vocab`
    state, metrics = opt.step(state, objective, batch, key)  # objective(tokens [L], batch, key) -> loss
    tokens = opt.solution(state)                             # the current sequence
    tokens = opt.best_solution(state)                        # the best sequence found

    res = gfo.optim.search.discrete.search(loss, initial, vocab, method="annealing", steps=100, key=key)   # one call

`gfo train` reaches them with `space: {kind: hard_prompt, n_tokens: L, vocab: [...]}` and
`optimizer: {method: annealing | tabu | aco, population: <proposals or ants>, options: {...}}`.

Every step evaluates, on the step's batch, the current sequence, the best one so far and `population`
candidates (so acceptance compares losses on the same data even when batches change), split over the
mesh's `pop` axis like any population. A move sets one position to one vocabulary token.
- `annealing` (Kirkpatrick et al. 1983): the best of the proposed moves is accepted with Metropolis
  probability `min(1, exp(−Δ/T))`, geometric cooling `T_k = t0 · cooling^k`.
- `tabu` (Glover 1986): the best proposed move that is not tabu, unless it beats the best loss
  (aspiration), is taken even when worse; undoing it is tabu for `tenure` steps (a `[L, |vocab|]` table
  of expiry steps).
- `aco` (Dorigo et al. 1996): a pheromone table `τ [L, |vocab|]`; `population` ants draw sequences with
  probability `∝ τ^alpha`; evaporation `τ ← (1−ρ) τ`; each ant deposits `Q / cost` on its choices, with
  `cost = loss − min(losses, best) + 1 > 0` (Q = `deposit`, ρ = `evaporation`).
`prompt_objective` turns any task with `prompt`/`prompt_mask` batches into a batched loss over a hard
prompt prepended to every example (for `search`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gfo.optim.evaluate import evaluate_population
from gfo.jitting import filter_jit
from gfo.optim.protocol import fresh, replicated_sharding
from gfo.optim.registry import Method, register
from gfo.optim.sections import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, MethodSection, knob

METHODS = ("annealing", "tabu", "aco")


@struct.dataclass
class DiscreteState:
    current: jax.Array  # int32 [L] vocabulary indices of the current sequence
    best: jax.Array  # int32 [L] vocabulary indices of the best sequence found
    best_loss: jax.Array  # float32, its loss on the latest batch
    tabu: jax.Array  # int32 [L, V]: step until which setting (position, index) is tabu (tabu search)
    pheromone: jax.Array  # float32 [L, V] (ant colony)
    step: jax.Array  # int32


@dataclasses.dataclass(frozen=True)
class DiscreteSearch:
    """A discrete local search over sequences of vocabulary tokens (see the module doc)."""

    method: str
    vocab: tuple  # allowed token ids
    population: int = 16  # proposals per step (annealing, tabu) or ants (aco)
    t0: float = 0.1
    cooling: float = 0.97
    tenure: int = 10
    evaporation: float = 0.1
    alpha: float = 1.0
    deposit: float = 1.0
    batch_size: int | None = None  # members evaluated at once
    pop_sharding: Any = None

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(int(v) for v in self.vocab))
        if self.method not in METHODS:
            raise ValueError(f"discrete search method={self.method!r}: expected one of {METHODS}")
        if not self.vocab:
            raise ValueError("discrete search needs a non-empty vocab")
        if self.population < 1 or self.tenure < 0:
            raise ValueError(f"population={self.population} must be >= 1 and tenure={self.tenure} >= 0")
        if not 0 < self.cooling <= 1 or not 0 <= self.evaporation < 1 or self.t0 <= 0:
            raise ValueError(f"need t0 > 0 (got {self.t0}), 0 < cooling <= 1 (got {self.cooling}), "
                             f"0 <= evaporation < 1 (got {self.evaporation})")

    def __repr__(self) -> str:
        return f"DiscreteSearch({self.method!r}, |vocab|={len(self.vocab)}, population={self.population})"

    @property
    def evaluations_per_step(self) -> int:
        return self.population + 2

    def init(self, key: jax.Array, x0) -> DiscreteState:
        del key
        x0 = np.asarray(x0)
        lookup = {t: i for i, t in enumerate(self.vocab)}
        missing = sorted({int(t) for t in x0.ravel()} - set(lookup))
        if x0.ndim != 1 or missing:
            raise ValueError(f"the initial sequence must be 1-D token ids from vocab (shape {x0.shape}; "
                             f"not in vocab: {missing[:5]})")
        idx = jnp.asarray([lookup[int(t)] for t in x0], jnp.int32)
        L, V = idx.shape[0], len(self.vocab)
        return fresh(DiscreteState(current=idx, best=idx, best_loss=jnp.asarray(jnp.inf, jnp.float32),
                                   tabu=jnp.zeros((L, V), jnp.int32), pheromone=jnp.ones((L, V), jnp.float32),
                                   step=jnp.zeros((), jnp.int32)))

    def solution(self, state: DiscreteState) -> jax.Array:
        """The current sequence (token ids `[L]` int32); an ant colony's latest best ant."""
        return jnp.asarray(self.vocab, jnp.int32)[state.current]

    def best_solution(self, state: DiscreteState) -> jax.Array:
        """The best sequence found so far (token ids `[L]` int32; the initial one before the first step)."""
        return jnp.asarray(self.vocab, jnp.int32)[state.best]

    def lower(self, state: DiscreteState, objective: Callable, batch, key: jax.Array) -> jax.stages.Lowered:
        """The lowered step for these arguments (ahead-of-time compilation, XLA's memory analysis)."""
        return self.step.lower(state, objective, batch, key)

    def state_sharding(self, state: DiscreteState, mesh):
        """Replicated: `[L]` sequences and `[L, |vocab|]` tables, not parameter-shaped."""
        return replicated_sharding(state, mesh)

    def _moves(self, key, current):
        """`population` single-position changes of `current`: candidates `[P, L]`, positions, indices."""
        k_pos, k_tok = jax.random.split(key)
        L, P = current.shape[0], self.population
        positions = jax.random.randint(k_pos, (P,), 0, L)
        indices = jax.random.randint(k_tok, (P,), 0, len(self.vocab))
        return current[None].repeat(P, 0).at[jnp.arange(P), positions].set(indices), positions, indices

    @functools.partial(filter_jit, donate=(1,))
    def step(self, state: DiscreteState, objective: Callable, batch, key: jax.Array):
        """One move (see the module doc); `state` is donated: keep only the returned state."""
        k_move, k_accept, k_eval = jax.random.split(key, 3)
        vocab = jnp.asarray(self.vocab, jnp.int32)
        if self.method == "aco":
            logits = self.alpha * jnp.log(state.pheromone)  # p ∝ τ^α per position
            candidates = jax.random.categorical(k_move, logits, axis=-1, shape=(self.population,) + logits.shape[:1])
        else:
            candidates, positions, indices = self._moves(k_move, state.current)
        members = jnp.concatenate([state.current[None], state.best[None], candidates])
        losses, metrics = evaluate_population(lambda i: objective(vocab[members[i]], batch, k_eval),
                                              self.population + 2, batch_size=self.batch_size,
                                              pop_sharding=self.pop_sharding)
        finite = jnp.isfinite(losses)
        clean = jnp.where(finite, losses, jnp.inf)  # a non-finite candidate never wins
        f_current, f_best_now, values = clean[0], clean[1], clean[2:]
        i = jnp.argmin(values)
        current, tabu, pheromone = state.current, state.tabu, state.pheromone
        if self.method == "annealing":
            temperature = self.t0 * self.cooling ** state.step.astype(jnp.float32)
            delta = values[i] - f_current
            accept = (delta <= 0) | (jax.random.uniform(k_accept) < jnp.exp(-delta / temperature))
            current = jnp.where(accept, candidates[i], current)
        elif self.method == "tabu":
            admissible = (tabu[positions, indices] <= state.step) | (values < f_best_now)  # aspiration
            j = jnp.argmin(jnp.where(admissible, values, jnp.inf))
            move = admissible[j] & jnp.isfinite(values[j])
            undo = tabu.at[positions[j], current[positions[j]]].set(state.step + 1 + self.tenure)
            tabu = jnp.where(move, undo, tabu)
            current = jnp.where(move, candidates[j], current)
        else:  # aco
            pheromone = pheromone * (1.0 - self.evaporation)
            offset = jnp.minimum(f_best_now, jnp.min(values)) - 1.0
            amount = jnp.where(jnp.isfinite(values), self.deposit / (values - offset), 0.0)
            L = candidates.shape[1]
            pheromone = pheromone.at[jnp.broadcast_to(jnp.arange(L), candidates.shape), candidates].add(
                jnp.broadcast_to(amount[:, None], candidates.shape))
            current = candidates[i]
        improved = values[i] < f_best_now
        best = jnp.where(improved, candidates[i], state.best)
        best_loss = jnp.minimum(values[i], f_best_now)
        new = DiscreteState(current=current, best=best, best_loss=best_loss, tabu=tabu, pheromone=pheromone,
                            step=state.step + 1)
        return new, {**metrics, "best_loss": best_loss}


@dataclasses.dataclass
class SearchResult:
    tokens: np.ndarray  # [L] best sequence found
    fun: float  # its loss
    history: np.ndarray  # [steps] best loss up to each step
    evaluations: int


def search(loss: Callable[[jax.Array], jax.Array], initial, vocab, method: str = "annealing", steps: int = 100,
           key: jax.Array | None = None, proposals: int = 16, ants: int | None = None, **options) -> SearchResult:
    """Minimise a batched `loss(tokens [N, L]) -> [N]` over sequences of the length of `initial`.

    `proposals` (annealing, tabu) or `ants` (aco) candidates per step; `options` are the other
    `DiscreteSearch` fields (`t0`, `cooling`, `tenure`, `evaporation`, `alpha`, `deposit`).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    population = (ants or proposals) if method == "aco" else proposals
    opt = DiscreteSearch(method, tuple(np.asarray(vocab).tolist()), population=population, **options)
    key = jax.random.key(0) if key is None else key
    state = opt.init(key, initial)
    objective = _BatchedLoss(loss)
    history = []
    for t in range(steps):
        state, metrics = opt.step(state, objective, None, jax.random.fold_in(key, t))
        history.append(float(metrics["best_loss"]))
    return SearchResult(tokens=np.asarray(opt.best_solution(state)), fun=history[-1], history=np.asarray(history),
                        evaluations=steps * opt.evaluations_per_step)


@dataclasses.dataclass(frozen=True)
class _BatchedLoss:
    """`objective(tokens [L], batch, key)` from a batched `loss(tokens [N, L]) -> [N]`."""

    loss: Callable

    def __call__(self, tokens, batch, key):
        return self.loss(tokens[None])[0]


def prompt_objective(task, model, params, batch: dict, objective: str | None = None) -> Callable:
    """`loss(prompts [N, L]) -> [N]`: the task objective on `batch` with each hard prompt prepended.

    The prompt goes before the (left-padded) example; padding stays masked, and position ids count real
    tokens only, so the prompt is read as if it were the start of every example.
    """
    if "prompt" not in batch:
        raise ValueError(f"task {task.name!r} has no 'prompt' in its batches; prompt search needs a prompted task")
    fn = task.objective(objective, model, lambda x: x)
    batch = jax.tree.map(jnp.asarray, batch)

    def one(prompt):
        B = batch["prompt"].shape[0]
        p = jnp.broadcast_to(prompt, (B, prompt.shape[0]))
        prompted = {**batch, "prompt": jnp.concatenate([p, batch["prompt"]], axis=1),
                    "prompt_mask": jnp.concatenate([jnp.ones_like(p), batch["prompt_mask"]], axis=1)}
        return fn(params, prompted, jax.random.key(0))

    return jax.jit(jax.vmap(one))


@dataclasses.dataclass
class DiscreteSection(MethodSection):
    """A discrete search over a `hard_prompt` space's token ids."""

    population: int = knob(16, AT_LEAST_ONE, "proposals per step (annealing, tabu) or ants (aco)")
    eval_chunk: int | None = knob(None, AT_LEAST_ONE, "proposals evaluated at once (None: planned from memory)")


@dataclasses.dataclass
class AnnealingSection(DiscreteSection):
    t0: float = knob(0.1, POSITIVE, "initial temperature (loss units)")
    cooling: float = knob(0.97, POSITIVE, "temperature factor per step, in (0, 1]")


@dataclasses.dataclass
class TabuSection(DiscreteSection):
    tenure: int = knob(10, NON_NEGATIVE, "steps a changed position stays tabu")


@dataclasses.dataclass
class ACOSection(DiscreteSection):
    evaporation: float = knob(0.1, NON_NEGATIVE, "pheromone evaporation per step, in [0, 1)")
    alpha: float = knob(1.0, NON_NEGATIVE, "pheromone exponent")
    deposit: float = knob(1.0, POSITIVE, "pheromone deposited by the best ant")


def _builder(section: type):
    own = [f for f in section.field_names() if f not in DiscreteSection.field_names()]

    def build(s, ctx):
        return DiscreteSearch(s.method, ctx.vocab, population=s.population, batch_size=s.eval_chunk,
                              pop_sharding=ctx.pop_sharding, **{f: getattr(s, f) for f in own})

    return build


for _name, _section in (("annealing", AnnealingSection), ("tabu", TabuSection), ("aco", ACOSection)):
    register(Method(_name, "discrete", _section, _builder(_section), domain="tokens", splits_population=True))
