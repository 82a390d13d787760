"""Discrete search over token sequences (hard prompts): simulated annealing, tabu search, ant colony.

    res = gfo.discrete.search(loss, initial, vocab, method="annealing", steps=100, key=key)
    res.tokens, res.fun, res.history     # best sequence, its loss, best-so-far loss per step

`loss(tokens [N, L] int32) -> [N]` scores a batch of candidate sequences (minimised; jit it: every step
evaluates one batch). `vocab` lists the tokens allowed at any position. A move sets one position to one
vocabulary token.
- `annealing` (Kirkpatrick et al. 1983): `proposals` random moves per step, the best of them accepted
  with Metropolis probability `min(1, exp(−Δ/T))`, geometric cooling `T_k = T_0 α^k`.
- `tabu` (Glover 1986): the best of `proposals` sampled moves that is not tabu, unless it beats the best
  loss so far (aspiration); a move stays tabu for `tenure` steps.
- `aco` (Dorigo et al. 1996): a pheromone table `τ [L, |vocab|]`; `ants` sequences per step drawn with
  probability `∝ τ^α`, evaporation `τ ← (1−ρ) τ`, each ant deposits `Q / cost` on its choices, with
  `cost = loss − (best loss seen) + 1 > 0`.
`prompt_objective` turns any task with `prompt`/`prompt_mask` batches into such a loss over a hard prompt
prepended to every example.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("annealing", "tabu", "aco")


@dataclasses.dataclass
class SearchResult:
    tokens: np.ndarray  # [L] best sequence found
    fun: float  # its loss
    history: np.ndarray  # [steps] best loss up to each step
    evaluations: int


def _moves(rng: np.random.Generator, current: np.ndarray, vocab: np.ndarray, n: int):
    positions = rng.integers(0, len(current), n)
    tokens = vocab[rng.integers(0, len(vocab), n)]
    candidates = np.repeat(current[None], n, axis=0)
    candidates[np.arange(n), positions] = tokens
    return candidates, positions, tokens


def search(loss: Callable[[jax.Array], jax.Array], initial, vocab, method: str = "annealing", steps: int = 100,
           key: jax.Array | None = None, proposals: int = 16, t0: float = 0.1, cooling: float = 0.97,
           tenure: int = 10, ants: int = 16, evaporation: float = 0.1, alpha: float = 1.0,
           deposit: float = 1.0) -> SearchResult:
    """Minimise `loss` over sequences of the length of `initial` (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"discrete search method={method!r}: expected one of {METHODS}")
    if steps < 1 or proposals < 1 or ants < 1:
        raise ValueError(f"steps={steps}, proposals={proposals}, ants={ants} must all be >= 1")
    if not 0 < cooling <= 1 or not 0 <= evaporation < 1 or t0 <= 0:
        raise ValueError(f"need t0 > 0 (got {t0}), 0 < cooling <= 1 (got {cooling}), 0 <= evaporation < 1 "
                         f"(got {evaporation})")
    vocab = np.asarray(vocab, np.int32)
    current = np.asarray(initial, np.int32).copy()
    if current.ndim != 1 or len(vocab) == 0:
        raise ValueError(f"initial must be a 1-D token sequence (got shape {current.shape}) and vocab non-empty")
    seed = 0 if key is None else int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    evaluate = lambda c: np.asarray(loss(jnp.asarray(c)), np.float64)  # noqa: E731
    f_current = float(evaluate(current[None])[0])
    best, f_best, evaluations, history = current.copy(), f_current, 1, []
    tabu: dict[tuple[int, int], int] = {}
    pheromone = np.ones((len(current), len(vocab)))
    for step in range(steps):
        if method == "aco":
            probs = pheromone ** alpha
            probs /= probs.sum(axis=1, keepdims=True)
            choice = np.stack([[rng.choice(len(vocab), p=probs[i]) for i in range(len(current))]
                               for _ in range(ants)])
            candidates = vocab[choice]
            values = evaluate(candidates)
            evaluations += ants
            pheromone *= 1 - evaporation
            offset = min(f_best, float(np.nanmin(values))) - 1.0
            for ant in range(ants):
                if np.isfinite(values[ant]):
                    pheromone[np.arange(len(current)), choice[ant]] += deposit / (values[ant] - offset)
            i = int(np.nanargmin(values))
            if values[i] < f_best:
                best, f_best = candidates[i].copy(), float(values[i])
        else:
            candidates, positions, tokens = _moves(rng, current, vocab, proposals)
            values = evaluate(candidates)
            evaluations += proposals
            order = np.argsort(values)
            if method == "annealing":
                i = int(order[0])
                temperature = t0 * cooling ** step
                delta = values[i] - f_current
                if delta <= 0 or rng.random() < math.exp(-delta / temperature):
                    current, f_current = candidates[i].copy(), float(values[i])
            else:  # tabu
                for i in map(int, order):
                    move = (int(positions[i]), int(tokens[i]))
                    if tabu.get(move, -1) < step or values[i] < f_best:  # not tabu, or aspiration
                        tabu[(move[0], int(current[move[0]]))] = step + tenure  # forbid undoing it
                        current, f_current = candidates[i].copy(), float(values[i])
                        break
            if f_current < f_best:
                best, f_best = current.copy(), f_current
        history.append(f_best)
    return SearchResult(tokens=best, fun=f_best, history=np.asarray(history), evaluations=evaluations)


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
