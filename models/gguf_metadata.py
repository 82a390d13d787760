"""The key-value metadata of a GGUF file (llama.cpp's format) as plain Python values.

`read_metadata(reader)` turns the fields of an open `gguf.GGUFReader` into a dict from llama.cpp's key
names (`general.architecture`, `{arch}.block_count`, `tokenizer.ggml.tokens`, ...) to `str`, `int`,
`float`, `bool` or lists of them, the file header (`GGUF.*`) left out. Both readers of a GGUF file use it:
`models.gguf` for the architecture and weights, `models.gguf_tokenizer` for the embedded vocabulary; it
imports neither (nor the `gguf` package: the caller opens the reader).
"""

from __future__ import annotations

from typing import Any


def read_metadata(reader) -> dict[str, Any]:
    """Every key-value field of a `gguf.GGUFReader` as Python values (str, int, float, bool, lists)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        out[name] = field.contents()
    return out
