"""The benchmarks' --quick modes run end to end and write their JSON, Markdown (and plot)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import convergence, throughput
from benchmarks.common import mark



def _payload(compile_32: float, spsa_peak: float, spsa_passes: float, es_peak: float, lowrank_ratio: float,
             es_ratio: float) -> dict:
    """A throughput payload with chosen measurements (one model; populations 32 and 128; budget 2.5x)."""
    def pop(peak, ratio, n):
        e = {"population": n, "compile_s": 1.0, "peak_x_params": peak, "memory_budget_x_params": 2.5}
        return {**e, "step_s": 1.0, "ceiling_s": ratio, "ratio_to_ceiling": ratio} if n == 32 else e

    row = {"model": "m", "params": 10, "param_bytes": 40, "layer_bytes": 4, "forward_s": 0.1, "methods": {
        "spsa": [{"population": 32, "compile_s": 1.0, "peak_x_params": spsa_peak, "step_s": 0.2,
                  "forward_passes": spsa_passes}],
        "es": [pop(es_peak, es_ratio, 32), pop(es_peak, None, 128)],
        "lowrank_es": [pop(2.0, lowrank_ratio, 32), pop(2.0, None, 128)]}}
    return {"depths": [2, 32], "compile": {m: {2: 10.0, 32: compile_32} for m in ("es", "lowrank_es", "spsa")},
            "rows": [row], "quick": True, "machine": {"processor": "p", "platform": "cpu", "cpu_count": 2,
                                                      "jax": "0", "date": "d"},
            "batch": 4, "seq": 64, "chunk": 8, "distribution": "gaussian"}


def test_throughput_targets_are_judged_by_their_definitions():
    met = throughput.evaluate_targets(_payload(12.9, 1.4, 2.2, 2.4, 0.95, 0.6))
    assert [t["met"] for t in met] == [True] * 6
    missed = throughput.evaluate_targets(_payload(13.1, 1.6, 2.4, 2.6, 0.85, 0.4))
    assert [t["met"] for t in missed] == [False] * 6
    assert missed[0]["measured"].startswith("es 1.31x (10.0 s -> 13.1 s)")
    payload = _payload(13.1, 1.6, 2.4, 2.6, 0.85, 0.4)
    payload["targets"] = missed
    text = throughput.markdown(payload)
    for t in missed:
        assert f"| {t['target']} | {t['measured']} | {mark(t['met'])} |" in text
    assert (mark(True), mark(False), mark(None)) == ("**met**", "**not met**", "n/a")
    skipped = throughput.evaluate_targets(_payload(float("nan"), 1.4, 2.2, 2.4, 0.95, 0.6))  # --skip-compile
    assert skipped[0]["met"] is None and skipped[0]["measured"].startswith("not measured")
    drawn = _payload(13.1, 1.6, 2.4, 2.6, 0.85, 0.4)  # with one noise draw timed: the SPSA floor 2 + 2 draws
    drawn["rows"][0]["methods"]["spsa"][0]["draw_forward_passes"] = 0.75
    drawn["targets"] = throughput.evaluate_targets(drawn)
    assert drawn["targets"][2]["measured"] == "2.40 forward passes (one noise draw: 0.75)"
    assert "its floor is ≈ 2 + 2 × one draw: here 3.50 forward passes" in throughput.markdown(drawn)


@pytest.mark.slow
def test_throughput_setup_measures_a_real_step(tmp_path):
    """One real SPSA step through the benchmark's setup: XLA's peak is a real multiple of the parameters."""
    import models

    setup = throughput.Setup(models.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=17), 2, 16)
    opt = throughput.optimizers(4, 2, "gaussian")["spsa"]
    fn, state, seconds, exe = setup.step(opt)
    peak = throughput._peak(exe) / setup.param_bytes
    assert seconds > 0 and 1.0 < peak < 50.0  # at least the donated parameters, and not a population of copies
    state, metrics = fn(state, setup.tokens, throughput.jax.random.key(0))
    assert float(metrics["loss"]) > 0
    assert throughput.draw_seconds(setup, "gaussian", repeats=1) > 0


@pytest.mark.slow
def test_convergence_quick_compares_methods_at_an_equal_budget(tmp_path):
    payload = convergence.main(["--quick", "--out", str(tmp_path)])
    table = payload["table"]["grammar_lm"]["methods"]
    assert set(table) == {"es", "spsa", "adam"}
    assert table["es"]["steps"] * 16 == table["spsa"]["steps"] * 2 == table["adam"]["steps"] * 3 == 48
    assert table["adam"]["final_mean"] < table["adam"]["start"]  # the exact gradient makes progress
    for name in ("convergence_quick.json", "convergence_quick.md", "convergence_quick.png"):
        assert os.path.isfile(tmp_path / name)


@pytest.mark.slow
def test_library_step_quick_measures_the_step_a_script_gets(tmp_path):
    from benchmarks import library_step

    payload = library_step.run(quick=True, out_dir=str(tmp_path))
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"spsa", "openes"}
    assert "factored=True" in rows["spsa"]["as_run"] and "factored=True" in rows["openes"]["as_run"]
    assert all(0.5 < r["peak_x_params"] < 50 and np.isfinite(r["loss"]) for r in rows.values())
    assert (tmp_path / "library_step_quick.md").read_text().count("| `Optimizer(") == 2


def test_rollouts_markdown_names_the_machine_and_every_ratio():
    from benchmarks import rollouts

    row = {"model": "m", "params": 10, "rows": 8, "new_tokens": 64, "decoding": "greedy", "gfo_tok_s": 100.0,
           "transformers_tok_s": 50.0, "ctranslate2_tok_s": 200.0, "greedy_rows_equal_transformers": 1.0,
           **rollouts.ceiling(10, 8, {"read_bytes_per_s": 400.0, "matmul_flops_per_s": 1e4})}
    row["gfo_vs_ceiling"] = row["gfo_tok_s"] / row["ceiling_tok_s"]
    payload = {"machine": {"processor": "p", "platform": "cpu", "cpu_count": 2, "jax": "0", "date": "d"},
               "grid": "default", "ceiling_inputs": {"read_bytes_per_s": 400.0, "matmul_flops_per_s": 1e4},
               "rows": [row], "es": [{"model": "m", "members": 8, "prompts": 4, "rows": 32, "new_tokens": 64,
                                      "es_tok_s": 60.0, "inference_tok_s": 100.0, "fraction": 0.6}],
               "skipped": {"x": "y"}}
    md = rollouts.markdown(payload)
    assert "Machine: p" in md and "| m | 8 | 64 | greedy | 100 | 50 | 200 |" in md and "| 2.00 | 0.50 |" in md
    assert "| m | 8 × 4 | 64 | 60 | 100 | 0.60 |" in md
    c = rollouts.ceiling(10, 8, {"read_bytes_per_s": 400.0, "matmul_flops_per_s": 1e4})  # 0.1 s vs 0.016 s a step
    assert c["bound"] == "bandwidth" and c["ceiling_tok_s"] == pytest.approx(80.0)
    payload["breakdown"] = [{"model": "m", "rows": 32, "decode_step_ms": 130.0, "matmul_floor_ms": 87.0,
                             "floor_over_step": 87 / 130, "op_shares": {"matmuls": 0.5, "other": 0.1}}]
    assert "| m | 32 | 130.0 | 87.0 | 0.67 | 0.50 | 0.00 | 0.00 | 0.10 |" in rollouts.markdown(payload)
    payload["llama_cpp"] = {"date": "d", "version": "v", "threads": 2, "files": ["F32", "Q4_1"], "cells": [
        {"rows": 8, "new_tokens": 64, "gfo_tok_s": 120.0, "ceiling_tok_s": 80.0, "bound": "bandwidth",
         "llama_cpp": {"F32": {"tok_s": 80.0, "first16_rows_equal_gfo": 0.875}}}]}
    payload["skipped"] = {}
    md = rollouts.markdown(payload)  # gfo / llama.cpp F32 = 1.50; the file not measured is a dash
    assert "| 8 | 64 | 120 | 80 | — | 80 (bandwidth) | 1.50 | 0.88 / — |" in md and "Not measured" not in md


def test_profile_op_names_are_grouped_by_kind():
    """XLA CPU's op names in a profile (as seen in a SmolLM2 decode step) land in their kinds; the runtime's
    and Python's own events (which contain or wait on the ops) are not counted."""
    from benchmarks.rollouts import op_kind

    kinds = {"ynn_fusion.11": "matmuls", "dot.52": "matmuls", "dynamic-slice_bitcast_fusion.6": "per-layer dynamic-slice copies",
             "transpose_copy_fusion.1": "transposes and copies", "copy.53": "transposes and copies",
             "copy_bitcast_fusion": "transposes and copies", "select_dynamic-update-slice_fusion": "other",
             "iota_reduce_fusion": "other", "ThunkExecutor::Execute": None, "$api.py:2479 block_until_ready": None,
             "while.52": None, "end: ynn_fusion": None, "PjitFunction(loop)": None}
    assert {name: op_kind(name) for name in kinds} == kinds


