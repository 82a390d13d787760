"""Import and export of local Hugging Face checkpoints (`model_type` gpt2, opt, llama, qwen2, qwen3, gemma3_text).

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
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.decoder import TransformerLM
from models.hf_config import SUPPORTED_MODEL_TYPES, CheckpointError, config_from_hf, config_to_hf  # noqa: F401
from models.jsonfile import read_json_object
from models.tree import LAYERS, get_path, set_path

# ----------------------------------------------------------------------------- tensor mapping
# Each entry: (HF tensor name, our path, HF→ours transform, layer). Transforms are their own description:
# "copy" or "T" (transpose). GPT-2's fused c_attn is handled as three entries slicing one tensor. A
# per-layer tensor has `layer = i` and a path under the stacked `LAYERS` subtree: it is row `i` of our leaf.
Entry = tuple[str, tuple[str, ...], Any, "int | None"]


_LAYER_INDEX = re.compile(r"^(?:transformer\.h|model\.decoder\.layers|model\.layers)\.(\d+)\.")


def _tensor_map(cfg: ModelConfig) -> list[Entry]:
    out = []
    for hf_name, path, transform in _named_tensors(cfg):
        m = _LAYER_INDEX.match(hf_name)
        out.append((hf_name, path, transform, int(m.group(1)) if m else None))
    return out


def _named_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], Any]]:
    entries: list[tuple[str, tuple[str, ...], Any]] = []
    if cfg.family == "gpt2":
        entries += [("transformer.wte.weight", ("embed",), "copy"),
                    ("transformer.wpe.weight", ("pos_embed",), "copy"),
                    ("transformer.ln_f.weight", ("final_norm", "scale"), "copy"),
                    ("transformer.ln_f.bias", ("final_norm", "bias"), "copy")]
        D = cfg.d_model
        for i in range(cfg.n_layers):
            hf, our = f"transformer.h.{i}.", LAYERS
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
            hf, our = f"model.decoder.layers.{i}.", LAYERS
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
    norms = [("input_layernorm", ("attn_norm",))]
    if cfg.post_norms:  # Gemma 3 names the MLP's pre-norm "pre_feedforward"
        norms += [("post_attention_layernorm", ("attn_post_norm",)), ("pre_feedforward_layernorm", ("mlp_norm",)),
                  ("post_feedforward_layernorm", ("mlp_post_norm",))]
    else:
        norms += [("post_attention_layernorm", ("mlp_norm",))]
    if cfg.qk_norm:
        norms += [("self_attn.q_norm", ("attn", "q_norm")), ("self_attn.k_norm", ("attn", "k_norm"))]
    for i in range(cfg.n_layers):
        hf, our = f"model.layers.{i}.", LAYERS
        entries += [(hf + hf_mod + ".weight", (our,) + our_mod + ("scale",), "copy") for hf_mod, our_mod in norms]
        linears = [("self_attn.q_proj", ("attn", "q"), cfg.attention_bias),
                   ("self_attn.k_proj", ("attn", "k"), cfg.attention_bias),
                   ("self_attn.v_proj", ("attn", "v"), cfg.attention_bias),
                   ("self_attn.o_proj", ("attn", "o"), cfg.out_bias),
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
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
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
    """Load a local checkpoint as `(model, params)`: a Hugging Face directory, or a GGUF file (or a
    directory holding exactly one `.gguf` and no `config.json`; see `models.gguf.load_gguf`).

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index), or a `.gguf` file.
      dtype: dtype of the returned parameters and of computation ("float32" or "bfloat16").
    Raises:
      CheckpointError: unsupported `model_type`, a missing tensor, or a shape mismatch (naming it).
    """
    config_file = os.path.join(path, "config.json")
    gguf_file = _single_gguf(path)
    if gguf_file is not None:
        from models.gguf import load_gguf

        return load_gguf(gguf_file, dtype=dtype)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {path!r}: expected a Hugging Face checkpoint directory "
                              "(or a .gguf file)")
    cfg = config_from_hf(read_json_object(config_file, CheckpointError), dtype=dtype)
    model = TransformerLM(cfg)
    return model, params_from_tensors(model, _read_tensors(path), path)


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


def params_from_tensors(model: TransformerLM, lookup: Callable[[str], Any], source: str,
                        name: Callable[[str], str] = lambda hf_name: hf_name) -> dict:
    """Our parameter pytree from `lookup(hf_name) -> array [HF layout] or None`, checking every shape;
    `name(hf_name)` is the tensor's name in the file, for error messages. Per-layer tensors are written
    into row `i` of their stacked `[L, ...]` leaf (one host buffer per leaf, no copy per layer)."""
    cfg = model.config
    expected = jax.eval_shape(model.init, jax.random.key(0))
    dtype = np.dtype(cfg.storage_dtype)
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    params: dict = {}
    for hf_name, our_path, transform, layer in _tensor_map(cfg):
        tensor = lookup(hf_name)
        where = "/".join(our_path) + ("" if layer is None else f"[{layer}]")
        if tensor is None:
            raise CheckpointError(f"{source}: tensor {name(hf_name)!r} (for {where}) is missing")
        value = _to_ours(tensor, transform)
        full = get_path(expected, our_path).shape
        want = full if layer is None else full[1:]
        if value.shape != want:
            raise CheckpointError(f"{source}: tensor {name(hf_name)!r} has shape {tuple(tensor.shape)}, which gives "
                                  f"{tuple(value.shape)} for {where}; expected {want}")
        if layer is None:
            set_path(params, our_path, jnp.asarray(value, dtype=cfg.storage_dtype))
        else:
            if our_path not in stacked:
                stacked[our_path] = np.empty(full, dtype)
            stacked[our_path][layer] = np.asarray(value).astype(dtype)
    for our_path, value in stacked.items():
        set_path(params, our_path, jnp.asarray(value))
    return params


def save_pretrained(model: TransformerLM, params: dict, path: str, shard_size_mb: float | None = None) -> None:
    """Write `config.json` + `model.safetensors` (or shards with an index) readable by `transformers`."""
    from safetensors.numpy import save_file

    cfg = model.config
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    params = jax.device_get(params)  # one transfer; stacked leaves are sliced per layer on the host
    for hf_name, our_path, transform, layer in _tensor_map(cfg):
        value = np.asarray(get_path(params, our_path))
        if layer is not None:
            value = value[layer]
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

