"""`gfo export` (Hugging Face, PEFT, GGUF) and `model.adapter`, on a tiny Llama checkpoint written here.

Numerical statements: each exported artifact, loaded by `transformers` / `peft` / `gguf` / gfo's own GGUF
import, gives gfo's logits at the same checkpoint within 1e-4 relative (float32); a run started from an
exported adapter starts at the exported point; every bad input is one line (exit 2).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("peft", reason="the export tests need the `hf` extra (peft)")
gguf = pytest.importorskip("gguf", reason="the export tests need the `hf` extra (gguf)")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs `accelerate` (the `hf` extra)")

import models  # noqa: E402
from gfo.run import cli  # noqa: E402
from gfo.run.config import ConfigError, from_dict, RunConfig  # noqa: E402
from gfo.run.export import export_run, restore_point  # noqa: E402
from tests.hf_fixtures import hf_logits, torch, transformers  # noqa: E402
from tests.test_gguf import MERGES, SPECIALS, byte_level_vocab  # noqa: E402
from tests.test_train import _cli_error  # noqa: E402

REL_TOL = 1e-4
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def write_checkpoint(path, d_model: int = 32, seed: int = 0) -> None:
    """A tiny random Llama (2 layers, grouped-query attention) with a byte-level BPE tokenizer, as a
    Hugging Face directory (`models.save_pretrained` + `tokenizers`' own files)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    tokens, _, merges = byte_level_vocab()
    cfg = models.tiny("llama", d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      vocab_size=len(tokens), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = models.TransformerLM(cfg)
    params = jax.tree.map(lambda v: v * 4.0 if v.ndim > 1 else v, model.init(jax.random.key(seed)))
    models.save_pretrained(model, params, str(path))
    tok = Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[1], "eos_token": SPECIALS[2],
        "pad_token": SPECIALS[0], "chat_template": TEMPLATE}))


