"""Inference-time optimisation of outputs: beam search, and refinement by coordinate descent.

- `beam_search`: width-`W` beam search over completions of left-padded prompts (log-probability, with
  an optional length normalisation `score / length^α`); width 1 is greedy decoding.
- `refine`: starting from outputs `Y⁰` (e.g. greedy), sweeps over positions and, at each, tries the
  `top_k` tokens proposed by the model's next-token distribution and/or by the gradient of `log P(Y|X)`
  with respect to a one-hot relaxation of `Y` (a hybrid gradient/coordinate step); a candidate replaces
  the current output only if it scores strictly higher, so the result is never worse than its start.
  The score is `log P(Y|X)` or a task reward `score_fn(tokens, lengths)`, minus `length_penalty · length`;
  proposing a stop token ends the output there.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

import models
from gfo.model_api import LanguageModel


class Decoded(NamedTuple):
    tokens: jax.Array  # [B, W, N] (beam search) or [B, N] (refine)
    lengths: jax.Array  # [B, W] or [B]
    scores: jax.Array  # [B, W] or [B]


def _prompted(prompt_ids, prompt_mask, tokens, lengths):
    N = tokens.shape[-1]
    valid = (jnp.arange(N)[None, :] < lengths[:, None]).astype(jnp.int32)
    return jnp.concatenate([prompt_ids, tokens], 1), jnp.concatenate([prompt_mask, valid], 1), valid


def sequence_logprob(model, params, prompt_ids, prompt_mask, tokens, lengths) -> jax.Array:
    """`log P(Y|X)` `[B]` of completions `tokens [B, N]` (first `lengths` tokens) after the prompts."""
    valid = (jnp.arange(tokens.shape[-1])[None, :] < lengths[:, None]).astype(jnp.int32)
    return jnp.sum(models.completion_logprobs(model, params, prompt_ids, prompt_mask, tokens, valid), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "beam_width", "max_new_tokens", "stop_tokens", "pad_id"))
def beam_search(model: LanguageModel, params, prompt_ids, prompt_mask, beam_width: int,
                max_new_tokens: int, stop_tokens: Sequence[int] = (), pad_id: int = 0,
                length_penalty: float = 0.0) -> Decoded:
    """Beams `[B, W, N]` sorted best first, with lengths and scores `logp / length^length_penalty`."""
    B, T = prompt_ids.shape
    W, N = beam_width, max_new_tokens
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    prompt = jnp.repeat(prompt_ids, W, 0)
    pmask = jnp.repeat(prompt_mask, W, 0)

    def step(t, carry):
        seqs, logp, done, lengths = carry
        seq, mask, _ = _prompted(prompt, pmask, seqs.reshape(B * W, N), lengths.reshape(-1))
        logits = model.apply(params, seq, mask)  # next-token logits sit at the last real token
        nxt = jax.nn.log_softmax(jnp.take_along_axis(
            logits, (T + lengths.reshape(-1) - 1)[:, None, None], axis=1)[:, 0]).reshape(B, W, -1)
        V = nxt.shape[-1]
        keep = jnp.full((V,), -jnp.inf).at[pad_id].set(0.0)  # a finished beam only carries itself on
        cand = logp[..., None] + jnp.where(done[..., None], keep, nxt)
        top, idx = jax.lax.top_k(cand.reshape(B, W * V), W)
        beam, token = idx // V, (idx % V).astype(jnp.int32)
        take = lambda a: jnp.take_along_axis(a, beam.reshape(B, W, *([1] * (a.ndim - 2))), axis=1)  # noqa
        seqs, was_done, lengths = take(seqs), take(done), take(lengths)
        seqs = seqs.at[:, :, t].set(jnp.where(was_done, pad_id, token))
        lengths = jnp.where(was_done, lengths, t + 1)
        done = was_done | jnp.isin(token, stops)
        return seqs, top, done, lengths

    init = (jnp.full((B, W, N), pad_id, jnp.int32),
            jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (W - 1)), (B, 1)),
            jnp.zeros((B, W), bool), jnp.zeros((B, W), jnp.int32))
    seqs, logp, _, lengths = jax.lax.fori_loop(0, N, step, init)
    scores = logp / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-scores, axis=1)
    sort = lambda a: jnp.take_along_axis(a, order.reshape(B, W, *([1] * (a.ndim - 2))), axis=1)  # noqa: E731
    return Decoded(sort(seqs), sort(lengths), sort(scores))


def refine(model: LanguageModel, params, prompt_ids, prompt_mask, tokens, lengths,
           score_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None, sweeps: int = 1,
           top_k: int = 8, proposals: str = "both", length_penalty: float = 0.0,
           stop_tokens: Sequence[int] = ()) -> tuple[Decoded, jax.Array]:
    """Refined outputs (never scoring lower than their start) and the starting scores `[B]`."""
    if proposals not in ("model", "gradient", "both"):
        raise ValueError(f"refine proposals={proposals!r}: expected 'model', 'gradient' or 'both'")
    # Gradient proposals always come from log P(Y|X) (a reward need not be differentiable).
    return _refine(model, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(tokens, jnp.int32),
                   jnp.asarray(lengths, jnp.int32), score_fn, sweeps, top_k, proposals, float(length_penalty),
                   tuple(int(s) for s in stop_tokens))


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 11))
def _refine(model, params, prompt_ids, prompt_mask, tokens, lengths, score_fn, sweeps, top_k, proposals,
            length_penalty, stop_tokens):
    B, N = tokens.shape
    T = prompt_ids.shape[1]
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def score(tok, n):
        base = (score_fn(tok, n) if score_fn is not None
                else sequence_logprob(model, params, prompt_ids, prompt_mask, tok, n))
        return base - length_penalty * n

    def soft_logprob(one_hot, n):
        prompt_oh = jax.nn.one_hot(prompt_ids, one_hot.shape[-1])
        seq_oh = jnp.concatenate([prompt_oh, one_hot], 1)
        _, mask, valid = _prompted(prompt_ids, prompt_mask, jnp.argmax(one_hot, -1), n)
        logits = model.apply_one_hot(params, seq_oh[:, :-1], mask[:, :-1])[:, T - 1:]
        return jnp.sum(jnp.sum(jax.nn.log_softmax(logits) * one_hot, -1) * valid)

    def position(j, carry):
        tok, n, best = carry
        candidates = []
        if proposals in ("model", "both"):
            seq, mask, _ = _prompted(prompt_ids, prompt_mask, tok, n)
            logits = model.apply(params, seq, mask)[:, T + j - 1]
            candidates.append(jax.lax.top_k(logits, top_k)[1])
        if proposals in ("gradient", "both"):
            V = model.config.vocab_size
            grad = jax.grad(soft_logprob)(jax.nn.one_hot(tok, V), n)[:, j]
            candidates.append(jax.lax.top_k(grad, top_k)[1])
        cands = jnp.concatenate(candidates, 1).astype(jnp.int32)  # [B, K]
        K = cands.shape[1]
        new_tok = jnp.repeat(tok[:, None], K, 1).at[:, :, j].set(cands)  # [B, K, N]
        new_n = jnp.where(jnp.isin(cands, stops), j + 1, jnp.repeat(n[:, None], K, 1))
        editable = (j < n)[:, None]
        scores = jax.vmap(score, in_axes=(1, 1), out_axes=1)(new_tok, new_n)  # [B, K]
        scores = jnp.where(editable, scores, -jnp.inf)
        k = jnp.argmax(scores, axis=1)
        top = jnp.take_along_axis(scores, k[:, None], 1)[:, 0]
        better = top > best
        tok = jnp.where(better[:, None], jnp.take_along_axis(new_tok, k[:, None, None], 1)[:, 0], tok)
        n = jnp.where(better, jnp.take_along_axis(new_n, k[:, None], 1)[:, 0], n)
        return tok, n, jnp.where(better, top, best)

    start = score(tokens, lengths)
    carry = (tokens, lengths, start)
    for _ in range(sweeps):
        carry = jax.lax.fori_loop(0, N, position, carry)
    tok, n, best = carry
    return Decoded(tok, n, best), start


def compare_decoders(model: LanguageModel, params, task, batches, beam_width: int = 4, sweeps: int = 2,
                     top_k: int = 8, proposals: str = "both", length_penalty: float = 0.0) -> dict[str, dict]:
    """Greedy decoding, beam search and refinement (of greedy, by log-probability and by the task's
    verifier reward) on `batches` of a completion task: `{decoder: {"logprob", "reward", "length"}}`.

    `logprob` is the mean `log P(Y|X)` of the outputs, `reward` the mean of
    `task.completion_rewards` (exact match, or countdown's reward), `length` the mean output length.
    """
    if not hasattr(task, "completion_rewards"):
        raise ValueError(f"task {task.name!r} has no reward on generated text: decoding needs a completion task "
                         f"(arithmetic, sort, reverse, countdown)")
    eos, pad = task.tokenizer.eos_id, task.tokenizer.pad_id
    N = task.max_answer_tokens + 1
    totals: dict[str, dict] = {}
    for i, batch in enumerate(batches):
        batch = jax.tree.map(jnp.asarray, batch)
        p, m = batch["prompt"], batch["prompt_mask"]
        reward = _RowReward(task, batch)
        greedy = models.generate(model, params, p, m, jax.random.key(i), N, stop_tokens=(eos,), pad_id=pad)
        beams = beam_search(model, params, p, m, beam_width, N, stop_tokens=(eos,), pad_id=pad,
                            length_penalty=length_penalty)
        by_logp, _ = refine(model, params, p, m, greedy.tokens, greedy.lengths, None, sweeps, top_k, proposals,
                            length_penalty, (eos,))
        by_reward, _ = refine(model, params, p, m, greedy.tokens, greedy.lengths, reward, sweeps, top_k, proposals,
                              length_penalty, (eos,))
        outputs = {"greedy": (greedy.tokens, greedy.lengths), f"beam{beam_width}": (beams.tokens[:, 0], beams.lengths[:, 0]),
                   "refine(logprob)": (by_logp.tokens, by_logp.lengths),
                   "refine(reward)": (by_reward.tokens, by_reward.lengths)}
        for name, (tokens, lengths) in outputs.items():
            row = {"logprob": sequence_logprob(model, params, p, m, tokens, lengths), "reward": reward(tokens, lengths),
                   "length": lengths.astype(jnp.float32)}
            acc = totals.setdefault(name, {k: 0.0 for k in row})
            for k, v in row.items():
                acc[k] += float(jnp.mean(v)) / len(batches)
    return totals


class _RowReward:
    """`score_fn(tokens, lengths) -> [B]`: the task's reward for the rows of one batch (jit-static, hashable
    by identity: one compilation per batch)."""

    def __init__(self, task, batch):
        self.task, self.batch = task, batch

    def __call__(self, tokens, lengths):
        return self.task.completion_rewards(tokens, lengths, self.batch)


def format_decoders(results: dict[str, dict]) -> str:
    """A Markdown table of `compare_decoders` results."""
    lines = ["| decoder | mean log-prob of the output | reward | length |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['logprob']:.3f} | {r['reward']:.3f} | {r['length']:.2f} |")
    return "\n".join(lines)
