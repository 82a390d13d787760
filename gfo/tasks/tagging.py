"""Entity tagging (BIO) with a per-class precision / recall / F1 report.

The LM reads the sentence left to right and tags each word at its last token, from the logits
restricted to one token per tag (tag `i` ↔ byte `chr(65 + i)`). Built-in data: sentences of neutral
words with person and location names (1–2 words) inserted; or `data_path`, JSONL of
`{"tokens": [str], "tags": [str]}` with BIO tags. Metrics: token accuracy and entity-level micro F1
(conlleval rules: an entity starts at `B-X`, or at `I-X` after anything but `X`); `entity_report`
gives per-class P/R/F1 with support and micro/macro/weighted averages. Objectives: `cross_entropy`,
`neg_f1` (entity micro F1, computed on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gfo.tasks.base import Task
from gfo.tasks.loaders import DataError, check_same_length, read_records

NAMES = {"PER": ("ada", "alan", "grace hopper", "marie", "linus", "ada lovelace", "kurt"),
         "LOC": ("paris", "new york", "oslo", "rome", "cape town", "lima", "kyoto")}
FILLER = ("met", "in", "the", "city", "of", "and", "visited", "yesterday", "with", "from", "near")


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """`(class, start, end)` spans of a BIO sequence (conlleval: `I-X` after non-`X` starts one)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, cls = tag.partition("-")
        continues = prefix == "I" and kind == cls
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, cls
    return spans


def entity_report(true: list[list[str]], pred: list[list[str]]) -> dict:
    """Per-class `{precision, recall, f1, support}` and `micro`/`macro`/`weighted` averages."""
    tp, n_pred, n_true = {}, {}, {}
    for t, p in zip(true, pred):
        te, pe = entities(t), entities(p)
        for kind, *_ in te:
            n_true[kind] = n_true.get(kind, 0) + 1
        for kind, *_ in pe:
            n_pred[kind] = n_pred.get(kind, 0) + 1
        for kind, *_ in te & pe:
            tp[kind] = tp.get(kind, 0) + 1

    def prf(t, np_, nt):
        precision = t / np_ if np_ else 0.0
        recall = t / nt if nt else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": nt}

    classes = sorted(set(n_true) | set(n_pred))
    report = {c: prf(tp.get(c, 0), n_pred.get(c, 0), n_true.get(c, 0)) for c in classes}
    report["micro"] = prf(sum(tp.values()), sum(n_pred.values()), sum(n_true.values()))
    per = [report[c] for c in classes]
    total = sum(r["support"] for r in per)
    for avg, weights in (("macro", [1.0] * len(per)), ("weighted", [r["support"] for r in per])):
        norm = sum(weights) or 1.0
        report[avg] = {k: sum(w * r[k] for w, r in zip(weights, per)) / norm for k in ("precision", "recall", "f1")}
        report[avg]["support"] = total
    return report


