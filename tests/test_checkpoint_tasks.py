"""Tasks on a checkpoint's own tokenizer and chat template, and a `gfo train` run from a checkpoint directory."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import models
from gfo.run import build
from gfo.run.config import ConfigError, ModelSection, TaskSection
from gfo.tasks import TASKS
from gfo.tasks.countdown import REFERENCE_PREFIX, REFERENCE_SYSTEM
from gfo.tasks.gsm8k import extract_answer

from tests.test_text import CHATML, tokenizer_dir  # noqa: F401 - the shared tokenizer fixture


@pytest.fixture(scope="module")
def tok(tokenizer_dir):  # noqa: F811
    return models.load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):  # noqa: F811
    """A tiny Llama checkpoint directory holding the trained BPE tokenizer and its chat template."""
    path = tmp_path_factory.mktemp("ckpt")
    tok = models.load_tokenizer(str(tokenizer_dir))
    cfg = models.tiny("llama", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, max_seq_len=512)
    model = models.TransformerLM(cfg)
    models.save_pretrained(model, model.init(jax.random.key(0)), str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((tokenizer_dir / name).read_text())
    return path


def test_countdown_prompt_is_the_chat_template_continued_after_think(tok):
    transformers = pytest.importorskip("transformers")
    task = TASKS["countdown"](tokenizer=tok, batch_size=2, eval_size=2, max_new_tokens=16)
    assert task.style == "reference" and task.format.template == CHATML
    problem = {"numbers": [44, 19, 35], "target": 98, "solution": "44+19+35"}
    batch = task._batch([problem])
    ids = batch["prompt"][0][batch["prompt_mask"][0] == 1].tolist()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tok, chat_template=CHATML)
    messages = [{"role": "system", "content": REFERENCE_SYSTEM}, {"role": "user", "content": task.user_text(problem)},
                {"role": "assistant", "content": REFERENCE_PREFIX}]
    expected = hf.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert tok.decode(ids, skip_special_tokens=False).endswith("Let me solve this step by step.\n<think>")
    # The target for cross-entropy ends with the tokenizer's end token, the end of an assistant turn.
    target = batch["target"][0][batch["target_mask"][0] == 1].tolist()
    assert target[-1] == tok.eos_id and tok.decode(target) == "</think>\n<answer>44+19+35</answer>"
    assert task.stop_tokens == tok.eos_ids


@pytest.mark.slow
@pytest.mark.slow
def test_multi_token_label_words_score_the_sum_of_their_tokens(tok):
    model = models.TransformerLM(models.tiny("llama", vocab_size=tok.vocab_size, max_seq_len=256))
    params = model.init(jax.random.key(1))
    task = TASKS["prompt_classification"](tokenizer=tok, k=2, eval_size=4, batch_size=4,
                                          label_words=(" great equation", " terrible"))
    assert task.label_mask.sum(axis=1).tolist()[0] > 1  # the first label word spans several tokens
    batch = task.train_batch(0)
    scores = np.asarray(task.class_scores(model, params, batch))
    for row in range(2):
        prompt = batch["prompt"][row][batch["prompt_mask"][row] == 1].tolist()
        for c, word in enumerate(task.label_words):
            ids, total = tok.encode(word), 0.0
            for i, t in enumerate(ids):  # the chain rule, one token at a time
                logits = model.apply(params, np.asarray([prompt + ids[:i]]))[0, -1]
                total += float(jax.nn.log_softmax(logits)[t])
            assert scores[row, c] == pytest.approx(total, abs=1e-4)


def test_classification_reads_glue_sst2_tsv(tmp_path, tok):
    path = tmp_path / "train.tsv"
    lines = ["sentence\tlabel"] + [f"a {'lovely' if i % 2 else 'dull'} film number {i} \t{i % 2}" for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    task = TASKS["prompt_classification"](data_path=str(path), tokenizer=tok, k=2, eval_size=4, batch_size=4,
                                          label_words=(" terrible", " great"))
    assert len(task.train_set) == 4 and len(task.eval_set) == 4
    assert {text for text, _ in task.train_set + task.eval_set} <= {line.split("\t")[0] for line in lines[1:]}
    batch = task.train_batch(0)
    assert batch["prompt"].shape == (4, task.prompt_length)
    path.write_text("sentence\tlabel\nfine film\tpositive\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: column 'label' is 'positive', expected an integer"):
        TASKS["prompt_classification"](data_path=str(path), tokenizer=tok, k=1)


def test_in_context_demonstrations_come_from_train_with_their_label_words(tmp_path, tok):
    path = tmp_path / "train.tsv"
    lines = ["sentence\tlabel"] + [f"a {'lovely' if i % 2 else 'dull'} film {i}\t{i % 2}" for i in range(16)]
    path.write_text("\n".join(lines) + "\n")
    opts = dict(data_path=str(path), tokenizer=tok, k=3, eval_size=4, batch_size=4, label_words=(" bad", " good"),
                template="{text} It was", max_prompt_tokens=512)
    plain = TASKS["prompt_classification"](**opts)
    task = TASKS["prompt_classification"](demonstrations=2, **opts)
    assert task.eval_set == plain.eval_set and task.train_set == plain.train_set  # the splits do not move
    demos = task.context.splitlines()
    assert len(demos) == 4 and task.context.endswith("\n")
    train = {text: label for text, label in task.train_set}
    for line in demos:  # each a training sentence, rendered, followed by its own class's label word
        text = line.rsplit(" It was", 1)[0]
        assert text in train and line == f"{text} It was{(' bad', ' good')[train[text]]}"
    assert sorted(train[line.rsplit(' It was', 1)[0]] for line in demos) == [0, 0, 1, 1]  # two per class
    batch, base = task.eval_batches()[0], plain.eval_batches()[0]
    for row in range(4):  # the eval prompt is the demonstrations followed by the plain prompt, token for token
        ids = [int(t) for t, m in zip(batch["prompt"][row], batch["prompt_mask"][row]) if m]
        ref = [int(t) for t, m in zip(base["prompt"][row], base["prompt_mask"][row]) if m]
        text = task.eval_set[row][0]
        assert tok.decode(ids[1:]) == task.context + f"{text} It was" and ids[0] == ref[0]  # one BOS, first
        assert tok.decode(ref[1:]) == f"{text} It was"
    with pytest.raises(ValueError, match=r"demonstrations=2: the longest prompt .* above max_prompt_tokens=8"):
        TASKS["prompt_classification"](demonstrations=2, **{**opts, "max_prompt_tokens": 8})
    with pytest.raises(ValueError, match=r"demonstrations=4: class \d has only 3 training examples"):
        TASKS["prompt_classification"](demonstrations=4, **opts)


@pytest.mark.parametrize("text, value", [
    ("so 3 + 4 = 7.\nThe answer is \\boxed{7}.", 7.0), ("#### 1,234", 1234.0), ("I get $18.50.", 18.5),
    ("\\boxed{\\frac{1}{2}} wait \\boxed{12}", 12.0), ("first 3 then -4", -4.0), ("no number", None),
])
def test_gsm8k_answer_extraction(text, value):
    assert extract_answer(text) == value


def test_reasoning_gym_countdown_source(tok):
    pytest.importorskip("reasoning_gym")
    task = TASKS["countdown"](data_path="reasoning_gym:countdown", source_options={"size": 12, "min_numbers": 3,
                                                                                  "max_numbers": 4},
                              tokenizer=tok, batch_size=4, eval_size=4, max_new_tokens=8)
    assert task.train_size == 8 and task.n_numbers[0] >= 3
    for r in task.records:  # every reference solution earns the full answer reward
        assert task.score(f"</think>\n<answer>{r['solution']}</answer>",
                          {"numbers": np.asarray(r["numbers"]), "target_value": float(r["target"])}) == (1.1, 1.0)


def test_tokenizer_that_does_not_fit_the_model_is_refused(tokenizer_dir):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model.tokenizer=.*has \d+ ids but the model's vocabulary has 259 rows"):
        build.build_tokenizer(ModelSection(tokenizer=str(tokenizer_dir)), 259)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        build.build_tokenizer(ModelSection(tokenizer=str(tokenizer_dir.parent)), 10**6)
    with pytest.raises(ConfigError, match="chat_template='nope.jinja'"):
        build.build_task(TaskSection(name="countdown", chat_template="nope.jinja"), 0,
                         models.load_tokenizer(str(tokenizer_dir)))


@pytest.mark.slow
def test_train_from_a_checkpoint_uses_its_tokenizer_and_template(checkpoint, tmp_path, capsys):
    from gfo.run.config import load_config
    from gfo.run.train import train

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "name": "ckpt_countdown", "runs_dir": str(tmp_path / "runs"), "steps": 2, "eval_every": 2, "log_every": 1,
        "model": {"path": str(checkpoint)},
        "space": {"kind": "lora", "rank": 2, "targets": ["q", "v"]},
        "optimizer": {"method": "es", "population": 4, "sigma": 0.01, "lr": 0.01},
        "task": {"name": "countdown", "batch_size": 2, "eval_size": 2,
                 "options": {"max_new_tokens": 6, "stop_strings": ["</answer>"]}}}))
    result = train(load_config(str(config), []))
    losses = [r["loss"] for r in result["records"] if "loss" in r]
    assert losses and all(np.isfinite(losses))
    from gfo.run.evaluate import restore_run

    _, stage, _, step = restore_run(result["run_dir"])
    assert step == 2 and stage.task.style == "reference"
    assert stage.task.tokenizer.vocab_size == models.load_tokenizer(str(checkpoint)).vocab_size > 259
    batch = stage.task.eval_batches()[0]
    text = stage.task.tokenizer.decode(batch["prompt"][0][batch["prompt_mask"][0] == 1], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n" + REFERENCE_SYSTEM) and text.endswith(REFERENCE_PREFIX)
    assert "reward" in result["records"][-1]
