"""Scale-out: multi-controller start-up, one `(pop, data, model)` mesh, and placing trees on it.

    gfo.distributed.initialize()                    # no-op on one process; auto on TPU pods / SLURM
    mesh = gfo.distributed.make_mesh(pop=-1, data=1, model=1)
    state = gfo.distributed.place(state, mesh)      # parameters by the model-axis rules, rest replicated
    batch = gfo.distributed.place_batch(batch, mesh)  # leading (example) axis over `data`
    with gfo.distributed.checked("the config check"):  # a failure on any process stops every process
        ...

Every process waits at most `initialization_timeout` seconds (120) for all to join, and as long at each
of `gfo train`'s start-up barriers (`checked`), where each learns whether another failed before it: a
peer that never comes, or a check that fails on one process only (the run lock, `--strict`), ends every
process in one line instead of leaving the others waiting.

Population members are split over `pop` (`pop_sharding(mesh)` is what the estimators take), each
member's batch over `data`, and the weights of models too large for one device over `model`
(Megatron-style rules on the parameter path: column-parallel q/k/v/up/gate/fc, row-parallel o/down/
proj, vocabulary-parallel embedding and head). Only fitness scalars and, for gradient-type estimators,
the all-reduced update cross devices. Noise is regenerated from keys with JAX's partitionable threefry,
so results do not depend on the mesh: the same seed gives the same parameters on 1 device, 8 devices
or several processes, up to float summation order.
"""

from __future__ import annotations

import contextlib
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


class DistributedTimeout(DistributedError):
    """Not every process joined the coordinator within `initialization_timeout`. JAX's start-up is still
    blocked in a thread that cannot be stopped (and JAX aborts the process when its own, later deadline
    passes), so the process must end: `gfo`'s command line ends it at once (`abandon_process`)."""

    abandon_process = True


class DistributedInterrupted(KeyboardInterrupt):
    """Ctrl-C while waiting for the other processes to join (the process must end, as on a timeout)."""

    abandon_process = True


