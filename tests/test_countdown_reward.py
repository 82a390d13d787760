"""The countdown reward against the ES-at-scale reference semantics (regexes + Python `eval`)."""

import random
import re

import pytest

from gfo.tasks.countdown_reward import ExpressionError, answer_reward, evaluate, format_reward, reward


# The reference's rules, restated with the regexes and the `eval` it uses (inputs here are small).
def reference_format(text):
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", text, re.DOTALL):
        return 1.0
    return (0.1 if re.search(r"<think>.*?<\/think>", text, re.DOTALL) else 0.0) + \
        (0.5 if re.search(r"<answer>.*?<\/answer>", text, re.DOTALL) else 0.0)


def reference_answer(response, numbers, target):
    found = re.findall(r"<answer>(.*?)<\/answer>", response, re.DOTALL)
    if not found:
        return 0.0
    content = found[-1]
    if not content or not re.match(r"^[0-9+\-*/() ]+$", content):
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", content)) != sorted(numbers):
        return 0.0
    try:
        value = eval(content, {"__builtins__": None}, {})  # noqa: S307 - small generated inputs only
        return 1.0 if abs(float(value) - float(target)) < 1e-5 else 0.0
    except Exception:  # noqa: BLE001 - the reference scores every failure 0
        return 0.0


def reference_reward(completion, numbers, target):
    return 0.1 * reference_format("<think>" + completion) + reference_answer(completion, numbers, target)


def python_eval(expression):
    import warnings

    warnings.simplefilter("ignore", SyntaxWarning)  # "'int' object is not callable" for `2(3)`
    try:
        return ("ok", eval(expression, {"__builtins__": None}, {}))  # noqa: S307
    except Exception:  # noqa: BLE001
        return ("error", None)


@pytest.mark.parametrize("expression", [
    "1+2*3", "(1+2)*3", "10/4", "-3+5", "2*-3", "((7))", " 8 - 2 - 1 ", "100/10/5", "7//2", "-7//2",
    "2**3**2", "-2**2", "2**-1", "(-2)**2", "2**-2**2", "--1", "+-+-4", "1--1", "00+0", "6/(1-1)",
    "0**-1", "012+1", "1 2", "2(3)", "(1)(2)", "()", "(()+1)", "2* *3", "2***3", "1+", "(1+2", "1+2)",
    "4//0", "(-8)**(1/3)", "99**99//99**98", "1+2\n", "(" * 200 + "1" + ")" * 200, "(" * 201 + "1" + ")" * 201,
])
def test_evaluate_agrees_with_python_eval(expression):
    kind, value = python_eval(expression)
    if kind == "error" or not isinstance(value, (int, float)):  # complex results, `()` tuples
        with pytest.raises((ExpressionError, TypeError)):
            float(evaluate(expression))
    else:
        assert evaluate(expression) == value and type(evaluate(expression)) is type(value)


def random_expression(rng: random.Random, depth=0) -> str:
    r = rng.random()
    if depth > 3 or r < 0.3:
        number = str(rng.randint(0, 30))
        return rng.choice([number, number, "0" + number, " " + number])
    if r < 0.4:
        return rng.choice(["-", "+", "- "]) + random_expression(rng, depth + 1)
    if r < 0.55:
        return "(" + random_expression(rng, depth + 1) + ")"
    op = rng.choice(["+", "-", "*", "/", "//", "**", " * ", "* *", ""])
    left, right = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    if op.strip() == "**" and not re.fullmatch(r"\s*[-+]?\s*\d{1,2}", right):
        right = str(rng.randint(0, 3))  # keep `eval` cheap: small exponents only
    return left + op + right


def test_evaluate_agrees_with_python_eval_on_random_expressions():
    rng, checked = random.Random(0), 0
    for _ in range(3000):
        expression = random_expression(rng)
        if expression.count("**") > 1:  # towers (a**b**c) can take `eval` minutes
            continue
        kind, value = python_eval(expression)
        try:
            ours = float(evaluate(expression))
        except (ExpressionError, TypeError, OverflowError):
            ours = None
        if kind == "error" or not isinstance(value, (int, float)):
            assert ours is None, expression
            continue
        try:
            expected = float(value)
        except OverflowError:
            assert ours is None, expression
            continue
        assert ours == expected, expression
        checked += 1
    assert checked > 800  # most random expressions are valid Python


def test_evaluate_bounds_work_where_eval_would_run_for_hours():
    with pytest.raises(ExpressionError, match="bits"):
        evaluate("9**9**9")
    assert evaluate("2**100") == 2**100


def test_reward_agrees_with_the_reference_on_structured_and_random_responses():
    rng = random.Random(1)
    numbers, target = [3, 5, 7], 22
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "3*5+7", "5*3+7", "3+5+7", "07+3*5",
              "3.0*5+7", "3*5+7\n", "(3*5)+7", "3 * 5 + 7", "x", "٣*5+7", "3**1*5+7", "15+7"]
    cases = ["3*5=15, +7</think>\n<answer>3*5+7</answer>", "</think>\n<answer>3*5+7</answer>\n",
             "</think>\n<answer>3*5+7</answer>\n\n", "...</think> <answer>3*5+7</answer>", "<answer>3*5+7</answer>"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    for completion in cases:
        assert reward(completion, numbers, target) == pytest.approx(reference_reward(completion, numbers, target)), \
            completion


@pytest.mark.parametrize("answer, expected", [
    ("3*5+7", 1.0), ("5*3+7", 1.0), ("3*5+7+0", 0.0), ("3*7+1", 0.0), ("3+5+7", 0.0), ("3.0*5+7", 0.0),
    ("٣*5+7", 0.0), ("03*5+7", 0.0), ("3**1*5+7", 0.0), ("(7+3*5)", 1.0), ("7+5*3\n", 1.0), ("", 0.0),
])
def test_answer_reward_cases(answer, expected):
    assert answer_reward(f"<answer>{answer}</answer>", [3, 5, 7], 22) == expected
    assert reference_answer(f"<answer>{answer}</answer>", [3, 5, 7], 22) == expected


def test_scoring_is_linear_in_the_response_length():
    # Quadratic tag scanning (a regex search restarted at each of n openings) would need ~n² = 10¹¹
    # character steps here; the find-based scan does a few passes over 1.6 MB.
    n = 200_000
    for text in ("<think>" * n, "<answer>" * n, "<think>" + "</think>\n<answer>" * n):
        assert 0.0 <= reward(text, [1, 2], 3) <= 1.1
    assert format_reward("<think>" + "a" * n + "</think>\n<answer>1</answer>") == 1.0
