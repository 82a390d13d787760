"""A model's tokenizer written out with an exported model: Hugging Face files, or GGUF metadata fields.

    note = write_hf_tokenizer(out_dir, tokenizer, source, cfg)     # tokenizer.json, tokenizer_config.json, ...
    fields = gguf_tokenizer_fields(tokenizer, source)              # [(key, value, GGUFValueType, sub_type)]

`source` is the path the tokenizer was read from (a checkpoint directory, a `tokenizer.json`, a `.gguf`)
or None for gfo's byte tokenizer. A Hugging Face directory's own files (and its chat template and
`generation_config.json`) are copied through unchanged; a tokenizer rebuilt from a GGUF file is saved
as `tokenizer.json` + `tokenizer_config.json`. For GGUF, a GGUF source's `tokenizer.*` fields are copied
with their types; a byte-level BPE `tokenizer.json` is converted to llama.cpp's `gpt2` vocabulary
(tokens by id, token types, merges, the pre-tokenizer's name) and checked to encode as the original.
gfo's byte tokenizer has no file form: nothing is written for it, and the returned note says so.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from models.config import ModelConfig
from models.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
BYTE_NOTE = "no tokenizer files: the run uses gfo's byte tokenizer (ids = UTF-8 bytes)"
_PROBES = ["Hello, world! The cat sat on the mat.", "  tabs\tand\nnew lines 12345 6789", "naïve café — 日本 🙂",
           "it's THEY'LL x,the 1 2 3"]


def _source_dir(source: str | None) -> str | None:
    """The Hugging Face directory `source` names (with a `tokenizer.json`), or None."""
    if source is None:
        return None
    directory = source if os.path.isdir(source) else os.path.dirname(source) if source.endswith(".json") else None
    if directory and os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    return None


def gguf_source(source: str | None) -> str | None:
    """The `.gguf` file `source` names (the file, or a directory's only one without `tokenizer.json`)."""
    if source is None:
        return None
    if os.path.isfile(source) and source.endswith(".gguf"):
        return source
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "tokenizer.json")):
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return os.path.join(source, ggufs[0])
    return None


def write_hf_tokenizer(out: str, tokenizer, source: str | None, cfg: ModelConfig) -> str | None:
    """Write the tokenizer files (and `generation_config.json`) into the export directory `out`; returns a
    note when nothing could be written (the byte tokenizer), else None."""
    directory = _source_dir(source)
    copied = []
    if directory is not None:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copyfile(os.path.join(directory, name), os.path.join(out, name))
                copied.append(name)
    elif hasattr(tokenizer, "backend"):
        tokenizer.backend.save(os.path.join(out, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens,
                  "padding_side": getattr(tokenizer, "padding_side", "left")}
        if tokenizer.chat_template is not None:
            config["chat_template"] = tokenizer.chat_template
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
    if "generation_config.json" not in copied:
        eos = list(getattr(tokenizer, "eos_ids", ()) or ()) or ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
                      "pad_token_id": cfg.pad_token_id}
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    return BYTE_NOTE if directory is None and not hasattr(tokenizer, "backend") else None


def gguf_tokenizer_fields(tokenizer, source: str | None) -> list[tuple[str, Any, Any, Any]]:
    """The `tokenizer.*` GGUF fields of `tokenizer` as `(key, value, GGUFValueType, array sub_type)`;
    empty for the byte tokenizer. Raises ValueError for a tokenizer that is not byte-level BPE."""
    from gguf import GGUFReader, GGUFValueType

    path = gguf_source(source)
    if path is not None:
        fields = []
        for name, field in GGUFReader(path).fields.items():
            if name.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
                fields.append((name, field.contents(), vtype, sub))
        return fields
    if not hasattr(tokenizer, "backend"):
        return []
    meta = _byte_level_metadata(tokenizer, source)
    _check_same_encoding(tokenizer, meta, source)
    return [(k, v, *_gguf_type(v)) for k, v in meta.items()]


def _byte_level_metadata(tokenizer, source) -> dict[str, Any]:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"the tokenizer of {source!r} is not byte-level BPE (model {model.get('type')!r}): a GGUF "
                         f"export embeds byte-level BPE vocabularies only")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre_spec = json.dumps(spec.get("pre_tokenizer"))
    pre = ("smollm" if '"individual_digits": true' in pre_spec else
           "llama-bpe" if json.dumps(_LLAMA3_SPLIT)[1:-1] in pre_spec else
           "qwen2" if json.dumps(_QWEN2_SPLIT)[1:-1] in pre_spec else "default")
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    for key, name in (("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        if getattr(tokenizer, name, None) is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(getattr(tokenizer, name))
    post = json.dumps(spec.get("post_processor"))
    bos = tokenizer.special_tokens.get("bos_token")
    meta["tokenizer.ggml.add_bos_token"] = bool(bos) and f'"{bos}"' in post and "TemplateProcessing" in post
    meta["tokenizer.ggml.add_eos_token"] = False
    if tokenizer.chat_template is not None:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _check_same_encoding(tokenizer, meta: dict[str, Any], source) -> None:
    """Refuse metadata whose rebuilt tokenizer (as gfo and llama.cpp read it) encodes a probe differently."""
    from models.gguf_tokenizer import tokenizer_from_metadata

    rebuilt, _ = tokenizer_from_metadata(meta, source=str(source))
    for text in _PROBES:
        ours, theirs = tokenizer.encode(text, add_special_tokens=True), rebuilt.encode(text, add_special_tokens=True).ids
        if ours != theirs:
            raise ValueError(f"the tokenizer of {source!r} cannot be embedded faithfully: as GGUF metadata it would "
                             f"encode {text!r} as {theirs[:8]}..., not {ours[:8]}...")


def _gguf_type(value) -> tuple[Any, Any]:
    from gguf import GGUFValueType as T

    def scalar(v):
        return T.BOOL if isinstance(v, bool) else T.UINT32 if isinstance(v, int) else T.FLOAT32 if isinstance(
            v, float) else T.STRING

    if isinstance(value, list):  # llama.cpp's arrays of ids and token types are INT32
        sub = scalar(value[0]) if value else T.STRING
        return T.ARRAY, T.INT32 if sub == T.UINT32 else sub
    return scalar(value), None
