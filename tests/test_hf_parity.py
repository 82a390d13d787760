"""Our models against the `transformers` reference implementations, on checkpoints it writes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.hf_fixtures import HF_CONFIGS, build_hf_model, hf_logits, torch

REL_TOL = 1e-4  # max |Δlogits| / max |logits|, float32


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    hf_model = build_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model.save_pretrained(path)
    return request.param, hf_model, path


def test_logits_match_transformers(hf_checkpoint):
    name, hf_model, path = hf_checkpoint
    model, params = models.from_pretrained(path)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(3, 17))
    err = _rel_err(model.apply(params, jnp.asarray(ids)), hf_logits(hf_model, ids))
    assert err < REL_TOL, f"{name}: relative logit error {err:.2e}"


def test_left_padded_logits_match_transformers(hf_checkpoint):
    """With left padding both sides get the same position ids; real tokens must agree."""
    name, hf_model, path = hf_checkpoint
    model, params = models.from_pretrained(path)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))  # default positions
    ref = hf_logits(hf_model, ids, mask, positions)
    real = mask.astype(bool)
    err = float(np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])))
    assert err < REL_TOL, f"{name}: relative logit error {err:.2e} on real tokens"


def test_save_pretrained_round_trip_is_exact_and_loads_in_transformers(hf_checkpoint, tmp_path):
    name, hf_model, path = hf_checkpoint
    model, params = models.from_pretrained(path)
    models.save_pretrained(model, params, str(tmp_path))
    model2, params2 = models.from_pretrained(str(tmp_path))
    assert model2.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    reloaded = hf_model.__class__.from_pretrained(str(tmp_path)).eval()
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 9))
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf_model, ids), rtol=0, atol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = build_hf_model("llama-gqa")
    hf_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model, params = models.from_pretrained(str(tmp_path))
    ids = np.arange(10)[None] % model.config.vocab_size
    assert _rel_err(model.apply(params, jnp.asarray(ids)), hf_logits(hf_model, ids)) < REL_TOL
    # our own sharded writer round-trips exactly
    models.save_pretrained(model, params, str(tmp_path / "ours"), shard_size_mb=0.02)
    _, params2 = models.from_pretrained(str(tmp_path / "ours"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bfloat16_checkpoint_loads(tmp_path):
    hf_model = build_hf_model("llama-gqa").to(torch.bfloat16)
    hf_model.save_pretrained(str(tmp_path))
    model, params = models.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16
    ids = np.arange(12)[None] % model.config.vocab_size
    ref = hf_logits(hf_model.float(), ids)
    assert _rel_err(model.apply(params, jnp.asarray(ids)), ref) < 5e-2  # bf16 compute


@pytest.mark.parametrize("edit, message", [
    (lambda cfg, d: cfg.update(model_type="bert"), "model_type='bert' is not supported"),
    (lambda cfg, d: cfg.update(pretraining_tp=2), "pretraining_tp=2"),
    (lambda cfg, d: cfg.update(model_type="gemma3"), "expected a text-only 'gemma3_text'"),
    (lambda cfg, d: cfg.update(rope_scaling=dict(rope_type="yarn", factor=4.0), rope_parameters=None),
     "rope_type"),
])
def test_bad_config_is_a_clear_error(tmp_path, edit, message):
    build_hf_model("llama-gqa").save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match=message):
        models.from_pretrained(str(tmp_path))


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    build_hf_model("gpt2").save_pretrained(str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    broken = dict(tensors)
    del broken["transformer.h.1.mlp.c_fc.bias"]
    save_file(broken, file)
    with pytest.raises(models.CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias.*missing"):
        models.from_pretrained(str(tmp_path))
    broken = dict(tensors)
    broken["transformer.h.0.attn.c_proj.weight"] = np.zeros((48, 47), np.float32)
    save_file(broken, file)
    with pytest.raises(models.CheckpointError, match=r"transformer\.h\.0\.attn\.c_proj\.weight.*\(48, 47\)"):
        models.from_pretrained(str(tmp_path))


def test_missing_directory_contents_are_clear_errors(tmp_path):
    with pytest.raises(models.CheckpointError, match="no config.json"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(HF_CONFIGS["gpt2"])))
    with pytest.raises(models.CheckpointError, match="no model.safetensors"):
        models.from_pretrained(str(tmp_path))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "b",}}')  # a trailing comma
    with pytest.raises(models.CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON \(.* at line "
                                                     r"1, column 26\)"):
        models.from_pretrained(str(tmp_path))
    index.write_text('["model.safetensors"]')
    with pytest.raises(models.CheckpointError, match=r"index\.json: expected a JSON object, got list"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"\n "n_layer": 2}')  # a missing comma
    with pytest.raises(models.CheckpointError, match=r"config\.json: not valid JSON \(Expecting ',' delimiter at "
                                                     r"line 2, column 2\)"):
        models.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(models.CheckpointError, match=r"config\.json: not UTF-8 text"):
        models.from_pretrained(str(tmp_path))


def test_original_gpt2_names_without_transformer_prefix(tmp_path):
    """The original `gpt2` hub checkpoint names tensors `h.0.attn...` without `transformer.`."""
    from safetensors.numpy import load_file, save_file

    hf_model = build_hf_model("gpt2")
    hf_model.save_pretrained(str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in load_file(file).items()}, file)
    model, params = models.from_pretrained(str(tmp_path))
    ids = np.arange(8)[None]
    assert _rel_err(model.apply(params, jnp.asarray(ids)), hf_logits(hf_model, ids)) < REL_TOL


@pytest.mark.parametrize("config, message", [
    (models.tiny("qwen2", attention_out_bias=True), "attention_out_bias|out_bias=True"),
    (models.tiny("qwen3", qk_norm=False), "qk_norm=False"),
    (models.tiny("llama", post_norms=True), "post_norms=True"),
])
def test_configs_transformers_cannot_express_are_refused_on_export(tmp_path, config, message):
    model = models.TransformerLM(config)
    with pytest.raises(ValueError, match=message):
        models.save_pretrained(model, model.init(jax.random.key(0)), str(tmp_path))
