"""Countdown: reach a target with the given numbers; the reward is computed on *generated* text.

The reasoning task on which ES is compared with PPO/GRPO (Qiu et al. 2025; EGGROLL). A prompt lists
`n_numbers` numbers and a target that some expression over all of them reaches; the model writes
`<think>…</think>\\n<answer>expression</answer>` and earns `gfo.tasks.countdown_reward.reward`. The
reference completion (for `cross_entropy` pre-training) is the generating expression with an empty
think block. Objectives: `neg_reward` (default: greedy or sampled completions, reward negated) and
`cross_entropy`. `data_path`: a JSONL file (or `datasets` directory) of `{"numbers": [int], "target":
int}` problems (an optional `"solution"` expression is the reference completion) instead of generated
ones; all records must have `n_numbers` numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import models
from gfo.tasks import countdown_reward
from gfo.tasks.loaders import DataError, read_records
from gfo.tasks.sequence import CompletionTask, teacher_forced_loss


class Countdown(CompletionTask):
    name = "countdown"
    objectives = ("neg_reward", "cross_entropy")
    default_objective = "neg_reward"

    def __init__(self, n_numbers: int = 3, max_number: int = 9, temperature: float = 0.0,
                 data_path: str | None = None, **kw):
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"countdown n_numbers={n_numbers}: expected 2..6")
        if max_number < 1:
            raise ValueError(f"countdown max_number={max_number} must be >= 1")
        self.n_numbers, self.max_number, self.temperature = n_numbers, max_number, temperature
        digits = len(str(max_number))
        self.max_answer_tokens = len("<think></think>\n<answer></answer>") + n_numbers * (digits + 3) + 2
        super().__init__(**kw)
        self.records = None if data_path is None else self._read(data_path)

    def _read(self, path):
        records = read_records(path, {"numbers": list, "target": (int, float)})
        for i, r in enumerate(records):
            if len(r["numbers"]) != self.n_numbers or not all(isinstance(n, int) and 0 < n <= self.max_number
                                                              for n in r["numbers"]):
                raise DataError(f"{path}: record {i} has numbers {r['numbers']}; expected {self.n_numbers} "
                                f"integers in 1..{self.max_number} (task.options n_numbers / max_number)")
        return records

    @property
    def max_prompt_tokens(self):
        digits = len(str(self.max_number))
        return self.n_numbers * (digits + 1) + 2 * digits * self.n_numbers + 4

    def problem(self, rng: np.random.Generator) -> tuple[list[int], int, str]:
        """Numbers, a reachable integer target, and the expression that reaches it."""
        if self.records is not None:
            r = self.records[int(rng.integers(len(self.records)))]
            return list(r["numbers"]), r["target"], r.get("solution", "")
        while True:
            numbers = [int(v) for v in rng.integers(1, self.max_number + 1, size=self.n_numbers)]
            expression = str(numbers[0])
            for n in numbers[1:]:
                expression = f"{expression}{rng.choice(['+', '-', '*'])}{n}"
            value = countdown_reward.evaluate(expression)
            if value > 0 and value == int(value):
                order = list(rng.permutation(numbers))
                return [int(v) for v in order], int(value), expression

    def example(self, rng):
        numbers, target, expression = self.problem(rng)
        return (f"{' '.join(map(str, numbers))}={target}:",
                f"<think></think>\n<answer>{expression}</answer>")

    def make_batch(self, rng, size):
        state = rng.bit_generator.state
        batch = super().make_batch(rng, size)
        rng.bit_generator.state = state  # replay the same problems to record their numbers and targets
        problems = [self.problem(rng) for _ in range(size)]
        batch["numbers"] = np.asarray([p[0] for p in problems], np.int32)
        batch["target_value"] = np.asarray([p[1] for p in problems], np.float32)
        return batch

    def _objective(self, name, model, to_params):
        if name == "cross_entropy" and self.records is not None and not all(r.get("solution") for r in self.records):
            raise DataError("countdown objective 'cross_entropy' needs a reference 'solution' in every record")
        if name == "cross_entropy":
            return lambda x, batch, key: teacher_forced_loss(model, to_params(x), batch)
        return lambda x, batch, key: -jnp.mean(self.rewards(model, to_params(x), batch, key)[0])

    def rewards(self, model: models.TransformerLM, params, batch, key):
        """Rewards `[B]` of completions (greedy when temperature is 0) and whether each was correct."""
        out = models.generate(model, params, batch["prompt"], batch["prompt_mask"], key, self.max_answer_tokens,
                              temperature=self.temperature, stop_tokens=(self.tokenizer.eos_id,))
        return self.completion_rewards(out.tokens, out.lengths, batch, with_correct=True)

    def completion_rewards(self, tokens, lengths, rows, with_correct: bool = False):
        """Rewards `[N]` of completions `tokens [N, L]` of the prompts in `rows` (a `reward_fn` for
        `gfo.rollout.GenerationReward`); with `with_correct`, also whether each answer was right."""
        shapes = (jax.ShapeDtypeStruct(lengths.shape, jnp.float32),) * 2
        reward, correct = jax.pure_callback(self._host_rewards, shapes, tokens, lengths, rows["numbers"],
                                            rows["target_value"], vmap_method="sequential")
        return (reward, correct) if with_correct else reward

    def _host_rewards(self, tokens, lengths, numbers, targets):
        rewards, correct = [], []
        for row, n, nums, target in zip(np.asarray(tokens), np.asarray(lengths), np.asarray(numbers),
                                        np.asarray(targets)):
            text = self.tokenizer.decode([t for t in row[:n] if t != self.tokenizer.eos_id])
            rewards.append(countdown_reward.reward(text, nums.tolist(), float(target)))
            correct.append(countdown_reward.answer_reward(text, nums.tolist(), float(target)))
        return np.asarray(rewards, np.float32), np.asarray(correct, np.float32)

    def metrics(self, model, params, batch, key):
        reward, correct = self.rewards(model, params, batch, key)
        return {"reward": jnp.mean(reward), "accuracy": jnp.mean(correct),
                "cross_entropy": teacher_forced_loss(model, params, batch)}
