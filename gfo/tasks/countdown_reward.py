"""The countdown reward on generated text, with a safe arithmetic evaluator.

Reward (ES at scale, Qiu et al. 2025, `countdown/countdown_task.py`): `0.1 × format + answer`, where
`format` is 1.0 for the full `<think>…</think>\\n<answer>…</answer>` shape, else 0.1 for a think block
plus 0.5 for an answer block; `answer` is 1.0 when the last `<answer>` uses exactly the given numbers (as
a multiset) and evaluates to the target within 1e-5. The reference evaluates the expression with
Python's `eval`; here a small recursive-descent parser evaluates `+ − × ÷`, parentheses and unary
signs with bounded length and depth, so a generated answer can never hang or escape the reward.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FULL = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")


class ExpressionError(ValueError):
    """An expression outside the grammar, too long, too deep, or dividing by zero."""


def evaluate(expression: str) -> float:
    """Value of an arithmetic expression over numbers, `+ - * /`, parentheses and unary `+ -`.

    Raises ExpressionError for anything else (names, `**`, calls, …), more than
    `MAX_EXPRESSION_CHARS` characters, nesting deeper than `MAX_DEPTH`, or division by zero.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens = []
    for number, other in _TOKEN.findall(expression):
        if number:
            tokens.append(float(number))
        elif other.strip():
            if other not in "+-*/()":
                raise ExpressionError(f"unexpected character {other!r}")
            tokens.append(other)
    parser = _Parser(tokens)
    value = parser.expression(0)
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos]!r} at token {parser.pos}")
    return value


class _Parser:
    """expression := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := ('+'|'-') factor | number | '(' expression ')'."""

    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self):
        token = self._peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return token

    def expression(self, depth: int) -> float:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> float:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self._take()
            rhs = self.factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> float:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nesting deeper than {MAX_DEPTH}")
        token = self._take()
        if token in ("+", "-"):
            value = self.factor(depth + 1)
            return value if token == "+" else -value
        if token == "(":
            value = self.expression(depth + 1)
            if self._take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if isinstance(token, float):
            return token
        raise ExpressionError(f"unexpected {token!r}")


def format_reward(response: str) -> float:
    if _FULL.match(response):
        return 1.0
    return (0.1 if _THINK.search(response) else 0.0) + (0.5 if _ANSWER.search(response) else 0.0)


def answer_reward(response: str, numbers: Sequence[int], target: float) -> float:
    answers = _ANSWER.findall(response)
    if not answers:
        return 0.0
    expression = answers[-1].strip()
    used = [int(n) for n in re.findall(r"\d+", expression)]
    if Counter(used) != Counter(int(n) for n in numbers):
        return 0.0
    try:
        value = evaluate(expression)
    except ExpressionError:
        return 0.0
    return 1.0 if math.isfinite(value) and abs(value - target) < 1e-5 else 0.0


def reward(response: str, numbers: Sequence[int], target: float) -> float:
    """`0.1 × format_reward + answer_reward`, in [0, 1.1]."""
    return 0.1 * format_reward(response) + answer_reward(response, numbers, target)
