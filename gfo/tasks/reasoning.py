"""Reasoning tasks scored on *generated* text: a prompt, a completion up to `max_new_tokens`, a verifier.

`ReasoningTask` holds what countdown and GSM8K share: problems from records (train questions drawn
without replacement epoch by epoch, a held-out evaluation slice) or generated from the seed; prompts
rendered through the checkpoint's chat template by default; generation with the KV cache that stops at
the tokenizer's end tokens or at `stop_strings`; and a host-side verifier `score(text, row) -> (reward,
correct)` on the decoded completion. Objectives: `neg_reward` (the loss: −mean reward) and
`cross_entropy` (teacher forcing on the reference completion).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import models
from gfo.tasks.base import epoch_indices, int_option
from gfo.tasks.loaders import DataError
from gfo.tasks.sequence import CompletionTask, teacher_forced_loss
from models.generate import stop_string_table


class ReasoningTask(CompletionTask):
    objectives = ("neg_reward", "cross_entropy")
    default_objective = "neg_reward"
    default_chat_template = "auto"
    reward_fields: ClassVar[tuple[str, ...]] = ()  # batch arrays the verifier reads per row

    def __init__(self, temperature: float = 0.0, max_new_tokens: int = 512, stop_strings: list | tuple = (),
                 prompt_length: int | None = None, top_k: int = 0, top_p: float = 1.0, **kw):
        """`temperature` (0: greedy), `top_k` (0: off) and `top_p` (1: off) shape every sampled generation of
        the task: the rollouts when `temperature` > 0, and pass@k's samples at `eval.temperature`."""
        super().__init__(**kw)
        self._prompt_length = prompt_length
        if temperature < 0:
            raise ValueError(f"{self.name} temperature={temperature} must be >= 0 (0 = greedy)")
        if not 0 < top_p <= 1:
            raise ValueError(f"{self.name} top_p={top_p!r} must be in (0, 1] (1 = no nucleus truncation)")
        self.top_k, self.top_p = int_option("top_k", top_k, 0, why="0 = no top-k truncation"), float(top_p)
        if max_new_tokens < 1:
            raise ValueError(f"{self.name} max_new_tokens={max_new_tokens} must be >= 1")
        self.temperature, self.max_answer_tokens = temperature, max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.stop_matcher = stop_string_table(self.tokenizer.token_bytes(), self.stop_strings) \
            if self.stop_strings else None
        self.records: list[dict] | None = None

    # ------------------------------------------------------------------ data
    def use_records(self, records: list[dict], train_size: int | None, where: str) -> None:
        """Train on the first `train_size` records (default: all but `eval_size`), evaluate on the next."""
        self.records = records
        self.train_size = train_size if train_size is not None else len(records) - self.eval_size
        if not 0 < self.train_size < len(records):
            raise DataError(f"{where}: {len(records)} records cannot give train_size={self.train_size} training "
                            f"and eval_size={self.eval_size} evaluation questions")
        if self._prompt_length is None and not isinstance(self.tokenizer, models.ByteTokenizer):
            # The exact longest prompt (a real tokenizer packs text 3-4x tighter than the byte bound).
            self._prompt_length = max(len(self.encode_prompt(self.render(self.user_text(r), self.assistant_prefix)))
                                      for r in records)

    @property
    def prompt_length(self) -> int:
        """Records: the exact longest prompt. Generated problems under a real tokenizer: the longest of
        512 sample prompts plus 16 tokens of margin (the byte bound would be 3-4x longer); a later prompt
        that does not fit is an error naming `task.options prompt_length`."""
        if getattr(self, "_prompt_length", None) is None:
            if self.records is None and not isinstance(self.tokenizer, models.ByteTokenizer) and \
                    type(self).generated_problem is not ReasoningTask.generated_problem:
                rng = np.random.default_rng([self.seed, 3])
                self._prompt_length = 16 + max(
                    len(self.encode_prompt(self.render(self.user_text(self.generated_problem(rng)),
                                                       self.assistant_prefix))) for _ in range(512))
            else:
                self._prompt_length = super().prompt_length
        return self._prompt_length

    def user_text(self, problem: dict) -> str:
        raise NotImplementedError

    def completion_of(self, problem: dict) -> str:
        """The reference completion (for cross-entropy), "" when unknown."""
        raise NotImplementedError

    def generated_problem(self, rng: np.random.Generator) -> dict:
        raise DataError(f"{self.name} makes no problems of its own: set task.options data_path")

    def fields(self, problems: list[dict]) -> dict:
        """The `reward_fields` arrays `[B, ...]` of a batch."""
        raise NotImplementedError

    def _batch(self, problems: list[dict]) -> dict:
        batch = self.encode_examples([(self.user_text(p), self.completion_of(p)) for p in problems])
        batch.update(self.fields(problems))
        return batch

    def train_batch(self, step: int) -> dict:
        if self.records is None:
            rng = self.rng("train", step)
            return self._batch([self.generated_problem(rng) for _ in range(self.batch_size)])
        return self._batch([self.records[int(i)] for i in epoch_indices(self.train_size, self.batch_size, step,
                                                                        self.seed)])

    def eval_batches(self) -> list[dict]:
        if self.records is None:
            rng = self.rng("eval")
            problems = [self.generated_problem(rng) for _ in range(self.eval_size)]
        else:
            problems = self.records[self.train_size:self.train_size + self.eval_size]
        return [self._batch(problems[i:i + self.batch_size]) for i in range(0, len(problems), self.batch_size)]

    def dev_batches(self, n: int) -> list[dict]:
        """`n` dev problems (`eval.select_by`): the records after the eval slice, or generated ones from
        the task's own dev stream."""
        if self.records is None:
            rng = self.rng("dev")
            problems = [self.generated_problem(rng) for _ in range(n)]
        else:
            start = self.train_size + self.eval_size
            problems = self.records[start:start + n]
            if len(problems) < n:
                raise DataError(f"{self.name}: dev_size={n} but only {len(problems)} records remain after "
                                f"train_size={self.train_size} and eval_size={self.eval_size}")
        return [self._batch(problems[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]

    # ------------------------------------------------------------------ generation and rewards
    def _objective(self, name, model, to_params):
        if name == "cross_entropy" and self.records is not None and not all(self.completion_of(r) for r in self.records):
            raise DataError(f"{self.name} objective 'cross_entropy' needs a reference solution in every record")
        if name == "cross_entropy":
            return lambda x, batch, key: teacher_forced_loss(model, to_params(x), batch)
        return lambda x, batch, key: -jnp.mean(self.rewards(model, to_params(x), batch, key)[0])

    def generate(self, model: models.TransformerLM, params, batch, key, temperature: float | None = None):
        return models.generate(model, params, batch["prompt"], batch["prompt_mask"], key, self.max_answer_tokens,
                               temperature=self.temperature if temperature is None else temperature,
                               top_k=self.top_k, top_p=self.top_p, stop_tokens=self.stop_tokens,
                               stop_strings=self.stop_matcher)

    def rewards(self, model: models.TransformerLM, params, batch, key):
        """Rewards `[B]` of completions (greedy when temperature is 0) and whether each was correct."""
        out = self.generate(model, params, batch, key)
        return self.completion_rewards(out.tokens, out.lengths, batch, with_correct=True)

    def completion_rewards(self, tokens, lengths, rows, with_correct: bool = False):
        """Rewards `[N]` of completions `tokens [N, L]` of the prompts in `rows` (a `reward_fn` for
        `gfo.rollout.GenerationReward`); with `with_correct`, also whether each answer was right."""
        shapes = (jax.ShapeDtypeStruct(lengths.shape, jnp.float32),) * 2
        reward, correct = jax.pure_callback(self._host_rewards, shapes, tokens, lengths,
                                            *(rows[f] for f in self.reward_fields), vmap_method="sequential")
        return (reward, correct) if with_correct else reward

    def decode_completion(self, row, length) -> str:
        stops = set(self.stop_tokens)
        return self.tokenizer.decode([int(t) for t in row[:length] if int(t) not in stops])

    def score(self, text: str, row: dict) -> tuple[float, float]:
        """`(reward, correct)` of one decoded completion; `row` holds this row's `reward_fields`."""
        raise NotImplementedError

    def _host_rewards(self, tokens, lengths, *fields):
        scores = [self.score(self.decode_completion(row, n), dict(zip(self.reward_fields, values)))
                  for row, n, *values in zip(np.asarray(tokens), np.asarray(lengths), *map(np.asarray, fields))]
        reward, correct = zip(*scores) if scores else ((), ())
        return np.asarray(reward, np.float32), np.asarray(correct, np.float32)

    def metrics(self, model, params, batch, key):
        reward, correct = self.rewards(model, params, batch, key)
        return {"reward": jnp.mean(reward), "accuracy": jnp.mean(correct),
                "cross_entropy": teacher_forced_loss(model, params, batch)}
