"""Tokenizers: a built-in byte-level one, and a checkpoint's own (`tokenizer.json` or an embedded GGUF one).

Both expose `encode(text, add_special_tokens=False) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`bos_id`, `eos_id`, `eos_ids` (every id that ends a generation), `pad_id`, `chat_template`
(a Jinja string or None), `token_bytes()` (the UTF-8 bytes each id stands for, for stop strings) and
`batch_encode(texts)` → left-padded `(ids [B, T] int32, mask [B, T] int32)` NumPy arrays, the layout
`models.generate` expects.

    tok = load_tokenizer("/ckpt/SmolLM2-135M-Instruct")      # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer("/ckpt/model.Q4_1.gguf")            # the tokenizer embedded in a GGUF file
    tok = load_tokenizer(None)                               # the byte tokenizer of the tiny models
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from models.gguf_tokenizer import gguf_tokenizer
from models.jsonfile import read_json_object


class TokenizerError(ValueError):
    """Tokenizer files that are missing, malformed, or do not fit the model."""


class _BatchEncodeMixin:
    pad_id: int
    bos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def batch_encode(self, texts: Sequence[str], add_bos: bool = False,
                     length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask, `[len(texts), T]` with `T = length or longest`."""
        seqs = [([self.bos_id] if add_bos and self.bos_id is not None else []) + self.encode(t)
                for t in texts]
        return pad_left(seqs, self.pad_id, length)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)` int32 `[len(seqs), T]`, each sequence right-aligned; `T = length or longest`."""
    T = length if length is not None else max((len(s) for s in seqs), default=0)
    too_long = [len(s) for s in seqs if len(s) > T]
    if too_long:
        raise ValueError(f"a text encodes to {max(too_long)} tokens, longer than length={T}")
    ids = np.full((len(seqs), T), pad_id, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, T - len(s):] = s
            mask[row, T - len(s):] = 1
    return ids, mask


class ByteTokenizer(_BatchEncodeMixin):
    """UTF-8 bytes 0..255, then `<pad>`=256, `<bos>`=257, `<eos>`=258 (vocab 259)."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    eos_ids = (258,)
    chat_template = None
    special_tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""] * 3


class HFTokenizer(_BatchEncodeMixin):
    """A `tokenizers.Tokenizer` with the special tokens of its `tokenizer_config.json` (no `transformers`).

    Args:
      tokenizer: the `tokenizers.Tokenizer` (from `tokenizer.json`, or built from a GGUF file).
      config: a `tokenizer_config.json`-style dict: `bos_token`, `eos_token`, `pad_token`, `unk_token`
        (token strings, or `{"content": ...}`), `chat_template`, `padding_side`.
      eos_ids: extra end-of-generation ids (`generation_config.json` may list several).
      source: where it came from, for error messages.
    """

    def __init__(self, tokenizer, config: dict | None = None, eos_ids: Sequence[int] = (),
                 ids: dict[str, int | None] | None = None, source: str = "<memory>"):
        self._tok, self.source = tokenizer, source
        config = dict(config or {})
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: _content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                               if _content(config.get(k)) is not None}
        ids = dict(ids or {})
        for name, token in self.special_tokens.items():
            key = name.replace("_token", "_id")
            if ids.get(key) is None:
                token_id = tokenizer.token_to_id(token)
                if token_id is None:
                    raise TokenizerError(f"{source}: {name}={token!r} is not a token of the vocabulary")
                ids[key] = token_id
        self.bos_id, self.eos_id = ids.get("bos_id"), ids.get("eos_id")
        self.pad_id = next(i for i in (ids.get("pad_id"), self.eos_id, 0) if i is not None)
        self.eos_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *eos_ids) if i is not None))
        self.chat_template = _chat_template(config.get("chat_template"), source)
        self.padding_side = config.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise TokenizerError(f"{source}: padding_side={self.padding_side!r}; expected 'left' or 'right'")

    @classmethod
    def from_file(cls, path: str, **kw) -> "HFTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(path), source=path, **kw)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; with `add_special_tokens`, the post-processor's BOS/EOS as `transformers` adds."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (what `tokenizer.json` holds)."""
        return self._tok

    def token_bytes(self) -> list[bytes]:
        """UTF-8 bytes of every id (`vocab_size` entries); special tokens give b"" (never part of text)."""
        return list(self._bytes)

    @functools.cached_property
    def _bytes(self) -> tuple[bytes, ...]:
        return _token_bytes(self._tok)


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(template, source: str) -> str | None:
    """One template string: `transformers` also stores a list of named templates; "default" is used."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise TokenizerError(f"{source}: chat_template must be a string or a list of named templates with a "
                         f"'default'; got {type(template).__name__}")


def _token_bytes(tok) -> tuple[bytes, ...]:
    """Bytes of each id: byte-level BPE maps printable characters back to bytes; SentencePiece-style
    vocabularies use `▁` for a space and `<0xNN>` for raw bytes; special (added) tokens give b""."""
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    out = [b""] * tok.get_vocab_size(with_added_tokens=True)
    for piece, i in vocab.items():
        if piece in special or i >= len(out):
            continue
        if byte_level and all(c in to_byte for c in piece):
            out[i] = bytes(to_byte[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (printable Latin-1 kept, the rest shifted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def load_tokenizer(path: str | None = None):
    """The tokenizer of a checkpoint: a directory with `tokenizer.json`, a `.gguf` file (or a directory
    holding one), a `tokenizer.json` file itself; `None` gives the byte tokenizer.

    Special tokens come from `tokenizer_config.json` (and `special_tokens_map.json`); ids given in
    `generation_config.json`/`config.json` take precedence, and every `eos_token_id` listed there ends a
    generation. The chat template is `tokenizer_config.json`'s `chat_template` or `chat_template.jinja`.
    """
    if path is None:
        return ByteTokenizer()
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _load_gguf_tokenizer(path)
    if os.path.isfile(path) and path.endswith(".json"):
        return HFTokenizer.from_file(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer path {path!r} does not exist: expected a checkpoint directory with "
                             f"tokenizer.json, a tokenizer.json file or a .gguf file")
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return _load_gguf_tokenizer(os.path.join(path, ggufs[0]))
        raise TokenizerError(f"no tokenizer.json in {path!r} (files: {sorted(os.listdir(path))[:12]}): expected "
                             f"the checkpoint's tokenizer.json, or set model.tokenizer to a tokenizer's path")
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(path, name)):
            config.update(read_json_object(os.path.join(path, name), TokenizerError))
    jinja = os.path.join(path, "chat_template.jinja")
    if config.get("chat_template") is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    ids: dict[str, int | None] = {}
    eos_ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        if os.path.isfile(os.path.join(path, name)):
            cfg = read_json_object(os.path.join(path, name), TokenizerError)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = cfg.get(key)
                values = value if isinstance(value, list) else [value]
                values = [v for v in values if isinstance(v, int)]
                if key == "eos_token_id":
                    eos_ids += values
                if values and ids.get(key.replace("_token", "")) is None:
                    ids[key.replace("_token", "")] = values[0]
    return HFTokenizer.from_file(file, config=config, eos_ids=eos_ids, ids=ids)


def _load_gguf_tokenizer(path: str) -> HFTokenizer:
    tok, config = gguf_tokenizer(path)
    return HFTokenizer(tok, config=config, source=path)


def check_fits(tokenizer, vocab_size: int, where: str) -> None:
    """Raise when `tokenizer` can produce ids the model (of `vocab_size` rows) has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                             f"has {vocab_size} rows: expected a tokenizer of this checkpoint (ids < {vocab_size})")
