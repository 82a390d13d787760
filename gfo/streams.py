"""Named PRNG key streams: one seed, split by stage and purpose, never reused across them.

    k = stream(seed, "main", "step")            # the main stage's step keys: fold_in(k, t) for step t
    k = stream(seed, "pretrain", "space")       # the pretrain stage's space key

`stream(seed, stage, name) = fold_in(fold_in(key(seed), h(stage)), h(name))` with `h` a stable 31-bit
hash of the name (CRC-32; Python's `hash` of a string changes from one process to the next), so a
stream is the same in every process and every run, and streams of different stages, names or seeds
are different keys. The names `gfo train` uses: `model` (random initial weights, stage `run`);
per stage `space` (a subspace's projection), `init` (the starting point), `optimizer` (its state),
`step` (`fold_in(·, t)` at step t), `eval`, `dev`, `pass_at_k` (`fold_in(·, i)` for eval batch i).
"""

from __future__ import annotations

import zlib

import jax


def name_hash(name: str) -> int:
    """A stable non-negative 31-bit integer of `name` (CRC-32)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"key stream name {name!r}: expected a non-empty string")
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def stream(seed: int | jax.Array, stage: str, name: str) -> jax.Array:
    """The key of stream `name` in `stage` for `seed` (an int, or a key to derive from)."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return jax.random.fold_in(jax.random.fold_in(key, name_hash(stage)), name_hash(name))


def streams(seed: int | jax.Array, stage: str, *names: str) -> tuple[jax.Array, ...]:
    """`stream(seed, stage, n)` for each of `names`."""
    return tuple(stream(seed, stage, n) for n in names)
