"""Countdown: reach a target with the given numbers; the reward is computed on *generated* text.

The reasoning task on which ES is compared with PPO/GRPO (Qiu et al. 2025, arXiv 2509.24372; EGGROLL).
Two prompt styles (`prompt`):
- `reference` (default with a checkpoint's tokenizer): the ES-at-scale prompt — its system prompt, the
  user turn "Using the numbers [44 19 35], create an equation that equals 98. …" and the assistant turn
  opened with "Let me solve this step by step.\\n<think>" — rendered through the chat template
  (`task.chat_template: none` gives the reference's plain concatenation, its `context` field exactly).
  The model continues the think block, and the reward is `gfo.tasks.countdown_reward.reward` on
  `"<think>" + completion`, generating up to `max_new_tokens` (1,024, as the reference);
- `compact` (default with the byte tokenizer of the tiny models): `"3 5 7=22:"`, and the model writes
  `<think>…</think>\\n<answer>…</answer>` itself.

Data: problems generated from the seed (`n_numbers` numbers in 1..`max_number`, a reachable integer
target), or `data_path`: a JSONL file / `datasets` directory of `{"numbers" (or "nums"): [int],
"target": int or str}` records (the reference's `countdown.json` shape; an optional `"solution"` is the
reference completion; "context" is ignored, being what `task.chat_template: none` renders), or
`reasoning_gym:countdown` (the `reasoning` extra; `source_options` are passed
to `reasoning_gym.create_dataset`). With records, the first `train_size` are the training questions
(default: all but the `eval_size` evaluation ones), drawn without replacement epoch by epoch, as the
reference does; `batch_size: 1000` over 1,000 questions is the reference's whole-set iteration.
Objectives: `neg_reward` (default; greedy or sampled completions, reward negated) and `cross_entropy`.
"""

from __future__ import annotations

import math

import numpy as np

import models
from gfo.tasks import countdown_reward
from gfo.tasks.base import int_option
from gfo.tasks.loaders import DataError, read_records, reasoning_gym_records
from gfo.tasks.reasoning import ReasoningTask

REFERENCE_SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in your mind and "
                    "then provide the user with the answer.")
REFERENCE_USER = ("Using the numbers [{numbers}], create an equation that equals {target}. You can use basic "
                  "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
                  "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
                  "<answer> (1 + 2) / 3 </answer>.")
REFERENCE_PREFIX = "Let me solve this step by step.\n<think>"
# Numbers and targets stay within 2**24: the reward compares an answer with the target as float32, which holds
# every integer up to 2**24 exactly (a larger target, inf or nan could never be met, or overflows on the way).
TARGET_LIMIT = 2**24
_EXACT = "2**24 = 16777216: the reward compares with the target as float32, exact up to there"


