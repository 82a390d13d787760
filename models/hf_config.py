"""Hugging Face `config.json` dicts ⇄ our `ModelConfig`, for every supported `model_type`.

`config_from_hf` reads what `transformers` writes (and the older key spellings of hub checkpoints:
`rope_theta`/`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`); `config_to_hf` writes a
dict that `transformers` loads as the same architecture.
"""

from __future__ import annotations

from typing import Any

from models.config import ModelConfig, gemma3, gpt2, llama, opt, qwen2, qwen3

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "opt", "qwen2", "qwen3", "gemma3_text")
_ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ROPE_FAMILIES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3_text": gemma3}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Our `ModelConfig` from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise CheckpointError("config.json model_type='gemma3' (the multimodal Gemma3ForConditionalGeneration) "
                              "is not supported: expected a text-only 'gemma3_text' (Gemma3ForCausalLM) checkpoint")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"config.json model_type={model_type!r} is not supported: expected one "
                              f"of {SUPPORTED_MODEL_TYPES}")
    act_key = {"gpt2": "activation_function", "opt": "activation_function",
               "gemma3_text": "hidden_activation"}.get(model_type, "hidden_act")
    default_act = {"opt": "relu", "gpt2": "gelu_new", "gemma3_text": "gelu_pytorch_tanh"}.get(model_type, "silu")
    act = hf.get(act_key, default_act)
    if act not in _ACT_FROM_HF:
        raise CheckpointError(f"activation {act!r} is not supported: expected one of {tuple(_ACT_FROM_HF)}")
    common = dict(bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
                  pad_token_id=_first(hf.get("pad_token_id")), activation=_ACT_FROM_HF[act],
                  vocab_size=hf["vocab_size"], dtype=dtype, param_dtype=dtype)
    if model_type == "gpt2":
        for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                         ("add_cross_attention", False)):
            if hf.get(flag, ok) != ok:
                raise CheckpointError(f"gpt2 config {flag}={hf[flag]!r} is not supported: expected {ok}")
        return gpt2(d_model=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner"),
                    max_seq_len=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    initializer_range=hf.get("initializer_range", 0.02),
                    tie_embeddings=hf.get("tie_word_embeddings", True), **common)
    if model_type == "opt":
        d = hf["hidden_size"]
        for flag, ok in (("do_layer_norm_before", True), ("word_embed_proj_dim", d), ("enable_bias", True),
                         ("layer_norm_elementwise_affine", True), ("_remove_final_layer_norm", False)):
            if hf.get(flag, ok) != ok:
                raise CheckpointError(f"opt config {flag}={hf[flag]!r} is not supported: expected {ok} "
                                      f"(OPT-350M's post-LN / projected-embedding layout is not implemented)")
        return opt(d_model=d, n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                   d_ff=hf["ffn_dim"], max_seq_len=hf.get("max_position_embeddings", 2048),
                   initializer_range=hf.get("init_std", 0.02), tie_embeddings=hf.get("tie_word_embeddings", True),
                   **common)
    return _rope_family_from_hf(model_type, hf, common)


def _rope_family_from_hf(model_type: str, hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    """Llama, Qwen2, Qwen3 and Gemma 3: the RMSNorm/RoPE/gated-MLP families."""
    if hf.get("pretraining_tp", 1) != 1:
        raise CheckpointError(f"{model_type} config pretraining_tp={hf['pretraining_tp']} is not supported: "
                              "expected 1")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{model_type} config use_bidirectional_attention=True is not supported: "
                              "expected False (a causal LM)")
    n = hf["num_hidden_layers"]
    kw: dict[str, Any] = dict(
        d_model=hf["hidden_size"], n_layers=n, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        initializer_range=hf.get("initializer_range", 0.02), **common)
    head_dim_default = {"qwen3": 128, "gemma3_text": 256}.get(model_type)
    kw["head_dim"] = hf.get("head_dim", head_dim_default)
    params = dict(hf.get("rope_parameters") or {})
    if model_type == "gemma3_text":
        full = dict(params.get("full_attention") or hf.get("rope_scaling") or {})
        local = dict(params.get("sliding_attention") or {})
        kw["rope_theta"], kw["rope_scaling"] = _rope(full, hf.get("rope_theta", 1_000_000.0))
        kw["rope_local_theta"], local_scaling = _rope(local, hf.get("rope_local_base_freq", 10_000.0))
        if local_scaling is not None:
            raise CheckpointError(f"gemma3_text sliding_attention rope {dict(local_scaling)} is not supported: "
                                  "expected rope_type 'default'")
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(n)]
        window = hf.get("sliding_window", 4096)
        kw.update(tie_embeddings=hf.get("tie_word_embeddings", True),
                  attention_bias=hf.get("attention_bias", False),
                  query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                  final_logit_softcap=hf.get("final_logit_softcapping"))
        # `attn_logit_softcapping` is read but never applied by transformers' Gemma 3 (nor llama.cpp's):
        # Gemma 3 replaced Gemma 2's score capping by q/k norm, and released configs set it to null.
    else:
        kw["rope_theta"], kw["rope_scaling"] = _rope(
            params or dict(hf.get("rope_scaling") or {}),
            hf.get("rope_theta", 10000.0 if model_type == "llama" else 1_000_000.0))
        kw["tie_embeddings"] = hf.get("tie_word_embeddings", False)
        if model_type == "llama":
            kw.update(attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False))
        if model_type == "qwen3":
            kw.update(attention_bias=hf.get("attention_bias", False))
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first_sliding = hf.get("max_window_layers", n)
        types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= first_sliding
                                          else "full_attention" for i in range(n)]
    types = tuple(types)
    if "sliding_attention" in types:
        kw.update(layer_types=types, sliding_window=window)
    try:
        return _ROPE_FAMILIES[model_type](**kw)
    except ValueError as e:
        raise CheckpointError(f"{model_type} config.json: {e}") from e


