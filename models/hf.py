"""Import and export of local Hugging Face checkpoints (`model_type` gpt2, opt, llama, qwen2, qwen3, gemma3_text).

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` with its shard files. Nothing is downloaded: a path only.

    model, params = load_hf("/ckpt/gpt2")                   # or models.from_pretrained (HF or GGUF)
    save_pretrained(model, params, "/out/gpt2-finetuned")   # loadable by transformers

Tensors are read in their stored dtype and placed by the name ⇄ path table of `models.tensor_map`
(`tensor_map`, `params_from_tensors`), which also gives the conventions: HF `nn.Linear` weights `[out, in]`
are transposed into our `[in, out]` kernels, GPT-2's fused `c_attn` is split into q, k, v, and per-layer
tensors fill the stacked `[n_layers, ...]` leaves; the parameters come back in `dtype`. The
`config.json` ⇄ `ModelConfig` translation is `models.hf_config`'s.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from models.decoder import TransformerLM
from models.hf_config import SUPPORTED_MODEL_TYPES, CheckpointError, config_from_hf, config_to_hf  # noqa: F401
from models.jsonfile import read_json_object
from models.tensor_map import params_from_tensors, tensor_map
from models.tree import get_path


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
    def unreadable(file: str, e: Exception) -> CheckpointError:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        return CheckpointError(f"{file} is not a readable safetensors file ({type(e).__name__}: {why}): it is "
                               f"truncated or corrupt; copy or save the checkpoint again")

    handles = {}
    for key, file in files.items():
        try:
            handles[key] = safe_open(file, framework="flax")
        except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError (and OSError) for a bad file
            raise unreadable(file, e) from None
    names: dict[str, str | None] = {}
    for key, h in handles.items():
        for name in h.keys():
            names[name] = key if where is None else where.get(name, key)

    def lookup(name: str) -> np.ndarray | None:
        # Original GPT-2 checkpoints lack the "transformer." prefix.
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in names:
                try:
                    return handles[names[candidate]].get_tensor(candidate)
                except Exception as e:  # noqa: BLE001 - data cut short after a whole header
                    raise unreadable(files[names[candidate]], e) from None
        return None

    return lookup


def load_hf(path: str, dtype: str = "float32") -> tuple[TransformerLM, dict]:
    """`(model, params)` from a Hugging Face checkpoint directory, the parameters in `dtype`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: dtype of the returned parameters and of computation ("float32" or "bfloat16").
    Raises:
      CheckpointError: no `config.json`, an unsupported `model_type`, a missing tensor, or a shape
        mismatch (naming it).
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {path!r}: expected a Hugging Face checkpoint directory "
                              "(or a .gguf file)")
    cfg = config_from_hf(read_json_object(config_file, CheckpointError), dtype=dtype)
    model = TransformerLM(cfg)
    return model, params_from_tensors(model, _read_tensors(path), path)


def hf_tensors(cfg, params: dict) -> dict[str, np.ndarray]:
    """Every tensor of `cfg`'s Hugging Face checkpoint from our `params`, by HF name, in HF layout
    (`[out, in]` projections, GPT-2's fused `c_attn`, one array per layer), in the parameters' dtypes.
    `params` must hold plain arrays (merge a LoRA densely first: `models.merge_lora(..., dense=True)`)."""
    tensors: dict[str, np.ndarray] = {}
    params = jax.device_get(params)  # one transfer; stacked leaves are sliced per layer on the host
    for hf_name, our_path, transform, layer in tensor_map(cfg):
        value = np.asarray(get_path(params, our_path))
        if layer is not None:
            value = value[layer]
        if transform == "T":
            tensors[hf_name] = np.ascontiguousarray(value.T)
        elif transform == "copy":
            tensors[hf_name] = value
        else:  # pieces of a fused tensor, concatenated in map order
            tensors[hf_name] = value if hf_name not in tensors else np.concatenate([tensors[hf_name], value], -1)
    return tensors


def save_pretrained(model: TransformerLM, params: dict, path: str, shard_size_mb: float | None = None) -> None:
    """Write `config.json` + `model.safetensors` (or shards of at most `shard_size_mb` MiB with an index)
    readable by `transformers`; the tensors in the parameters' dtypes, `config.json`'s `torch_dtype`
    the config's `param_dtype`."""
    from safetensors.numpy import save_file

    cfg = model.config
    os.makedirs(path, exist_ok=True)
    tensors = hf_tensors(cfg, params)
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

