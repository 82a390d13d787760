"""Language modelling on a corpus sampled from a random probabilistic context-free grammar.

The grammar is drawn from the task seed: `n_nonterminals` symbols, each with `n_rules` productions of
1–4 symbols (a nonterminal with probability `recursion`, else a word), rule probabilities from a
Dirichlet, and a lexicon of `n_words` pronounceable words. Sentences (depth-limited) are packed,
separated by ". ", into windows of `seq_len + 1` bytes. Objective `cross_entropy`; metrics
`cross_entropy` (nats/token) and `perplexity`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gfo.tasks.base import Task
from gfo.tasks.loaders import DataError, read_text


class GrammarLM(Task):
    name = "grammar_lm"
    objectives = ("cross_entropy",)
    default_objective = "cross_entropy"

    def __init__(self, seq_len: int = 64, n_nonterminals: int = 6, n_rules: int = 4, n_words: int = 24,
                 recursion: float = 0.45, max_depth: int = 5, **kw):
        if seq_len < 2:
            raise ValueError(f"grammar_lm seq_len={seq_len} must be >= 2")
        self.seq_len, self.max_depth = seq_len, max_depth
        super().__init__(**kw)
        g = np.random.default_rng([self.seed, 7])
        consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
        self.words = ["".join(g.choice(consonants) + g.choice(vowels) for _ in range(int(g.integers(1, 4))))
                      for _ in range(n_words)]
        self.rules = []  # per nonterminal: (list of productions, probabilities)
        for _ in range(n_nonterminals):
            productions = []
            for _ in range(n_rules):
                length = int(g.integers(1, 5))
                productions.append([("N", int(g.integers(n_nonterminals))) if g.random() < recursion
                                    else ("W", int(g.integers(n_words))) for _ in range(length)])
            self.rules.append((productions, g.dirichlet(np.ones(n_rules))))

    def sentence(self, rng: np.random.Generator) -> str:
        words: list[str] = []

        def expand(symbol: int, depth: int):
            productions, probs = self.rules[symbol]
            for kind, value in productions[rng.choice(len(productions), p=probs)]:
                if kind == "W":
                    words.append(self.words[value])
                elif depth < self.max_depth:
                    expand(value, depth + 1)

        expand(0, 0)
        return " ".join(words) or self.words[0]

    def make_batch(self, rng, size):
        rows = []
        for _ in range(size):
            text, ids = "", []
            while len(ids) < self.seq_len + 1:  # as many tokens as needed, whatever the tokenizer
                text += self.sentence(rng) + ". "
                ids = self.tokenizer.encode(text)
            rows.append(ids[: self.seq_len + 1])
        return {"tokens": np.asarray(rows, np.int32)}

    def _objective(self, name, model, to_params):
        return lambda x, batch, key: next_token_loss(model, to_params(x), batch["tokens"])

    def metrics(self, model, params, batch, key):
        ce = next_token_loss(model, params, batch["tokens"])
        return {"cross_entropy": ce, "perplexity": jnp.exp(ce)}


class TextLM(GrammarLM):
    """Language modelling on a local plain-text file: random windows of `seq_len + 1` bytes (tokens),
    the last `eval_fraction` of the file held out for evaluation."""

    name = "text_lm"

    def __init__(self, data_path: str, seq_len: int = 64, eval_fraction: float = 0.1, **kw):
        Task.__init__(self, **kw)
        self.seq_len = seq_len
        ids = np.asarray(self.tokenizer.encode(read_text(data_path)), np.int32)
        split = int(len(ids) * (1 - eval_fraction))
        self.train_ids, self.eval_ids = ids[:split], ids[split:]
        for part, name in ((self.train_ids, "training"), (self.eval_ids, "evaluation")):
            if len(part) < seq_len + 1:
                raise DataError(f"{data_path}: the {name} part has {len(part)} tokens; need at least seq_len + 1 = "
                                f"{seq_len + 1} (a longer file, a smaller seq_len or another eval_fraction)")

    def make_batch(self, rng, size):
        raise NotImplementedError  # batches come from train_batch / eval_batches below

    def _windows(self, ids, starts):
        return {"tokens": np.stack([ids[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)}

    def train_batch(self, step):
        rng = self.rng("train", step)
        return self._windows(self.train_ids, rng.integers(0, len(self.train_ids) - self.seq_len, self.batch_size))

    def eval_batches(self):
        last = len(self.eval_ids) - self.seq_len - 1
        starts = np.linspace(0, last, num=min(self.eval_size, last + 1)).astype(int)
        return [self._windows(self.eval_ids, starts[i:i + self.batch_size])
                for i in range(0, len(starts), self.batch_size)]


def next_token_loss(model, params, tokens):
    """Mean next-token cross-entropy (nats) of `tokens: [B, T+1]` (no `[B, T, V]` logits: see
    `gfo.model_api.token_logprobs`)."""
    from gfo.model_api import token_logprobs

    return -token_logprobs(model, params, tokens[:, :-1], tokens[:, 1:]).mean()
