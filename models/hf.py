"""Import and export of local Hugging Face checkpoints (`model_type` gpt2, llama and opt).

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` with its shard files. Nothing is downloaded: a path only.

    model, params = from_pretrained("/ckpt/gpt2")
    save_pretrained(model, params, "/out/gpt2-finetuned")   # loadable by transformers

Conventions: HF `nn.Linear` weights are `[out, in]` and are transposed into our `[in, out]` kernels;
GPT-2's `Conv1D` weights are already `[in, out]`; GPT-2's fused `c_attn` is split into q, k, v. OPT's
position table keeps its 2 leading offset rows (`ModelConfig.position_offset`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, gpt2, llama, opt
from models.decoder import TransformerLM
from models.tree import get_path, set_path

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "opt")
_ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


# ----------------------------------------------------------------------------- config mapping
def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Our `ModelConfig` from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"config.json model_type={model_type!r} is not supported: expected one "
                              f"of {SUPPORTED_MODEL_TYPES}")
    act = hf.get("hidden_act" if model_type == "llama" else "activation_function",
                 "relu" if model_type == "opt" else "gelu_new")
    if act not in _ACT_FROM_HF:
        raise CheckpointError(f"activation {act!r} is not supported: expected one of {tuple(_ACT_FROM_HF)}")
    special = dict(bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
                   pad_token_id=_first(hf.get("pad_token_id")))
    if model_type == "gpt2":
        for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                         ("add_cross_attention", False)):
            if hf.get(flag, ok) != ok:
                raise CheckpointError(f"gpt2 config {flag}={hf[flag]!r} is not supported: expected {ok}")
        return gpt2(vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                    n_heads=hf["n_head"], d_ff=hf.get("n_inner"), max_seq_len=hf.get("n_positions", 1024),
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_ACT_FROM_HF[act],
                    initializer_range=hf.get("initializer_range", 0.02),
                    tie_embeddings=hf.get("tie_word_embeddings", True), dtype=dtype, param_dtype=dtype,
                    **special)
    if model_type == "opt":
        d = hf["hidden_size"]
        for flag, ok in (("do_layer_norm_before", True), ("word_embed_proj_dim", d), ("enable_bias", True),
                         ("layer_norm_elementwise_affine", True), ("_remove_final_layer_norm", False)):
            if hf.get(flag, ok) != ok:
                raise CheckpointError(f"opt config {flag}={hf[flag]!r} is not supported: expected {ok} "
                                      f"(OPT-350M's post-LN / projected-embedding layout is not implemented)")
        return opt(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"], d_ff=hf["ffn_dim"],
                   max_seq_len=hf.get("max_position_embeddings", 2048), activation=_ACT_FROM_HF[act],
                   initializer_range=hf.get("init_std", 0.02), tie_embeddings=hf.get("tie_word_embeddings", True),
                   dtype=dtype, param_dtype=dtype, **special)
    if hf.get("pretraining_tp", 1) != 1:
        raise CheckpointError(f"llama config pretraining_tp={hf['pretraining_tp']} is not supported: expected 1")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", None))
    kind = None if kind == "default" else kind
    rope_scaling = None if kind is None else (("rope_type", kind),) + tuple(sorted(rope.items()))
    return llama(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                 n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                 head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
                 max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                 activation=_ACT_FROM_HF[act], rope_theta=theta, rope_scaling=rope_scaling,
                 tie_embeddings=hf.get("tie_word_embeddings", False),
                 attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                 initializer_range=hf.get("initializer_range", 0.02), dtype=dtype, param_dtype=dtype,
                 **special)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of our config (inverse of `config_from_hf`)."""
    special = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    dtype = cfg.param_dtype
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                    n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function=cfg.activation, initializer_range=cfg.initializer_range,
                    tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, **special)
    if cfg.family == "opt":
        return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, word_embed_proj_dim=cfg.d_model, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, ffn_dim=cfg.ff_dim, max_position_embeddings=cfg.max_seq_len,
                    activation_function=cfg.activation, do_layer_norm_before=True, enable_bias=True,
                    init_std=cfg.initializer_range, tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype,
                    **special)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope_scaling_dict}
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, intermediate_size=cfg.ff_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation,
                rope_theta=cfg.rope_theta, rope_parameters=rope,
                rope_scaling=None if cfg.rope_type is None else rope,
                tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                mlp_bias=cfg.mlp_bias, initializer_range=cfg.initializer_range, pretraining_tp=1,
                torch_dtype=dtype, **special)


