"""One process of a multi-process `gfo train` (started by `test_distributed.py`, not collected by pytest).

    python tests/distributed_worker.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT METHOD [KEY=VALUE ...]

Runs the config through `gfo.run.train.train` with an explicit coordinator on 127.0.0.1 and writes this
process's final parameters to `OUT_DIR/METHOD_PROCESS_ID.npz` (flattened by parameter path).
"""

import sys

import numpy as np


def main(argv):
    out_dir, process_id, num_processes, port, method, *overrides = argv
    from gfo import distributed
    from gfo.run.config import load_config

    cfg = load_config(None, [*overrides, f"distributed.coordinator_address=127.0.0.1:{port}",
                             f"distributed.num_processes={num_processes}", f"distributed.process_id={process_id}"])
    d = cfg.distributed
    distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)  # as `gfo train` does, first
    from gfo.optim.noise import path_name
    from gfo.run.train import train

    params = distributed.to_host(train(cfg)["params"])  # `train` starts multi-process JAX
    import jax

    assert jax.process_count() == int(num_processes), jax.process_count()
    flat = {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(f"{out_dir}/{method}_{process_id}.npz", **flat)
    print(f"process {process_id}: {jax.device_count()} devices, {len(jax.local_devices())} local, done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
