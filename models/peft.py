"""PEFT adapter directories ⇄ our LoRA factors and soft prompts (no `peft` import: the files only).

    write_lora_adapter(out, cfg, lora, alpha=16, base="/ckpt/base")   # adapter_config.json + adapter_model.safetensors
    lora, rank, alpha = read_lora_adapter(out, cfg, params)           # back, checked against the model
    write_prompt_adapter(out, cfg, prompt, base="/ckpt/base")         # PEFT prompt tuning

Key names are PEFT's: `base_model.model.<HF module>.lora_A.weight` `[r, d_in]` and `...lora_B.weight`
`[d_out, r]`, one pair per layer, with `ΔW = (lora_alpha / r) · B A` in HF's `[out, in]` layout. Ours
(`models.lora`) are `a: [L, d_in, r]`, `b: [L, d_out, r]` with `ΔW = (α/r) a bᵀ` in `[in, out]`, so
`lora_A = aᵀ` and `lora_B = b` per layer. The HF module of each of our kernels comes from the tensor
table of `models.tensor_map`, so every family that table knows is covered. GPT-2's q/k/v are one fused
`c_attn` module in Hugging Face: their factors are written as one block-structured LoRA of it, of rank
`m·r` for `m` targeted projections (`_fused_qkv`); such an adapter is not read back (it need not split).
A prompt-tuning adapter holds `prompt_embeddings` `[n_tokens, d_model]`, prepended to the input
embeddings as `model.apply(..., prompt=P)` does.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from models.config import ModelConfig
from models.hf_config import CheckpointError
from models.jsonfile import read_json_object
from models.lora import lora_leaves
from models.tensor_map import tensor_map
from models.tree import LAYERS, get_path, set_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def lora_modules(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our LoRA-able kernel path (e.g. `("layers", "attn", "q", "kernel")`, `("lm_head",)`) → `(HF module
    name with `{i}` for the layer, e.g. "model.layers.{i}.self_attn.q_proj", whether HF stores it `[in, out]`
    (GPT-2's Conv1D: PEFT's `fan_in_fan_out`))`. GPT-2's fused q/k/v are left out (see `_fused_qkv`)."""
    out = {}
    for hf_name, path, transform, layer in tensor_map(cfg):
        if not hf_name.endswith(".weight") or not (path[-1] == "kernel" or path == ("lm_head",)):
            continue
        if transform not in ("T", "copy") or (layer is not None and layer != 0):
            continue  # a fused piece, or a later layer of a module already named
        module = hf_name[:-len(".weight")]
        if layer is not None:
            module = module.replace(f".{layer}.", ".{i}.", 1)
        out[path] = (module, transform == "copy")
    return out