def _first(value):
    return value[0] if isinstance(value, list) and value else value


# ----------------------------------------------------------------------------- tensor mapping
# Each entry: (HF tensor name, our path, HF→ours transform). Transforms are their own description:
# "copy" or "T" (transpose). GPT-2's fused c_attn is handled as three entries slicing one tensor.
def _tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], Any]]:
    entries: list[tuple[str, tuple[str, ...], Any]] = []
    if cfg.family == "gpt2":
        entries += [("transformer.wte.weight", ("embed",), "copy"),
                    ("transformer.wpe.weight", ("pos_embed",), "copy"),
                    ("transformer.ln_f.weight", ("final_norm", "scale"), "copy"),
                    ("transformer.ln_f.bias", ("final_norm", "bias"), "copy")]
        D = cfg.d_model
        for i in range(cfg.n_layers):
            hf, our = f"transformer.h.{i}.", f"layers_{i}"
            for j, name in enumerate("qkv"):
                part = ("split", j * D, (j + 1) * D)
                entries += [(hf + "attn.c_attn.weight", (our, "attn", name, "kernel"), part),
                            (hf + "attn.c_attn.bias", (our, "attn", name, "bias"), part)]
            for hf_mod, our_mod in (("ln_1", ("attn_norm",)), ("ln_2", ("mlp_norm",))):
                entries += [(hf + hf_mod + ".weight", (our,) + our_mod + ("scale",), "copy"),
                            (hf + hf_mod + ".bias", (our,) + our_mod + ("bias",), "copy")]
            for hf_mod, our_mod in (("attn.c_proj", ("attn", "o")), ("mlp.c_fc", ("mlp", "fc")),
                                    ("mlp.c_proj", ("mlp", "proj"))):
                entries += [(hf + hf_mod + ".weight", (our,) + our_mod + ("kernel",), "copy"),
                            (hf + hf_mod + ".bias", (our,) + our_mod + ("bias",), "copy")]
        if not cfg.tie_embeddings:
            entries.append(("lm_head.weight", ("lm_head",), "T"))
        return entries
    if cfg.family == "opt":
        entries += [("model.decoder.embed_tokens.weight", ("embed",), "copy"),
                    ("model.decoder.embed_positions.weight", ("pos_embed",), "copy"),
                    ("model.decoder.final_layer_norm.weight", ("final_norm", "scale"), "copy"),
                    ("model.decoder.final_layer_norm.bias", ("final_norm", "bias"), "copy")]
        for i in range(cfg.n_layers):
            hf, our = f"model.decoder.layers.{i}.", f"layers_{i}"
            for hf_mod, our_mod in (("self_attn_layer_norm", ("attn_norm",)), ("final_layer_norm", ("mlp_norm",))):
                entries += [(hf + hf_mod + ".weight", (our,) + our_mod + ("scale",), "copy"),
                            (hf + hf_mod + ".bias", (our,) + our_mod + ("bias",), "copy")]
            for hf_mod, our_mod in (("self_attn.q_proj", ("attn", "q")), ("self_attn.k_proj", ("attn", "k")),
                                    ("self_attn.v_proj", ("attn", "v")), ("self_attn.out_proj", ("attn", "o")),
                                    ("fc1", ("mlp", "fc")), ("fc2", ("mlp", "proj"))):
                entries += [(hf + hf_mod + ".weight", (our,) + our_mod + ("kernel",), "T"),
                            (hf + hf_mod + ".bias", (our,) + our_mod + ("bias",), "copy")]
        if not cfg.tie_embeddings:
            entries.append(("lm_head.weight", ("lm_head",), "T"))
        return entries
    entries += [("model.embed_tokens.weight", ("embed",), "copy"),
                ("model.norm.weight", ("final_norm", "scale"), "copy")]
    for i in range(cfg.n_layers):
        hf, our = f"model.layers.{i}.", f"layers_{i}"
        entries += [(hf + "input_layernorm.weight", (our, "attn_norm", "scale"), "copy"),
                    (hf + "post_attention_layernorm.weight", (our, "mlp_norm", "scale"), "copy")]
        linears = [("self_attn.q_proj", ("attn", "q"), cfg.attention_bias),
                   ("self_attn.k_proj", ("attn", "k"), cfg.attention_bias),
                   ("self_attn.v_proj", ("attn", "v"), cfg.attention_bias),
                   ("self_attn.o_proj", ("attn", "o"), cfg.attention_bias),
                   ("mlp.gate_proj", ("mlp", "gate"), cfg.mlp_bias),
                   ("mlp.up_proj", ("mlp", "up"), cfg.mlp_bias),
                   ("mlp.down_proj", ("mlp", "down"), cfg.mlp_bias)]
        for hf_mod, our_mod, has_bias in linears:
            entries.append((hf + hf_mod + ".weight", (our,) + our_mod + ("kernel",), "T"))
            if has_bias:
                entries.append((hf + hf_mod + ".bias", (our,) + our_mod + ("bias",), "copy"))
    if not cfg.tie_embeddings:
        entries.append(("lm_head.weight", ("lm_head",), "T"))
    return entries


