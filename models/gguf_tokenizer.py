"""The tokenizer embedded in a GGUF file, rebuilt as a `tokenizers.Tokenizer`.

    tokenizer, config = gguf_tokenizer("model.gguf")
    tokenizer.encode("Hello").ids
    config  # {"bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token", "chat_template"}

A GGUF stores the vocabulary (`tokenizer.ggml.tokens`, `token_type`, `scores`, `merges`) under llama.cpp's
keys, not a `tokenizer.json`. Two kinds are rebuilt:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges. The text is split before BPE as
  the vocabulary was trained (`tokenizer.ggml.pre`): GPT-2's pattern by default, Llama 3's or Qwen 2's
  pattern, or single digits first for SmolLM ("smollm", as its own `tokenizer.json` does).
* `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE over "▁"-spelled pieces with byte fallback;
  the merges are recovered from the pieces' scores (a merge's rank is its result's score). Gemma's
  vocabularies (architectures gemma*) differ: no space is prepended, whitespace-only pieces are stored
  with real spaces, and their merge order is the pieces' order in the file, not their scores.

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so both are
matched whole. With `add_special_tokens=True`, `encode` adds BOS/EOS as the file's `add_bos_token` /
`add_eos_token` say.
"""

from __future__ import annotations

from typing import Any

from models.gguf_metadata import read_metadata

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of the byte-level vocabularies llama.cpp names (`tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


class GGUFTokenizerError(ValueError):
    """A GGUF file whose embedded tokenizer cannot be rebuilt."""


def gguf_tokenizer(path: str) -> tuple[Any, dict[str, Any]]:
    """`(tokenizers.Tokenizer, tokenizer_config)` from a GGUF file's embedded vocabulary.

    The dict has the keys of a Hugging Face `tokenizer_config.json`: `bos_token`, `eos_token`,
    `pad_token`, `unk_token` (token strings or None), `add_bos_token`, `add_eos_token` (bools) and
    `chat_template` (str or None).
    """
    from gguf import GGUFReader

    meta = read_metadata(GGUFReader(path))
    return tokenizer_from_metadata(meta, source=path)


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "<gguf>") -> tuple[Any, dict[str, Any]]:
    """`gguf_tokenizer` on already-read metadata (`models.gguf_metadata.read_metadata`)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFTokenizerError(f"{source}: no tokenizer.ggml.tokens: the file embeds no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    config: dict[str, Any] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFTokenizerError(f"{source}: tokenizer.ggml.{key}_token_id={token_id} is outside the "
                                     f"vocabulary of {len(tokens)} tokens")
        config[name] = None if token_id is None else tokens[token_id]
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config["chat_template"] = meta.get("tokenizer.chat_template")
    if kind == "gpt2":
        tok = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"), source)
    elif kind == "llama" and str(meta.get("general.architecture", "")).startswith("gemma"):
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        tok = _sentencepiece_bpe(tokens, types, [-float(i) for i in range(len(tokens))], config["unk_token"],
                                 add_space_prefix=False, source=source, gemma=True)
    elif kind == "llama":
        tok = _sentencepiece_bpe(tokens, types, meta.get("tokenizer.ggml.scores"), config["unk_token"],
                                 bool(meta.get("tokenizer.ggml.add_space_prefix", True)), source)
    else:
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.model={kind!r} is not supported: expected 'gpt2' "
                                 "(byte-level BPE) or 'llama' (SentencePiece BPE)")
    _add_special_tokens(tok, tokens, types)
    _set_post_processor(tok, config, kind)
    return tok, config


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, pre: str | None, source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if not merges:
        raise GGUFTokenizerError(f"{source}: a byte-level BPE vocabulary needs tokenizer.ggml.merges; none found")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # SmolLM's tokenizer.json: every digit alone, then GPT-2's pattern
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # "gpt2", "default" and unknown names: GPT-2's own pattern
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float] | None, unk: str | None,
                       add_space_prefix: bool, source: str, gemma: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    if scores is None:
        raise GGUFTokenizerError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores; none found")
    vocab = {token: i for i, token in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind in (_NORMAL, _USER_DEFINED, _UNUSED)}
    merges = []
    for token, score in zip(tokens, scores):
        if token not in mergeable or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    if gemma:  # spaces spelled "▁", nothing prepended, no pre-split
        tok.normalizer = normalizers.Replace(" ", "▁")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix
                                                     else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _set_post_processor(tok, config: dict[str, Any], kind: str) -> None:
    from tokenizers import processors

    bos = config["bos_token"] if config["add_bos_token"] else None
    eos = config["eos_token"] if config["add_eos_token"] else None
    if bos is None and eos is None:
        if kind == "gpt2":
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return
    pre = [f"{bos}:0"] if bos else []
    post = [f"{eos}:0"] if eos else []
    special = [(t, tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(pre + ["$A:0"] + post), pair=" ".join(pre + ["$A:0"] + post + pre + ["$B:1"] + post),
        special_tokens=special)
