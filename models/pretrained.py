"""`from_pretrained`: the one entry point for a local checkpoint, whichever format it is in.

    model, params = from_pretrained("/ckpt/gpt2")                         # a Hugging Face directory
    model, params = from_pretrained("/ckpt/SmolLM2-135M-Instruct.Q4_1.gguf")  # a GGUF file, dequantised
    logits = model.apply(params, tokens)                                   # [B, T, vocab] float32

A `.gguf` file, or a directory holding exactly one `.gguf` and no `config.json`, is read by
`models.gguf.load_gguf`; any other path must be a Hugging Face checkpoint directory (`models.hf.load_hf`).
Either way the result is a `TransformerLM` and its parameter pytree, every leaf of `dtype` and the blocks
stacked `[n_layers, ...]` under `LAYERS`. This module is the only one of `models/` that knows both
loaders, and none of them imports it (it is exposed as `models.from_pretrained`).
"""

from __future__ import annotations

import os

from models.decoder import TransformerLM
from models.gguf import load_gguf
from models.hf import load_hf
from models.hf_config import CheckpointError


def from_pretrained(path: str, dtype: str = "float32") -> tuple[TransformerLM, dict]:
    """Load a local checkpoint as `(model, params)`: a Hugging Face directory, or a GGUF file (or a
    directory holding exactly one `.gguf` and no `config.json`; see `models.gguf.load_gguf`).

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index), or a `.gguf` file.
      dtype: dtype of the returned parameters and of computation ("float32" or "bfloat16").
    Raises:
      CheckpointError: a path that does not exist, an unsupported `model_type`, a missing tensor, or a
        shape mismatch (naming it).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: expected a Hugging Face checkpoint directory "
                              "(config.json + model.safetensors) or a .gguf file")
    gguf_file = _single_gguf(path)
    if gguf_file is not None:
        return load_gguf(gguf_file, dtype=dtype)
    return load_hf(path, dtype=dtype)


def _single_gguf(path: str) -> str | None:
    """The GGUF file `path` names: itself, or the only `.gguf` of a directory without `config.json`."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) > 1:
            raise CheckpointError(f"{path!r} holds {len(ggufs)} .gguf files {ggufs} and no config.json: "
                                  "expected exactly one (pass the file itself)")
        if ggufs:
            return os.path.join(path, ggufs[0])
    return None