def _config(tmp_path, name, ckpt, **sections) -> RunConfig:
    base = {"name": name, "runs_dir": str(tmp_path / "runs"), "steps": 4, "eval_every": 2, "log_every": 2,
            "checkpoint_every": 2, "model": {"path": str(ckpt)},
            "task": {"name": "grammar_lm", "batch_size": 4, "eval_size": 4, "options": {"seq_len": 12}},
            "space": {"kind": "lora", "rank": 2, "alpha": 8.0, "targets": ["q", "v", "down"]},
            "optimizer": {"method": "spsa", "transform": "sgd", "lr": 0.5, "eps": 1e-2, "n": 2},
            "eval": {"select_by": "dev_cross_entropy", "dev_size": 4}}
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(base.get(key), dict) and not (key == "optimizer" and "method" in value)
        base[key] = {**base[key], **value} if merge else value
    return from_dict(RunConfig, base)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 4-step MeZO-LoRA run on the tiny checkpoint (checkpoints at 2 and 4, a dev-selected best)."""
    from gfo.run.train import train

    tmp = tmp_path_factory.mktemp("export")
    write_checkpoint(tmp / "base")
    result = train(_config(tmp, "lora", tmp / "base"))
    return tmp, result["run_dir"]


IDS = np.random.default_rng(0).integers(0, 270, size=(2, 10))


def _gfo_logits(run_dir, which="latest"):
    """gfo's logits of `IDS` at the run's checkpoint `which`, and the point itself."""
    cfg, run, x, step = restore_point(run_dir, which)
    return np.asarray(run.model.apply(run.space.to_params(x), jnp.asarray(IDS))), x, run


@pytest.mark.slow
def test_hf_export_of_a_lora_run_loads_in_transformers_with_the_same_logits(lora_run):
    tmp, run_dir = lora_run
    ours, _, run = _gfo_logits(run_dir)
    out = tmp / "hf"
    export_run(run_dir, str(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    err = _rel_err(ours, hf_logits(ref, IDS))
    assert err < REL_TOL, f"hf export: relative logit error {err:.2e}"
    base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")).eval(), IDS)
    assert _rel_err(base, ours) > 1e-3  # the LoRA changed the model: the export holds the trained point
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the cat, the 12 <think>"
    assert tok(text)["input_ids"] == run.tokenizer.encode(text) and tok.chat_template == TEMPLATE


@pytest.mark.slow
def test_peft_lora_export_loads_in_peft_and_starts_a_run_at_the_exported_point(lora_run):
    from peft import PeftModel

    from gfo.run.build import build_runs

    tmp, run_dir = lora_run
    ours, x, run = _gfo_logits(run_dir, "best")
    out = tmp / "peft"
    export_run(run_dir, str(out), format="peft", checkpoint="best")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == str(tmp / "base")
    assert config["target_modules"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")).eval()
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    err = _rel_err(ours, hf_logits(adapted, IDS))
    assert err < REL_TOL, f"peft export: relative logit error {err:.2e}"

    # a new run from the adapter starts where the exported one was: the same point, the same loss
    cfg = _config(tmp, "from_adapter", tmp / "base", model={"adapter": str(out)})
    _, fresh = build_runs(cfg, str(tmp / "runs" / "from_adapter"), run.mesh)
    for a, b in zip(jax.tree.leaves(fresh.x0), jax.tree.leaves(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    batch, key = run.task.train_batch(0), jax.random.key(0)
    assert float(fresh.objective(fresh.x0, batch, key)) == pytest.approx(float(run.objective(x, batch, key)), rel=1e-6)


@pytest.mark.slow
def test_gguf_export_reads_back_in_gfo_transformers_and_gguf(lora_run):
    from models.gguf import gguf_tokenizer

    from gfo.run.export import merged_params

    tmp, run_dir = lora_run
    ours, x, run = _gfo_logits(run_dir)
    out = tmp / "lora.gguf"
    export_run(run_dir, str(out), format="gguf")
    model, params = models.load_gguf(str(out))
    assert _rel_err(ours, model.apply(params, jnp.asarray(IDS))) < 1e-5  # F32: merged vs factored LoRA only
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=out.name, dtype=torch.float32).eval()
    err = _rel_err(ours, hf_logits(ref, IDS))
    assert err < REL_TOL, f"gguf export in transformers: relative logit error {err:.2e}"
    reader = gguf.GGUFReader(str(out))
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"}
    assert reader.fields["general.architecture"].contents() == "llama"
    tok, config = gguf_tokenizer(str(out))
    text = "the cat, the 12 <think><|im_end|>"
    assert tok.encode(text).ids == run.tokenizer.encode(text) and config["chat_template"] == TEMPLATE

    half = tmp / "lora-bf16.gguf"
    export_run(run_dir, str(half), format="gguf", dtype="bfloat16")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(half)).tensors}
    assert kinds["blk.0.attn_q.weight"] == "BF16" and kinds["output_norm.weight"] == "F32"
    model16, params16 = models.load_gguf(str(half))
    rounded = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32),
                           merged_params(run.space, x, "float32"))  # what BF16 storage keeps of each weight
    assert _rel_err(model.apply(rounded, jnp.asarray(IDS)), model16.apply(params16, jnp.asarray(IDS))) < 1e-5


@pytest.mark.slow
def test_prompt_run_exports_a_peft_prompt_tuning_adapter(lora_run, capsys):
    from peft import PeftModel

    from gfo.run.train import train

    tmp, _ = lora_run
    run_dir = train(_config(tmp, "prompt", tmp / "base", space={"kind": "prompt", "n_tokens": 3},
                            steps=2))["run_dir"]
    cfg, run, x, step = restore_point(run_dir, "best")
    ours = np.asarray(run.model.apply(run.space.to_params(x), jnp.asarray(IDS)))  # [B, T, V]: the real tokens
    out = tmp / "prompt-peft"
    export_run(run_dir, str(out), format="peft", checkpoint="best")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")).eval()
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ref = adapted(input_ids=torch.as_tensor(IDS)).logits.float().numpy()[:, 3:]
    err = _rel_err(ours, ref)
    assert err < REL_TOL, f"peft prompt export: relative logit error {err:.2e}"
    line = _cli_error(capsys, ["export", run_dir, str(tmp / "prompt-hf")])
    assert "soft prompt" in line and "--format peft" in line


@pytest.mark.slow
def test_run_errors_are_one_line_and_an_interrupted_export_leaves_nothing(lora_run, capsys, monkeypatch):
    from gfo.run import export

    tmp, run_dir = lora_run
    line = _cli_error(capsys, ["export", run_dir, str(tmp / "o"), "--checkpoint", "3"])
    assert "no checkpoint at step 3" in line and "[2, 4]" in line
    empty = tmp / "empty_run"
    os.makedirs(empty)
    (empty / "config.yaml").write_text((open(os.path.join(run_dir, "config.yaml")).read()))
    assert "no checkpoint directory" in _cli_error(capsys, ["export", str(empty), str(tmp / "o")])

    export_run(run_dir, str(tmp / "forced"), format="peft")
    export_run(run_dir, str(tmp / "forced"), format="peft", checkpoint="2", force=True)  # replaced whole
    assert sorted(os.listdir(tmp / "forced")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp) if f.startswith(".forced")]

    def failing(format, cfg, run, space, x, tmp, dtype):  # dies half-way through writing
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write", failing)
    with pytest.raises(OSError, match="disk full"):
        export_run(run_dir, str(tmp / "cut"))
    assert not [f for f in os.listdir(tmp) if "cut" in f]  # neither OUT nor its temporary sibling


@pytest.mark.slow
def test_adapter_for_another_model_or_space_is_refused_naming_the_tensor(lora_run, tmp_path):
    from gfo.run.build import build_mesh, build_runs

    tmp, run_dir = lora_run
    adapter = tmp_path / "adapter"
    export_run(run_dir, str(adapter), format="peft")
    write_checkpoint(tmp_path / "wide", d_model=48)
    cfg = _config(tmp_path, "wide", tmp_path / "wide", model={"adapter": str(adapter)})
    with pytest.raises(ConfigError, match=r"tensor 'base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_B\.weight' "
                                          r"has shape \(32, 2\); .* expects \(48, 2\): the adapter is for another base"):
        build_runs(cfg, str(tmp_path / "runs" / "wide"), build_mesh(cfg))
    cfg = _config(tmp_path, "r4", tmp / "base", model={"adapter": str(adapter)}, space={"rank": 4})
    with pytest.raises(ConfigError, match=r"has rank 2 but space\.rank=4: set space\.rank=2"):
        build_runs(cfg, str(tmp_path / "runs" / "r4"), build_mesh(cfg))
    cfg = _config(tmp_path, "full", tmp / "base", model={"adapter": str(adapter)}, space={"kind": "full"})
    with pytest.raises(ConfigError, match=r"space\.kind='full'"):
        build_runs(cfg, str(tmp_path / "runs" / "full"), build_mesh(cfg))


def _fake_run(tmp_path, name, **sections) -> str:
    """A run directory holding only its config.yaml (what the argument checks read)."""
    import yaml

    from gfo.run.config import to_dict

    run_dir = tmp_path / name
    os.makedirs(run_dir)
    base = {"name": name, "model": {"path": str(tmp_path / "base")}, "space": {"kind": "lora"}}
    base.update(sections)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(from_dict(RunConfig, base))))
    return str(run_dir)


def test_export_argument_errors_are_one_line_naming_the_value(tmp_path, capsys):
    run = _fake_run(tmp_path, "lora")
    out = str(tmp_path / "o")
    assert "run directory" in _cli_error(capsys, ["export", str(tmp_path / "nothing"), out])
    assert "no config.yaml" in _cli_error(capsys, ["export", str(tmp_path), out])
    line = _cli_error(capsys, ["export", run, out, "--checkpoint", "newest"])
    assert "--checkpoint 'newest' is unknown" in line and "latest, best or a step" in line
    assert "--format 'onnx' is unknown" in _cli_error(capsys, ["export", run, out, "--format", "onnx"])
    assert "--dtype 'int8' is unknown" in _cli_error(capsys, ["export", run, out, "--dtype", "int8"])
    os.makedirs(tmp_path / "taken")
    line = _cli_error(capsys, ["export", run, str(tmp_path / "taken")])
    assert "exists" in line and "--force" in line
    line = _cli_error(capsys, ["export", _fake_run(tmp_path, "prompt", space={"kind": "prompt"}), out])
    assert "a soft prompt (space.kind=prompt) is not model weights" in line and "--format peft" in line
    line = _cli_error(capsys, ["export", _fake_run(tmp_path, "full", space={"kind": "full"}), out, "--format", "peft"])
    assert "space.kind='full'" in line and "--format hf or gguf" in line
    line = _cli_error(capsys, ["export", _fake_run(tmp_path, "tiny", model={"family": "llama"}), out, "--format", "peft"])
    assert "random tiny model" in line
    assert not os.path.exists(out)


@pytest.mark.slow
def test_peft_lora_adapter_round_trip_and_logits_in_peft(tmp_path):
    """`models.peft` alone: our LoRA factors → adapter files → PEFT's model and back, and a shape mismatch."""
    from peft import PeftModel

    from models.peft import read_lora_adapter, write_lora_adapter

    write_checkpoint(tmp_path / "base")
    model, params = models.from_pretrained(str(tmp_path / "base"))
    lora = models.init_lora(jax.random.key(1), params, rank=3, targets=("k", "o", "up"))
    lora = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape) * 0.3, lora)  # b != 0
    write_lora_adapter(str(tmp_path / "adapter"), model.config, lora, alpha=5.0, base=str(tmp_path / "base"))
    ours = model.apply(models.merge_lora(params, lora, alpha=5.0), jnp.asarray(IDS))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    err = _rel_err(ours, hf_logits(adapted, IDS))
    assert err < REL_TOL, f"peft adapter: relative logit error {err:.2e}"
    back, rank, alpha = read_lora_adapter(str(tmp_path / "adapter"), model.config, params)
    assert (rank, alpha) == (3, 5.0)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wide = models.TransformerLM(model.config.replace(d_model=48))
    with pytest.raises(models.CheckpointError, match=r"tensor 'base_model\.model\.model\.layers\.0\.mlp\.up_proj\."
                                                     r"lora_A\.weight' has shape \(3, 32\).*expects \(3, 48\)"):
        read_lora_adapter(str(tmp_path / "adapter"), wide.config, wide.init(jax.random.key(0)))