def _module_of(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[str, bool]:
    table = lora_modules(cfg)
    if path not in table:
        raise CheckpointError(f"a LoRA on {'/'.join(path)} has no Hugging Face module to name in a PEFT adapter")
    return table[path]


def _fused_qkv(lora: dict, cfg: ModelConfig, dtype) -> tuple[dict[str, np.ndarray], int]:
    """GPT-2's q/k/v LoRA factors as one LoRA of its fused `c_attn` (Conv1D, `[D, 3D]`), per layer: with
    `m` of q, k, v targeted, rank `m·r`, `lora_A = [a_tᵀ ...]` `[m r, D]` and `lora_B` `[3D, m r]` block
    sparse (`b_t` in projection t's rows, its own columns), so `B A` holds each `b_t a_tᵀ` in its block.
    Returns `(tensors, m)`; the caller scales alpha by `m` to keep `alpha / r`."""
    attn = lora.get(LAYERS, {}).get("attn", {})
    parts = [(j, attn[t]["kernel"]) for j, t in enumerate("qkv") if t in attn]
    tensors: dict[str, np.ndarray] = {}
    if not parts:
        return tensors, 0
    D, r = cfg.d_model, parts[0][1]["a"].shape[-1]
    for i in range(cfg.n_layers):
        a = np.concatenate([np.asarray(leaf["a"][i]).T for _, leaf in parts], 0)
        b = np.zeros((3 * D, len(parts) * r), np.float32)
        for k, (j, leaf) in enumerate(parts):
            b[j * D:(j + 1) * D, k * r:(k + 1) * r] = np.asarray(leaf["b"][i])
        name = f"{_PREFIX}transformer.h.{i}.attn.c_attn"
        tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = a.astype(dtype), b.astype(dtype)
    return tensors, len(parts)


def _write(out: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def write_lora_adapter(out: str, cfg: ModelConfig, lora: dict, alpha: float, base: str | None,
                       dtype=np.float32) -> None:
    """Write our LoRA factors (`models.lora` layout) as a PEFT LoRA adapter directory `out`, tensors in
    `dtype`; `base` is the base checkpoint recorded as `base_model_name_or_path`."""
    import jax

    lora = jax.device_get(lora)
    tensors, targets, conv1d, rank = {}, [], False, None
    fused, m = _fused_qkv(lora, cfg, dtype) if cfg.family == "gpt2" else ({}, 0)
    for path, leaf in lora_leaves(lora):
        if fused and path[:2] == (LAYERS, "attn") and path[2] in "qkv":
            rank = leaf["a"].shape[-1]
            continue
        module, in_out = _module_of(cfg, path)
        a, b = np.asarray(leaf["a"]).astype(dtype), np.asarray(leaf["b"]).astype(dtype)
        rank, conv1d = a.shape[-1], conv1d or in_out
        targets.append(module.split("{i}.")[-1])
        layers = range(a.shape[0]) if path[0] == LAYERS else [None]
        for i in layers:
            name = _PREFIX + (module.format(i=i) if i is not None else module)
            tensors[name + ".lora_A.weight"] = (a[i] if i is not None else a).T
            tensors[name + ".lora_B.weight"] = b[i] if i is not None else b
    r, lora_alpha, rank_pattern, alpha_pattern = int(rank), float(alpha), {}, {}
    if fused:  # c_attn at rank m·r and alpha m·α: the same α/r; per-module patterns when other modules remain
        tensors.update(fused)
        conv1d = True
        if targets:
            rank_pattern, alpha_pattern = {"attn.c_attn": m * r}, {"attn.c_attn": m * lora_alpha}
        else:
            r, lora_alpha = m * r, m * lora_alpha
        targets.append("attn.c_attn")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
              "lora_alpha": lora_alpha, "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "revision": None}
    _write(out, config, tensors)


def write_prompt_adapter(out: str, cfg: ModelConfig, prompt, base: str | None, dtype=np.float32) -> None:
    """Write a soft prompt `[n_tokens, d_model]` as a PEFT prompt-tuning adapter directory `out`."""
    prompt = np.asarray(prompt).astype(dtype)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
              "num_transformer_submodules": 1, "num_attention_heads": cfg.n_heads, "num_layers": cfg.n_layers,
              "prompt_tuning_init": "RANDOM", "inference_mode": True, "revision": None}
    _write(out, config, {"prompt_embeddings": prompt})


def read_lora_adapter(path: str, cfg: ModelConfig, params: dict) -> tuple[dict, int, float]:
    """`(lora, rank, alpha)` of the PEFT LoRA adapter directory `path` for the model `cfg` with `params`:
    factors in our layout (float32), every layer's pair present, every shape that of this model's kernels.

    Raises:
      CheckpointError: no adapter files, not a plain LoRA (DoRA, rsLoRA, per-module ranks), a module this
        model has no kernel for, a missing layer, or a tensor whose shape does not fit (naming it).
    """
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    config_file, weights = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for file in (config_file, weights):
        if not os.path.isfile(file):
            raise CheckpointError(f"model.adapter={path!r}: no {os.path.basename(file)}: expected a PEFT LoRA "
                                  f"adapter directory")
    config = read_json_object(config_file, CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"model.adapter={path!r} has peft_type={config.get('peft_type')!r}: expected 'LORA'")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {})):
        if (config.get(key) or plain) != plain:
            raise CheckpointError(f"model.adapter={path!r} sets {key}={config[key]!r}: expected a plain LoRA "
                                  f"({key}={plain!r})")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    try:
        tensors = load_file(weights)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad file
        raise CheckpointError(f"{weights} is not a readable safetensors file ({type(e).__name__})") from None
    by_module = {}
    for our_path, (module, _) in lora_modules(cfg).items():
        if our_path[0] == LAYERS:
            by_module.update({module.format(i=i): (our_path, i) for i in range(cfg.n_layers)})
        else:
            by_module[module] = (our_path, None)
    lora: dict = {}
    seen: dict[tuple[str, ...], set] = {}
    for name in sorted(tensors):
        m = _LORA_KEY.match(name)
        if m is None:
            raise CheckpointError(f"{weights}: tensor {name!r} is not a LoRA factor (expected "
                                  f"'{_PREFIX}<module>.lora_A.weight' / 'lora_B.weight')")
        module, which = m.groups()
        if module not in by_module and cfg.family == "gpt2" and module.endswith("attn.c_attn"):
            raise CheckpointError(f"{weights}: tensor {name!r} is a LoRA of GPT-2's fused c_attn, which does not split "
                                  f"into gfo's per-projection q/k/v factors: start from an adapter on o, fc, proj")
        if module not in by_module:
            raise CheckpointError(f"{weights}: tensor {name!r} names module {module!r}, which this "
                                  f"{cfg.family} model ({cfg.n_layers} layers) does not have: the adapter is for "
                                  f"another base model")
        our_path, layer = by_module[module]
        w_shape = get_path(params, our_path).shape
        d_in, d_out = w_shape[-2], w_shape[-1]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        if tensors[name].shape != want:
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {tuple(tensors[name].shape)}; this model's "
                                  f"{'/'.join(our_path)} (r={rank}) expects {want}: the adapter is for another base "
                                  f"model")
        lead = (cfg.n_layers,) if layer is not None else ()
        try:
            leaf = get_path(lora, our_path)
        except KeyError:
            leaf = {"a": np.zeros(lead + (d_in, rank), np.float32), "b": np.zeros(lead + (d_out, rank), np.float32)}
            set_path(lora, our_path, leaf)
        key = "a" if which == "A" else "b"
        value = tensors[name].astype(np.float32)
        value = value.T if which == "A" else value
        if layer is None:
            leaf[key] = value
        else:
            leaf[key][layer] = value
        seen.setdefault(our_path, set()).add((which, layer))
    if not seen:
        raise CheckpointError(f"{weights} holds no LoRA factor")
    for our_path, got in seen.items():
        layers = range(cfg.n_layers) if our_path[0] == LAYERS else [None]
        missing = [(w, i) for i in layers for w in "AB" if (w, i) not in got]
        if missing:
            w, i = missing[0]
            module = lora_modules(cfg)[our_path][0].format(i=i)
            raise CheckpointError(f"{weights}: tensor '{_PREFIX}{module}.lora_{w}.weight' is missing (a LoRA "
                                  f"in gfo covers every layer of its targets)")
    return jax.tree.map(jnp.asarray, lora), rank, alpha


def lora_targets(lora: dict) -> tuple[str, ...]:
    """Our projection names (`models.lora.PROJECTIONS`) of a LoRA tree's kernels, e.g. ("q", "v")."""
    return tuple(sorted({p[-1] if p[-1] == "lm_head" else p[-2] for p, _ in lora_leaves(lora)}))
