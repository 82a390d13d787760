"""Tiny random Hugging Face checkpoints written by `transformers` itself (PyTorch, CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the parity tests need the `hf` extra (torch CPU)")
transformers = pytest.importorskip("transformers", reason="the parity tests need the `hf` extra (transformers)")

# Non-default sizes everywhere; llama variants cover grouped-query attention, explicit head_dim,
# biases, tied embeddings and llama3 / linear RoPE scaling.
HF_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=101, n_embd=48, n_layer=3, n_head=4, n_inner=80,
                 n_positions=40, layer_norm_epsilon=1e-5),
    "gpt2-untied-relu": dict(model_type="gpt2", vocab_size=67, n_embd=32, n_layer=2, n_head=2, n_inner=None,
                             n_positions=32, activation_function="relu", tie_word_embeddings=False),
    "llama-gqa": dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=72,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0),
    "llama-headdim-bias-tied": dict(model_type="llama", vocab_size=89, hidden_size=40, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                    head_dim=12, attention_bias=True, mlp_bias=True,
                                    tie_word_embeddings=True, max_position_embeddings=64),
    "llama3-rope": dict(model_type="llama", vocab_size=83, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=128,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8)),
    "opt": dict(model_type="opt", vocab_size=79, hidden_size=32, word_embed_proj_dim=32, ffn_dim=56,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48, do_layer_norm_before=True),
    "llama-linear-rope": dict(model_type="llama", vocab_size=83, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                              rope_scaling=dict(rope_type="linear", factor=3.0)),
    # Qwen2/2.5: q/k/v biases (o none), tied (0.5B-style) and untied heads.
    "qwen2-tied": dict(model_type="qwen2", vocab_size=91, hidden_size=48, intermediate_size=80,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=64, rope_theta=1_000_000.0, tie_word_embeddings=True),
    "qwen2-untied": dict(model_type="qwen2", vocab_size=73, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False),
    # Qwen2 with its (rarely used) sliding window on the layers from max_window_layers on.
    "qwen2-sliding": dict(model_type="qwen2", vocab_size=71, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, use_sliding_window=True, sliding_window=5,
                          max_window_layers=1),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim larger than hidden/heads.
    "qwen3": dict(model_type="qwen3", vocab_size=87, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, tie_word_embeddings=False),
    # Gemma 3 text: sliding (window 4, base 1e4) and global (base 1e6, linear-scaled) layers,
    # query_pre_attn_scalar != head_dim, final soft-cap, (1 + w) norms; attn_logit_softcapping is set
    # to check that we ignore it as transformers' Gemma 3 does.
    "gemma3": dict(model_type="gemma3_text", vocab_size=93, hidden_size=32, intermediate_size=56,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                   max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=20,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 1_000_000.0}},
                   attn_logit_softcapping=3.0, final_logit_softcapping=5.0, pad_token_id=0),
}


def build_hf_model(name: str, seed: int = 0):
    """A `transformers` causal LM of config `name` with O(1)-sized random weights (not HF's 0.02 init,
    under which every logit would be near zero and a parity test would prove little)."""
    spec = dict(bos_token_id=0, eos_token_id=1, **HF_CONFIGS[name])
    model_type = spec.pop("model_type")
    config_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
                  "opt": transformers.OPTConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config, "gemma3_text": transformers.Gemma3TextConfig}[model_type]
    model_cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
                 "opt": transformers.OPTForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM, "gemma3_text": transformers.Gemma3ForCausalLM}[model_type]
    torch.manual_seed(seed)
    config = config_cls(**spec)
    config._attn_implementation = "eager"  # the reference semantics (soft-capping, sliding windows)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
    return model


def hf_logits(model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
                    position_ids=None if position_ids is None else torch.as_tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()
