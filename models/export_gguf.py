"""Export to GGUF (llama.cpp's format): weights as F32/F16/BF16, llama.cpp's names and metadata, the tokenizer.

    save_gguf(model, params, "out.gguf", tokenizer, source)    # readable by models.load_gguf, transformers, llama.cpp

The inverse of `models.gguf.load_gguf` for the families it imports (`llama`, `qwen2`, `qwen3`, `gemma3`):
tensors go through the Hugging Face table (`models.hf.hf_tensors`) and llama.cpp's names
(`models.gguf.gguf_name`), with llama.cpp's two conventions applied: `llama`'s q/k rows permuted into
interleaved RoPE pairs, Gemma's RMSNorm gains stored as `1 + w`. Matrices are stored in the parameters'
dtype (float32 → F32, float16 → F16, bfloat16 → BF16); 1-D tensors (norms, biases) stay F32, as
llama.cpp's converter keeps them. The written metadata is read back through `config_from_gguf` before
the file is kept: a config that would come back as a different model is refused, naming the field.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.config import ModelConfig
from models.decoder import TransformerLM
from models.gguf import SUPPORTED_ARCHITECTURES, config_from_gguf, gguf_name
from models.hf import hf_tensors
from models.hf_config import CheckpointError

_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation, `w: [heads * E, ...]`: per head, rows [first half, second half]
    (Hugging Face's rotate-half layout) → interleaved pairs (inverse of `models.gguf._unpermute_rows`)."""
    E = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, E // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer, cfg: ModelConfig, arch: str) -> None:
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_freq_base(cfg.rope_theta)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.dim_per_head)
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    if cfg.rope_type is not None:
        scaling = cfg.rope_scaling_dict
        if cfg.rope_type != "linear":
            raise CheckpointError(f"RoPE scaling {scaling} cannot be written to GGUF as gfo reads it back: "
                                  f"expected none or linear")
        writer.add_rope_scaling_type("linear")
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcap)
    from gguf import LlamaFileType

    writer.add_file_type({"float32": LlamaFileType.ALL_F32, "float16": LlamaFileType.MOSTLY_F16,
                          "bfloat16": LlamaFileType.MOSTLY_BF16}[cfg.param_dtype])


def _encoded(w: np.ndarray, dtype: str):
    """`(data, raw_dtype)` for `GGUFWriter.add_tensor`: F32 for 1-D tensors and float32, else F16/BF16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    w = np.asarray(w, np.float32)
    if w.ndim == 1 or dtype == "float32":
        return w, None
    if dtype == "float16":
        return w.astype(np.float16), None
    return quantize(w, Q.BF16), Q.BF16


def check_round_trip(cfg: ModelConfig, meta: dict, tensor_names: set[str]) -> None:
    """Raise when `config_from_gguf` would read the written metadata as a config other than `cfg`."""
    def explicit(c: ModelConfig) -> ModelConfig:  # defaults spelled out: `head_dim=None` is `d_model / n_heads`
        return dataclasses.replace(c, head_dim=c.dim_per_head, n_kv_heads=c.kv_heads, d_ff=c.ff_dim,
                                   param_dtype=cfg.param_dtype)

    back = explicit(config_from_gguf(meta, tensor_names, cfg.vocab_size, dtype=cfg.dtype))
    ours = dataclasses.asdict(explicit(cfg))
    for name, value in dataclasses.asdict(back).items():
        if name in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_impl"):
            continue  # not part of the computation (ids come with the tokenizer)
        if value != ours[name]:
            raise CheckpointError(f"ModelConfig.{name}={ours[name]!r} cannot be written to GGUF: gfo (and llama.cpp) "
                                  f"would read it back as {value!r}; use --format hf")


def save_gguf(model: TransformerLM, params: dict, path: str, tokenizer=None, source: str | None = None,
              name: str | None = None) -> None:
    """Write `params` (plain arrays of `model.config.param_dtype`) as the GGUF file `path`, the tokenizer
    (`models.export_tokenizer.gguf_tokenizer_fields(tokenizer, source)`) embedded."""
    import gguf

    from models.export_tokenizer import gguf_tokenizer_fields

    cfg = model.config
    if cfg.family not in _ARCH:
        raise CheckpointError(f"GGUF export covers the families gfo reads from GGUF {SUPPORTED_ARCHITECTURES}; "
                              f"{cfg.family!r} is not one of them: use --format hf")
    arch = _ARCH[cfg.family]
    fields = gguf_tokenizer_fields(tokenizer, source)  # before anything is written: it may refuse
    tensors = hf_tensors(cfg, params)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or f"gfo-{arch}")
    _metadata(writer, cfg, arch)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for hf_name, w in tensors.items():
        gname = gguf_name(hf_name, arch)
        w = np.asarray(w, np.float32)
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            w = permute_rows(w, cfg.n_heads if ".attn_q." in gname else cfg.kv_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            w = w + 1.0
        data, raw = _encoded(w, cfg.param_dtype)
        writer.add_tensor(gname, data, raw_dtype=raw)
    meta = _written_metadata(writer)
    check_round_trip(cfg, meta, {gguf_name(n, arch) for n in tensors})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _written_metadata(writer) -> dict:
    """The key-value fields queued in a `GGUFWriter` (its one shard), as plain Python values."""
    return {key: field.value for key, field in writer.kv_data[0].items()}
