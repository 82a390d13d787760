"""Shared fixtures: tiny models built once per session, tiny Hugging Face checkpoints on disk."""

from __future__ import annotations

import os

# Eight fake CPU devices for the whole session (read when the backend starts, before any test runs):
# scale-out tests shard over them, and every `gfo train` test runs on the default all-device mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests run tiny models, so most of their time is XLA compiling: LLVM's backend at -O0 compiles ~30 %
# faster (the fast tier 2:21 -> 1:36 on 2 cores). The HLO and its float semantics are the same (no fast-math either
# way); only the last bits may differ where -O3 would contract a multiply-add into an FMA, and every
# comparison in the suite is within one build or has a tolerance.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()

# `gfo train` turns on JAX's persistent compilation cache for the rest of its process; the tests keep it
# off (`GFO_COMPILATION_CACHE=0`: writing every compile of a worker to disk costs time and tests nothing);
# `tests/test_protocol.py` checks the cache in a subprocess of its own. Any cache directory they do use is a
# temporary one per pytest-xdist worker. (The worker crashes once blamed on the cache's write were the
# memory-map limit: see `_bounded_memory_maps` below.)
os.environ.setdefault("GFO_COMPILATION_CACHE", "0")
if "GFO_CACHE_DIR" not in os.environ or os.environ["GFO_CACHE_DIR"] == os.environ.get("GFO_TEST_CACHE_DIR"):
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    cache = tempfile.mkdtemp(prefix=f"gfo-test-cache-{worker}-")
    os.environ["GFO_CACHE_DIR"] = os.environ["GFO_TEST_CACHE_DIR"] = cache

import jax  # noqa: E402
import pytest

import models  # noqa: E402


# Tests over ~5 s on a loaded 2-core machine (measured with --durations), marked `slow` here for the
# modules whose owners have not decorated them yet: `pytest -m "not slow"` is the edit-test loop (under
# 3 minutes with -n 2, every module still covered), the README's plain command runs everything. An entry
# is a test's node id, without parameters (every case) or with them (that case only). New slow tests
# should carry `@pytest.mark.slow` themselves.
SLOW = (
    "tests/test_families.py::test_estimator_families_improve_the_loss[spsa+sgd]",
    "tests/test_families.py::test_new_model_families_generate_with_cache_as_without[gemma3]",
    "tests/test_scan.py::test_dot_product_attention_equals_einsum_reference[llama]",
    "tests/test_estimators.py::TestJitAndNoJit::test_estimators_agree_with_and_without_jit__with_jit",
    "tests/test_estimators.py::TestJitAndNoJit::test_estimators_agree_with_and_without_jit__without_jit",
    "tests/test_estimators.py::test_estimate_points_along_true_gradient[lowrank_es]",
    "tests/test_estimators.py::test_estimate_points_along_true_gradient[lowrank_es_dense]",
    "tests/test_estimators.py::test_lowrank_update_equals_update_from_explicit_dense_perturbations",
    "tests/test_estimators.py::test_nonfinite_losses_are_ranked_worst_and_counted",
    "tests/test_estimators.py::test_single_query_estimates_are_unbiased_within_standard_error[es_raw-estimator2]",
    "tests/test_families.py::test_es_step_memory_is_independent_of_population_at_fixed_chunk",
    "tests/test_families.py::test_estimator_families_improve_the_loss[es+adam]",
    "tests/test_families.py::test_estimator_families_improve_the_loss[forward_grad+sgd]",
    "tests/test_families.py::test_estimator_families_improve_the_loss[lowrank_es on lora]",
    "tests/test_families.py::test_estimator_families_improve_the_loss[spsa on prompt]",
    "tests/test_families.py::test_estimator_families_improve_the_loss[lowrank_es+adam]",
    "tests/test_families.py::test_evosax_strategies_improve_the_loss_on_small_spaces",
    "tests/test_families.py::test_host_reward_on_decoded_text_matches_the_jax_reward",
    "tests/test_families.py::test_policy_gradient_raises_a_reward_on_generated_text",
    "tests/test_hf_parity.py::test_logits_match_transformers[gpt2]",
    "tests/test_models.py::TestForward::test_shapes_and_dtype__with_jit",
    "tests/test_models.py::TestForward::test_shapes_and_dtype__without_jit",
    "tests/test_models.py::test_bfloat16_model_tracks_float32",
    "tests/test_models.py::test_causal_gradient_of_early_logits_wrt_later_embeddings_is_zero",
    "tests/test_models.py::test_learned_positions_refuse_too_long_generation",
    "tests/test_models.py::test_lowrank_linear_equals_dense_kernel_also_under_vmap_with_shared_w",
    "tests/test_spaces.py::test_subspace_stored_and_regenerated_projections_agree",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[arithmetic]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[countdown]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[grammar_lm]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[gsm8k]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[prompt_classification]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[reverse]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[sort]",
    "tests/test_tasks.py::test_task_batches_are_deterministic_and_objectives_match_metrics[tagging]",
    "tests/test_text.py::test_population_generation_runs_one_shared_matmul_per_kernel[llama]",
    "tests/test_text.py::test_generation_stops_right_after_a_stop_string[llama]",
    # the fast tier crossed 3 minutes (measured with --durations, 2026-11-24): tests over ~3.4 s whose module
    # keeps other fast tests
    "tests/test_methods.py::test_noise_map_freezes_and_chooses_noise_per_leaf",
    "tests/test_methods.py::test_groups_evaluate_their_own_slice_of_the_batch",
    "tests/test_methods.py::test_stateful_estimators_run_through_the_optimizer_protocol",
    "tests/test_methods.py::test_zo_sgd_cons_keeps_the_best_of_three_candidates_and_never_increases_the_loss",
    "tests/test_methods.py::test_randopt_keeps_the_top_k_of_one_round_and_votes",
    "tests/test_methods.py::test_mezo_svrg_estimate_is_the_control_variate_of_its_definition",
    "tests/test_scan.py::test_whole_leaf_descriptors_are_materialised_and_bad_ones_refused",
    "tests/test_scan.py::test_old_per_layer_layout_is_a_clear_error_and_converts",
    "tests/test_decode.py::test_refinement_raises_a_task_reward_over_greedy",
    "tests/test_models.py::test_generation_with_soft_prompt_matches_prefix_tokens",
    "tests/test_models.py::test_stop_tokens_end_rows_and_pad_the_rest",
    "tests/test_text.py::test_generation_stops_right_after_a_stop_string",
    "tests/test_spaces.py::test_space_owns_the_noise_map_and_the_optimizer_checks_it",
    "tests/test_discrete.py::test_each_search_improves_the_task_loss_over_the_initial_prompt[tabu]",
    "tests/test_families.py::test_estimator_families_improve_the_loss[backprop+adam]",
    "tests/test_strategies.py::test_sigma_reaches_every_algorithm[CMAAnchoredLES]",
    "tests/test_estimators.py::test_estimate_points_along_true_gradient[es_zscore]",
)