def _rope(spec: dict[str, Any], default_theta: float) -> tuple[float, tuple | None]:
    """`(rope_theta, rope_scaling)` from a `rope_parameters` / `rope_scaling` dict."""
    spec = dict(spec)
    theta = spec.pop("rope_theta", default_theta)
    kind = spec.pop("rope_type", spec.pop("type", None))
    kind = None if kind == "default" else kind
    return theta, None if kind is None else (("rope_type", kind),) + tuple(sorted(spec.items()))


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
    _check_exportable(cfg)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope_scaling_dict}
    types = list(cfg.layer_types or ["full_attention"] * cfg.n_layers)
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
               intermediate_size=cfg.ff_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
               torch_dtype=dtype, **special)
    if cfg.family == "gemma3":
        act = "gelu_pytorch_tanh" if cfg.activation == "gelu_new" else cfg.activation
        local = {"rope_theta": cfg.rope_local_theta or cfg.rope_theta, "rope_type": "default"}
        return dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_activation=act,
                    rope_parameters={"full_attention": rope, "sliding_attention": local},
                    attention_bias=cfg.attention_bias, layer_types=types,
                    sliding_window=cfg.sliding_window or cfg.max_seq_len,
                    query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head,
                    final_logit_softcapping=cfg.final_logit_softcap,
                    use_bidirectional_attention=False, **out)
    out.update(hidden_act=cfg.activation, rope_theta=cfg.rope_theta, rope_parameters=rope,
               rope_scaling=None if cfg.rope_type is None else rope)
    if cfg.family in ("qwen2", "qwen3"):
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
        extra = {} if cfg.family == "qwen2" else dict(attention_bias=cfg.attention_bias)
        if cfg.family == "qwen2" and cfg.head_dim is None:  # Qwen2 configs derive it from the sizes
            del out["head_dim"]
        return dict(model_type=cfg.family, architectures=[arch], use_sliding_window=bool(sliding),
                    sliding_window=cfg.sliding_window, max_window_layers=sliding[0] if sliding else cfg.n_layers,
                    layer_types=types, **extra, **out)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=cfg.attention_bias,
                mlp_bias=cfg.mlp_bias, pretraining_tp=1, **out)


# What each exported family fixes (transformers has no switch for these), so that a config that
# departs from them is refused instead of silently written as a different model.
_FIXED = {
    "llama": dict(qk_norm=False, post_norms=False, norm_plus_one=False, scale_embeddings=False,
                  layer_types=None, attn_logit_softcap=None, final_logit_softcap=None, query_pre_attn_scalar=None),
    "qwen2": dict(attention_bias=True, out_bias=False, mlp_bias=False, qk_norm=False, post_norms=False,
                  norm_plus_one=False, scale_embeddings=False, attn_logit_softcap=None,
                  final_logit_softcap=None, query_pre_attn_scalar=None, rope_local_theta=None),
    "qwen3": dict(mlp_bias=False, qk_norm=True, post_norms=False, norm_plus_one=False, scale_embeddings=False,
                  attn_logit_softcap=None, final_logit_softcap=None, query_pre_attn_scalar=None,
                  rope_local_theta=None),
    "gemma3": dict(mlp_bias=False, qk_norm=True, post_norms=True, norm_plus_one=True, scale_embeddings=True,
                   attn_logit_softcap=None),
}


def _check_exportable(cfg: ModelConfig) -> None:
    fixed = dict(_FIXED[cfg.family])
    if cfg.family != "qwen2":  # one attention_bias switch for q, k, v and o
        fixed["out_bias"] = cfg.attention_bias
    if cfg.family in ("qwen2", "qwen3"):
        sliding = [i for i in range(cfg.n_layers) if cfg.is_sliding(i)]
        if sliding and sliding != list(range(sliding[0], cfg.n_layers)):
            raise ValueError(f"{cfg.family} layer_types={cfg.layer_types} cannot be written as a Hugging Face "
                             "config: expected the sliding layers to be the last ones (max_window_layers)")
    for name, want in fixed.items():
        got = getattr(cfg, name)
        if got != want:
            raise ValueError(f"ModelConfig.{name}={got!r} cannot be written as a Hugging Face "
                             f"{cfg.family} config: expected {want!r}")


def _first(value):
    return value[0] if isinstance(value, list) and value else value
