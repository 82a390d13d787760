"""Flax Transformer language models with a pure functional boundary.

    import models
    model, params = models.from_pretrained("/path/to/hf-checkpoint")   # gpt2/opt/llama/qwen2/qwen3/gemma3
    model, params = models.from_pretrained("/path/to/model.gguf")      # llama.cpp's GGUF, dequantised
    logits = model.apply(params, tokens)                                # [B, T, vocab] float32

    model = models.TransformerLM(models.tiny("llama"))                   # or models.gpt2(...), llama(...)
    params = model.init(jax.random.key(0))

Parameters: `embed`, `pos_embed` (learned positions), `final_norm/*`, `lm_head` (untied), and the blocks
stacked in ONE subtree `layers` (`models.LAYERS`) whose every leaf has a leading `[n_layers]` axis, e.g.
`layers/attn/q/kernel: [L, d_in, d_out]`, `layers/attn_norm/scale: [L, D]`; the decoder is one scan over it.

Where things live: `config` (`ModelConfig` and the family constructors), `decoder` / `layers` / `head`
(the network), `linear` (the one matmul primitive and its perturbation descriptors `LowRankKernel`,
`NoisyLeaf`), `noise` (how a key becomes float32 noise), `generate`, `lora`, `prompt`; checkpoints:
`pretrained` (`from_pretrained`, either format), `hf` (safetensors, `save_pretrained`), `hf_config`
(`config.json` ⇄ `ModelConfig`), `gguf` (llama.cpp's GGUF), `tensor_map` (checkpoint tensor names ⇄ our
parameter paths, shared by both formats); export: `export_gguf` (GGUF writing), `peft` (PEFT adapters ⇄
LoRA factors and soft prompts), `export_tokenizer` (tokenizer files / GGUF tokenizer fields); tokenizers:
`tokenizer`, `gguf_tokenizer`, `gguf_metadata`.
"""

from models.config import ModelConfig, gemma3, gpt2, llama, opt, qwen2, qwen3, tiny
from models.decoder import KVCache, TransformerLM, stack_layers, unstack_layers
from models.generate import Generation, completion_logprobs, generate, sample_logits
from models.gguf import gguf_tokenizer, load_gguf
from models.hf import CheckpointError, config_from_hf, config_to_hf, save_pretrained
from models.linear import LowRankKernel, NoisyLeaf, linear
from models.lora import init_lora, merge_lora
from models.pretrained import from_pretrained
from models.prompt import init_prompt
from models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from models.tree import LAYERS

__all__ = [
    "ModelConfig", "gpt2", "llama", "opt", "qwen2", "qwen3", "gemma3", "tiny", "KVCache", "TransformerLM",
    "LAYERS", "stack_layers", "unstack_layers", "NoisyLeaf",
    "Generation", "generate", "completion_logprobs", "sample_logits", "load_gguf", "gguf_tokenizer",
    "CheckpointError", "config_from_hf", "config_to_hf", "from_pretrained",
    "save_pretrained", "LowRankKernel", "linear", "init_lora", "merge_lora", "init_prompt",
    "ByteTokenizer", "HFTokenizer", "load_tokenizer",
]