class Tagging(Task):
    name = "tagging"
    objectives = ("cross_entropy", "neg_f1")
    default_objective = "cross_entropy"

    def __init__(self, data_path: str | None = None, max_words: int = 12, **kw):
        super().__init__(**kw)
        self.max_words = max_words
        if data_path is None:
            classes = sorted(NAMES)
            self.records = None
        else:
            self.records = read_records(data_path, {"tokens": list, "tags": list})
            for i, r in enumerate(self.records):
                check_same_length(r, "tokens", "tags", f"{data_path}[{i}]")
                bad = [t for t in r["tags"] if not (t == "O" or t[:2] in ("B-", "I-"))]
                if bad:
                    raise DataError(f"{data_path}[{i}]: tag {bad[0]!r} is not BIO (expected 'O', 'B-X' or 'I-X')")
            classes = sorted({t[2:] for r in self.records for t in r["tags"] if t != "O"})
        self.tags = ["O"] + [f"{p}-{c}" for c in classes for p in ("B", "I")]
        if len(self.tags) > 26:
            raise DataError(f"tagging supports up to 12 entity classes; got {len(classes)}")
        # A tag is read from the logit of a letter token ("A", "B", …) at its word's last token.
        self.tag_tokens = np.asarray([self.tokenizer.encode(chr(65 + i))[0] for i in range(len(self.tags))], np.int32)
        words = [w for r in self.records for w in r["tokens"]] if self.records else \
            [w for names in NAMES.values() for n in names for w in n.split()] + list(FILLER)
        longest = max(len(w.encode("utf-8")) for w in words) + 1
        self.seq_length = self.max_words * longest  # tokens ≤ bytes, for every tokenizer

    def _sentence(self, rng):
        words, tags = [], []
        for _ in range(int(rng.integers(3, 7))):
            if rng.random() < 0.3:
                cls = str(rng.choice(sorted(NAMES)))
                parts = str(rng.choice(NAMES[cls])).split()
                words += parts
                tags += [f"B-{cls}"] + [f"I-{cls}"] * (len(parts) - 1)
            else:
                words.append(str(rng.choice(FILLER)))
                tags.append("O")
        return words[: self.max_words], tags[: self.max_words]

    def make_batch(self, rng, size):
        if self.records is None:
            examples = [self._sentence(rng) for _ in range(size)]
        else:
            examples = [(self.records[i]["tokens"][: self.max_words], self.records[i]["tags"][: self.max_words])
                        for i in rng.integers(0, len(self.records), size)]
        texts = [" ".join(w) for w, _ in examples]
        T = self.seq_length
        tokens = np.full((size, T), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((size, T), np.int32)
        ends = np.zeros((size, self.max_words), np.int32)
        labels = np.zeros((size, self.max_words), np.int32)
        word_mask = np.zeros((size, self.max_words), np.int32)
        for r, (words, tags) in enumerate(examples):
            for j, t in enumerate(tags):  # a word ends where the encoding of the words up to it ends
                ends[r, j] = len(self.tokenizer.encode(" ".join(words[:j + 1]))) - 1
                labels[r, j], word_mask[r, j] = self.tags.index(t), 1
            ids = self.tokenizer.encode(texts[r])
            tokens[r, :len(ids)], mask[r, :len(ids)] = ids, 1  # right-padded: causal reading is unaffected
        return {"tokens": tokens, "mask": mask, "word_end": ends, "labels": labels, "word_mask": word_mask}

    def tag_logits(self, model, params, batch) -> jax.Array:
        """`[B, W, n_tags]` logits of each word's tag, read at the word's last token."""
        logits = model.apply(params, batch["tokens"], batch["mask"])
        at_ends = jnp.take_along_axis(logits, batch["word_end"][:, :, None], axis=1)
        return at_ends[..., self.tag_tokens]

    def _ce(self, logits, batch):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        w = batch["word_mask"].astype(jnp.float32)
        return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

    def _objective(self, name, model, to_params):
        if name == "cross_entropy":
            return lambda x, batch, key: self._ce(self.tag_logits(model, to_params(x), batch), batch)
        return lambda x, batch, key: -self.metrics(model, to_params(x), batch, key)["f1"]

    def predict(self, model, params, batch) -> jax.Array:
        return jnp.argmax(self.tag_logits(model, params, batch), axis=-1)

    def report(self, labels: np.ndarray, predictions: np.ndarray, word_mask: np.ndarray) -> dict:
        """`entity_report` of integer tag arrays `[B, W]` (host side)."""
        true = [[self.tags[t] for t, m in zip(row, ms) if m] for row, ms in zip(labels, word_mask)]
        pred = [[self.tags[t] for t, m in zip(row, ms) if m] for row, ms in zip(predictions, word_mask)]
        return entity_report(true, pred)

    def metrics(self, model, params, batch, key):
        logits = self.tag_logits(model, params, batch)
        pred = jnp.argmax(logits, axis=-1)
        w = batch["word_mask"].astype(jnp.float32)
        accuracy = jnp.sum((pred == batch["labels"]) * w) / jnp.maximum(jnp.sum(w), 1.0)
        f1 = jax.pure_callback(lambda l, p, m: np.float32(self.report(l, p, m)["micro"]["f1"]),
                               jax.ShapeDtypeStruct((), jnp.float32), batch["labels"], pred, batch["word_mask"],
                               vmap_method="sequential")
        return {"accuracy": accuracy, "f1": f1, "cross_entropy": self._ce(logits, batch)}
