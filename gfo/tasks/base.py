"""Tasks: data made from a seed, objectives (losses, minimised) and metrics.

A task yields batches as dicts of NumPy arrays. `train_batch(step)` is a pure function of the task's
seed and the step, so the data position of a run is just its step count (exact resume for free), and
`eval_batches()` is a fixed held-out split. `objective(name, model, to_params)` returns
`loss(x, batch, key) -> scalar` for any optimizer; `metrics(model, params, batch, key)` returns a dict of
scalars (larger is better unless the name says loss/perplexity).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np

import models


class Task:
    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]]
    default_objective: ClassVar[str]

    def __init__(self, seed: int = 0, batch_size: int = 16, eval_size: int = 64,
                 tokenizer: models.ByteTokenizer | None = None):
        if batch_size < 1 or eval_size < 1:
            raise ValueError(f"{self.name}: batch_size={batch_size} and eval_size={eval_size} must be >= 1")
        self.seed, self.batch_size, self.eval_size = seed, batch_size, eval_size
        self.tokenizer = tokenizer or models.ByteTokenizer()

    def rng(self, split: str, step: int = 0) -> np.random.Generator:
        """The generator of `(seed, split, step)`; train and eval streams never overlap."""
        return np.random.default_rng([self.seed, {"train": 0, "eval": 1}[split], step])

    def train_batch(self, step: int) -> dict:
        return self.make_batch(self.rng("train", step), self.batch_size)

    def eval_batches(self) -> list[dict]:
        rng = self.rng("eval")
        n = self.eval_size
        return [self.make_batch(rng, min(self.batch_size, n - i)) for i in range(0, n, self.batch_size)]

    def make_batch(self, rng: np.random.Generator, size: int) -> dict:
        raise NotImplementedError

    def objective(self, name: str | None, model: models.TransformerLM, to_params: Callable) -> Callable:
        name = name or self.default_objective
        if name not in self.objectives:
            raise ValueError(f"task {self.name!r} has no objective {name!r}: expected one of {self.objectives}")
        return self._objective(name, model, to_params)

    def _objective(self, name, model, to_params) -> Callable:
        raise NotImplementedError

    def metrics(self, model: models.TransformerLM, params, batch: dict, key) -> dict:
        raise NotImplementedError
