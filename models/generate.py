"""Jitted autoregressive generation with a KV cache.

    out = generate(model, params, ids, mask, key, max_new_tokens=32, temperature=0.7, top_p=0.9,
                   stop_tokens=(eos,))
    out.tokens   # [B, max_new_tokens] int32, `pad_id` after a row stops
    out.lengths  # [B] int32, generated tokens per row (a stop token included)

Prompts of different lengths are left-padded (`Tokenizer.batch_encode`). Sampling is greedy when
`temperature == 0`; otherwise softmax(logits / temperature) restricted to the `top_k` most likely
tokens and to the smallest set whose probability reaches `top_p`.

Speed (`python -m benchmarks.rollouts`): one prefill pass; the cache is made inside the jit and updated in
place, each step writing only its own keys and values; attention reads the filled part of the cache, in
doubling buckets (`read_buckets`), not its whole length; top-k/top-p draw among `lax.top_k` candidates
instead of sorting the vocabulary (`truncation_candidates`, exact, with a bisection fallback).

Generation is a `lax.while_loop` (one per read bucket) that ends as soon as every row has stopped, checked
every `EXIT_CHECK_EVERY` steps: at a stop token, or once
its generated text contains a stop string (`stop_strings=stop_string_table(tok.token_bytes(), ["</answer>"])`:
one small automaton per string over the bytes each token stands for, so a string split across tokens
is found too, inside the jitted loop).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.decoder import TransformerLM, _split_soft_prompt


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32
    lengths: jax.Array  # [B] int32
    logprobs: jax.Array  # [B, N] float32, log-probability of each chosen token under the sampling
    #   distribution's base model (temperature 1, no truncation); 0 after a row stops


class StopStrings(NamedTuple):
    """Automata over token bytes: `table[s, q, t]` is the state of string `s`'s matcher after reading
    token `t` in state `q`; state `accept[s]` (the string's length in bytes) means "seen"."""

    table: jax.Array  # [S, Q, V] int32
    accept: jax.Array  # [S] int32


def stop_string_table(token_bytes: Sequence[bytes], strings: Sequence[str]) -> StopStrings | None:
    """The `StopStrings` of `strings` for a vocabulary whose id `i` stands for `token_bytes[i]`."""
    strings = [s for s in strings]
    if not strings:
        return None
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop string {s!r}: expected a non-empty string")
    V = len(token_bytes)
    width = max(len(b) for b in token_bytes)
    data = np.zeros((V, max(width, 1)), np.int32)
    valid = np.zeros((V, max(width, 1)), bool)
    for i, b in enumerate(token_bytes):
        data[i, :len(b)], valid[i, :len(b)] = list(b), True
    encoded = [s.encode("utf-8") for s in strings]
    Q = max(len(b) for b in encoded) + 1
    tables = np.zeros((len(encoded), Q, V), np.int32)
    for k, pattern in enumerate(encoded):
        delta = _kmp_automaton(pattern)  # [len+1, 256]
        state = np.broadcast_to(np.arange(len(pattern) + 1)[:, None], (len(pattern) + 1, V)).copy()
        for j in range(data.shape[1]):
            state = np.where(valid[None, :, j], delta[state, data[None, :, j]], state)
        tables[k, :len(pattern) + 1] = state
        tables[k, len(pattern) + 1:] = len(pattern)
    return StopStrings(jnp.asarray(tables), jnp.asarray([len(b) for b in encoded], jnp.int32))


def _kmp_automaton(pattern: bytes) -> np.ndarray:
    """`delta[q, byte]`: the longest prefix of `pattern` that is a suffix of (prefix `q` + byte);
    the full-match state `len(pattern)` is absorbing."""
    n = len(pattern)
    delta = np.zeros((n + 1, 256), np.int32)
    delta[0, pattern[0]] = 1
    fallback = 0
    for q in range(1, n):
        delta[q] = delta[fallback]
        delta[q, pattern[q]] = q + 1
        fallback = delta[fallback, pattern[q]]
    delta[n] = n
    return delta


def completion_logprobs(model: TransformerLM, params, prompt_ids: jax.Array, prompt_mask: jax.Array,
                        completion: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Per-token `log P(completion_t | prompt, completion_<t)` `[B, N]` (teacher forcing, differentiable).

    `prompt_ids/prompt_mask: [B, P]` left-padded, `completion/completion_mask: [B, N]` right-padded;
    entries where `completion_mask` is 0 are 0.
    """
    P, N = prompt_ids.shape[1], completion.shape[1]
    seq = jnp.concatenate([prompt_ids, completion], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    if hasattr(model, "token_logprobs"):  # the completion's positions alone through the head, blocked
        logp = model.token_logprobs(params, seq[:, :-1], completion, mask[:, :-1], last=N)
        return logp * completion_mask.astype(logp.dtype)
    logits = model.apply(params, seq[:, :-1], mask[:, :-1])[:, P - 1:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), completion[..., None], axis=-1)[..., 0]
    return logp * completion_mask.astype(logp.dtype)


# The nucleus (top-p) is first looked for among this many most likely tokens (`lax.top_k`, not a sort of
# the whole vocabulary); a row whose nucleus is larger falls back to a bisection on the threshold
# (`nucleus_threshold`: passes over the vocabulary, not a sort of it).
TOP_P_CANDIDATES = 256


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, candidates: int | None = None) -> jax.Array:
    """Token ids `[B]` from `logits: [B, V]`; greedy when `temperature == 0`; `top_k=0` disables.

    With a truncation (`top_k` or `top_p < 1`) the draw is made among the `top_k` (or `candidates`,
    default `TOP_P_CANDIDATES`) most likely tokens (`lax.top_k`): exact whenever the truncated support fits
    among them, which `top_k` guarantees and `top_p` checks row by row (the candidates' mass reaching
    `top_p`); when some row's nucleus is larger, its threshold is found by bisection over the whole
    vocabulary (`nucleus_threshold`; `_sorted_sample`, the full sort, is the reference the tests compare). Same distribution as the reference, not the same random stream.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if not top_k and top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    inside, idx, fits, logits = truncation_candidates(logits, top_k, top_p, candidates)
    token = jnp.take_along_axis(idx, jax.random.categorical(key, inside, axis=-1)[:, None], axis=-1)[:, 0]

    # The bisection runs only when some row needs it, under `vmap` too (`every_row` is then unbatched: a
    # batched `cond` would run both branches). Not a while loop on a batched "all fit": under `vmap` XLA
    # hoisted the loop-invariant part of its body (the vocabulary's softmax and random bits) out of the
    # loop, computed at every step whether needed or not (SmolLM2, 8 members x 4 rows: 75 ms against 9).
    token = jax.lax.cond(every_row(fits), lambda: token,
                         lambda: jnp.where(fits, token, _bisected_sample(key, logits, top_p)))
    return token.astype(jnp.int32)


def truncation_candidates(logits: jax.Array, top_k: int = 0, top_p: float = 1.0, candidates: int | None = None):
    """`(inside [B, k], ids [B, k], fits [B], masked [B, V])` for tempered `logits: [B, V]`: the `k` most likely
    tokens (`top_k`, else `candidates` or `TOP_P_CANDIDATES`) with the values outside the top-k/top-p
    support set to −inf (`inside`), their token ids, whether the support of row `b` lies wholly among them
    (then a draw from `inside` is a draw from the reference), and the top-k-masked logits (for the fallback).
    """
    V = logits.shape[-1]
    k = min(V, top_k if top_k else (candidates or TOP_P_CANDIDATES))
    vals, idx = jax.lax.top_k(logits, k)  # [B, k], descending
    # the k-th value as a min: XLA CPU turns a slice of top_k's output (`vals[:, -1]`) into a full sort
    kth = jnp.min(vals, axis=-1, keepdims=True)
    inside, fits = vals, jnp.ones(logits.shape[:-1], bool)
    if top_k:
        # the reference keeps every token tied with the k-th value: the candidates are exact without ties
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        fits = jnp.sum(logits > -jnp.inf, axis=-1) == k
    if top_p < 1.0:
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # over the (top-k-masked) vocabulary
        probs = jnp.exp(vals - lse)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while the mass before it < p
        threshold = jnp.min(jnp.where(mass_before < top_p, vals, jnp.inf), axis=-1, keepdims=True)
        inside = jnp.where(vals >= threshold, vals, -jnp.inf)
        if not top_k and k < V:  # the nucleus ends among the candidates, above the last one (no ties outside)
            fits = (jnp.sum(probs, axis=-1) >= top_p) & (threshold[:, 0] > kth[:, 0])
    return inside, idx, fits, logits


def nucleus_threshold(logits: jax.Array, top_p: float, iterations: int = 64) -> jax.Array:
    """The smallest logit `[B, 1]` the top-p nucleus of `logits: [B, V]` keeps, without a sort: bisection on
    the value `v` between "the mass of the logits above `v` reaches p" (`lo`) and "does not" (`hi`), until the
    two are adjacent floats; the threshold is the least logit above `lo`. The same set as the sorted
    reference's (`_sorted_sample`: a token is kept while the mass before it is below p; ties kept), up to the
    rounding of the sums; `iterations` passes over the vocabulary instead of a sort of it."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - top)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    finite = jnp.where(jnp.isfinite(logits), logits, top)
    lo = jnp.min(finite, axis=-1, keepdims=True) - 1.0  # the mass above lo is 1 >= p
    hi = top  # the mass above the maximum is 0 < p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) / 2
        reaches = jnp.sum(jnp.where(logits > mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.min(jnp.where(logits > lo, logits, jnp.inf), axis=-1, keepdims=True)


def _bisected_sample(key: jax.Array, logits: jax.Array, top_p: float) -> jax.Array:
    """A draw from the top-p nucleus of `logits: [B, V]` found by `nucleus_threshold` (the fallback)."""
    if top_p < 1.0:
        logits = jnp.where(logits < nucleus_threshold(logits, top_p), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sorted_sample(key: jax.Array, logits: jax.Array, top_p: float) -> jax.Array:
    """The reference: the nucleus of `logits: [B, V]` (already tempered, perhaps top-k masked) found by
    sorting the whole vocabulary, and a draw from it."""
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while the mass before it < p
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: TransformerLM, params, prompt_ids: jax.Array, prompt_mask: jax.Array | None,
             key: jax.Array, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int | None = None,
             soft_prompt: jax.Array | None = None, stop_strings: StopStrings | None = None, *,
             early_exit: bool = True, read_bucket: int | None = None) -> Generation:
    """Generate up to `max_new_tokens` after each left-padded prompt `prompt_ids: [B, T]`.

    Stops a row at its first token in `stop_tokens` or once its generated text contains one of
    `stop_strings` (see `stop_string_table`), and the whole batch when every row has stopped
    (`early_exit=False`: every step runs, stopped rows feeding masked pads — the reference the tests
    compare with). `read_bucket`: the first of the doubling cache-read buckets (`read_buckets`, default
    `FIRST_READ_BUCKET`); the tokens do not depend on it.
    """
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if prompt_mask is None:
        prompt_mask = jnp.ones_like(prompt_ids)
    params, soft_prompt = _split_soft_prompt(params, soft_prompt)  # it enters the cache once
    n_soft = 0 if soft_prompt is None else soft_prompt.shape[-2]
    cache_size = n_soft + prompt_ids.shape[1] + max_new_tokens
    return _generate(model, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                     key, soft_prompt, stop_strings, max_new_tokens=max_new_tokens, temperature=float(temperature),
                     top_k=int(top_k), top_p=float(top_p), stop_tokens=tuple(int(t) for t in stop_tokens),
                     pad_id=int(pad_id), cache_size=cache_size, early_exit=bool(early_exit),
                     read_bucket=int(read_bucket or FIRST_READ_BUCKET))


def greedy_without_cache(model: TransformerLM, params, prompt_ids, prompt_mask, max_new_tokens: int) -> np.ndarray:
    """Reference greedy decoding `[B, max_new_tokens]`: re-runs the whole sequence for every new token, no cache
    (one fixed-width buffer right-padded with masked slots, which a causal model never attends to). What the
    tests and `benchmarks/gpu.py` compare `generate` with; O(N²) forwards, for checking only."""
    B, T = prompt_ids.shape
    buf = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    logits = jax.jit(model.apply)
    out = []
    for i in range(max_new_tokens):
        nxt = jnp.argmax(logits(params, buf, mask)[:, T + i - 1], axis=-1).astype(jnp.int32)
        out.append(np.asarray(nxt))
        buf, mask = buf.at[:, T + i].set(nxt), mask.at[:, T + i].set(1)
    return np.stack(out, axis=1)


@jax.custom_batching.custom_vmap
def every_row(flags: jax.Array) -> jax.Array:
    """Whether every row of `flags: [B] bool` holds: the early exit's test (every row has stopped) and the
    nucleus fallback's (every row's nucleus fits among the candidates).

    Under `vmap` (a population of members, each generating its own rows; nested vmaps too) it is whether every
    row of *every* member holds, an unbatched scalar, so the loop or `cond` it decides stays one for all members: a while
    loop whose condition is batched would carry every loop variable per member and select between old and
    new at each check (the whole cache, whose write would become a scatter at per-member slots), and a
    batched `cond` runs both branches. What depends on it does not change a row's result: steps after a row
    has stopped feed it masked pads, and the fallback keeps every row whose nucleus fits."""
    return jnp.all(flags)


@every_row.def_vmap
def _every_row_vmap(axis_size, in_batched, flags):
    # `every_row` again, not `jnp.all`: under nested vmaps (an ES population's directions × signs) the rule
    # runs inside the outer vmap's trace, where a plain `jnp.all` would be batched over the outer axis and
    # the `cond` or loop it decides would again run both branches (or select the whole carry) per member
    del axis_size, in_batched
    return every_row(jnp.reshape(flags, (-1,))), False


# The loop checks whether every row has stopped once per this many steps (a divisor of max_new_tokens and of
# the read buckets, so it never overshoots a bucket): under `vmap` (a population of members) a while loop
# whose condition is batched selects its whole carry, the cache included, at every check.
EXIT_CHECK_EVERY = 8

# Generation reads the cache up to bucket boundaries: steps [0, 32) read prompt + 32 slots, steps [32, 64)
# prompt + 64, then doubling, so attention costs the filled part (within 2x) and not the whole cache; each
# bucket is one more compiled copy of the decode step.
FIRST_READ_BUCKET = 32


def read_buckets(max_new_tokens: int, first: int = FIRST_READ_BUCKET) -> list[int]:
    """Ends of the decode steps' segments `[e_0, e_1, ..., max_new_tokens]`: step `i` of the segment ending
    at `e_j` reads `prompt + e_j` cache slots (doubling from `first`)."""
    if first < 1:
        raise ValueError(f"read bucket {first} must be >= 1")
    ends, e = [], first
    while e < max_new_tokens:
        ends.append(e)
        e *= 2
    return ends + [max_new_tokens]


def _supports_read(model) -> bool:
    import inspect
    try:
        return "read" in inspect.signature(model.apply_with_cache).parameters
    except (TypeError, ValueError):
        return False


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k truncation)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id", "cache_size", "early_exit", "read_bucket"))
def _generate(model, params, prompt_ids, prompt_mask, key, soft_prompt, stop_strings, *, max_new_tokens,
              temperature, top_k, top_p, stop_tokens, pad_id, cache_size, early_exit, read_bucket) -> Generation:
    B = prompt_ids.shape[0]
    cache = model.init_cache(B, cache_size)  # made inside the jit: a loop carry, updated in place
    reads = _supports_read(model)
    prefill = dict(read=0) if reads else {}
    logits, cache = model.apply_with_cache(params, prompt_ids, cache, prompt_mask, prompt=soft_prompt,
                                           last_only=True, **prefill)
    first_slot = cache_size - max_new_tokens  # the slot of the first generated token
    last = logits[:, -1]
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    if stop_strings is None:
        stop_strings = StopStrings(jnp.zeros((0, 1, 1), jnp.int32), jnp.zeros((0,), jnp.int32))
    S = stop_strings.accept.shape[0]

    def body(read, carry):
        step, key, last, cache, done, matched, lengths, tokens, logprobs = carry
        key, sub = jax.random.split(key)
        token = sample_logits(sub, last, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        # A row that had already stopped feeds a masked pad token, invisible to later steps.
        feed_mask = (~done).astype(jnp.int32)[:, None]
        if S:
            matched = stop_strings.table[jnp.arange(S)[None, :], matched, token[:, None]]
            done = done | jnp.any(matched == stop_strings.accept[None, :], axis=1)
        done = done | jnp.isin(token, stops)
        logits, cache = model.apply_with_cache(params, token[:, None], cache, feed_mask, **read)
        return step + 1, key, logits[:, -1], cache, done, matched, lengths, tokens, logprobs

    def cond(end, carry):
        step, done = carry[0], carry[4]
        return (step < end) & ~every_row(done) if early_exit else step < end

    carry = (jnp.array(0), key, last, cache, jnp.zeros((B,), bool), jnp.zeros((B, S), jnp.int32),
             jnp.zeros((B,), jnp.int32), jnp.full((B, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((B, max_new_tokens), jnp.float32))
    # One while loop per read bucket; each stops early once every row is done (the next then runs no step),
    # checking every `every` steps (steps after every row has stopped change nothing).
    every = math.gcd(EXIT_CHECK_EVERY, max_new_tokens, read_bucket)

    def steps(read, carry):
        return jax.lax.fori_loop(0, every, lambda _, c: body(read, c), carry) if every > 1 else body(read, carry)

    for end in (read_buckets(max_new_tokens, read_bucket) if reads else [max_new_tokens]):
        read = dict(read=first_slot + end) if reads else {}
        carry = jax.lax.while_loop(functools.partial(cond, end), functools.partial(steps, read), carry)
    *_, lengths, tokens, logprobs = carry
    return Generation(tokens=tokens, lengths=lengths, logprobs=logprobs)
