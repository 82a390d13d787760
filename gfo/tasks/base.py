"""Tasks: data made from a seed, objectives (losses, minimised) and metrics.

A task yields batches as dicts of NumPy arrays. `train_batch(step)` is a pure function of the task's
seed and the step, so the data position of a run is just its step count (exact resume for free), and
`eval_batches()` is a fixed held-out split. `objective(name, model, to_params)` returns
`loss(x, batch, key) -> scalar` for any optimizer; `metrics(model, params, batch, key)` returns a dict of
scalars (larger is better unless the name says loss/perplexity).

Every task encodes through the model's tokenizer (`tokenizer=`; the byte tokenizer of the tiny models
by default), and renders prompts through a `PromptFormat`: the checkpoint's chat template with an
optional system prompt, or plain text. Prompt batches have one fixed length per task
(`prompt_length`), so a jitted step never recompiles for a new batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Sequence

import numpy as np

import models
from models.chat_template import read_template, render_chat
from models.tokenizer import pad_left


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a task's `(system, user, assistant prefix)` becomes the prompt text.

    With a `template` (a Jinja chat template): the system and user messages, then either the template's
    assistant opening (`add_generation_prompt`) or, when there is an assistant prefix, an assistant
    message continued by the model. Without: the plain concatenation `system + user + prefix` (the
    ES-at-scale countdown prompt is exactly that).
    """

    template: str | None = None
    special_tokens: tuple[tuple[str, str], ...] = ()

    def render(self, user: str, system: str | None = None, assistant_prefix: str = "") -> str:
        if self.template is None:
            return (system or "") + user + assistant_prefix
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        if assistant_prefix:
            messages.append({"role": "assistant", "content": assistant_prefix})
        return render_chat(self.template, messages, add_generation_prompt=not assistant_prefix,
                           continue_final_message=bool(assistant_prefix), special_tokens=dict(self.special_tokens))


def prompt_format(tokenizer, chat_template: str = "auto") -> PromptFormat:
    """`chat_template`: `auto` (the tokenizer's template if it has one, else plain text), `none`, or a
    `.jinja` file / `tokenizer_config.json` / template text."""
    special = tuple(sorted(getattr(tokenizer, "special_tokens", {}).items()))
    if chat_template == "none":
        return PromptFormat(None, special)
    if chat_template == "auto":
        return PromptFormat(getattr(tokenizer, "chat_template", None), special)
    return PromptFormat(read_template(chat_template), special)


class Task:
    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]]
    default_objective: ClassVar[str]
    default_system_prompt: ClassVar[str | None] = None
    default_chat_template: ClassVar[str] = "none"  # instruction-following tasks use "auto"

    def __init__(self, seed: int = 0, batch_size: int = 16, eval_size: int = 64,
                 tokenizer=None, chat_template: str | None = None, system_prompt: str | None = None):
        if batch_size < 1 or eval_size < 1:
            raise ValueError(f"{self.name}: batch_size={batch_size} and eval_size={eval_size} must be >= 1")
        self.seed, self.batch_size, self.eval_size = seed, batch_size, eval_size
        self.tokenizer = tokenizer or models.ByteTokenizer()
        self.format = prompt_format(self.tokenizer, chat_template or self.default_chat_template)
        self.system_prompt = system_prompt if system_prompt is not None else self.default_system_prompt

    # ------------------------------------------------------------------ prompts
    @property
    def uses_special_tokens(self) -> bool:
        """Plain-text prompts get the tokenizer's own BOS/EOS (as `tokenizer(text)` in `transformers`);
        a chat template writes its special tokens itself."""
        return self.format.template is None

    def render(self, user: str, assistant_prefix: str = "") -> str:
        return self.format.render(user, self.system_prompt, assistant_prefix)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.uses_special_tokens)

    def prompt_length_bound(self, longest_user_text: str, assistant_prefix: str = "") -> int:
        """Tokens a rendered prompt can take at most when its user text has at most the bytes of
        `longest_user_text`: every token covers at least one byte, and special tokens count once each."""
        text = self.render(longest_user_text, assistant_prefix)
        return len(text.encode("utf-8")) + 2  # + BOS/EOS a post-processor may add

    def encode_prompts(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `(ids, mask)` `[len(texts), length]` of already rendered prompts."""
        seqs = [self.encode_prompt(t) for t in texts]
        longest = max((len(s) for s in seqs), default=0)
        if longest > length:
            raise ValueError(f"{self.name}: a prompt encodes to {longest} tokens, more than the task's prompt "
                             f"length {length}: set a larger task.options prompt_length")
        return pad_left(seqs, self.tokenizer.pad_id, length)

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """Ids that end a generation: every end-of-sequence id of the tokenizer."""
        return tuple(self.tokenizer.eos_ids)

    # ------------------------------------------------------------------ data
    def rng(self, split: str, step: int = 0) -> np.random.Generator:
        """The generator of `(seed, split, step)`; train and eval streams never overlap."""
        return np.random.default_rng([self.seed, {"train": 0, "eval": 1, "dev": 3}[split], step])

    def train_batch(self, step: int) -> dict:
        return self.make_batch(self.rng("train", step), self.batch_size)

    def eval_batches(self) -> list[dict]:
        rng = self.rng("eval")
        n = self.eval_size
        return [self.make_batch(rng, min(self.batch_size, n - i)) for i in range(0, n, self.batch_size)]

    def dev_batches(self, n: int) -> list[dict]:
        """A dev split of `n` examples for model selection (`eval.select_by`), disjoint in stream from the
        train and eval data (generated tasks draw it from its own generator)."""
        rng = self.rng("dev")
        return [self.make_batch(rng, min(self.batch_size, n - i)) for i in range(0, n, self.batch_size)]

    def make_batch(self, rng: np.random.Generator, size: int) -> dict:
        raise NotImplementedError

    def objective(self, name: str | None, model: models.TransformerLM, to_params: Callable) -> Callable:
        name = name or self.default_objective
        if name not in self.objectives:
            raise ValueError(f"task {self.name!r} has no objective {name!r}: expected one of {self.objectives}")
        return self._objective(name, model, to_params)

    def _objective(self, name, model, to_params) -> Callable:
        raise NotImplementedError

    def metrics(self, model: models.TransformerLM, params, batch: dict, key) -> dict:
        raise NotImplementedError


def epoch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices `[batch_size]` into `n` records for `step`: consecutive slices of per-epoch permutations,
    so every record is drawn once per epoch (without replacement) and step `t` is a function of `t`."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        out[rows] = np.random.default_rng([seed, 2, int(epoch)]).permutation(n)[offsets[rows]]
    return out


def int_option(name: str, value, lo: int, hi: int | None = None, why: str = ""):
    """`value` of option `task.options.NAME` as an int, when it is an integer in `[lo, hi]` (`hi` None: no
    upper bound); otherwise a `ValueError` naming the option, its value and the range (`why` says where the
    range comes from). inf, nan, a float or a boolean is never an integer: the value, not an OverflowError
    from deep inside data generation, is what the user sees."""
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not integral or value < lo or (hi is not None and value > hi):
        expected = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"task.options.{name}={value!r} is invalid: expected {expected}"
                         + (f" ({why})" if why else ""))
    return int(value)

