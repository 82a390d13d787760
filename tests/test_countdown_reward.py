"""The countdown reward and its safe evaluator."""

import time

import pytest

from gfo.tasks.countdown_reward import ExpressionError, answer_reward, evaluate, format_reward, reward


@pytest.mark.parametrize("expression, value", [
    ("1+2*3", 7.0), ("(1+2)*3", 9.0), ("10/4", 2.5), ("-3+5", 2.0), ("2*-3", -6.0), ("((7))", 7.0),
    (" 8 - 2 - 1 ", 5.0), ("100/10/5", 2.0), ("1.5*2", 3.0),
])
def test_evaluate_matches_python_arithmetic(expression, value):
    assert evaluate(expression) == pytest.approx(value)
    assert evaluate(expression) == pytest.approx(eval(expression))  # noqa: S307 - the reference semantics


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unexpected character"), ("2**3", "unexpected"), ("1/0", "division by zero"),
    ("(1+2", "unexpected end"), ("1 2", "unexpected 2.0"), ("x+1", "unexpected character 'x'"),
    ("(" * 40 + "1" + ")" * 40, "nesting deeper"), ("1+" * 200 + "1", "longer than"),
])
def test_evaluate_refuses_unsafe_or_malformed_input(expression, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate(expression)


def test_evaluate_is_bounded_on_adversarial_input():
    start = time.perf_counter()
    for text in ["9*" * 127 + "9", "-" * 255 + "1", "(" * 32 + "1" + ")" * 32]:
        try:
            evaluate(text)
        except ExpressionError:
            pass
    assert time.perf_counter() - start < 0.5


def test_reward_follows_the_reference_rules():
    nums, target = [3, 5, 7], 22
    full = "<think>3*5=15, +7</think>\n<answer>3*5+7</answer>"
    assert format_reward(full) == 1.0 and reward(full, nums, target) == pytest.approx(1.1)
    assert format_reward("<answer>3*5+7</answer>") == 0.5
    assert format_reward("<think>hmm</think> <answer>1</answer>") == pytest.approx(0.6)
    assert format_reward("no tags") == 0.0
    assert reward("<answer>3*5+7</answer>", nums, target) == pytest.approx(1.05)
    assert answer_reward("<answer>5*3+7</answer>", nums, target) == 1.0  # order is free
    assert answer_reward("<answer>3*5+7+0</answer>", nums, target) == 0.0  # extra number
    assert answer_reward("<answer>3*7+1</answer>", nums, target) == 0.0  # wrong numbers
    assert answer_reward("<answer>3+5+7</answer>", nums, target) == 0.0  # wrong value
    assert answer_reward("<answer>1</answer><answer>7+5*3</answer>", nums, target) == 1.0  # the last counts
    assert answer_reward("<answer>3*5+7; import os</answer>", nums, target) == 0.0
