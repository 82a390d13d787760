"""Few-shot prompt classification through label words, the way MeZO fine-tunes (Gao et al. 2021).

Each example is rendered as `template.format(text=...)` (default `"{text} It was"`) and each class is a
label word (default `" great"` / `" terrible"`); the class score is the summed log-probability of the
label word's tokens after the prompt, and prediction is the arg-max over classes. Training uses a
fixed k-shot set (`k` examples per class), evaluation a disjoint set. Built-in data: sentences
synthesised from class-specific lexicons plus neutral words; or `data_path`: a JSONL file, a `datasets`
directory, or a CSV/TSV table with a header (GLUE's SST-2 `train.tsv`: `sentence\tlabel`) of records with
a text field (`text_field`, default `text`, else `sentence`) and an integer `label`. Prompts are plain
text by default (`task.chat_template: auto` wraps them in the checkpoint's template) and are padded
to one length, the longest prompt of the data (at most `max_prompt_tokens`, keeping the prompt's end).
`demonstrations` > 0 gives the in-context baseline (GPT-3's protocol): that many training examples per
class, drawn once with the seed and shuffled, each rendered with its label word (`template` + label),
are prepended to every prompt, one per line; a prompt that would not fit in `max_prompt_tokens` is an
error rather than a demonstration cut.
Objectives: `cross_entropy` over the class scores, `neg_accuracy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import models
from gfo.tasks.base import Task
from gfo.tasks.loaders import DataError, read_records
from models.tokenizer import pad_left

LEXICONS = (
    ("good", "great", "lovely", "superb", "fine", "brilliant", "fun", "charming"),
    ("bad", "awful", "boring", "dull", "poor", "terrible", "weak", "messy"),
)
NEUTRAL = ("the", "film", "was", "a", "plot", "and", "with", "story", "very", "acting", "cast", "of")


class PromptClassification(Task):
    name = "prompt_classification"
    objectives = ("cross_entropy", "neg_accuracy")
    default_objective = "cross_entropy"

    def __init__(self, k: int = 16, template: str = "{text} It was",
                 label_words: tuple[str, ...] = (" great", " terrible"), data_path: str | None = None,
                 max_prompt_tokens: int = 64, text_field: str | None = None, n_train: int | None = None,
                 demonstrations: int = 0, **kw):
        super().__init__(**kw)
        if "{text}" not in template:
            raise ValueError(f"prompt_classification template={template!r} must contain '{{text}}'")
        self.template, self.label_words, self.k = template, tuple(label_words), k
        self.max_prompt_tokens = max_prompt_tokens
        rng = np.random.default_rng([self.seed, 11])
        if data_path is None:
            if len(self.label_words) != len(LEXICONS):
                raise ValueError(f"built-in data has {len(LEXICONS)} classes; got {len(self.label_words)} label words")
            pool = [(self._synthesise(rng, c), c) for c in range(len(LEXICONS)) for _ in range(k + self.eval_size)]
        else:
            records = self._read(data_path, text_field)
            for i, r in enumerate(records):
                if not 0 <= r["label"] < len(self.label_words):
                    raise DataError(f"{data_path}: record {i} has label {r['label']}; expected 0.."
                                    f"{len(self.label_words) - 1} (one per label word)")
            pool = [(r["text"], r["label"]) for r in records]
        order = rng.permutation(len(pool))
        train, rest = [], []
        counts = [0] * len(self.label_words)
        if n_train is not None:  # MeZO's large-model setup: n_train examples drawn at random, not per class
            if not 1 <= n_train < len(pool):
                raise DataError(f"prompt_classification n_train={n_train}: the data has {len(pool)} examples")
            train, rest = [pool[i] for i in order[:n_train]], [pool[i] for i in order[n_train:]]
        else:
            for i in order:
                text, label = pool[i]
                if counts[label] < k:
                    train.append(pool[i])
                    counts[label] += 1
                else:
                    rest.append(pool[i])
            if min(counts) < k:
                raise DataError(f"prompt_classification k={k}: some class has only {min(counts)} examples")
        self.train_set, self.eval_set = train, rest[: self.eval_size]
        self._dev_pool = rest[self.eval_size:] if data_path is not None else None
        self.context = self._demonstrations(demonstrations, rng)
        longest = max(len(self.encode_prompt(self._prompt(t))) for t, _ in train + rest)
        if demonstrations and longest > max_prompt_tokens:
            raise DataError(f"prompt_classification demonstrations={demonstrations}: the longest prompt with its "
                            f"demonstrations is {longest} tokens, above max_prompt_tokens={max_prompt_tokens}; "
                            f"raise max_prompt_tokens to at least {longest}")
        self.prompt_length = min(longest, self.max_prompt_tokens)
        tok = self.tokenizer
        label_ids = [tok.encode(w) for w in self.label_words]
        L = max(len(ids) for ids in label_ids)
        self.label_tokens = np.full((len(label_ids), L), tok.pad_id, np.int32)
        self.label_mask = np.zeros((len(label_ids), L), np.int32)
        for c, ids in enumerate(label_ids):
            self.label_tokens[c, :len(ids)], self.label_mask[c, :len(ids)] = ids, 1

    def _demonstrations(self, per_class: int, rng) -> str:
        """The in-context prefix: `per_class` training examples of each class with their label words,
        shuffled, one per line ('' for none)."""
        if per_class < 0:
            raise ValueError(f"prompt_classification demonstrations={per_class}: expected >= 0 examples per class")
        if not per_class:
            return ""
        chosen = []
        for c in range(len(self.label_words)):
            pool = [t for t, y in self.train_set if y == c]
            if len(pool) < per_class:
                raise DataError(f"prompt_classification demonstrations={per_class}: class {c} has only "
                                f"{len(pool)} training examples")
            chosen += [(pool[i], c) for i in rng.choice(len(pool), per_class, replace=False)]
        order = rng.permutation(len(chosen))
        return "".join(self.template.format(text=chosen[i][0]) + self.label_words[chosen[i][1]] + "\n"
                       for i in order)

    def _prompt(self, text: str) -> str:
        """The prompt of one example: the demonstrations, then its rendered template."""
        return self.render(self.context + self.template.format(text=text))

    @staticmethod
    def _read(path: str, text_field: str | None) -> list[dict]:
        """Records `{"text", "label"}`; the text column is `text_field`, else `text`, else `sentence`."""
        records = read_records(path, {"label": int})
        field = text_field or ("sentence" if "text" not in records[0] and "sentence" in records[0] else "text")
        bad = next((i for i, r in enumerate(records) if not isinstance(r.get(field), str)), None)
        if bad is not None:
            raise DataError(f"{path}: record {bad} has no text field {field!r}; expected a string column "
                            f"'text' or 'sentence' (or set task.options text_field)")
        return [{"text": r[field], "label": r["label"]} for r in records]

    @staticmethod
    def _synthesise(rng, label: int) -> str:
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(3, 6))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(LEXICONS[label])))
        return " ".join(words) + "."

    def _batch(self, examples):
        ids = [self.encode_prompt(self._prompt(t))[-self.prompt_length:] for t, _ in examples]
        prompt, mask = pad_left(ids, self.tokenizer.pad_id, self.prompt_length)
        return {"prompt": prompt, "prompt_mask": mask, "label": np.asarray([y for _, y in examples], np.int32)}

    def train_batch(self, step):
        rng = self.rng("train", step)
        return self._batch([self.train_set[i] for i in rng.integers(0, len(self.train_set), self.batch_size)])

    def eval_batches(self):
        return [self._batch(self.eval_set[i:i + self.batch_size]) for i in range(0, len(self.eval_set), self.batch_size)]

    def dev_batches(self, n: int):
        """`n` dev examples: from a data file, the examples after the eval split (disjoint from train and
        eval); built-in data synthesises them from the dev stream."""
        if self._dev_pool is None:
            rng = self.rng("dev")
            dev = [(self._synthesise(rng, c), c) for c in rng.integers(0, len(LEXICONS), n)]
        elif len(self._dev_pool) < n:
            raise DataError(f"prompt_classification: dev_size={n} but only {len(self._dev_pool)} examples remain "
                            f"after train ({len(self.train_set)}) and eval ({len(self.eval_set)})")
        else:
            dev = self._dev_pool[:n]
        return [self._batch(dev[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]

    def class_scores(self, model, params, batch) -> jax.Array:
        """`[B, C]` summed log-probabilities of each class's label word after the prompt."""
        B = batch["prompt"].shape[0]
        C = self.label_tokens.shape[0]
        logp = models.completion_logprobs(model, params, jnp.repeat(batch["prompt"], C, axis=0),
                                          jnp.repeat(batch["prompt_mask"], C, axis=0),
                                          jnp.tile(self.label_tokens, (B, 1)), jnp.tile(self.label_mask, (B, 1)))
        return jnp.sum(logp, axis=1).reshape(B, C)

    def _objective(self, name, model, to_params):
        if name == "cross_entropy":
            def loss(x, batch, key):
                scores = self.class_scores(model, to_params(x), batch)
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(scores), batch["label"][:, None], 1))
            return loss
        return lambda x, batch, key: -self.metrics(model, to_params(x), batch, key)["accuracy"]

    def metrics(self, model, params, batch, key):
        scores = self.class_scores(model, params, batch)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(scores), batch["label"][:, None], 1))
        return {"accuracy": jnp.mean((jnp.argmax(scores, axis=1) == batch["label"]).astype(jnp.float32)),
                "cross_entropy": ce}
