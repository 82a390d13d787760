"""GSM8K-style math word problems, scored by extracting the final number of the generated answer.

Data (`data_path`): a JSONL file / `datasets` directory of GSM8K records `{"question": str, "answer":
str}` whose answer ends in `#### N` (the rationale before it is the reference completion), or
`reasoning_gym:gsm_symbolic` (the `reasoning` extra: GSM-symbolic problems with a numeric answer).
The prompt is the question under the checkpoint's chat template with the system prompt "Please reason
step by step, and put your final answer within \\boxed{}." (the Qwen-math prompt ES-at-scale uses).

Reward (`extract_answer`): the content of the last `\\boxed{…}`, else what follows the last `####`,
else the last number in the completion; commas, `$` and a trailing period are dropped; 1.0 when it
equals the gold number (within 1e-6 relative), else 0.0.
"""

from __future__ import annotations

import math
import re

import numpy as np

from gfo.tasks.loaders import DataError, read_records, reasoning_gym_records
from gfo.tasks.reasoning import ReasoningTask

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    match = _NUMBER.fullmatch(text) or _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}`, with nested braces balanced (linear scan)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a completion (see the module doc), or None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return _to_number(boxed)
    if "####" in text:
        return _to_number(text.rsplit("####", 1)[1])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def answer_reward(text: str, gold: float) -> float:
    value = extract_answer(text)
    if value is None or not math.isfinite(value):
        return 0.0
    return 1.0 if abs(value - gold) <= 1e-6 * max(1.0, abs(gold)) else 0.0


class GSM8K(ReasoningTask):
    name = "gsm8k"
    default_system_prompt = SYSTEM_PROMPT
    reward_fields = ("answer_value",)

    def __init__(self, data_path: str | None = None, train_size: int | None = None,
                 source_options: dict | None = None, max_new_tokens: int = 512, **kw):
        if data_path is None:
            raise DataError("gsm8k needs task.options data_path: a GSM8K JSONL file ({question, answer: '... #### N'})"
                            " or reasoning_gym:gsm_symbolic")
        records = self._read(data_path, dict(source_options or {}), kw.get("seed", 0), kw.get("eval_size", 64))
        self.max_prompt_tokens = max(len(r["question"].encode("utf-8")) for r in records)
        self._longest_solution = max(len(r["solution"].encode("utf-8")) for r in records)
        super().__init__(max_new_tokens=max_new_tokens, **kw)
        self.use_records(records, train_size, data_path)

    @staticmethod
    def _read(path: str, options: dict, seed: int, eval_size: int) -> list[dict]:
        if path.startswith("reasoning_gym:"):
            items = reasoning_gym_records(path, seed, options.pop("size", 1000 + eval_size), **options)
            raw = [{"question": i["question"], "answer": i["metadata"].get("answer_cot", "") or f"#### {i['answer']}"}
                   for i in items]
        else:
            raw = read_records(path, {"question": str, "answer": (str, int, float)})
        records = []
        for i, r in enumerate(raw):
            answer = str(r["answer"])
            rationale, _, final = answer.rpartition("####")
            gold = _to_number(final)
            if gold is None:
                raise DataError(f"{path}: record {i} has answer {answer[-60:]!r}; expected text ending in '#### N' "
                                f"or a number")
            records.append({"question": r["question"], "gold": gold,
                            "solution": f"{rationale.strip()}\nThe answer is \\boxed{{{final.strip()}}}."
                            if rationale.strip() else ""})
        return records

    @property
    def target_length(self) -> int:
        return min(self.max_answer_tokens, self._longest_solution) + 1

    def user_text(self, problem: dict) -> str:
        return problem["question"]

    def completion_of(self, problem: dict) -> str:
        return problem["solution"]

    def fields(self, problems: list[dict]) -> dict:
        return {"answer_value": np.asarray([p["gold"] for p in problems], np.float64).astype(np.float32)}

    def score(self, text: str, row: dict) -> tuple[float, float]:
        reward = answer_reward(text, float(row["answer_value"]))
        return reward, reward
