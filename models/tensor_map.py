"""Where each tensor of a checkpoint goes: Hugging Face tensor names ⇄ our parameter paths.

`tensor_map(cfg)` lists every tensor of a `ModelConfig`'s Hugging Face checkpoint as an `Entry`
`(HF name, our path, transform, layer)`: the path is a tuple of keys into our parameter pytree, the
transform turns the HF array into ours (`"copy"`, `"T"` for a transpose, or `("split", start, stop)`, a
slice of the last axis), and `layer` is `i` for a per-layer tensor, which is row `i` of a stacked
`[n_layers, ...]` leaf under `LAYERS` (`None` otherwise). `params_from_tensors(model, lookup, source)`
builds our parameter pytree (arrays of `cfg.storage_dtype`, shapes those of `model.init`) from any
lookup `hf_name -> array in HF layout, or None`, checking every shape.

One table serves every format: `models.hf` reads safetensors through it (and writes them back with it),
`models.gguf` maps llama.cpp's tensor names to Hugging Face's and reads through the same table.

Conventions: HF `nn.Linear` weights are `[out, in]` and are transposed into our `[in, out]` kernels;
GPT-2's `Conv1D` weights are already `[in, out]`; GPT-2's fused `c_attn` is split into q, k, v. OPT's
position table keeps its 2 leading offset rows (`ModelConfig.position_offset`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.decoder import TransformerLM
from models.hf_config import CheckpointError
from models.tree import LAYERS, get_path, set_path

# Each entry: (HF tensor name, our path, HF→ours transform, layer). Transforms are their own description:
# "copy" or "T" (transpose). GPT-2's fused c_attn is handled as three entries slicing one tensor. A
# per-layer tensor has `layer = i` and a path under the stacked `LAYERS` subtree: it is row `i` of our leaf.
Entry = tuple[str, tuple[str, ...], Any, "int | None"]


_LAYER_INDEX = re.compile(r"^(?:transformer\.h|model\.decoder\.layers|model\.layers)\.(\d+)\.")


def tensor_map(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of `cfg`'s Hugging Face checkpoint, in file order, as `(HF name, our path, transform,
    layer)` (`Entry`)."""
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
    for hf_name, our_path, transform, layer in tensor_map(cfg):
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
