"""The countdown reward on generated text, with a safe evaluator that agrees with Python's `eval`.

Reward (ES at scale, Qiu et al. 2025, `countdown/countdown_task.py` in VsonicV/es-fine-tuning-paper):
`0.1 × format + answer`, computed on a completion that follows a prompt ending in `<think>`:
- `format` is scored on `"<think>" + completion`: 1.0 for the whole text being
  `<think>…</think>\\n<answer>…</answer>` (an optional final newline), else 0.1 if it has a think block
  plus 0.5 if it has an answer block;
- `answer` is 1.0 when the last `<answer>…</answer>` holds only ASCII digits, `+ - * / ( )` and spaces,
  uses exactly the given numbers (as a multiset) and evaluates to the target within 1e-5.

The reference evaluates the answer with Python's `eval`. `evaluate` gives the same value (Python's own
int/float arithmetic: `//`, `**` with right associativity, unary signs, `-2**2 == -4`, true division
of ints) and the same failures (leading zeros such as `012`, juxtaposed operands, `()`, division by
zero, overflow, complex results, more than 200 nested parentheses), with bounded work: an operator-
precedence parser without recursion (linear time), and integer intermediates capped at
`MAX_INT_BITS` bits (the reference would compute `9**9**9` for hours; here it scores 0). The tag
scanning uses `str.find` only, so scoring is linear in the length of the response.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

MAX_INT_BITS = 1 << 16
MAX_PAREN_DEPTH = 200  # Python's tokenizer refuses deeper nesting
_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")  # `$` admits one final newline, as in the reference


class ExpressionError(ValueError):
    """An expression that Python's `eval` would reject (or that exceeds the work bound)."""


_BINARY = {"+": (1, "left"), "-": (1, "left"), "*": (2, "left"), "/": (2, "left"), "//": (2, "left"),
           "**": (4, "right")}
_UNARY_PRECEDENCE = 3  # binds looser than ** on its right: -2**2 == -(2**2)


def _tokens(expression: str) -> list[str]:
    tokens, i, n = [], 0, len(expression)
    while i < n:
        c = expression[i]
        if c in " \t\n":
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= expression[j] <= "9":
                j += 1
            digits = expression[i:j]
            if len(digits) > 1 and digits[0] == "0" and digits.strip("0"):
                raise ExpressionError(f"leading zeros in {digits!r}")
            tokens.append(digits)
            i = j
        elif c in "*/" and expression[i:i + 2] in ("**", "//"):
            tokens.append(expression[i:i + 2])
            i += 2
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {c!r}")
    return tokens


def _apply(op: str, a, b=None):
    if b is None:
        return -a if op == "u-" else +a
    if op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) > MAX_INT_BITS:
            raise ExpressionError(f"{a}**{b} exceeds {MAX_INT_BITS} bits")
    try:
        value = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                 "//": lambda: a // b, "**": lambda: a ** b}[op]()
    except (ArithmeticError, TypeError, ValueError) as e:
        raise ExpressionError(f"{op}: {e}") from None
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ExpressionError(f"an intermediate value exceeds {MAX_INT_BITS} bits")
    return value


def evaluate(expression: str):
    """The value `eval(expression)` has in Python, for digits, `+ - * / // **`, parentheses and spaces.

    Raises ExpressionError where `eval` raises (or for integers beyond `MAX_INT_BITS`).
    """
    operands: list = []
    operators: list[str] = []  # binary ops, "u+"/"u-", and "("

    def reduce_top():
        op = operators.pop()
        if op in ("u+", "u-"):
            operands.append(_apply(op, operands.pop()))
        else:
            b, a = operands.pop(), operands.pop()
            operands.append(_apply(op, a, b))

    expect_operand, depth = True, 0
    tokens = _tokens(expression)
    for k, tok in enumerate(tokens):
        if expect_operand:
            if tok in ("+", "-"):
                operators.append("u" + tok)
            elif tok == "(":
                depth += 1
                if depth > MAX_PAREN_DEPTH:
                    raise ExpressionError(f"more than {MAX_PAREN_DEPTH} nested parentheses")
                if k + 1 < len(tokens) and tokens[k + 1] == ")":
                    raise ExpressionError("'()' is an empty tuple, not a number")
                operators.append("(")
            elif tok[0].isdigit():
                operands.append(int(tok))
                expect_operand = False
            else:
                raise ExpressionError(f"unexpected {tok!r} where a number was expected")
        elif tok == ")":
            while operators and operators[-1] != "(":
                reduce_top()
            if not operators:
                raise ExpressionError("unmatched ')'")
            operators.pop()
            depth -= 1
        elif tok in _BINARY:
            precedence, assoc = _BINARY[tok]
            while operators and operators[-1] != "(":
                top = operators[-1]
                top_precedence = _UNARY_PRECEDENCE if top in ("u+", "u-") else _BINARY[top][0]
                if top_precedence > precedence or (top_precedence == precedence and assoc == "left"):
                    reduce_top()
                else:
                    break
            operators.append(tok)
            expect_operand = True
        else:
            raise ExpressionError(f"unexpected {tok!r} after an operand (a call or juxtaposition)")
    if expect_operand:
        raise ExpressionError("unexpected end of expression")
    while operators:
        if operators[-1] == "(":
            raise ExpressionError("missing ')'")
        reduce_top()
    return operands[0]


def _has_block(text: str, start: str, end: str) -> bool:
    i = text.find(start)
    return i >= 0 and text.find(end, i + len(start)) >= 0


def _last_answer(text: str) -> str | None:
    """The content of the last non-overlapping `<answer>…</answer>` (as `re.findall` pairs them)."""
    last, pos = None, 0
    while True:
        i = text.find("<answer>", pos)
        if i < 0:
            return last
        j = text.find("</answer>", i + 8)
        if j < 0:
            return last
        last, pos = text[i + 8:j], j + 9


def format_reward(text: str) -> float:
    """1.0 for `<think>…</think>\\n<answer>…</answer>` (optionally one final newline), else 0.1 for a
    think block + 0.5 for an answer block. `text` already includes the opening `<think>`."""
    body = text[:-1] if text.endswith("\n") else text
    if body.startswith("<think>") and body.endswith("</answer>"):
        k = body.find("</think>\n<answer>", 7)
        if k >= 0 and k + len("</think>\n<answer>") <= len(body) - len("</answer>"):
            return 1.0
    return (0.1 if _has_block(text, "<think>", "</think>") else 0.0) + \
        (0.5 if _has_block(text, "<answer>", "</answer>") else 0.0)


def answer_reward(response: str, numbers: Sequence[int], target: float) -> float:
    content = _last_answer(response)
    if not content or not _ALLOWED.match(content):
        return 0.0
    try:  # int() refuses literals of more than 4,300 digits, as `eval` does
        if Counter(int(n) for n in re.findall(r"\d+", content)) != Counter(int(n) for n in numbers):
            return 0.0
        value = float(evaluate(content))
    except (ValueError, OverflowError, TypeError):  # ExpressionError is a ValueError
        return 0.0
    return 1.0 if abs(value - float(target)) < 1e-5 else 0.0


def reward(completion: str, numbers: Sequence[int], target: float, think_prefix: bool = True) -> float:
    """`0.1 × format + answer` in [0, 1.1] of a completion generated after a prompt ending in `<think>`
    (`think_prefix=True`, the reference); with `think_prefix=False` the completion opens its own
    `<think>` (the compact prompts of the tiny models)."""
    shaped = "<think>" + completion if think_prefix else completion
    return 0.1 * format_reward(shaped) + answer_reward(completion, numbers, target)
