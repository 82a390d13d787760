"""Built-in tasks: deterministic data, objectives that agree with metrics, loaders with clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from gfo.tasks import TASKS
from gfo.tasks.loaders import DataError
from gfo.tasks.tagging import Tagging, entities, entity_report


@pytest.fixture(scope="module")
def model():
    m = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=1, n_heads=2))
    return m, m.init(jax.random.key(0))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("It was the best of times, it was the worst of times. " * 20)
    return str(path)


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm") / "gsm8k.jsonl"
    rows = [{"question": f"Ann has {i} apples and buys {i + 2} more. How many apples?",
             "answer": f"She has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
            for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_batches_are_deterministic_and_objectives_match_metrics(name, model, text_file, gsm8k_file):
    m, params = model
    extra = {"text_lm": {"data_path": text_file, "seq_len": 16},
             "gsm8k": {"data_path": gsm8k_file, "max_new_tokens": 6}}.get(name, {})
    task = TASKS[name](seed=3, batch_size=4, eval_size=8, **extra)
    a, b, c = task.train_batch(5), task.train_batch(5), task.train_batch(6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert sum(len(next(iter(e.values()))) for e in task.eval_batches()) == 8
    metrics = jax.tree.map(float, task.metrics(m, params, a, jax.random.key(0)))
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for objective in task.objectives:
        loss = float(jax.jit(task.objective(objective, m, lambda x: x))(params, a, jax.random.key(0)))
        assert np.isfinite(loss)
        mirror = {"cross_entropy": metrics.get("cross_entropy"), "neg_exact_match": -metrics.get("exact_match", 0),
                  "neg_accuracy": -metrics.get("accuracy", 0), "neg_f1": -metrics.get("f1", 0),
                  "neg_reward": -metrics.get("reward", 0)}[objective]
        assert loss == pytest.approx(mirror, rel=1e-4, abs=1e-5), (name, objective)
    with pytest.raises(ValueError, match="has no objective 'accuracy'"):
        task.objective("accuracy", m, lambda x: x)


def test_completion_tasks_render_correct_references():
    tok = models.ByteTokenizer()
    arith = TASKS["arithmetic"](digits=3, batch_size=8)
    batch = arith.train_batch(0)
    for p, pm, t, tm in zip(batch["prompt"], batch["prompt_mask"], batch["target"], batch["target_mask"]):
        prompt, answer = tok.decode(p[pm == 1]), tok.decode(t[tm == 1])
        a, b = prompt[:-1].split("+")
        assert int(answer) == int(a) + int(b) and t[tm == 1][-1] == tok.eos_id
    batch = TASKS["sort"](length=6, batch_size=4).train_batch(0)
    for p, pm, t, tm in zip(batch["prompt"], batch["prompt_mask"], batch["target"], batch["target_mask"]):
        assert tok.decode(t[tm == 1]) == "".join(sorted(tok.decode(p[pm == 1])[:-1]))
    cd = TASKS["countdown"](n_numbers=4, batch_size=4)
    batch = cd.train_batch(1)
    from gfo.tasks.countdown_reward import reward
    for t, tm, nums, target in zip(batch["target"], batch["target_mask"], batch["numbers"], batch["target_value"]):
        reference = tok.decode(t[tm == 1])
        assert reward(reference, nums.tolist(), float(target)) == pytest.approx(1.1)


def test_entity_report_matches_hand_counts():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    r = entity_report(true, pred)
    assert r["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["LOC"]["precision"] == 0.5 and r["LOC"]["recall"] == 0.5 and r["LOC"]["support"] == 2
    assert r["micro"]["precision"] == pytest.approx(2 / 3) and r["micro"]["recall"] == 0.5
    assert r["macro"]["f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert r["weighted"]["f1"] == pytest.approx((2 / 3 * 2 + 0.5 * 2) / 4)


def test_loaders_read_real_files_and_name_bad_lines(tmp_path, model):
    m, params = model
    good = tmp_path / "cls.jsonl"
    lines = [{"text": f"{w} movie", "label": i % 2} for i, w in enumerate(["good", "bad"] * 20)]
    good.write_text("\n".join(json.dumps(r) for r in lines))
    task = TASKS["prompt_classification"](data_path=str(good), k=4, batch_size=4, eval_size=8)
    assert len(task.train_set) == 8 and len(task.eval_set) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        TASKS["prompt_classification"](data_path=str(bad), k=1)
    bad.write_text(json.dumps({"text": "x", "label": "pos"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'label' is str, expected int"):
        TASKS["prompt_classification"](data_path=str(bad), k=1)
    tags = tmp_path / "tags.jsonl"
    tags.write_text(json.dumps({"tokens": ["ada", "in", "rome"], "tags": ["B-PER", "O", "B-LOC"]}) + "\n"
                    + json.dumps({"tokens": ["x"], "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"'tokens' has 1 items but 'tags' has 2"):
        Tagging(data_path=str(tags))
    with pytest.raises(DataError, match="does not exist"):
        Tagging(data_path=str(tmp_path / "missing.jsonl"))


def test_text_lm_and_countdown_read_local_files(tmp_path, text_file):
    task = TASKS["text_lm"](data_path=text_file, seq_len=16, batch_size=2)
    assert task.train_batch(0)["tokens"].shape == (2, 17)
    with pytest.raises(DataError, match="need at least seq_len"):
        TASKS["text_lm"](data_path=text_file, seq_len=500)
    # The ES-at-scale reference's countdown.json shape: target as a string, a pre-rendered "context".
    from gfo.tasks.countdown import REFERENCE_PREFIX, REFERENCE_SYSTEM

    problems = tmp_path / "countdown.jsonl"
    rows = [{"id": i, "numbers": [44, 19, i + 1], "target": str(63 + i + 1), "solution": f"((44 + 19) + {i + 1})"}
            for i in range(6)]
    for r in rows:
        r["context"] = (REFERENCE_SYSTEM + f"Using the numbers [{' '.join(map(str, r['numbers']))}], create an equation "
                        f"that equals {r['target']}. You can use basic arithmetic operations (+, -, *, /) and each "
                        "number can only be used once. Show your work in <think> </think> tags. And return the final "
                        "answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>." + REFERENCE_PREFIX)
    problems.write_text("\n".join(json.dumps(r) for r in rows))
    cd = TASKS["countdown"](data_path=str(problems), prompt="reference", chat_template="none", batch_size=2,
                            eval_size=2, max_new_tokens=4)
    tok = cd.tokenizer
    seen = []
    for step in (0, 1):  # one epoch over the 4 training questions: each drawn exactly once
        batch = cd.train_batch(step)
        for ids, mask in zip(batch["prompt"], batch["prompt_mask"]):
            text = tok.decode(ids[mask == 1])
            match = [r for r in rows if r["context"] == text]
            assert len(match) == 1  # the prompt is the reference's context, byte for byte
            seen.append(match[0]["id"])
    assert sorted(seen) == [0, 1, 2, 3]
    assert [int(v) for v in cd.eval_batches()[0]["target_value"]] == [68, 69]  # the held-out questions
    # The reward is computed on "<think>" + completion, as the reference does.
    assert cd.score("reasoning</think>\n<answer>(44 + 19) + 5</answer>", {"numbers": np.asarray([44, 19, 5, -1]),
                                                                             "target_value": 68.0}) == (1.1, 1.0)
    problems.write_text('{"numbers": [3, 4, 5, 1, 1, 1, 1], "target": 12}\n' * 3)
    with pytest.raises(DataError, match=r"record 0 has 7 numbers; expected 2..6"):
        TASKS["countdown"](data_path=str(problems), eval_size=1)
    problems.write_text('{"numbers": "3 4", "target": 12}\n' * 3)
    with pytest.raises(DataError, match=r"record 0 has numbers '3 4'; expected a list"):
        TASKS["countdown"](data_path=str(problems), eval_size=1)


def test_reasoning_dev_split_is_disjoint_from_train_and_eval(tmp_path):
    problems = tmp_path / "countdown.jsonl"
    problems.write_text("\n".join(json.dumps({"numbers": [i, 2], "target": i + 2}) for i in range(1, 11)))
    task = TASKS["countdown"](data_path=str(problems), batch_size=2, eval_size=2, train_size=5)
    targets = lambda batches: sorted(int(t) for b in batches for t in b["target_value"])  # noqa: E731
    assert targets(task.eval_batches()) == [8, 9]
    assert targets(task.dev_batches(3)) == [10, 11, 12]
    with pytest.raises(DataError, match="dev_size=4 but only 3 records remain"):
        task.dev_batches(4)
    generated = TASKS["countdown"](seed=1, batch_size=4, eval_size=4)
    dev = {tuple(r) for b in generated.dev_batches(4) for r in b["numbers"].tolist()}
    assert len(dev) > 1 and dev != {tuple(r) for b in generated.eval_batches() for r in b["numbers"].tolist()}


def test_reasoning_task_samples_with_its_top_k_and_top_p(model):
    """countdown's `top_k` / `top_p` options reach every sampled generation: its rollouts equal
    `models.generate` at the same truncation (and, on a flat random model, differ from untruncated
    sampling), and bad values name themselves."""
    m, params = model
    task = TASKS["countdown"](n_numbers=3, batch_size=4, temperature=1.0, top_p=0.3, top_k=5, max_new_tokens=6)
    batch, key = task.train_batch(0), jax.random.key(3)
    out = task.generate(m, params, batch, key)
    ref = models.generate(m, params, batch["prompt"], batch["prompt_mask"], key, 6, temperature=1.0, top_k=5,
                          top_p=0.3, stop_tokens=task.stop_tokens)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    free = models.generate(m, params, batch["prompt"], batch["prompt_mask"], key, 6, temperature=1.0,
                           stop_tokens=task.stop_tokens)
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(free.tokens))
    with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
        TASKS["countdown"](top_p=0)
    with pytest.raises(ValueError, match=r"task.options.top_k=-1 is invalid: expected an integer >= 0 \(0 = no top-k truncation\)"):
        TASKS["countdown"](top_k=-1)