SLIDING = ("sliding_attention",) * 5 + ("full_attention",)  # llama.cpp's Gemma 3 pattern (6 layers)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gguf_export_of_each_family_reads_back_exactly(family, tmp_path):
    from models.export_gguf import save_gguf

    extra = dict(n_layers=6, layer_types=SLIDING) if family == "gemma3" else dict(n_layers=2)
    if family == "llama":
        extra["attention_bias"] = True  # q/k biases are permuted like their rows
    cfg = models.tiny(family, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64, **extra)
    model = models.TransformerLM(cfg)
    params = model.init(jax.random.key(0))
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)  # biases != 0
    save_gguf(model, params, str(tmp_path / "m.gguf"))
    back, back_params = models.load_gguf(str(tmp_path / "m.gguf"))
    ids = jnp.arange(12)[None] % cfg.vocab_size
    np.testing.assert_array_equal(np.asarray(back.apply(back_params, ids)), np.asarray(model.apply(params, ids)))
    if family == "gemma3":  # a layer pattern llama.cpp's Gemma 3 does not have is refused, naming the field
        alternating = models.TransformerLM(cfg.replace(layer_types=SLIDING[1:] + SLIDING[:1]))
        with pytest.raises(models.CheckpointError, match=r"ModelConfig\.layer_types=.* would read it back as"):
            save_gguf(alternating, params, str(tmp_path / "bad.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("targets", [("q", "v"), ("k", "v", "o", "proj")])
def test_gpt2_qkv_lora_is_a_peft_lora_of_the_fused_c_attn(targets, tmp_path):
    """GPT-2's q/k/v are one Conv1D `c_attn` in Hugging Face: their LoRA is written as one of rank m·r."""
    from peft import PeftModel

    from models.peft import read_lora_adapter, write_lora_adapter

    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    params = jax.tree.map(lambda v: v * 3.0, model.init(jax.random.key(0)))
    models.save_pretrained(model, params, str(tmp_path / "base"))
    lora = models.init_lora(jax.random.key(1), params, rank=2, targets=targets)
    lora = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape) * 0.3, lora)
    write_lora_adapter(str(tmp_path / "adapter"), model.config, lora, alpha=6.0, base=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "attn.c_attn" in config["target_modules"] and config["fan_in_fan_out"] is True
    ids = IDS % model.config.vocab_size
    ours = model.apply(models.merge_lora(params, lora, alpha=6.0), jnp.asarray(ids))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    err = _rel_err(ours, hf_logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval(), ids))
    assert err < REL_TOL, f"gpt2 c_attn adapter: relative logit error {err:.2e}"
    with pytest.raises(models.CheckpointError, match="c_attn|rank_pattern"):
        read_lora_adapter(str(tmp_path / "adapter"), model.config, params)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_export_runs_in_llama_cpp_with_gfo_logits(dtype, tmp_path):
    """llama.cpp itself (the `llama-cpp-python` bindings, an optional source build: skipped where absent)
    reads gfo's GGUF export, tokenizer included, and computes gfo's logits: within 1e-5 relative at F32 with
    an F32 KV cache (measured 8e-7; llama.cpp's default F16 cache alone costs 1.3e-3), within 3e-3 at F16
    against gfo on the same F16-rounded weights (measured 1.1e-3: llama.cpp's F16 matmul rounds the
    activations to F16 as well)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (a source build)")
    from models.export_gguf import save_gguf

    write_checkpoint(tmp_path / "base")
    model, params = models.from_pretrained(str(tmp_path / "base"))
    tok = models.load_tokenizer(str(tmp_path / "base"))
    export = models.TransformerLM(model.config.replace(param_dtype=dtype))
    save_gguf(export, params, str(tmp_path / "m.gguf"), tok, str(tmp_path / "base"))  # matrices at dtype
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # (default: an F16 cache)
    row = [int(i) for i in IDS[0]]
    assert llm.tokenize(b"the cat, the 12", add_bos=False, special=False) == tok.encode("the cat, the 12")
    llm.eval(row)
    theirs = np.asarray(llm.scores[:len(row)], np.float32)
    kept = jax.tree.map(lambda v: v.astype(dtype).astype(jnp.float32) if v.ndim > 1 else v, params)  # 1-D stay F32
    ours = model.apply(kept, jnp.asarray(IDS[:1]))[0]
    err = _rel_err(ours, theirs)
    assert err < (1e-5 if dtype == "float32" else 3e-3), f"llama.cpp on gfo's {dtype} GGUF: relative logit error {err:.2e}"
    llm.close()
