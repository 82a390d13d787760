"""`arithmetic_answer`: one-digit arithmetic whose reward is read from the text the model generates.

A config plugin of `benchmarks/reproduce.py` (`plugins: [benchmarks.reproduce_task]` registers it in
`gfo.tasks.TASKS`). Built-in `arithmetic` scores the exact token sequence "answer<end>", which a chat model
never writes: SmolLM2-135M-Instruct, measured 2026-12-01 on 64 problems, answers "11.5." or "10.\n\nThe
answer is" as plain text and "The answer is 15." through its chat template, so its exact match is 0 %.
Here the verifier takes the first number of the completion — an integer or a decimal, so "24.5" is not
24 — and the reward (= accuracy) is 1 when it equals the answer: a verifiable answer, bounded work on any
string, and short generations (`max_new_tokens` 2 × digits + 6), which is what a CPU can afford. The
prompt is the user turn "7*8=" under the checkpoint's chat template with the system prompt "Reply with
only the number." (the model mostly ignores it).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from gfo.tasks import TASKS
from gfo.tasks.reasoning import ReasoningTask

_LEADING = re.compile(r"\s*(\d{1,12})(?!\d)")


def leading_integer(text: str) -> int | None:
    """The integer `text` opens with (after spaces; "24.5" and "24, which" open with 24), or None."""
    m = _LEADING.match(text[:64])
    return int(m.group(1)) if m else None


class ArithmeticAnswer(ReasoningTask):
    """`"7*8="` → reward 1 when the completion opens with the integer 56 ("56.", "56, which" count)."""

    name = "arithmetic_answer"
    reward_fields = ("answer",)
    default_chat_template = "none"  # plain text: "7*8=" continued (the chat turn answers "The answer is 7.")

    def __init__(self, digits: int = 1, operation: str = "*", shots: int = 3, max_new_tokens: int | None = None,
                 **kw):
        if operation not in ("+", "*"):
            raise ValueError(f"arithmetic_answer operation={operation!r}: expected '+' or '*'")
        if not 1 <= digits <= 4:
            raise ValueError(f"arithmetic_answer digits={digits}: expected 1..4")
        if shots < 0:
            raise ValueError(f"arithmetic_answer shots={shots} must be >= 0")
        self.digits, self.operation = digits, operation
        rng = np.random.default_rng(12345)  # the same demonstrations for every seed and split
        self.demos = "".join(f"{self.user_text(p)}{p['answer']}\n" for p in
                             (self.generated_problem(rng) for _ in range(shots)))  # training pairs
        self.max_prompt_tokens = len(self.demos) + 2 * digits + 2
        super().__init__(max_new_tokens=max_new_tokens or 2 * digits + 2, **kw)

    def _held_out(self, a: int, b: int) -> bool:
        """A quarter of the operand pairs, by a fixed hash: evaluation (and dev) problems only."""
        return zlib.crc32(f"{a}{self.operation}{b}".encode()) % 4 == 0

    def train_batch(self, step: int) -> dict:
        self._split = "train"
        return super().train_batch(step)

    def eval_batches(self) -> list[dict]:
        self._split = "eval"
        try:
            return super().eval_batches()
        finally:
            self._split = "train"

    def dev_batches(self, n: int) -> list[dict]:
        self._split = "eval"
        try:
            return super().dev_batches(n)
        finally:
            self._split = "train"

    def generated_problem(self, rng: np.random.Generator) -> dict:
        """A problem of this split: training never sees an evaluation pair (`_held_out`)."""
        held_out = getattr(self, "_split", "train") == "eval"
        while True:
            problem = self._problem(rng)
            if self._held_out(problem["a"], problem["b"]) == held_out:
                return problem

    def _problem(self, rng: np.random.Generator) -> dict:
        # Operands from 2 (1-digit) or 10^(digits-1): with 0 or 1 a completion that merely repeats an
        # operand ("The number 0 is …") would be right by accident.
        a, b = (int(v) for v in rng.integers(max(2, 10 ** (self.digits - 1)), 10 ** self.digits, size=2))
        return {"a": a, "b": b, "answer": a + b if self.operation == "+" else a * b}

    def user_text(self, problem: dict) -> str:
        return f"{getattr(self, 'demos', '')}{problem['a']}{self.operation}{problem['b']}="

    def completion_of(self, problem: dict) -> str:
        return str(problem["answer"])

    def fields(self, problems: list[dict]) -> dict:
        return {"answer": np.asarray([float(p["answer"]) for p in problems], np.float32)}

    def score(self, text: str, row: dict) -> tuple[float, float]:
        value = leading_integer(text)
        ok = float(value is not None and value == int(row["answer"]))
        return ok, ok


TASKS.setdefault(ArithmeticAnswer.name, ArithmeticAnswer)
