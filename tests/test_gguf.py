"""GGUF import against `transformers`' own GGUF loading, on tiny files written here with `gguf`'s writer.

Each file is written as llama.cpp's converter would write it: llama.cpp tensor names, `llama`'s q/k rows
permuted into interleaved RoPE pairs, Gemma's norms stored as `1 + w`, projections quantised (`gguf`'s
quantiser for F16/BF16/Q8_0/Q4_0/Q4_1; random valid blocks for the K-quants, which it cannot make).
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF import needs the `hf` extra (gguf)")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs `accelerate` (the `hf` extra)")

import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from tests.hf_fixtures import hf_logits, torch, transformers  # noqa: E402

Q = gguf.GGMLQuantizationType
REL_TOL = 1e-4

# llama.cpp's per-layer tensor names (blk.{i}.*) for Hugging Face's (model.layers.{i}.*), written out
# here independently of models/gguf.py.
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GEMMA_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}

ARCHS = {  # arch -> (transformers config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                      rope_theta=1_000_000.0, tie_word_embeddings=False)),
    # 6 layers: llama.cpp's Gemma 3 pattern makes layer 5 the global one.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                                                             num_hidden_layers=6, num_attention_heads=4,
                                                             num_key_value_heads=2, head_dim=32,
                                                             query_pre_attn_scalar=32, sliding_window=4)),
}


# ----------------------------------------------------------------------------- a tiny tokenizer
def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ", t" and "1 2" make the pre-tokenizer patterns visible: GPT-2's splits ",the" before "the" but keeps
# "123" whole; Llama 3's keeps ",the" whole and cuts digits in threes; Qwen 2's cuts single digits.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "r e", "o n", "Ġa n", "e r", "Ġ s", ", t", "1 2"]


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split(" ")) for m in MERGES] + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, types, MERGES


# ----------------------------------------------------------------------------- writing files
def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows [first half, second half] → interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(kind, shape, rng) -> np.ndarray:
    """Random K-quant blocks for a float tensor of `shape` (rows of 256-value super-blocks) with small,
    finite fp16 scales (llama.cpp's block layouts: Q4_K/Q5_K start with d, dmin; Q6_K ends with d)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n_blocks = shape[-1] // block
    data = rng.integers(0, 256, (shape[0], n_blocks, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, (shape[0], n_blocks)) * 2e-3).astype(np.float16).view(np.uint8).reshape(
        shape[0], n_blocks, 2)
    if kind == Q.Q6_K:
        data[..., -2:] = d
    else:
        data[..., 0:2] = d
        data[..., 2:4] = d
    return data.reshape(shape[0], n_blocks * size)


def _encode(w: np.ndarray, kind, rng) -> tuple[np.ndarray, object]:
    if w.ndim != 2 or kind == Q.F32:
        return w.astype(np.float32), None
    if kind == Q.F16:
        return w.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if w.shape[-1] % block:
        return w.astype(np.float32), None  # as llama.cpp, rows that do not fill blocks stay float
    if kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _random_k_blocks(kind, w.shape, rng), kind
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def write_gguf(path, arch: str, kind=Q.F32, seed: int = 0, pre: str = "default", **config_overrides):
    """Write a tiny random `arch` model as llama.cpp would; returns the transformers config used."""
    cfg_cls, model_cls, kw = ARCHS[arch]
    tokens, types, merges = byte_level_vocab()
    config = getattr(transformers, cfg_cls)(vocab_size=len(tokens), max_position_embeddings=64,
                                            **{**kw, **config_overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(config).eval()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "gemma3":
        w.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(config.sliding_window)
    else:
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    names = GEMMA_NAMES if arch == "gemma3" else LAYER_NAMES
    with torch.no_grad():
        for hf_name, p in hf.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            value = (p.float().numpy() * (0.3 if p.ndim > 1 else 0.5) / max(p.float().std().item(), 1e-6)
                     if p.ndim > 1 else rng.normal(1.0, 0.3, p.shape)).astype(np.float32)
            if p.ndim == 1 and "norm" not in hf_name:  # biases
                value = rng.normal(0.0, 0.5, p.shape).astype(np.float32)
            module, suffix = hf_name.rsplit(".", 1)
            if module.startswith("model.layers."):
                i, rest = module[len("model.layers."):].split(".", 1)
                name = f"blk.{i}.{names[rest]}.{suffix}"
                if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
                    value = _permute(value, heads)
            else:
                name = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                        "lm_head": "output"}[module] + f".{suffix}"
            if arch == "gemma3" and name.endswith("norm.weight"):
                value = value + 1.0
            data, raw = _encode(value, kind, rng)
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config


def _transformers_gguf(path, **overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32, **overrides).eval()


def _rel_err(ours, ref, where=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    if where is not None:
        ours, ref = ours[where], ref[where]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- tests
# transformers' GGUF config mapping reads no head_dim for qwen3 and no query_pre_attn_scalar for
# gemma3 (it falls back to 128 / 256): give it what llama.cpp uses.
OVERRIDES = {"qwen3": dict(head_dim=32), "gemma3": dict(query_pre_attn_scalar=32)}


@pytest.mark.parametrize("arch, kind", [("llama", Q.F32), ("llama", Q.Q4_1), ("qwen2", Q.Q8_0),
                                        ("qwen3", Q.Q4_0), ("gemma3", Q.F16)], ids=lambda v: getattr(v, "name", v))
def test_gguf_logits_match_transformers(tmp_path, arch, kind):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, kind)
    model, params = models.from_pretrained(str(path))
    assert model.config.family == arch
    ref_model = _transformers_gguf(path, **OVERRIDES.get(arch, {}))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = model.apply(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = hf_logits(ref_model, ids, mask, positions)
    err = _rel_err(ours, ref, mask.astype(bool))
    assert err < REL_TOL, f"{arch} {kind.name}: relative logit error {err:.2e}"


@pytest.mark.parametrize("kind", [Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda v: v.name)
def test_gguf_quantisation_types_dequantise_as_transformers(tmp_path, kind):
    """Rows of 256 values so that the K-quants' super-blocks fit; one layer."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", kind, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    model, params = models.from_pretrained(str(tmp_path))  # a directory holding one .gguf
    ref_model = _transformers_gguf(path)
    ref_embed = ref_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(params["embed"]), ref_embed, rtol=1e-6, atol=1e-7)
    ids = np.arange(10)[None] % model.config.vocab_size
    err = _rel_err(model.apply(params, jnp.asarray(ids)), hf_logits(ref_model, ids))
    assert err < REL_TOL, f"{kind.name}: relative logit error {err:.2e}"


def test_gguf_loads_in_bfloat16(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "qwen2", Q.F32)
    model32, params32 = models.from_pretrained(str(path))
    model16, params16 = models.from_pretrained(str(path), dtype="bfloat16")
    assert params16["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params16["embed"]), np.asarray(params32["embed"].astype(jnp.bfloat16)))
    ids = jnp.arange(10)[None]
    assert _rel_err(model16.apply(params16, ids), model32.apply(params32, ids)) < 5e-2


def test_unsupported_quantisation_type_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.Q5_0)  # write supported, then relabel one tensor's type in the file
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    raw = bytearray(path.read_bytes())
    # the tensor info's type field (uint32) follows its name, n_dims and dims: find it via the field parts
    type_offset = tensor.field.offset + sum(p.nbytes for p in tensor.field.parts[:-2])
    assert int.from_bytes(raw[type_offset:type_offset + 4], "little") == int(Q.Q5_0)
    raw[type_offset:type_offset + 4] = int(Q.IQ4_NL).to_bytes(4, "little")  # same 32-value blocks, 18 bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(models.CheckpointError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL.*not supported"):
        models.from_pretrained(str(path))


def test_unsupported_architecture_and_ambiguous_directory(tmp_path):
    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(models.CheckpointError, match="architecture='bert' is not supported"):
        models.from_pretrained(str(path))
    (tmp_path / "b.gguf").write_bytes(path.read_bytes())
    with pytest.raises(models.CheckpointError, match="2 .gguf files"):
        models.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer
TEXTS = ["the cat sat on the mat", "  there are\ttabs and   spaces\n", "<|im_start|>user\nhello<|im_end|>",
         "naïve café — 日本 🙂 123 4567", "<think>reason</think>", "it's here, THEY'LL see\n\n\nx", "x,the 123"]


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_gguf_byte_level_tokenizer_matches_transformers(tmp_path, pre):
    """The pre-tokenizer split follows `tokenizer.ggml.pre` (GPT-2's, Llama 3's or Qwen 2's pattern)."""
    from models.gguf import gguf_tokenizer

    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", Q.F32, pre=pre, num_hidden_layers=1)
    tok, config = gguf_tokenizer(str(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>" and config["unk_token"] is None
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"].startswith("{% for m in messages %}")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True).ids
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>").ids == [1]  # a control token stays whole


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """SmolLM's vocabularies ("smollm") split numbers into single digits before BPE."""
    from models.gguf_tokenizer import tokenizer_from_metadata

    tokens, types, merges = byte_level_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges}
    plain, _ = tokenizer_from_metadata(meta)
    smollm, _ = tokenizer_from_metadata({**meta, "tokenizer.ggml.pre": "smollm"})
    assert plain.encode("12").ids == [tokens.index("12")]
    assert smollm.encode("12").ids == [tokens.index("1"), tokens.index("2")]


def _sentencepiece_meta() -> dict:
    pieces = ["▁the", "▁a", "he", "th", "▁t", "in", "▁c", "at", "▁cat", "▁s", "▁sat", "on", "▁on", "er", "▁"]
    letters = sorted(set("".join(pieces)) - {"▁"})
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + letters
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(letters))
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(letters))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path, arch):
    """Llama's SentencePiece vocabulary (space prepended, merges by score) and Gemma's (no prefix,
    whitespace pieces stored as spaces, merges in file order)."""
    from models.gguf import gguf_tokenizer

    meta = _sentencepiece_meta()
    if arch == "gemma3":  # a whitespace piece, stored with real spaces as llama.cpp writes Gemma's
        meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["  "]
        meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1]
        meta["tokenizer.ggml.scores"] = [-x for x in meta["tokenizer.ggml.scores"]] + [0.0]  # not merge order
    path = tmp_path / "sp.gguf"  # the tokenizer's metadata alone is enough for both readers
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, config = gguf_tokenizer(str(path))
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>" and config["unk_token"] == "<unk>"
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the cat sat on the mat", "a theta in the hat", "héllo ✓", " leading space", "that",
                 "the  cat   on"]:
        ids = tok.encode(text, add_special_tokens=True).ids
        assert ids == ref(text)["input_ids"], (text, ids, ref(text)["input_ids"])
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
