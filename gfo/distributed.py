"""Scale-out: multi-controller start-up, one `(pop, data, model)` mesh, and placing trees on it.

    gfo.distributed.initialize()                    # no-op on one process; auto on TPU pods / SLURM
    mesh = gfo.distributed.make_mesh(pop=-1, data=1, model=1)
    state = gfo.distributed.place(state, mesh)      # parameters by the model-axis rules, rest replicated
    batch = gfo.distributed.place_batch(batch, mesh)  # leading (example) axis over `data`

Population members are split over `pop` (`pop_sharding(mesh)` is what the estimators take), each
member's batch over `data`, and the weights of models too large for one device over `model`
(Megatron-style rules on the parameter path: column-parallel q/k/v/up/gate/fc, row-parallel o/down/
proj, vocabulary-parallel embedding and head). Only fitness scalars and, for gradient-type estimators,
the all-reduced update cross devices. Noise is regenerated from keys with JAX's partitionable threefry,
so results do not depend on the mesh: the same seed gives the same parameters on 1 device, 8 devices
or several processes, up to float summation order.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.tree import path_name
from models.tree import LAYERS

AXES = ("pop", "data", "model")

# (regex over the leaf's path, which axis of the leaf goes over `model`); the first match wins. Paths
# inside optimizer states (Adam moments) end in the parameter's path, so one rule covers both. Axes count
# from the layer's own shape: a leaf of the stacked `layers/` subtree ([n_layers, ...]) shifts the axis by
# one, and its layer axis stays replicated (every device runs every layer of the scan).
DEFAULT_RULES: tuple[tuple[str, int], ...] = (
    (r"(^|/)(q|k|v|gate|up|fc)/kernel$", 1),  # column-parallel: output features
    (r"(^|/)(q|k|v|gate|up|fc)/bias$", 0),
    (r"(^|/)(o|down|proj)/kernel$", 0),  # row-parallel: input features
    (r"(^|/)embed$", 0),  # vocabulary-parallel
    (r"(^|/)lm_head$", 1),
)

_STACKED = re.compile(rf"(^|/){LAYERS}/")
_initialized = False


class DistributedError(RuntimeError):
    """A mesh or multi-process setting that cannot be used on the devices present."""


def _detected_cluster() -> str | None:
    """The multi-process environment `jax.distributed.initialize()` can configure itself, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        return "tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start multi-controller JAX when this is one of several processes; returns whether it did.

    Explicit arguments (or `GFO_COORDINATOR_ADDRESS`, `GFO_NUM_PROCESSES`, `GFO_PROCESS_ID`) win;
    otherwise a Cloud TPU pod slice, a SLURM job with several tasks, or an MPI launch is detected and
    JAX configures itself. A single process does nothing. Calling it again is a no-op. Must run before
    anything touches a device.
    """
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get("GFO_COORDINATOR_ADDRESS")
    if num_processes is None and "GFO_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["GFO_NUM_PROCESSES"])
    if process_id is None and "GFO_PROCESS_ID" in os.environ:
        process_id = int(os.environ["GFO_PROCESS_ID"])
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise DistributedError(
                f"explicit multi-process start needs all of coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes!r}, process_id={process_id!r}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
        if num_processes == 1:
            return False
        _start(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _detected_cluster() is not None:
        _start()
    else:
        return False
    _initialized = True
    return True


def _start(*args, **kwargs):
    try:
        jax.distributed.initialize(*args, **kwargs)
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise
        raise DistributedError(
            "multi-process JAX must start before anything uses a device, and something already did (importing "
            "evosax, gfo.run.train or gfo.optim.search.strategies does): call gfo.distributed.initialize(...) first, as "
            "`gfo train` does, or launch with GFO_COORDINATOR_ADDRESS/GFO_NUM_PROCESSES/GFO_PROCESS_ID set "
            "and call it at the top of the script") from None


def is_primary() -> bool:
    """Whether this process writes logs, summaries and other single-writer files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def mesh_shape(pop: int = -1, data: int = 1, model: int = 1, n_devices: int | None = None) -> tuple[int, int, int]:
    """Axis sizes with at most one `-1` ("the devices left"); their product must be the device count.

    On a single process the product may be smaller (the first devices are used), so a run can be
    pinned to one device (`pop=1`) for comparison; with several processes every device takes part.
    """
    n = jax.device_count() if n_devices is None else n_devices
    sizes = [pop, data, model]
    for name, s in zip(AXES, sizes):
        if s == 0 or s < -1:
            raise DistributedError(f"mesh.{name}={s}: expected a positive size or -1 (the devices left)")
    if sizes.count(-1) > 1:
        raise DistributedError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise DistributedError(f"mesh {dict(zip(AXES, sizes))}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    total = int(np.prod(sizes))
    if total > n or (total < n and jax.process_count() > 1):
        raise DistributedError(f"mesh {dict(zip(AXES, sizes))} needs {total} devices; {n} are present "
                               f"({jax.process_count()} process(es)); the sizes must multiply to {n}")
    return tuple(sizes)


def make_mesh(pop: int = -1, data: int = 1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """The `(pop, data, model)` mesh (automatic sharding propagation inside jit on every axis)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(pop, data, model, len(devices))
    used = devices[:int(np.prod(shape))]
    if jax.process_count() == 1:
        grid = np.array(used, dtype=object).reshape(shape)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=used)


def pop_sharding(mesh: Mesh) -> NamedSharding | None:
    """The sharding of per-member vectors (fitness, member ids) over `pop`, or None for a 1-wide axis."""
    return NamedSharding(mesh, P("pop")) if mesh.shape["pop"] > 1 else None


def leaf_spec(name: str, shape: tuple, model_size: int, rules=DEFAULT_RULES) -> P:
    """The `PartitionSpec` of one parameter-like leaf: one axis over `model` by `rules`, else replicated.

    A leaf whose matched axis is not divisible by the model axis stays replicated (correct, only less
    memory-efficient), as do scalars and leaves no rule matches. Rules name the axis of one layer's
    parameter; for a stacked leaf (a path through `models.LAYERS`) it is shifted past the layer axis.
    """
    if model_size > 1:
        for pattern, axis in rules:
            axis += bool(_STACKED.search(name))
            if re.search(pattern, name) and len(shape) > axis and shape[axis] % model_size == 0:
                spec = [None] * len(shape)
                spec[axis] = "model"
                return P(*spec)
    return P()


def shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """A tree of `NamedSharding`s like `tree` (arrays or shape/dtype structs): `leaf_spec` per leaf."""
    size = mesh.shape["model"]
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, leaf_spec(path_name(p), tuple(np.shape(x)), size, rules)), tree)


def _put(x, sharding: NamedSharding):
    """One leaf onto `sharding` from this process's copy (identical on every process)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda v: v, out_shardings=sharding)(x)  # a global array: reshard on device
    return jax.device_put(np.asarray(x), sharding)


def place(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """`tree` (identical on every process) as global arrays on `mesh`, by `shardings(tree, mesh, rules)`."""
    return jax.tree.map(_put, tree, shardings(tree, mesh, rules))


def place_as(tree, tree_shardings):
    """`tree` (identical on every process) as global arrays with the given tree of `NamedSharding`s (an
    optimizer's `state_sharding`: the optimizer chooses its state's rules)."""
    return jax.tree.map(_put, tree, tree_shardings)


def batch_sharding(x, mesh: Mesh) -> NamedSharding:
    """The leading (example) axis over `data`; scalars replicated."""
    if np.ndim(x) == 0 or mesh.shape["data"] == 1:
        return NamedSharding(mesh, P())
    if np.shape(x)[0] % mesh.shape["data"]:
        raise DistributedError(f"a batch leaf of shape {np.shape(x)} cannot be split over mesh.data="
                               f"{mesh.shape['data']}: the batch size must be a multiple of it")
    return NamedSharding(mesh, P("data"))


def place_batch(batch, mesh: Mesh):
    """A host batch (identical on every process) with its leading axis split over `data`."""
    return jax.tree.map(lambda x: _put(x, batch_sharding(x, mesh)), batch)


def to_host(tree):
    """Numpy copies of global arrays on every process (gathers what is not addressable here)."""
    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(leaf, tree)
