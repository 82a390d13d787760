"""Prompt → completion tasks scored on the completion: arithmetic, sort, reverse (and countdown).

Batch: `prompt` [B, P] left-padded ids with `prompt_mask`, `target` [B, A] ids of the reference
completion followed by the end token, right-padded, with `target_mask`. Objectives:
- `cross_entropy`: teacher-forced next-token loss on the target tokens (differentiable);
- `neg_exact_match`: greedy decoding of `A` tokens compared with the target (`−accuracy`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import models
from gfo.tasks.base import Task


class CompletionTask(Task):
    objectives = ("cross_entropy", "neg_exact_match")
    default_objective = "cross_entropy"
    max_answer_tokens = 8  # tokens generated at most (a bound in bytes holds for every tokenizer)
    assistant_prefix = ""  # text the assistant turn opens with, continued by the model

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        """`(user text, reference completion)` of one problem."""
        raise NotImplementedError

    # Bytes of the longest user text the task makes (a bound on its tokens under any tokenizer); set by
    # each task, as an attribute or a property.
    max_prompt_tokens: int

    @property
    def prompt_length(self) -> int:
        """Tokens every prompt batch is padded to: the rendered longest prompt's bytes, which bounds its
        tokens under any tokenizer (exact for the byte tokenizer on plain prompts)."""
        if isinstance(self.tokenizer, models.ByteTokenizer) and self.format.template is None:
            return len(self.render("x" * self.max_prompt_tokens, self.assistant_prefix).encode("utf-8"))
        return self.prompt_length_bound("x" * self.max_prompt_tokens, self.assistant_prefix)

    @property
    def target_length(self) -> int:
        """Tokens of the teacher-forced target: the reference completion and the end token."""
        return self.max_answer_tokens + 1

    def make_batch(self, rng, size):
        pairs = [self.example(rng) for _ in range(size)]
        return self.encode_examples(pairs)

    def encode_examples(self, pairs: list[tuple[str, str]]) -> dict:
        """`prompt`/`prompt_mask` `[B, prompt_length]` and `target`/`target_mask` `[B, target_length]`."""
        tok = self.tokenizer
        prompt, prompt_mask = self.encode_prompts([self.render(user, self.assistant_prefix) for user, _ in pairs],
                                                  self.prompt_length)
        A = self.target_length
        target = np.full((len(pairs), A), tok.pad_id, np.int32)
        target_mask = np.zeros((len(pairs), A), np.int32)
        for row, (_, answer) in enumerate(pairs):
            ids = tok.encode(answer)[: A - 1] + [tok.eos_id]
            target[row, :len(ids)] = ids
            target_mask[row, :len(ids)] = 1
        return {"prompt": prompt, "prompt_mask": prompt_mask, "target": target, "target_mask": target_mask}

    def _objective(self, name, model, to_params) -> Callable:
        if name == "cross_entropy":
            return lambda x, batch, key: teacher_forced_loss(model, to_params(x), batch)
        return lambda x, batch, key: -exact_match(model, to_params(x), batch, self.stop_tokens)

    def metrics(self, model, params, batch, key):
        return {"cross_entropy": teacher_forced_loss(model, params, batch),
                "exact_match": exact_match(model, params, batch, self.stop_tokens)}

    def completion_rewards(self, tokens, lengths, rows, with_correct: bool = False):
        """A verifier reward `[N]`: 1 where the completion `tokens [N, L]` (its first `lengths` tokens)
        is the reference answer of `rows` followed by end-of-sequence, else 0 (a `reward_fn` for
        `gfo.rollout.GenerationReward` and for `gfo.decode.refine`)."""
        target, mask = rows["target"], rows["target_mask"].astype(bool)
        A, L = target.shape[1], tokens.shape[1]
        tokens = jnp.pad(tokens, ((0, 0), (0, max(A - L, 0))))[:, :A]
        reward = (jnp.all((tokens == target) | ~mask, axis=1) & (lengths == mask.sum(axis=1))).astype(jnp.float32)
        return (reward, reward) if with_correct else reward


def teacher_forced_loss(model: models.TransformerLM, params, batch: dict) -> jax.Array:
    """Mean cross-entropy of the target tokens given the prompt (and the target's own prefix)."""
    logp = models.completion_logprobs(model, params, batch["prompt"], batch["prompt_mask"], batch["target"],
                                      batch["target_mask"])
    return -jnp.sum(logp) / jnp.maximum(jnp.sum(batch["target_mask"]).astype(jnp.float32), 1.0)


def exact_match(model: models.TransformerLM, params, batch: dict, stop_tokens) -> jax.Array:
    """Fraction of rows whose greedy completion reproduces the target up to and including its end."""
    A = batch["target"].shape[1]
    stop_tokens = (stop_tokens,) if isinstance(stop_tokens, int) else tuple(stop_tokens)
    out = models.generate(model, params, batch["prompt"], batch["prompt_mask"], jax.random.key(0), A,
                          temperature=0.0, stop_tokens=stop_tokens)
    mask = batch["target_mask"].astype(bool)
    match = jnp.all((out.tokens == batch["target"]) | ~mask, axis=1)
    return jnp.mean(match.astype(jnp.float32))


class Arithmetic(CompletionTask):
    """`"47+385="` → `"432"`: multi-digit addition (or multiplication) with `digits`-digit operands."""

    name = "arithmetic"

    def __init__(self, digits: int = 2, operation: str = "+", **kw):
        if operation not in ("+", "*"):
            raise ValueError(f"arithmetic operation={operation!r}: expected '+' or '*'")
        if not 1 <= digits <= 9:
            raise ValueError(f"arithmetic digits={digits}: expected 1..9")
        self.digits, self.operation = digits, operation
        self.max_answer_tokens = 2 * digits if operation == "*" else digits + 1
        super().__init__(**kw)

    @property
    def max_prompt_tokens(self):
        return 2 * self.digits + 2

    def example(self, rng):
        a, b = (int(v) for v in rng.integers(0, 10 ** self.digits, size=2))
        return f"{a}{self.operation}{b}=", str(a + b if self.operation == "+" else a * b)


class _SymbolSequence(CompletionTask):
    """`"<symbols>:"` → a transformation of the symbols (`length` letters from `alphabet`)."""

    def __init__(self, length: int = 5, alphabet: str = "abcdefgh", **kw):
        if length < 1 or not alphabet:
            raise ValueError(f"{self.name}: length={length} must be >= 1 and alphabet non-empty")
        self.length, self.alphabet = length, alphabet
        self.max_answer_tokens = length
        super().__init__(**kw)

    @property
    def max_prompt_tokens(self):
        return self.length + 1

    def example(self, rng):
        symbols = "".join(rng.choice(list(self.alphabet), size=self.length))
        return symbols + ":", self.transform(symbols)

    def transform(self, symbols: str) -> str:
        raise NotImplementedError


class Sort(_SymbolSequence):
    name = "sort"

    def transform(self, symbols):
        return "".join(sorted(symbols))


class Reverse(_SymbolSequence):
    name = "reverse"

    def transform(self, symbols):
        return symbols[::-1]
