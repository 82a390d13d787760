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


@pytest.mark.slow
def test_reproduce_toy_runs_every_method_with_its_budget(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--scale", "toy", "--out", str(out), "--work", str(work)]
    reproduce.main(args)
    # a rerun keeps the runs the JSON has and adds a second seed where asked (the spread over seeds)
    payload = reproduce.main(args + ["--seeds", "2", "--parts", "reward", "--methods", "sft_adam"])
    spec = payload["spec"]["parts"]
    assert set(payload["runs"]) == {"reward", "classify", "paper"}
    assert set(payload["runs"]["reward"]) == {"lowrank_es", "es", "grpo", "mezo", "sft_adam"}
    assert set(payload["runs"]["classify"]) == {"mezo_full", "mezo_lora", "mezo_prefix", "es_lora", "adam",
                                                "zero_shot", "in_context"}
    assert set(payload["runs"]["paper"]) == {"es_at_scale", "eggroll"}
    on_disk = json.loads((out / "reproduce_toy.json").read_text())
    assert on_disk["runs"].keys() == payload["runs"].keys()
    for part, methods in payload["runs"].items():
        metric = spec[part]["metric"]
        for method, seeds in methods.items():
            assert set(seeds) == ({"0", "1"} if method == "sft_adam" else {"0"}), (part, method)
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
    # the budgets are the same where the table says they are
    reward = payload["runs"]["reward"]
    assert len({reward[m]["0"]["rollouts"] for m in ("lowrank_es", "es", "grpo", "mezo")}) == 1
    assert reward["sft_adam"]["0"]["rollouts"] == 0
    assert "pass@2" in reward["es"]["0"]["after"]
    # pass@k bounds greedy-free accuracy from above: pass@2 >= pass@1
    assert reward["es"]["0"]["after"]["pass@2"] >= reward["es"]["0"]["after"]["pass@1"] - 1e-6
    classify = payload["runs"]["classify"]
    assert {m: r["0"]["forwards"] for m, r in classify.items()} == {
        "mezo_full": 8 * 2, "mezo_lora": 8 * 2, "mezo_prefix": 8 * 2, "es_lora": 8 * 2, "adam": 12,
        "zero_shot": 0, "in_context": 0}
    # zero-shot is the trained methods' step-0 evaluation (the same model, prompts and eval set); the
    # demonstrations change the prompts, so the in-context scores differ
    for name in ("mezo_full", "adam"):
        for k in ("accuracy", "cross_entropy"):
            assert classify["zero_shot"]["0"]["after"][k] == pytest.approx(classify[name]["0"]["before"][k], abs=1e-5)
    assert classify["in_context"]["0"]["after"]["cross_entropy"] != pytest.approx(
        classify["zero_shot"]["0"]["after"]["cross_entropy"], abs=1e-6)
    table = reproduce.summarize(payload)
    sft = table["reward"]["sft_adam"]
    assert sft["seeds"] == 2 and math.isfinite(sft["after"]["cross_entropy"][1])
    assert sft["after"]["cross_entropy"][0] < sft["before"]["cross_entropy"][0]  # Adam on the answers: CE falls
    assert table["paper"]["es_at_scale"]["rollouts_per_s"] > 0
    markdown = (out / "reproduce_toy.md").read_text()
    for name in ("lowrank_es", "grpo", "mezo", "sft_adam", "mezo_prefix", "es_lora", "eggroll", "zero_shot", "in_context"):
        assert f"| {name} |" in markdown
    for part in ("reward", "classify", "paper"):
        assert os.path.getsize(out / f"reproduce_toy_{part}.png") > 1000
    # the tiny Qwen2 stand-in really is a Qwen2-family checkpoint (q/k/v biases)
    config = json.loads((work / "tiny-qwen2" / "config.json").read_text())
    assert config["model_type"] == "qwen2"
