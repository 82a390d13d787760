"""A lean step for `gfo train`: memory read ahead of time, a chunk that fits, a persistent compile cache.

- `compile_step`: a run's step lowered and compiled ahead of time (the loop then reuses the executable),
  reported in one line (`step_memory_line`).
- `step_memory_line`: XLA's memory analysis of the ahead-of-time compiled step (`compiled.memory_analysis()`)
  as multiples of the parameter bytes per device, and `StepMemoryError` when its peak
  (arguments + outputs − donated + temporaries + code) exceeds `device_memory_limit` (an accelerator's
  `bytes_limit`; on CPU the physical RAM shared by the local devices).
- `plan_eval_chunk`: `optimizer.eval_chunk` for a population method that leaves it unset
  (`gfo.optim.evaluate.default_chunk` with the budget and per-member bytes below).
- `enable_compilation_cache`: JAX's persistent compilation cache under `$GFO_CACHE_DIR/jax`
  (default `~/.cache/gfo/jax`); `GFO_COMPILATION_CACHE=0` turns it off.
- `release_compiled_programs`: drops JAX's in-memory compiled programs when the process's memory maps
  near the kernel's limit (on CPU a small executable holds ~10 maps, a `gfo train` run's step and
  evaluations ~2000; past `vm.max_map_count`, 65530 by default, the next compile segfaults).
"""

from __future__ import annotations

import gc
import os
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


def memory_maps() -> tuple[int, int] | None:
    """`(memory maps of this process, the kernel's per-process limit vm.max_map_count)`, None off Linux."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except (OSError, ValueError):
        return None


def release_compiled_programs(fraction: float = 0.5, note=print) -> bool:
    """`jax.clear_caches()` when this process holds over `fraction` of the kernel's memory-map limit.

    JAX keeps every program it compiled for the life of the process, and each CPU executable keeps its
    JIT-ed code in memory maps of its own (~2000 for a `gfo train` step and its evaluations). A process
    that runs many trials (a sweep, a notebook, a test session) would pass `vm.max_map_count` and crash
    inside XLA at its next compile (SIGSEGV: the mapping fails). Dropping the caches costs a re-trace and
    re-compile of what is used again (the persistent compilation cache, when on, serves those). Returns
    whether it cleared; `note(message)` is told why."""
    maps = memory_maps()
    if maps is None or maps[0] <= fraction * maps[1]:
        return False
    jax.clear_caches()
    gc.collect()
    after = memory_maps()
    if note is not None:
        note(f"released JAX's compiled programs: this process held {maps[0]} memory maps of the kernel's "
             f"limit {maps[1]} (vm.max_map_count); {after[0] if after else '?'} after")
    return True


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache under `$GFO_CACHE_DIR/jax` (default `~/.cache/gfo/jax`),
    so a restarted or repeated run skips compilation; `GFO_COMPILATION_CACHE=0` turns it off. Returns
    the directory (None when off)."""
    if os.environ.get("GFO_COMPILATION_CACHE", "1").lower() in ("0", "false", "off", "no"):
        return None
    root = os.environ.get("GFO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gfo")
    path = os.path.join(root, "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every step, even a tiny model's
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