@pytest.mark.slow
def test_gpu_script_runs_every_part_at_toy_size_on_cpu(tmp_path):
    """`benchmarks/gpu.py --toy`: parity against transformers, rollouts, throughput and the countdown config's
    first steps all run on the CPU, so the accelerator script cannot rot between the sessions that have one."""
    pytest.importorskip("transformers")
    from benchmarks import gpu

    p = gpu.main(["--toy", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    assert p["failed"] == {}
    modes = p["parity"]["modes"]
    assert modes["float32 highest"]["rel_logit_error"] < 1e-4
    assert modes["bfloat16"]["rel_logit_error"] < gpu.BOUNDS["bfloat16"]
    assert modes["float32 highest"]["greedy_rows_equal_transformers"] == 1.0
    assert all(m["cache_equals_no_cache"] for m in modes.values())
    rows = p["rollouts"]["rows"]
    assert {r["decoding"].split()[0] for r in rows} == {"greedy", "sampled"} and all(r["gfo_tok_s"] > 0 for r in rows)
    assert all(r["ceiling_tok_s"] == min(r["bandwidth_tok_s"], r["compute_tok_s"]) for r in rows)
    f32 = p["rollouts"]["cache_memory"][0]  # the cache held once (+ one of the toy's 2 layers being written)
    assert f32["dtype"] == "float32" and 1.0 <= f32["temp_x_cache"] <= 2.0
    lowrank = p["throughput"]["row"]["methods"]["lowrank_es"][0]
    assert 1.0 < lowrank["peak_x_params"] <= lowrank["memory_budget_x_params"]
    countdown = p["es_countdown"]
    assert len(countdown["losses"]) == 3 and countdown["rollouts_per_s_per_device"] > 0
    text = (tmp_path / "gpu_toy.md").read_text()
    for title in ("## 1. Parity", "## 2. Rollouts", "## 3. Throughput", "## 4. ES at scale"):
        assert title in text


@pytest.mark.slow
def test_decode_breakdown_profiles_a_tiny_model():
    """`--breakdown-only`'s measurement on a tiny Llama: a positive decode step, its matmuls through the layer
    scan, and op-time shares read from a real profile that sum to 1 with the matmuls among them."""
    import jax

    import models
    from benchmarks.rollouts import decode_breakdown

    model = models.TransformerLM(models.tiny("llama"))
    params = model.init(jax.random.key(0))
    b = decode_breakdown(model, params, rows=2, n=4, repeats=1)
    assert b["decode_step_ms"] > 0 and b["matmul_floor_ms"] > 0 and b["prefill_ms"] > 0
    assert sum(b["op_shares"].values()) == pytest.approx(1.0) and b["op_shares"]["matmuls"] > 0
