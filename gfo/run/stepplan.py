"""A lean step for `gfo train`: memory read ahead of time, a chunk that fits, a persistent compile cache.

- `compile_step`: a run's step lowered and compiled ahead of time (the loop then reuses the executable),
  reported in one line (`step_memory_line`).
- `step_memory_line`: XLA's memory analysis of the ahead-of-time compiled step (`compiled.memory_analysis()`)
  as multiples of the parameter bytes per device, and `StepMemoryError` when its peak
  (arguments + outputs − donated + temporaries + code) exceeds `device_memory_limit` (an accelerator's
  `bytes_limit`; on CPU the physical RAM shared by the local devices).
- `plan_eval_chunk`: `optimizer.eval_chunk` for a population method that leaves it unset
  (`gfo.optim.evaluate.default_chunk` with the budget and per-member bytes below).

The process-level housekeeping (`enable_compilation_cache`, `release_compiled_programs`) lives in
`gfo.jitting`, where the library's `gfo.minimize` reaches it too.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from gfo.run.config import ConfigError
from gfo.optim.plan import device_memory_limit, tree_bytes  # noqa: F401 - the step's sizes, used by gfo train


class StepMemoryError(ConfigError):
    """The compiled step needs more memory than the device has (XLA's own memory analysis)."""


def step_memory_line(analysis, param_bytes: int, seconds: float, limit: int, source: str) -> str:
    """The compiled step's memory (a `CompiledMemoryStats`) as multiples of the parameter bytes; raises
    `StepMemoryError` when its peak exceeds `limit` bytes."""
    a = analysis
    peak = (a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes
            + a.generated_code_size_in_bytes)
    unit = max(param_bytes, 1)
    line = (f"compiled step in {seconds:.1f} s; XLA memory per device: peak {peak / unit:.2f} × params "
            f"({_size(peak)}; arguments {a.argument_size_in_bytes / unit:.2f} ×, outputs "
            f"{a.output_size_in_bytes / unit:.2f} ×, donated {a.alias_size_in_bytes / unit:.2f} ×, temporaries "
            f"{a.temp_size_in_bytes / unit:.2f} ×, code {_size(a.generated_code_size_in_bytes)}; params "
            f"{_size(param_bytes)}) of {_size(limit)} ({source})")
    if peak > limit:
        raise StepMemoryError(f"the compiled step needs {_size(peak)} per device ({peak / unit:.1f} × the "
                              f"parameters) but the device has {_size(limit)} ({source}): lower "
                              f"optimizer.eval_chunk or task.batch_size, search a smaller space (lora, prompt, "
                              f"subspace), or shard over more devices (mesh.model)")
    return line


def compile_step(run, state, t: int) -> str:
    """Lower and compile step `t` of `run` (a `gfo.run.build.Run`) from `state` ahead of time (the loop then
    reuses the executable); one line with XLA's memory analysis as multiples of the parameter bytes per
    device. Raises `StepMemoryError` when the step's peak (arguments + outputs − aliased (donated) +
    temporaries + code) exceeds the device's memory."""
    from gfo import distributed
    from gfo.optim import protocol

    t0 = time.perf_counter()
    batch = distributed.place_batch(run.task.train_batch(t), run.mesh)
    key = jax.random.fold_in(run.keys["step"], t)
    compiled = protocol.lower_step(run.optimizer, state, run.objective, batch, key).compile()
    seconds = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend without the analysis
        return f"compiled step in {seconds:.1f} s (no memory analysis on this backend)"
    line = step_memory_line(analysis, run.param_bytes, seconds, *device_memory_limit(run.mesh))
    if run.planned_chunk is not None:
        line += f"; eval_chunk {run.planned_chunk} chosen from the memory budget"
    from gfo.optim.optimizer import Optimizer
    from gfo.optim.population import PopulationConfig

    if run.planned_chunk is None and isinstance(run.optimizer, Optimizer):  # the library's own plan
        estimator = run.optimizer.prepare(run.objective, state.x, batch, key)
        if isinstance(estimator, PopulationConfig) and estimator.batch_size != run.optimizer.estimator.batch_size:
            line += (f"; {estimator.batch_size} members per chunk (the population's activations within the "
                     f"parameters' size: gfo.optim.plan)")
    return line


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_eval_chunk(section, batch, model_config, x0, param_bytes: int, mesh) -> int | None:
    """The `eval_chunk` for a population method whose `section` leaves it unset, from the memory budget;
    None when the whole population fits at once (or the method has no population, or a chunk is set).

    Per device: `budget = limit / 2 − (param_bytes + 4 × searched bytes)` (frozen weights, the point, two
    optax moments, the update), times the mesh's `pop` size (each device holds `chunk / pop` members);
    `member = gfo.optim.evaluate.activation_bytes(B·T, B, T, d_model, heads, vocab)` for the batch's largest
    `[B, T]` leaf, plus the searched bytes for full-rank methods (a member holds a perturbed copy of the
    point; low-rank ES holds only factors).
    """
    from gfo.optim import registry as methods
    from gfo.optim.evaluate import activation_bytes, default_chunk

    try:
        spec = methods.lookup(section.method)
    except ValueError:
        return None  # the build names the bad method
    if getattr(section, "eval_chunk", None) is not None or not spec.splits_population:
        return None
    shapes = [np.shape(v) for v in jax.tree.leaves(batch) if np.ndim(v) >= 2]
    B, T = max(shapes, key=lambda sh: sh[0] * sh[1])[:2] if shapes else (1, 1)
    x_bytes = tree_bytes(x0)
    member = activation_bytes(B * T, B, T, model_config.d_model, model_config.n_heads, model_config.vocab_size)
    if spec.dense_members:
        member += x_bytes
    limit, _ = device_memory_limit(mesh)
    pop = mesh.shape["pop"]
    budget = max(0, limit // 2 - (param_bytes + 4 * x_bytes)) * pop
    members = section.population + (2 if spec.domain == "tokens" else 0)  # discrete: + current and best
    return default_chunk(members, member, budget, pop)
