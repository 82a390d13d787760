"""The optimizer protocol, filter_jit (traced frozen weights, donation, no recompiles), the shared
population evaluation and its metrics, the method registry, key streams and the memory plan."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfo
from gfo.jitting import filter_jit, register_object_pytree

ALLOW_RANK_PROMOTION = True  # evosax internals


class Shifted:
    """`Σ (x − c)²` with a pytree field `c` (traced by filter_jit)."""

    def __init__(self, c, label="q"):
        self.c, self.label = c, label

    def __call__(self, x, batch, key):
        return jnp.sum((x - self.c) ** 2)


register_object_pytree(Shifted)

N = 262_144  # 1 MiB of float32


@functools.partial(filter_jit, donate=(0,))
def _descend(x, objective, batch, key):
    return x - 0.1 * jax.grad(objective)(x, batch, key), objective(x, batch, key)


def test_frozen_arrays_are_arguments_not_constants_and_recreated_objectives_do_not_recompile():
    c = jax.random.normal(jax.random.key(1), (N,))
    x = jnp.zeros(N)
    closure = lambda x, b, k: jnp.sum((x - c) ** 2)  # noqa: E731 - any plain function works
    baked = len(_descend.lower(x, closure, None, jax.random.key(0)).as_text())
    traced = len(_descend.lower(x, Shifted(c), None, jax.random.key(0)).as_text())
    assert baked > N * 4  # the closure's 1 MiB array is a constant of its executable
    assert traced < 20_000  # the pytree's is an argument
    x, loss = _descend(x, Shifted(c), None, jax.random.key(0))
    np.testing.assert_allclose(float(loss), float(jnp.sum(c ** 2)), rtol=1e-5)
    before = _descend.traces
    x, _ = _descend(x, Shifted(2 * c), None, jax.random.key(0))  # a new object, same structure
    assert _descend.traces == before
    np.testing.assert_allclose(np.asarray(x), np.asarray(0.2 * c + 0.2 * (2 * c - 0.2 * c)), rtol=1e-5, atol=1e-6)
    _descend(x, Shifted(c, label="other"), None, jax.random.key(0))  # a different static field: retrace
    assert _descend.traces == before + 1


def test_step_donates_its_state_and_keeps_the_callers_x0():
    x0 = {"w": jnp.ones(5)}
    opt = gfo.Optimizer(gfo.Backprop(), optax.sgd(0.1))
    state = opt.init(jax.random.key(0), x0)
    new, _ = opt.step(state, lambda x, b, k: jnp.sum(x["w"] ** 2), None, jax.random.key(1))
    assert state.x["w"].is_deleted() and not x0["w"].is_deleted()
    np.testing.assert_allclose(np.asarray(new.x["w"]), 0.8 * np.ones(5), rtol=1e-6)


def _sphere(x, batch, key):
    return jnp.sum(x ** 2)


@pytest.mark.parametrize("kind", ["optimizer", "evosax", "discrete"])
def test_every_family_implements_the_protocol_and_solution_is_the_current_point(kind):
    from gfo.optim.search.discrete import DiscreteSearch
    from gfo.optim.protocol import OptimizerProtocol

    if kind == "discrete":
        vocab = tuple(range(10))
        opt = DiscreteSearch("annealing", vocab, population=4, t0=10.0, cooling=1.0)
        objective = lambda t, b, k: jnp.sum((t - 3.0) ** 2)  # noqa: E731
        x0 = jnp.array([9, 9, 9], jnp.int32)
    else:
        opt = (gfo.Optimizer(gfo.OpenES(population=8, sigma=0.1), optax.sgd(0.05)) if kind == "optimizer" else
               gfo.EvosaxStrategy("SNES", 8, jnp.ones(4), init_std=0.3))
        objective, x0 = _sphere, jnp.ones(4)
    assert isinstance(opt, OptimizerProtocol)
    state = opt.init(jax.random.key(0), x0)
    for t in range(6):
        state, metrics = opt.step(state, objective, None, jax.random.key(t))
    assert int(metrics["evaluations"]) == {"optimizer": 8, "evosax": 8, "discrete": 6}[kind]
    if kind == "discrete":
        np.testing.assert_array_equal(np.asarray(opt.solution(state)), np.asarray(state.current))
        best = opt.best_solution(state)
        assert float(objective(best, None, None)) == pytest.approx(float(metrics["best_loss"]))
        assert float(metrics["best_loss"]) <= float(objective(opt.solution(state), None, None))
    elif kind == "evosax":
        np.testing.assert_allclose(np.asarray(opt.solution(state)), np.asarray(opt.mean(state)))
    shardings = opt.state_sharding(state, jax.make_mesh((1,), ("model",)))
    assert jax.tree.structure(shardings) == jax.tree.structure(state)


def test_evaluate_population_sanitises_counts_and_reports_the_vocabulary():
    from gfo.optim.evaluate import evaluate_population

    raw = jnp.array([1.0, jnp.nan, 3.0, jnp.inf, 2.0, 0.5])
    losses, m = evaluate_population(lambda i: raw[i], 6, batch_size=4)
    np.testing.assert_array_equal(np.isnan(np.asarray(losses)), np.isnan(np.asarray(raw)))
    clean = np.array([1.0, 3.0, 3.0, 3.0, 2.0, 0.5])  # non-finite → the worst finite loss
    assert float(m["loss"]) == pytest.approx(clean.mean())
    assert float(m["loss_min"]) == 0.5 and float(m["loss_range"]) == 2.5 and int(m["nonfinite"]) == 2
    assert float(m["loss_std"]) == pytest.approx(clean.std(), rel=1e-5) and int(m["evaluations"]) == 6
    _, none = evaluate_population(lambda i: jnp.nan + i, 3)
    assert np.isnan(float(none["loss"])) and int(none["nonfinite"]) == 3


def test_objective_kinds_are_declared_and_checked():
    from gfo.objectives import RewardObjective, check_kind
    from gfo.rollout import GenerationReward

    reward = GenerationReward(model=None, to_params=lambda x: x, reward_fn=None, max_new_tokens=1)
    assert isinstance(reward, RewardObjective) and not isinstance(_sphere, RewardObjective)
    assert gfo.Optimizer(gfo.PolicyGradient(), optax.sgd(1.0)).objective_kind == "reward"
    assert gfo.Optimizer(gfo.SPSA(), optax.sgd(1.0)).objective_kind == "loss"
    with pytest.raises(TypeError, match="needs a reward objective"):
        check_kind(_sphere, "reward", "policy_gradient")


def test_registry_is_the_one_table_of_build_minimize_and_config():
    from gfo.optim import registry as methods
    from gfo.run.build import build_optimizer
    from gfo.run.config import OPTIMIZER_FIELDS, OptimizerSection

    assert OPTIMIZER_FIELDS == {name: m.fields for name, m in methods.METHODS.items()}
    x0 = jnp.zeros(4)
    built = build_optimizer(OptimizerSection(method="es", population=8, sigma=0.1, lr=0.01), x0)
    made = gfo.make_optimizer("es", x0, lr=0.01, sigma=0.1, popsize=8)
    assert built.estimator == made.estimator  # same constructor, same defaults
    assert methods.lookup("cma_es").family == "evosax" and methods.lookup("tabu").domain == "tokens"
    with pytest.raises(ValueError, match="nor an evosax strategy"):
        methods.lookup("adamm")


def test_every_method_has_its_own_typed_section_with_documented_fields():
    import dataclasses

    from gfo.optim import registry as methods
    from gfo.optim.sections import MethodSection

    documented = 0
    for name, spec in methods.METHODS.items():
        assert issubclass(spec.section, MethodSection), name
        section = spec.section(method=name)
        section.check_ranges()  # the defaults are within their own ranges
        for f in dataclasses.fields(section):
            if f.name != "method" and "check" in f.metadata:
                assert f.metadata["doc"], (name, f.name)
                documented += 1
        assert not {"sigma", "eps"} <= set(spec.fields), (name, spec.fields)  # one scale, one meaning
    assert documented >= 60
    assert methods.lookup("spsa").section.__name__ == "SPSASection"
    assert "eps" in methods.lookup("hizoo").fields and "sigma" not in methods.lookup("hizoo").fields


def test_sigma_means_sigma_and_options_bags_are_gone():
    from gfo.run.config import ConfigError, OptimizerSection, read_optimizer_section

    assert OptimizerSection(method="spsa", eps=1e-3).eps == 1e-3
    with pytest.raises(ConfigError, match="spsa perturbs by optimizer.eps .* rename sigma to eps"):
        OptimizerSection(method="spsa", sigma=1e-3)
    with pytest.raises(ConfigError, match=r"optimizer.options is not a field.*\(optimizer.nu\)"):
        OptimizerSection(method="lozo", options={"nu": 5})
    assert OptimizerSection(method="lozo", nu=5).nu == 5
    with pytest.raises(ConfigError, match="'optimizer.top_k' = 0 is invalid: expected an integer >= 1"):
        OptimizerSection(method="randopt", top_k=0)
    # A config.yaml written before the typed sections spelled out the whole flat section: the fields a
    # method does not read, at their old defaults, changed nothing and read; any other value is refused.
    legacy = {"method": "es", "transform": "adam", "lr": 0.01, "sigma": 0.05, "population": 8, "rank": 1,
              "n": 1, "kl_coef": 0.0, "group_size": 4, "options": {}, "params": {}, "eval_chunk": None}
    section = read_optimizer_section(legacy)
    assert (type(section).__name__, section.sigma, section.population) == ("ESSection", 0.05, 8)
    with pytest.raises(ConfigError, match="optimizer.rank does not apply to method 'es'"):
        read_optimizer_section({**legacy, "rank": 2})


def test_a_section_field_the_estimator_does_not_take_is_refused_at_registration():
    import dataclasses

    from gfo.optim.registry import estimator_method
    from gfo.optim.sections import TransformSection, knob

    @dataclasses.dataclass
    class Typo(TransformSection):
        epsilon: float = knob(1e-3)

    with pytest.raises(TypeError, match=r"fields \['epsilon'\] are not arguments of SPSA"):
        estimator_method("typo", gfo.SPSA, Typo)


def test_key_streams_differ_by_stage_name_and_seed_and_are_stable_across_processes():
    from gfo.streams import stream

    data = lambda *a: np.asarray(jax.random.key_data(stream(*a))).tolist()  # noqa: E731
    keys = [data(0, "main", "step"), data(0, "pretrain", "step"), data(0, "main", "eval"), data(1, "main", "step")]
    assert len({str(k) for k in keys}) == 4
    code = ("import jax, numpy as np; from gfo.streams import stream; "
            "print(np.asarray(jax.random.key_data(stream(0, 'main', 'step'))).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(keys[0])


def test_default_chunk_fits_the_budget():
    from gfo.optim.evaluate import activation_bytes, default_chunk

    member = activation_bytes(tokens=16 * 64, batch=16, seq_len=64, d_model=32, n_heads=2, vocab_size=259)
    assert member == 4 * (1024 * (16 * 32 + 2 * 259) + 16 * 2 * 64 * 64)
    assert default_chunk(32, member, budget_bytes=2**30) is None  # a tiny model: the whole population
    chunk = default_chunk(32, member, budget_bytes=5 * member + 7, multiple=2)
    assert chunk == 4 and chunk * member <= 5 * member + 7
    assert default_chunk(32, member, budget_bytes=member // 2) == 1  # never below one member


def test_step_memory_line_refuses_a_step_that_cannot_fit():
    from types import SimpleNamespace

    from gfo.run.stepplan import StepMemoryError, step_memory_line

    a = SimpleNamespace(argument_size_in_bytes=300, output_size_in_bytes=200, alias_size_in_bytes=100,
                        temp_size_in_bytes=50, generated_code_size_in_bytes=0)
    line = step_memory_line(a, 100, 1.0, 1000, "test")
    assert "peak 4.50 × params" in line
    with pytest.raises(StepMemoryError, match="needs 0.0 MiB per device"):
        step_memory_line(a, 100, 1.0, 449, "test")


def test_compilation_cache_directory_is_populated(tmp_path, monkeypatch):
    code = ("import jax, jax.numpy as jnp; from gfo.jitting import enable_compilation_cache; "
            "print(enable_compilation_cache()); "
            "jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)(jnp.ones((64, 64))).block_until_ready()")
    env = {**os.environ, "GFO_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    env.pop("GFO_COMPILATION_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(tmp_path / "jax")
    assert os.listdir(tmp_path / "jax")
    from gfo.jitting import enable_compilation_cache

    monkeypatch.setenv("GFO_COMPILATION_CACHE", "0")  # the off switch: nothing configured, nothing written
    monkeypatch.setenv("GFO_CACHE_DIR", str(tmp_path / "off"))
    assert enable_compilation_cache() is None and not (tmp_path / "off").exists()


def test_gfo_train_picks_eval_chunk_from_the_memory_budget(monkeypatch, tmp_path):
    import gfo.run.build as B
    import gfo.run.stepplan as plan
    from gfo.run.config import load_config
    from gfo.optim.evaluate import activation_bytes

    cfg = load_config(None, ["pretrain=null", f"runs_dir={tmp_path}", "task.name=grammar_lm", "task.options={seq_len: 16}",
                             "task.batch_size=4", "model.overrides={d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 32}",
                             "optimizer.method=es", "optimizer.population=16", "optimizer.eval_chunk=null"])
    mesh = B.build_mesh(cfg)
    model, params = B.model_of(cfg)
    roomy = B.build_run(cfg, str(tmp_path / "a"), model, params, mesh)
    assert roomy.planned_chunk is None and roomy.optimizer.estimator.batch_size is None  # a tiny model: all at once
    x_bytes = plan.tree_bytes(roomy.x0)
    member = activation_bytes(4 * 17, 4, 17, 32, 2, model.config.vocab_size) + x_bytes  # batch [4, 17] tokens
    pop = mesh.shape["pop"]
    limit = 2 * (roomy.param_bytes + 4 * x_bytes + member * 16 // pop // 2 + 1)  # room for half the population
    monkeypatch.setattr(plan, "device_memory_limit", lambda mesh=None: (limit, "test"))
    tight = B.build_run(cfg, str(tmp_path / "b"), model, params, mesh)
    assert tight.planned_chunk == 8 and tight.optimizer.estimator.batch_size == 8