DEFAULT_TIMEOUT_S = 120  # how long a process waits for the others: to join at start-up, at gfo's barriers
_JAX_GRACE_S = 60  # JAX's own start-up deadline, later than ours: when it passes JAX aborts the process
_timeout_s = DEFAULT_TIMEOUT_S
_meetings = 0  # gfo's barriers so far (the same sequence on every process): each has its own id


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
               process_id: int | None = None, initialization_timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Start multi-controller JAX when this is one of several processes; returns whether it did.

    Explicit arguments (or `GFO_COORDINATOR_ADDRESS`, `GFO_NUM_PROCESSES`, `GFO_PROCESS_ID`) win;
    otherwise a Cloud TPU pod slice, a SLURM job with several tasks, or an MPI launch is detected and
    JAX configures itself. A single process does nothing. Calling it again is a no-op. Must run before
    anything touches a device.

    Every process waits at most `initialization_timeout` seconds for all of them to join; then it raises
    `DistributedTimeout` naming the coordinator and the processes that joined and did not (as far as this
    process can know: JAX's coordinator tells nobody anything until all have joined), and Ctrl-C while
    waiting raises `DistributedInterrupted`. Either way the process must end (`gfo` ends it at once). The
    same timeout bounds gfo's barriers (`checked`) afterwards.
    """
    global _initialized, _timeout_s
    if _initialized:
        return True
    if isinstance(initialization_timeout, bool) or not 0 < initialization_timeout < float("inf"):
        raise DistributedError(f"distributed.initialization_timeout={initialization_timeout!r}: expected a "
                               f"finite number of seconds > 0")
    _timeout_s = initialization_timeout
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
        _start(initialization_timeout, coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _detected_cluster() is not None:
        _start(initialization_timeout)
    else:
        return False
    _initialized = True
    return True


def _start(timeout_s: float, coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` in a daemon thread, this (main) thread waiting for it at most `timeout_s`.

    Called directly, JAX's start-up blocks in C++ where Ctrl-C never reaches Python, and when its deadline
    passes it aborts the whole process (a fatal log and a C++ stack trace, no Python exception); from a
    thread, the main thread stays in Python: Ctrl-C interrupts the wait, and our deadline, earlier than
    JAX's, ends in one line."""
    import threading
    import time

    where = f"coordinator {coordinator_address}" if coordinator_address else "the cluster's coordinator"
    done, failure = threading.Event(), []

    def start():
        try:
            jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=int(timeout_s) + _JAX_GRACE_S)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)
        finally:
            done.set()

    deadline = time.monotonic() + timeout_s
    try:
        threading.Thread(target=start, name="gfo-distributed-start", daemon=True).start()
        if num_processes is not None:
            print(f"multi-process start: process {process_id} of {num_processes} waiting for all {num_processes} "
                  f"at {where} (up to distributed.initialization_timeout={timeout_s:g} s)", flush=True)
        while not done.wait(max(0.0, min(0.25, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise _not_joined(where, num_processes, process_id, timeout_s)
    except KeyboardInterrupt:
        raise DistributedInterrupted(f"interrupted while waiting for the other processes to join {where}") from None
    if failure:
        e = failure[0]
        if isinstance(e, RuntimeError) and "must be called before" in str(e):
            raise DistributedError(
                "multi-process JAX must start before anything uses a device, and something already did (importing "
                "evosax, gfo.run.train or gfo.optim.search.strategies does): call gfo.distributed.initialize(...) "
                "first, as `gfo train` does, or launch with GFO_COORDINATOR_ADDRESS/GFO_NUM_PROCESSES/"
                "GFO_PROCESS_ID set and call it at the top of the script") from None
        raise e


def _not_joined(where: str, n: int | None, me: int | None, timeout_s: float) -> DistributedTimeout:
    """What a process that waited `timeout_s` in vain can say: JAX's coordinator answers no process until
    every one has joined, so process 0 knows only itself joined, and process k > 0 that it got no answer."""
    fix = (f"start every process within {timeout_s:g} s of each other with the same coordinator address and "
           f"num_processes (each its own process_id), or raise distributed.initialization_timeout")
    if n is None:
        return DistributedTimeout(f"multi-process start timed out after {timeout_s:g} s at {where} (a detected "
                                  f"cluster): not every process joined; {fix}")
    others = [p for p in range(n) if p != me]
    if me == 0:
        missing = (f"process {others[0]}" if len(others) == 1 else
                   f"some of processes {others[0]}..{others[-1]} (the coordinator does not say which joined)")
        return DistributedTimeout(f"multi-process start timed out after {timeout_s:g} s at {where}: joined: "
                                  f"process 0 (this one, the coordinator); did not join: {missing}; {fix}")
    return DistributedTimeout(f"multi-process start timed out after {timeout_s:g} s at {where}: process {me} of "
                              f"{n} (this one) could not complete joining: process 0 is not running there or "
                              f"not reachable, or not every process started; {fix}")


def is_primary() -> bool:
    """Whether this process writes logs, summaries and other single-writer files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing to do with one process); a process that does not
    arrive within the start-up timeout is a `DistributedError` naming it, on every process that did."""
    with checked(name):
        pass


@contextlib.contextmanager
def checked(name: str):
    """Run the block, then meet every other process at barrier `name` and learn whether the block failed on
    any: when it did, every process stops — the one that failed with its own error, the others with a
    `DistributedError` naming that process and its message — instead of waiting forever for it at the next
    barrier. A process that does not arrive within the start-up timeout (`initialize`) stops the others,
    naming it. Ctrl-C passes at once. One process: only the block."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except Exception as e:
        _meet(name, e)
        raise
    _meet(name, None)


def _meet(name: str, error: BaseException | None) -> None:
    """Post this process's outcome of the block before barrier `name` in JAX's key-value store and, when it
    succeeded, poll the store until every process has posted one (or one posted a failure, or the timeout
    passes). Polling, not the client's `wait_at_barrier`: that blocks in C++, where Ctrl-C is not seen,
    and it cannot say who had arrived. A failing process posts and goes on to raise its own error (its exit
    waits, in JAX's shutdown, for the others, so its post stays readable)."""
    global _meetings
    import time

    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    _meetings += 1
    key = f"gfo/barrier/{_meetings}"
    me, n = jax.process_index(), jax.process_count()
    outcome = "ok" if error is None else "failed: " + (" ".join(str(error).split()) or type(error).__name__)
    client.key_value_set(f"{key}/{me}", outcome)
    if error is not None:
        return
    deadline = time.monotonic() + _timeout_s
    while True:
        posted = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(key + "/")}
        failed = sorted((p, v[len("failed: "):]) for p, v in posted.items() if v.startswith("failed: "))
        if failed:
            (first, why), more = failed[0], [p for p, _ in failed[1:]]
            raise DistributedError(f"process {first} stopped before {name!r}" + (
                f" (and process(es) {more})" if more else "") + f", so every process stops: {why}")
        if len(posted) == n:
            return
        if time.monotonic() >= deadline:
            missing = sorted(set(range(n)) - set(posted))
            raise DistributedError(f"process(es) {missing} did not reach {name!r} within {_timeout_s:g} s "
                                   f"(distributed.initialization_timeout; arrived: {sorted(posted)}): failed or "
                                   f"stuck before it; see their own output")
        time.sleep(0.05)


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