class Countdown(ReasoningTask):
    name = "countdown"
    reward_fields = ("numbers", "target_value")

    def __init__(self, n_numbers: int | list = 3, max_number: int = 9, data_path: str | None = None,
                 prompt: str = "auto", max_new_tokens: int | None = None, train_size: int | None = None,
                 source_options: dict | None = None, **kw):
        if isinstance(n_numbers, (list, tuple)) and len(n_numbers) == 2:
            lo, hi = (int_option("n_numbers", n, 2, 6, "or [min, max] within it") for n in n_numbers)
            if lo > hi:
                raise ValueError(f"task.options.n_numbers={list(n_numbers)} is invalid: expected [min, max] with "
                                 f"min <= max, within [2, 6]")
        else:
            lo = hi = int_option("n_numbers", n_numbers, 2, 6, "or [min, max] within it")
        max_number = int_option("max_number", max_number, 1, TARGET_LIMIT, _EXACT)
        if max_new_tokens is not None:
            max_new_tokens = int_option("max_new_tokens", max_new_tokens, 1)
        if train_size is not None:
            train_size = int_option("train_size", train_size, 1)
        tokenizer = kw.get("tokenizer")
        if prompt == "auto":
            prompt = "compact" if tokenizer is None or isinstance(tokenizer, models.ByteTokenizer) else "reference"
        if prompt not in ("reference", "compact"):
            raise ValueError(f"countdown prompt={prompt!r}: expected 'reference', 'compact' or 'auto'")
        self.style = prompt
        if self.style == "reference" and kw.get("system_prompt") is None:
            kw["system_prompt"] = REFERENCE_SYSTEM
        self.assistant_prefix = REFERENCE_PREFIX if self.style == "reference" else ""
        records = None
        if data_path is not None:
            records = self._read(data_path, dict(source_options or {}), kw.get("seed", 0),
                                 kw.get("eval_size", 64))
            lo = min(len(r["numbers"]) for r in records)
            hi = max(len(r["numbers"]) for r in records)
            max_number = max(max(r["numbers"]) for r in records)
        self.n_numbers, self.max_number = (lo, hi), max_number
        digits = len(str(max_number))
        if self.style == "compact":
            self.max_prompt_tokens = hi * (digits + 1) + 2 * digits * hi + 4
            default_new = len("<think></think>\n<answer></answer>") + hi * (digits + 3) + 2
        else:
            self.max_prompt_tokens = len(REFERENCE_USER.format(numbers=" ".join(["9" * digits] * hi),
                                                               target="9" * (digits * hi + 1)))
            default_new = 1024
        super().__init__(max_new_tokens=max_new_tokens if max_new_tokens is not None else default_new, **kw)
        if records is not None:
            self.use_records(records, train_size, data_path)

    @property
    def target_length(self) -> int:
        """The teacher-forced reference completion: a short expression, not `max_new_tokens`."""
        if self.style == "compact":
            return self.max_answer_tokens + 1
        digits = len(str(self.max_number))  # an expression: numbers, operators, spaces, parentheses
        return len("</think>\n<answer></answer>") + 6 * self.n_numbers[1] * (digits + 3) + 1

    # ------------------------------------------------------------------ data
    @staticmethod
    def _read(path: str, source_options: dict, seed: int, eval_size: int) -> list[dict]:
        if path.startswith("reasoning_gym:"):
            items = reasoning_gym_records(path, seed, source_options.pop("size", 1000 + eval_size), **source_options)
            records = [{"numbers": list(i["metadata"]["numbers"]), "target": i["metadata"]["target"],
                        "solution": i["metadata"].get("expression", "")} for i in items]
        else:
            records = []
            for i, r in enumerate(read_records(path, {"target": (int, float, str)})):
                numbers = r.get("numbers", r.get("nums"))
                if not isinstance(numbers, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                            and 0 <= n <= TARGET_LIMIT for n in numbers):
                    raise DataError(f"{path}: record {i} has numbers {numbers!r}; expected a list of integers in "
                                    f"[0, {TARGET_LIMIT}] under 'numbers' (or 'nums') ({_EXACT})")
                try:
                    target = float(r["target"])
                except (ValueError, OverflowError):
                    target = math.nan
                if not (math.isfinite(target) and abs(target) <= TARGET_LIMIT):
                    raise DataError(f"{path}: record {i} has target {r['target']!r}; expected a finite number in "
                                    f"[-{TARGET_LIMIT}, {TARGET_LIMIT}] ({_EXACT})")
                records.append({"numbers": numbers, "target": int(target) if target == int(target) else target,
                                "solution": r.get("solution", "")})
        for i, r in enumerate(records):
            if not 2 <= len(r["numbers"]) <= 6:
                raise DataError(f"{path}: record {i} has {len(r['numbers'])} numbers; expected 2..6")
        return records

    def user_text(self, problem: dict) -> str:
        numbers, target = problem["numbers"], problem["target"]
        if self.style == "compact":
            return f"{' '.join(map(str, numbers))}={target}:"
        return REFERENCE_USER.format(numbers=" ".join(map(str, numbers)), target=target)

    def completion_of(self, problem: dict) -> str:
        """The reference completion (cross-entropy pre-training): an empty think block and the answer."""
        solution = problem.get("solution", "")
        if not solution:
            return ""
        return f"</think>\n<answer>{solution}</answer>" if self.style == "reference" else \
            f"<think></think>\n<answer>{solution}</answer>"

    def generated_problem(self, rng: np.random.Generator) -> dict:
        """Numbers, a reachable positive integer target, and the expression that reaches it."""
        lo, hi = self.n_numbers
        n = lo if lo == hi else int(rng.integers(lo, hi + 1))
        while True:
            numbers = [int(v) for v in rng.integers(1, self.max_number + 1, size=n)]
            expression = str(numbers[0])
            for v in numbers[1:]:
                expression = f"{expression}{rng.choice(['+', '-', '*'])}{v}"
            value = countdown_reward.evaluate(expression)
            if 0 < value <= TARGET_LIMIT and value == int(value):
                return {"numbers": [int(v) for v in rng.permutation(numbers)], "target": int(value),
                        "solution": expression}

    def fields(self, problems: list[dict]) -> dict:
        numbers = np.full((len(problems), self.n_numbers[1]), -1, np.int32)  # -1 pads shorter lists
        for row, p in enumerate(problems):
            numbers[row, :len(p["numbers"])] = p["numbers"]
        return {"numbers": numbers, "target_value": np.asarray([float(p["target"]) for p in problems], np.float32)}

    def score(self, text: str, row: dict) -> tuple[float, float]:
        used = [int(v) for v in row["numbers"] if v >= 0]
        target = float(row["target_value"])
        return (countdown_reward.reward(text, used, target, think_prefix=self.style == "reference"),
                countdown_reward.answer_reward(text, used, target))
