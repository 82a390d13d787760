"""Import of GGUF files (llama.cpp's format): weights, architecture and the embedded tokenizer.

    model, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # or models.from_pretrained(path)
    tokenizer, tokenizer_config = gguf_tokenizer(path)               # a `tokenizers.Tokenizer` + HF-style dict

Architectures `llama`, `qwen2`, `qwen3` and `gemma3` (text). Tensors stored as F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K are dequantised (by the `gguf` package, llama.cpp's own reader) to
float32 and cast to the requested dtype; any other type is refused by name.

The file's tensors are mapped to Hugging Face's names and from there through the same table as
`models.hf` (`models.tensor_map`), so one table serves both formats. Two conventions of llama.cpp's converter
are undone on the way: the row permutation of `llama`'s q/k projections (it converts Hugging Face's
rotate-half RoPE layout into interleaved pairs), and Gemma's RMSNorm weights, stored as `1 + w`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from models.config import ModelConfig, gemma3, llama, qwen2, qwen3
from models.decoder import TransformerLM
from models.gguf_metadata import read_metadata
from models.gguf_tokenizer import gguf_tokenizer  # noqa: F401  (part of this module's interface)
from models.hf_config import CheckpointError
from models.tensor_map import params_from_tensors, tensor_map

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_CONSTRUCTORS = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3}

# Hugging Face module names → llama.cpp tensor names (the layer prefix `model.layers.{i}.` ↔ `blk.{i}.`).
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# Gemma 3 has four norms per layer: its post_attention_layernorm is a post-norm, the MLP's pre-norm is
# pre_feedforward_layernorm.
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str, arch: str) -> str:
    """llama.cpp's name of the tensor Hugging Face calls `hf_name` (e.g. `blk.0.attn_q.weight`)."""
    m = _LAYER_RE.match(hf_name)
    if m:
        layer, module, kind = m.groups()
        return f"blk.{layer}.{(_GEMMA_LAYER_NAMES if arch == 'gemma3' else _LAYER_NAMES)[module]}.{kind}"
    module, kind = hf_name.rsplit(".", 1)
    return f"{_GLOBAL_NAMES[module]}.{kind}"


# ----------------------------------------------------------------------------- metadata
def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], vocab_rows: int,
                     dtype: str = "float32") -> ModelConfig:
    """Our `ModelConfig` from GGUF metadata (llama.cpp's `{arch}.*` keys) and the tensors present."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF general.architecture={arch!r} is not supported: expected one of "
                              f"{SUPPORTED_ARCHITECTURES}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if required and value is None:
            raise CheckpointError(f"GGUF metadata {arch}.{key} is missing")
        return value

    n_layers, d_model = get("block_count", required=True), get("embedding_length", required=True)
    n_heads = get("attention.head_count", required=True)
    n_kv = get("attention.head_count_kv", n_heads)
    for key, value in (("attention.head_count", n_heads), ("attention.head_count_kv", n_kv)):
        if isinstance(value, list):  # per-layer counts: only uniform ones have a fixed layout here
            if len(set(value)) != 1:
                raise CheckpointError(f"GGUF {arch}.{key}={value} varies per layer: expected one count")
    n_heads, n_kv = (v[0] if isinstance(v, list) else v for v in (n_heads, n_kv))
    head_dim = get("attention.key_length", get("rope.dimension_count") if arch == "llama" else None)
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError("GGUF tensor 'rope_freqs.weight' (per-frequency RoPE factors, e.g. Llama 3.1 "
                              "scaling) is not supported: expected a file without it")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise CheckpointError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported: expected "
                              "'none' or 'linear'")
    rope_scaling = None
    if scaling_type == "linear" and get("rope.scaling.factor", 1.0) != 1.0:
        rope_scaling = (("rope_type", "linear"), ("factor", float(get("rope.scaling.factor"))))
    special = {f"{k}_token_id": meta.get(f"tokenizer.ggml.{g}_token_id")
               for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    kw: dict[str, Any] = dict(
        vocab_size=vocab_rows, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=get("feed_forward_length", required=True), max_seq_len=get("context_length", 2048),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in tensor_names, dtype=dtype, param_dtype=dtype, **special)
    if arch == "gemma3":
        # llama.cpp's Gemma 3: five sliding layers (RoPE base 1e4) per global one, scores scaled by
        # head_dim^-1/2 (27B, the 62-layer model: by (d_model / n_heads)^-1/2).
        kw.update(rope_theta=float(get("rope.freq_base", 1_000_000.0)), rope_local_theta=10_000.0,
                  layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                    for i in range(n_layers)),
                  sliding_window=get("attention.sliding_window", 4096),
                  query_pre_attn_scalar=d_model // n_heads if n_layers == 62 else (head_dim or d_model // n_heads),
                  final_logit_softcap=get("final_logit_softcapping"))
    else:
        kw["rope_theta"] = float(get("rope.freq_base", 10_000.0))
        if arch == "llama":
            kw.update(attention_bias="blk.0.attn_q.bias" in tensor_names,
                      mlp_bias="blk.0.ffn_up.bias" in tensor_names)
    try:
        return _CONSTRUCTORS[arch](**kw)
    except ValueError as e:
        raise CheckpointError(f"GGUF {arch} metadata: {e}") from e


# ----------------------------------------------------------------------------- tensors
def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as float32, in numpy (row-major) order: `[out, in]` for a projection."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _dequantize

    kind = GGMLQuantizationType(tensor.tensor_type)
    if kind.name not in SUPPORTED_TYPES:
        raise CheckpointError(f"GGUF tensor {tensor.name!r} has quantisation type {kind.name}, which is not "
                              f"supported: expected one of {SUPPORTED_TYPES}")
    values = np.asarray(_dequantize(tensor.data, kind), dtype=np.float32)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    return values.reshape(shape)


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, its rows were reordered from [first half, second
    half] (Hugging Face's rotate-half layout) to interleaved pairs; `w: [heads * E, ...]`."""
    E = w.shape[0] // n_heads
    return w.reshape(n_heads, E // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype: str = "float32") -> tuple[TransformerLM, dict]:
    """`(model, params)` from a GGUF file, its tensors dequantised and cast to `dtype`.

    Raises:
      CheckpointError: an unsupported architecture or quantisation type, a missing tensor or a shape
        mismatch (naming it).
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'gfo[hf]'") from e
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    reader = GGUFReader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_rows = int(tensors["token_embd.weight"].shape[-1])
    cfg = config_from_gguf(meta, set(tensors), vocab_rows, dtype=dtype)
    arch = meta["general.architecture"]
    wanted = {entry[0] for entry in tensor_map(cfg)}
    extra = sorted(n for n in tensors if n not in {gguf_name(h, arch) for h in wanted} and n != "rope_freqs.weight")
    if extra:
        raise CheckpointError(f"{path}: tensors {extra[:6]} have no place in a {arch} model of this config "
                              f"(unsupported variant?)")
    cache: dict[str, np.ndarray] = {}

    def lookup(hf_name: str) -> np.ndarray | None:
        name = gguf_name(hf_name, arch)
        if name not in tensors:
            return None
        if name not in cache:  # a tied embedding is looked up once
            w = dequantize(tensors[name])
            if arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
                w = _unpermute_rows(w, cfg.n_heads if ".attn_q." in name else cfg.kv_heads)
            if arch == "gemma3" and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's (1 + w) gains
            cache[name] = w
        return cache[name]

    model = TransformerLM(cfg)
    return model, params_from_tensors(model, lookup, path, name=lambda h: gguf_name(h, arch))
