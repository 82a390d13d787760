"""`benchmarks/reproduce.py --scale toy`: every part and method runs 2 steps on tiny random models."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import reproduce
from benchmarks.reproduce_task import ArithmeticAnswer, leading_integer


def test_arithmetic_answer_reads_the_integer_the_completion_opens_with():
    assert leading_integer("56\n7*3") == 56 and leading_integer(" 24.5, which") == 24
    assert leading_integer("The answer is 56.") is None and leading_integer("") is None
    task = ArithmeticAnswer(digits=1, operation="*", shots=3, batch_size=4, eval_size=8)
    row = {"answer": 56.0}
    assert task.score("56\n", row) == (1.0, 1.0) and task.score("56.5", row) == (1.0, 1.0)
    assert task.score("5", row) == (0.0, 0.0) and task.score("567", row) == (0.0, 0.0)
    # the demonstrations and the training stream never show an evaluation pair
    held = {(a, b) for a in range(2, 10) for b in range(2, 10) if task._held_out(a, b)}
    assert 8 <= len(held) <= 24
    train = {tuple(map(int, line.split("=")[0].split("*"))) for line in task.demos.splitlines()}
    batch = task.train_batch(0)
    assert not train & held and task.render(task.user_text({"a": 6, "b": 9, "answer": 54})).startswith(task.demos)
    evals = task.eval_batches()
    assert sum(b["prompt"].shape[0] for b in evals) == 8 and batch["answer"].shape == (4,)
    assert {int(v) for b in evals for v in b["answer"]} <= {a * b for a, b in held}


def _toy(tmp_path, part: str, *extra: str) -> tuple[dict, list[str]]:
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--scale", "toy", "--out", str(out), "--work", str(work), "--parts", part]
    return reproduce.main(args + list(extra)), args


def _check_budgets(payload: dict, part: str) -> None:
    """Every run of `part` took its configured steps, from a step-0 evaluation, with metrics in [0, 1]
    and as many rollouts as its method spends per step × steps (a baseline: none, one evaluation)."""
    spec = payload["spec"]["parts"]
    metric = spec[part]["metric"]
    for method, seeds in payload["runs"][part].items():
        for run in seeds.values():
            if run.get("baseline"):  # evaluated at the start point only, no budget spent
                assert run["steps"] == run["rollouts"] == run["forwards"] == 0 and len(run["curve"]) == 1
                assert 0.0 <= run["after"][metric] <= 1.0
                continue
            cfg = reproduce._merge(spec[part]["common"], spec[part]["methods"][method])
            assert run["steps"] == cfg["steps"] and run["curve"][-1]["step"] == cfg["steps"]
            assert run["curve"][0]["step"] == 0
            for point in run["curve"]:
                assert math.isfinite(point[metric]) and 0.0 <= point[metric] <= 1.0, (part, method, point)
            opt, batch = cfg["optimizer"], cfg["task"]["batch_size"]
            expected = {"lowrank_es": opt.get("population", 0) * batch // opt.get("groups", 1),
                        "es": opt.get("population", 0) * batch, "policy_gradient": opt.get("group_size", 0) * batch,
                        "spsa": 2 * opt.get("n", 1) * batch, "backprop": 0}[opt["method"]]
            assert run["rollouts"] == expected * cfg["steps"], (part, method)


def _check_table(tmp_path, payload: dict, part: str, names: tuple[str, ...]) -> None:
    out = tmp_path / "results"
    on_disk = json.loads((out / "reproduce_toy.json").read_text())
    assert on_disk["runs"].keys() == payload["runs"].keys() == {part}
    markdown = (out / "reproduce_toy.md").read_text()
    for name in names:
        assert f"| {name} |" in markdown
    assert os.path.getsize(out / f"reproduce_toy_{part}.png") > 1000


@pytest.mark.slow
def test_reproduce_toy_reward_part_runs_every_method_with_its_budget(tmp_path):
    _, args = _toy(tmp_path, "reward")
    # a rerun keeps the runs the JSON has and adds a second seed where asked (the spread over seeds)
    payload = reproduce.main(args + ["--seeds", "2", "--methods", "sft_adam"])
    reward = payload["runs"]["reward"]
    assert set(reward) == {"lowrank_es", "es", "grpo", "mezo", "sft_adam"}
    assert {m: set(s) for m, s in reward.items()} == {m: ({"0", "1"} if m == "sft_adam" else {"0"}) for m in reward}
    _check_budgets(payload, "reward")
    # the budgets are the same where the table says they are
    assert len({reward[m]["0"]["rollouts"] for m in ("lowrank_es", "es", "grpo", "mezo")}) == 1
    assert reward["sft_adam"]["0"]["rollouts"] == 0
    assert "pass@2" in reward["es"]["0"]["after"]
    # pass@k bounds greedy-free accuracy from above: pass@2 >= pass@1
    assert reward["es"]["0"]["after"]["pass@2"] >= reward["es"]["0"]["after"]["pass@1"] - 1e-6
    sft = reproduce.summarize(payload)["reward"]["sft_adam"]
    assert sft["seeds"] == 2 and math.isfinite(sft["after"]["cross_entropy"][1])
    assert sft["after"]["cross_entropy"][0] < sft["before"]["cross_entropy"][0]  # Adam on the answers: CE falls
    _check_table(tmp_path, payload, "reward", ("lowrank_es", "grpo", "mezo", "sft_adam"))


@pytest.mark.slow
def test_reproduce_toy_classification_part_runs_every_method_at_equal_forwards(tmp_path):
    payload, _ = _toy(tmp_path, "classify")
    classify = payload["runs"]["classify"]
    assert set(classify) == {"mezo_full", "mezo_lora", "mezo_prefix", "es_lora", "adam", "zero_shot", "in_context",
                             "mezo_lora_in_context", "mezo_lora_k8", "adam_k8"}
    _check_budgets(payload, "classify")
    assert {m: r["0"]["forwards"] for m, r in classify.items()} == {
        "mezo_full": 8 * 2, "mezo_lora": 8 * 2, "mezo_prefix": 8 * 2, "es_lora": 8 * 2, "adam": 12,
        "zero_shot": 0, "in_context": 0, "mezo_lora_in_context": 8 * 2, "mezo_lora_k8": 8 * 2, "adam_k8": 12}
    # zero-shot is the trained methods' step-0 evaluation (the same model, prompts and eval set); the
    # demonstrations change the prompts, so the in-context scores differ
    for name in ("mezo_full", "adam"):
        for k in ("accuracy", "cross_entropy"):
            assert classify["zero_shot"]["0"]["after"][k] == pytest.approx(classify[name]["0"]["before"][k], abs=1e-5)
    assert classify["in_context"]["0"]["after"]["cross_entropy"] != pytest.approx(
        classify["zero_shot"]["0"]["after"]["cross_entropy"], abs=1e-6)
    # MeZO-LoRA from the in-context prompt starts where the in-context baseline is (its LoRA B factors are zero)
    for k in ("accuracy", "cross_entropy"):
        assert classify["mezo_lora_in_context"]["0"]["before"][k] == pytest.approx(
            classify["in_context"]["0"]["after"][k], abs=1e-5)
    # the k = 8 variants draw their training set from k = 8 per class, and so hold out other sentences
    spec = payload["spec"]["parts"]["classify"]
    for name in ("mezo_lora_k8", "adam_k8"):
        assert reproduce._merge(spec["common"], spec["methods"][name])["task"]["options"]["k"] == 8
    assert reproduce._merge(spec["common"], spec["methods"]["mezo_lora"])["task"]["options"]["k"] == 4
    assert all(set(seeds) == {"0"} for seeds in classify.values())
    # every trained method reports its dev-selected evaluation: the curve's point of best dev accuracy
    # (the earliest on ties), whose test accuracy the table shows beside the end's
    for name, seeds in classify.items():
        run = seeds["0"]
        if run.get("baseline"):
            assert "selected" not in run
            continue
        best = max(p["dev_accuracy"] for p in run["curve"])
        assert run["selected"] == next(p for p in run["curve"] if p["dev_accuracy"] == best), name
        assert 0.0 <= run["selected"]["dev_accuracy"] <= 1.0
    adam = reproduce.summarize(payload)["classify"]["adam"]
    assert adam["selected"]["accuracy"][0] == pytest.approx(classify["adam"]["0"]["selected"]["accuracy"])
    assert adam["selected_steps"] == [classify["adam"]["0"]["selected"]["step"]]
    _check_table(tmp_path, payload, "classify", ("mezo_prefix", "es_lora", "zero_shot", "in_context",
                                                 "mezo_lora_in_context", "mezo_lora_k8", "adam_k8"))
    markdown = (tmp_path / "results" / "reproduce_toy.md").read_text()
    assert "| accuracy dev-selected (steps) |" in markdown


@pytest.mark.slow
def test_reproduce_toy_paper_part_starts_on_a_qwen2_checkpoint(tmp_path):
    payload, _ = _toy(tmp_path, "paper")
    assert set(payload["runs"]["paper"]) == {"es_at_scale", "eggroll"}
    _check_budgets(payload, "paper")
    assert reproduce.summarize(payload)["paper"]["es_at_scale"]["rollouts_per_s"] > 0
    _check_table(tmp_path, payload, "paper", ("es_at_scale", "eggroll"))
    # the tiny Qwen2 stand-in really is a Qwen2-family checkpoint (q/k/v biases)
    config = json.loads((tmp_path / "work" / "tiny-qwen2" / "config.json").read_text())
    assert config["model_type"] == "qwen2"
