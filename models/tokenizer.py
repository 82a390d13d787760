"""Tokenizers: a built-in byte-level one, and a checkpoint's own `tokenizer.json`.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, and `batch_encode(texts)` → left-padded `(ids [B, T] int32, mask [B, T] int32)` numpy
arrays, the layout `models.generate` expects.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np


class _BatchEncodeMixin:
    pad_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def batch_encode(self, texts: Sequence[str], add_bos: bool = False,
                     length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask, `[len(texts), T]` with `T = length or longest`."""
        seqs = [([self.bos_id] if add_bos and self.bos_id is not None else []) + self.encode(t)
                for t in texts]
        T = length if length is not None else max((len(s) for s in seqs), default=0)
        too_long = [len(s) for s in seqs if len(s) > T]
        if too_long:
            raise ValueError(f"batch_encode: a text encodes to {max(too_long)} tokens, longer than "
                             f"length={T}")
        ids = np.full((len(seqs), T), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), T), np.int32)
        for row, s in enumerate(seqs):
            if s:
                ids[row, T - len(s):] = s
                mask[row, T - len(s):] = 1
        return ids, mask


class ByteTokenizer(_BatchEncodeMixin):
    """UTF-8 bytes 0..255, then `<pad>`=256, `<bos>`=257, `<eos>`=258 (vocab 259)."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(_BatchEncodeMixin):
    """A Hugging Face `tokenizer.json` loaded with the `tokenizers` package (no `transformers`)."""

    def __init__(self, path: str, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers is a core dependency
            raise ImportError("HFTokenizer needs the `tokenizers` package") from e
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | None = None):
    """The tokenizer of a checkpoint directory (its `tokenizer.json`), or the byte tokenizer.

    Special token ids come from `config.json`/`generation_config.json`, then `tokenizer_config.json`.
    """
    if path is None:
        return ByteTokenizer()
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json in {path!r}; pass path=None for the byte tokenizer")
    ids: dict[str, int | None] = {}
    for name in ("generation_config.json", "config.json"):
        cfg_file = os.path.join(path, name)
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = cfg.get(key)
                if isinstance(value, list):  # Llama-3 lists several eos ids; the first is canonical
                    value = value[0] if value else None
                if value is not None:
                    ids.setdefault(key, value)
    tok_cfg_file = os.path.join(path, "tokenizer_config.json")
    tok_cfg = {}
    if os.path.isfile(tok_cfg_file):
        with open(tok_cfg_file) as f:
            tok_cfg = json.load(f)
    tok = HFTokenizer(file)
    for key, token_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                           ("pad_token_id", "pad_token")):
        token = tok_cfg.get(token_key)
        if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
            token = token.get("content")
        if key not in ids and isinstance(token, str):
            token_id = tok._tok.token_to_id(token)
            if token_id is not None:
                ids[key] = token_id
    return HFTokenizer(file, ids.get("bos_token_id"), ids.get("eos_token_id"), ids.get("pad_token_id"))
