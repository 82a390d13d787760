"""What a step decides from its arguments, so that a script gets the lean step with no extra arguments.

- `plan_chunk(estimator, objective, x, batch, key)`: a population estimator without a chunk
  (`batch_size=None`) gets one from the memory budget. One member's evaluation is compiled from
  shapes (`member_bytes`: XLA's temporaries for `objective(x, batch, key)`, plus a perturbed copy of `x`
  where the perturbation is not drawn inside the forward), and `default_chunk` picks the members per
  chunk that keep the population's activations within `activation_budget`.
- `activation_budget(param_bytes, limit, state_bytes)`: the activations a population may hold at once —
  as much as the parameters themselves (at least `FLOOR_BYTES`), never more than half the device less the
  state. With the step's other buffers (weights, point, update) this keeps a population step within a
  small multiple of the parameters whatever the population (issue 23: ≤ 2.5 × for OpenES), which is what
  an ES framework is for; `batch_size=N` trades memory for speed explicitly.

`gfo.Optimizer` calls `plan_chunk` once per (objective structure, shapes) outside the jitted step;
`gfo train` builds its optimizers through the same class, so both doors get the same chunk.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from gfo.jitting import combine, filter_jit, partition

FLOOR_BYTES = 64 * 2**20


def tree_bytes(tree) -> int:
    """Bytes of `tree`'s array leaves held by one device (a sharded leaf counts its shard), through any
    object `gfo.jitting.partition` looks into (an objective's frozen weights)."""
    total = 0
    for x in partition(tree)[1]:
        concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
        shards = x.addressable_shards if concrete else None  # a tracer (planning inside a trace): its shape
        total += shards[0].data.nbytes if shards else int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
    return total


def device_memory_limit(mesh=None) -> tuple[int, str]:
    """`(bytes, where from)` one device may use: the accelerator's `bytes_limit`, or on CPU the machine's
    physical memory shared by its local devices."""
    local = [d for d in (mesh.devices.flat if mesh is not None else jax.devices())
             if d.process_index == jax.process_index()]  # only this process's devices report their memory
    device = local[0] if local else jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} bytes_limit"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = max(1, len(jax.local_devices(backend=device.platform)))
    return ram // n, "physical RAM" + (f" / {n} devices" if n > 1 else "")


def activation_budget(param_bytes: int, limit: int, state_bytes: int) -> int:
    """Bytes the population's activations may take at once (see the module doc)."""
    return max(0, min(max(int(param_bytes), FLOOR_BYTES), int(limit) // 2 - int(state_bytes)))


@filter_jit
def _evaluate(objective, x, batch, key):
    return objective(x, batch, key)


def member_bytes(objective, x, batch, key) -> int:
    """XLA's temporaries (and output) for one evaluation `objective(x, batch, key)`, compiled from the
    shapes of `x` and `batch` (nothing runs)."""
    def abstract(obj):  # every array (or tracer: planning may run inside another trace) as its shape
        desc, arrays = partition(obj)
        return combine(desc, [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in arrays])

    lowered = _evaluate.lower(abstract(objective), abstract(x), abstract(batch), abstract(key))
    analysis = lowered.compile().memory_analysis()
    if analysis is None:  # a backend without the analysis: no plan
        return 0
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def plan_chunk(estimator, objective, x, batch, key):
    """`estimator` with `batch_size` planned from the memory budget when it is a population estimator
    (`gfo.optim.population.PopulationConfig`) without one and the whole population does not fit; otherwise
    `estimator` itself. `estimator.factored` must be resolved (`for_objective`)."""
    from gfo.optim.evaluate import default_chunk
    from gfo.optim.population import PopulationConfig

    if not isinstance(estimator, PopulationConfig) or estimator.batch_size is not None:
        return estimator
    x_bytes = tree_bytes(x)
    member = member_bytes(objective, x, batch, key) + (0 if estimator.factored else x_bytes)
    param_bytes = max(tree_bytes(objective), x_bytes)
    mesh = estimator.pop_sharding.mesh if estimator.pop_sharding is not None else None
    limit, _ = device_memory_limit(mesh)
    multiple = mesh.shape["pop"] if mesh is not None else 1
    budget = activation_budget(param_bytes, limit, param_bytes + 4 * x_bytes) * multiple
    chunk = default_chunk(estimator.population, member, budget, multiple)
    return estimator if chunk is None else dataclasses.replace(estimator, batch_size=chunk)