# Registry-parametrized tests: every case is slow except a representative few, which stay in the fast tier.
SLOW_EXCEPT = {
    "tests/test_hf_parity.py::test_logits_match_transformers": ("gpt2-untied-relu", "llama3-rope", "opt"),
    "tests/test_hf_parity.py::test_left_padded_logits_match_transformers": ("llama-headdim-bias-tied",
                                                                            "llama-linear-rope", "opt"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        function, _, param = item.nodeid.partition("[")
        kept = SLOW_EXCEPT.get(function)
        if item.nodeid in SLOW or function in SLOW or (kept is not None and param[:-1] not in kept):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    """A pytest worker compiles hundreds of programs and JAX keeps them all; each CPU executable holds
    memory maps, and past the kernel's `vm.max_map_count` the next compile segfaults (it did, ~95 % into
    the full suite). Past half the limit, the compiled programs are dropped between tests."""
    yield
    from gfo.jitting import release_compiled_programs

    release_compiled_programs(note=None)


@pytest.fixture(autouse=True)
def _strict_rank_promotion(request):
    """Implicit rank promotion is an error in our code; modules that drive evosax (whose internals
    rely on it) opt out with `ALLOW_RANK_PROMOTION = True`."""
    if getattr(request.module, "ALLOW_RANK_PROMOTION", False):
        yield
        return
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request):
    """`(model, params)` of a tiny random model of each family (byte vocabulary)."""
    model = models.TransformerLM(models.tiny(request.param))
    return model, model.init(jax.random.key(0))


@pytest.fixture(scope="session")
def byte_tokenizer():
    return models.ByteTokenizer()


class LMObjective:
    """Next-token cross-entropy of a batch `[B, T+1]` of token ids at `to_params(x)` (a loss)."""

    def __init__(self, model, to_params):
        self.model, self.to_params = model, to_params

    def __call__(self, x, batch, key):
        import optax

        logits = self.model.apply(self.to_params(x), batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.fixture(scope="session")
def lm_problem():
    """A 1-layer byte-level GPT-2 and a small fixed batch `[4, 17]` of text."""
    import jax.numpy as jnp

    model = models.TransformerLM(models.tiny("gpt2", d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    params = model.init(jax.random.key(0))
    tok = models.ByteTokenizer()
    text = "the cat sat on the mat. " * 4
    batch = jnp.asarray([tok.encode(text[i:i + 17]) for i in range(0, 32, 8)])
    return model, params, batch