def _to_ours(tensor: jax.Array, transform) -> jax.Array:
    if transform == "copy":
        return tensor
    if transform == "T":
        return tensor.T
    _, start, stop = transform
    return tensor[..., start:stop]


# ----------------------------------------------------------------------------- file reading
def _read_tensors(path: str) -> Callable[[str], jax.Array | None]:
    """A lookup `name -> array (in its stored dtype) or None` over the checkpoint's safetensors files."""
    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = {None: single}
        where: dict[str, str | None] | None = None
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object mapping tensor names to files")
        files = {name: os.path.join(path, name) for name in set(weight_map.values())}
        for file in files.values():
            if not os.path.isfile(file):
                raise CheckpointError(f"{index} names shard {file!r}, which does not exist")
        where = weight_map
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    # framework="flax" reads bfloat16 tensors, which numpy cannot represent without ml_dtypes.
    handles = {key: safe_open(file, framework="flax") for key, file in files.items()}
    names: dict[str, str | None] = {}
    for key, h in handles.items():
        for name in h.keys():
            names[name] = key if where is None else where.get(name, key)

    def lookup(name: str) -> np.ndarray | None:
        # Original GPT-2 checkpoints lack the "transformer." prefix.
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in names:
                return handles[names[candidate]].get_tensor(candidate)
        return None

    return lookup


def from_pretrained(path: str, dtype: str = "float32") -> tuple[TransformerLM, dict]:
    """Load a local Hugging Face checkpoint directory as `(model, params)`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: dtype of the returned parameters and of computation ("float32" or "bfloat16").
    Raises:
      CheckpointError: unsupported `model_type`, a missing tensor, or a shape mismatch (naming it).
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {path!r}: expected a Hugging Face checkpoint directory")
    with open(config_file) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype)
    model = TransformerLM(cfg)
    expected = jax.eval_shape(model.init, jax.random.key(0))
    lookup = _read_tensors(path)
    params: dict = {}
    for hf_name, our_path, transform in _tensor_map(cfg):
        tensor = lookup(hf_name)
        if tensor is None:
            raise CheckpointError(f"{path}: tensor {hf_name!r} (for {'/'.join(our_path)}) is missing")
        value = _to_ours(tensor, transform)
        want = get_path(expected, our_path).shape
        if value.shape != want:
            raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, which gives "
                                  f"{tuple(value.shape)} for {'/'.join(our_path)}; expected {want}")
        set_path(params, our_path, jnp.asarray(value, dtype=cfg.storage_dtype))
    return model, params


def save_pretrained(model: TransformerLM, params: dict, path: str, shard_size_mb: float | None = None) -> None:
    """Write `config.json` + `model.safetensors` (or shards with an index) readable by `transformers`."""
    from safetensors.numpy import save_file

    cfg = model.config
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for hf_name, our_path, transform in _tensor_map(cfg):
        value = np.asarray(jax.device_get(get_path(params, our_path)))
        if transform == "T":
            tensors[hf_name] = np.ascontiguousarray(value.T)
        elif transform == "copy":
            tensors[hf_name] = value
        else:  # pieces of a fused tensor, concatenated in map order
            tensors[hf_name] = value if hf_name not in tensors else np.concatenate([tensors[hf_name], value], -1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    if shard_size_mb is None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    limit = shard_size_mb * 2**20
    for name, tensor in tensors.items():
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > limit:
            shards.append({})
        shards[-1][name] = tensor
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)

